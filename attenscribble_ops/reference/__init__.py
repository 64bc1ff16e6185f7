"""Plain-PyTorch implementations: the exact official semantics, the test oracle and the fallback
that runs on any device. Importing this package registers them as the "reference" backend."""
from .attentive_similarity import attentive_similarity_reference, window_decay, window_decay_numpy
from .masked_crf import dense_kernels, masked_crf_reference, window_view
from .spatial_attention import spatial_attention_reference

__all__ = [
    "attentive_similarity_reference",
    "dense_kernels",
    "masked_crf_reference",
    "spatial_attention_reference",
    "window_decay",
    "window_decay_numpy",
    "window_view",
]
