"""Live mode: PreNet on frames as the detector delivers them.

:func:`stream` takes an iterator of frames (or chunks of frames) in scan order and
yields, for every block of ``batch_size`` frames, the denoised frames, their
origins with uncertainties, the origins of a running descan fit, and a running
estimate of the ellipse, so that a microscopist sees calibrated data during the
acquisition. Memory is bounded: frames are not kept after they are yielded; the
descan fit keeps normal equations and the ellipse keeps two summed log-polar views.

The origins are those of :func:`~py4dstem_prenet.preprocess` before its scan-level
steps: no pooling of low-count neighbourhoods, no edge-blur correction (both need
the neighbouring rows of the scan, which have not arrived yet) and no shrinkage
towards the descan fit (it needs the whole scan's scatter). Blank frames (the beam
blanked or not yet on: no counts above the read-noise floor, or fewer than
``preprocess.EMPTY_FRACTION`` of what the 90th percentile of a block so far held) stay out of the descan fit
and the ellipse, and take the fit's origin once there is one.

Latency is the time from the arrival of the oldest frame of a block (when the
iterator handed it over) to the yield of its results: filling the block plus
computing it. Smaller blocks mean lower latency and lower throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .engine import PreNet, add_polar_sums, ellipse_bands, fit_ellipse_bands, measure_disk_radius
from .preprocess import empty_patterns

__all__ = ["stream", "StreamUpdate", "DescanFit"]


@dataclass
class StreamUpdate:
    """Results for one block of frames.

    Attributes
    ----------
    index : numpy.ndarray
        (n,) flat scan indices (frame numbers from 0) of the block.
    data : numpy.ndarray
        (n, Q_Nx, Q_Ny) float32 denoised frames (the cleaned input when the
        denoiser is off), in counts.
    origin : numpy.ndarray
        (n, 2) measured origins (qx0, qy0), pixels; a frame further than
        ``reject_px`` from the running descan fit is re-measured around the fit.
    origin_sigma : numpy.ndarray
        (n,) the centre network's predicted uncertainty of its own estimate, pixels
        (the refined origins are far more precise).
    origin_fit : numpy.ndarray
        (n, 2) origins of the running descan fit, updated with this block.
    ellipse : tuple or None
        Running (a/b, 1, theta) in py4DSTEM's convention, None until enough frames.
    latency_s : float
        Seconds from the arrival of the block's first frame to this yield.
    frames_per_s : float
        Frames yielded per second since the stream started.
    """

    index: np.ndarray
    data: np.ndarray
    origin: np.ndarray
    origin_sigma: np.ndarray
    origin_fit: np.ndarray
    ellipse: tuple[float, float, float] | None
    latency_s: float
    frames_per_s: float


class DescanFit:
    """Running robust least-squares fit of the origin over the scan.

    Parameters
    ----------
    scan_shape : tuple of int or None
        (R_Nx, R_Ny) raster of the scan (frame i at row i // R_Ny, column i % R_Ny);
        None for a line of unknown length.
    model : {'plane', 'parabola'}
        Polynomial in the scan position, as py4DSTEM's ``fit_origin``.
    reject_px : float
        After the first fit, a frame further than this from it (pixels) is left out
        of the fit (an outlier: a wrong disk, a frame without beam).
    """

    def __init__(self, scan_shape: tuple[int, int] | None, model: str = "plane", reject_px: float = 1.5):
        if model not in ("plane", "parabola"):
            raise ValueError(f"model must be 'plane' or 'parabola', got {model!r}")
        self.scan_shape = scan_shape
        self.model = model
        self.reject_px = float(reject_px)
        n_par = 3 if model == "plane" else 6
        self._xtx = np.zeros((n_par, n_par))
        self._xty = np.zeros((n_par, 2))
        self._count = 0
        self._coef: np.ndarray | None = None

    @property
    def established(self) -> bool:
        """True once the fit rests on three times as many frames as it has parameters and its
        frames determine every one (not a single scan row, say)."""
        return self._coef is not None and self._count >= 3 * self._xtx.shape[0] and self._determined()

    def _determined(self) -> bool:
        return int(np.linalg.matrix_rank(self._xtx)) == self._xtx.shape[0]

    def _design(self, index: np.ndarray) -> np.ndarray:
        if self.scan_shape is None:
            rx, ry = np.zeros(len(index)), index.astype(float)
        else:
            rx, ry = (index // self.scan_shape[1]).astype(float), (index % self.scan_shape[1]).astype(float)
        cols = [np.ones_like(rx), rx, ry]
        if self.model == "parabola":
            cols += [rx * rx, rx * ry, ry * ry]
        return np.stack(cols, axis=1)

    def update(self, index: np.ndarray, origin: np.ndarray) -> np.ndarray:
        """Add frames (flat indices, (n, 2) origins) and return the fit at those frames."""
        x = self._design(np.asarray(index))
        keep = np.all(np.isfinite(origin), axis=1)
        if self._coef is not None and self._determined():
            # before, a fit of frames of one scan row beyond the first (whose row coordinate,
            # not 0, aliases the constant) rejected every frame of the next row, for good
            keep &= np.linalg.norm(origin - x @ self._coef, axis=1) <= self.reject_px
        xk, yk = x[keep], origin[keep]
        self._xtx += xk.T @ xk
        self._xty += xk.T @ yk
        self._count += int(keep.sum())
        if self._count >= 1:
            self._coef = np.linalg.lstsq(self._xtx, self._xty, rcond=None)[0]
        return x @ self._coef if self._coef is not None else np.full_like(origin, np.nan)


def _blocks(frames: Iterable[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, float]]:
    """Regroup frames / chunks into blocks of ``batch_size``; yields (block, arrival time of its first frame)."""
    buf: list[np.ndarray] = []
    have = 0
    t_first = None
    shape = None
    for item in frames:
        arr = np.asarray(item)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"stream items must be frames (Q_Nx, Q_Ny) or chunks (n, Q_Nx, Q_Ny), got shape {arr.shape}")
        if shape is None:
            shape = arr.shape[1:]
            if min(shape) < 16:
                raise ValueError(f"detector must be at least 16 x 16 pixels, got {shape}")
        elif arr.shape[1:] != shape:
            raise ValueError(f"frame shape changed from {shape} to {arr.shape[1:]}")
        if t_first is None and len(arr):
            t_first = time.perf_counter()
        buf.append(arr)
        have += len(arr)
        while have >= batch_size:
            cat = np.concatenate(buf)
            yield cat[:batch_size], t_first
            rest = cat[batch_size:]
            buf, have = ([rest], len(rest)) if len(rest) else ([], 0)
            t_first = time.perf_counter() if have else None
    if have:
        yield np.concatenate(buf), t_first


def stream(frames: Iterable[np.ndarray], *, scan_shape: tuple[int, int] | None = None, batch_size: int = 16,
           denoise: bool = True, refine: bool = True, descan: str = "plane", ellipse_every: int = 8,
           device: str | None = None, weights_dir: str | None = None) -> Iterator[StreamUpdate]:
    """Denoise and calibrate frames as they arrive.

    Parameters
    ----------
    frames : iterable of numpy.ndarray
        Frames (Q_Nx, Q_Ny) or chunks (n, Q_Nx, Q_Ny) in scan order, any numeric
        dtype; NaN/Inf and negative pixels read as 0. Consumed lazily.
    scan_shape : tuple of int, optional
        (R_Nx, R_Ny) raster, for a descan fit over the scan position.
    batch_size : int
        Frames per block (latency against throughput).
    denoise, refine : bool
        Denoiser on/off; Friedel edge refinement of the origin on/off.
    descan : {'plane', 'parabola'}
        Running descan model.
    ellipse_every : int
        Refit the running ellipse every this many blocks.
    device, weights_dir : str, optional
        As in :func:`~py4dstem_prenet.preprocess`.

    Yields
    ------
    StreamUpdate
        One per block, in order.

    Raises
    ------
    ValueError
        For a bad option, or frames that are not 2D/3D, smaller than 16 x 16 or
        change shape mid-stream.
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if int(ellipse_every) < 1:
        raise ValueError(f"ellipse_every must be >= 1, got {ellipse_every}")
    if scan_shape is not None and (len(scan_shape) != 2 or min(scan_shape) < 1):
        raise ValueError(f"scan_shape must be two positive sizes, got {scan_shape}")
    fit = DescanFit(scan_shape, descan)
    engine = PreNet(denoise=denoise, center=True, ellipse=False, refine=refine, device=device,
                    weights_dir=weights_dir)
    engine.check_weights()
    t_start = time.perf_counter()
    n_done = 0
    bands: dict | None = None
    sums: dict = {}
    ellipse = None
    signal_level = 0.0  # the largest 90th percentile of a block's signal so far
    for k, (block, t_first) in enumerate(_blocks(frames, int(batch_size))):
        res = engine.run(block)
        index = np.arange(n_done, n_done + len(block))
        origin = res["origin"]
        signal_level = max(signal_level, float(np.percentile(res["signal"], 90)))
        blank = (res["signal"] <= 0) | empty_patterns(res["signal"], signal_level)
        fitted = fit.update(index, np.where(blank[:, None], np.nan, origin))
        if blank.any():  # nothing measured there: the descan fit's origin, once there is a fit
            origin = np.where((blank[:, None] & np.isfinite(fitted)), fitted, origin)
        if refine and fit.established:
            # a frame far from the running descan fit (a wrong disk) is re-measured around the fit
            far = np.linalg.norm(origin - fitted, axis=1) > fit.reject_px
            if far.any():
                origin = origin.copy()
                origin[far] = engine.refine_at(block, fitted, None, far)["origin"][far]
        h, w = block.shape[1:]
        if refine:
            inside = np.all((origin >= 2) & (origin <= np.array([h - 3, w - 3])), axis=1) & ~blank
            if bands is None and inside.any():
                # fixed bands from the first block, with 4 px of room for the descan to come; the
                # bright-field radius measured on its aligned mean where it shows (as preprocess)
                measured, stop = measure_disk_radius(
                    lambda b: engine.polar_sums(block[inside], origin[inside], b), origin, (h, w), margin=6.0)
                radius = float(np.nanmedian(res["disk_radius"][~blank])) if measured is None else measured
                bands = ellipse_bands(origin, (h, w), radius, margin=6.0, stop_radius=stop)
            if bands and inside.any():
                part = engine.polar_sums(block[inside], origin[inside], bands)
                add_polar_sums(sums, part)
            if sums and k % int(ellipse_every) == 0:
                est = fit_ellipse_bands(sums, bands)
                ellipse = (est[0], 1.0, est[1]) if est is not None else None
        n_done += len(block)
        now = time.perf_counter()
        yield StreamUpdate(index=index, data=res["data"], origin=origin, origin_sigma=res["origin_sigma"],
                           origin_fit=fitted, ellipse=ellipse, latency_s=now - t_first,
                           frames_per_s=n_done / max(now - t_start, 1e-9))
