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
    line_jitter: float = 0.0,
    flyback: float = 0.0,
    ripple: float = 0.0,
) -> np.ndarray:
    """Descan origin map: a smooth plane + curvature, random jitter, and optionally the
    rough parts of a real scan (scan-line offsets, flyback, mains ripple).

    The scan is raster order: rows of R_Ny positions (the fast axis), one after another.

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
    line_jitter : float
        Standard deviation of an offset shared by every position of a scan row (line
        sync, drift between lines), pixels per axis.
    flyback : float
        Lag of the first position of every row, along a random direction, decaying
        as exp(-column / 1.5) (the scan coils settling after the flyback), pixels.
    ripple : float
        Amplitude of a sinusoidal oscillation in acquisition time (mains pickup),
        along a random direction, with a period of 3-20 positions, pixels.

    Returns
    -------
    numpy.ndarray
        (R_Nx, R_Ny, 2) origin (qx0, qy0) in pixels.
    """
    if len(scan_shape) != 2 or min(scan_shape) < 1:
        raise ValueError(f"scan_shape must be two sizes >= 1, got {scan_shape}")
    if min(amplitude, curvature, jitter, centre_offset, line_jitter, flyback, ripple) < 0:
        raise ValueError("amplitude, curvature, jitter, centre_offset, line_jitter, flyback and ripple must be >= 0")
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
    # the rough parts draw from the generator only when asked for, so that smooth scans
    # stay those of earlier versions
    if line_jitter > 0:
        origin += rng.normal(0, line_jitter, (nrx, 1, 2))
    if flyback > 0:
        origin += flyback * np.exp(-np.arange(nry) / 1.5)[None, :, None] * _direction(rng)
    if ripple > 0:
        time = np.arange(nrx * nry).reshape(nrx, nry)
        wave = np.sin(2 * np.pi * time / rng.uniform(3, 20) + rng.uniform(0, 2 * np.pi))
        origin += ripple * wave[..., None] * _direction(rng)
    return origin


def _direction(rng: np.random.Generator) -> np.ndarray:
    """A random unit vector (qx, qy)."""
    angle = rng.uniform(0, 2 * np.pi)
    return np.array([np.cos(angle), np.sin(angle)])
