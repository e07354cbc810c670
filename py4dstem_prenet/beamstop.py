"""Beam stops: finding one in a pattern, and the origin hidden behind it.

A beam stop is put over the direct beam (selected-area patterns, some 4D-STEM
set-ups), so where a pattern has one, the origin lies under it. An opaque stop breaks
Friedel's law, which pairs the pattern at q with the pattern at -q about the origin:
:func:`detect_beam_stop` finds the dark region whose mirror image through the
pattern's inversion centre (:func:`inversion_centre`) is bright. When the stop also
sits at the detector edge, the inversion about the origin keeps too little of the
detector for any symmetry measurement; what is left is the diffuse scattering
(inelastic and thermal), which falls off with the distance from the direct beam.
:func:`origin_behind_stop` fits that fall-off.

Conventions: patterns are (Q_Nx, Q_Ny) counts; positions (qx, qy) in pixels, pixel
centres at integers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from scipy import ndimage

from .refine import intensity_symmetry_map

__all__ = ["detect_beam_stop", "inversion_centre", "origin_behind_stop"]

#: Blocks (the coarse grid on which darkness is judged) hold at least this many counts
#: where the pattern is at its mean level, or, where those blocks find no stop, at its
#: median level (dev scan sums of a crystal, 1e4 counts per pattern, whose direct beam
#: and Bragg disks hold most counts: about 5 counts per block of the mean's size off
#: them, too few to read dark; the stop found in 42 of 60 sums with the stop half a tip
#: radius off the beam, against 40 with the mean's blocks alone) ...
BLOCK_COUNTS = 16.0

#: ... and the grid has at most this many blocks across the detector's short side.
GRID_BLOCKS = 64

#: A block is dark when its counts (above what the stop reads, the FLOOR_PERCENTILE of
#: the blocks: stray counts, an offset left in the data) are at most this fraction of
#: those expected there: the counts of its Friedel mate (the block mirrored through the
#: pattern's inversion centre, :func:`inversion_centre`; the least of the 3 x 3 blocks
#: about it), or, where the mate is off the
#: detector, the STOP_LEVEL_PERCENTILE of the brighter blocks within STOP_WINDOW ...
DARK_FRACTION = 0.1

#: ... and the expected counts are at least this many (reading at most a tenth of them
#: then has a chance below 1e-3 where the pattern is recorded).
MIN_EXPECTED = 8.0

#: Percentile of the blocks taken as what a stop reads (0 where it reads no counts) ...
FLOOR_PERCENTILE = 0.5

#: ... and a dark block reads at most this many Poisson standard deviations above it.
FLOOR_SIGMAS = 3.0

#: Pixels read as dark as the stop where their 3 x 3 mean is nearer its level than the
#: expected one, or within half a count of it.
HALF_COUNT = 0.5 / 9

#: Percentile of the blocks around (those that read more than twice the floor) taken as
#: the expected level where the Friedel mate is off the detector: below the median, so
#: that Bragg disks do not raise it.
STOP_LEVEL_PERCENTILE = 30.0

#: Half-width of that window, as a fraction of the detector's short side.
STOP_WINDOW = 0.125

#: The dark blocks of a stop expect at least this many counts in all (what it hides).
MIN_HIDDEN = 100.0

#: Dark regions tried as the stop, those that hide the most expected counts first.
MAX_STOP_CANDIDATES = 6

#: Beyond its core's blocks, a stop grows over pixels that read nearer its own level
#: than the expected one, over 3 x 3 pixels, where the expected counts there are at
#: least this many (a chance of 2% to read none).
PIXEL_EXPECTED = 4.0

#: A stop hides the direct beam: it covers the disk of this radius (px) about the
#: pattern's inversion centre ...
HIDDEN_RADIUS = 3

#: ... at least this fraction of every circle of it.
COVERED = 0.9

#: ... and the pattern off the stop is symmetric about that centre: the correlation of
#: its blocks with their mirror images is at least this (0.71-0.99 on dev stops, 1e5-1e6
#: counts; near 0 about a wrong centre, where a bright disk's mirror image is dark).
MIN_SYMMETRY = 0.5

#: ... judged on at least this fraction of the detector (off the stop and its mirror
#: image; a network of dark gaps taken for a stop leaves little).
SYMMETRY_SUPPORT = 0.25

#: Where the inversion centre is not on the stop (a beam at the detector's edge, whose
#: inversion keeps too little of the pattern), the diffuse background's centre must be,
#: where its fall-off explains at least this adjusted R^2 ...
RADIAL_MIN = 0.7

#: ... and it lies on the stop to within this many pixels.
HIDES_BEAM_PX = 2

#: A stop's rod is a ray from its tip to the detector's edge of at least this many
#: pixels ...
ROD_MIN_LENGTH = 8

#: ... at least this fraction of whose pixels read as dark as the stop against the
#: pattern around.
ROD_DARK = 0.75

#: Area of a beam stop, as fractions of the detector.
MIN_AREA, MAX_AREA = 0.002, 0.4

#: Centres tried for the stop's Friedel mates: the highest local maxima of the
#: pattern's self-convolution (:func:`inversion_centre`; a lattice whose direct beam is
#: hidden is about as symmetric about a half-lattice point, a bright crescent of a
#: bright-field disk half under the stop about its own middle. Dev scan sums with the
#: stop half a tip radius off the beam, 1e3-1e5 counts per pattern: the stop found in 40
#: of 60 with six centres, 37 with four; in one at 1e5 the true centre was the 5th peak,
#: and its origins went from 10.3 to 0.03 px off. In 36 scans without a stop, none was
#: found either way) ...
MAX_CENTRES = 6

#: ... at least this many px apart ...
CENTRE_SPACING = 2

#: ... that reach at least this fraction of the highest.
CENTRE_PEAK = 0.6

#: Smallest size (px across) of the blocks' map of :func:`_centre_off` on a large
#: detector (1024 px crystal patterns without a stop: 0.6 s a stop judged at full size,
#: 0.3 s on 2 px blocks; 512 px dev scans with the stop half a tip radius off the beam,
#: 1e4 counts: 8 of 12 stops found at full size, 6 before stops were judged again
#: about this centre, 8 on 2 px blocks, not the same 8).
CENTRE_OFF_PX = 512

#: Most candidate centres tried behind a stop (its pixels are subsampled beyond this).
MAX_CANDIDATES = 4000


def _without_hot_pixels(x: np.ndarray) -> np.ndarray:
    """Finite counts >= 0, isolated hot pixels lowered to their brightest neighbour."""
    x = np.clip(np.where(np.isfinite(x), x, 0.0), 0.0, None)
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    return np.minimum(x, ndimage.maximum_filter(x, footprint=ring, mode="nearest"))


def inversion_centre(pattern: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The centre about which a pattern is most nearly inversion-symmetric, to half a pixel.

    Friedel's law pairs the pattern at q with the pattern at -q about the origin; the
    self-convolution of the pattern, sum over q of I(q) I(s - q), then peaks at s = 2
    times the origin, where every pair adds up (Bragg disk pairs, rings, the diffuse
    halo), whether or not the direct beam itself is seen (a beam stop reads no counts
    and adds nothing). I is the square root of the counts (Poisson noise evened out),
    isolated hot pixels first lowered to their brightest neighbour (a hot pixel's
    square would peak at its own place), 0 on pixels that are not valid. A perfect
    lattice of equal disks is as symmetric about its half-lattice points; a pattern's
    envelope tells them apart.

    Parameters
    ----------
    pattern : numpy.ndarray
        (Q_Nx, Q_Ny) counts; non-finite and negative pixels read as 0.
    valid : numpy.ndarray, optional
        (Q_Nx, Q_Ny) bool, False on pixels to leave out.

    Returns
    -------
    numpy.ndarray
        (2,) (qx, qy) pixels, on the half-pixel grid.

    Raises
    ------
    ValueError
        If ``pattern`` is not 2D or ``valid`` does not have its shape.
    """
    x = np.asarray(pattern, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"pattern must be 2D (Q_Nx, Q_Ny), got shape {x.shape}")
    v = np.ones(x.shape, bool) if valid is None else np.asarray(valid, bool)
    if v.shape != x.shape:
        raise ValueError(f"valid must have the pattern's shape {x.shape}, got {v.shape}")
    return _centre_candidates(np.where(v, _without_hot_pixels(x), 0.0), 1)[0]


def _centre_candidates(x: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` (K, 2) centres (qx, qy) px, on the half-pixel grid, about which the
    counts ``x`` (hot pixels lowered) are most nearly inversion-symmetric: the highest
    local maxima of the self-convolution of their square root (see
    :func:`inversion_centre`), at least CENTRE_SPACING apart and at least
    CENTRE_PEAK of the highest."""
    y = np.sqrt(x)
    size = (2 * x.shape[0], 2 * x.shape[1])
    conv = np.fft.irfft2(np.fft.rfft2(y, size) ** 2, size)
    peaks = np.argwhere((conv == ndimage.maximum_filter(conv, 4 * CENTRE_SPACING + 1))
                        & (conv >= CENTRE_PEAK * conv.max()))
    order = np.argsort(-conv[tuple(peaks.T)], kind="stable")[:count]
    return peaks[order].astype(np.float64) / 2


def _mirrored(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``x`` mirrored through ``centre`` (on the half-pixel grid): x(2 centre - q), nan off the detector."""
    h, w = x.shape
    tx, ty = (int(round(2 * v)) for v in centre)
    rows, cols = tx - np.arange(h), ty - np.arange(w)
    out = np.full((h, w), np.nan)
    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    out[np.ix_(ok_r, ok_c)] = x[np.ix_(rows[ok_r], cols[ok_c])]
    return out


def _window_level(counts: np.ndarray, radius: int, floor: float) -> np.ndarray:
    """STOP_LEVEL_PERCENTILE of the blocks within ``radius`` blocks that read more than
    twice ``floor`` (nan where fewer than half of the window's blocks on the detector do)."""
    from numpy.lib.stride_tricks import sliding_window_view

    k = 2 * radius + 1
    padded = np.pad(np.where(counts > 2 * floor, counts, np.inf), radius, constant_values=np.inf)
    windows = np.sort(sliding_window_view(padded, (k, k)).reshape(*counts.shape, k * k), axis=-1)
    lit = np.isfinite(windows).sum(axis=-1)
    on = sliding_window_view(np.pad(np.ones(counts.shape), radius), (k, k)).sum(axis=(-2, -1))
    rank = np.floor(STOP_LEVEL_PERCENTILE / 100 * np.maximum(lit - 1, 0)).astype(int)
    level = np.take_along_axis(windows, rank[..., None], axis=-1)[..., 0]
    return np.where(lit >= 0.5 * on, level, np.nan)


def _block_sums(x: np.ndarray, block: int) -> np.ndarray:
    """Sums over blocks of ``block`` x ``block`` pixels (the remainder rows and columns left out)."""
    nbx, nby = x.shape[0] // block, x.shape[1] // block
    return x[:nbx * block, :nby * block].reshape(nbx, block, nby, block).sum(axis=(1, 3))


def _per_pixel(blocks: np.ndarray, block: int, shape: tuple[int, int]) -> np.ndarray:
    """Block values spread over their pixels (nan on the remainder rows and columns)."""
    out = np.full(shape, np.nan)
    out[:blocks.shape[0] * block, :blocks.shape[1] * block] = np.kron(blocks, np.ones((block, block)))
    return out


def detect_beam_stop(pattern: np.ndarray) -> np.ndarray | None:
    """The beam stop of one pattern (or of a sum of patterns), if it has one.

    A beam stop is opaque and hides the direct beam: it reads (next to) nothing where
    the pattern would read many counts, and it breaks Friedel's law, which pairs the
    pattern at q with the pattern at -q about the origin. Darkness is judged on a grid
    of blocks (BLOCK_COUNTS counts at the pattern's mean level, or, where that finds
    no stop, at its median level; at most GRID_BLOCKS across; see DARK_FRACTION):
    against the block's Friedel mate through the pattern's inversion centre (each of
    the MAX_CENTRES most likely in turn), so that the dark gaps between Bragg disks or
    rings, and a pattern's fall-off into a dim corner, which Friedel's law maps onto gaps
    and fall-off, are not dark; or, where the mate is off the detector, against the
    pattern around. Of the connected sets of dark blocks that hide at least MIN_HIDDEN
    expected counts (most first, up to MAX_STOP_CANDIDATES), the stop is the first
    that, grown over the pixels nearer its own level than the expected one (see
    PIXEL_EXPECTED; its tip, whose mate is itself, is reached so), its holes of a
    block or less filled, covers MIN_AREA to MAX_AREA of the detector and hides the
    direct beam (see HIDDEN_RADIUS, MIN_SYMMETRY, RADIAL_MIN). Of the stops so found
    through each centre, the one off which the pattern is most nearly symmetric is
    returned, with its rod (:func:`_rod`, where its mates did not show it) and its edge
    pixels. Where none hides the beam about its centre, each is judged again about the
    centre of the pattern off it: through the origin, a stop well off the beam may
    have as mates its own tip and a dim background, and read no darker than they,
    while grown through another centre it does not cover that centre.

    A pattern summed over a scan shows a stop far better than one pattern: the stop
    stays on the detector while the counts add up.

    Parameters
    ----------
    pattern : numpy.ndarray
        (Q_Nx, Q_Ny) counts above the detector's dark level, any real dtype;
        non-finite and negative pixels read as 0.

    Returns
    -------
    numpy.ndarray or None
        (Q_Nx, Q_Ny) bool, True on the stop; None when there is none.

    Raises
    ------
    ValueError
        If ``pattern`` is not a 2D array.
    """
    x = np.asarray(pattern, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"pattern must be 2D (Q_Nx, Q_Ny), got shape {x.shape}")
    x = _without_hot_pixels(x)
    h, w = x.shape
    mean = x.sum() / x.size
    if mean <= 0 or min(h, w) < 16:
        return None
    mean3 = ndimage.uniform_filter(x, 3, mode="nearest")
    centres = _centre_candidates(x, MAX_CENTRES)
    # blocks sized by the mean level, then, where they find no stop, by the median level
    # (a dim background between a bright direct beam and bright disks, which hold most
    # of the counts: there the mean's blocks hold too few counts to read dark)
    median = float(np.median(x))
    blocks = [int(np.clip(max(np.ceil(np.sqrt(BLOCK_COUNTS / level)), np.ceil(min(h, w) / GRID_BLOCKS)), 2,
                          min(h, w) // 8)) for level in ((mean, median) if median > 0 else (mean,))]
    # of the stops grown through each centre, the one off which the pattern is most nearly
    # symmetric (a stop grown about a wrong centre leaves a bright crescent or disk whose
    # mate is dark); where none hides the beam about the centre it was grown through,
    # each is judged again about the centre of the pattern off it
    kept: dict[int, list[Iterator[tuple[np.ndarray, np.ndarray]]]] = {}
    for block in dict.fromkeys(blocks):
        levels = _levels(x, block)
        found = []
        for centre in centres:
            stops, kept_stops = itertools.tee(_stops_about(x, mean3, centre, block, *levels))
            kept.setdefault(block, []).append(kept_stops)
            found.append(_hiding(x, stops, centre, block))
        found = [f for f in found if f is not None]
        if found:
            return max(found, key=lambda f: f[1])[0]
    for block, grown in kept.items():
        scores: dict[bytes, float | None] = {}  # a stop grown through several centres is judged once
        found = [f for f in (_hiding(x, stops, None, block, scores) for stops in grown) if f is not None]
        if found:
            return max(found, key=lambda f: f[1])[0]
    return None


def _hiding(x: np.ndarray, stops: Iterable[tuple[np.ndarray, np.ndarray]], centre: np.ndarray | None,
            block: int, scores: dict[bytes, float | None] | None = None) -> tuple[np.ndarray, float] | None:
    """The first of ``stops`` (pairs of a stop and the pixels as dark, see
    :func:`_stops_about`) that hides the beam about ``centre`` (:func:`_hidden_beam`),
    with its edge pixels and its rod (:func:`_rod`), and how well; or None. ``scores``
    keeps the scores of the stops judged before, by their bytes."""
    scores = {} if scores is None else scores
    for stop, dark_around in stops:
        # judged with its edge pixels, as it is returned (the pixel the 3 x 3 mean took)
        key = np.packbits(stop).tobytes()
        if key not in scores:
            scores[key] = _hidden_beam(x, ndimage.binary_dilation(stop), centre, block)
        score = scores[key]
        if score is not None:
            # with its edge pixels, which it partly covers (and whose edge would pull the symmetry)
            return ndimage.binary_dilation(stop | _rod(stop, dark_around)), score
    return None


def _levels(x: np.ndarray, block: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """The counts ``x`` summed over blocks of ``block`` px, what a stop reads per block
    (the floor), and the level of the blocks around each, per block and per pixel (see
    :func:`_stops_about`)."""
    h, w = x.shape
    counts = _block_sums(x, block)
    floor = float(np.percentile(counts, FLOOR_PERCENTILE))
    reach = max(1, int(round(STOP_WINDOW * min(counts.shape))))
    window = _window_level(counts, reach, floor)
    # per pixel (inside a large stop from twice the window, on blocks twice as large)
    around = _per_pixel(window, block, (h, w)) / block**2
    wide = _per_pixel(_window_level(_block_sums(x, 2 * block), reach, 4 * floor), 2 * block,
                      (h, w)) / (2 * block)**2
    return counts, floor, window, np.where(np.isfinite(around), around, wide)


def _stops_about(x: np.ndarray, mean3: np.ndarray, centre: np.ndarray, block: int, counts: np.ndarray,
                 floor: float, window: np.ndarray, around: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The stops that :func:`detect_beam_stop` grows with Friedel mates taken through
    ``centre`` (2,) px, most hidden counts first, each that covers MIN_AREA to MAX_AREA
    of the detector, with the pixels that read as dark as it against the pattern around
    (where its rod is looked for): ``x`` the counts (hot pixels lowered), ``mean3``
    their 3 x 3 means, ``counts`` their sums over blocks of ``block`` px, ``floor``
    what the stop reads per block, ``window`` the level of the blocks around (per
    block) and ``around`` (per pixel)."""
    h, w = x.shape
    mirror = _mirrored(x, centre)
    # the mate's counts: the least of the 3 x 3 blocks about it (a mirror image a pixel
    # off, or a Bragg disk brighter than its Friedel mate, does not make a gap dark);
    # nan where any of the block's mate is off the detector
    mate = _block_sums(mirror, block)
    mate = np.where(np.isfinite(mate), ndimage.minimum_filter(np.nan_to_num(mate, nan=np.inf), 3, mode="nearest"),
                    np.nan)
    expected = np.where(np.isfinite(mate), mate, window) - floor
    level = np.nan_to_num(expected)
    # dark against what is expected, and at the floor to within its Poisson noise (a dim
    # part of a pattern mirrored onto a bright one through a wrong centre is not)
    dark = ((level >= MIN_EXPECTED) & (counts - floor <= DARK_FRACTION * level)
            & (counts - floor <= FLOOR_SIGMAS * np.sqrt(max(floor, 1.0))))
    labels, n = ndimage.label(dark, structure=np.ones((3, 3)))
    hidden = ndimage.sum_labels(level, labels, np.arange(1, n + 1)) if n else np.zeros(0)
    # pixel level: against the least of the mate's 5 x 5 neighbourhood (over 3 x 3 pixels),
    # or, where it is off the detector, the pattern around
    off = ndimage.binary_dilation(~np.isfinite(mirror), iterations=3)
    mate_px = ndimage.minimum_filter(ndimage.uniform_filter(np.nan_to_num(mirror), 3, mode="nearest"), 5,
                                     mode="nearest")
    expected_px = np.nan_to_num(np.where(off, around, mate_px))
    telling = 9 * (expected_px - floor / block**2) >= PIXEL_EXPECTED
    for k in np.argsort(-hidden)[:MAX_STOP_CANDIDATES]:
        if hidden[k] < MIN_HIDDEN:
            break
        core = _per_pixel((labels == k + 1).astype(float), block, (h, w)) > 0
        own = float(np.median(x[core]))
        stop_like = mean3 <= own + np.maximum(0.5 * (expected_px - own), HALF_COUNT)
        # the tip is its own mirror image: within the disk about the centre that reads as
        # dark as the stop against the pattern around, and as far beyond as the mate's
        # neighbourhood reaches into it (3 px: the 3 x 3 mean, the 5 x 5 least, rounding),
        # that pattern is what is expected; a disk of HIDDEN_RADIUS - 1 will do, as the
        # 3 x 3 mean takes a pixel off the tip beside a bright crescent of the beam (a stop
        # off the beam, whose tip hides only 2-3 px about the origin)
        dark_around = mean3 <= own + np.maximum(0.5 * (np.nan_to_num(around) - own), HALF_COUNT)
        hidden_disk = _covered_radius(dark_around, centre)
        tip = np.zeros((h, w), bool)
        if hidden_disk >= HIDDEN_RADIUS - 1:
            tip = np.hypot(*(np.indices((h, w)) - centre[:, None, None])) <= hidden_disk + 4
        grow = (stop_like | (tip & dark_around))
        near = ndimage.binary_dilation(core, iterations=block)
        stop = ndimage.binary_propagation(core & grow, mask=grow & (near | telling | tip))
        # its holes of stray counts (a block or less), not a disk it surrounds
        holes, n_holes = ndimage.label(ndimage.binary_fill_holes(stop) & ~stop)
        if n_holes:
            small = ndimage.sum_labels(np.ones((h, w)), holes, np.arange(1, n_holes + 1)) <= block**2
            stop |= np.concatenate([[False], small])[holes]
        if MIN_AREA * x.size <= stop.sum() <= MAX_AREA * x.size:
            yield stop, dark_around


def _rod(stop: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """The rod that holds a stop: a straight ``dark`` band from the stop's tip to the
    detector's edge, where one is (else nothing).

    Where the pattern around the rod is too dim, or its Friedel mates are gaps between
    Bragg disks, the rod does not read as a stop by its mates; it is found as the ray
    from the tip's centre (the stop's deepest point), beyond its radius, along which at
    least ROD_DARK of the pixels are dark up to the edge (every other ray crosses a
    ring or a disk), its width the median dark run across the ray; the band is its dark
    pixels (bool (Q_Nx, Q_Ny)).
    """
    h, w = stop.shape
    depth = ndimage.distance_transform_edt(np.pad(stop, 1))[1:-1, 1:-1]
    centre = np.array(np.unravel_index(int(np.argmax(depth)), stop.shape), float)
    start = max(int(depth.max()), 1)
    angles = np.deg2rad(np.arange(0.0, 360.0, 1.0))
    best, best_angle, best_length = 0.0, None, 0
    for a in angles:
        d = np.array([np.cos(a), np.sin(a)])
        steps = np.arange(start, h + w)
        pts = np.round(centre[None] + steps[:, None] * d[None]).astype(int)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
        pts = pts[inside]
        if len(pts) < ROD_MIN_LENGTH:
            continue
        fraction = float(dark[pts[:, 0], pts[:, 1]].mean())
        if fraction > best:
            best, best_angle, best_length = fraction, a, len(pts)
    if best_angle is None or best < ROD_DARK:
        return np.zeros_like(stop)
    d = np.array([np.cos(best_angle), np.sin(best_angle)])
    normal = np.array([-d[1], d[0]])
    runs = []
    for t in range(start, start + best_length, 2):
        p = centre + t * d
        run = 0
        for side in (1, -1):
            k = 1
            while True:
                q = np.round(p + side * k * normal).astype(int)
                if not (0 <= q[0] < h and 0 <= q[1] < w and dark[q[0], q[1]]):
                    break
                k += 1
            run += k - 1
        runs.append(run + 1)
    half = 0.5 * float(np.median(runs)) + 1
    rows, cols = np.indices((h, w))
    rel = np.stack([rows - centre[0], cols - centre[1]], axis=-1)
    along = rel @ d
    across = np.abs(rel @ normal)
    return dark & (along >= 0) & (across <= half)


def _covered_radius(region: np.ndarray, centre: np.ndarray) -> int:
    """The largest radius (px) up to which ``region`` covers at least COVERED of every
    circle about ``centre`` (the parts on the detector)."""
    r = np.round(np.hypot(*(np.indices(region.shape) - np.asarray(centre, float)[:, None, None]))).astype(int)
    n = np.bincount(r.ravel())
    fraction = np.bincount(r.ravel(), region.ravel()) / np.maximum(n, 1)
    short = np.flatnonzero((fraction < COVERED) & (n > 0))
    return int(short[0]) - 1 if len(short) else len(n) - 1


def _on(region: np.ndarray, point: np.ndarray) -> bool:
    """Whether ``point`` (2,) px lies on ``region`` or within HIDES_BEAM_PX of it."""
    i, j = np.clip(np.round(point).astype(int), 0, np.array(region.shape) - 1)
    return bool(ndimage.binary_dilation(region, iterations=HIDES_BEAM_PX)[i, j])


def _hidden_beam(x: np.ndarray, stop: np.ndarray, centre: np.ndarray | None, block: int) -> float | None:
    """How well ``stop`` hides the direct beam: None where it does not; else the
    pattern's Friedel symmetry about ``centre`` off the stop, or 0 where the radial
    fall-off alone places the beam on it. Where ``centre`` is None, the centre about
    which the pattern off the stop is most nearly symmetric (:func:`_centre_off`), and
    no fall-off.

    It covers the disk of HIDDEN_RADIUS about the pattern's inversion centre (see
    COVERED; the half-lattice point of a lattice, as symmetric as its origin, lies in
    a gap, at its edge), and the pattern off the stop and its
    mirror image is symmetric about that centre (:func:`_friedel_symmetry` at least
    MIN_SYMMETRY: the centre is right, not a bright disk's mirror image); or, where the
    centre is not on it (a beam at the detector's edge, whose inversion keeps too
    little of the pattern), the point (on a grid of blocks) about which the diffuse
    background is most nearly a function of the distance (see
    :func:`origin_behind_stop`; an adjusted R^2 of at least RADIAL_MIN) lies on it.
    """
    recentre = centre is None
    if recentre:
        centre = _centre_off(x, stop)
    if _covered_radius(stop, centre) >= HIDDEN_RADIUS:
        symmetry = _friedel_symmetry(x, stop, centre, block)
        return symmetry if symmetry >= MIN_SYMMETRY else None
    if recentre:
        return None
    step = max(2, int(round(min(x.shape) / 32)))
    centres, z = _block_background(x, stop, step)
    if len(z) < 16:
        return None
    rows, cols = np.meshgrid(np.arange(x.shape[0] // step), np.arange(x.shape[1] // step), indexing="ij")
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1) * step + (step - 1) / 2
    quality = _radial_fit_quality(centres, z, grid, step)
    return 0.0 if quality.max() >= RADIAL_MIN and _on(stop, grid[int(np.argmax(quality))]) else None


def _centre_off(x: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The centre (2,) px, on the half-pixel grid, about which the counts ``x`` off
    ``stop`` (widened by 2 px) are most nearly inversion-symmetric: the peak of
    :func:`~py4dstem_prenet.refine.intensity_symmetry_map`, a correlation over the
    pixels that the inversion keeps, which the stop's dark does not pull as it pulls
    the self-convolution. On a detector at least 2 x CENTRE_OFF_PX across, the map is
    of blocks of pixels (CENTRE_OFF_PX or more across; the centre to half a block)."""
    valid = ~ndimage.binary_dilation(stop, iterations=2)
    step = max(1, min(x.shape) // CENTRE_OFF_PX)
    if step > 1:
        x, valid = _block_sums(x, step), _block_sums(valid.astype(float), step) == step**2
    score = intensity_symmetry_map(torch.from_numpy(x)[None, None], torch.from_numpy(valid))[0]
    centre = np.array(np.unravel_index(int(torch.argmax(score)), score.shape), float) / 2
    return np.round(2 * (centre * step + (step - 1) / 2)) / 2


def _friedel_symmetry(x: np.ndarray, stop: np.ndarray, centre: np.ndarray, block: int) -> float:
    """Correlation of the square root of block counts with that of their mirror images
    through ``centre``, over the blocks whose pixels and mirror pixels are all on the
    detector and off ``stop`` (widened by 3 px); nan where fewer than SYMMETRY_SUPPORT
    of the blocks (or 16) are."""
    out = ndimage.binary_dilation(stop, iterations=3)
    mirror = _mirrored(x, centre)
    ok = np.isfinite(mirror) & ~out & ~(_mirrored(out.astype(float), centre) > 0)
    whole = _block_sums(ok.astype(float), block) == block**2
    if whole.sum() < max(16.0, SYMMETRY_SUPPORT * whole.size):
        return float("nan")
    a = np.sqrt(_block_sums(np.where(ok, x, 0.0), block)[whole])
    b = np.sqrt(_block_sums(np.where(ok, mirror, 0.0), block)[whole])
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def _block_background(x: np.ndarray, stop: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block centres (K, 2) and the log of each block's 30th-percentile counts (K,), stop blocks left out."""
    h, w = (x.shape[0] // block) * block, (x.shape[1] // block) * block
    tiles = x[:h, :w].reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3)
    level = np.percentile(tiles.reshape(*tiles.shape[:2], -1), 30, axis=-1)
    covered = stop[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    keep = (covered == 0) & (level > 0)
    rows, cols = np.nonzero(keep)
    centres = np.stack([rows, cols], axis=1) * block + (block - 1) / 2
    return centres, np.log(level[keep])


def _radial_fit_quality(centres: np.ndarray, z: np.ndarray, candidates: np.ndarray, bin_px: float) -> np.ndarray:
    """Adjusted R^2 of z explained by a free function of the distance to each candidate (binned)."""
    n = len(z)
    sst = ((z - z.mean()) ** 2).sum()
    r = np.linalg.norm(centres[None] - candidates[:, None], axis=2)
    k = np.round(r / bin_px).astype(int)
    nbin = int(k.max()) + 1
    flat = (k + nbin * np.arange(len(candidates))[:, None]).ravel()
    size = nbin * len(candidates)
    cnt = np.bincount(flat, minlength=size).reshape(len(candidates), nbin)
    s1 = np.bincount(flat, np.broadcast_to(z, k.shape).ravel(), minlength=size).reshape(cnt.shape)
    s2 = np.bincount(flat, np.broadcast_to(z * z, k.shape).ravel(), minlength=size).reshape(cnt.shape)
    ssr = (s2 - np.where(cnt > 0, s1**2 / np.maximum(cnt, 1), 0.0)).sum(axis=1)
    dof = n - (cnt > 0).sum(axis=1)
    return 1.0 - (ssr / np.maximum(dof, 1)) / (sst / max(n - 1, 1) + 1e-30)


def origin_behind_stop(pattern: np.ndarray, stop: np.ndarray, current: tuple[float, float] | None = None,
                       ) -> tuple[np.ndarray, float, float, float]:
    """The origin under a beam stop, from the fall-off of the diffuse background.

    The background (30th percentile of blocks of ~1/32 of the detector, which skips
    Bragg disks smaller than a block and hot pixels) is modelled as a free function of
    the distance to a centre; the centre is searched over the pixels of the stop
    (dilated by 2 blocks; every k-th pixel when there are more than MAX_CANDIDATES),
    and the fit is scored by its adjusted R^2.

    Parameters
    ----------
    pattern : numpy.ndarray
        (Q_Nx, Q_Ny) counts.
    stop : numpy.ndarray
        (Q_Nx, Q_Ny) bool, the stop (see :func:`detect_beam_stop`).
    current : tuple of float, optional
        Another origin estimate (qx0, qy0) to score the same way.

    Returns
    -------
    origin : numpy.ndarray
        (2,) pixels.
    sigma : float
        Its uncertainty, pixels (the block size: the fall-off is sampled per block).
    score : float
        Adjusted R^2 at ``origin`` (1: the background is a function of radius alone).
    score_current : float
        The same at ``current`` (nan when not given).
    """
    x = np.where(np.isfinite(pattern), np.asarray(pattern, dtype=np.float64), 0.0)
    block = max(2, int(round(min(x.shape) / 32)))
    centres, z = _block_background(x, stop, block)
    reach = ndimage.binary_dilation(stop, iterations=2 * block)
    cand = np.argwhere(reach)[:: max(1, int(reach.sum()) // MAX_CANDIDATES)].astype(float)
    if len(z) < 16 or len(cand) == 0:
        return np.full(2, np.nan), float("inf"), float("nan"), float("nan")
    q = _radial_fit_quality(centres, z, cand, block)
    best = int(np.argmax(q))
    score_current = float("nan")
    if current is not None:
        score_current = float(_radial_fit_quality(centres, z, np.asarray(current, float)[None], block)[0])
    return cand[best], float(block), float(q[best]), score_current
