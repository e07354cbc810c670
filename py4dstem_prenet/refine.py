"""Physics refinement of the origin after the network: Friedel symmetry of disk edges.

Every disk edge (the bright-field disk, Bragg disks, and ring edges) is the image of
the circular condenser aperture, and the elliptical distortion is centrosymmetric,
so the *edge map* of a pattern is symmetric under inversion through the origin even
where the intensities inside the disks are not (thick, dynamical crystals).  The
self-convolution of the edge map, normalised over the pixels that the inversion keeps
on the detector and outside masked regions, peaks at twice the origin; the search is restricted
to a small window around the network's estimate, which removes the wrong-peak
failures of an unrestricted Friedel search.

Two edge maps are used: the square-root map (edge strength in proportion to its
signal-to-noise ratio) finds the peak to the nearest sample and gives the symmetry
scores that decide between candidate centres; a contrast-normalised map, on which a
disk brighter on one side pulls less, gives the sub-pixel position (see
:func:`edge_map`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur", "edge_map", "refine_origin", "edge_blur_bias", "symmetry_centre", "symmetry_centres",
           "nearest_symmetric_centre",
           "intensity_symmetry_centre", "intensity_symmetry_halves", "intensity_symmetry_map", "log_polar_view",
           "refine_ellipse",
           "bright_field_radius", "beam_stop_radius", "edge_curvature_factor", "disk_model_centre", "disk_fits",
           "DiskFits", "disk_ellipses", "smallest_eigenvalue"]

#: Smallest contrast-normalisation floor of :func:`edge_map`, counts per pixel: edges of
#: features dimmer than this keep square-root weights. Where counts are few, those
#: weights (edge strength in proportion to its signal-to-noise ratio) matter more than
#: the bias of unequal edges: on dev scans (seeds and structures disjoint from the
#: benchmark's) of abTEM Si and GaAs at 1e4 counts per pattern, a floor of 10 raised the
#: mean error from 0.052 to 0.060 px, 100 kept it at 0.053 (at 1e6: 0.021 -> 0.019 px
#: with either); on analytic crystal scans 100 gave 0.037 px at 1e4 (10: 0.035; no
#: normalisation: 0.047) and 0.040 at 1e6 (no normalisation: 0.066).
EDGE_FLOOR_COUNTS = 100.0

#: Normalisation floor of :func:`edge_map` as a fraction of the pattern's maximum: only
#: edges brighter than this are equalised. On dev scans (seeds disjoint from the
#: benchmark's; count floor 10) 0.03 and 0.3 both took the mean error from 0.047 to 0.035 px at 1e4 and
#: from 0.066 to 0.035-0.040 at 1e6 (a bright-field disk whose brightness varies across
#: it: 0.095 to 0.074-0.077), but on a real Merlin frame 0.03 moved the origin 0.43 px
#: off the direct beam's centroid (dim diffuse scattering around the beam, asymmetric,
#: weighed as much as the beam's edge), 0.3 by 0.07 px.
EDGE_FLOOR_FRACTION = 0.3

#: Gaussian smoothing of the edge maps before the gradient, pixels.
EDGE_SIGMA = 0.7

#: Smoothing of the edge map (pixels) at which :func:`edge_blur_bias` measures the centre
#: a second time, next to EDGE_SIGMA. On dev scans (seeds and
#: structures disjoint from the benchmark's; correction smoothed over 3 x 3 scan
#: positions as in preprocess) 1.2 took the mean error at 1e6 counts from 0.020-0.034 to
#: 0.015-0.021 px (analytic crystals) and 0.025 to 0.023 (abTEM Si, GaAs), at 1e4 from
#: 0.056-0.091 to 0.054-0.080 (abTEM 0.047 to 0.048); 1.0 did as well at 1e6, less at
#: 1e4; the pair 0.5 / 0.9 amplified the noise (abTEM at 1e4: 0.066).
BIAS_SIGMA = 1.2

#: Blur variance (px^2) that an edge brings of its own, before the edge map's smoothing,
#: to which :func:`edge_blur_bias` extrapolates (the aperture edge's width, the pixel's
#: sampling, the square root). On noise-free single disks whose intensity slopes across
#: them (radius 5-9 px, edge ramps 0.5-1.5 px, slopes of 0.3-0.6 of the mean per radius), the pull
#: grew linearly with the smoothing variance above about 0.5 px^2, and extrapolating
#: that line to zero smoothing left 0.34-1.19 px^2 (median about 0.5) worth of it: the
#: edge's own blur, about as large as the map's EDGE_SIGMA**2 (0.49). On dev scans
#: (seeds disjoint from the benchmark's, 5 crystal conditions x 2 scans at 1e4, 1e5 and
#: 1e6 counts) 0.49 instead of 0 lowered the mean error in 14 of 15 cells and raised none:
#: 1e4 0.036-0.110 -> 0.035-0.101 px, 1e5 0.017-0.024 -> 0.012-0.022, 1e6 0.012-0.045 ->
#: 0.009-0.038. On the whole dev benchmark (seed 31_000_000) the analytic crystals gained
#: at 1e4-1e6 (e.g. 1e6: 0.038 -> 0.030 px), abTEM scans did not (1e5-1e6 unchanged; their
#: disks show little slope, and the correction's noise cost 0.006-0.007 px at 1e2-1e3).
EDGE_OWN_VARIANCE = 0.49

#: Farthest (px, per axis) that either centre of :func:`edge_blur_bias` may lie from the
#: middle of its +-0.5 px search window: further out, the window cut the peak off, and the
#: estimate is nan. On the real Merlin test frames (a sharp dark disk on a flat field) the
#: centre moved 0.2 px between smoothings of 0.5 and 0.7 px and reached the window's border
#: at 1.2 (a pull of 0.3-0.5 px, extrapolated to 0.25-0.62); the pull of an intensity slope
#: moved it by 0.06 px (noise-free disk of radius 8 px, slope 0.5 of the mean per radius).
BIAS_WINDOW_PX = 0.4


def _blur_reach(sigma: float) -> int:
    """Half-width (px) of :func:`gaussian_blur`'s kernel."""
    return max(1, int(math.ceil(3 * sigma)))


#: Reach (px) of the unit blur that gives :func:`disk_model_centre` its Poisson weights.
_BLUR_REACH = _blur_reach(1.0)


def _gauss_kernel(sigma: float, dtype, device) -> torch.Tensor:
    r = _blur_reach(sigma)
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, 1, H, W) patterns (sigma in pixels), edges replicated.

    Each pass is a weighted sum of shifted views (several times faster on a CPU than a
    single-channel convolution).

    Raises
    ------
    ValueError
        If ``x`` is not a floating-point (N, 1, H, W) tensor or ``sigma`` is not > 0.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1 or not x.is_floating_point():
        raise ValueError(f"patterns must be a floating-point tensor (N, 1, H, W), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    k = _gauss_kernel(sigma, x.dtype, x.device)
    r = (len(k) - 1) // 2
    h, w = x.shape[-2:]
    p = F.pad(x, (r, r, 0, 0), mode="replicate")
    z = sum(k[i] * p[..., i:i + w] for i in range(len(k)))
    p = F.pad(z, (0, 0, r, r), mode="replicate")
    return sum(k[i] * p[..., i:i + h, :] for i in range(len(k)))


def edge_map(x: torch.Tensor, sigma: float = EDGE_SIGMA, floor_counts: float | None = None) -> torch.Tensor:
    """Gradient magnitude of Gaussian-smoothed patterns (N, 1, H, W), of ``sqrt`` of the counts.

    The square root (Anscombe-like: Poisson noise of constant size) keeps bright
    Bragg disks from dominating the weaker bright-field edge. With ``floor_counts``
    the map is also contrast-normalised: divided by ``sqrt(level + floor)``, where
    ``level`` is the local intensity (the 5 x 5 maximum of the pattern smoothed by
    1 px) and ``floor`` the larger of ``floor_counts`` and ``EDGE_FLOOR_FRACTION`` of
    the pattern's maximum. Edges brighter than the floor then weigh the same whatever
    their step height, so a disk whose intensity varies across it (thickness, tilt)
    keeps its two sides' edges equally strong: unequal weights on opposite sides
    bias the symmetry centre towards the bright side (by 0.2 px for a bright-field
    disk 58% brighter on one side, noise-free simulated patterns). Below the floor
    (dim features, the noise of low-count regions) the weights stay those of the
    square root, so noise is not amplified.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) non-negative counts.
    sigma : float
        Gaussian smoothing before the gradient, pixels.
    floor_counts : float, optional
        Smallest normalisation floor, counts per pixel; None: no normalisation.

    Returns
    -------
    torch.Tensor
        (N, 1, H, W) edge strength (0 on the outermost pixels).

    Raises
    ------
    ValueError
        If the patterns are not a floating-point (N, 1, H, W) tensor of at least
        8 x 8 pixels, or ``floor_counts`` is not > 0.
    """
    _check_patterns(x, None)
    if floor_counts is not None and not floor_counts > 0:
        raise ValueError(f"floor_counts must be > 0, got {floor_counts}")
    x = x.clamp_min(0)
    z = gaussian_blur(torch.sqrt(x), sigma)
    gx = z[..., 2:, 1:-1] - z[..., :-2, 1:-1]
    gy = z[..., 1:-1, 2:] - z[..., 1:-1, :-2]
    g = F.pad(torch.sqrt(gx * gx + gy * gy), (1, 1, 1, 1))
    return g if floor_counts is None else g * _contrast_weight(x, floor_counts)


def _contrast_weight(x: torch.Tensor, floor_counts: float) -> torch.Tensor:
    """(N, 1, H, W) factor of :func:`edge_map`'s contrast normalisation of counts x >= 0."""
    b = gaussian_blur(x, 1.0)
    floor = (EDGE_FLOOR_FRACTION * b.amax(dim=(2, 3), keepdim=True)).clamp_min(floor_counts)
    h, w = b.shape[-2:]
    p = F.pad(b, (2, 2, 0, 0))
    level = torch.stack([p[..., i:i + w] for i in range(5)]).amax(dim=0)
    p = F.pad(level, (0, 0, 2, 2))
    level = torch.stack([p[..., i:i + h, :] for i in range(5)]).amax(dim=0)  # 5 x 5 maximum (b >= 0)
    return torch.sqrt(floor / (level + floor))


def _parabola_vertex(m: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Sub-sample offset of the vertex of the parabola through (-1, m), (0, c), (1, p)."""
    den = m - 2 * c + p
    return torch.where(den.abs() > 1e-12, 0.5 * (m - p) / den, torch.zeros_like(den)).clamp(-0.5, 0.5)


def _peak_near(cc: torch.Tensor, s0: torch.Tensor, half: int, disk: bool = False) -> torch.Tensor:
    """Sub-pixel maximum of maps cc (N, A, B) within +-``half`` samples of s0 (N, 2) (integer).

    With ``disk`` the window is the disk of radius ``half``, not the square: where the
    answer must lie within a radius of the estimate (:func:`refine_origin`, whose result
    the engine keeps only within 4 px of the network's), a square's corners reach 1.41
    times as far. Under a beam stop over the bright-field disk they found a half-lattice
    point (about which a lattice of equal disks is as symmetric as about the origin)
    4.4 px from the network's estimate, which was then rejected, while the true origin
    2.9 px away was never reached.
    """
    n, a, b = cc.shape
    off = torch.arange(-half, half + 1, device=cc.device)
    rows = (s0[:, 0, None] + off[None]).clamp(1, a - 2)
    cols = (s0[:, 1, None] + off[None]).clamp(1, b - 2)
    ar = torch.arange(n, device=cc.device)
    win = cc[ar[:, None, None], rows[:, :, None], cols[:, None, :]]
    if disk:
        win = torch.where((off[:, None] ** 2 + off[None, :] ** 2) <= half * half, win, float("-inf"))
    flat = win.reshape(n, -1).argmax(dim=1)
    pr = rows[ar, flat // win.shape[2]]
    pc = cols[ar, flat % win.shape[2]]
    c = cc[ar, pr, pc]
    dr = _parabola_vertex(cc[ar, pr - 1, pc], c, cc[ar, pr + 1, pc])
    dc = _parabola_vertex(cc[ar, pr, pc - 1], c, cc[ar, pr, pc + 1])
    return torch.stack([pr.to(cc.dtype) + dr, pc.to(cc.dtype) + dc], dim=1)


def _dft_grid(spec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Values of the real maps whose half spectra (rfft2 over ``size``) are ``spec`` at any positions.

    Parameters
    ----------
    spec : torch.Tensor
        (N, A, B // 2 + 1) complex half spectra.
    rows, cols : torch.Tensor
        (N, K) and (N, L) sample positions (real numbers) along each axis.
    size : tuple of int
        (A, B), the full map size.

    Returns
    -------
    torch.Tensor
        (N, K, L) map values at every (row, col) pair: the band-limited
        (trigonometric) interpolation of the sampled map, exact at integer positions.
    """
    a, b = size
    kr = torch.fft.fftfreq(a, dtype=torch.float64, device=spec.device)
    kc = torch.arange(spec.shape[-1], dtype=torch.float64, device=spec.device) / b
    # every column but 0 (and b / 2 for even b) stands for itself and its conjugate twin
    wc = torch.full_like(kc, 2.0)
    wc[0] = 1.0
    if b % 2 == 0:
        wc[-1] = 1.0
    two_pi = 2 * math.pi
    er = torch.polar(torch.ones(1, dtype=torch.float64, device=spec.device),
                     two_pi * rows.double()[:, :, None] * kr).to(spec.dtype)
    ec = torch.polar(wc[None, :, None], two_pi * kc[None, :, None] * cols.double()[:, None, :]).to(spec.dtype)
    return (er @ spec @ ec).real / (a * b)


def _upsampled_peak(spec: torch.Tensor, s: torch.Tensor, size: tuple[int, int], half: float = 1.0,
                    step: float = 0.1, den: torch.Tensor | None = None) -> torch.Tensor:
    """Maximum of a map given by its half spectrum near first estimates, on a fine grid.

    A parabola through three samples of a peak is biased by up to a few hundredths
    of a sample (it depends on where the peak falls between samples); the map is
    therefore evaluated by exact Fourier interpolation on a grid of ``step`` samples
    within +-``half`` of ``s`` (N, 2), and a parabola through the best fine sample
    and its neighbours gives the final position. With ``den`` (the half spectrum of
    a positive map) the maximum of the ratio of the two maps is found.
    """
    d = torch.arange(-half, half + step / 2, step, dtype=s.dtype, device=s.device)
    rows, cols = s[:, 0, None] + d, s[:, 1, None] + d
    fine = _dft_grid(spec, rows, cols, size)
    if den is not None:
        fine = fine / _dft_grid(den, rows, cols, size).clamp_min(1e-12)
    n, k, _ = fine.shape
    ar = torch.arange(n, device=s.device)
    flat = fine.reshape(n, -1).argmax(dim=1)
    i, j = (flat // k).clamp(1, k - 2), (flat % k).clamp(1, k - 2)
    c = fine[ar, i, j]
    di = _parabola_vertex(fine[ar, i - 1, j], c, fine[ar, i + 1, j])
    dj = _parabola_vertex(fine[ar, i, j - 1], c, fine[ar, i, j + 1])
    return torch.stack([rows[ar, i] + di * step, cols[ar, j] + dj * step], dim=1)


def _ratio_map(spec: tuple, size: tuple[int, int]) -> torch.Tensor:
    """The map (N, A, B) numerator / denominator of (numerator, denominator) half spectra (see :func:`_peak_spectra`)."""
    num, den = spec
    return torch.fft.irfft2(num, s=size) / torch.fft.irfft2(den, s=size).clamp_min(1e-12)


def _symmetric_peak(cc: torch.Tensor, spec_fine: tuple, size: tuple[int, int], s0: torch.Tensor,
                    search: float, disk: bool = False) -> torch.Tensor:
    """Centre of symmetry (N, 2) px: the normalised self-convolution's peak (at s = 2 * origin).

    ``cc`` is the normalised self-convolution (:func:`_ratio_map`) and ``spec_fine``
    (numerator, denominator) half spectra (see :func:`_peak_spectra`). The peak of
    ``cc`` is found within +-``search`` px of the samples ``s0`` (N, 2); the sub-pixel
    position is that of the peak of the map ``spec_fine`` (of the contrast-normalised
    edge maps) within +-1 sample of it, by Fourier interpolation.
    """
    coarse = _peak_near(cc, s0, int(math.ceil(2 * search)), disk)
    return _upsampled_peak(spec_fine[0], coarse, size, den=spec_fine[1]) / 2


def _check_patterns(x, valid, origin=None) -> None:
    """Clear errors for the public refinement functions' inputs."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1 or not x.is_floating_point():
        raise ValueError(f"patterns must be a floating-point tensor (N, 1, H, W), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if min(x.shape[2:]) < 8:
        raise ValueError(f"patterns must be at least 8 x 8 pixels, got {tuple(x.shape[2:])}")
    if origin is not None and (not isinstance(origin, torch.Tensor) or tuple(origin.shape) != (x.shape[0], 2)):
        raise ValueError(f"origins must be a tensor ({x.shape[0]}, 2), got {tuple(getattr(origin, 'shape', ()))}")
    if valid is not None and (tuple(valid.shape) not in (tuple(x.shape[2:]), (x.shape[0], *x.shape[2:]))
                              or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor {tuple(x.shape[2:])} or {(x.shape[0], *x.shape[2:])}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")


def _masked(g: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps g (N, H, W) and detector weights m (1 or N, H, W), both 0 within 3 px of invalid pixels."""
    if valid is None:
        return g, torch.ones((1, *g.shape[1:]), dtype=g.dtype, device=g.device)
    v = valid.to(g.dtype)
    v = v[None] if v.dim() == 2 else v
    m = (-F.max_pool2d(-v[:, None], 7, stride=1, padding=3))[:, 0]  # erode by 3 px
    return g * m, m


def _masked_edges(x: torch.Tensor, valid: torch.Tensor | None, sigma: float = EDGE_SIGMA):
    """Square-root edge maps g (N, H, W) and detector weights m (see :func:`_masked`)."""
    return _masked(edge_map(x, sigma)[:, 0], valid)


def _peak_spectra(g: torch.Tensor, m: torch.Tensor, gf: torch.Tensor, mf: torch.Tensor, size: tuple[int, int]):
    """(numerator, denominator) half spectra of the map whose peak is the centre of symmetry.

    g, m: maps and detector weights (see :func:`_masked`), gf and mf their rfft2 over
    ``size``. The map is the inversion-symmetry score of :func:`symmetry_centre`, normalised
    over the pixels that the inversion keeps on the detector and valid. A plain
    self-convolution of the edge maps g (spectra gf over ``size``) is pulled towards
    the point about which the detector and mask are most symmetric (inverting
    through it loses the fewest edge pixels off the detector or behind a stop): on dev
    scans of rings reaching the detector's border, normalising took the mean error at
    1e4 counts from 0.088 to 0.055 px (polycrystalline) and 0.073 to 0.055 (amorphous).
    """
    mu = (g * m).sum(dim=(1, 2), keepdim=True) / m.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    g0f = gf - mu * mf
    den = torch.fft.rfft2(((g - mu) * m) ** 2, s=size) * mf
    return g0f * g0f, den


def _fine_spectra(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, mf: torch.Tensor, size: tuple[int, int]) -> tuple:
    """(numerator, denominator) half spectra of the contrast-normalised map: g times
    :func:`_contrast_weight` (the mask and the weight commute)."""
    gw = g * _contrast_weight(x.clamp_min(0), EDGE_FLOOR_COUNTS)[:, 0]
    return _peak_spectra(gw, m, torch.fft.rfft2(gw, s=size), mf, size)


def _located(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, gf: torch.Tensor, mf: torch.Tensor,
             s0: torch.Tensor, search: float, disk: bool = False) -> torch.Tensor:
    """Centres of symmetry (N, 2) px near s0 / 2 (see :func:`_symmetric_peak`). g, m: the
    :func:`_masked_edges` of x, gf and mf their rfft2 over (2H, 2W)."""
    size = (2 * x.shape[2], 2 * x.shape[3])
    cc = _ratio_map(_peak_spectra(g, m, gf, mf, size), size)
    return _symmetric_peak(cc, _fine_spectra(x, g, m, mf, size), size, s0, search, disk)


def refine_origin(x: torch.Tensor, origin0: torch.Tensor, search: float = 2.0, valid: torch.Tensor | None = None,
                  with_score: bool = False, disk: bool = False):
    """Refine origins by the Friedel symmetry of the edge map near a first estimate.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns (denoised, or with hot pixels removed).
    origin0 : torch.Tensor
        (N, 2) first estimates (qx0, qy0), pixels.
    search : float
        Half-width of the search window around ``origin0``, pixels.
    valid : torch.Tensor, optional
        (H, W) bool, or (N, H, W) per pattern; False on a beam stop, dead regions
        or burned-in annotations: edges within 3 px of them are ignored (their
        borders are not part of the pattern), and the symmetry score is
        normalised over valid pixels only.
    with_score : bool
        Also return the inversion-symmetry score at the refined origins (see
        :func:`symmetry_centre`).
    disk : bool
        Search the disk of radius ``search`` instead of the square window.

    Returns
    -------
    torch.Tensor or tuple
        (N, 2) refined origins in pixels; with ``with_score``, ``(origin, score)``.

    Raises
    ------
    ValueError
        If the patterns, origins or valid map have the wrong type or shape.
    """
    _check_patterns(x, valid, origin0)
    g, m = _masked_edges(x, valid)
    size = (2 * x.shape[2], 2 * x.shape[3])
    origin = _located(x, g, m, torch.fft.rfft2(g, s=size), torch.fft.rfft2(m, s=size), torch.round(2 * origin0).long(),
                      search, disk)
    if not with_score:
        return origin
    return origin, _symmetry_at(g, m, torch.round(2 * origin).long(), LOCAL_MIN_OVERLAP)


def edge_blur_bias(x: torch.Tensor, origin: torch.Tensor, valid: torch.Tensor | None = None,
                   sigma: float = BIAS_SIGMA) -> torch.Tensor:
    """Bias of the refined origin from blurring edges next to intensity slopes.

    Where the intensity inside a disk varies (thickness, tilt, dynamical contrast),
    its edge profile is not the same all around: the ridge of a blurred edge next
    to an interior slope moves, and so does the peak of the square-root edge map
    where the edge's contrast changes around the disk. Both shifts grow with the
    blur of the edge (to first order in proportion to the blur variance ``s**2``:
    the edge's own width plus the edge map's smoothing), and they do not cancel
    between opposite edges, so the symmetry centre is biased. Measuring it at the
    smoothing EDGE_SIGMA (0.7 px) and at ``sigma`` gives the change per unit of
    blur variance, and Richardson extrapolation to no blur, the map's smoothing and
    the edge's own (EDGE_OWN_VARIANCE, 0.49 px^2), estimates the bias:
    ``bias = (c(sigma) - c(0.7)) * (0.7**2 + 0.49) / (sigma**2 - 0.7**2)``; subtract
    it from the origin. On noise-free ramped disks with 1 px edges the correction
    removes about half of the bias or more (it helps less reliably on edges sharper
    than a pixel, where aliasing adds its own error; without the edge's own variance
    it removed 25-50%). The estimate is noisier than the origin
    itself, so preprocess takes its median over the 3 x 3 neighbouring scan
    positions (slopes change slowly with the probe).

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns, as given to :func:`refine_origin`.
    origin : torch.Tensor
        (N, 2) refined origins, pixels: both centres are found within 1 px of them.
    valid : torch.Tensor, optional
        As in :func:`refine_origin`.
    sigma : float
        The second smoothing, pixels (> EDGE_SIGMA).

    Returns
    -------
    torch.Tensor
        (N, 2) estimated bias (qx, qy), pixels (same dtype as ``x``); nan where
        either centre lies more than BIAS_WINDOW_PX from the middle of its search
        window (the window cut its peak off: no estimate).

    Raises
    ------
    ValueError
        If the patterns, origins or valid map have the wrong type or shape, or
        ``sigma`` is not > EDGE_SIGMA.
    """
    _check_patterns(x, valid, origin)
    base = EDGE_SIGMA
    if not sigma > base:
        raise ValueError(f"sigma must be > {base}, got {sigma}")
    size = (2 * x.shape[2], 2 * x.shape[3])
    s0 = torch.round(2 * origin).to(x.dtype)
    weight = _contrast_weight(x.clamp_min(0), EDGE_FLOOR_COUNTS)[:, 0]
    centres, mf = [], None
    for sg in (base, sigma):
        g, m = _masked_edges(x, valid, sg)
        mf = torch.fft.rfft2(m, s=size) if mf is None else mf  # m depends on valid only
        gw = g * weight
        num, den = _peak_spectra(gw, m, torch.fft.rfft2(gw, s=size), mf, size)
        centres.append(_upsampled_peak(num, s0, size, den=den) / 2)
    bias = (centres[1] - centres[0]) * ((base**2 + EDGE_OWN_VARIANCE) / (sigma**2 - base**2))
    # a centre at the border of the +-0.5 px window searched for it moved further than the
    # window: not the slope's pull, which the smoothing changes by hundredths of a pixel
    edge = torch.stack([(c - s0 / 2).abs().amax(dim=1) for c in centres]).amax(dim=0) > BIAS_WINDOW_PX
    return torch.where(edge[:, None], torch.full_like(bias, float("nan")), bias).to(x.dtype)



#: Window of :func:`disk_model_centre`: pixels within the fitted disk's radius plus
#: this many pixels of its first centre.
DISK_MODEL_MARGIN = 3.0

#: Residual (in Poisson standard deviations, or in the residuals' robust spread where
#: that is larger) above which a pixel of the window is left out of
#: :func:`disk_model_centre`'s second pass: an intruding Bragg disk's edge, a hot pixel.
DISK_MODEL_OUTLIER = 5.0

#: Smallest fraction of the window :func:`disk_model_centre` needs valid (not under a
#: given mask) and on the detector; below it the disk is not seen whole enough.
DISK_MODEL_MIN_VALID = 0.9

#: Largest move (px) of :func:`disk_model_centre` from its first centre, and the
#: range of the fitted radius over the first radius, for a fit to count.
DISK_MODEL_MAX_MOVE = 1.0
DISK_MODEL_RADIUS_RANGE = (0.75, 1.33)

#: Smallest step of the fitted disk's edge at its centre, as a fraction of the counts
#: there (step plus background), for a fit to count: a window that holds no edge (a
#: radius far off) fits one anywhere with no step.
DISK_MODEL_MIN_CONTRAST = 0.2

#: Margin of :func:`disk_model_centre`'s ``max_sigma`` pre-check on the standard error
#: before the fit.
DISK_MODEL_PRECHECK = 3.0

_SQRT2 = math.sqrt(2.0)
_N_SHAPE = 6  # centre (2), radius, log edge width, ellipse (e1, e2)


def _disk_basis(theta: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
    """Linear basis (N, P, P, 7) of :func:`disk_model_centre`'s model at shape parameters theta (N, 6)."""
    cx, cy, r, log_w, e1, e2 = (t[:, None, None] for t in theta.unbind(1))
    dx, dy = qx - cx, qy - cy
    ax, ay = (1 + e1) * dx + e2 * dy, e2 * dx + (1 - e1) * dy
    step = 0.5 * torch.erfc((torch.sqrt(ax * ax + ay * ay) - r) / (torch.exp(log_w) * _SQRT2))
    ux, uy = dx / r0[:, None, None], dy / r0[:, None, None]
    return torch.stack([torch.ones_like(step), step, step * ux, step * uy, step * ux * ux, step * ux * uy,
                        step * uy * uy], dim=-1)


def _disk_residuals(theta, y, weight, qx, qy, r0, coefficients: bool = False):
    """Weighted residuals (N, P * P) of the best linear coefficients at shape parameters theta
    (and with ``coefficients`` those (N, 7) too)."""
    sw = weight.sqrt()
    a = (_disk_basis(theta, qx, qy, r0) * sw[..., None]).flatten(1, 2)
    b = (y * sw).flatten(1)[..., None]
    ata = a.transpose(1, 2) @ a
    ata = ata + 1e-9 * torch.diag_embed(torch.diagonal(ata, dim1=1, dim2=2).clamp_min(1e-12))
    beta = torch.linalg.solve(ata, a.transpose(1, 2) @ b)
    res = (b - a @ beta)[..., 0]
    return (res, beta[..., 0]) if coefficients else res


_FD_STEPS = (1e-4, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5)  # finite-difference steps of the shape parameters


def _disk_normal_matrix(theta, res, y, weight, qx, qy, r0, analytic: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Newton normal matrix J^T J (N, 6, 6) and the Jacobian J (N, P * P, 6) of the
    residuals ``res`` at theta: by finite differences (the full variable-projection
    Jacobian), or with ``analytic`` in Kaufman's closed form (:func:`_kaufman_jacobian`;
    three times cheaper, but at low counts, where the residuals are large, a fit of a few
    steps takes another path: the mean origin error of a dev crystal scan at 1e3 counts
    went from 0.077 to 0.128 px, so the origin's fit keeps the finite differences)."""
    if analytic:
        jac = _kaufman_jacobian(theta, y, weight, qx, qy, r0)
    else:
        steps = torch.tensor(_FD_STEPS, dtype=theta.dtype, device=theta.device)
        eye = torch.eye(_N_SHAPE, dtype=theta.dtype, device=theta.device)
        jac = torch.stack([(_disk_residuals(theta + steps[k] * eye[k], y, weight, qx, qy, r0) - res) / steps[k]
                           for k in range(_N_SHAPE)], dim=-1)
    return jac.transpose(1, 2) @ jac, jac


def _kaufman_jacobian(theta, y, weight, qx, qy, r0) -> torch.Tensor:
    """Jacobian (N, P * P, 6) of the disk fit's weighted residuals at theta, in closed form.

    Variable projection in Kaufman's form: J = -(I - A A^+) dm/dtheta, where A is the
    weighted linear basis, A^+ its pseudo-inverse and m = A beta the weighted model at the
    best linear coefficients beta; dm/dtheta is differentiated in closed form. The
    term Kaufman leaves out is of the order of the residuals and does not move the
    minimum, only the path to it.
    """
    cx, cy, r, log_w, e1, e2 = (t[:, None, None] for t in theta.unbind(1))
    dx, dy = qx - cx, qy - cy
    ax, ay = (1 + e1) * dx + e2 * dy, e2 * dx + (1 - e1) * dy
    rho = torch.sqrt(ax * ax + ay * ay).clamp_min(1e-9)
    width = torch.exp(log_w)
    z = (rho - r) / width
    step = 0.5 * torch.erfc(z / _SQRT2)
    ux, uy = dx / r0[:, None, None], dy / r0[:, None, None]
    sw = weight.sqrt()
    a = (torch.stack([torch.ones_like(step), step, step * ux, step * uy, step * ux * ux, step * ux * uy,
                      step * uy * uy], dim=-1) * sw[..., None]).flatten(1, 2)
    ata = a.transpose(1, 2) @ a
    ata = ata + 1e-9 * torch.diag_embed(torch.diagonal(ata, dim1=1, dim2=2).clamp_min(1e-12))
    beta = torch.linalg.solve(ata, a.transpose(1, 2) @ (y * sw).flatten(1)[..., None])[..., 0]
    b1, b2, b3, b4, b5, b6 = (t[:, None, None] for t in beta[:, 1:].unbind(1))
    poly = b1 + b2 * ux + b3 * uy + b4 * ux * ux + b5 * ux * uy + b6 * uy * uy
    # d step / d theta = -pdf(z) dz/dtheta, times the interior; the interior's own dependence on c
    g = -torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * poly / width
    inv_r0 = 1 / r0[:, None, None]
    dm = torch.stack([
        g * -(ax * (1 + e1) + ay * e2) / rho - step * (b2 + 2 * b4 * ux + b5 * uy) * inv_r0,
        g * -(ax * e2 + ay * (1 - e1)) / rho - step * (b3 + b5 * ux + 2 * b6 * uy) * inv_r0,
        -g,
        -g * (rho - r),
        g * (ax * dx - ay * dy) / rho,
        g * (ax * dy + ay * dx) / rho,
    ], dim=-1) * sw[..., None]
    dm = dm.flatten(1, 2)
    return -(dm - a @ torch.linalg.solve(ata, a.transpose(1, 2) @ dm))


def _levenberg_marquardt(theta, y, weight, qx, qy, r0, iterations: int, analytic: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape parameters (N, 6) minimising the weighted residuals, and the final residuals
    (``analytic``: see :func:`_disk_normal_matrix`)."""
    eye = torch.eye(_N_SHAPE, dtype=theta.dtype, device=theta.device)
    lam = torch.full((len(theta),), 1e-3, dtype=theta.dtype, device=theta.device)
    res = _disk_residuals(theta, y, weight, qx, qy, r0)
    cost = (res * res).sum(1)
    for _ in range(iterations):
        jtj, jac = _disk_normal_matrix(theta, res, y, weight, qx, qy, r0, analytic)
        damp = lam[:, None, None] * torch.diag_embed(torch.diagonal(jtj, dim1=1, dim2=2)) + 1e-12 * eye
        trial = theta - torch.linalg.solve(jtj + damp, jac.transpose(1, 2) @ res[..., None])[..., 0]
        res2 = _disk_residuals(trial, y, weight, qx, qy, r0)
        cost2 = (res2 * res2).sum(1)
        better = cost2 < cost
        theta = torch.where(better[:, None], trial, theta)
        res = torch.where(better[:, None], res2, res)
        cost = torch.where(better, cost2, cost)
        lam = torch.where(better, lam * 0.3, lam * 10.0)
    return theta, res


def disk_model_centre(x: torch.Tensor, origin: torch.Tensor, radius: torch.Tensor | float,
                      valid: torch.Tensor | None = None, iterations: int = 4, max_sigma: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre of the bright-field disk from a fit of the disk itself: aperture edge times a smooth interior.

    The bright-field disk is the image of the condenser aperture: a step of constant
    profile along an ellipse, times whatever intensity the crystal gives the inside
    (thickness, tilt, dynamical contrast). Edge maps cannot tell an interior slope from
    the edge next to it, so the symmetry centre of :func:`refine_origin` moves towards a
    disk's bright side (0.1-0.7 px on noise-free simulated disks 2-8 times brighter on
    one side). This fit models both: counts ``b + P(u) * Phi((R - rho) / s)``, where
    ``rho = |(1 + E)(q - c)|`` is the elliptical radius about the centre ``c`` (``E``
    symmetric and traceless: the distortion e1, e2), ``Phi`` the normal cumulative
    distribution (an edge of width ``s``), ``P`` a quadratic polynomial in
    ``u = (q - c) / R0`` (the interior) and ``b`` a constant (diffuse background).
    The linear coefficients (b, P) are solved at every step (variable projection),
    the six shape parameters (c, R, log s, e1, e2) by Levenberg-Marquardt, weighted by
    the inverse of the locally smoothed counts (Poisson). A second pass leaves out the
    pixels more than DISK_MODEL_OUTLIER standard deviations off the first fit (the edge
    of a Bragg disk that reaches into the window, hot pixels). A step edge of another
    profile (a linear ramp, an Airy-like fringe) is fitted with the same error all
    around the disk, which moves no centre to first order; on noise-free simulated
    disks with linear-ramp edges the centre was still about 0.01 px off (small disks
    with wide edges, next to an interior slope: the pixels' area grows with the radius).

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) counts (with hot pixels removed).
    origin : torch.Tensor
        (N, 2) first centres (qx, qy), pixels, within about a pixel of the disk's.
    radius : torch.Tensor or float
        Bright-field disk radius, pixels: one value or (N,).
    valid : torch.Tensor, optional
        (H, W) or (N, H, W) bool, False on a beam stop or other masked pixels.
    iterations : int
        Levenberg-Marquardt steps of each pass. From a symmetry centre, the fit of a
        dev scan (12 x 12 patterns, 1e5 counts) changed by less than 0.002 px on
        average after 3.
    max_sigma : float, optional
        The standard error (px) the caller will accept: patterns whose standard error
        at ``origin`` (before the fit) exceeds DISK_MODEL_PRECHECK times it are not
        fitted (not ok). The first standard error is that of the counts alone at the
        first radius and an edge of 1 px; on 9 dev crystal scans (6 x 6 patterns, 3e3 to
        1e5 counts) the final one was 0.3-0.6 times it in most patterns (0.07-3.3 in
        all), so a few fits that would have reached ``max_sigma`` are skipped.

    Returns
    -------
    centre : torch.Tensor
        (N, 2) fitted centres, pixels (float64).
    ok : torch.Tensor
        (N,) bool: the fit counts: the window at least DISK_MODEL_MIN_VALID valid and on
        the detector, the edge's step at least DISK_MODEL_MIN_CONTRAST of the counts at
        the centre, the centre within DISK_MODEL_MAX_MOVE of ``origin``, the radius
        within DISK_MODEL_RADIUS_RANGE of ``radius`` and the edge narrower than a
        quarter of it. Where not ok, ``centre`` is ``origin``.
    sigma : torch.Tensor
        (N,) standard error of the centre, px (root of the summed variances of qx and
        qy from the fit's covariance, scaled up by the reduced chi-square where that
        exceeds 1); nan where not ok. It covers the counts' noise, not a misfit of the
        interior: on dev crystal scans of 1e4-3e4 counts the actual error was 1-3 times
        larger.

    Raises
    ------
    ValueError
        If the patterns, origins or valid map have the wrong type or shape, a radius
        is not finite and > 0, ``iterations`` is not an integer >= 1 or ``max_sigma``
        not > 0.
    """
    _check_patterns(x, valid, origin)
    if max_sigma is not None and not max_sigma > 0:
        raise ValueError(f"max_sigma must be > 0, got {max_sigma}")
    r0 = _check_radius(radius, x.shape[0])
    _check_iterations(iterations)
    fit = _fit_disk_windows(x, origin, r0, torch.arange(x.shape[0]), valid, iterations, max_sigma)
    return fit.centre, fit.ok, fit.sigma


def smallest_eigenvalue(c: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """The smallest eigenvalue of each symmetric 2 x 2 matrix, in closed form.

    Parameters
    ----------
    c : torch.Tensor or numpy.ndarray
        (..., 2, 2) symmetric matrices (covariances); the mean of the two off-diagonal
        entries is taken.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        (...,) of the input's kind: (a + d) / 2 - sqrt(((a - d) / 2)^2 + b^2), positive
        where the matrix is positive-definite.

    Raises
    ------
    ValueError
        If the last two axes are not 2 x 2.
    """
    if tuple(c.shape[-2:]) != (2, 2):
        raise ValueError(f"need (..., 2, 2) matrices, got shape {tuple(c.shape)}")
    a, d, b = c[..., 0, 0], c[..., 1, 1], 0.5 * (c[..., 0, 1] + c[..., 1, 0])
    return 0.5 * (a + d) - (0.25 * (a - d) ** 2 + b**2) ** 0.5


class DiskFits(NamedTuple):
    """Disk fits of :func:`disk_fits`, one row per disk; float64 tensors on the CPU."""

    #: (N, 2) fitted centres (qx, qy), pixels, where ok; elsewhere the first centres.
    centre: torch.Tensor
    #: (N,) bool: the fit counts (the checks of :func:`disk_model_centre`).
    ok: torch.Tensor
    #: (N,) standard error of the centre, pixels; nan where not ok.
    sigma: torch.Tensor
    #: (N, 6) shape parameters (qx, qy, radius R px, log edge width log s, e1, e2 of the
    #: fit's elliptical radius |(1 + E)(q - c)|); nan where not ok.
    shape: torch.Tensor
    #: (N, 6, 6) their covariance (counts' noise, scaled up by the misfit); nan where not ok.
    covariance: torch.Tensor


def disk_fits(x: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor | float, which: torch.Tensor,
              valid: torch.Tensor | None = None, iterations: int = 4, edge_width: float = 1.0,
              shape_fit: bool = False) -> DiskFits:
    """Fit the disk model of :func:`disk_model_centre` to any disks, each in its own pattern.

    Parameters
    ----------
    x : torch.Tensor
        (M, 1, H, W) counts (with hot pixels removed).
    centre : torch.Tensor
        (N, 2) first centres (qx, qy) of the disks, pixels, within about a pixel.
    radius : torch.Tensor or float
        First disk radius, pixels: one value or (N,).
    which : torch.Tensor
        (N,) integer: the pattern of ``x`` that holds each disk.
    valid : torch.Tensor, optional
        (H, W) or (M, H, W) bool, False on masked pixels.
    iterations : int
        Levenberg-Marquardt steps of each of the fit's two passes.
    edge_width : float
        First edge width (the error function's sigma), pixels, > 0.
    shape_fit : bool
        Fit for the disks' shapes (:func:`disk_ellipses`): the second pass weighs the
        pixels by the first pass's model instead of the smoothed counts, and the
        Jacobian is Kaufman's closed form. False: as :func:`disk_model_centre`.

    Returns
    -------
    DiskFits
        Centres, ok, centre standard errors, shape parameters and their covariance.

    Raises
    ------
    ValueError
        If the patterns, centres, indices, radius, valid map, ``iterations``,
        ``edge_width`` or ``shape_fit`` are malformed.
    """
    _check_patterns(x, valid)
    if not isinstance(centre, torch.Tensor) or centre.dim() != 2 or centre.shape[1] != 2:
        raise ValueError(f"centres must be a tensor (N, 2), got {tuple(getattr(centre, 'shape', ()))}")
    if (not isinstance(which, torch.Tensor) or which.is_floating_point() or which.dtype == torch.bool
            or tuple(which.shape) != (len(centre),)):
        raise ValueError(f"which must be an integer tensor ({len(centre)},), got "
                         f"{getattr(which, 'dtype', type(which).__name__)} {tuple(getattr(which, 'shape', ()))}")
    if len(which) and (int(which.min()) < 0 or int(which.max()) >= x.shape[0]):
        raise ValueError(f"which must index the {x.shape[0]} patterns, got {int(which.min())}..{int(which.max())}")
    r0 = _check_radius(radius, len(centre))
    _check_iterations(iterations)
    if not (isinstance(edge_width, (int, float)) and math.isfinite(edge_width) and edge_width > 0):
        raise ValueError(f"edge_width must be finite and > 0, got {edge_width!r}")
    if not isinstance(shape_fit, bool):
        raise ValueError(f"shape_fit must be True or False, got {shape_fit!r}")
    return _fit_disk_windows(x, centre, r0, which.long(), valid, iterations, None, float(edge_width), shape_fit)


#: Largest |E| (the fitted distortion's traceless part) of a disk fit that
#: :func:`disk_ellipses` counts: a/b = 1.5; projector distortions are a few percent.
DISK_ELLIPSE_MAX = 0.2

#: Narrowest edge (the error function's sigma, px) of a disk fit that
#: :func:`disk_ellipses` counts. An edge much narrower than the pixels is a step that
#: falls between two pixel centres: the fit's derivatives, hence its covariance, diverge.
#: On a 32x32 crystal scan (128 px, 1e4 counts) 13 of 2571 fits had (e1, e2) variances
#: below 1e-10, all with edges under 0.004 px (the median edge: 0.2 px), and the combined
#: a/b moved by 6e-4 as one of them, (e1, e2) = (-0.155, -0.077), came in or out.
DISK_MIN_EDGE_WIDTH = 0.01


def disk_ellipses(x: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor | float, which: torch.Tensor,
                  valid: torch.Tensor | None = None, iterations: int = 4, edge_width: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elliptical distortion of each disk's own shape, from the disk fit of :func:`disk_model_centre`.

    Every disk of a diffraction pattern, the bright-field disk and each Bragg disk, is
    an image of the same round condenser aperture, so the projector's elliptical
    distortion gives each the same shape: the distortion ``D`` maps a circle about a
    disk's centre ``c`` onto ``{q : |D^-1 (q - c)| = R}``. The fit's elliptical
    radius ``|(1 + E)(q - c)|`` (E symmetric, traceless: e1, e2) finds ``1 + E``
    proportional to ``D^-1``. Unlike the disks' positions (a lattice, which a
    distortion cannot tell from strain), their shapes measure the distortion alone.
    Each fit's pixels lie at another sub-pixel phase of its disk, so the pixel
    sampling's error (a few 1e-3 in e on a sharp edge) averages out over many fits;
    that of one disk at one phase does not (on the whole-pixel aligned mean of a dev
    scan at 1e6 counts, single disks were up to 6e-3 off; 2885 fits pattern by
    pattern, 3e-5). The second pass weighs the pixels by the first pass's model, not
    by the smoothed counts: at a few counts per pixel, weights from the counts
    themselves pull e towards 0 (on the five dev scans below, with 2 steps, the
    combined (e1, e2) was 0.82e-3 off on average with the counts' weights, 0.64e-3
    with the model's).

    Parameters
    ----------
    x : torch.Tensor
        (M, 1, H, W) counts (with hot pixels removed).
    centre : torch.Tensor
        (N, 2) first centres (qx, qy) of the disks, pixels, within about a pixel.
    radius : torch.Tensor or float
        Disk radius, pixels: one value or (N,).
    which : torch.Tensor
        (N,) integer: the pattern of ``x`` that holds each disk.
    valid : torch.Tensor, optional
        (H, W) or (M, H, W) bool, False on masked pixels.
    iterations : int
        Levenberg-Marquardt steps of each of the fit's two passes, from first centres
        within a few tenths of a pixel and the radius and edge width of the disks
        (fitted on a scan's aligned mean). On five dev crystal scans (12 x 12 patterns,
        1e4 counts, a/b = 1.02) the combined (e1, e2) was 0.64e-3 off on average
        after 2, 0.53e-3 after 4.
    edge_width : float
        First edge width (the error function's sigma), pixels, > 0.

    Returns
    -------
    e12 : torch.Tensor
        (N, 2) float64 (e1, e2) of each disk's shape in the wrap-free form of
        :func:`~py4dstem_prenet.conventions.ellipse_to_e12` (the distortion that
        ``calibration.set_ellipse`` undoes); nan where not ok.
    covariance : torch.Tensor
        (N, 2, 2) its covariance from the fit (counts' noise, scaled up by the misfit);
        nan where not ok.
    ok : torch.Tensor
        (N,) bool: the fit counts (the checks of :func:`disk_model_centre`, a/b at
        most 1.5 (DISK_ELLIPSE_MAX), an edge at least DISK_MIN_EDGE_WIDTH wide and a
        finite, positive-definite covariance).

    Raises
    ------
    ValueError
        If the patterns, centres, indices, radius, valid map or ``iterations`` are
        malformed.
    """
    fit = disk_fits(x, centre, radius, which, valid, iterations, edge_width, shape_fit=True)
    eps = fit.shape[:, 4:6]
    m = torch.linalg.norm(eps, dim=1).clamp_max(0.5)
    # a/b = (1 + m) / (1 - m) along -eps: e12 = -eps (a/b - 1) / m = -2 eps / (1 - m)
    e12 = -2 * eps / (1 - m)[:, None]
    u = eps / m.clamp_min(1e-12)[:, None]
    jac = -2 / (1 - m)[:, None, None] * (torch.eye(2, dtype=eps.dtype) + (m / (1 - m))[:, None, None]
                                        * u[:, :, None] * u[:, None, :])
    covariance = jac @ fit.covariance[:, 4:6, 4:6] @ jac.transpose(1, 2)
    # positive-definite: both eigenvalues positive (a determinant alone lets a negative-
    # definite one through: on numpy 2.5 a 32x32 scan's combined a/b came out nan, the
    # square root of a negative Mahalanobis distance)
    # (a nan covariance has a nan eigenvalue, which is not > 0)
    ok = (fit.ok & (m <= DISK_ELLIPSE_MAX) & torch.isfinite(covariance).flatten(1).all(dim=1)
          & (fit.shape[:, 3] >= math.log(DISK_MIN_EDGE_WIDTH)) & (smallest_eigenvalue(covariance) > 0))
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return torch.where(ok[:, None], e12, nan), torch.where(ok[:, None, None], covariance, nan), ok


def _check_radius(radius: torch.Tensor | float, n: int) -> torch.Tensor:
    """(n,) float64 radii from one value or (n,), each finite and > 0 (else a clear error)."""
    r0 = torch.as_tensor(radius, dtype=torch.float64).reshape(-1)
    if r0.numel() not in (1, n):
        raise ValueError(f"radius must be one value or {n} values, got {r0.numel()}")
    if not bool(torch.isfinite(r0).all()) or bool((r0 <= 0).any()):
        raise ValueError(f"radius must be finite and > 0, got {radius}")
    return r0.expand(n).clone()


def _check_iterations(iterations) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")


def _fit_disk_windows(x: torch.Tensor, origin: torch.Tensor, r0: torch.Tensor, which: torch.Tensor,
                      valid: torch.Tensor | None, iterations: int, max_sigma: float | None,
                      edge_width: float = 1.0, shape_fit: bool = False) -> DiskFits:
    """Fit the disk model of :func:`disk_model_centre` to the disk at ``origin[k]`` (N, 2) of
    pattern ``x[which[k]]``, radius ``r0[k]`` (N,), from an edge ``edge_width`` px wide;
    arguments as there, already checked. With ``shape_fit`` (:func:`disk_ellipses`) the
    second pass weighs the pixels by the first pass's model instead of the smoothed
    counts, and the Jacobian is Kaufman's closed form (see :func:`_disk_normal_matrix`)."""
    n, (h, w) = len(origin), x.shape[2:]
    o = origin.detach().to("cpu", torch.float64)
    nan = torch.full((n, _N_SHAPE), float("nan"), dtype=torch.float64)
    if n == 0:
        return DiskFits(o.clone(), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64),
                         nan, nan[..., None].expand(-1, -1, _N_SHAPE).clone())
    which = which.to("cpu")
    half = int(math.ceil(float(r0.max()) + DISK_MODEL_MARGIN + 1))
    # the local level (Poisson weights) from a window wider by the blur's reach, so that
    # no pixel's weight depends on the window's size (the largest radius of the block)
    pad = _BLUR_REACH
    offs = torch.arange(-half - pad, half + pad + 1)
    corner = torch.round(torch.nan_to_num(o)).long()
    rows, cols = corner[:, :1] + offs, corner[:, 1:] + offs
    at = (which[:, None, None], rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :])
    y = x[:, 0].detach().to("cpu", torch.float64)[at].clamp_min(0)
    level = gaussian_blur(y[:, None], 1.0)[:, 0, pad:-pad, pad:-pad].clamp_min(1.0)
    y, rows, cols, offs = y[:, pad:-pad, pad:-pad], rows[:, pad:-pad], cols[:, pad:-pad], offs[pad:-pad]
    on = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    at = (at[0], at[1][:, pad:-pad], at[2][:, :, pad:-pad])
    qx = rows[:, :, None].to(torch.float64).expand(-1, -1, len(offs))
    qy = cols[:, None, :].to(torch.float64).expand(-1, len(offs), -1)
    window = torch.hypot(qx - o[:, :1, None], qy - o[:, 1:, None]) <= (r0 + DISK_MODEL_MARGIN)[:, None, None]
    seen = window & on
    if valid is not None:
        v = valid.to("cpu")
        seen = seen & (v.expand(x.shape[0], h, w) if v.dim() == 2 else v)[at]
    enough = seen.sum(dim=(1, 2)) >= DISK_MODEL_MIN_VALID * window.sum(dim=(1, 2))
    weight = seen.to(torch.float64) / level
    theta = torch.stack([o[:, 0], o[:, 1], r0, torch.full((n,), math.log(edge_width), dtype=torch.float64),
                         torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)], dim=1)
    theta = torch.nan_to_num(theta)
    fit = enough.clone()
    if max_sigma is not None and fit.any():
        # the counts' own standard error at the first centre (no misfit yet: the first
        # radius and edge are guesses) foretells the fit's: skip the fits that could not
        # reach max_sigma (low counts), most of the fit's cost there
        k = torch.nonzero(fit)[:, 0]
        a = (theta[k], y[k], weight[k], qx[k], qy[k], r0[k])
        fit[k] = _centre_sigma(a[0], _disk_residuals(*a), *a[1:], None) <= DISK_MODEL_PRECHECK * max_sigma
    centre, sigma = o.clone(), torch.full((n,), float("nan"), dtype=torch.float64)
    ok = torch.zeros(n, dtype=torch.bool)
    shape, covariance = nan.clone(), nan[..., None].expand(-1, -1, _N_SHAPE).clone()
    if fit.any():
        y, weight, qx, qy, r0, theta, seen, o_fit = (t[fit] for t in (y, weight, qx, qy, r0, theta, seen, o))
        theta, res = _levenberg_marquardt(theta, y, weight, qx, qy, r0, iterations, shape_fit)
        # residuals are in Poisson sigmas; where the model's own misfit is larger (a bright
        # disk whose edge is not an error function), in units of their robust spread
        z = res.reshape(weight.shape).abs()
        spread = torch.nan_to_num(torch.where(seen, z, float("nan")).flatten(1).nanmedian(dim=1).values, nan=1.0)
        keep = z <= DISK_MODEL_OUTLIER * (spread / 0.6745).clamp_min(1.0)[:, None, None]
        if shape_fit:
            _, beta = _disk_residuals(theta, y, weight, qx, qy, r0, coefficients=True)
            model = (_disk_basis(theta, qx, qy, r0) * beta[:, None, None, :]).sum(-1)
            weight = seen.to(torch.float64) / model.clamp_min(1.0)
        weight = weight * keep
        theta, _ = _levenberg_marquardt(theta, y, weight, qx, qy, r0, iterations, shape_fit)
        res, beta = _disk_residuals(theta, y, weight, qx, qy, r0, coefficients=True)
        cov = _shape_covariance(theta, res, y, weight, qx, qy, r0, weight > 0, shape_fit)
        sig = torch.sqrt(torch.diagonal(cov[:, :2, :2], dim1=1, dim2=2).sum(1).clamp_min(0))
        good = (torch.isfinite(theta).all(dim=1) & torch.isfinite(sig)
                & (beta[:, 1] > DISK_MODEL_MIN_CONTRAST * (beta[:, 0].clamp_min(0) + beta[:, 1]))
                & (torch.linalg.norm(theta[:, :2] - o_fit, dim=1) <= DISK_MODEL_MAX_MOVE)
                & (theta[:, 2] >= DISK_MODEL_RADIUS_RANGE[0] * r0) & (theta[:, 2] <= DISK_MODEL_RADIUS_RANGE[1] * r0)
                & (torch.exp(theta[:, 3]) < 0.25 * theta[:, 2]))
        i = torch.nonzero(fit)[:, 0][good]
        centre[i], sigma[i], ok[i] = theta[good, :2], sig[good], True
        shape[i], covariance[i] = theta[good], cov[good]
    return DiskFits(centre, ok, sigma, shape, covariance)


def _shape_covariance(theta, res, y, weight, qx, qy, r0, used: torch.Tensor | None,
                      analytic: bool = False) -> torch.Tensor:
    """Covariance (N, 6, 6) of the disk fit's shape parameters at theta: residuals in Poisson
    sigmas, so the inverse normal matrix, scaled up by the misfit where the reduced
    chi-square over the ``used`` pixels exceeds 1 (not scaled: ``used`` None)."""
    jtj, _ = _disk_normal_matrix(theta, res, y, weight, qx, qy, r0, analytic)
    chi2 = torch.ones(len(theta), dtype=theta.dtype, device=theta.device)
    if used is not None:
        dof = used.sum(dim=(1, 2)).to(torch.float64) - (_N_SHAPE + 7)
        chi2 = ((res * res).sum(1) / dof.clamp_min(1)).clamp_min(1.0)
    # a fit that left the finite numbers (a window with no edge to hold it) gets no covariance
    finite = torch.isfinite(jtj).flatten(1).all(dim=1)
    eye = torch.eye(_N_SHAPE, dtype=jtj.dtype, device=jtj.device)
    cov = torch.linalg.pinv(torch.where(finite[:, None, None], jtj, eye)) * chi2[:, None, None]
    return torch.where(finite[:, None, None], cov, torch.full_like(cov, float("nan")))


def _centre_sigma(theta, res, y, weight, qx, qy, r0, used: torch.Tensor | None) -> torch.Tensor:
    """Standard error (N,) px of the disk fit's centre at theta (see :func:`_shape_covariance`)."""
    cov = _shape_covariance(theta, res, y, weight, qx, qy, r0, used)
    return torch.sqrt(torch.diagonal(cov[:, :2, :2], dim1=1, dim2=2).sum(1).clamp_min(0))


#: Fraction of the detector that the inversion about a refined origin must keep for its
#: symmetry score to count (:func:`refine_origin`). The detector-wide search
#: (:func:`symmetry_centre`) asks for 0.4: it takes the best of thousands of points,
#: and small overlaps there give spurious maxima. A single point proposed by the network
#: needs less; with 0.4, a direct beam 38 px off the centre of a 128 px detector (its
#: inversion keeps a third of it) scored -1 and lost to a lattice point 70 px away.
LOCAL_MIN_OVERLAP = 0.15


def _score(num: torch.Tensor, den: torch.Tensor, overlap: torch.Tensor, hw: int, min_overlap: float) -> torch.Tensor:
    return torch.where((overlap > min_overlap * hw) & (den > 1e-12), num / den.clamp_min(1e-12),
                       torch.full_like(num, -1.0))


def _symmetry_at(g: torch.Tensor, m: torch.Tensor, s: torch.Tensor, min_overlap: float = 0.4) -> torch.Tensor:
    """Inversion-symmetry score of each pattern about s / 2 (s: (N, 2) integer samples).

    The same sums as the maps of :func:`symmetry_centre` at one point, taken in pixel
    space: the edge map is inverted through s / 2 by indexing.
    """
    n, h, w = g.shape
    m = m.expand(n, -1, -1)
    mu = (g * m).sum(dim=(1, 2), keepdim=True) / m.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    g0 = (g - mu) * m
    rows = s[:, :1] - torch.arange(h, device=g.device)
    cols = s[:, 1:] - torch.arange(w, device=g.device)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    ar = torch.arange(n, device=g.device)[:, None, None]
    at = (ar, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :])
    m_inv = m[at] * inside
    num = (g0 * g0[at] * inside).sum(dim=(1, 2))
    den = (g0 * g0 * m_inv).sum(dim=(1, 2))
    return _score(num, den, (m * m_inv).sum(dim=(1, 2)), h * w, min_overlap)


def symmetry_centre(x: torch.Tensor, search: float = 2.0, valid: torch.Tensor | None = None,
                    min_overlap: float = 0.4, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The most inversion-symmetric point of each whole pattern.

    The score is the normalised cross-correlation of the mean-free edge map with
    its inversion through a point, over the part of the detector that the
    inversion keeps (1 = perfectly symmetric); points whose inversion keeps less
    than ``min_overlap`` of the detector are not considered. The best point is
    refined as in :func:`refine_origin`.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns.
    search : float
        Half-width of the sub-pixel search around the best sample, pixels.
    valid : torch.Tensor, optional
        As in :func:`refine_origin`.
    min_overlap : float
        Fraction of the detector the inversion must keep.
    allowed : torch.Tensor, optional
        (H, W) or (N, H, W) bool: only centres on these pixels are considered (e.g.
        under a beam stop, which hides the direct beam); all when None.

    Returns
    -------
    origin, score : torch.Tensor
        (N, 2) pixels and (N,) scores in [-1, 1].

    Raises
    ------
    ValueError
        If the patterns or the valid map have the wrong type or shape.
    """
    _check_patterns(x, valid)
    n, _, h, w = x.shape
    if allowed is not None and (tuple(allowed.shape) not in ((h, w), (n, h, w)) or allowed.dtype != torch.bool):
        raise ValueError(f"allowed must be a bool tensor {(h, w)} or {(n, h, w)}, got {allowed.dtype} "
                         f"{tuple(allowed.shape)}")
    maps = _score_maps(x, valid)
    on_grid = None
    if allowed is not None:
        a = allowed if allowed.dim() == 3 else allowed[None]
        on_grid = a.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # s = 2 * centre
    return _best_on_map(x, maps, min_overlap, on_grid, search)


def symmetry_centres(x: torch.Tensor, origin0: torch.Tensor, radius: torch.Tensor, valid: torch.Tensor | None = None,
                     min_overlap: float = 0.4, search: float = 2.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The detector's most symmetric point and the most symmetric point near a first estimate.

    Both come from one inversion-symmetry map (see :func:`symmetry_centre`). The
    detector-wide maximum considers only points whose inversion keeps ``min_overlap``
    of the detector; the one within ``radius`` of ``origin0`` needs only
    LOCAL_MIN_OVERLAP, like :func:`refine_origin`'s score: a direct beam far from the
    detector's centre keeps less of it under inversion (a beam 20% and 25% of the
    detector off centre along the two axes keeps 30%). Where the network is a few
    pixels further off than :func:`refine_origin`'s window reaches, the near search
    still finds the origin; the detector-wide one cannot, and on simulated selected-area
    patterns with the beam that far off it returned a lattice point 120-300 px away.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns.
    origin0 : torch.Tensor
        (N, 2) first estimates (qx0, qy0), pixels.
    radius : torch.Tensor
        (N,) radius of the near search, pixels.
    valid : torch.Tensor, optional
        As in :func:`refine_origin`.
    min_overlap : float
        Fraction of the detector the inversion must keep for the detector-wide maximum.
    search : float
        Half-width of the sub-pixel search around each best sample, pixels.

    Returns
    -------
    origin, score, origin_near, score_near : torch.Tensor
        (N, 2) pixels and (N,) scores in [-1, 1] of the detector-wide and of the near maximum.

    Raises
    ------
    ValueError
        If the patterns, origins, radii or valid map have the wrong type or shape.
    """
    _check_patterns(x, valid, origin0)
    n, _, h, w = x.shape
    if not isinstance(radius, torch.Tensor) or tuple(radius.shape) != (n,):
        raise ValueError(f"radius must be a tensor ({n},), got {tuple(getattr(radius, 'shape', ()))}")
    maps = _score_maps(x, valid)
    half = torch.arange(2 * h, device=x.device, dtype=x.dtype) / 2, torch.arange(2 * w, device=x.device, dtype=x.dtype) / 2
    d2 = ((half[0][None, :, None] - origin0[:, 0, None, None].to(x.dtype)) ** 2
          + (half[1][None, None, :] - origin0[:, 1, None, None].to(x.dtype)) ** 2)
    near = d2 <= radius.to(x.dtype)[:, None, None] ** 2
    origin, score = _best_on_map(x, maps, min_overlap, None, search)
    origin_near, score_near = _best_on_map(x, maps, LOCAL_MIN_OVERLAP, near, search)
    return origin, score, origin_near, score_near


def nearest_symmetric_centre(x: torch.Tensor, origin0: torch.Tensor, allowed: torch.Tensor, min_score: torch.Tensor,
                             valid: torch.Tensor | None = None, min_overlap: float = LOCAL_MIN_OVERLAP,
                             search: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetry centre nearest a first estimate among those that score enough.

    Of the local maxima of the inversion-symmetry map (see :func:`symmetry_centre`) on
    ``allowed`` pixels that score at least ``min_score``, the one nearest ``origin0``,
    refined to sub-pixel as in :func:`refine_origin`. A lattice of equal disks is about as
    symmetric about each of its lattice points: the highest of them need not be the one
    a first estimate points to.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns.
    origin0 : torch.Tensor
        (N, 2) first estimates (qx0, qy0), pixels.
    allowed : torch.Tensor
        (N, H, W) bool: only centres on these pixels are considered.
    min_score : torch.Tensor
        (N,) lowest score a centre may have.
    valid : torch.Tensor, optional
        As in :func:`refine_origin`.
    min_overlap : float
        Fraction of the detector the inversion must keep.
    search : float
        Half-width of the sub-pixel search around the chosen sample, pixels.

    Returns
    -------
    origin, score : torch.Tensor
        (N, 2) pixels and (N,) scores; where no maximum scores ``min_score``, ``origin0``
        and a score of -1.

    Raises
    ------
    ValueError
        If the patterns, origins, allowed map, scores or valid map have the wrong type or shape.
    """
    _check_patterns(x, valid, origin0)
    n, _, h, w = x.shape
    if not isinstance(allowed, torch.Tensor) or tuple(allowed.shape) != (n, h, w) or allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool tensor {(n, h, w)}, got {getattr(allowed, 'dtype', type(allowed))} "
                         f"{tuple(getattr(allowed, 'shape', ()))}")
    if not isinstance(min_score, torch.Tensor) or tuple(min_score.shape) != (n,):
        raise ValueError(f"min_score must be a tensor ({n},), got {tuple(getattr(min_score, 'shape', ()))}")
    num, den, ovl, fine = _score_maps(x, valid)
    score = _score(num, den, ovl.expand_as(num), h * w, min_overlap)
    on_grid = allowed.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # s = 2 * centre
    score = torch.where(on_grid, score, torch.full_like(score, -1.0))
    peak = F.max_pool2d(score[:, None], 3, stride=1, padding=1)[:, 0] == score
    candidate = peak & (score >= min_score.to(score.dtype)[:, None, None])
    rows = torch.arange(2 * h, device=x.device, dtype=x.dtype)[None, :, None]
    cols = torch.arange(2 * w, device=x.device, dtype=x.dtype)[None, None, :]
    s0 = 2 * origin0.to(x.dtype)
    d2 = (rows - s0[:, 0, None, None]) ** 2 + (cols - s0[:, 1, None, None]) ** 2
    d2 = torch.where(candidate, d2, torch.full_like(d2, float("inf"))).reshape(n, -1)
    best = d2.argmin(dim=1)
    found = torch.isfinite(d2.min(dim=1).values)
    s_best = torch.stack([best // (2 * w), best % (2 * w)], dim=1)
    origin = _symmetric_peak(num / den.clamp_min(1e-12), fine, (2 * h, 2 * w), s_best, search)
    at = score.reshape(n, -1).gather(1, best[:, None])[:, 0]
    return (torch.where(found[:, None], origin, origin0.to(origin.dtype)),
            torch.where(found, at, torch.full_like(at, -1.0)))


def _score_maps(x: torch.Tensor, valid: torch.Tensor | None) -> tuple:
    """The (numerator, denominator, overlap) maps of the symmetry score and the fine spectra
    (:func:`_fine_spectra`) of the sub-pixel search, over (2H, 2W)."""
    h, w = x.shape[2:]
    g, m = _masked_edges(x, valid)
    size = (2 * h, 2 * w)
    gf, mf = torch.fft.rfft2(g, s=size), torch.fft.rfft2(m, s=size)
    num, den, ovl = (torch.fft.irfft2(f, s=size) for f in (*_peak_spectra(g, m, gf, mf, size), mf * mf))
    return num, den, ovl, _fine_spectra(x, g, m, mf, size)


def _best_on_map(x: torch.Tensor, maps: tuple, min_overlap: float, on_grid: torch.Tensor | None,
                 search: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel best point (N, 2) and its score (N,) of the :func:`_score_maps`, on ``on_grid`` samples only."""
    n, _, h, w = x.shape
    num, den, ovl, fine = maps
    score = _score(num, den, ovl.expand_as(num), h * w, min_overlap)
    if on_grid is not None:
        score = torch.where(on_grid, score, torch.full_like(score, -1.0))
    best = score.reshape(n, -1).argmax(dim=1)
    s_best = torch.stack([best // (2 * w), best % (2 * w)], dim=1)
    origin = _symmetric_peak(num / den.clamp_min(1e-12), fine, (2 * h, 2 * w), s_best, search)
    return origin, score.reshape(n, -1).max(dim=1).values


#: Gaussian smoothing (pixels) of the square-root counts whose inversion symmetry
#: :func:`intensity_symmetry_centre` measures. Dev scans of amorphous rings behind a beam
#: stop (seeds disjoint from the benchmark's; true origins +- 1 px as first estimates):
#: mean error 0.24, 0.43, 0.16 px at 1e4 counts with 1 px, 0.22, 0.60, 0.26 with 2 px,
#: 0.30, 1.02, 0.62 with 4 px.
INTENSITY_SIGMA = 1.0


def intensity_symmetry_centre(x: torch.Tensor, origin0: torch.Tensor, search: float = 4.0,
                              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Centres of inversion symmetry of the intensity itself, near first estimates.

    For diffuse patterns, the rings of an amorphous film once a beam stop hides the
    bright-field disk, the edge map holds little but speckle and Poisson noise, while
    the smooth radial profile of the rings, all of their counts, is symmetric about
    the origin. The map is the normalised cross-correlation of the mean-free square
    root of the counts (Gaussian-smoothed by INTENSITY_SIGMA px) with its inversion,
    over the pixels that the inversion keeps valid (within 3 px of invalid pixels
    excluded), and its peak within +-``search`` px of ``origin0`` is the centre.
    Inside Bragg disks the intensity is not symmetric (dynamical diffraction), so
    crystals keep :func:`refine_origin`.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) non-negative counts.
    origin0 : torch.Tensor
        (N, 2) first estimates (qx0, qy0), pixels.
    search : float
        Half-width of the search window, pixels.
    valid : torch.Tensor, optional
        (H, W) or (N, H, W) bool, False on a beam stop or dead pixels.

    Returns
    -------
    torch.Tensor
        (N, 2) centres, pixels.

    Raises
    ------
    ValueError
        If the patterns, origins or valid map have the wrong type or shape.
    """
    _check_patterns(x, valid, origin0)
    g, m = _intensity_maps(x, valid)
    return _intensity_peak(g, m, origin0, search)


def intensity_symmetry_map(x: torch.Tensor, valid: torch.Tensor | None = None,
                           min_overlap: float = 0.4) -> torch.Tensor:
    """The inversion symmetry of the intensity about every centre on the half-pixel grid.

    The score of :func:`intensity_symmetry_centre` (normalised cross-correlation of the
    mean-free, smoothed square root of the counts with its inversion, over the pixels
    the inversion keeps valid) at s / 2 for every sample s of the (2H, 2W) grid. Unlike
    the edge map's, it weighs every feature by its intensity: a lattice of Bragg disks
    whose direct beam is hidden is about as symmetric in its edges about another
    lattice point as about its origin, but its envelope (the intensity falling off
    away from the origin) is symmetric about the origin alone.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) non-negative counts.
    valid : torch.Tensor, optional
        (H, W) or (N, H, W) bool, False on a beam stop or dead pixels.
    min_overlap : float
        Fraction of the detector the inversion must keep; -1 where it keeps less.

    Returns
    -------
    torch.Tensor
        (N, 2H, 2W) scores in [-1, 1]; the centre of sample (i, j) is (i / 2, j / 2) px.

    Raises
    ------
    ValueError
        If the patterns or the valid map have the wrong type or shape.
    """
    _check_patterns(x, valid)
    h, w = x.shape[2:]
    g, m = _intensity_maps(x, valid)
    size = (2 * h, 2 * w)
    mf = torch.fft.rfft2(m, s=size)
    num, den = (torch.fft.irfft2(f, s=size) for f in _peak_spectra(g, m, torch.fft.rfft2(g, s=size), mf, size))
    overlap = torch.fft.irfft2(mf * mf, s=size)
    return _score(num, den, overlap.expand_as(num), h * w, min_overlap)


def _intensity_maps(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps g (N, H, W) and weights m whose inversion symmetry :func:`intensity_symmetry_centre`
    scores: the square root of the counts x (N, 1, H, W), smoothed by INTENSITY_SIGMA px,
    masked as in :func:`_masked`. :func:`intensity_symmetry_halves` splits the same maps."""
    return _masked(gaussian_blur(torch.sqrt(x.clamp_min(0)), INTENSITY_SIGMA)[:, 0], valid)


def _noise_variance(g: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Variance (N,) of the counting noise of maps g (N, H, W), weights m, from their asymmetry about s / 2.

    About the centre (``s`` (N, 2) its doubled position, rounded so that the inversion
    q -> s - q maps pixels onto pixels), half the squared difference of g and its
    inversion is noise plus speckle. On square-root counts the noise's variance is
    the same everywhere, while speckle multiplies the intensity, so its share grows
    with the local energy (half the sum of the squares of g and its inversion): the
    intercept of a straight-line fit of the first against the second, over the pixels
    that the inversion keeps, is the noise's variance (clamped at 0).
    """
    n, h, w = g.shape
    si = torch.round(s).long()
    rows = si[:, 0, None, None] - torch.arange(h, device=g.device)[None, :, None]
    cols = si[:, 1, None, None] - torch.arange(w, device=g.device)[None, None, :]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    flat = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).reshape(n, -1)
    mm = m.expand(n, h, w)
    g_inv = torch.gather(g.reshape(n, -1), 1, flat).reshape(n, h, w)
    weight = mm * torch.gather(mm.reshape(n, -1), 1, flat).reshape(n, h, w) * inside
    asym = 0.5 * (g - g_inv) ** 2
    energy = 0.5 * (g**2 + g_inv**2)
    dims = (1, 2)
    s1, se, sd = weight.sum(dims), (weight * energy).sum(dims), (weight * asym).sum(dims)
    see, sed = (weight * energy**2).sum(dims), (weight * energy * asym).sum(dims)
    det = s1 * see - se**2
    intercept = torch.where(det > 0, (see * sd - se * sed) / det.clamp_min(1e-30), torch.zeros_like(det))
    return intercept.clamp_min(0.0)


def _intensity_peak(g: torch.Tensor, m: torch.Tensor, origin0: torch.Tensor, search: float) -> torch.Tensor:
    """Inversion-symmetry centre (N, 2) of the maps g (N, H, W) with weights m, near ``origin0``.

    The score is normalised by the energy of g over the pixels that the inversion keeps
    (see :func:`_peak_spectra`), and counting noise adds its variance times the number
    of those pixels, which changes with the candidate centre (a stop, the detector's
    border): the peak is pulled by an amount set by the pattern's geometry, not by its
    noise draw. On a development scan of rings behind a stop at 1e4 counts (12 x 12,
    no speckle), the errors from two independent noise draws of the same patterns were
    correlated by 0.54. The centre is therefore found twice: the second time, the
    denominator is less the noise's variance (:func:`_noise_variance`, at the first
    centre; at most the symmetric energy per kept pixel there, so that a pattern of
    mostly noise keeps at least half its denominator) times the number of kept pixels
    at every candidate. On that scan the correlation fell to -0.01 and the RMS error
    from 0.155 to 0.12 px. Taking all of the asymmetric energy for noise instead made
    strongly speckled scans worse (speckle grows with the intensity; it is no uniform
    variance). (The edge maps of :func:`refine_origin` showed no such pull on crystal
    scans.)
    """
    size = (2 * g.shape[1], 2 * g.shape[2])
    mf = torch.fft.rfft2(m, s=size)
    num, den = _peak_spectra(g, m, torch.fft.rfft2(g, s=size), mf, size)
    s0 = torch.round(2 * origin0).long()
    s = 2 * _symmetric_peak(_ratio_map((num, den), size), (num, den), size, s0, search)
    kept = mf * mf  # number of pixels the inversion keeps, at every candidate
    kept_s = _dft_grid(kept, s[:, :1], s[:, 1:], size)[:, 0, 0].clamp_min(1.0)
    symmetric = _dft_grid(num, s[:, :1], s[:, 1:], size)[:, 0, 0].clamp_min(0.0)
    variance = torch.minimum(_noise_variance(g, m, s), symmetric / kept_s)
    spec = (num, den - variance[:, None, None] * kept)
    return _symmetric_peak(_ratio_map(spec, size), spec, size, s0, search)


#: Angular sectors (over 180 degrees) that :func:`intensity_symmetry_halves` deals out in
#: turn to its two halves. On 10 development scenes of amorphous rings behind a stop
#: (8 x 8 scans, 1e4, 1e5 and 1e6 counts; speckle contrast 0.04-0.85) the halves' robust
#: difference / 2 was 0.57-1.11 times the full measurement's RMS error (median 0.93;
#: 4 sectors: 0.55-2.86, 16 sectors read low, 0.33-1.15 before the noise correction of
#: :func:`_intensity_peak`).
SYMMETRY_SECTORS = 8


def intensity_symmetry_halves(x: torch.Tensor, origin0: torch.Tensor, search: float = 4.0,
                              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`intensity_symmetry_centre` measured twice, on two disjoint halves of each pattern.

    Pixels are dealt out to the halves by their direction from ``origin0``: the even and
    the odd of SYMMETRY_SECTORS sectors of 180 / SYMMETRY_SECTORS degrees (a direction
    and its opposite share a sector, so each half keeps the inversion pairs whole and
    covers every direction). Speckle grains (1-3 px) and counting noise in different
    sectors are independent, so the halves' centres scatter independently, each with
    twice the variance of the whole pattern's: (half 1 - half 2) / 2 has the variance of
    the whole pattern's error, speckle included (binomial thinning sees only the counts'
    share, the speckle being common to both thinned halves).

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) non-negative counts, prepared as for the full measurement (hot
        pixels removed).
    origin0 : torch.Tensor
        (N, 2) the whole patterns' centres (qx0, qy0), pixels: the sectors' apex and
        the searches' starting points.
    search : float
        Half-width of the search window, pixels.
    valid : torch.Tensor, optional
        (H, W) or (N, H, W) bool, False on a beam stop or dead pixels.

    Returns
    -------
    tuple of torch.Tensor
        The two halves' (N, 2) centres, pixels.

    Raises
    ------
    ValueError
        If the patterns, origins or valid map have the wrong type or shape.
    """
    _check_patterns(x, valid, origin0)
    n, _, h, w = x.shape
    g, m = _intensity_maps(x, valid)
    o = origin0.to(x.dtype)
    qx = torch.arange(h, dtype=x.dtype, device=x.device)[None, :, None] - o[:, 0, None, None]
    qy = torch.arange(w, dtype=x.dtype, device=x.device)[None, None, :] - o[:, 1, None, None]
    sector = torch.floor(torch.remainder(torch.atan2(qy, qx), math.pi) * (SYMMETRY_SECTORS / math.pi)).long()
    even = (sector % 2 == 0).to(x.dtype)
    return tuple(_intensity_peak(g * half, m * half, origin0, search) for half in (even, 1 - even))


#: :func:`log_polar_view` resamples at most this many patterns at a time on the CPU:
#: larger sampling grids outgrow the cache (1024 patterns of 128 px, preprocess's calls
#: in blocks of 256: 12.6 s, in blocks of 64: 4.7 s). The views are the same either way.
CPU_VIEW_CHUNK = 64


def log_polar_view(x: torch.Tensor, origin: torch.Tensor, r_min: float | torch.Tensor,
                   r_max: float | torch.Tensor, n_rho: int = 256, n_phi: int = 90) -> torch.Tensor:
    """Resample patterns on a log-radius x angle grid around their origins.

    Rows are log-spaced radii from ``r_min`` to ``r_max`` (pixels; one value, or (N,)
    tensors for a band of each pattern's own), columns angles in [0, pi), each
    averaging the rays at phi and phi + pi. A radial stretch by s(phi) becomes a shift
    by log s(phi) along the rows.

    Returns
    -------
    torch.Tensor
        (N, n_rho, n_phi) intensities (not normalised).
    """
    n, _, h, w = x.shape
    if x.device.type == "cpu" and n > CPU_VIEW_CHUNK:
        def rows(b, i):
            return b[i:i + CPU_VIEW_CHUNK] if isinstance(b, torch.Tensor) and b.numel() == n else b

        return torch.cat([log_polar_view(x[i:i + CPU_VIEW_CHUNK], origin[i:i + CPU_VIEW_CHUNK], rows(r_min, i),
                                         rows(r_max, i), n_rho, n_phi) for i in range(0, n, CPU_VIEW_CHUNK)])
    t = torch.linspace(0.0, 1.0, n_rho, dtype=x.dtype, device=x.device)
    lo, hi = (torch.log(torch.as_tensor(b, dtype=x.dtype, device=x.device)).reshape(-1, 1) for b in (r_min, r_max))
    r = torch.exp(lo + (hi - lo) * t).expand(n, n_rho)
    phi = torch.arange(n_phi, dtype=x.dtype, device=x.device) * (math.pi / n_phi)
    acc = 0
    for sign in (1.0, -1.0):
        gx = origin[:, 0, None, None] + sign * r[:, :, None] * torch.cos(phi)[None, None, :]
        gy = origin[:, 1, None, None] + sign * r[:, :, None] * torch.sin(phi)[None, None, :]
        grid = torch.stack([2 * gy / max(w - 1, 1) - 1, 2 * gx / max(h - 1, 1) - 1], dim=-1)
        acc = acc + F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return 0.5 * acc[:, 0]


def _shifts(profiles: np.ndarray, reference: np.ndarray, max_shift: int) -> tuple:
    """Sub-bin shift of every column of ``profiles`` against ``reference`` (rows = rho)."""
    n_rho, n_phi = profiles.shape
    lags = np.arange(-max_shift, max_shift + 1)
    ref = reference - reference.mean()
    cc = np.empty((len(lags), n_phi))
    for i, lag in enumerate(lags):
        a = np.roll(profiles, -lag, axis=0)[max_shift:n_rho - max_shift]
        b = ref[max_shift:n_rho - max_shift, None]
        a = a - a.mean(axis=0)
        cc[i] = (a * b).sum(axis=0) / (np.sqrt((a * a).sum(axis=0) * (b * b).sum()) + 1e-12)
    k = np.clip(cc.argmax(axis=0), 1, len(lags) - 2)
    cols = np.arange(n_phi)
    m, c, p = cc[k - 1, cols], cc[k, cols], cc[k + 1, cols]
    den = m - 2 * c + p
    ok = np.abs(den) > 1e-12
    frac = np.divide(0.5 * (m - p), den, out=np.zeros_like(den), where=ok).clip(-0.5, 0.5)
    return lags[k] + frac, c


def _band_radii(n_rho: int, r_min: float, r_max: float) -> np.ndarray:
    """Radii (px) of the ``n_rho`` log-spaced rows of a :func:`log_polar_view` band from
    ``r_min`` to ``r_max``."""
    return np.exp(np.linspace(math.log(r_min), math.log(r_max), n_rho))


def _radial_fall(profile: np.ndarray, r_min: float, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Radii r (px) of the rows of a band (:func:`_band_radii`), and the fall
    -d(profile)/dr of a radial profile over them."""
    r = _band_radii(len(profile), r_min, r_max)
    return r, -np.gradient(profile, r)


#: :func:`bright_field_radius` takes the first fall of the angular-median profile that is
#: at least this fraction of the largest fall (so a ring of touching Bragg disks brighter
#: than the bright-field disk, whose outer edge falls further, does not take its place).
BF_EDGE_MIN_FALL = 0.5

#: ... and only where the plateau inside is at least this many times the lowest level
#: just outside (no plateau: the bright-field disk hidden under a beam stop).
BF_PLATEAU_CONTRAST = 2.0


def bright_field_radius(polar_sum: np.ndarray, r_min: float, r_max: float) -> float | None:
    """Radius of the bright-field disk, measured on the scan's origin-aligned mean.

    The median over angles of the log-polar sum (see :func:`log_polar_view`) keeps
    what is round (the bright-field disk, rings) and drops Bragg disks, which cover
    few angles at any radius. The bright-field edge is the first steep fall of that
    profile from a central plateau.

    Parameters
    ----------
    polar_sum : numpy.ndarray
        (n_rho, n_phi) sum of :func:`log_polar_view` over the scan, rows log-spaced
        from ``r_min`` to ``r_max``.
    r_min, r_max : float
        Radii of the first and last rows, pixels.

    Returns
    -------
    float or None
        The radius of the steepest point of the edge, pixels (to the row spacing,
        not sub-pixel); None where the profile has no plateau that falls by
        BF_PLATEAU_CONTRAST (a disk under a beam stop, a disk smaller than
        ``r_min``, an empty sum).
    """
    profile = np.median(polar_sum, axis=1)
    r, fall = _radial_fall(profile, r_min, r_max)
    if not np.all(np.isfinite(fall)) or fall.max() <= 0:
        return None
    peaks = np.nonzero((fall[1:-1] >= fall[:-2]) & (fall[1:-1] > fall[2:])
                       & (fall[1:-1] >= BF_EDGE_MIN_FALL * fall.max()))[0] + 1
    if not len(peaks):
        return None
    i = int(peaks[0])
    inside = profile[r <= 0.8 * r[i]]
    outside = profile[(r >= r[i]) & (r <= 1.5 * r[i])]
    if not len(inside) or not len(outside) or np.median(inside) <= BF_PLATEAU_CONTRAST * max(outside.min(), 0.0):
        return None
    return float(r[i])


#: :func:`beam_stop_radius`: a centre reading below this fraction of the profile's highest
#: level is dark (a bright-field disk reads at the top) ...
STOP_DARK_FRACTION = 0.25

#: ... and the stop's edge is the first radius at which the profile reads this many times
#: the centre's level, and at least STOP_FLOOR_FRACTION of the highest (the diffuse glow just
#: outside a stop can be under 1% of a bright ring further out).
STOP_RISE = 4.0
STOP_FLOOR_FRACTION = 0.002


def beam_stop_radius(polar_sum: np.ndarray, r_min: float, r_max: float) -> float | None:
    """Radius of a dark centre (a beam stop over the direct beam) on the scan's aligned mean.

    Where a stop hides the bright-field disk, its round edge is the sharpest edge of
    the pattern, and it is not stretched by the projector's ellipse (the stop sits
    in front of the detector): fitted as an ellipse it pulls a/b towards 1. The
    median over angles of the log-polar sum drops the stop's rod (few angles). The
    centre is dark where the profile's first row reads below STOP_DARK_FRACTION of
    its highest level; the stop's edge is then the first radius at which it reads
    STOP_RISE times that first row and at least STOP_FLOOR_FRACTION of the highest.

    Parameters
    ----------
    polar_sum : numpy.ndarray
        (n_rho, n_phi) sum of :func:`log_polar_view` over the scan, rows log-spaced
        from ``r_min`` to ``r_max``.
    r_min, r_max : float
        Radii of the first and last rows, pixels.

    Returns
    -------
    float or None
        The stop's radius, pixels (to the row spacing); None where the centre is not
        dark (a bright-field disk, an empty sum).

    Raises
    ------
    ValueError
        If ``polar_sum`` is not 2-D or the radii are not 0 < r_min < r_max.
    """
    polar_sum = np.asarray(polar_sum, float)
    if polar_sum.ndim != 2 or not 0 < r_min < r_max:
        raise ValueError(f"need a 2-D polar sum and 0 < r_min < r_max, got {polar_sum.shape}, {r_min}, {r_max}")
    profile = np.median(polar_sum, axis=1)
    top = profile.max()
    if not (np.all(np.isfinite(profile)) and top > 0) or profile[0] > STOP_DARK_FRACTION * top:
        return None
    i = int(np.argmax(profile >= max(STOP_RISE * profile[0], STOP_FLOOR_FRACTION * top)))
    return float(_band_radii(len(profile), r_min, r_max)[i]) if i > 0 else None


#: A blur applied after the distortion moves an edge towards its centre of curvature, by
#: more where it is more curved: on an ellipse, at the ends of the major axis. So the
#: stretch fitted on the bright-field edge is (a/b - 1) (1 - EDGE_CURVATURE_GAIN v / r^2),
#: v the variance of that blur (px^2) and r the edge radius (px). Measured with
#: :func:`refine_ellipse` on rendered elliptical disks (a/b = 1.03, r 4-9 px, Gaussian
#: blur 0.3-1.5 px after the stretch, 48 sub-pixel positions, 8x supersampled pixels,
#: v taken as the variance of the edge's gradient peak, which holds the blur, the pixel
#: and the interpolation): 2.3-2.8. A level set of a blurred edge moves by half the blur
#: variance times its curvature, which gives 1.5 on the half-maximum; the gradient peak
#: moves further.
EDGE_CURVATURE_GAIN = 2.5

#: The blur variance after the distortion that every recording has, px^2: the pixel's
#: own area (1/12) and the bilinear interpolation of :func:`log_polar_view` (1/6). The
#: disk's own edge ramp (aperture, coherence, focus) is formed before the projector
#: lenses, is stretched with the disk and moves nothing; a detector's point-spread
#: beyond its pixel would add to this, but the edge's width cannot tell the two apart,
#: and correcting a stretched ramp as if it were such a blur over-corrects (rendered
#: r = 4 px, ramp 2 px: a/b 1.0299 -> 1.032 at 1.03), so it is left uncorrected.
EDGE_RECORDING_VARIANCE = 1.0 / 12.0 + 1.0 / 6.0

#: Smaller edge radii (px) are taken as this one: the law was measured on 4-9 px disks,
#: and on smaller ones it over-corrected (two 20x1 line scans on 64 x 64 px, edges at
#: 2.7 and 3.1 px: a/b errors of 0.004 and 0.008 grew to 0.006 and 0.012; with this floor
#: 0.005 and 0.009).
EDGE_CURVATURE_MIN_RADIUS = 4.0


def edge_curvature_factor(polar_sum: np.ndarray, r_min: float, r_max: float) -> float:
    """How much of the stretch a fit on the bright-field edge sees (see EDGE_CURVATURE_GAIN).

    Parameters
    ----------
    polar_sum : numpy.ndarray
        (n_rho, n_phi) sum of :func:`log_polar_view` over a band that holds one
        dominant falling edge (the bright-field disk's), rows log-spaced from
        ``r_min`` to ``r_max``.
    r_min, r_max : float
        Radii of the first and last rows, pixels.

    Returns
    -------
    float
        1 - EDGE_CURVATURE_GAIN EDGE_RECORDING_VARIANCE / r^2, r (px) at the steepest
        fall of the angle-averaged profile (at least EDGE_CURVATURE_MIN_RADIUS); 1
        where the profile does not fall. Divide the fitted a/b - 1 by it.
    """
    profile = polar_sum.mean(axis=1)
    r, fall = _radial_fall(profile, r_min, r_max)
    if not np.all(np.isfinite(fall)) or fall.max() <= 1e-6 * np.abs(profile).max():
        return 1.0
    radius = max(float(r[int(np.argmax(fall))]), EDGE_CURVATURE_MIN_RADIUS)
    return 1.0 - EDGE_CURVATURE_GAIN * EDGE_RECORDING_VARIANCE / radius**2


#: :func:`_clear_of_neighbours` keeps at least this fraction of the angles; where fewer are
#: clear, the edge is crowded all round and every angle is kept.
MIN_CLEAR_FRACTION = 0.3


def _clear_of_neighbours(z: np.ndarray, limit: float) -> np.ndarray:
    """Angles at which the falling edge of a band's disk is clear of neighbouring disks.

    A Bragg disk that nearly touches the bright-field disk lays its rising edge over
    the bright-field disk's falling one at its own angles, which pulls the fitted edge
    inwards there; the angles at which this happens form no ellipse, so they bias it.
    At such an angle the intensity between the two disks stays above the floor that
    the clear angles fall to.

    Parameters
    ----------
    z : numpy.ndarray
        (n_rho, n_phi) non-negative intensities of the band (rows = log radius,
        columns = angles), holding one dominant falling edge.
    limit : float
        An angle is clear where its lowest intensity beyond the edge (the steepest
        fall of the angular median) is at most the median of those lows plus ``limit``
        times its own step (level inside minus that median).

    Returns
    -------
    numpy.ndarray
        (n_phi,) weights, 1 for clear angles and 0 for the others; all ones where
        fewer than MIN_CLEAR_FRACTION of the angles are clear.
    """
    n_rho, n_phi = z.shape
    edge = int(np.argmax(-np.gradient(np.median(z, axis=1))))
    low = z[edge:].min(axis=0)
    floor = np.median(low)
    inside = z[: max(1, edge // 2)].mean(axis=0)
    clear = low <= floor + limit * np.maximum(inside - floor, 0.0)
    if clear.sum() < MIN_CLEAR_FRACTION * n_phi:
        return np.ones(n_phi)
    return clear.astype(float)


def refine_ellipse(polar_sum: np.ndarray, r_min: float, r_max: float, iterations: int = 3,
                   compress: bool = True, neighbour_floor: float | None = None) -> tuple[float, float, float]:
    """Ellipse (a/b, theta) from the origin-aligned mean in log-polar coordinates.

    Every isotropic feature (the bright-field disk edge, Bragg-disk edges averaged
    over grains, amorphous and polycrystalline rings) is stretched by
    ``s(phi) = 1 / sqrt(cos^2(phi - theta) / k^2 + sin^2(phi - theta))``, k = a/b,
    which in log radius is a shift. The shift of the radial edge profile at each
    angle against the angle-averaged profile is fitted with that exact model
    (robust loss), and the reference is rebuilt from the de-stretched profiles.

    Parameters
    ----------
    polar_sum : numpy.ndarray
        (n_rho, n_phi) sum of :func:`log_polar_view` over the scan.
    r_min, r_max : float
        Radii of the first and last rows, pixels.
    iterations : int
        Reference updates.
    neighbour_floor : float, optional
        Where the band holds a disk's edge: leave out the angles at which the
        intensity beyond the edge does not fall to the floor of the other angles
        (see :func:`_clear_of_neighbours`), i.e. where a neighbouring disk touches or
        overlaps the edge. None keeps every angle.
    compress : bool
        Take the square root of the intensities before the radial gradient, so that
        bright inner rings do not outweigh weaker outer ones (the ones that measure
        the stretch best). Where the band holds the bright-field disk's edge, pass
        False: the square root moves a sharp edge's gradient peak towards its foot by
        an amount that depends on the pixel sampling, which the stretch does not
        scale; on dev scans with the disk edge at 4-13 px this made the mean error of
        a/b 0.0016 (0.0008 without the square root).

    Returns
    -------
    ratio, theta, quality : float
        a/b >= 1, theta in [0, pi), and the median correlation of the angular
        profiles with the reference (near 1 for isotropic content; low values mean
        that the estimate is unreliable, e.g. a single crystal with few rings).
    """
    from scipy.optimize import least_squares

    n_rho, n_phi = polar_sum.shape
    d_rho = (math.log(r_max) - math.log(r_min)) / (n_rho - 1)
    z = np.clip(polar_sum, 0, None)
    edges = np.abs(np.gradient(np.sqrt(z) if compress else z, axis=0))
    phi = np.arange(n_phi) * (math.pi / n_phi)
    rho_idx = np.arange(n_rho, dtype=float)
    keep = np.ones(n_phi) if neighbour_floor is None else _clear_of_neighbours(z, neighbour_floor)

    def model(p):
        eps, th, c = p
        k = 1.0 + eps
        return c - 0.5 * np.log(np.cos(phi - th) ** 2 / k**2 + np.sin(phi - th) ** 2)

    params = np.array([0.0, 0.0, 0.0])
    corr = np.zeros(n_phi)
    for _ in range(max(1, iterations)):
        shift_bins = model(params) / d_rho
        # de-stretch each column by the current model, average -> reference
        aligned = np.stack([np.interp(rho_idx + shift_bins[j], rho_idx, edges[:, j]) for j in range(n_phi)], axis=1)
        reference = aligned.mean(axis=1)
        # the residual shift of each de-stretched column: near zero after the first pass,
        # where the parabola through the correlation peak is unbiased (a full shift of a
        # fraction of a bin is pulled towards the nearest bin, and at a/b = 1.01 the whole
        # stretch is ~0.4 bin)
        max_shift = max(2, int(math.ceil(0.08 / d_rho)))
        residual, corr = _shifts(aligned, reference, max_shift)
        s = shift_bins + residual
        w = np.clip(corr, 0, None) * keep
        a = np.cos(2 * phi)
        b = np.sin(2 * phi)
        design = np.stack([np.ones_like(phi), a, b], axis=1) * w[:, None]
        coef = np.linalg.lstsq(design, s * d_rho * w, rcond=None)[0]
        eps0 = 2 * math.hypot(coef[1], coef[2])
        th0 = 0.5 * math.atan2(coef[2], coef[1])
        fit = least_squares(lambda p: (model(p) - s * d_rho) * w, [eps0, th0, coef[0] - eps0 / 2],
                            loss="soft_l1", f_scale=2 * d_rho)
        params = fit.x
    eps, th = float(params[0]), float(params[1])
    ratio = 1.0 + eps
    if ratio < 1:
        ratio, th = 1.0 / ratio, th + math.pi / 2
    return ratio, th % math.pi, float(np.median(corr))
