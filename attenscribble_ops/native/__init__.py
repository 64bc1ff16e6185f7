"""Python glue of the compiled operators (attenscribble_ops._C): fake kernels for torch.compile
and opcheck, autograd formulas, and registration as the "cpu" and "cuda" backends. Imported only
when the extension loaded."""
from . import clean_mask  # noqa: F401
from . import masked_crf  # noqa: F401
from . import spatial_attention  # noqa: F401,E402  (before attentive_similarity, which uses its LSE op)
from . import attentive_similarity  # noqa: F401,E402
