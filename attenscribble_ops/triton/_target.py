"""Which tile sizes the Triton kernels take: a GPU's, or the interpreter's (there, fewer and
larger programs run faster). One switch, so that tests/triton_sm90.py can compile the GPU
variants for sm_90 from CPU tensors on a machine with no GPU."""
import torch


def for_gpu(t: torch.Tensor) -> bool:
    """True when ``t``'s kernels launch on a GPU (its tiles and its tf32 choice)."""
    return t.is_cuda
