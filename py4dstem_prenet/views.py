"""Tensor views of diffraction patterns fed to the networks (shared by training and inference).

- :func:`normalise`: log-compression by the pattern's mean count (dose- and gain-free).
- :func:`full_view`: the whole detector resized to a square grid (centre network).
- :func:`polar_view`: radius x angle around the origin.
- :func:`ellipse_view`: the polar view with its angular residual and the radial
  derivative of its angular mean (ellipse network).

Coordinates: qx = rows (axis -2), pixel centres at integers, as in py4DSTEM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["normalise", "full_view", "polar_view", "ellipse_view", "detector_to_view", "view_to_detector", "polar_rmax",
           "VIEW_SIZE", "ELLIPSE_CHANNELS"]

#: Side of the square views, pixels.
VIEW_SIZE = 64
#: Channels of :func:`ellipse_view`.
ELLIPSE_CHANNELS = 3


def normalise(x: torch.Tensor) -> torch.Tensor:
    """``log1p(x / mean(x))`` per pattern; x is (N, 1, H, W), clamped at 0 first."""
    x = x.clamp_min(0)
    s = x.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return torch.log1p(x / s)


def full_view(x: torch.Tensor, size: int = VIEW_SIZE) -> torch.Tensor:
    """Resize whole patterns (N, 1, H, W) to (N, 1, size, size), area-averaged, normalised.

    A detector pixel (qx, qy) maps to view coordinates
    ``((qx + 0.5) * size / H - 0.5, (qy + 0.5) * size / W - 0.5)``.
    """
    v = F.interpolate(x.clamp_min(0), size=(size, size), mode="area")
    return normalise(v)


def detector_to_view(origin: torch.Tensor, shape: tuple[int, int], size: int = VIEW_SIZE) -> torch.Tensor:
    """Detector pixels (qx, qy) -> :func:`full_view` pixels."""
    scale = torch.tensor([size / shape[0], size / shape[1]], dtype=origin.dtype)
    return (origin + 0.5) * scale - 0.5


def view_to_detector(v: torch.Tensor, shape: tuple[int, int], size: int = VIEW_SIZE) -> torch.Tensor:
    """Inverse of :func:`detector_to_view`."""
    scale = torch.tensor([size / shape[0], size / shape[1]], dtype=v.dtype)
    return (v + 0.5) / scale - 0.5


def polar_rmax(shape: tuple[int, int]) -> float:
    """Largest radius of the ellipse network's polar view for a detector ``shape``, pixels."""
    return 0.5 * float(min(shape))


def polar_view(x: torch.Tensor, origin: torch.Tensor, r_max: float, n_r: int = VIEW_SIZE,
               n_phi: int = VIEW_SIZE) -> torch.Tensor:
    """Polar resampling around each origin: rows are radii 0..r_max, columns angles 0..pi.

    Angles cover half a turn (an ellipse is symmetric under inversion) and each
    column averages the ray at phi and at phi + pi. An elliptical distortion shows
    up as a cos 2(phi - theta) ripple of every edge's radius.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns.
    origin : torch.Tensor
        (N, 2) origins (qx0, qy0), pixels.
    r_max : float
        Largest radius, pixels.
    n_r, n_phi : int
        Output size.

    Returns
    -------
    torch.Tensor
        (N, 1, n_r, n_phi) normalised view.
    """
    n, _, h, w = x.shape
    r = torch.linspace(0, r_max, n_r, dtype=x.dtype, device=x.device)
    phi = torch.arange(n_phi, dtype=x.dtype, device=x.device) * (torch.pi / n_phi)
    views = []
    for sign in (1.0, -1.0):
        gx = origin[:, 0, None, None] + sign * r[None, :, None] * torch.cos(phi)[None, None, :]
        gy = origin[:, 1, None, None] + sign * r[None, :, None] * torch.sin(phi)[None, None, :]
        grid = torch.stack([2 * gy / max(w - 1, 1) - 1, 2 * gx / max(h - 1, 1) - 1], dim=-1)
        views.append(F.grid_sample(x.clamp_min(0), grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    return normalise(0.5 * (views[0] + views[1]))


def ellipse_view(x: torch.Tensor, origin: torch.Tensor, r_max: float, size: int = VIEW_SIZE) -> torch.Tensor:
    """Three-channel polar view of the ellipse network.

    An elliptical distortion stretches the radius of every isotropic feature by
    ``1 + delta(phi)``, delta proportional to cos 2(phi - theta) (see
    :func:`~py4dstem_prenet.refine.refine_ellipse`); to first order the intensity
    changes by ``-delta(phi) * r * dI/dr`` of its angular mean. The channels are:

    0. :func:`polar_view` (radius x angle, normalised);
    1. the angular residual: the square root of the intensity minus its mean over
       angle at each radius (where the stretch shows, next to anisotropic content
       such as Bragg disks);
    2. ``r * d/dr`` of that angular mean divided by 8, repeated over angle (the
       profile the residual is proportional to under a stretch: residual = -8 delta
       times this channel).

    Channels 1 and 2 share one scale, the RMS of the residual, so that their ratio,
    which measures the stretch, survives.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns (counts; clamped at 0).
    origin : torch.Tensor
        (N, 2) origins (qx0, qy0), pixels.
    r_max : float
        Largest radius, pixels (:func:`polar_rmax`).
    size : int
        Radial and angular samples.

    Returns
    -------
    torch.Tensor
        (N, ELLIPSE_CHANNELS, size, size).
    """
    p = polar_view(x, origin, r_max, size, size)
    root = torch.sqrt(torch.expm1(p))  # sqrt of the intensity relative to the view's mean
    mean = root.mean(dim=3, keepdim=True)
    residual = root - mean
    r = torch.linspace(0, r_max, size, dtype=x.dtype, device=x.device)[None, None, :, None]
    slope = torch.gradient(mean, dim=2)[0] * (size - 1) / r_max * r / 8
    scale = residual.pow(2).mean(dim=(2, 3), keepdim=True).sqrt() + 1e-3
    return torch.cat([p, residual / scale, (slope / scale).expand_as(residual)], dim=1)
