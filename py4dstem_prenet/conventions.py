"""Geometric conventions shared by the simulator, the models and the py4DSTEM adapter.

All coordinates follow py4DSTEM: ``qx`` is the row axis (axis -2 of a pattern),
``qy`` the column axis, pixel centres sit at integer coordinates.

Elliptical distortion
---------------------
The projector optics map an ideal (undistorted) diffraction-plane offset ``q``
(pixels, relative to the origin) onto the detector as ``p = origin + D q`` with

    D = I + (a/b - 1) u u^T,   u = (cos theta, sin theta) in (row, col),

i.e. a stretch by ``a/b`` along ``u``.  py4DSTEM's ``calibration.set_ellipse((a, b,
theta))`` undoes exactly this distortion when given ``(a/b, 1, theta)`` (an ellipse
(a, b) is mapped onto a circle of radius b).  ``theta`` is defined modulo pi.

The wrap-free regression target used by the ellipse calibrator is

    e1 = (a/b - 1) cos 2 theta,  e2 = (a/b - 1) sin 2 theta.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "distortion_matrix",
    "ellipse_to_e12",
    "e12_to_ellipse",
    "angle_difference",
]


def _check_ratio(ratio: float | np.ndarray) -> np.ndarray:
    ratio = np.asarray(ratio, dtype=float)
    if not np.all(np.isfinite(ratio)) or np.any(ratio <= 0):
        raise ValueError(f"ellipse axis ratio a/b must be finite and > 0, got {ratio}")
    return ratio


def distortion_matrix(ratio: float, theta: float) -> np.ndarray:
    """Return the 2x2 distortion matrix ``D = I + (a/b - 1) u u^T``.

    Parameters
    ----------
    ratio : float
        Axis ratio a/b (dimensionless, > 0). 1 means no distortion.
    theta : float
        Direction of the stretched semi-axis, radians from the qx (row) axis
        towards the qy (column) axis.

    Returns
    -------
    numpy.ndarray
        Shape (2, 2), acting on (qx, qy) column vectors in pixels.

    Examples
    --------
    >>> distortion_matrix(1.1, 0.0)
    array([[1.1, 0. ],
           [0. , 1. ]])
    """
    ratio = float(_check_ratio(ratio))
    if not np.isfinite(theta):
        raise ValueError(f"theta must be finite, got {theta}")
    u = np.array([np.cos(theta), np.sin(theta)])
    return np.eye(2) + (ratio - 1.0) * np.outer(u, u)


def ellipse_to_e12(ratio: np.ndarray | float, theta: np.ndarray | float) -> np.ndarray:
    """Convert (a/b, theta) to the wrap-free pair (e1, e2).

    Parameters
    ----------
    ratio : array_like
        Axis ratio a/b (> 0).
    theta : array_like
        Angle of the a semi-axis in radians (mod pi).

    Returns
    -------
    numpy.ndarray
        Array of shape ``broadcast(ratio, theta).shape + (2,)`` holding (e1, e2).
    """
    ratio = _check_ratio(ratio)
    theta = np.asarray(theta, dtype=float)
    m = ratio - 1.0
    return np.stack([m * np.cos(2 * theta), m * np.sin(2 * theta)], axis=-1)


def e12_to_ellipse(e12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert :func:`ellipse_to_e12`.

    Parameters
    ----------
    e12 : array_like
        Shape (..., 2).

    Returns
    -------
    ratio, theta : numpy.ndarray
        a/b >= 1 and theta in [0, pi). A ratio below 1 cannot be represented:
        (a/b, theta) and (b/a, theta + pi/2) are the same ellipse up to scale, and
        the pair with a/b >= 1 is returned.
    """
    e12 = np.asarray(e12, dtype=float)
    if e12.shape[-1:] != (2,):
        raise ValueError(f"e12 must have a last axis of length 2, got shape {e12.shape}")
    ratio = 1.0 + np.hypot(e12[..., 0], e12[..., 1])
    theta = np.mod(0.5 * np.arctan2(e12[..., 1], e12[..., 0]), np.pi)
    return ratio, theta


def angle_difference(theta1: np.ndarray | float, theta2: np.ndarray | float) -> np.ndarray:
    """Absolute difference of two ellipse angles modulo pi, in [0, pi/2] radians."""
    d = np.mod(np.asarray(theta1, float) - np.asarray(theta2, float), np.pi)
    return np.minimum(d, np.pi - d)
