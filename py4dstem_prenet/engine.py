"""The per-block computation of PreNet, separate from how blocks are read and scheduled.

:class:`PreNet` turns a block of patterns (N, Q_Nx, Q_Ny), any dtype, into denoised
patterns, origins with their uncertainty, and the ellipse network's (e1, e2). It
holds no state between blocks, so that the same call runs in one process
(:func:`~py4dstem_prenet.preprocess`), on dask workers
(:mod:`~py4dstem_prenet.distributed`) or on a live stream
(:mod:`~py4dstem_prenet.streaming`) with identical results. The ellipse
refinement, which needs the whole scan, is split the same way:
:meth:`PreNet.polar_sums` is the per-block part (sums of log-polar views on fixed
radial bands), :func:`fit_ellipse_bands` the reduction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._validation import check_detector_mask
from .beamstop import detect_beam_stop, origin_behind_stop
from .pretrained import load_model, model_card
from .conventions import e12_to_ellipse
from .refine import (DISK_MODEL_MARGIN, LOCAL_MIN_OVERLAP, beam_stop_radius, bright_field_radius, disk_ellipses,
                     disk_fits, disk_model_centre, edge_blur_bias, edge_curvature_factor, gaussian_blur,
                     intensity_symmetry_centre, intensity_symmetry_halves, intensity_symmetry_map,
                     log_polar_view,
                     nearest_symmetric_centre, refine_ellipse, refine_origin, smallest_eigenvalue, symmetry_centre,
                     symmetry_centres)
from .training import E12_SCALE
from .views import VIEW_SIZE, ellipse_view, full_view, polar_rmax, view_to_detector

__all__ = ["PreNet", "overlay_mask", "ellipse_bands", "add_polar_sums", "fit_ellipse_bands", "ring_scan",
           "disk_offsets", "combine_disk_ellipses", "poisson_noise_fraction", "read_noise_sigma", "dark_level",
           "measurement_block", "equivalent_counts", "detector_gain", "count_quantum", "whole_counts", "LOW_DOSE_COUNTS"]

#: Below this many counts per pattern the edge refinement reads the denoised pattern;
#: above it, the recorded one with hot pixels removed (the denoiser's smoothing then
#: costs more edge precision than its noise reduction brings; measured, see BENCHMARKS.md).
LOW_DOSE_COUNTS = 5e3
#: ... provided its pixel-to-pixel noise is at least this fraction of the Poisson noise
#: of its counts: an image in arbitrary units (normalised, noise-free or averaged) can sum
#: to a few "counts" while being far less noisy than that, and it is refined as recorded.
POISSON_MIN_FRACTION = 0.1

#: Patterns with more counts are returned as recorded by the denoising stage: the
#: denoiser's own error then exceeds the Poisson noise (its MSE / the recording's MSE,
#: measured on simulated crystal scans: 0.8 at 1e5 counts, 1.6 at 2e5, 7.6 at 1e6).
DENOISE_MAX_COUNTS = 2e5

#: Pixel values are clipped to +-this many counts (no detector records more per pixel;
#: it keeps float32 sums and squares of whole patterns finite).
MAX_COUNTS = 1e12

#: The symmetry centre of the whole detector replaces the network's estimate when the
#: inversion-symmetry score near the network's estimate is below this fraction of the
#: best score on the detector. On simulated scans the ratio is >= 0.83 wherever the
#: network is right; on real ring patterns with a beam stop it falls to ~0.15 where
#: the network is wrong, and on scikit-ued's beam-blocked crystals local maxima 1-2.4 px
#: off score 0.50-0.75 of the right centre (0.6 let the last through once the
#: retrained network was 6.5-7.3 px off there; 0.8 changed no origin on 30 dev scans of
#: crystals, bright disks, hot pixels and beam stops at 1e3-1e5 counts).
GLOBAL_SWITCH = 0.8

#: Patterns with fewer counts never switch to the detector-wide symmetry centre (at 1e2
#: counts its map is noise: on simulated scans it was wrong more often than the network).
GLOBAL_MIN_COUNTS = 1e3

#: A centre-network uncertainty above this (in 64-pixel-view pixels; 2.5 detector px at
#: 128 x 128) marks a pattern unlike the training data: on held-out simulated scans the
#: predicted sigma stays below 1.12. Then the detector-wide symmetry centre is preferred
#: when it is UNSURE_MARGIN more symmetric and within 3 sigma.
UNSURE_SIGMA_VIEW = 1.25

#: Half-width of the refinement's search around the network's estimate, pixels. On
#: dev scans of bright Bragg disks at 1e3 counts the network is 3-4 px off on ~4% of
#: the patterns (with a sigma of ~1 px): a +-2 px search left 17 of 432 patterns
#: more than 1 px off, +-4 px left 1, with no loss at other doses.
SEARCH_PX = 4.0

#: Where the network is unsure, the detector-wide symmetry centre must be at least
#: this much more symmetric (score difference) to replace the local centre: on dev
#: scans with hot pixels, equal-looking lattice-translated centres 16 px away won
#: by 0.003-0.04 (at a margin of 0.1: 14 instead of 19 of 300 patterns off by > 1
#: px at 1e3 counts, 0 instead of 1 at 1e5; the scikit-ued cases still pass).
UNSURE_MARGIN = 0.1

#: Where the network is unsure and a beam stop is found but the origin is not under it,
#: the origin behind the stop (see :mod:`~py4dstem_prenet.beamstop`) replaces it when
#: the diffuse background is this much better explained (adjusted R^2) as a function of
#: the distance to it. A stop is found only where the pattern is centred under it
#: (:func:`~py4dstem_prenet.beamstop.detect_beam_stop`), so the margin is for the fit's
#: noise alone: scikit-ued's test.mib (direct beam under a stop at the detector edge),
#: with the stop found on it as the mask, 0.86 against 0.75 at the symmetric point
#: found outside it (0.86 against 0.40 at the unmasked origin; the margin was 0.2 when
#: stop-like dark regions of simulated rings and disks were taken for stops).
STOP_MARGIN = 0.05

#: Masked pixels (a given mask) deeper than this many pixels inside it form a beam
#: stop's core (rods, lines, dead columns and annotation strokes are thinner).
STOP_CORE_ERODE = 3

#: Where a given mask has a stop core at least as large as a disk of half the bright-field
#: radius and the origin found lies outside it, the most symmetric point under the stop
#: (which hides the direct beam) replaces it when it scores at least this fraction of the
#: origin's score: with the bright-field disk hidden, a crystal's Bragg lattice is about as
#: symmetric about other lattice points (a dev scan: 0.26 at a point 37 px away, 0.15 at
#: the true origin under the stop). Not where the intensity is clearly more symmetric
#: about the origin found (INTENSITY_MARGIN): a stop off the direct beam leaves part of
#: the bright-field disk in view and the origin outside the stop's region (a dev scan at
#: 1e3 counts, the stop half a tip radius off the beam: every origin of its summed scan
#: tiles, 0.1 px off, moved 31.6 px onto the stop, and the whole scan followed).
STOP_PRIOR_FRACTION = 0.5

#: An edge-symmetry origin whose local intensity (Gaussian-smoothed over a tenth of the
#: bright-field radius) is below this fraction of the pattern's bright disks (99.5th
#: percentile of the same smoothing) lies in a gap between disks: a lattice of equal disks
#: is as inversion-symmetric about its half-lattice points, in the gaps, as about the
#: origin. On dev single crystal patterns with a flat envelope (256 px, 24 per dose) 2
#: at 1e4 counts and 1 at 1e5 landed on such points, 28-33 px off, at 0.04-0.09 and the
#: true origin at 0.77-0.78 of that level.
GAP_FRACTION = 0.25

#: A gap origin gives way to the symmetry centre inside a disk nearest the network's
#: estimate, within the near search (the network's 3 sigma), that scores at least this
#: fraction of its score (:func:`~py4dstem_prenet.refine.nearest_symmetric_centre`). The
#: dev cases above: 0.96 and 0.99; a dense dev lattice of equal disks (8 x 8, 1e4
#: counts), where the half-lattice points won on 31 of 64 patterns: 0.86 (at 0.9, 7
#: stayed off, at 0.8 none). Under a beam stop, which is dark too, the best point of a disk
#: scored at most 0.36 on dev patterns (rings, polycrystals and crystals behind unmasked
#: stops, 1e4-1e6 counts), and the origin stays.
GAP_TIE = 0.8

#: Name of the ellipse band summed over isotropic patterns only.
ISOTROPIC = "isotropic patterns"

#: A pattern counts as isotropic (rings, no Bragg disks) when the angular variation of
#: its log-polar view outside the bright-field disk is below (1 - this) of its variance.
ISOTROPY_MIN = 0.6

#: The isotropic-pattern band is used only when at most this fraction of the patterns
#: is isotropic (a scan that mixes rings with Bragg disks).
MIXED_MAX_FRACTION = 0.8

#: The bright-field band's fit leaves out the angles at which a neighbouring Bragg disk
#: touches the edge (see :func:`~py4dstem_prenet.refine.refine_ellipse`,
#: ``neighbour_floor``): where the intensity between the disks stays this fraction of the
#: step above the floor of the clear angles. On 12 development crystal scans at 1e4 counts
#: (true origins) two had disks 2.1 radii apart: their e-vector errors fell from 0.0093 and
#: 0.0027 to 0.0017 and 0.0014 (noise-free: 0.0071 -> 0.0011 worst), the ten others did
#: not change; 0.05 left half the bias, 0.01 gave the same as 0.02. Through preprocess (its
#: own origins and band) on 30 crystal and mixed dev scans, five changed, all for the
#: better: 0.0026-0.0106 to 0.0010-0.0024 (the two worst had disks 2.1 radii apart).
BF_NEIGHBOUR_FLOOR = 0.02

#: Fit quality each ellipse band needs to be used (see :func:`fit_ellipse_bands`).
_MIN_QUALITY = {ISOTROPIC: 0.9, "full": 0.97, "bright-field edge": 0.97}

#: Below this quality no band holds an isotropic feature (Poisson noise alone scored 0.74
#: and gave a/b = 1.54; the bands chosen on 20 dev scans of rings, crystals and strain
#: scans scored 0.95-1.0): :func:`fit_ellipse_bands` then returns None and ``preprocess``
#: keeps the network's ellipse.
ELLIPSE_QUALITY_FLOOR = 0.8

#: A pattern is examined for burned-in annotations (see :func:`overlay_mask`) when at
#: least this many of its pixels share its maximum value.
OVERLAY_MIN_PIXELS = 10

#: Smallest connected group of maximum-valued pixels taken for an annotation stroke.
OVERLAY_MIN_STROKE = 5

#: A group of maximum-valued pixels that holds a square of this side is a saturated
#: blob (direct beam, Bragg disk), not an annotation stroke.
_BLOB_SQUARE = 5

#: Largest standard error (px) of the bright-field disk fit's centre
#: (:func:`~py4dstem_prenet.refine.disk_model_centre`) at which the engine takes the
#: edge-symmetry centre's bias from that fit instead of the edge-blur estimate.
DISK_MODEL_MAX_SIGMA = 0.05

#: Smallest bias (px) taken from that fit: its own error on noise-free simulated
#: disks is about 0.01 px (an edge profile that is not its error function, on small
#: disks with wide edges); below this the edge-blur estimate is kept.
DISK_MODEL_MIN_BIAS = 0.03

#: ... and in standard errors of the fit's centre.
DISK_MODEL_MIN_Z = 3.0

#: Patterns per network call on a CPU: small chunks keep the activations in cache
#: (channels-last, 2 cores, 128 x 128: the denoiser runs 107 patterns/s in chunks of
#: 8 and 64 in chunks of 64; the ResNets are fastest at 32). A GPU takes the block.
_CPU_CHUNK = {"denoiser": 8, "centre": 32, "ellipse": 32}

#: Angular and log-radial samples of the ellipse refinement's log-polar views.
_N_RHO, _N_PHI = 256, 180


def _pattern_stack(block) -> np.ndarray:
    """``block`` as an (N, H, W) array; ValueError otherwise."""
    block = np.asarray(block)
    if block.ndim != 3:
        raise ValueError(f"block must be (N, H, W), got shape {block.shape}")
    return block


#: A pattern shows a read-noise floor (a dark-subtracted integrating detector: pixels
#: without electrons read as Gaussian noise about 0) where at least this fraction of its
#: pixels is negative; fewer negative pixels (a few dead or over-subtracted ones) are
#: clipped at 0 and nothing else.
READ_NOISE_MIN_FRACTION = 0.01

#: The origin is measured on the counts above this many read-noise standard deviations
#: (:func:`read_noise_sigma`). Clipped at 0, the noise of the empty detector is a
#: rectified floor of 0.4 sigma per pixel: over a 128 x 128 detector with sigma of one
#: electron it adds ~6500 counts that carry no edge. On simulated crystal scans (8 x 8,
#: dev seeds) with a read noise of 1 electron per pixel (gain 1, sigma 1 count; gain 20,
#: sigma 20) at 1e3-1e4 electrons per pattern, the refinement took the detector's
#: symmetry centre for the origin (mean error 3-16 px, 78-100% of the patterns more than
#: 1 px off); see BENCHMARKS.md for the figures after subtracting the floor.
READ_NOISE_SIGMAS = 2.0


#: A pattern with negative pixels carries a signed offset (a signed integer type, an
#: over-subtracted dark reference), which :func:`_clean_block` shifts away, where its
#: median lies below 0 by more than this many widths of the lower half of its values
#: (median - 16th percentile, sigma for Gaussian noise). Read noise about a
#: dark-subtracted zero does not: where most pixels see no electron (low doses) the
#: median is 0 to within ~1% of sigma, and negative half the time. Taken for an offset
#: (the rule was a negative median), such a pattern lost its read-noise floor and was
#: lifted by its most negative pixel (~4 sigma) everywhere: on development crystal scans
#: at 100 electrons per pattern (10 counts per electron, read noise of one electron) 19%
#: of the patterns then read as 6e5 electrons.
SIGNED_OFFSET_WIDTHS = 0.5


def _signed_offset(flat: np.ndarray) -> np.ndarray:
    """(N,) bool: which of the patterns (N, P) (finite pixel values) carry a signed offset."""
    p16, p50 = np.percentile(flat, (16, 50), axis=1)
    return p50 < -SIGNED_OFFSET_WIDTHS * (p50 - p16)


def read_noise_sigma(block: np.ndarray) -> np.ndarray:
    """Standard deviation of each pattern's read noise about a dark-subtracted zero, counts.

    A pixel that no electron reached reads the detector's read noise, Gaussian about 0
    once the dark reference is subtracted, so half of such pixels are negative, and
    the mean square of the negative values is the noise variance (the half-normal
    distribution's second moment). Counting detectors, and integrating ones whose
    dark level was not subtracted, have no negative pixels: their sigma is 0.

    Parameters
    ----------
    block : numpy.ndarray
        (N, H, W) patterns, any numeric dtype (NaN/Inf pixels are ignored).

    Returns
    -------
    numpy.ndarray
        (N,) float64 sigma in counts; 0 where fewer than READ_NOISE_MIN_FRACTION of the
        pixels are negative, or where the pattern carries a signed offset (its median
        below 0 by more than SIGNED_OFFSET_WIDTHS noise widths, which
        :func:`_clean_block` shifts away instead).

    Raises
    ------
    ValueError
        If ``block`` is not 3D.
    """
    block = _pattern_stack(block)
    sigma = np.zeros(len(block))
    if block.dtype == np.bool_ or np.issubdtype(block.dtype, np.unsignedinteger) or block.size == 0:
        return sigma
    flat = block.reshape(len(block), -1)
    negative = np.flatnonzero(np.fmin.reduce(flat, axis=1) < 0)  # fmin skips NaN
    for i in negative:
        v = flat[i][np.isfinite(flat[i])].astype(np.float64)
        below = v[v < 0]
        if len(below) >= READ_NOISE_MIN_FRACTION * flat.shape[1] and not _signed_offset(v[None])[0]:
            sigma[i] = math.sqrt(float(np.mean(below * below)))
    return sigma


#: A pattern carries an unsubtracted dark level (a pedestal) where its median pixel sits
#: more than this many times the width of the lower half of its pixel values
#: (median - 16th percentile) above 0 ...
PEDESTAL_MIN_SIGMAS = 3.0

#: ... and that width squared is below this fraction of the median: far less spread than
#: counts of that level would have (Poisson: variance = level x gain, gain >= ~0.5), so it
#: is read noise about a constant, not a diffuse background of electrons.
PEDESTAL_MAX_VARIANCE_FRACTION = 0.25


def dark_level(block: np.ndarray) -> np.ndarray:
    """Unsubtracted dark level (pedestal) of each pattern, counts; 0 where there is none.

    Most pixels of a diffraction pattern see few or no electrons, so on an integrating
    detector whose dark reference was not subtracted the median pixel is the dark level
    plus read noise, and the lower half of the pixel values is read noise about it (its
    width, median - 16th percentile, is sigma). Where the median is more than
    PEDESTAL_MIN_SIGMAS sigma above 0 and sigma^2 below PEDESTAL_MAX_VARIANCE_FRACTION of
    it (counts of that level would scatter by their Poisson noise), the median is the
    pedestal. Counting data (median 0, or a diffuse background with Poisson scatter) and
    dark-subtracted data (pixels at or below 0) have none. On 8 x 8 development crystal
    scans with a pedestal of 100 counts under read noise of 3 (gain 1), 3 of 4 scans were
    13-14 px off before the pedestal was measured (see :func:`read_noise_sigma`, which
    then measures the noise).

    Parameters
    ----------
    block : numpy.ndarray
        (N, H, W) patterns, any numeric dtype (NaN/Inf pixels are ignored).

    Returns
    -------
    numpy.ndarray
        (N,) float64 dark level, counts.

    Raises
    ------
    ValueError
        If ``block`` is not 3D.
    """
    block = _pattern_stack(block)
    level = np.zeros(len(block))
    if block.dtype == np.bool_ or block.size == 0:
        return level
    flat = block.reshape(len(block), -1)
    # a pedestal lifts every pixel: patterns with a pixel at or below 0 (counting data) have none
    for i in np.flatnonzero(np.fmin.reduce(flat, axis=1) > 0):
        v = flat[i]
        if not np.issubdtype(v.dtype, np.integer):
            v = v[np.isfinite(v)]
        if len(v) == 0:
            continue
        p16, p50 = np.percentile(v, (16, 50))
        width = p50 - p16
        if 0 < width < p50 / PEDESTAL_MIN_SIGMAS and width**2 < PEDESTAL_MAX_VARIANCE_FRACTION * p50:
            level[i] = float(p50)
    return level


def _detector_floor(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The :func:`dark_level` (N,) of ``block``, ``block`` less it (float; ``block`` itself
    where no pattern has one), and the :func:`read_noise_sigma` (N,) of that."""
    level = dark_level(block)
    dark = block if not np.any(level > 0) else np.asarray(block, np.float64) - level[:, None, None]
    return level, dark, read_noise_sigma(dark)


#: A pattern holds whole counts stored in units of q (a counting detector's counts
#: normalised, or scaled by a constant) where its non-zero pixels that are not whole
#: multiples of q (hot pixels, stuck values) are at most this fraction of its pixels ...
QUANTUM_OFF_GRID = 0.01
#: ... and at most this fraction of its non-zero pixels (a low-dose pattern's few lit
#: pixels next to a few hot ones, yet not a continuous one's few near-multiples) ...
QUANTUM_OFF_GRID_LIT = 0.5
#: ... q being the smallest non-zero value divided by 1 to this many (a pattern whose
#: dimmest pixels hold several counts) ...
QUANTUM_DIVISORS = 4
#: ... the pattern having at least this many non-zero pixels ...
QUANTUM_MIN_PIXELS = 16
#: ... and none of them more than this many units (float32 values are all whole multiples
#: of a small enough power of two: a pattern shifted to a minimum of 0 had its smallest
#: value 2^-19 apart from it).
QUANTUM_MAX_COUNTS = 2**20
#: Continuous data are read as at most this many equivalent counts per pattern (a
#: noise-free pattern shows almost no pixel noise: simulated 128 x 128 patterns read
#: 5e5 (polycrystalline), 2e7 (amorphous) and this bound (crystals)).
QUANTUM_MAX_EQUIVALENT = 1e9


def whole_counts(n: np.ndarray) -> np.ndarray:
    """True where values n >= 0 (counts) are whole numbers to within 1e-4 and the
    rounding of float32 data divided by a float32 unit (3e-7 of the value)."""
    n = np.asarray(n, np.float64)
    return np.abs(n - np.round(n)) <= 1e-4 + 3e-7 * n


def count_quantum(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The value of one count in each pattern: the data's unit of counting, where it shows.

    Counting detectors record whole electrons, but the data reaching a notebook may be
    those counts in other units: normalised (divided by the sum, the maximum or the
    dose) or multiplied by a constant. The dose thresholds (LOW_DOSE_COUNTS,
    GLOBAL_MIN_COUNTS, DENOISE_MAX_COUNTS, pooling) and the Poisson weights of the
    refinement are in electrons; such patterns are read as their counts divided by q,
    the value of one count: the largest unit of which the non-zero pixels are whole
    multiples (:func:`whole_counts`; but for at most QUANTUM_OFF_GRID of the pixels
    and QUANTUM_OFF_GRID_LIT of the non-zero ones: hot pixels, burned-in labels,
    interpolated dead pixels), among 1, the greatest common divisor of the 8 smallest
    whole values that occur more than once (stray values are bright or occur once)
    and each of the 3 smallest non-zero values (the smallest may be a stray) divided
    by 1 to QUANTUM_DIVISORS (a pattern whose dimmest pixels hold several counts): 1
    for counts (even with a stray value below one count, of which they are also
    multiples), 50 for counts times 50, 1e-3 for counts divided by 1000. Continuous values find
    no unit: where their pixel noise per unit of intensity g (:func:`_noise_per_count`:
    robust, so that edges do not count) is below that of counts (g < 1: a noise-free
    simulation, an average of frames, counts in units smaller than one), q = g, the
    value of one equivalent count (at most QUANTUM_MAX_EQUIVALENT of them per
    pattern); otherwise (an integrating detector, flat-field-corrected counts) q = 1,
    i.e. they are read as counts.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        (N, 1, H, W) or (N, H, W) cleaned patterns (finite, >= 0).

    Returns
    -------
    numpy.ndarray
        (N,) float64 q > 0, data units per count.

    Raises
    ------
    ValueError
        If ``x`` is not 3D or 4D with one channel, or holds negative or non-finite values.
    """
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"patterns must be (N, H, W) or (N, 1, H, W), got shape {a.shape}")
    flat = a.reshape(len(a), -1)
    if flat.size and not (np.isfinite(flat).all() and flat.min() >= 0):
        raise ValueError("patterns must be finite and >= 0 (cleaned)")
    q = np.ones(len(flat))
    for i, row in enumerate(flat):
        v = row[row > 0].astype(np.float64)
        if len(v) < QUANTUM_MIN_PIXELS or v.min() == 1.0:
            continue  # too few values to tell, or whole counts (their dimmest pixels hold one)
        units = []  # every unit of which the pixels are whole multiples; the largest is the count
        if _on_grid(v, 1.0, len(row)):  # whole numbers: 1, or the common divisor of the dimmest repeated ones
            units.append(1.0)
            whole = whole_counts(v) & (v > 0.5)
            values, seen = np.unique(np.round(v[whole]).astype(np.int64), return_counts=True)
            g = float(np.gcd.reduce(values[seen > 1][:8])) if np.any(seen > 1) else 1.0
            if g > 1 and _on_grid(v, g, len(row)):
                units.append(g)
        for base, k in itertools.product(np.unique(v)[:3], range(1, QUANTUM_DIVISORS + 1)):
            if base / k > max(units, default=0.0) and _on_grid(v, base / k, len(row)):
                units.append(base / k)
        if units:
            q[i] = max(units)
        else:  # continuous: less noisy than counts at face value?
            q[i] = min(1.0, max(_noise_per_count(a[i]), float(v.sum()) / QUANTUM_MAX_EQUIVALENT))
    return q


def _on_grid(v: np.ndarray, unit: float, n_pixels: int) -> bool:
    """Whether a pattern of ``n_pixels`` whose non-zero pixels are ``v`` is on a grid of whole
    counts of ``unit`` (see :func:`count_quantum`)."""
    n = v / unit
    if n.max() > QUANTUM_MAX_COUNTS:
        return False
    off = len(v) - np.count_nonzero(whole_counts(n) & (n > 0.5))
    return off <= QUANTUM_OFF_GRID * n_pixels and off <= QUANTUM_OFF_GRID_LIT * len(v)


def _noise_per_count(x: np.ndarray) -> float:
    """Pixel noise variance per unit of intensity of a pattern (H, W) >= 0: the median over its
    brighter half of r^2 / (1.25 m), r the residual against the mean m of the four nearest
    neighbours, / 0.4549 (the median of a chi-square of one degree of freedom). Poisson
    counts give ~1, counts times g give g; edges, a minority of the pixels, do not count,
    so a noise-free pattern gives ~0. inf where fewer than 2 QUANTUM_MIN_PIXELS pixels
    are lit."""
    x = x.astype(np.float64)
    near = _four_neighbour_mean(x)
    lit = near > 0
    if np.count_nonzero(lit) < 2 * QUANTUM_MIN_PIXELS:
        return math.inf
    bright = lit & (near >= np.median(near[lit]))
    z2 = (x[1:-1, 1:-1][bright] - near[bright]) ** 2 / (1.25 * near[bright])
    return float(np.median(z2) / 0.4549)


def _in_counts(x: torch.Tensor, quantum: np.ndarray) -> torch.Tensor:
    """Patterns (N, 1, H, W) divided by their :func:`count_quantum` (N,); ``x`` itself where all are 1."""
    if np.all(quantum == 1.0):
        return x
    return x / torch.from_numpy(quantum).to(x.device, x.dtype)[:, None, None, None]


def _counting_quantum(x: torch.Tensor, sigma: np.ndarray) -> np.ndarray:
    """:func:`count_quantum` of cleaned patterns x without a read-noise floor (``sigma`` (N,) 0); 1
    where one shows (an integrating detector: :func:`equivalent_counts` finds its gain)."""
    quantum = np.ones(len(sigma))
    counting = np.flatnonzero(np.asarray(sigma) == 0)
    if len(counting):
        quantum[counting] = count_quantum(x[torch.from_numpy(counting).to(x.device)])
    return quantum


def _above_read_noise(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Cleaned patterns (N, 1, H, W) less READ_NOISE_SIGMAS x their read noise ``sigma`` (N,), clipped at 0."""
    if not np.any(sigma > 0):
        return x
    floor = torch.from_numpy(READ_NOISE_SIGMAS * sigma).to(x.device, x.dtype)[:, None, None, None]
    return (x - floor).clamp_min(0)


def equivalent_counts(block: np.ndarray, x: torch.Tensor, sigma: np.ndarray,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of each pattern, in electrons where a read-noise floor shows an integrating detector.

    The dose thresholds (LOW_DOSE_COUNTS, GLOBAL_MIN_COUNTS, and the pooling and
    tiling of :func:`~py4dstem_prenet.preprocess.preprocess`) are numbers of
    electrons, the counts of a counting detector, whose counts are returned as they are
    (the sum of ``x``). An integrating detector records ``gain`` counts per electron
    plus read noise ``sigma``; where ``sigma`` > 0 the sum of ``x`` (the counts above
    the floor: what the refinement sees) is divided by the gain, found from the
    pixel-to-pixel noise variance V of the recorded counts (as in
    :func:`poisson_noise_fraction`), whose sum S the noise does not bias: V = gain * S
    + pixels * sigma^2 (edges add to V, so the gain is an upper bound and the electrons
    a lower one). Dividing S instead (all the electrons, not those above the floor)
    left one of four development scans at 1e4 electrons and read noise of 3 (gain 1)
    with a mean error of 0.50 px instead of 0.15. On 12 x 12 development crystal scans
    at 1e3 electrons per pattern (10 counts per electron, read noise of one electron),
    1e4 counts each, one of four scans put 59% of its patterns more than 1 px off (the
    detector's symmetry centre, which needs GLOBAL_MIN_COUNTS); read as ~1e3 electrons,
    those patterns are pooled over 3 x 3 positions and none is.

    Parameters
    ----------
    block : numpy.ndarray
        (N, H, W) recorded patterns.
    x : torch.Tensor
        (N, 1, H, W) their counts above the read-noise floor (:func:`measurement_block`).
    sigma : numpy.ndarray
        (N,) read noise of the patterns, counts (:func:`read_noise_sigma`).
    valid : torch.Tensor, optional
        (H, W) or (N, H, W) bool, False on masked pixels (left out of S and V).

    Returns
    -------
    torch.Tensor
        (N,) float64 counts on the host.

    Raises
    ------
    ValueError
        If ``block`` is not (N, H, W), or ``x`` and ``sigma`` do not match it.
    """
    shape = np.shape(block)
    if len(shape) != 3 or tuple(x.shape) != (shape[0], 1, *shape[1:]) or np.shape(sigma) != (shape[0],):
        raise ValueError(f"block must be (N, H, W) with x (N, 1, H, W) and sigma (N,), got {shape}, "
                         f"{tuple(x.shape)} and {np.shape(sigma)}")
    counts = x.sum(dim=(1, 2, 3)).double().cpu()
    integrating = np.flatnonzero(np.asarray(sigma) > 0)
    if len(integrating) == 0:
        return counts
    v = None if valid is None else valid.cpu().numpy()
    gain = detector_gain(np.asarray(block)[integrating], np.asarray(sigma)[integrating],
                         None if v is None else (v if v.ndim == 2 else v[integrating]))
    above = counts[torch.from_numpy(integrating)].numpy()
    electrons = np.where(gain > 0, above / np.maximum(gain, 1e-12), 0.0)
    counts[torch.from_numpy(integrating)] = torch.from_numpy(electrons)
    return counts


def detector_gain(block: np.ndarray, sigma: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Counts per electron of each pattern of an integrating detector (an upper bound).

    The pixel-to-pixel noise variance V of the recorded counts (residual against the
    four nearest neighbours, :func:`poisson_noise_fraction`) is gain * S + pixels *
    sigma^2, with S the counts' sum (which the noise does not bias) and ``sigma`` the
    read noise (:func:`read_noise_sigma`). Edges add to V, so the gain is an upper
    bound.

    Parameters
    ----------
    block : numpy.ndarray
        (N, H, W) recorded patterns (dark level subtracted; NaN/Inf pixels count as 0).
    sigma : numpy.ndarray
        (N,) their read noise, counts.
    valid : numpy.ndarray, optional
        (H, W) or (N, H, W) bool, False on masked pixels (left out of S and V).

    Returns
    -------
    numpy.ndarray
        (N,) gains, counts per electron; 0 where the patterns hold no signal or the
        noise is not above the read noise's.
    """
    raw = np.asarray(block).astype(np.float64)
    raw[~np.isfinite(raw)] = 0.0
    keep = np.ones(raw.shape, bool)
    if valid is not None:
        keep &= np.asarray(valid, bool)
    raw *= keep
    both = keep[:, 1:-1, 1:-1]
    var = _neighbour_noise_variance(torch.from_numpy(raw)[:, None], torch.from_numpy(both)[:, None]).numpy()
    signal = (raw[:, 1:-1, 1:-1] * both).sum(axis=(1, 2))
    gain = (var - both.sum(axis=(1, 2)) * np.asarray(sigma, np.float64) ** 2) / np.maximum(signal, 1e-12)
    return np.where((signal > 0) & (gain > 0), gain, 0.0)


def measurement_block(block: np.ndarray) -> torch.Tensor:
    """(N, H, W) patterns -> (N, 1, H, W) float32 counts on which origins are measured.

    The cleaned patterns (:func:`_clean_block`) less READ_NOISE_SIGMAS times their
    read noise (:func:`read_noise_sigma`), clipped at 0; counting data divided by the
    value of one count (:func:`count_quantum`; 1 for whole counts, which stay unchanged).

    Raises
    ------
    ValueError
        If ``block`` is not 3D.
    """
    _, dark, sigma = _detector_floor(block)
    x = _clean_block(dark)
    return _above_read_noise(_in_counts(x, _counting_quantum(x, sigma)), sigma)


def _clean_block(block: np.ndarray) -> torch.Tensor:
    """(N, H, W) array of any numeric dtype -> (N, 1, H, W) float32 counts >= 0.

    NaN/Inf pixels become 0 and values beyond +-MAX_COUNTS are clipped there (so
    that sums and squares stay finite in float32). A pattern whose median lies below
    0 by more than SIGNED_OFFSET_WIDTHS widths of the lower half of its values carries
    a signed offset (a signed integer type, an over-subtracted dark reference): it is
    shifted so that its minimum is 0. Otherwise negative pixels
    (read noise around a dark-subtracted zero) are clipped at 0.
    """
    block = np.asarray(block)
    if block.dtype == np.bool_ or (np.issubdtype(block.dtype, np.unsignedinteger) and block.dtype.itemsize <= 2):
        return torch.from_numpy(block.astype(np.float32))[:, None]  # exact, finite and >= 0
    # float32 holds MAX_COUNTS, so inputs no wider than float32 are cleaned in float32
    x = block.astype(np.float32 if block.dtype.itemsize <= 4 else np.float64)
    if not np.isfinite(x).all():
        x = np.where(np.isfinite(x), x, 0.0)
    x = np.clip(x, -MAX_COUNTS, MAX_COUNTS).astype(np.float32, copy=False)
    flat = x.reshape(len(x), -1)
    negative = np.flatnonzero(flat.min(axis=1) < 0) if x.size else np.zeros(0, int)
    if len(negative):
        offset = negative[_signed_offset(flat[negative])]
        x[offset] -= x[offset].min(axis=(1, 2), keepdims=True)
        np.clip(x, 0, None, out=x)
    return torch.from_numpy(x)[:, None]


def overlay_mask(x: torch.Tensor) -> torch.Tensor | None:
    """Burned-in annotations (text, scale bars) of exported images, per pattern.

    Annotations are drawn in one colour, the image's maximum: pixels at exactly the
    maximum that form thin strokes (connected components of at least
    OVERLAY_MIN_STROKE pixels with no _BLOB_SQUARE-wide square of them) are annotation,
    dilated by 1 px for antialiasing. A saturated direct beam or Bragg disk at the
    maximum is a compact blob and is kept, a few brightest pixels (a peak, a hot
    pixel) are left to the hot-pixel filter, and patterns with fewer than
    OVERLAY_MIN_PIXELS pixels at their maximum are not examined.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) cleaned patterns.

    Returns
    -------
    torch.Tensor or None
        (N, H, W) bool, True on annotation pixels; None when no pattern has any.
    """
    from scipy import ndimage

    top = x == x.amax(dim=(2, 3), keepdim=True)
    top &= x > 0
    candidates = torch.nonzero(top.sum(dim=(1, 2, 3)) >= OVERLAY_MIN_PIXELS)[:, 0]
    if not len(candidates):
        return None
    m = top[candidates.to(top.device), 0].cpu().numpy()
    # 8-connected components within each pattern (none across patterns); the maxima are
    # few, so the components are measured at their pixels rather than over the images
    within = np.zeros((3, 3, 3), bool)
    within[1] = True
    labels, n = ndimage.label(m, structure=within)
    k, i, j = np.nonzero(m)
    lab = labels[k, i, j]
    size = np.bincount(lab, minlength=n + 1)
    stroke = size >= OVERLAY_MIN_STROKE
    stroke[0] = False
    # a component holding a _BLOB_SQUARE-wide square of maxima is a blob, not a stroke
    big = np.unique(k[size[lab] >= _BLOB_SQUARE ** 2])
    if len(big):
        inside = ndimage.binary_erosion(m[big], np.ones((1, _BLOB_SQUARE, _BLOB_SQUARE)))
        stroke[labels[big][inside]] = False
    on = stroke[lab]
    if not on.any():
        return None
    drawn = np.unique(k[on])
    strokes = np.zeros((len(drawn),) + m.shape[1:], bool)
    strokes[np.searchsorted(drawn, k[on]), i[on], j[on]] = True
    out = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.bool)
    out[candidates.cpu()[drawn]] = torch.from_numpy(ndimage.binary_dilation(strokes, np.ones((1, 3, 3))))
    return out


def _masked_block(block: np.ndarray, mask: np.ndarray | None, dev: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, np.ndarray, np.ndarray]:
    """Cleaned block on ``dev`` in counts with masked pixels set to 0, its measurement copy, the valid
    pixels, the counts, the detector floor and the value of one count.

    The cleaned block is taken less any unsubtracted dark level (:func:`dark_level`), so
    that the networks see what they were trained on: on a dev crystal scan (8 x 8, 1e4
    electrons, 10 counts per electron, read noise of one electron) with a pedestal of
    1000 counts, the ellipse was a/b 1.0087 at 75 deg (true 1.03 at 23 deg) while the
    networks saw the pedestal, and 1.0356 at 19 deg without it (1.0260 at 27 deg on the
    same data dark-subtracted).

    Masked are the pixels False in ``mask`` (a beam stop, dead regions) and burned-in
    annotations (:func:`overlay_mask`). Counting data are divided by the value of one
    count (:func:`count_quantum`, returned (N,) in the data's units; 1 for whole counts
    and for data with a read-noise floor). The measurement copy is the cleaned block
    less its read-noise floor (:func:`measurement_block`; the same tensor for counting
    data). The valid map is (H, W) when it is the same for every pattern, (N, H, W)
    when annotations make it differ, None when all pixels are valid. The counts (N,),
    on the host, are :func:`equivalent_counts` of the measurement copy; the floor (N, 2)
    the :func:`dark_level` and :func:`read_noise_sigma` of the patterns, in the data's units.
    """
    if mask is not None:
        check_detector_mask(mask, np.shape(block)[-2:])
    level, dark, sigma = _detector_floor(block)
    x = _clean_block(dark).to(dev)
    quantum = _counting_quantum(x, sigma)
    x = _in_counts(x, quantum)
    xm = _above_read_noise(x, sigma)
    valid = None if mask is None else torch.from_numpy(np.asarray(mask, bool))
    overlay = overlay_mask(x)
    if overlay is not None:
        valid = ~overlay if valid is None else valid[None] & ~overlay
    if valid is not None:
        valid = valid.to(dev)
        keep = valid if valid.dim() == 2 else valid[:, None]
        xk = x * keep
        x, xm = xk, xk if xm is x else xm * keep
    return x, xm, valid, equivalent_counts(dark, xm, sigma, valid), np.stack([level, sigma], axis=1), quantum


def _median3(x: torch.Tensor) -> torch.Tensor:
    """Replace hot pixels by the median of their 3x3 neighbourhood.

    A pixel is hot where it exceeds 4 x its 3x3 median + 10 and twice the second
    brightest of its 8 neighbours. The second condition spares disk edges: at high
    dose a pixel on the rim of a bright disk, with most of its neighbourhood
    outside the disk, exceeds its median many times, but it has neighbours inside
    the disk as bright as itself (an isolated hot pixel or a pair of them has not).
    The median is at least the 3x3 minimum, so only pixels above 4 x that minimum +
    10 are examined (the same result, several times faster).
    """
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    candidates = x > 4 * -F.max_pool2d(-p, 3, stride=1) + 10
    if not candidates.any():
        return x
    n, c, i, j = candidates.nonzero(as_tuple=True)
    nb = torch.stack([p[n, c, i + di, j + dj] for di in range(3) for dj in range(3)], dim=-1)
    med = nb.median(dim=-1).values
    second = torch.cat([nb[:, :4], nb[:, 5:]], dim=1).topk(2, dim=1).values[:, 1]
    out = x.clone()
    v = x[n, c, i, j]
    out[n, c, i, j] = torch.where((v > 4 * med + 10) & (v > 2 * second), med, v)
    return out


def _valid_for(valid: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """The valid map of the patterns ``idx``: the rows of a per-pattern (N, H, W) map, else the shared one."""
    return valid[idx.to(valid.device)] if valid is not None and valid.dim() == 3 else valid


def _four_neighbour_mean(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Mean of the four nearest neighbours of each inner pixel (the last two axes lose their
    border), of a numpy array or a torch tensor."""
    return 0.25 * (x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:])


def _neighbour_noise_variance(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) summed pixel noise variance of patterns (N, 1, H, W): the squared residuals of the
    inner pixels against the mean of their four nearest neighbours, / 1.25 (a white noise's
    residual variance is 1.25 sigma^2), each times ``weight`` (N, 1, H - 2, W - 2) if given."""
    sq = (x[..., 1:-1, 1:-1] - _four_neighbour_mean(x)).pow(2)
    return (sq if weight is None else sq * weight).sum(dim=(1, 2, 3)) / 1.25


def poisson_noise_fraction(x: torch.Tensor) -> torch.Tensor:
    """Variance of each pattern's pixel-to-pixel noise over the Poisson variance of its counts.

    The noise is the residual against the mean of the four nearest neighbours (whose
    variance is 1.25 sigma^2 for white noise); for Poisson counts sigma^2 is the
    mean count, so counting data score about 1 and an integrating detector its gain,
    while a smooth image in arbitrary units scores near 0. Edges and hot pixels add to
    the residual, so the fraction is an upper bound.

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) patterns, H and W >= 3.

    Returns
    -------
    torch.Tensor
        (N,) fractions.
    """
    return _neighbour_noise_variance(x) / x[..., 1:-1, 1:-1].clamp_min(0).sum(dim=(1, 2, 3)).clamp_min(1e-12)


def _reads_denoised(counts: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the patterns of ``counts`` (N,) whose refinement may take the denoised pattern
    (:func:`_refinement_input`): the only ones the denoiser need run on for the origins."""
    return counts < LOW_DOSE_COUNTS


def _refinement_input(x: torch.Tensor, denoised: torch.Tensor | None, counts: torch.Tensor,
                      filtered: torch.Tensor | None = None) -> torch.Tensor:
    """Per pattern: denoised at low ``counts`` (N,) of Poisson-like noise, hot-pixel-filtered recording
    otherwise (``filtered``, ``_median3(x)``, where it is at hand)."""
    raw = (_median3(x) if filtered is None else filtered).float()
    if denoised is None:
        return raw
    low = _reads_denoised(counts).to(x.device)
    if not low.any():  # the common case: no noise estimate needed
        return raw
    low &= poisson_noise_fraction(x) >= POISSON_MIN_FRACTION
    return torch.where(low[:, None, None, None], denoised.float(), raw)


def _within_radius(x: torch.Tensor, valid: torch.Tensor | None, origin: torch.Tensor, refined: torch.Tensor,
                   score: torch.Tensor, ok: torch.Tensor, radius: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine again, within the disk the network allows, where the square search left it.

    The square window of :func:`~py4dstem_prenet.refine.refine_origin` reaches 1.41
    SEARCH_PX along its diagonals. Under a beam stop over the bright-field disk it found
    a half-lattice point (about which a lattice of equal disks is as symmetric as about
    the origin) 4.4 px from the network's estimate, beyond ``radius``, so the network's
    estimate, 2.9 px off, was kept; the disk search finds the origin. Patterns (N,) not
    ``ok`` are searched again in the disk of radius SEARCH_PX; the (refined, score, ok)
    of those it brings within ``radius`` (N,) of ``origin`` are replaced.
    """
    idx = torch.nonzero(~ok)[:, 0]
    r2, s2 = (t.cpu() for t in refine_origin(x[idx.to(x.device)], origin[idx].to(x.device), search=SEARCH_PX,
                                              valid=_valid_for(valid, idx), with_score=True, disk=True))
    good = torch.linalg.norm(r2 - origin[idx], dim=1) <= radius[idx]
    refined, score, ok = refined.clone(), score.clone(), ok.clone()
    refined[idx[good]], score[idx[good]], ok[idx[good]] = r2[good].to(refined.dtype), s2[good].to(score.dtype), True
    return refined, score, ok


def _check_globally(x: torch.Tensor, valid: torch.Tensor | None, network: torch.Tensor, radius: torch.Tensor,
                    origin: torch.Tensor, sigma_px: torch.Tensor, score: torch.Tensor, unsure: torch.Tensor,
                    eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a wider search near the network, or the detector-wide symmetry centre, must replace the origin.

    The refinement's window (SEARCH_PX) misses the origin where the network is further
    off; within ``radius`` (N,) px of the network's estimate ``network`` (N, 2) the most
    symmetric point replaces the refined one (``origin`` (N, 2), of symmetry ``score``
    (N,)) when the refined one scores below GLOBAL_SWITCH times it, or, where the network
    is unsure, below it at all (its window is then no more credible than the rest of
    the 3 sigma disk). Where the network's
    neighbourhood is still far less inversion-symmetric than the best point of the
    detector (rings or spots around a beam stop, patterns unlike the training data),
    the network is wrong: the symmetry centre replaces it. Where the network knows it
    is outside what it learnt (its sigma above UNSURE_SIGMA_VIEW), the symmetry centre
    wins if it scores UNSURE_MARGIN more and lies within 3 sigma. Neither switch is made
    where the pattern is rings about its origin and less so about the symmetry centre
    (:func:`_rings_about_first`). Below
    GLOBAL_MIN_COUNTS the symmetry map is noise and nothing switches. The searches run
    only for the patterns where a switch is possible (a score >= GLOBAL_SWITCH cannot
    lose against a best score <= 1).

    ``unsure`` (N,) marks a network sigma above UNSURE_SIGMA_VIEW, ``eligible`` (N,)
    patterns with at least GLOBAL_MIN_COUNTS counts.

    Returns
    -------
    near, origin, switch, score : torch.Tensor
        (N,) bool where the near search replaced the refined origin; the (N, 2) origins
        in pixels after both replacements; (N,) bool where the detector-wide centre
        replaced the origin; the (N,) symmetry scores of the returned origins. All on CPU.
    """
    need = ((score < GLOBAL_SWITCH) | unsure) & eligible
    near, switch = torch.zeros_like(need), torch.zeros_like(need)
    origin, score = origin.clone(), score.clone()
    if need.any():
        idx = torch.nonzero(need)[:, 0]
        v = _valid_for(valid, idx)
        dev = x.device
        og, sg, on, sn = (t.cpu() for t in symmetry_centres(x[idx.to(dev)], network[idx].to(dev).to(x.dtype),
                                                            radius[idx].to(dev), valid=v))
        take = (score[idx] < GLOBAL_SWITCH * sn) | (unsure[idx] & (score[idx] < sn))
        near[idx] = take
        origin[idx[take]], score[idx[take]] = on[take].to(origin.dtype), sn[take].to(score.dtype)
        lost = score[idx] < GLOBAL_SWITCH * sg
        close = torch.linalg.norm(og - origin[idx], dim=1) <= 3 * sigma_px[idx]
        wants = lost | (unsure[idx] & (score[idx] + UNSURE_MARGIN < sg) & close)
        if wants.any():
            wants[wants.clone()] = ~_rings_about_first(x[idx[wants].to(dev)], origin[idx[wants]], og[wants],
                                                        _valid_for(v, torch.nonzero(wants)[:, 0]))
        switch[idx] = wants
        origin[idx] = torch.where(switch[idx, None], og.to(origin.dtype), origin[idx])
        score[idx] = torch.where(switch[idx], sg.to(score.dtype), score[idx])
    return near, origin, switch, score


def _rings_about_first(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor | None
                       ) -> torch.Tensor:
    """(N,) bool: the patterns are rings about ``first`` (N, 2) and less so about ``second``.

    Rings have one centre: about it their angular variation (:func:`_angular_fraction`)
    is at most 1 - ISOTROPY_MIN, and about any other point it grows. A straight edge
    has a line of inversion centres: on one 256 px amorphous pattern whose beam stop
    was not masked, the detector-wide symmetry centre lay on the stop's rod, 73-83 px
    from the rings' centre, and replaced an origin 2.5 px off.
    """
    dev = x.device
    f1 = _angular_fraction(x, first.to(dev).to(x.dtype), valid).cpu()
    f2 = _angular_fraction(x, second.to(dev).to(x.dtype), valid).cpu()
    return (f1 <= 1 - ISOTROPY_MIN) & (f1 < f2)


def _out_of_gaps(x: torch.Tensor, filtered: torch.Tensor, valid: torch.Tensor | None, network: torch.Tensor,
                 radius: torch.Tensor, origin: torch.Tensor, score: torch.Tensor, disk_radius: torch.Tensor,
                 select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Origins in the dark gaps between disks moved into a disk that is as symmetric.

    The direct beam is a bright disk; of a selected pattern whose origin's local intensity
    is below GAP_FRACTION of its bright disks (see GAP_FRACTION), the most inversion-symmetric
    point outside the gaps within ``radius`` (N,) px of the network's estimate ``network``
    (N, 2) replaces the origin ``origin`` (N, 2) where it scores at least GAP_TIE times the
    origin's ``score`` (N,). (Not near the origin itself: there the neighbouring Bragg
    disks, lattice points, are as symmetric; a dev pattern went from 28 px off to 56.)
    Pixels that a given stop (``valid``) covers are never gaps: the mask, not the
    intensity, says what is hidden there.

    Returns
    -------
    moved, origin, score : torch.Tensor
        (N,) bool where the origin moved; the (N, 2) origins and (N,) scores, on CPU.
    """
    moved = torch.zeros_like(select)
    origin, score = origin.clone(), score.clone()
    idx = torch.nonzero(select)[:, 0]
    if not len(idx):
        return moved, origin, score
    dev = x.device
    n, h, w = len(idx), x.shape[-2], x.shape[-1]
    r = disk_radius[idx].cpu().numpy()
    sigma = max(1.0, float(np.median(r[np.isfinite(r)])) / 10) if np.isfinite(r).any() else 1.0
    xi = x[idx.to(dev)]
    v = _valid_for(valid, idx)
    seen = torch.ones_like(xi, dtype=torch.bool) if v is None else v.to(dev).reshape(-1, 1, h, w).expand_as(xi)
    local = gaussian_blur(filtered[idx.to(dev)].float() * seen, sigma) / gaussian_blur(seen.float(), sigma).clamp_min(
        1e-6)
    level = torch.topk(local.reshape(n, -1), math.ceil(0.005 * h * w), dim=1).values[:, -1]  # 99.5th percentile
    gap = (local < GAP_FRACTION * level[:, None, None, None]) & seen
    o = origin[idx].to(dev)
    row, col = o[:, 0].round().long().clamp(0, h - 1), o[:, 1].round().long().clamp(0, w - 1)
    in_gap = gap[torch.arange(n, device=dev), 0, row, col].cpu() & (level > 0).cpu()
    if not in_gap.any():
        return moved, origin, score
    k = torch.nonzero(in_gap)[:, 0]
    rr = torch.arange(h, device=dev, dtype=torch.float32)[None, :, None]
    cc = torch.arange(w, device=dev, dtype=torch.float32)[None, None, :]
    r2 = radius[idx[k]].to(dev).float()[:, None, None] ** 2
    c = network[idx[k]].to(dev).float()
    near = (rr - c[:, 0, None, None]) ** 2 + (cc - c[:, 1, None, None]) ** 2 <= r2
    o2, s2 = (t.cpu() for t in nearest_symmetric_centre(xi[k.to(dev)], network[idx[k]].to(dev).to(xi.dtype),
                                                        near & ~gap[k.to(dev), 0],
                                                        GAP_TIE * score[idx[k]].to(dev).to(xi.dtype),
                                                        valid=_valid_for(v, k)))
    take = s2 >= 0
    moved[idx[k[take]]] = True
    origin[idx[k[take]]] = o2[take].to(origin.dtype)
    score[idx[k[take]]] = s2[take].to(score.dtype)
    return moved, origin, score


def _behind_beam_stops(x: torch.Tensor, origin: torch.Tensor, select: torch.Tensor, stops: np.ndarray | None,
                       search: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Origins of the selected patterns that a beam stop hides (see STOP_MARGIN).

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) counts.
    origin : torch.Tensor
        (N, 2) origins, pixels.
    select : torch.Tensor
        (N,) bool, the patterns to try.
    stops : numpy.ndarray or None
        (1 or N, H, W) bool, the beam stop that the mask holds (:func:`_mask_stop`;
        an empty row: none in that pattern), or None where the mask holds none.
    search : bool
        Where ``stops`` is None, search each selected pattern for a stop
        (:func:`~py4dstem_prenet.beamstop.detect_beam_stop`).

    Returns
    -------
    moved, origin, sigma : torch.Tensor
        (N,) bool, (N, 2) pixels (the input's where not moved) and (N,) pixels (nan
        where not moved).
    """
    from scipy import ndimage

    moved = torch.zeros(len(origin), dtype=torch.bool)
    origin = origin.clone()
    sigma = torch.full((len(origin),), float("nan"), dtype=torch.float64)
    if stops is None and not search:
        return moved, origin, sigma
    h, w = x.shape[2:]
    for i in torch.nonzero(select)[:, 0].tolist():
        img = x[i, 0].double().cpu().numpy()
        stop = detect_beam_stop(img) if stops is None else stops[i if len(stops) > 1 else 0]
        if stop is None or not stop.any():
            continue
        qx, qy = (int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(origin[i], (h, w)))
        if ndimage.binary_dilation(stop, iterations=3)[qx, qy]:
            continue  # the origin is under the stop already
        behind, s, score, score_now = origin_behind_stop(img, stop, tuple(origin[i].tolist()))
        if np.isfinite(score) and score > score_now + STOP_MARGIN:
            moved[i] = True
            origin[i] = torch.from_numpy(behind).to(origin.dtype)
            sigma[i] = s
    return moved, origin, sigma


def _mask_stop(valid: torch.Tensor, region: torch.Tensor | None) -> np.ndarray | None:
    """The beam stop that a mask holds: (1 or N, H, W) bool, or None.

    The connected parts of the masked pixels (False in ``valid``, (H, W) or (N, H, W))
    that reach the stop's region (:func:`_stop_region`, (1 or N, H, W) or None), with
    the rod that holds the stop; dead pixels and annotations elsewhere are left out.
    """
    from scipy import ndimage

    if region is None:
        return None
    inv = (~valid if valid.dim() == 3 else ~valid[None]).cpu().numpy()
    reg = region.cpu().numpy()
    out = np.zeros(inv.shape, bool)
    for i, m in enumerate(inv):
        r = reg[i if len(reg) > 1 else 0]
        if not r.any():
            continue
        labels, _ = ndimage.label(m)
        out[i] = np.isin(labels, np.unique(labels[r & m]))  # labels[r & m] > 0: masked parts only
    return out


def _stop_region(valid: torch.Tensor, radius: float) -> torch.Tensor | None:
    """Where a given beam stop may hide the direct beam: (1 or N, H, W) bool, or None.

    A stop is masked pixels deeper than STOP_CORE_ERODE px inside the mask (rods,
    lines, dead columns and annotation strokes are thinner), covering at least a disk
    of half the bright-field radius (and 20 px). A bright-field disk that the stop
    hides whole has its centre where the mask is at least ``radius`` deep; the region
    is where the depth reaches that, or half the stop's largest depth if less (the
    network's radius is a guess once the disk is hidden; the direct beam is under the
    stop's thick part, not under the rod that holds it), widened by 2 px. The mask
    continues beyond the detector's border (a rod that leaves the detector is not
    thinned there). A dev crystal scan with a stop of 17 px radius over a disk of 12:
    the lattice point 20 px away on the rod, as symmetric as the origin, fell inside
    the old region (the 3 px eroded mask widened by 5 px) and every origin went there.
    """
    from scipy import ndimage

    inv = (~valid if valid.dim() == 3 else ~valid[None]).cpu().numpy()
    pad = 2 * STOP_CORE_ERODE
    out = np.zeros(inv.shape, bool)
    for i, m in enumerate(inv):
        if not m.any():
            continue
        depth = ndimage.distance_transform_edt(np.pad(m, pad, constant_values=True))[pad:-pad, pad:-pad]
        if (depth > STOP_CORE_ERODE).sum() < max(20.0, math.pi * (0.5 * radius) ** 2):
            continue
        t = max(STOP_CORE_ERODE + 1.0, min(0.5 * float(depth.max()), radius))
        out[i] = ndimage.distance_transform_edt(depth < t) <= 2
    if not out.any():
        return None
    return torch.from_numpy(out).to(valid.device)


def _inside(region: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """(N,) bool: whether each origin (N, 2) falls on its pattern's region (1 or N, H, W)."""
    h, w = region.shape[1:]
    r = origin[:, 0].round().long().clamp(0, h - 1)
    c = origin[:, 1].round().long().clamp(0, w - 1)
    rows = torch.arange(len(origin)) if region.shape[0] > 1 else torch.zeros(len(origin), dtype=torch.long)
    return region[rows, r, c]


def _map_at(maps: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Each (n, 2H, 2W) map of half-pixel samples (sample s: the centre s / 2 px) at its (n, 2) point (px)."""
    n, h2, w2 = maps.shape
    s = torch.round(2 * point).long()
    return maps[torch.arange(n), s[:, 0].clamp(0, h2 - 1), s[:, 1].clamp(0, w2 - 1)]


def _under_given_stop(x: torch.Tensor, valid: torch.Tensor, region: torch.Tensor | None, origin: torch.Tensor,
                      score: torch.Tensor, select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Origins outside a given beam stop replaced by the most symmetric point under it.

    See STOP_PRIOR_FRACTION; not where the intensity is more symmetric, by
    INTENSITY_MARGIN, about the origin found than about any point of the region.
    ``region`` is where the stop may hide the direct beam (:func:`_stop_region`);
    ``select`` (N,) marks the patterns that may move (edge-symmetry origins of patterns
    with enough counts).

    Returns
    -------
    moved, origin, score : torch.Tensor
        (N,) bool, (N, 2) pixels and (N,) scores (the inputs' where not moved).
    """
    moved = torch.zeros(len(origin), dtype=torch.bool)
    if region is None:
        return moved, origin, score
    region = region.cpu()
    rows = torch.arange(len(origin)) if region.shape[0] > 1 else torch.zeros(len(origin), dtype=torch.long)
    outside = ~_inside(region, origin) & select & region.flatten(1).any(dim=1)[rows]
    if not outside.any():
        return moved, origin, score
    idx = torch.nonzero(outside)[:, 0]
    v = _valid_for(valid, idx)
    allowed = (region[idx] if region.shape[0] > 1 else region[0]).to(x.device)
    # the stop's region is a small set of candidates, like the refinement's window: the
    # inversion about a beam far off centre keeps little of the detector (LOCAL_MIN_OVERLAP)
    xi = x[idx.to(x.device)]
    og, sg = (t.cpu() for t in symmetry_centre(xi, search=2.0, valid=v, min_overlap=LOCAL_MIN_OVERLAP,
                                               allowed=allowed))
    # not where the intensity is clearly more symmetric about the origin found than about
    # any point of the region: a stop off the direct beam leaves part of the bright-field
    # disk in view, and the origin outside its region (see INTENSITY_MARGIN)
    maps, _, _, best = _most_symmetric_under(xi, v, region, idx)
    here = _map_at(maps, origin[idx])
    take = (sg >= STOP_PRIOR_FRACTION * score[idx]) & ~((here > -1) & (here >= best + INTENSITY_MARGIN))
    moved[idx[take]] = True
    origin, score = origin.clone(), score.clone()
    origin[idx[take]] = og[take].to(origin.dtype)
    score[idx[take]] = sg[take].to(score.dtype)
    return moved, origin, score


#: Under a given stop, an origin moves to another point under it (at least half the
#: bright-field radius away: another lattice point) where the intensity is this much
#: more symmetric (:func:`~py4dstem_prenet.refine.intensity_symmetry_map`). With the
#: bright-field disk hidden, a lattice is about as symmetric in its edges about another
#: lattice point under the stop as about its origin: a dev crystal scan (1e6 counts, the
#: stop half a tip radius off the beam, its mask a pixel wider) had every origin 20.7 px
#: off, at edge scores 0.81 there and 0.79 at the origin, and intensity scores 0.48-0.71
#: there and 0.89-0.92 at the origin.
INTENSITY_MARGIN = 0.1

#: ... scored only where the inversion keeps this fraction of the detector: scikit-ued's
#: test pattern (a rod from the detector's edge over the beam, an intensity gradient)
#: scored higher about a point 23 px from the edge, on the rod, at LOCAL_MIN_OVERLAP.
INTENSITY_MIN_OVERLAP = 0.4

#: ... and where the origin is too near the detector's edge for its intensity to be scored,
#: the point under the stop must score at least this. A dev crystal scan (1e4 counts, the
#: stop half a tip radius off the beam, its rod included in the stop's region) had half
#: its origins moved onto the rod 50-56 px away, unscored there, while the intensity
#: scored 0.70-0.77 at the true origin, its maximum over the whole detector.
INTENSITY_MIN_SCORE = 0.5


def _most_symmetric_under(x: torch.Tensor, valid: torch.Tensor | None, region: torch.Tensor, idx: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The point of a stop's region about which each pattern's intensity is most symmetric.

    ``x`` (n, 1, H, W) holds the patterns ``idx`` (n,) of a block, ``valid`` their valid
    map, ``region`` (1 or N, H, W) the block's (:func:`_stop_region`). The scores are
    :func:`~py4dstem_prenet.refine.intensity_symmetry_map`'s, where the inversion keeps
    INTENSITY_MIN_OVERLAP of the detector.

    Returns
    -------
    maps, allowed, best_sample, best_score : torch.Tensor
        (n, 2H, 2W) scores and whether each sample lies on the region (sample s is the
        centre s / 2 px), (n, 2) the best sample on the region and (n,) its score
        (-1 where none is scored).
    """
    # scored where the inversion keeps INTENSITY_MIN_OVERLAP of the detector: about a point
    # near its edge, a small overlap of a sparse pattern can correlate by chance
    maps = intensity_symmetry_map(x, valid, min_overlap=INTENSITY_MIN_OVERLAP).cpu()
    n, h2, w2 = maps.shape
    region = region.cpu()
    allowed = (region[idx] if region.shape[0] > 1 else region[:1].expand(n, -1, -1))
    allowed = allowed.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # sample s = 2 * centre
    best = torch.where(allowed, maps, torch.full_like(maps, -1.0)).reshape(n, -1).max(dim=1)
    s_best = torch.stack([best.indices // w2, best.indices % w2], dim=1)
    return maps, allowed, s_best, best.values


def _intensity_under_stop(x: torch.Tensor, valid: torch.Tensor, region: torch.Tensor | None, origin: torch.Tensor,
                          score: torch.Tensor, radius: float, select: torch.Tensor, placed: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Origins under a given stop moved to the lattice point under it about which the
    intensity is symmetric (see INTENSITY_MARGIN), the edge map's most symmetric point
    within SEARCH_PX of it. ``region`` is where the stop may hide the direct beam
    (:func:`_stop_region`), ``radius`` the bright-field radius (px); ``select`` (N,)
    marks the patterns that may move, ``placed`` (N,) those that :func:`_under_given_stop`
    placed under the stop (counted as under it: their sub-pixel refinement can leave the
    region by a few pixels).

    Returns
    -------
    moved, origin, score : torch.Tensor
        (N,) bool, (N, 2) pixels and (N,) edge-symmetry scores (the inputs' where not moved).
    """
    moved = torch.zeros(len(origin), dtype=torch.bool)
    if region is None or not select.any():
        return moved, origin, score
    region = region.cpu()
    under = (_inside(region, origin) | placed) & select
    if not under.any():
        return moved, origin, score
    idx = torch.nonzero(under)[:, 0]
    v = _valid_for(valid, idx)
    xi = x[idx.to(x.device)]
    maps, allowed, s_best, best = _most_symmetric_under(xi, v, region, idx)
    n, h2, w2 = maps.shape
    at_here = _map_at(maps, origin[idx])
    far = torch.linalg.norm(s_best / 2 - origin[idx].to(maps.dtype), dim=1) > 0.5 * radius
    # where the inversion about the origin keeps too little of the detector to score it (an
    # origin near the detector's edge), only a point under the stop whose intensity is
    # clearly symmetric replaces it (see INTENSITY_MIN_SCORE)
    take = far & torch.where(at_here > -1, best >= at_here + INTENSITY_MARGIN, best >= INTENSITY_MIN_SCORE)
    if not take.any():
        return moved, origin, score
    k = torch.nonzero(take)[:, 0]
    h, w = h2 // 2, w2 // 2
    d2 = ((torch.arange(h)[None, :, None] - s_best[k, 0, None, None] / 2) ** 2
          + (torch.arange(w)[None, None, :] - s_best[k, 1, None, None] / 2) ** 2)
    near = (d2 <= SEARCH_PX**2) & allowed[k, ::2, ::2]
    og, sg = (t.cpu() for t in symmetry_centre(xi[k.to(x.device)], search=2.0, valid=_valid_for(v, k),
                                               min_overlap=LOCAL_MIN_OVERLAP, allowed=near.to(x.device)))
    moved[idx[k]] = True
    origin, score = origin.clone(), score.clone()
    origin[idx[k]] = og.to(origin.dtype)
    score[idx[k]] = sg.to(score.dtype)
    return moved, origin, score


def _angular_fraction(x: torch.Tensor, origin: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of a pattern's variance that varies with angle about its origin (0: rings only).

    The pattern, smoothed by 2 px, is resampled on 32
    log-spaced radii from 4 px to :func:`~py4dstem_prenet.views.polar_rmax` and 36
    angles (:func:`~py4dstem_prenet.refine.log_polar_view`); the variance about each
    radius's angular mean, over the variance about the overall mean, both over the
    samples whose rays are valid and less the variance of the Poisson noise that the
    smoothing leaves (``x`` in counts). Rings of amorphous or polycrystalline films score
    near 0 (dev scans behind a beam stop, 1e3-1e6 counts: <= 0.33), Bragg disks near 1 (>= 0.65).

    Parameters
    ----------
    x : torch.Tensor
        (N, 1, H, W) counts.
    origin : torch.Tensor
        (N, 2) origins, pixels.
    valid : torch.Tensor, optional
        (H, W) or (N, H, W) bool, False on a beam stop or dead pixels.

    Returns
    -------
    torch.Tensor
        (N,) fractions in [0, 1].
    """
    n, _, h, w = x.shape
    r_max = polar_rmax((h, w))
    lp = log_polar_view(gaussian_blur(x, 2.0), origin.to(x.dtype), 4.0, r_max, 32, 36)
    v = torch.ones((h, w), dtype=x.dtype, device=x.device) if valid is None else valid.to(x.dtype)
    v = (v[None] if v.dim() == 2 else v)[:, None].expand(n, 1, h, w)
    wt = (log_polar_view(v, origin.to(x.dtype), 4.0, r_max, 32, 36) > 0.99).to(x.dtype)
    row_mean = (lp * wt).sum(2, keepdim=True) / wt.sum(2, keepdim=True).clamp_min(1)
    mean = (lp * wt).sum((1, 2), keepdim=True) / wt.sum((1, 2), keepdim=True).clamp_min(1)
    # Poisson noise left after the smoothing (variance counts / (4 pi sigma^2), halved by
    # the two rays of each sample) is angular variance that is not structure
    noise = ((lp.clamp_min(0) / (8 * math.pi * 2.0**2)) * wt).sum((1, 2))
    angular = ((((lp - row_mean) ** 2) * wt).sum((1, 2)) - noise).clamp_min(0)
    total = ((((lp - mean) ** 2) * wt).sum((1, 2)) - noise).clamp_min(0)
    return torch.where(total > 0, angular / total.clamp_min(1e-30), torch.ones_like(total))


def _diffuse_behind_stop(x: torch.Tensor, valid: torch.Tensor, origin: torch.Tensor,
                         select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins of ring patterns under a given beam stop, from the symmetry of their intensity.

    Where the origin lies under a given stop (see :func:`_stop_region`; any core of
    at least 20 px: with the bright-field disk hidden, the network's radius is a
    guess) and the pattern is rings only (:func:`_angular_fraction` <= 1 - ISOTROPY_MIN), the edge
    map has no bright-field edge left, only speckle: the inversion symmetry of the
    smoothed intensity (:func:`~py4dstem_prenet.refine.intensity_symmetry_centre`)
    replaces the origin, searched within SEARCH_PX of the region's most symmetric point
    (:func:`_most_symmetric_under`), not of the origin: the edge steps before leave
    speckle's symmetry centres, and on a dev scan (rings of 52 px radius running off the
    detector, 1e5 counts) origins that started up to 10 px off left 77 of 144 0.5-3.4 px
    off (mean 0.82 px; 0.07 from the region's most symmetric point).
    ``select`` (N,) marks the patterns that may move.

    Returns
    -------
    moved, origin : torch.Tensor
        (N,) bool and (N, 2) pixels (the input's where not moved).
    """
    moved = torch.zeros(len(origin), dtype=torch.bool)
    region = _stop_region(valid, 0.0) if select.any() else None
    if region is None:
        return moved, origin
    under = _inside(region.cpu(), origin) & select
    if not under.any():
        return moved, origin
    idx = torch.nonzero(under)[:, 0]
    v = _valid_for(valid, idx)
    xi, oi = x[idx.to(x.device)], origin[idx].to(x.device).to(x.dtype)
    rings = (_angular_fraction(xi, oi, v) <= 1 - ISOTROPY_MIN).cpu()
    if not rings.any():
        return moved, origin
    k = torch.nonzero(rings)[:, 0]
    vk = _valid_for(v, k)
    xk = xi[k.to(x.device)]
    # rings are symmetric about their centre alone: the search starts at the region's most
    # symmetric point, wherever the edge steps before it left the origin
    _, _, s_best, best = _most_symmetric_under(xk, vk, region, idx[k])
    start = torch.where((best > -1)[:, None], s_best.to(oi.dtype) / 2, oi[k].cpu()).to(x.device)
    found = intensity_symmetry_centre(xk, start, SEARCH_PX, vk).cpu()
    moved[idx[k]] = True
    origin = origin.clone()
    origin[idx[k]] = found.to(origin.dtype)
    return moved, origin


#: Radii (times the network's) between which :func:`_disk_radius` looks for the
#: bright-field edge.
DISK_RADIUS_RANGE = (0.5, 2.0)


def _disk_radius(x: torch.Tensor, origin: torch.Tensor, network_radius: torch.Tensor) -> torch.Tensor:
    """Bright-field disk radius (px) of each pattern, for the disk fit to start from.

    The steepest first fall of the angular median of each pattern's log-polar view about
    its origin (:func:`~py4dstem_prenet.refine.bright_field_radius`), between
    DISK_RADIUS_RANGE times its network radius; the network's radius where that finds no
    plateau. The network's radius can be 10-15% off (a dev scan: 9.3 px for a disk of
    10.7), from which a four-step fit of the disk did not converge. Each pattern's own
    (not a block's sum), so that origins do not depend on the batch size.
    """
    net = network_radius.detach().to("cpu", torch.float64).reshape(-1)
    found = net.clone()
    use = torch.nonzero(torch.isfinite(net) & (DISK_RADIUS_RANGE[0] * net >= 1.0))[:, 0]
    if not len(use):
        return found
    r_min, r_max = (f * net[use] for f in DISK_RADIUS_RANGE)
    dev = use.to(x.device)
    view = log_polar_view(x[dev].float(), origin[use].to(x.device).float(), r_min.float().to(x.device),
                          r_max.float().to(x.device), n_rho=_N_RHO, n_phi=_N_PHI).double().cpu().numpy()
    for k, i in enumerate(use.tolist()):
        r = bright_field_radius(view[k], float(r_min[k]), float(r_max[k]))
        if r is not None:
            found[i] = r
    return found


@dataclass(frozen=True)
class PreNet:
    """The three networks and the physics refinement, applied to blocks of patterns.

    Parameters
    ----------
    denoise, center, ellipse : bool
        Stages to run.
    refine : bool
        Friedel edge refinement of the origin after the centre network.
    device : str, optional
        'cpu', 'cuda', ...; CUDA when available if None.
    weights_dir : str, optional
        Folder of retrained weights (the shipped ones when None).
    find_beam_stops : bool
        Where no mask holds a beam stop, search each pattern whose origin the network
        is unsure of for one that hides its direct beam
        (:func:`~py4dstem_prenet.beamstop.detect_beam_stop`, ~0.1-0.8 s a 128 px
        pattern). :func:`~py4dstem_prenet.preprocess.preprocess` turns this off where it
        searched the scan's sum: a stop stays put on the detector, so it shows there
        with the whole scan's counts.

    Notes
    -----
    The instance is a small, picklable description; the models are loaded (and
    cached per process) on first use, so it can be sent to dask workers.
    """

    denoise: bool = True
    center: bool = True
    ellipse: bool = True
    refine: bool = True
    device: str | None = None
    weights_dir: str | None = None
    find_beam_stops: bool = True

    @property
    def stages(self) -> list[str]:
        """Names of the enabled networks, in order: 'denoiser', 'centre', 'ellipse'."""
        return [n for n, on in (("denoiser", self.denoise), ("centre", self.center), ("ellipse", self.ellipse)) if on]

    @property
    def torch_device(self) -> torch.device:
        """The device blocks are processed on."""
        return torch.device(self.device if self.device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def model_hashes(self) -> str:
        """Comma-separated sha256 prefixes of the enabled weight files (for metadata)."""
        return ",".join(model_card(n, self.weights_dir)["sha256"][:12] for n in self.stages) or "none"

    def check_weights(self) -> None:
        """Load every enabled model once, so that a bad weights file fails before any work.

        Raises
        ------
        WeightsError
            If a weights file is missing, corrupt or from another version.
        """
        for n in self.stages:
            load_model(n, self.weights_dir, self.torch_device)

    def _apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Run network ``name`` on (N, C, H, W) inputs in channels-last chunks (see _CPU_CHUNK)."""
        model = load_model(name, self.weights_dir, x.device)
        n = _CPU_CHUNK[name] if x.device.type == "cpu" else max(len(x), 1)
        parts = [model(x[i:i + n].contiguous(memory_format=torch.channels_last)) for i in range(0, len(x), n)]
        return torch.cat(parts).contiguous() if parts else model(x)

    def _denoised(self, x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """The denoiser's output on the ``select`` (N,) patterns of ``x`` (N, 1, H, W), the
        input elsewhere: the denoiser runs only where its output is used (at 1e6 counts per
        pattern, nowhere: it had taken a third of a run with denoising on this CPU)."""
        idx = torch.nonzero(select)[:, 0].to(x.device)
        if len(idx) == 0:
            return x
        if len(idx) == len(x):
            return self._apply("denoiser", x)
        y = x.clone()
        y[idx] = self._apply("denoiser", x[idx]).to(x.dtype)
        return y

    def run(self, block: np.ndarray, origin: np.ndarray | None = None, mask: np.ndarray | None = None,
            keep_data: bool = True) -> dict[str, np.ndarray]:
        """Process one block of patterns.

        Parameters
        ----------
        block : numpy.ndarray
            (N, Q_Nx, Q_Ny) patterns, any numeric dtype; NaN/Inf read as 0,
            negative values as 0. Origins and counts are measured above the
            patterns' read-noise floor (:func:`measurement_block`).
        origin : numpy.ndarray, optional
            (N, 2) origins (qx0, qy0) in pixels for the ellipse network when the
            centre stage is off.
        mask : numpy.ndarray, optional
            (Q_Nx, Q_Ny) bool, True where pixels record the pattern, False on a beam
            stop or dead detector regions: those read as 0 counts, and the origin
            refinement ignores edges within 3 px of them.
        keep_data : bool
            Return the (denoised) patterns. Without them the denoiser runs only where
            the origin refinement reads its output (below LOW_DOSE_COUNTS): the
            calibrations are the same, and sums of many patterns (pooled
            neighbourhoods, descan tiles) are not denoised for nothing.

        Returns
        -------
        dict of numpy.ndarray
            'data' (N, Q_Nx, Q_Ny) float32 in the input's units, on the input's dark
            level where one was not subtracted (only with ``keep_data``), denoised when the
            denoiser runs (patterns above DENOISE_MAX_COUNTS stay as recorded), else the
            cleaned input; 'counts' (N,) the cleaned patterns' total counts above their
            read-noise floor, in electrons where that floor shows an integrating detector
            (:func:`equivalent_counts`) and in counts where the data hold counts in other
            units; 'signal' (N,) the sum of the measurement copy (counts above the
            read-noise floor, in counts) with hot pixels removed (:func:`_median3`),
            which an error of the dark level or of the gain does not bring to 0 and
            a blank pattern's hot pixels do not lift (the test of blank patterns); 'count_quantum' (N,)
            the value of one count (:func:`count_quantum`;
            1 for whole counts and continuous data); 'detector_floor' (N, 2) their dark
            level (:func:`dark_level`) and read noise (:func:`read_noise_sigma`), in the
            input's units (0 for counting data); with the centre stage
            'origin' (N, 2) (network + refinement), 'origin_network' (N, 2),
            'origin_sigma' (N,) px and 'disk_radius' (N,) px; with refinement also
            'origin_symmetry' (N,), the
            inversion-symmetry score (normalised cross-correlation of the edge map
            with its inversion, 1 = perfect) at the origin, and 'origin_source' (N,)
            int8: 0 network, 1 refined near it (within SEARCH_PX, or the most symmetric
            point within 3 sigma where that window held none; see :func:`_check_globally`),
            2 symmetry centre of the detector
            (the network's estimate was rejected), 4 behind a beam stop (from the
            diffuse background's fall-off; 'origin_sigma' is then its uncertainty and
            'origin_symmetry' nan), 7 the most symmetric point under a beam stop given in
            ``mask`` (the origin found lay outside it; see STOP_PRIOR_FRACTION; or on
            another lattice point under it, INTENSITY_MARGIN), 8 the
            inversion-symmetry centre of the intensity of a ring pattern whose origin
            lies under a given stop (see :func:`_diffuse_behind_stop`; 'origin_symmetry'
            nan), and 'origin_blur_bias' (N, 2) px, the bias of the symmetry centres
            from intensity slopes inside the disks: the symmetry centre minus the
            centre of a fit of the bright-field disk
            (:func:`~py4dstem_prenet.refine.disk_model_centre`) where that fit counts,
            is precise to DISK_MODEL_MAX_SIGMA and finds a bias above both
            DISK_MODEL_MIN_BIAS and DISK_MODEL_MIN_Z standard errors; the edge-blur
            estimate (:func:`~py4dstem_prenet.refine.edge_blur_bias`) elsewhere;
            not subtracted from 'origin' here, 0 for sources 0, 4 and 8, nan where it
            has no estimate), 'origin_disk_fit' (N, 2) px and 'origin_disk_sigma' (N,)
            px, that fit's centre and standard error where it counts (nan elsewhere and
            for sources other than 1, 2 and 7; :func:`~py4dstem_prenet.preprocess`
            weighs it against the symmetry centre); with the
            ellipse stage 'e12' (N, 2).
            (:func:`~py4dstem_prenet.preprocess` adds 3: re-refined at the scan's
            descan fit, 5: measured on pooled scan neighbourhoods, and 6: the
            scan's tile descan model, where a pooled measurement disagreed with it.)
        """
        dev = self.torch_device
        h, w = int(block.shape[-2]), int(block.shape[-1])
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            x, xm, valid, counts, floor, quantum = _masked_block(block, mask, dev)
            out["counts"] = counts.numpy()
            filtered = _median3(xm)  # hot pixels removed: what the refinement reads at high dose
            out["signal"] = filtered.sum(dim=(1, 2, 3)).double().cpu().numpy()
            out["detector_floor"] = floor
            out["count_quantum"] = quantum
            if self.denoise:
                # where the recording is already better than the denoiser's own error, keep it;
                # without the data, only where the refinement takes the denoised pattern
                read = _reads_denoised(counts) if self.center and self.refine else torch.zeros_like(counts, dtype=bool)
                y = self._denoised(x, counts <= DENOISE_MAX_COUNTS if keep_data else read)
            else:
                y = x
            if keep_data:  # in the input's units, on its dark level (the networks see the counts above it)
                out["data"] = _in_counts(y, 1 / quantum)[:, 0].float().cpu().numpy() + floor[:, :1, None].astype(
                    np.float32)
            if self.center:
                # the calibrators were trained on recorded (noisy) patterns: they see x
                pred = self._apply("centre", full_view(x)).float().cpu()
                o = view_to_detector(pred[:, :2], (h, w))
                out["origin_network"] = o.numpy().astype(np.float64)
                s_px = torch.exp(pred[:, 2]) * (0.5 * (h + w) / VIEW_SIZE)
                out["origin_sigma"] = s_px.numpy().astype(np.float64)
                out["disk_radius"] = (torch.exp(pred[:, 3]) * min(h, w)).numpy().astype(np.float64)
                if self.refine:
                    xr = _refinement_input(xm, y if self.denoise else None, counts, filtered)
                    r, score = (t.cpu() for t in refine_origin(xr, o.to(dev), search=SEARCH_PX, valid=valid, with_score=True))
                    # keep the refinement only where it agrees with the network's estimate
                    radius = torch.clamp(3 * s_px, min=SEARCH_PX)
                    ok = torch.linalg.norm(r - o, dim=1) <= radius
                    if not ok.all():
                        r, score, ok = _within_radius(xr, valid, o, r, score, ok, radius)
                    o_net, o = o, torch.where(ok[:, None], r, o)
                    unsure = torch.exp(pred[:, 2]) > UNSURE_SIGMA_VIEW
                    eligible = counts >= GLOBAL_MIN_COUNTS
                    near, o, switch, score = _check_globally(xr, valid, o_net, radius, o, s_px, score, unsure, eligible)
                    source = ((ok | near).long() + 2 * switch.long()).clamp(max=2)
                    # the direct beam is a disk: not a half-lattice point in the gap between two
                    # (where the origin comes from a wide search or the network is unsure)
                    out_of_gap, o, score = _out_of_gaps(xr, filtered, valid, o_net, radius, o, score,
                                                        torch.from_numpy(out["disk_radius"]),
                                                        (near | switch | unsure) & (source > 0) & eligible
                                                        & (score > 0))
                    source = torch.where(out_of_gap, torch.ones_like(source), source)
                    out["origin_symmetry"] = score.numpy().astype(np.float64)
                    behind = unsure & eligible
                    stops = None
                    if valid is not None:
                        # a given beam stop hides the direct beam: an origin outside it is suspect
                        sym = torch.from_numpy(out["origin_symmetry"]).to(o.dtype)
                        r_bf = float(np.median(out["disk_radius"]))
                        region = _stop_region(valid, r_bf)
                        under, o, sym = _under_given_stop(xr, valid, region, o, sym,
                                                          ((source == 1) | (source == 2)) & eligible)
                        source = torch.where(under, torch.full_like(source, 7), source)
                        # rings under the stop: the intensity's symmetry, not the speckle's edges
                        rings, o = _diffuse_behind_stop(xr, valid, o, (source == 1) | (source == 2) | (source == 7))
                        sym[rings] = float("nan")  # not an edge-symmetry score
                        source = torch.where(rings, torch.full_like(source, 8), source)
                        # another lattice point under the stop, as symmetric in its edges
                        edge_origin = ((source == 1) | (source == 2) | (source == 7)) & eligible
                        lattice, o, sym = _intensity_under_stop(xr, valid, region, o, sym, r_bf, edge_origin, under)
                        out["origin_symmetry"] = sym.numpy().astype(np.float64)
                        source = torch.where(lattice, torch.full_like(source, 7), source)
                        under |= lattice
                        behind &= ~under & ~rings  # placed under the given stop already
                        stops = _mask_stop(valid, region)
                    # an unsure network, and no symmetric centre under a beam stop: the direct
                    # beam may be hidden behind the stop (only the diffuse fall-off shows it)
                    moved, o, s_stop = _behind_beam_stops(xm, o, behind, stops, self.find_beam_stops)
                    if moved.any():
                        out["origin_sigma"] = np.where(moved.numpy(), s_stop.numpy(), out["origin_sigma"])
                        out["origin_symmetry"][moved.numpy()] = np.nan
                        source = torch.where(moved, torch.full_like(source, 4), source)
                    out["origin_source"] = source.numpy().astype(np.int8)
                    # the edge-blur bias of the symmetry centres (preprocess smooths it over the
                    # scan and subtracts it); 0 where the origin is not an edge-symmetry centre
                    bias = torch.zeros_like(o)
                    disk_fit = torch.full_like(o, float("nan"))
                    disk_sigma = torch.full((len(o),), float("nan"), dtype=o.dtype)
                    edge = (source == 1) | (source == 2) | (source == 7)
                    if edge.any():
                        i = torch.nonzero(edge)[:, 0]
                        v = _valid_for(valid, i)
                        xi = xr[i.to(dev)]
                        # where the bright-field disk is seen whole, a fit of the disk itself (edge
                        # times a smooth interior) measures the whole bias, not its blur part; it is
                        # taken where that bias stands out of the fit's own noise and error
                        r_net = torch.from_numpy(np.asarray(out["disk_radius"], np.float64))[i]
                        fit, ok, fit_sigma = disk_model_centre(xi, o[i], _disk_radius(xi, o[i], r_net),
                                                               None if v is None else v.to(dev),
                                                               max_sigma=DISK_MODEL_MAX_SIGMA)
                        fitted = ok.cpu()
                        disk_fit[i[fitted]] = fit.cpu()[fitted].to(o.dtype)
                        disk_sigma[i[fitted]] = fit_sigma.cpu()[fitted].to(o.dtype)
                        ok &= (fit_sigma <= DISK_MODEL_MAX_SIGMA) & (torch.linalg.norm(o[i] - fit, dim=1) > torch.clamp(
                            DISK_MODEL_MIN_Z * fit_sigma, min=DISK_MODEL_MIN_BIAS))
                        bias[i] = o[i] - fit.to(o.dtype)
                        # the edge-blur estimate elsewhere (computed only there: 10% of a run at 1e4)
                        j = torch.nonzero(~ok)[:, 0]
                        if len(j):
                            bias[i[j]] = edge_blur_bias(xi[j.to(dev)], o[i[j]].to(dev).to(xr.dtype),
                                                        _valid_for(v, j)).cpu().to(o.dtype)
                    out["origin_blur_bias"] = bias.numpy().astype(np.float64)
                    out["origin_disk_fit"] = disk_fit.numpy().astype(np.float64)
                    out["origin_disk_sigma"] = disk_sigma.numpy().astype(np.float64)
                out["origin"] = o.numpy().astype(np.float64)
            if self.ellipse:
                o_e = out["origin"] if self.center else origin
                if o_e is None:
                    raise ValueError("the ellipse stage needs origins: run the centre stage or pass origin")
                t = torch.from_numpy(np.asarray(o_e, np.float32)).to(dev)
                e = self._apply("ellipse", ellipse_view(x, t, polar_rmax((h, w)))).float().cpu()
                out["e12"] = e.numpy().astype(np.float64) * E12_SCALE
        return out

    def refine_at(self, block: np.ndarray, origin: np.ndarray, mask: np.ndarray | None = None,
                  select: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Friedel edge refinement of the origin within 2 px of given estimates.

        Used to re-measure patterns whose origin disagrees with the scan's smooth
        descan fit (see :func:`~py4dstem_prenet.preprocess`).

        Parameters
        ----------
        block : numpy.ndarray
            (N, Q_Nx, Q_Ny) recorded patterns.
        origin : numpy.ndarray
            (N, 2) estimates (qx0, qy0), pixels.
        mask : numpy.ndarray, optional
            As in :meth:`run`.
        select : numpy.ndarray, optional
            (N,) bool: refine only these patterns (the others keep ``origin``).

        Returns
        -------
        dict
            'origin' (N, 2) refined origins, pixels.
        """
        dev = self.torch_device
        out = np.array(origin, dtype=np.float64, copy=True)
        sel = np.ones(len(out), bool) if select is None else np.asarray(select, bool)
        if not sel.any():
            return {"origin": out}
        with torch.inference_mode():
            x, xm, valid, counts, _, _ = _masked_block(np.asarray(block)[sel], mask, dev)
            y = self._denoised(x, _reads_denoised(counts)) if self.denoise else None
            o = torch.from_numpy(np.asarray(out[sel], np.float32)).to(dev)
            out[sel] = refine_origin(_refinement_input(xm, y, counts), o, search=2.0, valid=valid).cpu().numpy()
        return {"origin": out}

    def intensity_halves_at(self, block: np.ndarray, origin: np.ndarray, mask: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
        """Intensity-symmetry centres of two disjoint angular halves of each pattern, within 2 px of given origins.

        The halves' counterpart of the measurement of ring patterns behind a stop
        (``origin_source`` 8; see
        :func:`~py4dstem_prenet.refine.intensity_symmetry_halves`), on the same input
        (hot pixels removed, masked pixels and burned-in annotations excluded); used to
        measure that measurement's noise (see :func:`~py4dstem_prenet.preprocess.origin_noise`).

        Parameters
        ----------
        block : numpy.ndarray
            (N, Q_Nx, Q_Ny) recorded patterns.
        origin : numpy.ndarray
            (N, 2) the whole patterns' origins (qx0, qy0), pixels.
        mask : numpy.ndarray, optional
            As in :meth:`run`.

        Returns
        -------
        tuple of numpy.ndarray
            The two halves' (N, 2) centres, pixels.
        """
        dev = self.torch_device
        with torch.inference_mode():
            _, xm, valid, counts, _, _ = _masked_block(np.asarray(block), mask, dev)
            o = torch.from_numpy(np.asarray(origin, np.float32)).to(dev)
            halves = intensity_symmetry_halves(_refinement_input(xm, None, counts), o, 2.0, valid)
        return tuple(h.cpu().numpy().astype(np.float64) for h in halves)

    def polar_sums(self, block: np.ndarray, origin: np.ndarray, bands: dict[str, tuple[float, float]]
                   ) -> dict[str, np.ndarray]:
        """Per-block part of the ellipse refinement: summed log-polar views.

        Parameters
        ----------
        block : numpy.ndarray
            (N, Q_Nx, Q_Ny) recorded patterns (hot pixels are median-filtered here).
        origin : numpy.ndarray
            (N, 2) origins in pixels.
        bands : dict
            Name -> (r_min, r_max) in pixels, from :func:`ellipse_bands`.

        Returns
        -------
        dict of numpy.ndarray
            Name -> (256, 180) float64 sum over the block of the intensity-normalised
            log-polar views; add them over blocks in a fixed order and pass the total
            to :func:`fit_ellipse_bands`.
        """
        dev = self.torch_device
        with torch.inference_mode():
            x = _clean_block(block)
            x = _median3(_in_counts(x, count_quantum(x)))  # the hot-pixel test is in counts
            x = (x / x.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)).to(dev)
            o = torch.from_numpy(np.asarray(origin, np.float32)).to(dev)
            out = {}
            for k, (r0, r1) in bands.items():
                lp = log_polar_view(x, o, r0, r1, _N_RHO, _N_PHI)
                if k == ISOTROPIC:
                    # keep only patterns whose content is a function of radius alone
                    total = ((lp - lp.mean(dim=(1, 2), keepdim=True)) ** 2).sum(dim=(1, 2))
                    angular = ((lp - lp.mean(dim=2, keepdim=True)) ** 2).sum(dim=(1, 2))
                    keep = angular <= (1 - ISOTROPY_MIN) * total
                    lp = lp[keep]
                    out[ISOTROPIC + " count"] = np.array([float(keep.sum()), float(len(keep))])
                out[k] = lp.sum(0).double().cpu().numpy()
            return out


    def aligned_sum(self, block: np.ndarray, origin: np.ndarray, mask: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
        """Per-block part of the origin-aligned mean on which :func:`disk_offsets` finds the disks.

        Each pattern (hot pixels removed, masked pixels and annotations left out) is
        moved by whole pixels so that its origin lands within half a pixel of the
        detector's centre pixel ``(Q_Nx // 2, Q_Ny // 2)``: no interpolation, so no
        resampling blur and no ringing.

        Parameters
        ----------
        block : numpy.ndarray
            (N, Q_Nx, Q_Ny) recorded patterns.
        origin : numpy.ndarray
            (N, 2) origins (qx0, qy0), pixels; a NaN row leaves its pattern out.
        mask : numpy.ndarray, optional
            As in :meth:`run`.

        Returns
        -------
        dict of numpy.ndarray
            'aligned': (Q_Nx, Q_Ny) float64 sum of the moved patterns; 'aligned cover':
            how many valid pixels each detector pixel received. Add them over blocks
            (:func:`add_polar_sums`); their ratio is the mean.
        """
        h, w = np.shape(block)[-2:]
        with torch.inference_mode():
            _, xm, valid, *_ = _masked_block(np.asarray(block), mask, torch.device("cpu"))
            x = _median3(xm)[:, 0].double().numpy()
        v = np.ones((1, h, w)) if valid is None else valid.numpy().astype(float).reshape(-1, h, w)
        total, cover = np.zeros((h, w)), np.zeros((h, w))
        o = np.asarray(origin, float)
        finite = np.isfinite(o).all(axis=1)
        shifts = np.zeros((len(o), 2), int)
        shifts[finite] = np.round(np.array([h // 2, w // 2]) - o[finite]).astype(int)
        for i, (sx, sy) in enumerate(shifts):
            if not finite[i] or abs(sx) >= h or abs(sy) >= w:
                continue
            dst = (slice(max(0, sx), h + min(0, sx)), slice(max(0, sy), w + min(0, sy)))
            src = (slice(max(0, -sx), h + min(0, -sx)), slice(max(0, -sy), w + min(0, -sy)))
            vi = v[min(i, len(v) - 1)][src]
            total[dst] += x[i][src] * vi
            cover[dst] += vi
        return {"aligned": total, "aligned cover": cover}

    def disk_shapes(self, block: np.ndarray, origin: np.ndarray, offsets: np.ndarray, radius: float,
                    edge_width: float, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-block part of the disk-shape ellipse: every listed disk of every pattern fitted.

        Parameters
        ----------
        block : numpy.ndarray
            (N, Q_Nx, Q_Ny) recorded patterns.
        origin : numpy.ndarray
            (N, 2) origins (qx0, qy0), pixels; a NaN row leaves its pattern out.
        offsets : numpy.ndarray
            (M, 2) disk centres relative to the origin, pixels (from :func:`disk_offsets`).
        radius, edge_width : float
            Disk radius and edge width (sigma), pixels (from :func:`disk_offsets`).
        mask : numpy.ndarray, optional
            As in :meth:`run`.

        Returns
        -------
        dict of numpy.ndarray
            'disk e12': (K, 2) and 'disk e12 covariance': (K, 2, 2) of the K fits that
            count (see :func:`~py4dstem_prenet.refine.disk_ellipses`); concatenate
            them over blocks and pass them to :func:`combine_disk_ellipses`.
        """
        h, w = np.shape(block)[-2:]
        o = np.asarray(origin, float)
        centre = (o[:, None, :] + np.asarray(offsets, float)[None]).reshape(-1, 2)
        which = np.repeat(np.arange(len(o)), len(offsets))
        reach = radius + DISK_MODEL_MARGIN + 1
        inside = (np.isfinite(centre).all(axis=1) & (centre[:, 0] >= reach) & (centre[:, 0] <= h - 1 - reach)
                  & (centre[:, 1] >= reach) & (centre[:, 1] <= w - 1 - reach))
        with torch.inference_mode():
            _, xm, valid, *_ = _masked_block(np.asarray(block), mask, torch.device("cpu"))
            e12, cov, ok = disk_ellipses(_median3(xm), torch.from_numpy(centre[inside]), radius,
                                         torch.from_numpy(which[inside]), valid, edge_width=edge_width)
        return {"disk e12": e12[ok].numpy(), "disk e12 covariance": cov[ok].numpy()}


def ellipse_bands(origin: np.ndarray, shape: tuple[int, int], disk_radius: float | None,
                  margin: float = 2.0, stop_radius: float | None = None) -> dict[str, tuple[float, float]]:
    """Radial bands of the ellipse refinement.

    Parameters
    ----------
    origin : numpy.ndarray
        (..., 2) origins in pixels; the outer radius keeps every pattern's band
        inside the detector.
    shape : tuple of int
        Detector shape (Q_Nx, Q_Ny).
    disk_radius : float or None
        Bright-field disk radius in pixels (the centre network's median), or None.
    margin : float
        Pixels kept between the band and the detector edge.
    stop_radius : float, optional
        Radius of a beam stop over the bright-field disk, pixels
        (:func:`~py4dstem_prenet.refine.beam_stop_radius`): the bands then start
        STOP_BAND_GAIN times beyond it, and there is no bright-field band.

    Returns
    -------
    dict
        'full': everything inside the detector; 'bright-field edge': the band of
        the bright-field disk edge (when a radius is known and no stop hides the disk);
        ISOTROPIC: outside the bright-field disk, summed over isotropic patterns only
        (see :meth:`PreNet.polar_sums`). Bands too narrow to fit are left out, so the
        dict can be empty.
    """
    h, w = shape
    o = np.asarray(origin, float).reshape(-1, 2)
    edge = float(min(o[:, 0].min(), h - 1 - o[:, 0].max(), o[:, 1].min(), w - 1 - o[:, 1].max())) - margin
    known = disk_radius is not None and np.isfinite(disk_radius)
    start = 2.0 if stop_radius is None else STOP_BAND_GAIN * stop_radius + 2
    bands = {"full": (start, edge)}
    if known and stop_radius is None:
        bands["bright-field edge"] = (max(1.0, 0.4 * disk_radius), min(edge, 1.2 * disk_radius + 2))
    bands[ISOTROPIC] = (max(start, 1.5 * disk_radius + 2) if known else start, edge)
    return {k: v for k, v in bands.items() if v[1] > 2 * v[0] and v[1] > 4}


def measure_disk_radius(band_sums: Callable[[dict[str, tuple[float, float]]], dict[str, np.ndarray]],
                        origin: np.ndarray, shape: tuple[int, int], margin: float = 2.0
                        ) -> tuple[float | None, float | None]:
    """Bright-field disk radius (px) for :func:`ellipse_bands`, measured on the aligned mean,
    or the radius of a beam stop that hides it.

    ``band_sums(bands)`` returns the summed :meth:`PreNet.polar_sums` of the patterns
    to measure on; it is called once, with the radius-free 'full' band of
    :func:`ellipse_bands` (``origin``, ``shape``, ``margin`` as there).

    Returns
    -------
    disk_radius : float or None
        None where that band is too narrow or
        :func:`~py4dstem_prenet.refine.bright_field_radius` finds no plateau (the
        network's radius is then the one to use).
    stop_radius : float or None
        Where there is no plateau, the radius of a dark centre
        (:func:`~py4dstem_prenet.refine.beam_stop_radius`), else None.
    """
    full = {k: v for k, v in ellipse_bands(origin, shape, None, margin).items() if k == "full"}
    if not full:
        return None, None
    polar_sum = band_sums(full)["full"]
    radius = bright_field_radius(polar_sum, *full["full"])
    return radius, beam_stop_radius(polar_sum, *full["full"]) if radius is None else None


def add_polar_sums(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> None:
    """Add one block's :meth:`PreNet.polar_sums` into the running ``total`` (in place, in block order)."""
    for key, val in part.items():
        total[key] = total[key] + val if key in total else val


def ring_scan(sums: dict[str, np.ndarray]) -> bool:
    """Whether (nearly) every pattern summed into :meth:`PreNet.polar_sums` is rings only.

    True where more than MIXED_MAX_FRACTION of the patterns counted into the
    ISOTROPIC band were isotropic (amorphous or polycrystalline rings, no Bragg disks);
    False without that count.
    """
    n_iso, n_all = sums.get(ISOTROPIC + " count", (0.0, 0.0))
    return bool(n_all > 0 and n_iso > MIXED_MAX_FRACTION * n_all)


def fit_ellipse_bands(sums: dict[str, np.ndarray], bands: dict[str, tuple[float, float]]
                      ) -> tuple[float, float, float, str] | None:
    """Fit the ellipse on the summed log-polar views (see :func:`refine_ellipse`).

    Bands are tried in the order of their precision (a stretch moves an edge at
    radius r by (a/b - 1) r, so large rings over many patterns measure it best): the
    full band, when its content is isotropic (fit quality >= 0.97); the sum of the
    isotropic patterns only (rings of amorphous or polycrystalline regions in a scan
    that also holds crystals; >= 0.9); the bright-field disk edge (the image of the
    round condenser aperture, whatever the specimen; >= 0.97); when none reaches its
    threshold, the one of highest quality. The bright-field band is fitted on the
    intensities (see :func:`refine_ellipse`, ``compress``): on dev scans this took
    its mean |d(a/b)| from 0.0016 to 0.0008. So is the full band where (nearly)
    every pattern is rings only (0.0007 to 0.0005 on 18 amorphous and
    polycrystalline dev scans); elsewhere it keeps the square root: on single
    crystals the intensities let bright Bragg disks outweigh the bright-field edge
    (18 dev scans at 1e4 counts: 0.0063 to 0.0085, and 13 to 10 within 0.002).
    The bright-field band leaves out the angles at which a Bragg disk touches its edge
    (BF_NEIGHBOUR_FLOOR), and its a/b - 1 is divided by :func:`edge_curvature_factor`:
    the blur that every recording adds pulls a small disk's fitted stretch towards 1.

    Returns
    -------
    tuple or None
        (a/b, theta in radians from the qx axis, quality, band name), or None when
        there is no band or the best fit's quality is below ELLIPSE_QUALITY_FLOOR.
    """
    # the isotropic sum is a band of its own only in a scan of mixed content: where (nearly)
    # every pattern is isotropic, the full band holds the same rings with all the counts
    n_iso, n_all = sums.get(ISOTROPIC + " count", (0.0, 0.0))
    usable = [k for k in bands if k != ISOTROPIC or 1 <= n_iso <= MIXED_MAX_FRACTION * n_all]
    if not usable:
        return None
    rings = ring_scan(sums)
    plain = {"bright-field edge"} | ({"full"} if rings else set())
    results = {k: refine_ellipse(sums[k], *bands[k], iterations=4, compress=k not in plain,
                                 neighbour_floor=BF_NEIGHBOUR_FLOOR if k == "bright-field edge" else None)
               for k in usable}
    q = {k: v[2] for k, v in results.items()}
    order = [k for k in ("full", ISOTROPIC, "bright-field edge") if k in q]
    band = next((k for k in order if q[k] >= _MIN_QUALITY[k]), max(order, key=lambda k: q[k]))
    ratio, theta, quality = results[band]
    if quality < ELLIPSE_QUALITY_FLOOR:
        return None
    if band == "bright-field edge":
        ratio = 1.0 + (ratio - 1.0) / edge_curvature_factor(sums[band], *bands[band])
    return ratio, theta, quality, band


#: :func:`ellipse_bands` starts its bands this many times a beam stop's radius from the
#: origin (plus 2 px), clear of the stop's edge and of the diffuse glow just outside it.
STOP_BAND_GAIN = 1.2

#: :func:`disk_offsets` keeps, brightest first, at most this many disks of the aligned mean.
DISK_SHAPE_MAX_DISKS = 24

#: :func:`disk_offsets` keeps the disks that together hold this fraction of the summed
#: information (inverse variance of e) of the disks fitted on the aligned mean.
DISK_SHAPE_INFORMATION = 0.95

#: Variance added per component (e1, e2) to every disk fit of
#: :func:`combine_disk_ellipses`: the pixel sampling's error of one disk at one sub-pixel
#: phase, which the fit's own covariance does not hold (noise-free simulated crystal
#: patterns, radius 8 px, edge 0.3 px: 1e-3 to 3e-3 per disk).
DISK_SHAPE_FLOOR = 2e-3

#: :func:`combine_disk_ellipses` weighs down fits more than this many of their own
#: standard deviations from the combined value (Huber).
DISK_SHAPE_HUBER = 3.0

#: Where the whole pattern's log-polar fit looks isotropic although not every pattern
#: is rings (Bragg disks over diffuse scattering, or a polycrystal's spotty rings),
#: ``preprocess`` takes the disk shapes only if the aligned mean shows at least this many
#: Bragg disks: a single crystal's, not a polycrystal's (whose rings are smooth in the mean).
DISK_SHAPE_MIN_BRAGG = 2

#: Fewest disk fits, and most, that ``preprocess`` uses for the disk-shape ellipse.
DISK_SHAPE_MIN_FITS = 30
DISK_SHAPE_MAX_FITS = 3000


def disk_offsets(aligned: np.ndarray, cover: np.ndarray, radius: float) -> tuple[np.ndarray, float, float]:
    """Disks of the origin-aligned mean whose shapes measure the ellipse, and their radius.

    Candidates are the local maxima of the mean convolved with a disk of the given
    radius (at least 1.2 radii apart, at least 1% of the highest); the brightest
    DISK_SHAPE_MAX_DISKS are fitted on the mean itself with the disk model of
    :func:`~py4dstem_prenet.refine.disk_model_centre`, and those whose fits count are
    kept, most informative first, until they hold DISK_SHAPE_INFORMATION of the
    information.

    Parameters
    ----------
    aligned, cover : numpy.ndarray
        (Q_Nx, Q_Ny) summed 'aligned' and 'aligned cover' of :meth:`PreNet.aligned_sum`.
    radius : float
        First disk radius, pixels (the bright-field disk's).

    Returns
    -------
    offsets : numpy.ndarray
        (M, 2) disk centres relative to the origin, pixels (M may be 0).
    radius, edge_width : float
        The median fitted radius and edge width (sigma) of the kept disks, pixels
        (``radius`` and 1 where none is kept).

    Raises
    ------
    ValueError
        If ``aligned`` and ``cover`` are not finite 2-D arrays of one shape or the
        radius is not finite and > 0.
    """
    from scipy import ndimage, signal

    aligned, cover = np.asarray(aligned, float), np.asarray(cover, float)
    if (aligned.ndim != 2 or aligned.shape != cover.shape
            or not (np.isfinite(aligned).all() and np.isfinite(cover).all())):
        raise ValueError(f"aligned and cover must be finite 2-D arrays of one shape, got {aligned.shape} and "
                         f"{cover.shape}")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be finite and > 0, got {radius}")
    h, w = aligned.shape
    mean = np.where(cover > 0, aligned / np.maximum(cover, 1e-12), 0.0)
    half = int(math.ceil(radius))
    g = np.arange(-half, half + 1)
    kernel = (np.hypot(g[:, None], g[None, :]) <= radius).astype(float)
    # by FFT: a direct convolution costs radius^2 per pixel (15 s for one 1024^2 pattern)
    smooth = signal.fftconvolve(mean, kernel / kernel.sum(), mode="same")
    peak = (smooth == ndimage.maximum_filter(smooth, size=max(3, int(1.2 * radius)))) & (smooth > 0.01 * smooth.max())
    reach = radius + DISK_MODEL_MARGIN + 1
    cand = np.argwhere(peak).astype(float)
    cand = cand[(cand[:, 0] >= reach) & (cand[:, 0] <= h - 1 - reach)
                & (cand[:, 1] >= reach) & (cand[:, 1] <= w - 1 - reach)]
    cand = cand[np.argsort(-smooth[tuple(cand.astype(int).T)], kind="stable")][:DISK_SHAPE_MAX_DISKS]
    none = np.zeros((0, 2)), float(radius), 1.0
    if not len(cand):
        return none
    fit = disk_fits(torch.from_numpy(mean)[None, None], torch.from_numpy(cand), radius,
                    torch.zeros(len(cand), dtype=torch.long))
    ok = fit.ok.numpy()
    if not ok.any():
        return none
    shape, cov = fit.shape.numpy()[ok], fit.covariance.numpy()[ok]
    variance = cov[:, 4, 4] + cov[:, 5, 5]
    order = np.argsort(variance, kind="stable")
    info = np.cumsum(1 / variance[order])
    keep = order[: int(np.searchsorted(info, DISK_SHAPE_INFORMATION * info[-1])) + 1]
    return (shape[keep, :2] - np.array([h // 2, w // 2], float), float(np.median(shape[keep, 2])),
            float(np.exp(np.median(shape[keep, 3]))))


def combine_disk_ellipses(e12: np.ndarray, covariance: np.ndarray) -> tuple[float, float, float]:
    """One ellipse from many disks' shapes: a robust inverse-covariance mean of their (e1, e2).

    Each fit's covariance gets DISK_SHAPE_FLOOR^2 added per component; fits more than
    DISK_SHAPE_HUBER of their standard deviations from the mean are weighed down
    (Huber, iterated). The standard error is scaled up by the scatter where the fits
    scatter more than their covariances say.

    Parameters
    ----------
    e12 : numpy.ndarray
        (K, 2) per-disk (e1, e2) (see :func:`~py4dstem_prenet.conventions.ellipse_to_e12`).
    covariance : numpy.ndarray
        (K, 2, 2) their covariances.

    Returns
    -------
    ratio, theta, sigma : float
        a/b >= 1, theta in radians [0, pi), and the standard error of the combined
        (e1, e2), per component (root of half the trace of its covariance).

    Raises
    ------
    ValueError
        If the shapes do not match, there are fewer than 2 fits, a value is not finite
        or a covariance plus DISK_SHAPE_FLOOR^2 is not positive-definite.
    """
    e = np.asarray(e12, float)
    c = np.asarray(covariance, float)
    if e.ndim != 2 or e.shape[1] != 2 or c.shape != (len(e), 2, 2) or len(e) < 2:
        raise ValueError(f"need e12 (K, 2) and covariance (K, 2, 2) with K >= 2, got {e.shape} and {c.shape}")
    if not (np.isfinite(e).all() and np.isfinite(c).all()):
        raise ValueError("e12 and covariance must be finite (pass only the fits that count)")
    c = c + DISK_SHAPE_FLOOR**2 * np.eye(2)
    if not (smallest_eigenvalue(c) > 0).all():
        raise ValueError("every covariance must be positive-definite (pass only the fits that count)")
    inv = np.linalg.inv(c)
    weight = np.ones(len(e))
    for _ in range(10):
        info = (inv * weight[:, None, None]).sum(0)
        mean = np.linalg.solve(info, (inv * weight[:, None, None] @ e[..., None]).sum(0))[:, 0]
        d = e - mean
        dist = np.sqrt(np.maximum(np.einsum("ki,kij,kj->k", d, inv, d), 0.0))  # >= 0 but for rounding
        weight = np.minimum(1.0, DISK_SHAPE_HUBER / np.maximum(dist, 1e-12))
    scale = max(1.0, float((weight * dist**2).sum() / max(weight.sum() - 2, 1)))
    sigma = math.sqrt(0.5 * np.trace(np.linalg.inv(info)) * scale)
    ratio, theta = e12_to_ellipse(mean)
    return float(ratio), float(theta), sigma
