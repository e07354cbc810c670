"""Origin and elliptical distortion of ring patterns, fitted with a free radial profile.

Amorphous films and polycrystals diffract into rings; the projector's elliptical
distortion stretches them all alike. In the ideal frame the pattern depends on the
radius only, so the recorded pattern is

    I(p) = P(rho(p)),   rho(p) = |D^-1 (p - c)|,

with ``D`` the distortion of :func:`~py4dstem_prenet.conventions.distortion_matrix`
written in the wrap-free pair (e1, e2) (``D = I + ((a/b - 1) I + [[e1, e2], [e2, -e1]]) / 2``),
``c`` the origin and ``P`` an unknown profile. :func:`fit_rings` fits ``c`` and (e1, e2)
by weighted least squares with ``P`` a piecewise-linear function of rho (knots every
PROFILE_STEP_PX), which is solved exactly for every geometry (variable projection):
every ring, the bright-field disk edge and the diffuse background all carry the
fit, at every angle, with no radius, band or ring model to choose. py4DSTEM's
``fit_ellipse_amorphous_ring`` is least squares of the same kind, with the centre and
ellipse free, but its profile is one ring of a fixed shape between radii the user sets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.linalg import solveh_banded

__all__ = ["RingFit", "fit_rings", "ring_distortion"]

#: Knot spacing of the radial profile, pixels of the ideal frame: finer than any ring
#: edge the detector resolves.
PROFILE_STEP_PX = 0.5

#: Residuals beyond this many standard deviations are weighed down (Huber): hot
#: pixels, an unmasked beam-stop rod, Bragg spots on a ring.
HUBER = 3.0

#: Finite-difference steps of the Jacobian: origin (px) and (e1, e2). Secants over a
#: tenth of a pixel average over the profile's knots.
_STEPS = np.array([0.1, 0.1, 1e-3, 1e-3])

#: Multiples of the Gauss-Newton step tried along its direction. The step is short
#: when the residual is dominated by speckle (a single amorphous pattern took 20
#: plain steps to move half-way); the best of these is taken (the shorter ones guard
#: against overshooting far from the optimum).
_LINE_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: The noise model (speckle share, Huber's weights) is re-estimated in the first this
#: many steps, then kept: re-estimated at every step, the weights of a polycrystal's
#: spotty rings made the origin alternate by +-0.02 px (10 standard errors).
_REWEIGHTED = 6

#: Convergence: the last step moved every parameter by less than this fraction of its
#: standard error plus _TOLERANCE_FLOOR (the re-estimated weights keep the steps from
#: going to zero: about 1e-4 px on a 1024 px pattern binned 4 x 4).
_TOLERANCE = 0.1
_TOLERANCE_FLOOR = np.array([1e-3, 1e-3, 1e-5, 1e-5])


class RingFit(NamedTuple):
    """Result of :func:`fit_rings`.

    Attributes
    ----------
    origin : numpy.ndarray
        (2,) fitted origin (qx0, qy0), pixels of the input image.
    e12 : numpy.ndarray
        (2,) fitted (e1, e2) = (a/b - 1)(cos 2 theta, sin 2 theta) (see
        :mod:`~py4dstem_prenet.conventions`).
    covariance : numpy.ndarray
        (4, 4) covariance of (qx0, qy0, e1, e2) from the fit's curvature, the pixels
        taken as independent and the model as exact: a lower bound. Speckle correlated
        over several pixels of one pattern, and whatever the model leaves out, make the
        errors larger (the aligned means of 12 x 12 amorphous dev scans at 1e4 counts:
        a/b errors of about 0.001 for a standard error of 0.0002-0.0003).
    speckle : float
        Fitted speckle variance as a fraction of the squared profile (0: counting
        noise only; 1: fully developed speckle).
    contrast : float
        How far the profile stands out of the noise: the drop of the weighted sum of
        squared residuals from a flat profile to the fitted one, per knot that holds
        pixels (about 1 for noise alone, which the free profile follows knot by knot).
    converged : bool
        Whether the last step moved every parameter by less than a tenth of its
        standard error (plus 1e-3 px, 1e-5 in e), within the iterations.
    """

    origin: np.ndarray
    e12: np.ndarray
    covariance: np.ndarray
    speckle: float
    contrast: float
    converged: bool


def ring_distortion(e12: np.ndarray) -> np.ndarray:
    """The distortion matrix D of a wrap-free pair (e1, e2).

    Parameters
    ----------
    e12 : array_like
        (2,) (e1, e2).

    Returns
    -------
    numpy.ndarray
        (2, 2) ``I + ((a/b - 1) I + [[e1, e2], [e2, -e1]]) / 2``, equal to
        :func:`~py4dstem_prenet.conventions.distortion_matrix` of the same ellipse.
    """
    e1, e2 = (float(v) for v in e12)
    return np.eye(2) + 0.5 * (np.hypot(e1, e2) * np.eye(2) + np.array([[e1, e2], [e2, -e1]]))


def _rho(points: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Ideal-frame radius (px) of ``points`` (M, 2) for (qx0, qy0, e1, e2) ``params``."""
    q = (points - params[:2]) @ np.linalg.inv(ring_distortion(params[2:])).T
    return np.hypot(q[:, 0], q[:, 1])


def _knot_index(rho: np.ndarray, knots: int) -> np.ndarray:
    """Index of the profile knot at or below each radius ``rho`` (px), the last interval's for radii beyond."""
    return np.minimum(np.floor(rho / PROFILE_STEP_PX).astype(int), knots - 2)


def _profile_model(rho: np.ndarray, values: np.ndarray, weights: np.ndarray, knots: int) -> np.ndarray:
    """The weighted least-squares piecewise-linear profile P(rho), evaluated at every pixel."""
    i0 = _knot_index(rho, knots)
    f = rho / PROFILE_STEP_PX - i0
    diag = np.bincount(i0, weights * (1 - f) ** 2, knots) + np.bincount(i0 + 1, weights * f**2, knots)
    banded = np.zeros((2, knots))
    banded[0, 1:] = np.bincount(i0, weights * f * (1 - f), knots)[:-1]
    banded[1] = diag + 1e-9 * diag.max() + 1e-300  # knots no pixel reaches stay defined
    rhs = np.bincount(i0, weights * (1 - f) * values, knots) + np.bincount(i0 + 1, weights * f * values, knots)
    p = solveh_banded(banded, rhs)
    return p[i0] * (1 - f) + p[i0 + 1] * f


def fit_rings(image: np.ndarray, valid: np.ndarray | None = None, origin0: tuple[float, float] | None = None,
              e12_0: tuple[float, float] = (0.0, 0.0), iterations: int = 30) -> RingFit:
    """Fit the origin and the elliptical distortion of a ring pattern.

    Weighted least squares of ``I(p) = P(rho(p))`` (see the module docstring) over
    the valid pixels, Gauss-Newton on (qx0, qy0, e1, e2) with the profile solved
    exactly at every step, a line search along each step, and weights 1 / (P + s P^2)
    (counting noise plus multiplicative speckle, its share ``s`` re-estimated from the
    residuals at every step) with Huber's down-weighting of outliers.

    Parameters
    ----------
    image : numpy.ndarray
        (Q_Nx, Q_Ny) non-negative pattern, counts (or any units: only the noise
        model's split between counting noise and speckle depends on them).
    valid : numpy.ndarray, optional
        (Q_Nx, Q_Ny) bool, False on pixels to leave out (a beam stop, dead pixels).
    origin0 : tuple of float, optional
        Starting origin (qx0, qy0), pixels, within a few pixels of the rings'
        centre; the detector centre when None.
    e12_0 : tuple of float
        Starting (e1, e2).
    iterations : int
        Most Gauss-Newton steps.

    Returns
    -------
    RingFit

    Raises
    ------
    ValueError
        If the image is not a finite, non-negative 2D array, ``valid`` does not match
        it or leaves fewer than 64 pixels, or a start is not finite.

    Examples
    --------
    >>> qx, qy = np.meshgrid(np.arange(96.), np.arange(96.), indexing="ij")
    >>> d = np.linalg.solve(ring_distortion([0.02, 0.0]), np.stack([qx - 47.3, qy - 48.6]).reshape(2, -1))
    >>> ring = 100 * np.exp(-0.5 * ((np.hypot(*d) - 30) / 3) ** 2).reshape(96, 96)
    >>> fit = fit_rings(ring, origin0=(48, 48))
    >>> np.round(fit.origin, 3), np.round(fit.e12, 4)
    (array([47.3, 48.6]), array([0.02, 0.  ]))
    """
    image = np.asarray(image)
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"image must be a 2D numeric array, got shape {image.shape} and dtype {image.dtype}")
    img = image.astype(np.float64)
    if not np.all(np.isfinite(img)) or np.any(img < 0):
        raise ValueError("image must be finite and non-negative")
    h, w = img.shape
    use = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    if use.shape != (h, w):
        raise ValueError(f"valid must have the image's shape {(h, w)}, got {use.shape}")
    if use.sum() < 64:
        raise ValueError("valid leaves fewer than 64 pixels to fit")
    start = np.array([(h - 1) / 2, (w - 1) / 2] if origin0 is None else origin0, float)
    e_start = np.asarray(e12_0, float)
    if start.shape != (2,) or e_start.shape != (2,) or not np.all(np.isfinite(np.r_[start, e_start])):
        raise ValueError(f"origin0 and e12_0 must be two finite numbers each, got {origin0} and {e12_0}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")

    rows, cols = np.nonzero(use)
    points = np.stack([rows, cols], axis=1).astype(np.float64)
    values = img[rows, cols]
    knots = int(np.hypot(h, w) * 1.5 / PROFILE_STEP_PX) + 3
    params = np.r_[start, e_start]
    weights = np.ones(len(values))
    speckle, converged, covariance = 0.0, False, np.full((4, 4), np.nan)
    for it in range(int(iterations)):
        rho = _rho(points, params)
        if it < _REWEIGHTED:
            model = _profile_model(rho, values, weights, knots)
            floor = 1e-3 * max(float(model.mean()), 1e-300)
            poisson = np.maximum(model, floor)
            resid = values - model
            # the speckle share from residuals clipped at HUBER standard deviations of the last
            # noise model, so that hot pixels or an unmasked stop do not read as speckle
            clipped = np.minimum(resid**2, HUBER**2 * (poisson + speckle * model**2))
            speckle = max(0.0, float(np.sum(clipped - poisson) / max(np.sum(model**2), 1e-300)))
            var = poisson + speckle * model**2
            z = np.abs(resid) / np.sqrt(var)
            weights = np.minimum(1.0, HUBER / np.maximum(z, 1e-12)) / var
        model = _profile_model(rho, values, weights, knots)
        resid = values - model
        jac = np.empty((len(values), 4))
        for j, step in enumerate(_STEPS):
            dp = np.zeros(4)
            dp[j] = step
            jac[:, j] = -(_profile_model(_rho(points, params + dp), values, weights, knots)
                          - _profile_model(_rho(points, params - dp), values, weights, knots)) / (2 * step)
        curvature = jac.T @ (jac * weights[:, None])
        try:
            delta = -np.linalg.solve(curvature, jac.T @ (weights * resid))
        except np.linalg.LinAlgError:  # no profile slope: nothing to fit
            break
        costs = [np.sum(weights * (values - _profile_model(_rho(points, params + a * delta), values, weights,
                                                           knots)) ** 2) for a in _LINE_STEPS]
        delta = _LINE_STEPS[int(np.argmin(costs))] * delta
        params = params + delta
        covariance = np.linalg.inv(curvature)
        if np.all(np.abs(delta) <= _TOLERANCE * np.sqrt(np.abs(np.diag(covariance))) + _TOLERANCE_FLOOR):
            converged = True
            break
    rho = _rho(points, params)
    model = _profile_model(rho, values, weights, knots)
    flat = np.sum(weights * values) / np.sum(weights)
    used = len(np.unique(_knot_index(rho, knots)))
    contrast = float((np.sum(weights * (values - flat) ** 2) - np.sum(weights * (values - model) ** 2)) / (used + 1))
    return RingFit(params[:2].copy(), params[2:].copy(), covariance, speckle, contrast, converged)
