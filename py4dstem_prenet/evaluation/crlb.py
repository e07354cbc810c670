"""Cramer-Rao lower bound of the origin (a translation) under Poisson noise.

For recorded counts ``y = gain * Poisson(lam) + N(0, read_noise^2) + background``
with expected electrons ``lam(c)`` depending on the origin ``c``, the Fisher
information is

    I_ij = sum_p gain^2 d_i lam_p d_j lam_p / (gain^2 lam_p + read_noise^2),

and any unbiased estimator of ``c`` has covariance >= I^-1.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["fisher_information", "translation_crlb"]


def fisher_information(
    expected: Callable[[np.ndarray], np.ndarray],
    origin: tuple[float, float],
    gain: float = 1.0,
    read_noise: float = 0.0,
    delta: float = 1e-3,
    floor: float = 1e-3,
) -> np.ndarray:
    """Fisher information matrix of the origin, by central differences.

    Parameters
    ----------
    expected : callable
        ``expected(origin) -> (Q_Nx, Q_Ny)`` expected electrons per pixel.
    origin : tuple of float
        (qx0, qy0) at which to evaluate, pixels.
    gain : float
        Counts per electron.
    read_noise : float
        Read noise, counts.
    delta : float
        Finite-difference step, pixels.
    floor : float
        Variance floor, as a fraction of the mean expected electrons per pixel, that
        keeps pixels at the toe of a disk edge from carrying infinite information.

    Returns
    -------
    numpy.ndarray
        (2, 2) Fisher information, 1/pixel^2.
    """
    origin = np.asarray(origin, float)
    if origin.shape != (2,) or not np.all(np.isfinite(origin)):
        raise ValueError(f"origin must be two finite numbers, got {origin}")
    if not (gain > 0) or read_noise < 0 or not (delta > 0):
        raise ValueError("gain and delta must be > 0 and read_noise >= 0")
    lam = np.asarray(expected(origin), float)
    if lam.ndim != 2 or np.any(lam < 0) or not np.all(np.isfinite(lam)):
        raise ValueError("expected(origin) must return a finite, non-negative 2D array")
    grads = []
    for i in range(2):
        step = np.zeros(2)
        step[i] = delta
        grads.append((np.asarray(expected(origin + step), float) - np.asarray(expected(origin - step), float)) / (2 * delta))
    var = gain**2 * np.maximum(lam, floor * max(lam.mean(), 1e-12)) + read_noise**2
    info = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            info[i, j] = np.sum(gain**2 * grads[i] * grads[j] / var)
    return info


def translation_crlb(
    expected: Callable[[np.ndarray], np.ndarray],
    origin: tuple[float, float],
    gain: float = 1.0,
    read_noise: float = 0.0,
) -> np.ndarray:
    """Lower bound on the standard deviation of (qx0, qy0), pixels.

    Parameters
    ----------
    expected, origin, gain, read_noise
        See :func:`fisher_information`.

    Returns
    -------
    numpy.ndarray
        (2,) bound on the standard deviation along qx and qy, pixels; ``inf`` where
        the pattern carries no information (e.g. a blank pattern).

    Examples
    --------
    A Gaussian spot of width sigma holding N electrons: std >= sigma / sqrt(N).

    >>> yy, xx = np.meshgrid(np.arange(64.), np.arange(64.))
    >>> spot = lambda c: 1e4 * np.exp(-((xx - c[0])**2 + (yy - c[1])**2) / 18) / (18 * np.pi)
    >>> np.round(translation_crlb(spot, (31.7, 32.2)), 3)
    array([0.03, 0.03])
    """
    info = fisher_information(expected, origin, gain, read_noise)
    if not np.all(np.isfinite(info)) or np.linalg.det(info) <= 1e-300:
        return np.full(2, np.inf)
    return np.sqrt(np.diag(np.linalg.inv(info)))
