"""Beam stops: finding one in a pattern, and the origin hidden behind it.

A beam stop is put over the direct beam (selected-area patterns, some 4D-STEM
set-ups), so where a pattern has one, the origin lies under it. When the stop also
sits at the detector edge, the inversion about the origin keeps too little of the
detector for any symmetry measurement; what is left is the diffuse scattering
(inelastic and thermal), which falls off with the distance from the direct beam.
:func:`origin_behind_stop` fits that fall-off.

Conventions: patterns are (Q_Nx, Q_Ny) counts; positions (qx, qy) in pixels, pixel
centres at integers.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["detect_beam_stop", "origin_behind_stop", "MIN_BACKGROUND"]

#: A pattern needs a median of at least this many counts per pixel (a background to
#: be dark against) for a beam stop to be looked for.
MIN_BACKGROUND = 1.0

#: Beam-stop pixels read below this fraction of the pattern's median (after a 2 px
#: Gaussian smoothing) ...
DARK_FRACTION = 0.25

#: ... and the band just outside the stop reads at least this fraction of it: a stop
#: has a sharp edge, a dim detector corner of a decaying background has not.
RIM_FRACTION = 0.5

#: Area of a beam stop, as fractions of the detector.
MIN_AREA, MAX_AREA = 0.002, 0.4

#: Most candidate centres tried behind a stop (its pixels are subsampled beyond this).
MAX_CANDIDATES = 4000


def detect_beam_stop(pattern: np.ndarray) -> np.ndarray | None:
    """The beam stop of one pattern, if it has one.

    A beam stop is a connected dark region that touches the detector edge (its rod
    is held from outside), reads below DARK_FRACTION of the pattern's median, covers
    MIN_AREA to MAX_AREA of the detector, and is surrounded by pattern that reads at
    least RIM_FRACTION of the median (a sharp edge).

    Parameters
    ----------
    pattern : numpy.ndarray
        (Q_Nx, Q_Ny) counts, any real dtype; non-finite pixels read as 0.

    Returns
    -------
    numpy.ndarray or None
        (Q_Nx, Q_Ny) bool, True on the stop; None when there is none.

    Raises
    ------
    ValueError
        If ``pattern`` is not a 2D array.
    """
    x = np.asarray(pattern, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"pattern must be 2D (Q_Nx, Q_Ny), got shape {x.shape}")
    x = np.where(np.isfinite(x), x, 0.0)
    level = float(np.median(x))
    if level < MIN_BACKGROUND:
        return None
    dark = ndimage.gaussian_filter(x, 2.0) < DARK_FRACTION * level
    labels, _ = ndimage.label(dark)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel())
    best = None
    for k in edge[edge > 0]:
        if not (MIN_AREA * x.size <= sizes[k] <= MAX_AREA * x.size):
            continue
        region = labels == k
        # the smoothing shrinks the dark core by up to ~3 px: the rim is taken beyond that
        rim = ndimage.binary_dilation(region, iterations=8) & ~ndimage.binary_dilation(region, iterations=5)
        if rim.any() and np.median(x[rim]) >= RIM_FRACTION * level and (best is None or sizes[k] > best[1]):
            best = (region, sizes[k])
    if best is None:
        return None
    # the whole stop: the core grown by the pixels next to it that read below half the median
    return best[0] | (ndimage.binary_dilation(best[0], iterations=4) & (ndimage.gaussian_filter(x, 1.0) < 0.5 * level))


def _block_background(x: np.ndarray, stop: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block centres (K, 2) and the log of each block's 30th-percentile counts (K,), stop blocks left out."""
    h, w = (x.shape[0] // block) * block, (x.shape[1] // block) * block
    tiles = x[:h, :w].reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3)
    level = np.percentile(tiles.reshape(*tiles.shape[:2], -1), 30, axis=-1)
    covered = stop[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    keep = (covered == 0) & (level > 0)
    rows, cols = np.nonzero(keep)
    centres = np.stack([rows, cols], axis=1) * block + (block - 1) / 2
    return centres, np.log(level[keep])


def _radial_fit_quality(centres: np.ndarray, z: np.ndarray, candidates: np.ndarray, bin_px: float) -> np.ndarray:
    """Adjusted R^2 of z explained by a free function of the distance to each candidate (binned)."""
    n = len(z)
    sst = ((z - z.mean()) ** 2).sum()
    r = np.linalg.norm(centres[None] - candidates[:, None], axis=2)
    k = np.round(r / bin_px).astype(int)
    nbin = int(k.max()) + 1
    flat = (k + nbin * np.arange(len(candidates))[:, None]).ravel()
    size = nbin * len(candidates)
    cnt = np.bincount(flat, minlength=size).reshape(len(candidates), nbin)
    s1 = np.bincount(flat, np.broadcast_to(z, k.shape).ravel(), minlength=size).reshape(cnt.shape)
    s2 = np.bincount(flat, np.broadcast_to(z * z, k.shape).ravel(), minlength=size).reshape(cnt.shape)
    ssr = (s2 - np.where(cnt > 0, s1**2 / np.maximum(cnt, 1), 0.0)).sum(axis=1)
    dof = n - (cnt > 0).sum(axis=1)
    return 1.0 - (ssr / np.maximum(dof, 1)) / (sst / max(n - 1, 1) + 1e-30)


def origin_behind_stop(pattern: np.ndarray, stop: np.ndarray, current: tuple[float, float] | None = None,
                       ) -> tuple[np.ndarray, float, float, float]:
    """The origin under a beam stop, from the fall-off of the diffuse background.

    The background (30th percentile of blocks of ~1/32 of the detector, which skips
    Bragg disks smaller than a block and hot pixels) is modelled as a free function of
    the distance to a centre; the centre is searched over the pixels of the stop
    (dilated by 2 blocks; every k-th pixel when there are more than MAX_CANDIDATES),
    and the fit is scored by its adjusted R^2.

    Parameters
    ----------
    pattern : numpy.ndarray
        (Q_Nx, Q_Ny) counts.
    stop : numpy.ndarray
        (Q_Nx, Q_Ny) bool, the stop (see :func:`detect_beam_stop`).
    current : tuple of float, optional
        Another origin estimate (qx0, qy0) to score the same way.

    Returns
    -------
    origin : numpy.ndarray
        (2,) pixels.
    sigma : float
        Its uncertainty, pixels (the block size: the fall-off is sampled per block).
    score : float
        Adjusted R^2 at ``origin`` (1: the background is a function of radius alone).
    score_current : float
        The same at ``current`` (nan when not given).
    """
    x = np.where(np.isfinite(pattern), np.asarray(pattern, dtype=np.float64), 0.0)
    block = max(2, int(round(min(x.shape) / 32)))
    centres, z = _block_background(x, stop, block)
    reach = ndimage.binary_dilation(stop, iterations=2 * block)
    cand = np.argwhere(reach)[:: max(1, int(reach.sum()) // MAX_CANDIDATES)].astype(float)
    if len(z) < 16 or len(cand) == 0:
        return np.full(2, np.nan), float("inf"), float("nan"), float("nan")
    q = _radial_fit_quality(centres, z, cand, block)
    best = int(np.argmax(q))
    score_current = float("nan")
    if current is not None:
        score_current = float(_radial_fit_quality(centres, z, np.asarray(current, float)[None], block)[0])
    return cand[best], float(block), float(q[best]), score_current
