"""Which tile sizes the Triton kernels take: a GPU's, or the interpreter's (there, fewer and
larger programs run faster). One switch, so that tests/triton_sm90.py can compile the GPU
variants for sm_90 from CPU tensors on a machine with no GPU. And the device a launch runs on
(:func:`on_tensor_device`)."""
import functools
import inspect

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


def on_tensor_device(op):
    """``op`` (a custom op's implementation) run with its first tensor argument's GPU as the
    current device. Triton launches on the current device and its current stream, not on the
    device of the tensors it is given: without this, tensors on cuda:1 while cuda:0 is current
    would be read by a kernel on cuda:0 (an illegal address, or with peer access a read unordered
    against cuda:1's stream). CPU tensors (the interpreter) run as they are."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda:
            return op(*args, **kwargs)
        with torch.cuda.device(first.device):
            return op(*args, **kwargs)

    # the annotations resolved in op's module (custom_op reads them to infer the schema)
    run.__signature__ = inspect.signature(op, eval_str=True)
    return run
