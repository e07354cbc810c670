"""Accuracy metrics: centre errors, ellipse errors, denoising MSE and PSNR."""

from __future__ import annotations

import numpy as np

from ..conventions import angle_difference

__all__ = ["centre_errors", "ellipse_errors", "mse", "psnr"]


def centre_errors(predicted: np.ndarray, truth: np.ndarray, fail_px: float = 1.0) -> dict[str, float]:
    """Summary of the Euclidean origin error.

    Parameters
    ----------
    predicted, truth : numpy.ndarray
        (..., 2) origins (qx0, qy0) in pixels.
    fail_px : float
        Threshold defining a failure, pixels.

    Returns
    -------
    dict
        ``mean``, ``median``, ``p99``, ``rms`` (px) and ``fail`` (fraction > fail_px).
        Non-finite predictions count as failures with infinite error.
    """
    p = np.asarray(predicted, float).reshape(-1, 2)
    t = np.asarray(truth, float).reshape(-1, 2)
    if p.shape != t.shape:
        raise ValueError(f"predicted and truth must have one shape, got {p.shape} and {t.shape}")
    if len(p) == 0:
        raise ValueError("no origins to compare")
    err = np.hypot(p[:, 0] - t[:, 0], p[:, 1] - t[:, 1])
    err[~np.isfinite(err)] = np.inf
    return {
        "mean": float(np.mean(err)),
        "median": float(np.median(err)),
        "p99": float(np.percentile(err, 99)),
        "rms": float(np.sqrt(np.mean(err**2))),
        "fail": float(np.mean(err > fail_px)),
    }


def ellipse_errors(ratio: float, theta: float, true_ratio: float, true_theta: float) -> dict[str, float]:
    """Errors of an ellipse estimate.

    Parameters
    ----------
    ratio, theta : float
        Estimated a/b and angle (radians).
    true_ratio, true_theta : float
        True a/b and angle (radians).

    Returns
    -------
    dict
        ``d_ratio`` = |a/b - true| and ``d_theta_deg`` = |theta - true| mod pi in
        degrees (NaN when the true ellipse is round, where theta is undefined).
    """
    d_theta = float(np.degrees(angle_difference(theta, true_theta)))
    if abs(true_ratio - 1) < 1e-9:
        d_theta = float("nan")
    return {"d_ratio": float(abs(ratio - true_ratio)), "d_theta_deg": d_theta}


def mse(estimate: np.ndarray, clean: np.ndarray) -> float:
    """Mean squared error against the clean expected counts."""
    e = np.asarray(estimate, float)
    c = np.asarray(clean, float)
    if e.shape != c.shape:
        raise ValueError(f"shapes differ: {e.shape} vs {c.shape}")
    return float(np.mean((e - c) ** 2))


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the clean data's maximum."""
    m = mse(estimate, clean)
    peak = float(np.max(clean))
    if m == 0:
        return float("inf")
    return float(10 * np.log10(peak**2 / m))
