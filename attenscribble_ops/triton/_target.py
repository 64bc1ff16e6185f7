"""Which tile sizes the Triton kernels take: a GPU's, or the interpreter's (there, fewer and
larger programs run faster). One switch, so that tests/triton_sm90.py can compile the GPU
variants for sm_90 from CPU tensors on a machine with no GPU."""
import torch


def for_gpu(t: torch.Tensor) -> bool:
    """True when ``t``'s kernels launch on a GPU (its tiles and its tf32 choice)."""
    return t.is_cuda


def tf32_tensor_cores(t: torch.Tensor) -> bool:
    """True when ``t``'s GPU multiplies TF32 on tensor cores the way Triton's "tf32"/"tf32x3" dots
    need: an NVIDIA card of compute capability 8.0 or later (Triton runs tf32x3 as FMA dots below
    that, and ROCm's Triton does not take it). Tensors that are not on CUDA (the compile-only
    stand-in for an H100 in tests/triton_sm90.py) count as such a card."""
    if not t.is_cuda:
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(t.device) >= (8, 0)
