"""Detector model: dose, shot noise, gain, read noise, defects, saturation, beam stop.

Units: the *expected counts* of a pattern are ``gain * electrons + background``;
the clean target of denoising is that expectation (without defects); the recorded
pattern adds Poisson shot noise on the electrons, Gaussian read noise, hot and
dead pixels and saturation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Detector", "beam_stop_mask", "scale_to_dose"]


@dataclass(frozen=True)
class Detector:
    """Parameters of a pixelated detector.

    Attributes
    ----------
    gain : float
        Counts per electron (> 0).
    read_noise : float
        Standard deviation of Gaussian read noise, counts.
    background : float
        Constant dark offset, counts per pixel.
    hot_fraction : float
        Fraction of pixels stuck at a high value.
    hot_level : float
        Hot-pixel value as a multiple of the brightest expected pixel.
    dead_fraction : float
        Fraction of pixels reading 0.
    saturation : float or None
        Maximum recordable value, counts; None for no saturation.
    """

    gain: float = 1.0
    read_noise: float = 0.0
    background: float = 0.0
    hot_fraction: float = 0.0
    hot_level: float = 5.0
    dead_fraction: float = 0.0
    saturation: float | None = None

    def __post_init__(self) -> None:
        if not (self.gain > 0 and np.isfinite(self.gain)):
            raise ValueError(f"gain must be finite and > 0, got {self.gain}")
        for name in ("read_noise", "background", "hot_level"):
            v = getattr(self, name)
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        for name in ("hot_fraction", "dead_fraction"):
            v = getattr(self, name)
            if not (0 <= v < 0.5):
                raise ValueError(f"{name} must be in [0, 0.5), got {v}")
        if self.saturation is not None and not (self.saturation > 0):
            raise ValueError(f"saturation must be > 0 or None, got {self.saturation}")

    def defect_masks(self, rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Draw fixed hot and dead pixel masks for a detector of ``shape``."""
        u = rng.random(shape)
        hot = u < self.hot_fraction
        dead = (u >= self.hot_fraction) & (u < self.hot_fraction + self.dead_fraction)
        return hot, dead

    def expected_counts(self, electrons: np.ndarray) -> np.ndarray:
        """Clean expected counts for expected electrons per pixel."""
        return self.gain * electrons + self.background

    def record(
        self,
        electrons: np.ndarray,
        rng: np.random.Generator,
        hot: np.ndarray | None = None,
        dead: np.ndarray | None = None,
    ) -> np.ndarray:
        """Record one or more patterns.

        Parameters
        ----------
        electrons : numpy.ndarray
            Expected electrons per pixel, shape (..., Q_Nx, Q_Ny), >= 0.
        rng : numpy.random.Generator
            Random source.
        hot, dead : numpy.ndarray, optional
            Boolean (Q_Nx, Q_Ny) defect masks (see :meth:`defect_masks`).

        Returns
        -------
        numpy.ndarray
            Recorded counts, float32, same shape as ``electrons``.
        """
        electrons = np.asarray(electrons)
        if np.any(~np.isfinite(electrons)) or np.any(electrons < 0):
            raise ValueError("expected electrons must be finite and >= 0")
        out = self.gain * rng.poisson(electrons).astype(np.float64) + self.background
        if self.read_noise > 0:
            out += rng.normal(0.0, self.read_noise, out.shape)
        if hot is not None and hot.any():
            peak = self.gain * electrons.max(axis=(-2, -1), keepdims=True) + self.background
            out = np.where(hot, self.hot_level * peak, out)
        if dead is not None and dead.any():
            out = np.where(dead, 0.0, out)
        if self.saturation is not None:
            out = np.minimum(out, self.saturation)
        return out.astype(np.float32)


def scale_to_dose(pattern: np.ndarray, dose: float) -> np.ndarray:
    """Scale a clean pattern so that it holds ``dose`` expected electrons in total.

    Parameters
    ----------
    pattern : numpy.ndarray
        Non-negative clean pattern(s), shape (..., Q_Nx, Q_Ny).
    dose : float
        Electrons per pattern (> 0).
    """
    if not (dose > 0 and np.isfinite(dose)):
        raise ValueError(f"dose must be finite and > 0 electrons per pattern, got {dose}")
    total = pattern.sum(axis=(-2, -1), keepdims=True)
    if np.any(total <= 0):
        raise ValueError("pattern has no intensity to scale")
    return pattern * (dose / total)


def beam_stop_mask(
    shape: tuple[int, int],
    tip: tuple[float, float],
    tip_radius: float,
    direction: float,
    width: float,
) -> np.ndarray:
    """Transmission (0 or 1) of a rod-shaped beam stop with a round tip.

    Parameters
    ----------
    shape : tuple of int
        Detector shape.
    tip : tuple of float
        Centre of the round tip (qx, qy), pixels.
    tip_radius : float
        Radius of the tip, pixels.
    direction : float
        Direction from the tip towards the detector edge along which the rod runs,
        radians from the qx axis.
    width : float
        Rod width, pixels.

    Returns
    -------
    numpy.ndarray
        float64 (Q_Nx, Q_Ny), 0 where the beam stop blocks the beam, 1 elsewhere.
    """
    if tip_radius <= 0 or width <= 0:
        raise ValueError("tip_radius and width must be > 0")
    x = np.arange(shape[0])[:, None] - tip[0]
    y = np.arange(shape[1])[None, :] - tip[1]
    u = np.array([np.cos(direction), np.sin(direction)])
    along = x * u[0] + y * u[1]
    across = np.abs(-x * u[1] + y * u[0])
    blocked = (np.hypot(x, y) <= tip_radius) | ((along >= 0) & (across <= width / 2))
    return (~blocked).astype(float)
