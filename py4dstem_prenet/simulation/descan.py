"""Descan: the drift of the diffraction-pattern origin with the probe position."""

from __future__ import annotations

import numpy as np

__all__ = ["descan_origin"]


def descan_origin(
    rng: np.random.Generator,
    scan_shape: tuple[int, int],
    detector_shape: tuple[int, int],
    amplitude: float = 3.0,
    curvature: float = 0.5,
    jitter: float = 0.05,
    centre_offset: float = 0.1,
) -> np.ndarray:
    """Smooth descan origin map (plane + curvature) plus random jitter.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    scan_shape : tuple of int
        (R_Nx, R_Ny) probe positions.
    detector_shape : tuple of int
        (Q_Nx, Q_Ny) detector pixels.
    amplitude : float
        Peak-to-peak drift of the plane term across the scan along each of qx and
        qy, pixels.
    curvature : float
        Peak deviation of the quadratic term, pixels.
    jitter : float
        Standard deviation of independent per-position jitter, pixels.
    centre_offset : float
        The mean origin is the detector centre plus a uniform offset of up to this
        fraction of the detector size.

    Returns
    -------
    numpy.ndarray
        (R_Nx, R_Ny, 2) origin (qx0, qy0) in pixels.
    """
    if len(scan_shape) != 2 or min(scan_shape) < 1:
        raise ValueError(f"scan_shape must be two sizes >= 1, got {scan_shape}")
    if min(amplitude, curvature, jitter, centre_offset) < 0:
        raise ValueError("amplitude, curvature, jitter and centre_offset must be >= 0")
    nrx, nry = scan_shape
    u = np.linspace(-0.5, 0.5, nrx)[:, None] * np.ones((1, nry))
    v = np.linspace(-0.5, 0.5, nry)[None, :] * np.ones((nrx, 1))
    centre = (np.asarray(detector_shape, float) - 1) / 2
    centre += rng.uniform(-centre_offset, centre_offset, 2) * np.asarray(detector_shape)
    origin = np.empty((nrx, nry, 2))
    for i in range(2):
        direction = rng.normal(size=2)
        direction /= np.abs(direction).sum()  # peak-to-peak of the plane = amplitude
        plane = amplitude * (direction[0] * u + direction[1] * v)
        quad = rng.normal(size=3)
        quad /= np.abs(quad).sum()
        curv = 4 * curvature * (quad[0] * u**2 + quad[1] * v**2 + quad[2] * u * v)
        origin[..., i] = centre[i] + plane + curv + rng.normal(0, jitter, (nrx, nry))
    return origin
