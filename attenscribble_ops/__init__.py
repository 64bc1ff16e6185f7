"""attenscribble_ops: fused, memory-efficient losses for scribble-supervised segmentation
(AttenScribble: masked CRF loss, attentive similarity loss, spatial self-attention).

Importing never fails for lack of the compiled extension or of Triton: the reference backend
always runs, and :func:`explain` says why a faster backend was skipped.
"""
from ._version import __version__
from . import backends as _backends

_backends._load_implementations()

from ._crf_params import CRFKernel
from .backends import AUTO_ORDER, BackendUnavailableError, available_backends, explain, resolve
from .functional import attentive_similarity_loss, masked_crf_loss, spatial_attention
from . import compat, nn

__all__ = [
    "AUTO_ORDER",
    "BackendUnavailableError",
    "CRFKernel",
    "__version__",
    "attentive_similarity_loss",
    "available_backends",
    "compat",
    "explain",
    "masked_crf_loss",
    "nn",
    "resolve",
    "spatial_attention",
]
