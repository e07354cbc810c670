"""py4DSTEM's classical calibrations and classical denoisers, behind one interface."""

from .denoise import anscombe, gaussian_denoise, inverse_anscombe, tensor_svd_denoise
from .ellipse import (aligned_mean_pattern, bragg_vector_map, ellipse_amorphous_ring, ellipse_fit_1d,
                      ellipse_from_bragg_vectors)
from .origin import fit_origin, get_origin, get_origin_friedel

__all__ = [
    "aligned_mean_pattern", "anscombe", "bragg_vector_map", "ellipse_amorphous_ring",
    "ellipse_fit_1d", "ellipse_from_bragg_vectors", "fit_origin", "gaussian_denoise", "get_origin",
    "get_origin_friedel", "inverse_anscombe", "tensor_svd_denoise",
]
