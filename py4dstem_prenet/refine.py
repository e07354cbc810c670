"""Physics refinement of the origin after the network: Friedel symmetry of disk edges.

Every disk edge (the bright-field disk, Bragg disks, and ring edges) is the image of
the circular condenser aperture, and the elliptical distortion is centrosymmetric,
so the *edge map* of a pattern is symmetric under inversion through the origin even
where the intensities inside the disks are not (thick, dynamical crystals).  The
self-convolution of the edge map peaks at twice the origin; the search is restricted
to a small window around the network's estimate, which removes the wrong-peak
failures of an unrestricted Friedel search.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["edge_map", "refine_origin"]


def _gauss_kernel(sigma: float, dtype, device) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def edge_map(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gradient magnitude of Gaussian-smoothed patterns (N, 1, H, W), ``sqrt``-compressed.

    The square root (Anscombe-like) of the non-negative counts keeps bright Bragg
    disks from dominating the weaker bright-field edge.
    """
    k = _gauss_kernel(sigma, x.dtype, x.device)
    r = (len(k) - 1) // 2
    z = torch.sqrt(x.clamp_min(0))
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    z = F.conv2d(F.pad(z, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    gx = z[..., 2:, 1:-1] - z[..., :-2, 1:-1]
    gy = z[..., 1:-1, 2:] - z[..., 1:-1, :-2]
    g = torch.sqrt(gx * gx + gy * gy)
    return F.pad(g, (1, 1, 1, 1))


def refine_origin(x: torch.Tensor, origin0: torch.Tensor, search: float = 2.0) -> torch.Tensor:
    """Refine origins by the Friedel symmetry of the edge map near a first estimate.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns (denoised, or with hot pixels removed).
    origin0 : torch.Tensor
        (N, 2) first estimates (qx0, qy0), pixels.
    search : float
        Half-width of the search window around ``origin0``, pixels.

    Returns
    -------
    torch.Tensor
        (N, 2) refined origins, pixels; sub-pixel by a parabola through the peak.
    """
    n, _, h, w = x.shape
    g = edge_map(x)[:, 0]
    gf = torch.fft.rfft2(g, s=(2 * h, 2 * w))
    cc = torch.fft.irfft2(gf * gf, s=(2 * h, 2 * w))  # peaks at s = 2 * origin
    s0 = torch.round(2 * origin0).long()
    half = int(math.ceil(2 * search))
    off = torch.arange(-half, half + 1, device=x.device)
    rows = (s0[:, 0, None] + off[None]).clamp(1, 2 * h - 2)
    cols = (s0[:, 1, None] + off[None]).clamp(1, 2 * w - 2)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    win = cc[idx_n, rows[:, :, None], cols[:, None, :]]
    flat = win.reshape(n, -1).argmax(dim=1)
    pr = rows[torch.arange(n), flat // win.shape[2]]
    pc = cols[torch.arange(n), flat % win.shape[2]]
    ar = torch.arange(n, device=x.device)

    def vertex(m, c, p):
        den = m - 2 * c + p
        return torch.where(den.abs() > 1e-12, 0.5 * (m - p) / den, torch.zeros_like(den)).clamp(-0.5, 0.5)

    c = cc[ar, pr, pc]
    dr = vertex(cc[ar, pr - 1, pc], c, cc[ar, pr + 1, pc])
    dc = vertex(cc[ar, pr, pc - 1], c, cc[ar, pr, pc + 1])
    return torch.stack([(pr.to(x.dtype) + dr) / 2, (pc.to(x.dtype) + dc) / 2], dim=1)
