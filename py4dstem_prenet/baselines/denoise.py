"""Classical denoisers of 4D-STEM data: Gaussian filtering and a truncated tensor SVD.

Both take and return arrays in the input's units (expected counts).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .._validation import as_patterns

__all__ = ["gaussian_denoise", "tensor_svd_denoise", "anscombe", "inverse_anscombe"]


def gaussian_denoise(data: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian low-pass filter of every pattern over the detector axes.

    Parameters
    ----------
    data : numpy.ndarray
        Patterns, shape (..., Q_Nx, Q_Ny) with 2 to 4 dimensions.
    sigma : float
        Standard deviation of the filter, detector pixels (> 0).

    Returns
    -------
    numpy.ndarray
        Filtered float64 array of the same shape.
    """
    arr = as_patterns(data)
    if not (sigma > 0 and np.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and > 0 pixels, got {sigma}")
    s = (0,) * (arr.ndim - 2) + (sigma, sigma)
    return ndimage.gaussian_filter(arr, s, mode="nearest")


def anscombe(x: np.ndarray) -> np.ndarray:
    """Anscombe variance-stabilising transform of Poisson counts (variance -> ~1)."""
    return 2.0 * np.sqrt(np.clip(x, 0, None) + 3.0 / 8.0)


def inverse_anscombe(y: np.ndarray) -> np.ndarray:
    """Closed-form asymptotically unbiased inverse of :func:`anscombe` (Makitalo-Foi)."""
    y = np.maximum(y, 2.0 * np.sqrt(3.0 / 8.0))
    return np.clip(
        0.25 * y**2 + 0.25 * np.sqrt(1.5) / y - 11.0 / 8.0 / y**2 + 5.0 / 8.0 * np.sqrt(1.5) / y**3 - 1.0 / 8.0,
        0, None,
    )


def _mode_basis(t: np.ndarray, mode: int, rank: int | None) -> np.ndarray:
    unf = np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)
    gram = unf @ unf.T
    w, v = np.linalg.eigh(gram)
    w, v = w[::-1], v[:, ::-1]
    if rank is None:
        # Keep singular values above the edge of pure unit-variance noise
        # (Marchenko-Pastur: sqrt(m) + sqrt(n)), data already variance-stabilised.
        m, n = unf.shape
        edge = (np.sqrt(m) + np.sqrt(n)) ** 2
        rank = max(1, int(np.sum(w > 1.1 * edge)))
    return v[:, : min(rank, t.shape[mode])]


def tensor_svd_denoise(
    data: np.ndarray, ranks: tuple[int | None, int | None, int | None, int | None] | None = None,
    stabilise: bool = True, gain: float = 1.0,
) -> np.ndarray:
    """Truncated higher-order SVD (Tucker) of a 4D dataset.

    The data are variance-stabilised (Anscombe, after dividing by ``gain``), each
    mode's basis is truncated at the noise edge of its unfolding (or at the given
    rank), the core is projected back and the transform inverted.

    Parameters
    ----------
    data : numpy.ndarray
        (R_Nx, R_Ny, Q_Nx, Q_Ny) counts.
    ranks : tuple, optional
        Rank per mode; None entries are chosen automatically.
    stabilise : bool
        Apply the Anscombe transform (Poisson data).
    gain : float
        Counts per electron, to stabilise integrating-detector data.

    Returns
    -------
    numpy.ndarray
        Denoised float64 array, same shape, in the input's units.
    """
    arr = as_patterns(data, ndim=(4,))
    if ranks is None:
        ranks = (None,) * 4
    if len(ranks) != 4 or any(r is not None and int(r) < 1 for r in ranks):
        raise ValueError(f"ranks must be four positive integers or None, got {ranks}")
    if not (gain > 0):
        raise ValueError(f"gain must be > 0, got {gain}")
    t = anscombe(arr / gain) if stabilise else arr.copy()
    bases = [_mode_basis(t, m, ranks[m]) for m in range(4)]
    core = t
    for m, u in enumerate(bases):
        core = np.moveaxis(np.tensordot(u.T, np.moveaxis(core, m, 0), axes=1), 0, m)
    rec = core
    for m, u in enumerate(bases):
        rec = np.moveaxis(np.tensordot(u, np.moveaxis(rec, m, 0), axes=1), 0, m)
    return inverse_anscombe(rec) * gain if stabilise else rec
