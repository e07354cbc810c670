"""The py4DSTEM adapter: ``datacube = prenet.preprocess(datacube)``.

Cuts the scan positions of a DataCube into blocks, runs PreNet on each
(:class:`~py4dstem_prenet.engine.PreNet`: denoiser, centre network + Friedel edge
refinement, ellipse network), in this process or on a dask cluster, then uses the
scan as a whole where one pattern is not enough (low-count patterns measured on
pooled 3 x 3 neighbourhoods; origins far from the smooth descan re-measured), and
writes the results back as py4DSTEM calibrations:
``calibration.set_origin((qx0, qy0))`` and ``calibration.set_ellipse((a/b, 1, theta))``,
so that ``find_Bragg_disks``, ``braggvectors.calibrate()`` and strain mapping use them
unchanged. With ``out=`` the result goes block by block to an EMD file (memory bounded
by the block size, not the scan), and an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import warnings

import numpy as np

from . import __version__
from ._validation import check_detector_mask
from .beamstop import detect_beam_stop
from .conventions import e12_to_ellipse
from .distributed import block_bounds, map_blocks
from .engine import (DISK_SHAPE_MAX_FITS, DISK_SHAPE_MIN_BRAGG, DISK_SHAPE_MIN_FITS, ISOTROPIC, LOW_DOSE_COUNTS,
                     STOP_BAND_GAIN, PreNet, _detector_floor, add_polar_sums, combine_disk_ellipses, count_quantum,
                     detector_gain, disk_offsets, ellipse_bands, fit_ellipse_bands, measure_disk_radius,
                     measurement_block, ring_scan, whole_counts)
from .storage import EMDWriter, fill_value, open_datacube, read_block

__all__ = ["preprocess", "blur_correction", "descan_shrinkage", "origin_noise", "origin_scatter", "origins_are_noise",
           "robust_descan_fit", "scan_line_offsets", "scan_ripple", "scan_roughness", "consensus_descan_fit",
           "lattice_descan_fit", "tile_descan_model", "disk_shape_ellipse", "scan_beam_stop"]

#: Where no mask is given, a beam stop is looked for on the sum of STOP_RUNS runs of
#: STOP_RUN consecutive patterns spread evenly over the scan (all of a smaller scan) ...
STOP_RUNS, STOP_RUN = 16, 16

#: ... or of as many more runs as are expected to hold this many counts, where those
#: hold fewer (a low-dose scan), up to STOP_MAX_RUNS runs. Dev scans at 1e2 counts per
#: pattern, 32 x 32 to 64 x 64 positions (the stop centred or half a tip radius off the
#: beam, crystal or amorphous): the stop found in 21 of 24, against 8 of 24 on 256
#: patterns (2.6e4 counts); none found in 14 scans without one (1e2 and 1e3).
STOP_COUNTS = 1e6
STOP_MAX_RUNS = 1024


def _fingerprint(data, engine: PreNet, batch_size: int, fit_descan: bool, mask: np.ndarray | None) -> dict:
    """What a resumable output depends on: the input's identity and every option."""
    n = int(data.shape[0]) * int(data.shape[1])
    probe = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}):
        probe.update(np.ascontiguousarray(read_block(data, i, i + 1)).tobytes())
    fp = {"shape": [int(s) for s in data.shape], "dtype": str(np.dtype(data.dtype)), "probe": probe.hexdigest(),
          "version": __version__, "stages": engine.stages, "refine": engine.refine, "weights": engine.model_hashes(),
          "batch_size": int(batch_size), "fit_descan": bool(fit_descan),
          "mask": None if mask is None else hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()}
    f = getattr(data, "file", None)
    if f is not None and getattr(f, "filename", None):  # an h5py dataset: which file, which version
        st = os.stat(f.filename)
        fp["source"] = [os.path.abspath(f.filename), data.name, st.st_size, st.st_mtime_ns]
    return fp


#: A pattern whose origin is further than this many robust standard deviations (and at
#: least 1 px) from the scan's smooth descan fit is re-measured around the fit.
DESCAN_OUTLIER_SIGMAS = 5.0


def scan_beam_stop(data) -> np.ndarray | None:
    """The beam stop of a scan, found on the sum of its patterns.

    A stop stays put on the detector while the descan moves the pattern and the
    counts add up, so the sum shows it where one pattern has too few counts
    (:func:`~py4dstem_prenet.beamstop.detect_beam_stop`: a dark region that hides the
    diffuse background's centre). Summed are STOP_RUNS runs of STOP_RUN consecutive
    patterns spread evenly over the scan, each as measured (counts above the
    detector's floor, :func:`~py4dstem_prenet.engine.measurement_block`); where they
    hold fewer than STOP_COUNTS counts (a low-dose scan), as many more runs as are
    expected to hold that many (at most STOP_MAX_RUNS; all of a smaller scan).

    Parameters
    ----------
    data : array_like
        (R_Nx, R_Ny, Q_Nx, Q_Ny) numpy array, memory map, h5py dataset or dask array.

    Returns
    -------
    numpy.ndarray or None
        (Q_Nx, Q_Ny) bool, True on the stop; None where there is none.

    Raises
    ------
    ValueError
        If ``data`` is not 4D.
    """
    if len(data.shape) != 4:
        raise ValueError(f"data must be 4D (R_Nx, R_Ny, Q_Nx, Q_Ny), got shape {data.shape}")
    n = int(data.shape[0]) * int(data.shape[1])
    total = _run_sum(data, STOP_RUNS)
    counts = float(total.sum())
    if counts < STOP_COUNTS and n > STOP_RUNS * STOP_RUN:
        total = _run_sum(data, int(min(np.ceil(STOP_RUNS * STOP_COUNTS / max(counts, 1.0)), STOP_MAX_RUNS)))
    return detect_beam_stop(total)


def _run_sum(data, runs: int) -> np.ndarray:
    """Sum (Q_Nx, Q_Ny) of ``runs`` runs of STOP_RUN consecutive patterns of ``data``
    spread evenly over the scan (all of it where it holds no more), each as measured."""
    n = int(data.shape[0]) * int(data.shape[1])
    if n <= runs * STOP_RUN:
        bounds = [(i, min(i + STOP_RUN, n)) for i in range(0, n, STOP_RUN)]
    else:
        bounds = [(int(i), int(i) + STOP_RUN) for i in np.linspace(0, n - STOP_RUN, runs).round()]
    total = np.zeros(tuple(int(v) for v in data.shape[2:]))
    for i0, i1 in bounds:
        total += measurement_block(read_block(data, i0, i1))[:, 0].double().sum(dim=0).numpy()
    return total


def _poly_design(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """Columns 1, u, v (degree 1) and u^2, uv, v^2 (degree 2) of a smooth descan model."""
    cols = [np.ones_like(u), u, v] + ([u * u, u * v, v * v] if degree == 2 else [])
    return np.stack(cols, axis=1)


def _robust_fit(design: np.ndarray, origin: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Least-absolute-deviation coefficients (iteratively reweighted least squares) of origin ~ design."""
    w = np.ones(len(design))
    for _ in range(iterations):
        coef = np.linalg.lstsq(design * w[:, None], origin * w[:, None], rcond=None)[0]
        r = np.linalg.norm(origin - design @ coef, axis=1)
        w = 1.0 / np.sqrt(np.maximum(r, 0.01))  # sqrt: the weights of squared residuals -> |r|
    return coef


def _robust_rms(a: np.ndarray) -> float:
    """Robust RMS over the axes of (K, 2) values: sqrt of the summed squares of 1.4826 x MAD per axis."""
    mad = 1.4826 * np.median(np.abs(a - np.median(a, axis=0)), axis=0)
    return float(np.sqrt(np.sum(mad**2)))


#: Fewest scan positions per coefficient of the parabolic descan fit (six per axis);
#: smaller scans (or ones with fewer than three positions along a side) get a plane. On
#: a 3 x 3 scan the parabola leaves three residuals: nine repeats of one frame
#: (scikit-ued's test_multi.mib) with two origins 130 px off were fitted nearly exactly,
#: so the consistency check could not see them.
PARABOLA_POSITIONS_PER_COEFFICIENT = 3


def _descan_design(scan: tuple[int, int]) -> np.ndarray:
    """(R_Nx * R_Ny, 3 or 6) design of the smooth descan over the scan coordinates in [-1, 1]:
    the parabola, or a plane on scans too small for it (PARABOLA_POSITIONS_PER_COEFFICIENT)."""
    nrx, nry = (int(v) for v in scan)
    u, v = np.meshgrid(np.linspace(-1, 1, nrx), np.linspace(-1, 1, nry), indexing="ij")
    parabola = min(nrx, nry) >= 3 and nrx * nry >= 6 * PARABOLA_POSITIONS_PER_COEFFICIENT
    return _poly_design(u.ravel(), v.ravel(), 2 if parabola else 1)


def robust_descan_fit(origin: np.ndarray, scan: tuple[int, int], iterations: int = 30) -> np.ndarray:
    """Parabolic descan fit that a large minority of wrong origins does not pull.

    Least absolute deviations (iteratively reweighted least squares) of
    ``origin ~ 1 + u + v + u^2 + uv + v^2`` over the scan coordinates (u, v) (a plane
    on scans too small for it, see PARABOLA_POSITIONS_PER_COEFFICIENT). It
    ignores gross outliers in up to a quarter of the scan, in one region or
    scattered (to 0.13 px on a 10 x 12 scan; it breaks down near 30%);
    py4DSTEM's ``fit_origin`` starts from a least-squares fit, which 25% of origins
    on a wrong disk pull by pixels.

    Parameters
    ----------
    origin : numpy.ndarray
        (R_Nx * R_Ny, 2) origins in scan order, pixels.
    scan : tuple of int
        (R_Nx, R_Ny).
    iterations : int
        Reweighting steps.

    Returns
    -------
    numpy.ndarray
        (R_Nx * R_Ny, 2) fitted origins, pixels.
    """
    a = _descan_design(scan)
    return a @ _robust_fit(a, origin, iterations)


#: A pattern with fewer counts than this fraction of the 90th percentile of the scan's
#: counts (most of a scan can be blank) holds nothing to measure (the beam blanked during
#: flyback, a dropped frame): its origin is the descan fit of the others
#: (``origin_source`` 10), and no descan fit counts it. On a dev crystal
#: scan (8 x 8, 1e4 counts) with its first 2 of 8 scan columns blank, the blank patterns'
#: origins had pulled the consistency fit so far that the real patterns were re-refined
#: 0.4 px off on average (3 px with 4 columns blank); a scan's counts vary far less than
#: fifty-fold between patterns that hold one.
EMPTY_FRACTION = 0.02


def empty_patterns(counts: np.ndarray, level: float | None = None) -> np.ndarray:
    """(N,) bool: patterns with fewer counts than EMPTY_FRACTION of ``level``, by default the
    90th percentile of ``counts`` (N,) (the engine's 'signal': counts above the read-noise
    floor). With the default, never all of them: those at the percentile hold more."""
    counts = np.asarray(counts, np.float64)
    reference = float(np.percentile(counts, 90)) if level is None else float(level)
    return counts < EMPTY_FRACTION * reference


def _signal(results: dict[str, np.ndarray]) -> np.ndarray:
    """The engine's 'signal' (N,) of the patterns; their 'counts' in results resumed from a
    file written before it was recorded."""
    return results["signal"] if "signal" in results else results["counts"]


def fill_empty(origin: np.ndarray, empty: np.ndarray, scan: tuple[int, int]) -> np.ndarray:
    """Origins (N, 2) with those of the ``empty`` (N,) patterns replaced by the robust
    descan fit (as :func:`robust_descan_fit`) of the others, px; their median where too
    few remain for the fit (fewer than two per coefficient). Unchanged where none or all
    are empty."""
    if not empty.any() or empty.all():
        return origin
    a = _descan_design(scan)
    keep = ~empty
    out = origin.copy()
    if keep.sum() >= 2 * a.shape[1]:
        out[empty] = a[empty] @ _robust_fit(a[keep], origin[keep])
    else:
        out[empty] = np.median(origin[keep], axis=0)
    return out


#: Scan tiles of the low-dose descan model (:func:`tile_descan_model`) hold at least
#: this many counts where the scan allows it (at least 2 x 2 and at most 8 x 8 tiles).
TILE_COUNTS = 2e4

#: A pooled low-dose origin further than this from the tile descan model is replaced by
#: the model (``origin_source`` 6). Dev scans (12 x 12, 1e2 and 3e2 counts per pattern,
#: seeds disjoint from the benchmark's): with 0.5 px no pattern was off by more than
#: 1 px (before: one bright-disk scan at 1e2 was wrong everywhere, 6.5 px, because its
#: pooled origins were too wrong for the pooling's own descan fit); with 1.0 px, 1.2%.
DESCAN_MODEL_TOL_PX = 0.5

#: The tile model is overruled where the pooled low-dose origins agree with their own
#: robust descan fit (median distance at most this, px) and that fit disagrees with the
#: model (median distance over DESCAN_MODEL_TOL_PX): one wrong tile of a 2 x 2 grid
#: moves the whole fitted plane, while most pooled origins would have to fail together
#: to move theirs. Development scans (12 x 12 bright Bragg disks at 1e2 counts, with
#: and without hot pixels; 4 development seed sets, 32 runs): pooled origins that
#: defined the descan lay 0.10-0.66 px (median) from their fit; where they failed,
#: 2.2-12.6 px. The model was 2.0 and 3.6 px off on two runs whose pooled fit was
#: right (0.12 and 0.14 px), and replaced 88% and 93% of the pooled origins. They can
#: fail together: the model stays where its mean lies nearer than their fit's the
#: origin of the whole scan's sum (the patterns' count-weighted mean origin, measured on
#: all their counts). On a dev scan at 1e2 counts with the stop (given) half a tip
#: radius off the beam, every pooled pattern had landed on one point 19 px off; the
#: model puts them 0.22 px off. 72 dev scans of 9 conditions at 1e2 and 1e3 unchanged.
POOLED_CONSISTENT_PX = 1.0


def _tile_grid(scan: tuple[int, int], counts: np.ndarray) -> tuple[list, list] | None:
    """Scan rows and columns of the T x T tiles of :func:`tile_descan_model`, or None (< 4 x 4)."""
    nrx, nry = scan
    if min(nrx, nry) < 4:
        return None
    t = int(np.clip(np.floor(np.sqrt(float(np.sum(counts)) / TILE_COUNTS)), 2, min(8, nrx // 2, nry // 2)))
    return np.array_split(np.arange(nrx), t), np.array_split(np.arange(nry), t)


def _add_rows_to_tiles(sums: np.ndarray, x: np.ndarray, first_row: int, grid: tuple[list, list]) -> None:
    """Add the cleaned patterns ``x`` (rows, R_Ny, Q_Nx, Q_Ny) of scan rows first_row... to the tile sums."""
    rows, cols = grid
    for i, band in enumerate(rows):
        for r in band:
            if first_row <= r < first_row + len(x):
                for j, c in enumerate(cols):
                    sums[i, j] += x[r - first_row][c].sum(axis=0)


def _model_from_tiles(engine: PreNet, sums: np.ndarray, grid: tuple[list, list], scan: tuple[int, int],
                      mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The descan model (R_Nx * R_Ny, 2) from the tile sums (T, T, Q_Nx, Q_Ny) (see
    :func:`tile_descan_model`), and the origin (2,) of the whole scan's sum."""
    nrx, nry = scan
    rows, cols = grid
    t = len(rows)
    h, w = sums.shape[2:]
    run = dataclasses.replace(engine, ellipse=False)
    patterns = np.concatenate([sums.reshape(t * t, h, w), sums.sum(axis=(0, 1))[None]]).astype(np.float32)
    found = run.run(patterns, mask=mask, keep_data=False)
    origin, whole = found["origin"][:-1], found["origin"][-1]
    weights = sums.sum(axis=(2, 3)).ravel()
    if np.linalg.norm(np.average(origin, axis=0, weights=weights) - whole) > DESCAN_MODEL_TOL_PX:
        # the tiles' mean is not the whole scan's origin: some tile landed on a wrong point;
        # refine every tile near the whole scan's origin, kept where their mean agrees with it
        anchored = run.refine_at(patterns[:-1], np.repeat(whole[None], t * t, axis=0), mask=mask)["origin"]
        if np.linalg.norm(np.average(anchored, axis=0, weights=weights) - whole) <= DESCAN_MODEL_TOL_PX:
            origin = anchored
    # scan coordinates scaled to [-1, 1] (well-conditioned polynomials on any scan size)
    su, sv = 2.0 / (nrx - 1), 2.0 / (nry - 1)
    u = np.repeat([b.mean() * su - 1 for b in rows], t)
    v = np.tile([c.mean() * sv - 1 for c in cols], t)
    degree = 2 if t >= 4 else 1
    coef = _robust_fit(_poly_design(u, v, degree), origin)
    gu, gv = np.meshgrid(np.linspace(-1, 1, nrx), np.linspace(-1, 1, nry), indexing="ij")
    return _poly_design(gu.ravel(), gv.ravel(), degree) @ coef, whole


def _nearer_whole(fit: np.ndarray, model: np.ndarray, whole: np.ndarray, counts: np.ndarray) -> bool:
    """Whether the count-weighted mean of the descan ``fit`` (N, 2) lies at least as near
    the origin ``whole`` (2,) of the whole scan's sum as that of ``model`` (N, 2): the
    sum's origin is its patterns' count-weighted mean origin, measured on all their counts;
    True where it has none."""
    if not np.all(np.isfinite(whole)):
        return True
    w = np.maximum(np.asarray(counts, np.float64), 0.0) + 1e-12
    return bool(np.linalg.norm(np.average(fit, axis=0, weights=w) - whole)
                <= np.linalg.norm(np.average(model, axis=0, weights=w) - whole))


def tile_descan_model(engine: PreNet, data, scan: tuple[int, int], counts: np.ndarray,
                      mask: np.ndarray | None = None) -> np.ndarray | None:
    """Smooth descan model of a low-dose scan from the origins of summed scan tiles.

    Descan is a smooth function of the probe position, so the patterns of a block
    of neighbouring positions, summed, form a pattern of many counts whose origin is
    their mean origin (the spread of the descan within the block blurs the disk
    edges, symmetrically). The scan is cut into T x T tiles of at least TILE_COUNTS
    counts where possible (2 <= T <= 8), the engine measures each tile's origin, and
    a robust (least absolute deviations) plane (T < 4) or parabola (T >= 4) over the
    tile centres gives the model at every position. The whole scan's sum, with the
    most counts, checks the tiles: its origin is the tiles' count-weighted mean
    origin, so where that mean is further than DESCAN_MODEL_TOL_PX from it, some
    tile landed on a wrong point, and every tile is refined again within 2 px of the
    whole scan's origin (kept where the refined tiles' mean agrees with it). On
    development scans at 1e2 counts per pattern (bright Bragg disks, hot pixels), one
    or three of four tiles were 5.8-31 px off, and the model 2-15 px; refined near the
    whole scan's origin (0.05-0.09 px off), all were within 0.4 px. Tiles whose
    origins lie more than 2 px from the scan's mean (a wide descan) are not reached
    by that refinement; the mean test then keeps the tiles' own origins. The model is
    the fallback where the pooled low-dose origins are too noisy for their own descan
    fit (the pooling builds the same tile sums from the rows it reads anyway).

    Parameters
    ----------
    engine : PreNet
        The engine (its ellipse stage is not run).
    data : array-like
        (R_Nx, R_Ny, Q_Nx, Q_Ny) patterns, read a scan row at a time.
    scan : tuple of int
        (R_Nx, R_Ny).
    counts : numpy.ndarray
        (R_Nx * R_Ny,) counts of each pattern.
    mask : numpy.ndarray, optional
        Detector mask, as in :func:`preprocess`.

    Returns
    -------
    numpy.ndarray or None
        (R_Nx * R_Ny, 2) model origins in scan order, pixels; None for scans smaller
        than 4 x 4 positions.
    """
    grid = _tile_grid(scan, counts)
    if grid is None:
        return None
    nrx, nry = scan
    sums = np.zeros((len(grid[0]), len(grid[1]), *(int(v) for v in data.shape[2:])), np.float64)
    for r in range(nrx):  # a scan row at a time: memory of one row, whatever the tile size
        rows = measurement_block(read_block(data, r * nry, (r + 1) * nry))[:, 0].numpy()
        _add_rows_to_tiles(sums, rows[None], r, grid)
    return _model_from_tiles(engine, sums, grid, scan, mask)[0]


def blur_correction(bias: np.ndarray, source: np.ndarray, scan: tuple[int, int]) -> np.ndarray:
    """Scan-smoothed edge-blur bias to subtract from the refined origins.

    The per-pattern estimate (the engine's ``origin_blur_bias``, see
    :func:`~py4dstem_prenet.refine.edge_blur_bias`) is a difference of two noisy
    centres; the intensity slopes it comes from change slowly with the probe
    position, so each pattern takes the median of the estimates over its 3 x 3 scan
    neighbourhood (fewer at the border; the estimates of edge-symmetry centres only,
    ``origin_source`` 1, 2, 7, and 5, whose estimate is that of the pooled sum; nan
    estimates, which have none, are skipped). On dev
    scans the median cost no accuracy where the bias changes from pattern to pattern
    (abTEM patterns drawn at random thicknesses: 0.047 -> 0.048 px at 1e4 counts) and
    kept most of the gain where it is smooth; on pooled low-dose origins it helped
    analytic crystals a little (1e3 counts: 0.092 -> 0.090 and 0.083 -> 0.079 px; 3e2:
    0.27 -> 0.26) and cost abTEM as little (0.080 -> 0.081 at 1e3).

    Parameters
    ----------
    bias : numpy.ndarray
        (R_Nx * R_Ny, 2) per-pattern estimates, pixels, in scan order.
    source : numpy.ndarray
        (R_Nx * R_Ny,) ``origin_source`` of the origins.
    scan : tuple of int
        (R_Nx, R_Ny).

    Returns
    -------
    numpy.ndarray
        (R_Nx * R_Ny, 2) correction, pixels: 0 where the origin is not an
        edge-symmetry centre (sources 0, 4 and 6) or no neighbour has an estimate.
    """
    nrx, nry = scan
    est = np.where(np.isin(source, (1, 2, 5, 7))[:, None], np.asarray(bias, float), np.nan).reshape(nrx, nry, 2)
    pad = np.pad(est, ((1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    windows = np.stack([pad[i:i + nrx, j:j + nry] for i in range(3) for j in range(3)])
    have = np.isfinite(windows[..., 0]).any(axis=0)
    med = np.zeros((nrx, nry, 2))
    if have.any():
        med[have] = np.nanmedian(windows[:, have], axis=0)
    apply = np.isin(source, (1, 2, 3, 5, 7)).reshape(nrx, nry)
    return np.where(apply[..., None], med, 0.0).reshape(-1, 2)


#: Random minimal samples of :func:`consensus_descan_fit`.
CONSENSUS_TRIALS = 500

#: Smallest fraction of the scan that must agree with :func:`consensus_descan_fit` (within
#: its tolerance) for the origins off it to be measured again near it.
CONSENSUS_MIN_FRACTION = 0.5


def consensus_descan_fit(origin: np.ndarray, scan: tuple[int, int], tol: float = 1.0,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Descan fit that the largest set of mutually consistent origins supports.

    Where a crystal's lattice of equal disks is as symmetric about its half-lattice
    points as about the origin, up to half of a scan's origins can sit on such points,
    in several directions; the least-absolute-deviation fit (:func:`robust_descan_fit`)
    breaks down near 30%. Here (random sample consensus) CONSENSUS_TRIALS minimal sets
    of positions (six for the parabola, three for a plane) are fitted exactly, the fit
    that the most origins lie within ``tol`` of is kept, and refitted by least squares
    to its consenting origins, twice.

    Parameters
    ----------
    origin : numpy.ndarray
        (R_Nx * R_Ny, 2) finite origins in scan order, pixels.
    scan : tuple of int
        (R_Nx, R_Ny).
    tol : float
        Largest distance (px) of a consenting origin from the fit.
    seed : int
        Seed of the samples (the fit is reproducible).

    Returns
    -------
    fitted : numpy.ndarray
        (R_Nx * R_Ny, 2) the fit, pixels.
    inliers : numpy.ndarray
        (R_Nx * R_Ny,) bool, the origins within ``tol`` of it.

    Raises
    ------
    ValueError
        If ``origin`` is not finite (R_Nx * R_Ny, 2), or ``tol`` is not > 0.
    """
    nrx, nry = (int(v) for v in scan)
    origin = np.asarray(origin, float)
    if origin.shape != (nrx * nry, 2) or not np.all(np.isfinite(origin)):
        raise ValueError(f"origin must be finite ({nrx * nry}, 2), got {origin.shape}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0 px, got {tol}")
    a = _descan_design((nrx, nry))
    k = a.shape[1]
    rng = np.random.default_rng(seed)
    best = np.zeros(len(a), bool)
    for _ in range(CONSENSUS_TRIALS):
        pick = rng.choice(len(a), k, replace=False)
        coef = np.linalg.lstsq(a[pick], origin[pick], rcond=None)[0]
        inliers = np.linalg.norm(origin - a @ coef, axis=1) <= tol
        if inliers.sum() > best.sum():
            best = inliers
    for _ in range(2):
        coef = np.linalg.lstsq(a[best], origin[best], rcond=None)[0]
        refit = np.linalg.norm(origin - a @ coef, axis=1) <= tol
        if refit.sum() < k:
            break
        best = refit
    return a @ np.linalg.lstsq(a[best], origin[best], rcond=None)[0], best


#: :func:`lattice_descan_fit` looks for at most this many sets of origins, each of at
#: least LATTICE_SET_MIN origins and LATTICE_SET_MIN_FRACTION of the scan.
LATTICE_SETS = 8
LATTICE_SET_MIN = 5
LATTICE_SET_MIN_FRACTION = 0.03

#: Radius (px) of a set of :func:`lattice_descan_fit` about its centre, in offsets from
#: the network's descan. Within a set, offsets scattered by 0.2-0.9 px per axis (std) on
#: dev scans; lattice points were 6.4 px apart or more.
LATTICE_SET_RADIUS = 3.0

#: The set taken is then the origins within this distance (px) of its descan; with at
#: least LATTICE_OWN_FIT times as many origins as the descan has coefficients, that
#: descan is the fit of its own origins.
LATTICE_MEMBER_TOL = 2.0
LATTICE_OWN_FIT = 2

#: :func:`lattice_descan_fit` prefers a set other than the largest only where that set is
#: at most this fraction as far from the network's descan as the largest (on a dev probe,
#: 8 x 8, the true set 2.5 px from it, the largest 4.8 px; 0.5 kept the largest).
LATTICE_PREFER_RATIO = 2 / 3

#: A set holding at least LATTICE_MAJORITY of the scan, or LATTICE_DOMINANT times as many
#: origins as the next largest, is taken whatever the network's fit points to. On
#: flat-envelope dev lattices (12 x 12, 1e5-1e6 counts, disks 0.6-1.5 times as bright as
#: the bright-field disk) the network's fit was 10-13 px off (RMS), nearest to sets of 6-38
#: origins, while the largest sets (67-118 of 144, 2.96-7.9 times the next) were right; the
#: wrong sets of the dev scans above held at most 45%. (Where the largest set is wrong, as
#: on one such scan at 1e4, 71 against the true 40, neither rule takes it.)
LATTICE_MAJORITY = 0.5
LATTICE_DOMINANT = 2.5


def lattice_descan_fit(origin: np.ndarray, network: np.ndarray, scan: tuple[int, int]
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """Descan that the network's own guesses point to, where origins split over lattice points.

    In a dense lattice of disks as bright as the bright-field disk (a thick crystal, a
    flat Bragg envelope), every lattice point and half-lattice point is a centre of
    inversion symmetry: the edge-symmetry refinement takes each pattern to the one
    nearest the network's guess, and the origins split into sets, each a smooth descan
    shifted by a lattice vector. The true set need not be the largest: on three dev
    scans (12 x 12, 1e5 counts, bright disks) it held 5-18% of the scan, the largest
    23-42%, and the origins ended 5-10 px off on average. The network's guesses scatter
    by pixels but centre on the true descan: their robust parabolic fit
    (:func:`robust_descan_fit`) was 1.1-4.6 px (RMS) from it there, the wrong sets'
    offsets from that fit 5-17 px. The offsets of the origins from the descan of the
    largest consistent set (:func:`consensus_descan_fit`; each set is that descan shifted
    by a lattice vector, so the sets are tight however the network's errors vary over
    the scan) are gathered in sets (greedily, each about the densest 3 x 3 px cell of
    what is left, within LATTICE_SET_RADIUS). The set nearest the network's fit (median
    offset of its origins from it) is taken where it is the largest or at most
    LATTICE_PREFER_RATIO times as far as the largest (even the largest can hold under
    half of the scan, which the L1 fit of all origins does not withstand: two dev scans,
    40% and 34%); the largest where it holds LATTICE_MAJORITY of the scan or
    LATTICE_DOMINANT times the next set (the network's fit can be a lattice vector off).
    The descan of the set taken is the consensus descan plus a plane through the set's
    offsets from it (the fit of the set's own origins where it holds LATTICE_OWN_FIT
    times as many as the descan has coefficients), its members the origins within
    LATTICE_MEMBER_TOL of that descan.
    Where the network itself points to a wrong lattice point (a dev scan at 1e4
    counts: its origins 7.5 px off on average, and 91% of the refined ones), this
    cannot help.

    Parameters
    ----------
    origin : numpy.ndarray
        (R_Nx * R_Ny, 2) finite origins in scan order, pixels.
    network : numpy.ndarray
        (R_Nx * R_Ny, 2) the centre network's origins (before refinement), pixels.
    scan : tuple of int
        (R_Nx, R_Ny).

    Returns
    -------
    (fitted, members) or None
        The descan of the set taken, (R_Nx * R_Ny, 2) pixels, and its (R_Nx * R_Ny,)
        bool members; None where the offsets hold one set (no lattice points to choose
        from), or where the network's fit lies between the nearest set and the largest.

    Raises
    ------
    ValueError
        If ``origin`` or ``network`` is not finite (R_Nx * R_Ny, 2).
    """
    nrx, nry = (int(v) for v in scan)
    origin, network = np.asarray(origin, float), np.asarray(network, float)
    for name, v in (("origin", origin), ("network", network)):
        if v.shape != (nrx * nry, 2) or not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must be finite ({nrx * nry}, 2), got {v.shape}")
    prior = robust_descan_fit(network, (nrx, nry))
    # the sets' offsets from the largest consistent set's descan: each set is that descan
    # shifted by a lattice vector, tight whatever the shape of the network's own errors
    base = consensus_descan_fit(origin, (nrx, nry))[0]
    d = origin - base
    need = max(LATTICE_SET_MIN, LATTICE_SET_MIN_FRACTION * len(d))
    left = np.ones(len(d), bool)
    sets = []
    for _ in range(LATTICE_SETS):
        if left.sum() < need:
            break
        cell = np.floor(d[left]).astype(np.int64)
        lo = cell.min(axis=0)
        hist = np.zeros(tuple(cell.max(axis=0) - lo + 3), np.int64)
        np.add.at(hist, tuple((cell - lo + 1).T), 1)
        dense = sum(np.roll(hist, (a, b), axis=(0, 1)) for a in (-1, 0, 1) for b in (-1, 0, 1))
        peak = np.array(np.unravel_index(np.argmax(dense), dense.shape)) + lo - 1 + 0.5
        centre = np.median(d[left & (np.linalg.norm(d - peak, axis=1) <= LATTICE_SET_RADIUS)], axis=0)
        members = left & (np.linalg.norm(d - centre, axis=1) <= LATTICE_SET_RADIUS)
        if members.sum() < need:
            break
        sets.append((float(np.linalg.norm(np.median((origin - prior)[members], axis=0))), members))
        left &= ~members
    if len(sets) < 2:
        return None
    by_size = sorted(sets, key=lambda t: -int(t[1].sum()))
    largest, n_largest = by_size[0], int(by_size[0][1].sum())
    if n_largest >= LATTICE_MAJORITY * len(d) or n_largest >= LATTICE_DOMINANT * by_size[1][1].sum():
        chosen = largest  # a consensus that the network's fit cannot overrule
    else:
        chosen = min(sets, key=lambda t: t[0])  # the set nearest the network's fit
    if chosen is not largest and chosen[0] > LATTICE_PREFER_RATIO * largest[0]:
        return None  # the network's fit between the two: no telling
    # the set's descan: the consensus descan plus a plane fitted to the set's offsets from
    # it, the set re-drawn about it, twice
    design = _descan_design((nrx, nry))
    plane = design[:, :3]
    members = chosen[1]
    for _ in range(2):
        fitted = base + plane @ np.linalg.lstsq(plane[members], d[members], rcond=None)[0]
        refit = np.linalg.norm(origin - fitted, axis=1) <= LATTICE_MEMBER_TOL
        if refit.sum() < need:
            break
        members = refit
    if members.sum() >= LATTICE_OWN_FIT * design.shape[1]:  # enough to fit the set's own descan
        return design @ np.linalg.lstsq(design[members], origin[members], rcond=None)[0], members
    return base + plane @ np.linalg.lstsq(plane[members], d[members], rcond=None)[0], members


def _descan_consistency(engine: PreNet, data, bounds, origin: np.ndarray, source: np.ndarray,
                        scan: tuple[int, int], mask, client, network: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, int]:
    """Re-measure origins that disagree with the scan's smooth descan.

    Descan is a smooth function of the probe position (as py4DSTEM ``fit_origin``
    models it). A pattern whose origin lies far from a robust parabolic fit over the
    scan (:func:`robust_descan_fit`; a wrong Bragg disk, a wrong symmetry centre) is
    refined again within 2 px of the fit. Where more than a third of the origins are
    that far, the fit is that of the largest consistent set (:func:`consensus_descan_fit`),
    if it holds at least CONSENSUS_MIN_FRACTION of the scan: on a development crystal
    scan (8 x 8, 1e4 counts, a dense lattice of disks as bright as the bright-field
    disk) 45% of the origins were on half-lattice points 12-22 px away, and the
    consistency check, which stopped at a third, left them there. Where at least
    LATTICE_SET_MIN_FRACTION of the origins are LATTICE_MEMBER_TOL off that fit and
    the origins split into sets of which the network's origins (``network``) point to
    one (:func:`lattice_descan_fit`), that set's descan is taken instead: in
    flat-envelope lattices the true set can be a small minority, and even the largest
    set can hold less than the L1 fit withstands.

    Returns
    -------
    origin, source, count
        Updated (N, 2) origins, (N,) ``origin_source`` (3 where re-refined), and how
        many patterns were re-refined.
    """
    fitted = robust_descan_fit(origin, scan)
    resid = np.linalg.norm(origin - fitted, axis=1)
    tol = max(1.0, DESCAN_OUTLIER_SIGMAS * 1.4826 * float(np.median(resid)))
    outlier = resid > tol
    lattice = None
    if ((resid > LATTICE_MEMBER_TOL).mean() >= LATTICE_SET_MIN_FRACTION and network is not None
            and np.all(np.isfinite(network))):
        lattice = lattice_descan_fit(origin, network, scan)
    if lattice is not None:  # origins over lattice points: the set the network points to
        fitted, outlier = lattice[0], ~lattice[1]
    elif outlier.mean() > 1 / 3:  # beyond what that fit withstands: the largest consistent set's fit
        fitted, inliers = consensus_descan_fit(origin, scan, tol)
        if inliers.mean() < CONSENSUS_MIN_FRACTION:
            return origin, source, 0
        outlier = ~inliers
    if not outlier.any():
        return origin, source, 0
    origin, source = origin.copy(), source.copy()
    skip = np.array([not outlier[i0:i1].any() for i0, i1 in bounds])
    for k, res in map_blocks(engine, "refine_at", data, bounds,
                             lambda i0, i1: (fitted[i0:i1], mask, outlier[i0:i1]), client=client, skip=skip):
        i0, i1 = bounds[k]
        sel = outlier[i0:i1]
        origin[i0:i1][sel] = res["origin"][sel]
        source[i0:i1][sel] = 3
    return origin, source, int(outlier.sum())


#: Origins scattering more than this (px, RMS over both axes of the differences between
#: scan neighbours, each axis scaled by 1/sqrt(2): the white, pattern-to-pattern part of
#: their scatter about the scan's smooth descan) are measurement noise, not descan, and
#: the scan's robust parabolic descan fit replaces them (see :func:`origin_scatter`).
#: Dev scans (12 x 12, seeds disjoint from the benchmark's): origins that the pattern
#: pins down scatter by 0.03-0.11 px (the simulated per-position jitter of 0.05 px per
#: axis alone gives 0.07); amorphous rings behind a beam stop, whose speckle defines the
#: centre poorly, by 0.2-0.8 px (the fit took their mean error from 0.21-0.79 to
#: 0.07-0.23 px at 1e4 counts, and 0.19-0.32 to 0.09-0.10 at 1e6); a crystal behind a
#: stop at 1e4, 0.21 px (0.20 -> 0.09).
NOISY_ORIGIN_PX = 0.15

#: Origins scattering by more than this (px, as NOISY_ORIGIN_PX) are not noise about a
#: descan but failures (wrong disks, lattice points): a fit through them means nothing, and
#: the measured origins are kept. On a dev scan with a 24 px disk 38 px off the centre of
#: a 128 px detector (beyond the network's training), 40% of the origins were on lattice
#: points 40-60 px away, the scatter was 22 px, and the fit put every origin 0.4-88 px off.
#: Noisy origins that the fit serves scatter by 0.2-0.8 px (see NOISY_ORIGIN_PX).
NOISY_MAX_PX = 2.0

#: The parabolic fit replaces noisy origins only where it describes the descan: the
#: scatter of the origins about it (robust RMS) is at most this many times their white
#: scatter (more means structure the parabola misses; dev scans: 0.9-1.8).
NOISY_STRUCTURE_MAX = 2.0

#: Smallest scan (positions per side) on which the noisy-origin rule acts: the fit has
#: six coefficients per axis.
NOISY_MIN_SCAN = 5


#: The noisy-origin rule (NOISY_ORIGIN_PX) takes the descan fit only where the measured
#: per-pattern noise (:func:`origin_noise`), when it can be measured, is at least this
#: fraction of the white scatter: otherwise the scatter is mostly the beam's own. A probe
#: crystal scan at 1e4 counts whose descan oscillated by 1 px along the fast axis (mains
#: pickup) was taken for noise once the fit held row and column offsets (0.05 -> 0.32 px);
#: so was one of the two scans of the benchmark's rough-descan condition at 1e4 before
#: (0.064 -> 0.30 px).
NOISE_SHARE_MIN = 0.5

#: Patterns drawn (evenly over the scan) to measure the per-pattern origin noise by
#: splitting them in two (see :func:`origin_noise`); fewer eligible origins than
#: NOISE_MIN_SAMPLE and no estimate is made.
NOISE_SAMPLE = 32
NOISE_MIN_SAMPLE = 16

#: Patterns split for the noise estimate have at least this many counts: the full-dose
#: refinement then measured the recording, as the halves' does (below it, it may have
#: measured the denoised pattern, a different estimator).
NOISE_MIN_COUNTS = LOW_DOSE_COUNTS

#: The patterns are counts (binomial thinning applies) where at least this fraction of
#: their pixels hold whole numbers (stuck hot pixels may not).
NOISE_COUNTS_FRACTION = 0.99


def origin_noise(engine: PreNet, data, origin: np.ndarray, source: np.ndarray, counts: np.ndarray,
                 mask: np.ndarray | None = None, seed: int = 0) -> float | None:
    """RMS noise of the per-pattern origin measurement, px, from two independent halves of patterns.

    Edge-symmetry origins (``source`` 1, 2, 3, 7), by binomial thinning: a pattern of
    Poisson counts splits into two independent Poisson patterns of half the dose (each
    electron goes to one half with probability 1/2). The refinement
    (:meth:`~py4dstem_prenet.engine.PreNet.refine_at`) measures the origin of each
    half; their difference has four times the variance of the full pattern's
    measurement (twice per half, as the variance scales with 1 / dose). It needs no
    model of the pattern, and sees only noise: biases common to both halves cancel.

    Rings behind a stop (``source`` 8), by angular halves: their origin is the
    inversion-symmetry centre of speckled intensity, whose error is mostly the speckle
    (grains of 1-3 px, different at every probe position; not centrosymmetric), which
    thinning would leave in both halves. The halves are the even and the odd of eight
    angular sectors (:meth:`~py4dstem_prenet.engine.PreNet.intensity_halves_at`):
    independent speckle and counts, so their difference again has four times the
    variance. On 10 development scenes of such rings (8 x 8 scans at 1e4, 1e5 and 1e6
    counts) it gave 0.57-1.11 times the actual RMS error of the measured origins (median
    0.93; see :data:`~py4dstem_prenet.refine.SYMMETRY_SECTORS`).

    Integrating detectors (read noise about a dark-subtracted zero:
    :func:`~py4dstem_prenet.engine.read_noise_sigma` > 0 in every sampled pattern),
    whose recordings are not counts, by Gaussian data fission (Leiner et al. 2023,
    the counterpart of thinning): with the per-pixel variance v = gain x counts above
    the dark level + sigma^2 (:func:`~py4dstem_prenet.engine.detector_gain`), the
    patterns x + z and x - z, z ~ N(0, v), are independent to the Gaussian
    approximation, each of twice the variance, so their origins' difference again has
    four times the variance of one measurement. On 5 development read-noise scans
    (gain 10, read noise 10 counts; 12 x 12, seeds 31M) it gave 0.047 px where the
    origins' RMS error was 0.114 (1e4 electrons; the other two scans at 1e4 hold fewer
    than NOISE_MIN_COUNTS electrons above the floor and get no estimate) and 0.011 px
    where it was 0.022 and 0.015 (1e5; their CRLB 0.008 and 0.005); with the disk-fit
    weighting and the shrinkage it then allows, those scans' RMS went 0.114 -> 0.086,
    0.0222 -> 0.0203 and 0.0154 -> 0.0125 px.

    Up to NOISE_SAMPLE patterns, spread evenly over those of the more numerous of the
    two kinds that have at least NOISE_MIN_COUNTS counts, are split; the variance is
    robust (1.4826 x median absolute deviation, per axis).

    Parameters
    ----------
    engine : PreNet
        The engine (its denoiser and ellipse stage are not run).
    data : array-like
        (R_Nx, R_Ny, Q_Nx, Q_Ny) recorded patterns.
    origin : numpy.ndarray
        (N, 2) measured origins in scan order, pixels (where the halves are measured from).
    source : numpy.ndarray
        (N,) ``origin_source`` of the origins.
    counts : numpy.ndarray
        (N,) counts of the patterns.
    mask : numpy.ndarray, optional
        Detector mask, as in :func:`preprocess`.
    seed : int
        Seed of the binomial split (the estimate is reproducible).

    Returns
    -------
    float or None
        sqrt(var_qx + var_qy) of one full pattern's measurement, pixels; None where
        fewer than NOISE_MIN_SAMPLE patterns qualify or, for edge-symmetry origins, the
        sampled patterns are neither counts (whole numbers in at least
        NOISE_COUNTS_FRACTION of the pixels, none negative: binomial thinning needs
        counts) nor an integrating detector's with a measurable gain (fission), or hold
        NaN/Inf pixels.

    Raises
    ------
    ValueError
        If ``data`` is not 4D or ``origin``, ``source``, ``counts`` do not have one
        entry per pattern.
    """
    shape = tuple(np.shape(data))
    n = int(np.prod(shape[:2])) if len(shape) == 4 else -1
    if n < 0 or np.shape(origin) != (n, 2) or np.shape(source) != (n,) or np.shape(counts) != (n,):
        raise ValueError(f"data must be 4D (R_Nx, R_Ny, Q_Nx, Q_Ny) with origin (N, 2), source and counts (N,) "
                         f"for its N patterns, got {shape}, {np.shape(origin)}, {np.shape(source)}, "
                         f"{np.shape(counts)}")
    enough = np.asarray(counts) >= NOISE_MIN_COUNTS
    edges = np.flatnonzero(np.isin(source, (1, 2, 3, 7)) & enough)
    rings = np.flatnonzero((np.asarray(source) == 8) & enough)
    by_sectors = len(rings) > len(edges)  # rings behind a stop: angular halves, not thinning
    eligible = rings if by_sectors else edges
    if len(eligible) < NOISE_MIN_SAMPLE:
        return None
    pick = eligible[np.linspace(0, len(eligible) - 1, min(NOISE_SAMPLE, len(eligible))).round().astype(int)]
    x = np.stack([np.asarray(read_block(data, int(i), int(i) + 1), np.float64)[0] for i in pick])
    if by_sectors:
        o1, o2 = engine.intensity_halves_at(x, origin[pick], mask=mask)
        return _robust_rms(o1 - o2) / 2
    if not np.all(np.isfinite(x)):
        return None
    run = dataclasses.replace(engine, denoise=False, ellipse=False)
    rng = np.random.default_rng(seed)
    level, above, sigma = _detector_floor(x)
    if np.all(sigma > 0):  # an integrating detector: data fission
        gain = detector_gain(above, sigma, mask)
        if not np.all(gain > 0):
            return None
        var = gain[:, None, None] * np.clip(above, 0, None) + sigma[:, None, None] ** 2
        z = rng.standard_normal(x.shape) * np.sqrt(var)
        o1 = run.refine_at((x + z).astype(np.float32), origin[pick], mask=mask)["origin"]
        o2 = run.refine_at((x - z).astype(np.float32), origin[pick], mask=mask)["origin"]
        return _robust_rms(o1 - o2) / 2
    if x.min() < 0:
        return None
    x = x / count_quantum(x)[:, None, None]  # counts stored in other units, as counts
    if np.mean(whole_counts(x)) < NOISE_COUNTS_FRACTION:
        return None
    x = np.round(x)  # the few other pixels (stuck hot pixels), to the nearest count
    half = rng.binomial(x.astype(np.int64), 0.5)
    o1 = run.refine_at(half.astype(np.float32), origin[pick], mask=mask)["origin"]
    o2 = run.refine_at((x - half).astype(np.float32), origin[pick], mask=mask)["origin"]
    return _robust_rms(o1 - o2) / 2


def descan_shrinkage(white: float, noise: float) -> float:
    """Weight of the measured origins' departure from the descan fit (a Wiener filter).

    About the scan's smooth descan, the origins scatter by ``white`` (px RMS, between
    neighbours: :func:`origin_scatter`): the beam's own position-to-position shifts
    plus the measurement noise ``noise`` (px RMS: :func:`origin_noise`). Keeping the
    fraction w = 1 - noise^2 / white^2 of each departure minimises the mean squared
    error when the two are independent. On 8 development scans at 1e4 counts (crystal,
    bright disks, hot pixels, beam stop; seeds disjoint from the benchmark's) w was
    0.26-0.87 and the mean error fell by 10-25% (e.g. 0.064 -> 0.056 px, 0.069 ->
    0.052); at 1e5 w is ~0.97.

    Parameters
    ----------
    white, noise : float
        Pixels, >= 0.

    Returns
    -------
    float
        w in [0, 1]; 1 where ``white`` is 0.

    Raises
    ------
    ValueError
        If either is negative or not finite.
    """
    if not (np.isfinite(white) and np.isfinite(noise) and white >= 0 and noise >= 0):
        raise ValueError(f"white and noise must be finite and >= 0 px, got {white!r} and {noise!r}")
    if white == 0:
        return 1.0
    return float(np.clip(1.0 - (noise / white) ** 2, 0.0, 1.0))


#: The bright-field disk fit's standard error (the engine's ``origin_disk_sigma``)
#: times this is taken as its error when it is weighed against the symmetry centre
#: (:func:`combine_disk_fit`). On dev crystal scans (12 x 12, 1e4-1e6 counts; seeds
#: 31M) its actual RMS error was 0.95-1.6 times its standard error (about 2 at 1e6,
#: where the interior's misfit adds to the counts' noise), but the symmetry centre's
#: noise (:func:`origin_noise`) also leaves out its pattern-to-pattern bias: the
#: weighted origins' RMS error was lower with 1 than with 1.5 on 14 of those 18 scans.
#: With 1, on 24 such scans (crystal, bright disks, hot pixels, rough descan, beam
#: stops, read noise): RMS 2-33% lower on 15 (e.g. 0.0432 -> 0.0370 px at 1e4, 0.0236 ->
#: 0.0188 at 1e5, 0.0244 -> 0.0163 at 1e6), 0.1-1.0% higher on 4, unchanged on 5 (no
#: fit, or no noise measured).
DISK_FIT_SIGMA_SCALE = 1.0


def combine_disk_fit(origin: np.ndarray, disk_fit: np.ndarray, disk_sigma: np.ndarray, source: np.ndarray,
                     counts: np.ndarray, noise: float) -> tuple[np.ndarray, float, int]:
    """Weigh each edge-symmetry origin against the fit of its bright-field disk (inverse variance).

    Two measurements of the same centre: the inversion-symmetry centre of the edges
    (all disks, Friedel pairs; per-pattern noise ``noise``, :func:`origin_noise`) and
    the model fit of the bright-field disk alone
    (:func:`~py4dstem_prenet.refine.disk_model_centre`; standard error
    ``disk_sigma``, scaled by DISK_FIT_SIGMA_SCALE). Their errors are partly
    independent (correlation 0.1-0.7 on dev scans), so the inverse-variance mean
    ``w * origin + (1 - w) * disk_fit``, ``w = s_f^2 / (s_f^2 + noise^2)``, is
    more precise than either. Only symmetry centres near the network's (``source``
    1 or 2) of patterns of at least LOW_DOSE_COUNTS counts (where both read the
    recording, not the denoised pattern) with a finite fit are weighed.

    Parameters
    ----------
    origin : numpy.ndarray
        (N, 2) origins (symmetry centres less their blur bias), pixels.
    disk_fit : numpy.ndarray
        (N, 2) disk-fit centres, pixels; nan where there is none.
    disk_sigma : numpy.ndarray
        (N,) their standard errors, pixels (sqrt(var_qx + var_qy)); nan where none.
    source : numpy.ndarray
        (N,) ``origin_source`` of the origins.
    counts : numpy.ndarray
        (N,) counts of the patterns.
    noise : float
        Noise of one symmetry centre, pixels (sqrt(var_qx + var_qy)), > 0.

    Returns
    -------
    origin : numpy.ndarray
        (N, 2) the weighted origins (a new array).
    noise : float
        RMS noise of the weighted origins over the N patterns, pixels (the two
        measurements taken as independent).
    weighed : int
        How many origins were weighed.

    Raises
    ------
    ValueError
        If the shapes disagree or ``noise`` is not finite and > 0.
    """
    origin = np.asarray(origin, np.float64)
    n = len(origin)
    if (origin.shape != (n, 2) or np.shape(disk_fit) != (n, 2) or np.shape(disk_sigma) != (n,)
            or np.shape(source) != (n,) or np.shape(counts) != (n,)):
        raise ValueError(f"origin and disk_fit must be (N, 2), disk_sigma, source and counts (N,), got "
                         f"{np.shape(origin)}, {np.shape(disk_fit)}, {np.shape(disk_sigma)}, {np.shape(source)}, "
                         f"{np.shape(counts)}")
    if not (np.isfinite(noise) and noise > 0):
        raise ValueError(f"noise must be finite and > 0 px, got {noise!r}")
    s_f = DISK_FIT_SIGMA_SCALE * np.asarray(disk_sigma, np.float64)
    use = (np.isin(source, (1, 2)) & (np.asarray(counts) >= LOW_DOSE_COUNTS) & np.isfinite(s_f)
           & np.all(np.isfinite(disk_fit), axis=1))
    w = np.ones(n)
    w[use] = s_f[use] ** 2 / (s_f[use] ** 2 + noise**2)
    out = origin.copy()
    out[use] = w[use, None] * origin[use] + (1 - w[use, None]) * np.asarray(disk_fit, np.float64)[use]
    var = np.full(n, noise**2)
    var[use] = w[use] ** 2 * noise**2 + (1 - w[use]) ** 2 * s_f[use] ** 2
    return out, float(np.sqrt(var.mean())), int(use.sum())


def origins_are_noise(white: float, total: float) -> bool:
    """Whether measured origins are noise about a descan that their parabolic fit describes.

    Parameters
    ----------
    white, total : float
        The white scatter and the scatter about the fit, pixels (:func:`origin_scatter`).

    Returns
    -------
    bool
        True when the white scatter is above NOISY_ORIGIN_PX and at most NOISY_MAX_PX,
        and the fit leaves at most NOISY_STRUCTURE_MAX times it: ``preprocess`` then
        takes the fit.
    """
    return NOISY_ORIGIN_PX < white <= NOISY_MAX_PX and total <= NOISY_STRUCTURE_MAX * white


#: A profile of scan-line offsets (one per row, or per column) is kept when its sum of
#: squares exceeds the mean of the same sum over LINE_PERMUTATIONS random reassignments
#: of the departures to scan positions by this many of their standard deviations (see
#: :func:`scan_line_offsets`). On 300 draws of 12 x 12 noise (normal, and Student's t with
#: 3 degrees of freedom) 0-0.7% of the draws kept a profile (2-3% at 4); row offsets of
#: 0.8x the noise's standard deviation over 12 x 12 positions were found in 99% of draws.
LINE_OFFSET_SIGMAS = 5.0

#: Random reassignments that give the line-offset test its null distribution.
LINE_PERMUTATIONS = 64

#: Fewest positions per scan side for :func:`scan_line_offsets`.
LINE_MIN_SCAN = 5


def _line_profile(d: np.ndarray, axis: int) -> np.ndarray:
    """Median of (R_Nx, R_Ny, 2) departures along ``axis`` (1: per row, 0: per column), less its
    median; NaN departures are missing, and a line with fewer than half its positions gets 0."""
    n = d.shape[axis]
    enough = np.sum(np.isfinite(d[..., 0]), axis=axis, keepdims=True)[..., None] >= 0.5 * n
    prof = np.where(enough, np.nanmedian(np.where(enough, d, 0.0), axis=axis, keepdims=True), 0.0)
    return prof - np.median(prof, axis=1 - axis, keepdims=True)


def _departures(residual: np.ndarray, scan: tuple[int, int]) -> tuple[int, int, np.ndarray]:
    """(R_Nx, R_Ny) and ``residual`` as a float (R_Nx * R_Ny, 2) array of departures, finite or
    NaN on both axes (a departure not known); ValueError otherwise."""
    nrx, nry = (int(v) for v in scan)
    d = np.asarray(residual, float)
    if (d.shape != (nrx * nry, 2) or np.any(np.isinf(d))
            or np.any(np.isnan(d[:, 0]) != np.isnan(d[:, 1]))):
        raise ValueError(f"residual must be ({nrx * nry}, 2) for a scan of {(nrx, nry)}, finite or NaN on "
                         f"both axes, got {d.shape}")
    return nrx, nry, d


def scan_line_offsets(residual: np.ndarray, scan: tuple[int, int]) -> np.ndarray:
    """Offsets of whole scan rows and columns in origins' departures from a smooth descan.

    A scan is not always smooth in time: the scan coils' flyback lags the first
    columns of every row by the same amount, and a line-sync glitch or a drift event
    moves whole rows. Neither is the parabola of :func:`robust_descan_fit`, and
    neither is noise: the departures share an offset along a row (or down a column).
    The row profile is the median of each row's departures, the column profile the
    median of each column's once the rows are removed (both less their median, so
    that an offset common to the scan stays in the fit). A profile is kept only where
    it stands out of the noise: its sum of squares (over lines and both axes) must
    exceed that of the same profile computed after LINE_PERMUTATIONS random
    reassignments of the departures (less the other profile) to scan positions, by
    LINE_OFFSET_SIGMAS standard deviations above their mean. The permutations keep
    the departures' own distribution: at low dose it has heavy tails (patterns
    measured on a wrong feature), which widen the spread of a median beyond what
    a robust standard deviation predicts (a test based on it kept noise as row
    offsets on a development scan at 1e3 counts: 0.11 -> 0.16 px). Reproducible (a
    fixed seed).

    Parameters
    ----------
    residual : numpy.ndarray
        (R_Nx * R_Ny, 2) origins minus their smooth descan (or minus another estimate
        of the same origins), in scan order (rows of R_Ny positions), pixels. NaN
        (both axes) marks a position whose departure is not known (a failed
        measurement); a line with fewer than half its positions known gets no offset.
    scan : tuple of int
        (R_Nx, R_Ny).

    Returns
    -------
    numpy.ndarray
        (R_Nx * R_Ny, 2) the kept row and column offsets at every position, pixels
        (zeros where neither stands out, and on scans with fewer than LINE_MIN_SCAN
        positions along a side).

    Raises
    ------
    ValueError
        If ``residual`` does not have the shape (R_Nx * R_Ny, 2), or holds infinities
        or a NaN on one axis only.
    """
    nrx, nry, d = _departures(residual, scan)
    out = np.zeros((nrx, nry, 2))
    if min(nrx, nry) < LINE_MIN_SCAN:
        return out.reshape(-1, 2)
    d = d.reshape(nrx, nry, 2)
    rows = _line_profile(d, 1)
    cols = _line_profile(d - rows, 0)
    rng = np.random.default_rng(0)
    for profile, axis, other in ((rows, 1, cols), (cols, 0, rows)):
        pool = (d - other).reshape(-1, 2)
        null = np.array([np.sum(_line_profile(rng.permutation(pool).reshape(nrx, nry, 2), axis) ** 2)
                         for _ in range(LINE_PERMUTATIONS)])
        if np.sum(profile**2) > null.mean() + LINE_OFFSET_SIGMAS * null.std():
            out = out + profile
    return out.reshape(-1, 2)


#: A ripple (see :func:`scan_ripple`) is kept when the largest power of the departures at
#: one wave vector exceeds the mean of the same maximum over LINE_PERMUTATIONS random
#: reassignments of the departures to scan positions by this many of their standard
#: deviations. Development scans (12 x 12 crystals, seeds disjoint from the benchmark's):
#: a 0.3 px ripple stood 11-34 standard deviations out at 1e3 counts per pattern
#: (pooled) and at 1e4; on 30 smooth scans at 1e3 and 1e4 the largest peak outside the
#: excluded wave vectors stayed below 8 (at 5, 3 of 18 scans kept a ripple of 0.04-0.08 px
#: and their mean error rose, e.g. 0.083 -> 0.104 px).
RIPPLE_SIGMAS = 8.0

#: Wave vectors with fewer than this many periods across the scan along both axes are
#: smooth structure, left to the descan fit: such peaks stood 10-17 standard deviations
#: out on 3 of 30 smooth development scans (residual bias that varies slowly over the
#: scan), at 1-1.5 periods.
RIPPLE_SMOOTH_PERIODS = 2.0

#: Wave vectors with fewer than this many periods across the scan along one axis are
#: (nearly) offsets of whole rows or columns, left to :func:`scan_line_offsets`: the
#: power of row offsets spreads over about one period about the axis (at half a period,
#: row offsets of 0.4 px passed for a ripple). A ripple whose period along the fast axis
#: is longer than the scan's rows is thus not searched for.
RIPPLE_LINE_PERIODS = 1.0

#: Zero-padding of the departures' Fourier transform (the ripple's frequency is not a
#: whole number of periods across the scan).
RIPPLE_OVERSAMPLE = 4


def _ripple_wave_vectors(scan: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column frequencies (cycles per position) of the zero-padded transform of
    :func:`scan_ripple`, and the bool mask of the wave vectors it searches."""
    nrx, nry = scan
    fr = np.fft.fftfreq(RIPPLE_OVERSAMPLE * nrx)[:, None]
    fc = np.fft.fftfreq(RIPPLE_OVERSAMPLE * nry)[None, :]
    pr, pc = np.abs(fr) * nrx, np.abs(fc) * nry  # periods across the scan
    excluded = (((pr < RIPPLE_SMOOTH_PERIODS) & (pc < RIPPLE_SMOOTH_PERIODS))
                | (pr < RIPPLE_LINE_PERIODS) | (pc < RIPPLE_LINE_PERIODS))
    return fr[:, 0], fc[0], ~excluded


def _ripple_peak(d: np.ndarray, valid: np.ndarray, searched: np.ndarray) -> tuple[float, int, int]:
    """Largest power of the (R_Nx, R_Ny, 2) departures (0 where not ``valid``) over the
    ``searched`` wave vectors (:func:`_ripple_wave_vectors`), and its indices there."""
    power = np.sum(np.abs(np.fft.fft2(d * valid[..., None], s=searched.shape, axes=(0, 1))) ** 2, axis=-1)
    i, j = np.unravel_index(int(np.argmax(np.where(searched, power, 0.0))), searched.shape)
    return float(power[i, j]), int(i), int(j)


def scan_ripple(residual: np.ndarray, scan: tuple[int, int]) -> np.ndarray:
    """A periodic oscillation of the beam (mains ripple) in origins' departures from the descan.

    Interference at a fixed frequency (mains, 50 or 60 Hz) moves the beam sinusoidally
    in time along one direction. The raster visits the positions at evenly spaced
    times within a row, and the rows at evenly spaced times, so whatever the dwell
    and flyback times, the oscillation is one plane wave over the scan: a single
    wave vector, the same for both axes. Neither the parabola of
    :func:`robust_descan_fit` nor :func:`scan_line_offsets` holds it, and the 3 x 3
    pooling of low doses averages most of it away. The departures' power is searched
    over wave vectors (Fourier transform zero-padded RIPPLE_OVERSAMPLE times; summed
    over both axes) except those of smooth structure (fewer than RIPPLE_SMOOTH_PERIODS
    periods across the scan along both axes) and of line offsets (fewer than
    RIPPLE_LINE_PERIODS along one axis). The highest peak is kept where it exceeds the
    highest peak of LINE_PERMUTATIONS random reassignments of the departures to scan
    positions by RIPPLE_SIGMAS standard deviations above their mean (the permutations
    keep the departures' own, heavy-tailed, distribution); the wave's amplitude and
    phase per axis are then fitted by least squares at that wave vector. One ripple is
    found (the strongest). Reproducible (a fixed seed).

    Parameters
    ----------
    residual : numpy.ndarray
        (R_Nx * R_Ny, 2) origins minus their smooth descan (and minus the
        :func:`scan_line_offsets`), in scan order (rows of R_Ny positions), pixels.
        NaN (both axes) marks a position whose departure is not known.
    scan : tuple of int
        (R_Nx, R_Ny).

    Returns
    -------
    numpy.ndarray
        (R_Nx * R_Ny, 2) the ripple at every position, pixels (zeros where none stands
        out, where fewer than half the departures are known, and on scans with fewer
        than LINE_MIN_SCAN positions along a side).

    Raises
    ------
    ValueError
        If ``residual`` does not have the shape (R_Nx * R_Ny, 2), or holds infinities
        or a NaN on one axis only.
    """
    nrx, nry, d = _departures(residual, scan)
    none = np.zeros((nrx * nry, 2))
    known = np.isfinite(d[:, 0])
    if min(nrx, nry) < LINE_MIN_SCAN or known.sum() < 0.5 * len(d):
        return none
    d = np.where(known[:, None], d - np.median(d[known], axis=0), 0.0)
    valid = known.reshape(nrx, nry).astype(float)
    fr, fc, searched = _ripple_wave_vectors((nrx, nry))
    peak, ir, ic = _ripple_peak(d.reshape(nrx, nry, 2), valid, searched)
    rng = np.random.default_rng(0)
    null = []
    for _ in range(LINE_PERMUTATIONS):
        shuffled = np.zeros_like(d)
        shuffled[known] = rng.permutation(d[known])
        null.append(_ripple_peak(shuffled.reshape(nrx, nry, 2), valid, searched)[0])
    if peak <= np.mean(null) + RIPPLE_SIGMAS * np.std(null):
        return none
    i, j = np.divmod(np.arange(nrx * nry), nry)
    phase = 2 * np.pi * (fr[ir] * i + fc[ic] * j)
    wave = np.stack([np.cos(phase), np.sin(phase)], axis=1)
    coef = np.linalg.lstsq(wave[known], d[known], rcond=None)[0]
    return wave @ coef


def scan_roughness(residual: np.ndarray, scan: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The :func:`scan_line_offsets` of origins' departures from a smooth descan, and the
    :func:`scan_ripple` of what they leave; each (R_Nx * R_Ny, 2), pixels."""
    lines = scan_line_offsets(residual, scan)
    return lines, scan_ripple(np.asarray(residual, float) - lines, scan)


def origin_scatter(origin: np.ndarray, scan: tuple[int, int], lines: np.ndarray | None = None,
                   empty: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """How much measured origins scatter about the scan's smooth descan.

    Descan moves the origin smoothly with the probe, so the difference between the
    residuals (origin minus the descan fit: :func:`robust_descan_fit`, plus the given
    offsets of whole scan rows or columns, :func:`scan_line_offsets`, and any ripple,
    :func:`scan_ripple`) of neighbouring
    positions is the pattern-to-pattern (white) scatter of the measurement; the
    residuals themselves add whatever smooth structure the fit misses.
    Both are robust (1.4826 x the median absolute deviation, per axis) and given as RMS
    over the two axes.

    Parameters
    ----------
    origin : numpy.ndarray
        (R_Nx * R_Ny, 2) origins in scan order, pixels.
    scan : tuple of int
        (R_Nx, R_Ny), each at least 2.
    lines : numpy.ndarray, optional
        (R_Nx * R_Ny, 2) offsets of scan rows and columns and any ripple that are
        part of the descan (:func:`scan_roughness`), pixels: the fit is the parabola
        of ``origin - lines``, plus ``lines``. None: no offsets.
    empty : numpy.ndarray, optional
        (R_Nx * R_Ny,) bool, patterns with nothing measured (:func:`empty_patterns`),
        whose origins are a fit: left out of both scatters.

    Returns
    -------
    white, total : float
        The white scatter (neighbour differences / sqrt(2)) and the scatter of the
        residuals about the fit, pixels.
    fitted : numpy.ndarray
        (R_Nx * R_Ny, 2) the descan fit, pixels.

    Raises
    ------
    ValueError
        If ``origin`` (or ``lines``) is not finite (R_Nx * R_Ny, 2) or the scan is
        smaller than 2 x 2.
    """
    nrx, nry = (int(v) for v in scan)
    origin = np.asarray(origin, float)
    lines = np.zeros_like(origin) if lines is None else np.asarray(lines, float)
    if (min(nrx, nry) < 2 or origin.shape != (nrx * nry, 2) or lines.shape != origin.shape
            or not np.all(np.isfinite(origin)) or not np.all(np.isfinite(lines))):
        raise ValueError(f"origin and lines must be finite ({nrx * nry}, 2) on a scan of at least 2 x 2, "
                         f"got {origin.shape} and {lines.shape} on {(nrx, nry)}")
    fitted = robust_descan_fit(origin - lines, (nrx, nry)) + lines
    r = origin - fitted
    if empty is not None:
        r = np.where(np.asarray(empty, bool)[:, None], np.nan, r)
    r = r.reshape(nrx, nry, 2)
    diff = np.concatenate([(r[1:] - r[:-1]).reshape(-1, 2), (r[:, 1:] - r[:, :-1]).reshape(-1, 2)])
    r = r.reshape(-1, 2)
    return (_robust_rms(diff[np.isfinite(diff[:, 0])]) / math.sqrt(2), _robust_rms(r[np.isfinite(r[:, 0])]),
            fitted)


#: A pattern with fewer counts than this has its origin measured on the sum of its 3 x 3
#: scan neighbourhood (see :func:`_pool_low_dose`). On dev scans (seeds disjoint from the
#: benchmark's) of 12 x 12 crystals with 3 px of descan and 0.05 px of per-position
#: jitter, the mean error fell from 0.15-0.20 to ~0.08 px at 1e3 counts and from
#: 0.65-5 px to 0.2-0.3 px at 1e2; at 1e4 pooling no longer pays (0.04-0.06 px per
#: pattern, below what the jitter alone costs a pooled estimate).
POOL_BELOW_COUNTS = 2e3

#: Pooling is undone when the smooth descan moves the origin by more than this many
#: pixels between neighbouring positions (the pooled pattern is then a blur of shifted
#: patterns, and windows cut by the border are biased). Simulated scans with 3 px of
#: descan: 3 x 3 and 4 x 4 positions (1.5 and 1 px per step) were worse pooled than
#: pattern by pattern (0.41 against 0.14 px at 1500 counts), 6 x 6 (0.6 px per step)
#: better (0.10 against 0.16 px).
POOL_MAX_STEP_PX = 0.75

#: Neighbouring 3 x 3 windows share 6 of their 9 patterns, so the noise of pooled origins
#: is correlated by about 6/9 between scan neighbours, and their differences show only
#: sqrt(1 - 6/9) of it: where most of a scan is pooled, its white scatter
#: (:func:`origin_scatter`) is divided by that before the noisy-origin rule. On 8 dev
#: scans of amorphous rings behind a stop at 1e3 counts, the descan fit beat the pooled
#: origins on every scan (by 0.01-0.09 px; e.g. 0.275 -> 0.217, 0.154 -> 0.110) while
#: their neighbour scatter, 0.06-0.15 px, had kept them below NOISY_ORIGIN_PX on 5. Dev
#: benchmark at 1e2: crystals 0.18-0.21 -> 0.14 px, abTEM 0.212 -> 0.186; rough descan
#: at 1e3 0.179 -> 0.193 (the fit follows flyback and ripple less closely).
POOLED_SHARED = 6 / 9

#: Patterns (whole blocks, spread over the scan) whose origin-aligned mean gives the
#: bright-field radius that places the ellipse fit's bands (see
#: :func:`~py4dstem_prenet.refine.bright_field_radius`): a radius to the nearest tenth of
#: a pixel needs few, and a large scan on disk is then not read a third time in full.
RADIUS_PATTERNS = 1024



def _aligned_sum(engine: PreNet, data, bounds: list[tuple[int, int]], origin: np.ndarray, chosen: np.ndarray,
                 mask, client) -> dict[str, np.ndarray]:
    """The ``chosen`` blocks' :meth:`PreNet.aligned_sum`, added up ('aligned', 'aligned cover')."""
    total: dict[str, np.ndarray] = {}
    for _, part in map_blocks(engine, "aligned_sum", data, bounds, lambda i0, i1: (origin[i0:i1], mask),
                              client=client, skip=~chosen):
        add_polar_sums(total, part)
    return total


def disk_shape_ellipse(engine: PreNet, data, bounds: list[tuple[int, int]], origin: np.ndarray, radius: float,
                       aligned: dict[str, np.ndarray], mask=None, client=None, min_bragg: int = 0
                       ) -> tuple[float, float, float, int] | None:
    """The dataset's ellipse from the shapes of its disks, each fitted in every pattern.

    The disks (the bright-field disk and the Bragg disks) are found on the
    origin-aligned mean ``aligned`` (:func:`~py4dstem_prenet.engine.disk_offsets`); then each of them is fitted in up
    to DISK_SHAPE_MAX_FITS / (number of disks) patterns spread over the scan
    (:meth:`PreNet.disk_shapes`) and the fits are combined
    (:func:`~py4dstem_prenet.engine.combine_disk_ellipses`).

    Parameters
    ----------
    engine : PreNet
        The engine of ``preprocess``.
    data : array_like
        (R_Nx, R_Ny, Q_Nx, Q_Ny) recorded patterns.
    bounds : list of (int, int)
        Flat scan index ranges of the blocks.
    origin : numpy.ndarray
        (R_Nx * R_Ny, 2) origins, pixels.
    radius : float
        Bright-field disk radius, pixels.
    aligned : dict of numpy.ndarray
        'aligned' and 'aligned cover' of :meth:`PreNet.aligned_sum`, summed over
        the blocks that locate the disks (:func:`_aligned_sum`).
    mask, client
        As in :func:`preprocess`.
    min_bragg : int
        Fewest Bragg disks (disks more than a radius from the origin) the aligned
        mean must show.

    Returns
    -------
    tuple or None
        (a/b, theta in radians, standard error of (e1, e2) per component, number of
        fits), or None where the mean shows fewer than ``min_bragg`` Bragg disks or
        fewer than DISK_SHAPE_MIN_FITS fits count.
    """
    offsets, radius, edge_width = disk_offsets(aligned["aligned"], aligned["aligned cover"], radius)
    n = len(origin)
    bragg = int((np.linalg.norm(offsets, axis=1) > radius).sum())
    if not len(offsets) or bragg < min_bragg or n * len(offsets) < DISK_SHAPE_MIN_FITS:
        return None
    use = np.zeros(n, bool)
    use[np.linspace(0, n - 1, min(n, DISK_SHAPE_MAX_FITS // len(offsets))).round().astype(int)] = True
    picked = np.where(use[:, None], origin, np.nan)
    skip = np.array([not use[i0:i1].any() for i0, i1 in bounds])
    parts = [part for _, part in map_blocks(engine, "disk_shapes", data, bounds,
                                            lambda i0, i1: (picked[i0:i1], offsets, radius, edge_width, mask),
                                            client=client, skip=skip)]
    e12 = np.concatenate([p["disk e12"] for p in parts])
    if len(e12) < DISK_SHAPE_MIN_FITS:
        return None
    ratio, theta, sigma = combine_disk_ellipses(e12, np.concatenate([p["disk e12 covariance"] for p in parts]))
    return ratio, theta, sigma, len(e12)


#: :func:`ring_fit_ellipse` bins the aligned mean to at most this many pixels per side
#: (a 1024 px pattern 4 x 4): the fit's cost grows with the pixels, its precision
#: hardly (the rings are many pixels wide).
RING_FIT_MAX_PX = 256

#: :func:`ring_fit_ellipse` keeps its fit only where the standard error of (e1, e2)
#: per component is at most this: a profile with no ring to fit (noise alone) gives
#: much more.
RING_FIT_MAX_SIGMA = 2e-3

#: ... where its profile stands out of the noise by at least this
#: (:attr:`~py4dstem_prenet.rings.RingFit.contrast`; noise alone: 1-7, one 256 px
#: amorphous pattern 15 at 1e4 counts, whose fit is then no better than the network,
#: and over 100 at 1e6; the aligned mean of a 12 x 12 ring scan at 1e4: thousands)...
RING_FIT_MIN_CONTRAST = 30.0

#: ... and where the fitted centre is within this many pixels of the aligned mean's
#: centre pixel, on which every pattern's origin was placed to half a pixel.
RING_FIT_MAX_SHIFT_PX = 3.0

#: In a scan of mixed content (rings and crystals), whose ellipse the log-polar fit of
#: its isotropic patterns measures, the disk-shape fit of its crystals replaces that
#: where the disk-shape fit's standard error of (e1, e2) is at most this: below the ring
#: band's error on such scans. The strain benchmark's mixed scans and a dev set of
#: them (seeds 33M; a strip of 24 amorphous patterns beside 144 crystal patterns, a/b
#: 1.03) at 1e5-1e6 counts: the ring band 2.3e-4 to 5.7e-4 off in (e1, e2); the disk
#: shapes 1.2e-4 standard error and 0.9e-4 and 1.1e-4 off on 256 px detectors at 1e6
#: (an error whose false strain was all that PreNet added to py4DSTEM's strain maps
#: there), 6.7e-4 to 7.9e-4 standard error on 128 px detectors (kept the ring band).
MIXED_SHAPES_MAX_SIGMA = 2e-4


def ring_fit_ellipse(aligned: dict[str, np.ndarray], e12_start: np.ndarray, stop_radius: float | None = None
                     ) -> tuple[float, float, float, float, np.ndarray] | None:
    """The ellipse of a ring scan from a fit of its origin-aligned mean with a free radial profile.

    The patterns, each moved by whole pixels onto the detector's centre pixel
    (:meth:`PreNet.aligned_sum`: no resampling blur), are summed; the pixels that every pattern covered, binned to at most RING_FIT_MAX_PX per side and
    outside STOP_BAND_GAIN times a beam stop's radius (plus 2 px; the stop's round
    edge is not stretched by the projector), are fitted by
    :func:`~py4dstem_prenet.rings.fit_rings`: all rings, at every angle, with their
    centre free. On dev ring scans (12 x 12 patterns, 1e4 counts, a/b 1.01-1.04) this
    took the mean |d(a/b)| and |d(theta)| of the log-polar stretch fit from 0.0008 and
    1.3 degrees to 0.0005 and 0.7 (amorphous), 0.0004 and 0.8 to 0.0002 and 0.2
    (polycrystalline), 0.0042 and 2.8 to 0.0011 and 1.6 (amorphous behind a beam stop,
    where it also runs when no band fit reaches its quality; see :func:`preprocess`).

    Parameters
    ----------
    aligned : dict of numpy.ndarray
        'aligned' and 'aligned cover' of :meth:`PreNet.aligned_sum`, summed over
        the blocks to fit (:func:`_aligned_sum`).
    e12_start : numpy.ndarray
        (2,) starting (e1, e2) (the networks' median).
    stop_radius : float, optional
        Radius of a beam stop over the bright-field disk, pixels.

    Returns
    -------
    tuple or None
        (a/b, theta in radians, standard error of (e1, e2) per component, speckle
        share of :class:`~py4dstem_prenet.rings.RingFit`, (2,) the rings' centre less
        the centre pixel (Q_Nx // 2, Q_Ny // 2), pixels), or None where the fit did
        not converge, its standard error exceeds RING_FIT_MAX_SIGMA, its contrast is
        below RING_FIT_MIN_CONTRAST or its centre left the centre pixel by more than
        RING_FIT_MAX_SHIFT_PX.
    """
    from .rings import fit_rings

    cover = aligned["aligned cover"]
    if not cover.max() > 0:
        return None
    h, w = cover.shape
    full = cover >= cover.max() - 0.5
    if stop_radius is not None:
        qx, qy = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
        full &= np.hypot(qx, qy) > STOP_BAND_GAIN * stop_radius + 2
    image = np.where(full, aligned["aligned"], 0.0).clip(min=0)
    f = -(-max(h, w) // RING_FIT_MAX_PX)
    if f > 1:  # bin f x f: a bin is valid where all its pixels are
        hb, wb = h // f, w // f
        image = image[:hb * f, :wb * f].reshape(hb, f, wb, f).sum(axis=(1, 3))
        full = full[:hb * f, :wb * f].reshape(hb, f, wb, f).all(axis=(1, 3))
    centre = (np.array([h // 2, w // 2], float) - (f - 1) / 2) / f  # the centre pixel in binned pixels
    try:
        fit = fit_rings(image, full, centre, e12_start)
    except ValueError:  # too few pixels left
        return None
    sigma = float(np.sqrt(0.5 * (fit.covariance[2, 2] + fit.covariance[3, 3])))
    shift = float(np.hypot(*(fit.origin - centre))) * f
    if not (fit.converged and sigma <= RING_FIT_MAX_SIGMA and fit.contrast >= RING_FIT_MIN_CONTRAST
            and shift <= RING_FIT_MAX_SHIFT_PX):
        return None
    ratio, theta = e12_to_ellipse(fit.e12)
    return float(ratio), float(theta), sigma, float(fit.speckle), (fit.origin - centre) * f


def _pool_low_dose(engine: PreNet, data, scan: tuple[int, int], origin: np.ndarray, results: dict,
                   mask, empty: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Measure the origins of low-count patterns on the sums of their scan neighbourhoods.

    Needs a scan of at least 3 x 3 positions. Descan moves the origin smoothly with
    the probe position, so the 3 x 3 patterns around a position (fewer at the scan's
    border) share its origin to within the drift between neighbours, and their sum
    has up to nine times the counts. The engine measures the origin of each pooled
    pattern; the drift over the window, which does not cancel where the border cuts
    the window, is then removed with a robust parabolic fit of the pooled origins
    over the scan (the fit at the position minus its mean over the window). Patterns
    keep their own origin where they have POOL_BELOW_COUNTS counts or more, and all
    do where that fit moves by more than POOL_MAX_STEP_PX between neighbours.
    Before that fit, a pooled origin further than DESCAN_MODEL_TOL_PX from the
    scan's tile descan model (:func:`tile_descan_model`, averaged over the same
    window) is replaced by the model: at the lowest doses a pooled pattern's own
    measurement can still land on a wrong disk, and where most do, the fit follows
    them. Unless the pooled origins agree with their own robust fit (median
    distance at most POOLED_CONSISTENT_PX) and that fit disagrees with the model
    (median over DESCAN_MODEL_TOL_PX) and lies nearer the origin of the whole scan's
    sum: then a wrong tile moved the model, and the pooled origins' own fit takes its
    place. A window mixes scan lines: where whole
    rows or columns of the patterns' own origins are offset from the pooled ones
    (:func:`scan_line_offsets` of own minus pooled: flyback, line glitches), the
    offsets are added back, and so is a ripple of the beam that what they leave shows
    (:func:`scan_ripple`: mains interference, which the window averages away),
    provided the own origins agree with the pooled ones
    (median distance at most POOLED_CONSISTENT_PX); own origins further from theirs
    than max(1 px, DESCAN_OUTLIER_SIGMAS robust standard deviations) are failures and
    left out.

    Where any pattern has few counts (``results['counts']``, from the first pass), reads
    the scan once, in blocks of rows with one row either side, for the pooled patterns
    and the tile model's sums alike. A window of ``empty`` (N,) patterns only
    (:func:`empty_patterns`) is not pooled, and the blank patterns' own origins (the
    others' descan fit) are no departures for the line offsets. Updates ``origin``
    (N, 2) and ``results['origin_sigma']``, ``['origin_source']`` (5 where pooled, 6
    where the model replaced the pooled measurement) and ``['origin_symmetry']`` in
    place.

    Returns
    -------
    pooled, from_model : int
        How many origins were measured on pooled patterns, and how many of those
        the tile model replaced.
    lines, ripple : numpy.ndarray
        (N, 2) the scan-line offsets and the ripple added back, pixels (zeros where
        none).
    """
    nrx, nry = scan
    h, w = (int(v) for v in data.shape[2:])
    run = dataclasses.replace(engine, ellipse=False)
    low_all = (np.asarray(results["counts"]) < POOL_BELOW_COUNTS).reshape(nrx, nry)
    empty = empty.reshape(nrx, nry)
    if not low_all.any():
        return 0, 0, np.zeros_like(origin), np.zeros_like(origin)
    grid = _tile_grid(scan, results["counts"])
    tiles = None if grid is None else np.zeros((len(grid[0]), len(grid[1]), h, w), np.float64)
    rows = max(1, 64 // nry)
    found: dict[str, list] = {"index": [], "origin": [], "origin_sigma": [], "origin_symmetry": [],
                              "origin_blur_bias": []}
    windows: list[tuple[slice, slice]] = []
    for r0 in range(0, nrx, rows):
        r1 = min(nrx, r0 + rows)
        low = low_all[r0:r1]
        if tiles is None and not low.any():
            continue
        a0, a1 = max(0, r0 - 1), min(nrx, r1 + 1)
        x = measurement_block(read_block(data, a0 * nry, a1 * nry))[:, 0].numpy().reshape(a1 - a0, nry, h, w)
        if tiles is not None:  # the tile model's sums from the same read (rows r0..r1 only, once each)
            _add_rows_to_tiles(tiles, x[r0 - a0:r1 - a0], r0, grid)
        if not low.any():
            continue
        sums = []
        for i, j in zip(*np.nonzero(low)):
            r = r0 + i
            win = (slice(max(0, r - 1), min(nrx, r + 2)), slice(max(0, j - 1), min(nry, j + 2)))
            if empty[win].all():  # nothing to pool: the pattern keeps the others' descan fit
                continue
            sums.append(x[win[0].start - a0:win[0].stop - a0, win[1]].sum(axis=(0, 1)))
            found["index"].append(r * nry + j)
            windows.append(win)
        if not sums:
            continue
        res = run.run(np.stack(sums), mask=mask, keep_data=False)
        for key in ("origin", "origin_sigma", "origin_symmetry", "origin_blur_bias"):
            found[key].append(res[key])
    idx = np.array(found["index"])
    pooled = origin.copy()
    pooled[idx] = np.concatenate(found["origin"])
    off_model = np.zeros(len(idx), bool)
    if tiles is not None:
        model, whole = _model_from_tiles(engine, tiles, grid, scan, mask)
        m = model.reshape(nrx, nry, 2)
        expected = np.array([m[wr, wc].reshape(-1, 2).mean(axis=0) for wr, wc in windows])
        own_fit = robust_descan_fit(pooled, scan)
        own = own_fit[idx]
        consistent = np.median(np.linalg.norm(pooled[idx] - own, axis=1)) <= POOLED_CONSISTENT_PX
        if (consistent and np.median(np.linalg.norm(expected - own, axis=1)) > DESCAN_MODEL_TOL_PX
                and _nearer_whole(own_fit, model, whole, results["counts"])):
            expected = own  # a wrong tile moved the model: the pooled origins' own fit is the descan
        off_model = np.linalg.norm(pooled[idx] - expected, axis=1) > DESCAN_MODEL_TOL_PX
        pooled[idx[off_model]] = expected[off_model]
    fit = robust_descan_fit(pooled, scan).reshape(nrx, nry, 2)
    step = max(float(np.linalg.norm(np.diff(fit, axis=a), axis=-1).max()) for a in (0, 1))
    if step > POOL_MAX_STEP_PX:  # neighbours do not share the origin: every pattern keeps its own
        return 0, 0, np.zeros_like(origin), np.zeros_like(origin)
    own = origin[idx].copy()  # each pattern's own measurement
    for k, (wr, wc) in zip(idx, windows):
        origin[k] = pooled[k] + (fit[k // nry, k % nry] - fit[wr, wc].reshape(-1, 2).mean(axis=0))
    departure = np.zeros_like(origin)
    departure[idx] = own - origin[idx]
    # an own origin far from its pooled one is a failed measurement (a blanked pattern, a wrong
    # disk), not a line's offset: on a dev scan at 1e3 counts with one blanked row, that row's
    # own origins gave it a 3 px "offset"
    spread = np.linalg.norm(departure - np.median(departure, axis=0), axis=1)
    departure[spread > max(1.0, DESCAN_OUTLIER_SIGMAS * 1.4826 * float(np.median(spread)))] = np.nan
    departure[empty.ravel()] = np.nan  # a blank pattern's "own" origin is the others' fit, not a measurement
    lines, ripple = np.zeros_like(origin), np.zeros_like(origin)
    # only where the patterns' own origins measure the same thing as the pooled ones (on a
    # dev scan with read noise and an unsubtracted dark level, every own origin was 14 px off
    # at the detector's centre, and their departures' trend passed for line offsets)
    measured = np.linalg.norm(departure[idx], axis=1)
    measured = measured[np.isfinite(measured)]
    if len(measured) and np.median(measured) <= POOLED_CONSISTENT_PX:
        found_lines, found_ripple = scan_roughness(departure, scan)
        lines[idx], ripple[idx] = found_lines[idx], found_ripple[idx]
    origin += lines + ripple
    for key in ("origin_sigma", "origin_symmetry", "origin_blur_bias"):
        results[key][idx] = np.concatenate(found[key])
    results["origin_symmetry"][idx[off_model]] = np.nan  # not a symmetry measurement
    results["origin_source"][idx] = np.where(off_model, 6, 5)
    return len(idx), int(off_model.sum()), lines, ripple


#: :func:`preprocess` warns where ``mask`` keeps less than this fraction of the detector:
#: a beam stop and its rod, dead columns and a detector's gaps take far less, an
#: inverted mask (True on the stop) far more. Inverted, it had put one selected-area
#: pattern's origin in the detector's corner, with the network's sigma of 1.6 px.
MASK_MIN_KEPT = 0.5


def preprocess(
    datacube,
    *,
    denoise: bool = True,
    center: bool = True,
    ellipse: bool = True,
    batch_size: int = 64,
    device: str | None = None,
    inplace: bool = False,
    progress: bool = True,
    refine: bool = True,
    fit_descan: bool = False,
    weights_dir: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
    client=None,
    mask=None,
):
    """Denoise a DataCube and calibrate its origin and elliptical distortion.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube
        4D data (R_Nx, R_Ny, Q_Nx, Q_Ny), any detector shape (>= 16 px) and numeric
        dtype (uint8 to float64); NaN/Inf and negative pixels are read as 0. The data
        may be a numpy array, a memory map or h5py dataset (py4DSTEM ``mem="MEMMAP"``,
        :func:`~py4dstem_prenet.storage.open_datacube`) or a dask array: it is read
        block by block and never changed.
    denoise, center, ellipse : bool
        Run the denoiser, the origin calibration, the ellipse calibration.
    batch_size : int
        Patterns per block.
    device : str, optional
        'cpu', 'cuda', ...; CUDA when available if None.
    inplace : bool
        Write into ``datacube`` instead of returning a new DataCube (not with ``out``).
    progress : bool
        Show a progress bar.
    refine : bool
        Physics refinement after the networks: the origin by the Friedel symmetry of
        disk edges near the network's estimate, less the bias that smoothing the
        edges adds next to intensity slopes inside the disks (measured at two
        smoothings, median over 3 x 3 scan positions, kept in the metadata as
        ``origin_blur_correction``), and the ellipse by a log-polar
        stretch fit of the origin-aligned mean (which reads the scan twice more: once
        for the bright-field disk radius that places the fit's bands, kept as
        ``ellipse_disk_radius`` in px with ``ellipse_disk_radius_source`` 'measured',
        or 'network' where no bright-field plateau shows; where a beam stop hides the
        disk, ``ellipse_stop_radius`` in px, beyond which the bands start; and once for
        the bands;
        ``ellipse_refined_band`` and ``ellipse_refined_quality`` say which band and how
        isotropic it was); in a scan of rings only (amorphous or polycrystalline, and
        where no band fit reaches its quality but some patterns are rings), by a fit
        of the aligned mean with a free radial profile and its centre free
        (:func:`ring_fit_ellipse`; ``ellipse_refined_band`` 'rings',
        ``ellipse_refined_sigma``, the fit's standard error of (e1, e2), a lower bound,
        and ``ellipse_ring_speckle``); or, where no ring region
        carries it (a crystal), or where a scan of mixed content has crystals that
        measure it better than its ring patterns (a standard error of at most
        MIXED_SHAPES_MAX_SIGMA), by fitting
        the shape of every disk, Bragg disks as well as the bright-field disk, in up to
        DISK_SHAPE_MAX_FITS disk fits over the scan (:func:`disk_shape_ellipse`; twice
        more over part of the scan; ``ellipse_refined_band`` 'disk shapes',
        ``ellipse_disk_fits`` and ``ellipse_refined_sigma``, the standard error of
        (e1, e2) per component). The ResNet's median estimate is kept in the metadata
        as ``ellipse_network``.
    fit_descan : bool
        Replace the per-pattern origins by a robust smooth (parabolic) descan fit
        (py4DSTEM ``fit_origin``); the measured ones stay in the metadata.
    weights_dir : str, optional
        Folder of retrained weights (the shipped ones when None).
    out : str, optional
        Write the result to this EMD file block by block (through ``out + '.partial'``,
        renamed when complete) and return it opened from disk. Peak memory is then
        set by ``batch_size``, not by the scan. A partial file left by an
        interrupted run with the same input and options is resumed.
    overwrite : bool
        Allow ``out`` to replace an existing file.
    client : dask.distributed.Client, optional
        Run the blocks on this cluster (see :mod:`py4dstem_prenet.distributed`);
        the result is the same as in one process.
    mask : numpy.ndarray, optional
        (Q_Nx, Q_Ny) bool, True where the detector records the pattern and False on
        a beam stop or dead regions, when known: those pixels read as 0 and the
        origin refinement ignores their borders. Without it (and where a calibration
        stage runs) a beam stop is looked for on the scan's sum
        (:func:`scan_beam_stop`) and, where found, is the mask
        (``beam_stop_detected`` in the metadata, True on the stop). A mask that
        keeps less than MASK_MIN_KEPT of the detector draws a warning (it is likely
        inverted).

    Returns
    -------
    py4DSTEM.DataCube
        float32 data in the input's units (expected counts), with
        ``calibration.get_origin()`` -> (qx0, qy0) maps in pixels and
        ``calibration.get_ellipse()`` -> (a/b, 1, theta), and
        ``metadata['prenet']`` holding model versions, options, the detector's
        ``detector_dark_level`` and ``detector_read_noise`` (input units; 0 for
        counting data) and ``detector_count_unit`` (the value of one count in input
        units, :func:`~py4dstem_prenet.engine.count_quantum`: 1 for whole counts and
        continuous data; the measurement reads the data in counts), ``origin_sigma``
        (px: the centre network's predicted uncertainty of its own estimate, the
        window the refinement searches; the refined origins are far more precise,
        and their measured noise is ``origin_noise``, below), the network-only
        origins, and with
        refinement the inversion-symmetry score ``origin_symmetry`` (0-1),
        ``origin_source`` (0 network, 1 refined, 2 symmetry centre of the detector,
        3 re-refined at the scan's smooth descan fit because the first estimate
        disagreed with it, 4 behind a beam stop that hides the direct beam, from the
        fall-off of the diffuse background: a few pixels, see ``origin_sigma``, 5
        measured on the sum of the 3 x 3 neighbouring patterns because the pattern
        has fewer than POOL_BELOW_COUNTS counts, 6 the scan's smooth descan model
        from summed scan tiles, where that pooled measurement disagreed with it by
        more than DESCAN_MODEL_TOL_PX, 7 the most symmetric point under a beam stop
        given in ``mask`` (or found), where the origin found lay outside it or where
        the intensity is far more symmetric about another point under it (another
        lattice point: the bright-field disk hidden, a lattice's edges are about as
        symmetric about its other points), 8 the symmetry
        centre of the intensity of rings whose origin lies under a stop given in
        ``mask``: the bright-field edge is hidden and the rings' edges are speckle, 9
        the centre of the ring fit that gives the ellipse of a single pattern of rings,
        :func:`ring_fit_ellipse`, 10 the descan fit of the other patterns, where a
        pattern holds fewer than EMPTY_FRACTION of most patterns' counts above the
        read-noise floor: a blanked
        beam, a dropped frame), the counts ``origin_empty`` (those), ``origin_rerefined``,
        ``origin_pooled`` and ``origin_descan_model``, the edge-blur correction
        ``origin_blur_correction`` (px, already subtracted), the white scatter of the
        origins between scan neighbours ``origin_scatter`` (px, see
        :func:`origin_scatter`; where most origins were pooled, divided by
        sqrt(1 - POOLED_SHARED), as pooled neighbours share most of their noise) and
        ``origin_descan_smoothed``: True where that
        scatter exceeded NOISY_ORIGIN_PX (measurement noise, e.g. speckled rings
        behind a beam stop; unless the measured noise explains less than
        NOISE_SHARE_MIN of it) and the origins are the scan's descan fit. The fit is
        robust and parabolic, plus ``origin_line_offsets`` (R_Nx, R_Ny, 2), px: the
        offsets of whole scan rows or columns that stand out of the noise
        (:func:`scan_line_offsets`: flyback, line glitches; zeros where none), plus
        ``origin_ripple`` (R_Nx, R_Ny, 2), px: a periodic oscillation of the beam that
        stands out of the noise (:func:`scan_ripple`: mains interference; zeros where
        none).
        Otherwise, on scans of at least 5 x 5 that the fit describes, the
        per-pattern measurement noise ``origin_noise`` (px RMS, by binomial thinning
        of up to 32 patterns of at least 5e3 counts, or for rings behind a stop by
        splitting them into angular halves, :func:`origin_noise`) first weighs each
        edge-symmetry origin against the fit of its bright-field disk by inverse
        variance (:func:`combine_disk_fit`; ``origin_disk_weighed`` of them, 0
        where the noise is not measured), then sets
        ``origin_shrinkage`` w (:func:`descan_shrinkage` of the weighted origins'
        scatter and noise; 1 where not measured), and
        the origins are the fit plus w times their departure from it. The
        per-pattern ones are ``origin_measured`` either way.
        With ``out``, its data is an h5py dataset of the output file.

    Raises
    ------
    TypeError
        If ``datacube`` is not a py4DSTEM DataCube or its data is not numeric.
    ValueError
        If its data is not 4D, the detector is smaller than 16 x 16 pixels, an
        option is invalid, the ellipse stage runs without origins
        (``center=False`` and no calibrated origin), or a calibration stage runs on
        a scan whose every pattern is blank.
    FileExistsError
        If ``out`` exists and ``overwrite`` is False.
    WeightsError
        If a weights file is missing, corrupt or from another version.
    """
    import py4DSTEM
    from emdfile import Metadata
    from tqdm.auto import tqdm

    if not isinstance(datacube, py4DSTEM.DataCube):
        raise TypeError(f"preprocess expects a py4DSTEM DataCube, got {type(datacube).__name__}; "
                        "wrap arrays with py4DSTEM.DataCube(data=array)")
    data = datacube.data
    if len(data.shape) != 4:
        raise ValueError(f"DataCube data must be 4D (R_Nx, R_Ny, Q_Nx, Q_Ny), got shape {data.shape}")
    nrx, nry, h, w = (int(s) for s in data.shape)
    if min(h, w) < 16 or nrx * nry < 1:
        raise ValueError(f"detector must be at least 16 x 16 pixels and the scan non-empty, got shape {data.shape}")
    if not np.issubdtype(np.dtype(data.dtype), np.number):
        raise TypeError(f"DataCube data must be numeric, got {data.dtype}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if mask is not None:
        mask = check_detector_mask(mask, (h, w))
        if not mask.any():
            raise ValueError("mask has no valid pixel (True = recorded pixel)")
        if mask.mean() < MASK_MIN_KEPT:
            warnings.warn(f"mask keeps {100 * mask.mean():.0f}% of the detector: True must mark the pixels that "
                          "record the pattern and False a beam stop or dead regions (an inverted mask leaves only "
                          "the stop, and the origin is measured there)", UserWarning, stacklevel=2)
    if inplace and out is not None:
        raise ValueError("inplace=True and out= exclude each other")
    if out is not None and os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    engine = PreNet(denoise=bool(denoise), center=bool(center), ellipse=bool(ellipse), refine=bool(refine),
                    device=None if device is None else str(device), weights_dir=weights_dir)
    engine.check_weights()
    n = nrx * nry
    given_origin = None
    if ellipse and not center:
        try:
            qx_in, qy_in = datacube.calibration.get_origin()
            given = np.stack([np.broadcast_to(qx_in, (nrx, nry)), np.broadcast_to(qy_in, (nrx, nry))], -1)
            given_origin = np.asarray(given, float).reshape(n, 2)
        except Exception:
            given_origin = None
        if given_origin is None or not np.all(np.isfinite(given_origin)):
            raise ValueError("the ellipse stage needs origins: pass center=True or set "
                             "datacube.calibration.set_origin(...) first")

    # a beam stop found on the scan's sum is the mask where none is given (and the
    # patterns are not searched one by one: the sum holds the whole scan's counts)
    found_stop = None
    if mask is None and (center or ellipse):
        found_stop = scan_beam_stop(data)
        engine = dataclasses.replace(engine, find_beam_stops=False)
    if found_stop is not None:
        mask = ~found_stop
    bounds = block_bounds(n, int(batch_size))
    writer = None
    if out is not None:
        writer = EMDWriter(out, (nrx, nry, h, w), len(bounds),
                           _fingerprint(data, engine, batch_size, fit_descan, mask), overwrite=overwrite)
        out_data = writer.data
        results: dict[str, np.ndarray] = writer.results()
        skip = writer.done
    else:
        out_data = np.empty((nrx, nry, h, w), np.float32)
        results = {}
        skip = None

    def extra(i0: int, i1: int) -> tuple:
        return (None if given_origin is None else given_origin[i0:i1], mask)

    try:
        bar = tqdm(total=len(bounds), initial=0 if skip is None else int(np.count_nonzero(skip)),
                   disable=not progress, desc="PreNet", unit="block")
        for k, res in map_blocks(engine, "run", data, bounds, extra, client=client, skip=skip):
            i0, i1 = bounds[k]
            if writer is not None:
                writer.write(k, i0, i1, res)
            else:
                out_data.reshape(n, h, w)[i0:i1] = res["data"]
                for key, val in res.items():
                    if key != "data":
                        empty = np.full((n, *val.shape[1:]), fill_value(val.dtype), val.dtype)
                        results.setdefault(key, empty)[i0:i1] = val
            bar.update(1)
        bar.close()
        if writer is not None:
            results = writer.results()
        origin = results["origin"] if center else given_origin
        n_rerefined = n_pooled = n_model = 0
        lines = ripple = None
        if (center or ellipse) and not np.any(_signal(results) > 0):
            where = "" if mask is None else " where mask is True (True must mark the pixels that record the pattern)"
            raise ValueError(f"every pattern of the datacube is blank (no counts above its read-noise floor{where}): "
                             "there is no origin or ellipse to measure")
        empty = empty_patterns(_signal(results))
        if center:
            origin = fill_empty(origin, empty, (nrx, nry))
        if center and refine and min(nrx, nry) >= 3:
            origin = origin.copy()
            n_pooled, n_model, lines, ripple = _pool_low_dose(engine, data, (nrx, nry), origin, results, mask,
                                                              empty)
        if center and refine and min(nrx, nry) >= 3:
            origin, source, n_rerefined = _descan_consistency(engine, data, bounds, origin, results["origin_source"],
                                                              (nrx, nry), mask, client, results.get("origin_network"))
            results["origin_source"] = source
        correction = None
        if center and refine and "origin_blur_bias" in results:
            correction = blur_correction(results["origin_blur_bias"], results["origin_source"], (nrx, nry))
            origin = origin - correction
        smoothed, scatter, noise, shrink, n_weighed = False, None, None, 1.0, 0
        if center and refine and min(nrx, nry) >= NOISY_MIN_SCAN:
            # scan rows or columns offset from each other (flyback, line glitches) are descan, not
            # noise; pooled origins share their noise with their neighbours, which the line test
            # would take for offsets: theirs were found on the patterns' own origins
            if n_pooled == 0:
                departure = np.where(empty[:, None], np.nan, origin - robust_descan_fit(origin, (nrx, nry)))
                lines, ripple = scan_roughness(departure, (nrx, nry))
            white, total, fitted = origin_scatter(origin, (nrx, nry), lines + ripple, empty)
            if 2 * n_pooled > nrx * nry:  # neighbours share most of their noise (POOLED_SHARED)
                white = white / math.sqrt(1.0 - POOLED_SHARED)
            scatter = white
            if n_pooled == 0 and total <= NOISY_STRUCTURE_MAX * white:
                noise = origin_noise(engine, data, results["origin"], results["origin_source"], results["counts"],
                                     mask)
                if noise is not None and noise > 0 and "origin_disk_fit" in results:
                    # the bright-field disk's own fit, weighed in: the departures about the
                    # descan are then measured on the weighted origins, with their noise
                    origin, noise, n_weighed = combine_disk_fit(
                        origin, results["origin_disk_fit"], results["origin_disk_sigma"], results["origin_source"],
                        results["counts"], noise)
                    white, total, fitted = origin_scatter(origin, (nrx, nry), lines + ripple, empty)
                    scatter = white
            # where the noise is measured, scatter that it does not explain is the beam's (a descan
            # rough from position to position), not noise: the origins are kept, less their noise
            smoothed = origins_are_noise(white, total) and (noise is None or noise >= NOISE_SHARE_MIN * white)
        measured = origin
        if smoothed:  # the per-pattern origins are noise about the descan: take its fit
            origin = fitted
        elif noise is not None:  # keep the part of each departure from the fit that is not noise
            shrink = descan_shrinkage(scatter, noise)
            origin = fitted + shrink * (origin - fitted)
        if center and empty.any():  # after every step, from the final origins
            origin = fill_empty(origin, empty, (nrx, nry))
            for key, value in (("origin_source", 10), ("origin_symmetry", np.nan)):
                if key in results:
                    results[key][empty] = value

        md = Metadata(name="prenet")
        md["version"] = __version__
        md["stages"] = ",".join(engine.stages) or "none"
        md["model_sha256"] = engine.model_hashes()
        md["refine"] = bool(refine)
        md["fit_descan"] = bool(fit_descan)
        if found_stop is not None:
            md["beam_stop_detected"] = found_stop
        # an integrating detector's unsubtracted dark level and read noise (counts; 0 for counting
        # data): origins are measured above them
        if "detector_floor" in results:  # (absent from outputs resumed from an earlier version)
            md["detector_dark_level"] = float(np.median(results["detector_floor"][:, 0]))
            md["detector_read_noise"] = float(np.median(results["detector_floor"][:, 1]))
        if "count_quantum" in results:
            md["detector_count_unit"] = float(np.median(results["count_quantum"]))
        origin_cal = ellipse_cal = None
        if center:
            qx0 = origin[:, 0].reshape(nrx, nry)
            qy0 = origin[:, 1].reshape(nrx, nry)
            md["origin_measured"] = measured.reshape(nrx, nry, 2)
            if correction is not None:
                md["origin_blur_correction"] = correction.reshape(nrx, nry, 2)
            md["origin_empty"] = int(empty.sum())
            md["origin_rerefined"] = int(n_rerefined)
            md["origin_pooled"] = int(n_pooled)
            md["origin_descan_model"] = int(n_model)
            md["origin_network"] = results["origin_network"].reshape(nrx, nry, 2)
            md["origin_sigma"] = results["origin_sigma"].reshape(nrx, nry)
            for key in ("origin_symmetry", "origin_source"):
                if key in results:
                    md[key] = results[key].reshape(nrx, nry)
            md["origin_descan_smoothed"] = bool(smoothed)
            if scatter is not None:
                md["origin_scatter"] = float(scatter)
            if noise is not None:
                md["origin_noise"] = float(noise)
            md["origin_shrinkage"] = float(shrink)
            md["origin_disk_weighed"] = int(n_weighed)
            if lines is not None:
                md["origin_line_offsets"] = lines.reshape(nrx, nry, 2)
                md["origin_ripple"] = ripple.reshape(nrx, nry, 2)
            if fit_descan and not smoothed and n >= 3:
                from .baselines import fit_origin

                qx0, qy0 = fit_origin(qx0, qy0, "parabola")  # a plane or constant on thin scans
            origin_cal = (qx0, qy0)
        if ellipse:
            e12 = results["e12"]
            e12_median = np.median(e12[~empty], axis=0)
            net_ratio, net_theta = e12_to_ellipse(e12_median)
            md["e12_per_pattern"] = e12.reshape(nrx, nry, 2)
            md["ellipse_network"] = np.array([float(net_ratio), 1.0, float(net_theta)])
            ratio, theta = float(net_ratio), float(net_theta)
            md["ellipse_method"] = "network (median over scan)"
            if refine:
                # the recorded patterns (hot pixels removed): averaging over the scan beats the
                # noise, and no denoiser smoothing touches the edges
                r_bf = float(np.nanmedian(results["disk_radius"])) if center else None

                def polar_sums(todo: dict[str, tuple[float, float]], skip=None) -> dict[str, np.ndarray]:
                    total: dict[str, np.ndarray] = {}
                    if todo:
                        for _, part in map_blocks(engine, "polar_sums", data, bounds,
                                                  lambda i0, i1: (origin[i0:i1], todo), client=client, skip=skip):
                            add_polar_sums(total, part)
                    return total

                # the band of the bright-field edge follows the disk radius measured on the
                # aligned mean of up to RADIUS_PATTERNS patterns spread over the scan, where it
                # shows (the network's can be off by 20-150% on small disks among touching Bragg
                # disks); the network's under a beam stop
                chosen = np.zeros(len(bounds), bool)
                chosen[np.linspace(0, len(bounds) - 1, min(len(bounds), -(-RADIUS_PATTERNS // int(batch_size))))
                       .round().astype(int)] = True
                measured, stop = measure_disk_radius(lambda b: polar_sums(b, skip=~chosen), origin, (h, w))
                if measured is not None:
                    r_bf = measured
                if r_bf is not None:
                    md["ellipse_disk_radius"] = float(r_bf)
                    md["ellipse_disk_radius_source"] = "measured" if measured is not None else "network"
                if stop is not None:  # a beam stop hides the bright-field disk: the bands start beyond it
                    md["ellipse_stop_radius"] = stop
                bands = ellipse_bands(origin, (h, w), r_bf, stop_radius=stop)
                sums = polar_sums(bands)
                # the chosen blocks' origin-aligned sum, read at most once for the fits below
                aligned_sum = functools.cache(lambda: _aligned_sum(engine, data, bounds, origin, chosen, mask,
                                                                   client))
                # a scan of rings only: the ring fit of the aligned mean, where it is precise
                tried_rings = ring_scan(sums)
                rings = ring_fit_ellipse(aligned_sum(), e12_median, stop) if tried_rings else None
                est = fit_ellipse_bands(sums, bands) if rings is None else None
                # no ring region carries the ellipse (a crystal: its log-polar fit is on the
                # bright-field edge, or on the whole pattern where Bragg disks and diffuse
                # scattering make it look isotropic enough): the shapes of all its disks, the
                # Bragg disks as well as the bright-field disk, measure it better (a
                # polycrystal's spotty rings can fail the isotropy test too: there, the aligned
                # mean shows no Bragg disk, and the rings' fit stands)
                full = est is not None and est[3] == "full" and not tried_rings
                # a scan of mixed content (rings and crystals): its few ring patterns carry the
                # ellipse unless the crystals' many disks measure it better still
                mixed = est is not None and est[3] == ISOTROPIC
                shapes = (disk_shape_ellipse(engine, data, bounds, origin, r_bf, aligned_sum(), mask, client,
                                             min_bragg=DISK_SHAPE_MIN_BRAGG if full or mixed else 0)
                          if rings is None and r_bf is not None
                          and (est is None or est[3] == "bright-field edge" or full or mixed) else None)
                if mixed and shapes is not None and shapes[2] > MIXED_SHAPES_MAX_SIGMA:
                    shapes = None
                some_rings = sums.get(ISOTROPIC + " count", (0, 0))[0] >= 1
                if not tried_rings and shapes is None and est is None and some_rings:
                    # no band fit reached its quality and no disk fit counts, but some patterns
                    # are rings: a ring scan whose speckle failed most patterns' isotropy test
                    # (amorphous films at 1e4 counts behind a stop). Not where a band fit stands:
                    # on crystal dev scans whose Bragg disks the disk-shape fits missed, the
                    # ring fit of the aligned mean was 0.006-0.012 off in a/b, the band fit 0.001
                    rings = ring_fit_ellipse(aligned_sum(), e12_median, stop)
                if rings is not None:
                    ratio, theta, sigma, speckle, offset = rings
                    md["ellipse_refined_band"] = "rings"
                    md["ellipse_refined_sigma"] = sigma
                    md["ellipse_ring_speckle"] = speckle
                    md["ellipse_method"] = "refined (ring fit of the aligned mean)"
                    if center and n == 1:
                        # one pattern of rings (a selected-area pattern): the aligned mean is the
                        # pattern moved by whole pixels, and the fit's centre is its origin
                        moved = np.round(np.array([h // 2, w // 2]) - origin[0])
                        found = np.array([h // 2, w // 2]) + offset - moved
                        origin_cal = (np.full((1, 1), found[0]), np.full((1, 1), found[1]))
                        md["origin_source"] = np.full((1, 1), 9, np.int8)
                elif shapes is not None:
                    ratio, theta, sigma, fits = shapes
                    md["ellipse_refined_band"] = "disk shapes"
                    md["ellipse_refined_sigma"] = sigma
                    md["ellipse_disk_fits"] = fits
                    md["ellipse_method"] = "refined (disk-shape fits)"
                elif est is not None:
                    ratio, theta, quality, band = est
                    md["ellipse_refined_quality"] = quality
                    md["ellipse_refined_band"] = band
                    md["ellipse_method"] = "refined (log-polar stretch fit)"
            ellipse_cal = (float(ratio), 1.0, float(theta))
    except BaseException:
        if writer is not None:
            writer.close()  # the partial file stays, marked by its name, for a rerun to resume
        raise

    if inplace:
        result = datacube
        result.data = out_data
    else:
        shape = (2, 2, h, w) if writer is not None else None  # the written data is not copied
        result = py4DSTEM.DataCube(data=out_data if shape is None else np.zeros(shape, np.float32),
                                   name=datacube.name or "datacube", calibration=datacube.calibration.copy())
    if origin_cal is not None:
        result.calibration.set_origin(origin_cal)
    if ellipse_cal is not None:
        result.calibration.set_ellipse(ellipse_cal)
    result.metadata = md
    if writer is None:
        return result
    writer.finish(result)
    return open_datacube(out, mem="MEMMAP")
