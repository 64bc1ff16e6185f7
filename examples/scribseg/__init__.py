"""scribseg: the scribble-supervised segmentation application built on attenscribble_ops.

Readers (WSL4MIS HDF5, ACDC NIfTI, CHAOS DICOM+PNG and NIfTI), a synthetic cardiac phantom, a
scribble synthesiser, patient splits, the official U-Net with a pluggable spatial self-attention
block, the AttenScribble objective through the library, training (DDP, AMP, resume), honest
evaluation (validation-only model selection, Dice and HD95 in mm, empty predictions counted) and
figures. The library never imports this package.
"""
from .volume import DataError, Volume

__all__ = ["DataError", "Volume"]
