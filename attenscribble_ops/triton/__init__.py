"""Triton kernels wrapped as torch.library custom ops (custom_op + register_fake + autograd),
registered as the "triton" backend. Imported only when triton is importable; on the CPU they run
through the Triton interpreter (TRITON_INTERPRET=1 set before import)."""
from . import masked_crf  # noqa: F401
from . import spatial_attention  # noqa: F401,E402
from . import attentive_similarity  # noqa: F401,E402
