"""The py4DSTEM adapter: ``datacube = prenet.preprocess(datacube)``.

Batches the scan positions of a DataCube into tensors, runs the denoiser, the
centre network (+ Friedel edge refinement) and the ellipse network, and writes the
results back as py4DSTEM calibrations: ``calibration.set_origin((qx0, qy0))`` and
``calibration.set_ellipse((a/b, 1, theta))``, so that ``find_Bragg_disks``,
``braggvectors.calibrate()`` and strain mapping use them unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from . import __version__
from .conventions import e12_to_ellipse
from .pretrained import load_model, model_card
from .refine import log_polar_view, refine_ellipse, refine_origin
from .training import E12_SCALE
from .views import VIEW_SIZE, full_view, polar_rmax, polar_view, view_to_detector

__all__ = ["preprocess"]


def _read_batch(data, i0: int, i1: int) -> np.ndarray:
    """Patterns ``i0:i1`` of a 4D array-like in scan order (reads only those, for h5py or memmaps)."""
    nry = data.shape[1]
    if isinstance(data, np.ndarray):
        idx = np.arange(i0, i1)
        return data[idx // nry, idx % nry]
    return np.stack([np.asarray(data[i // nry, i % nry]) for i in range(i0, i1)])


def _clean_batch(block: np.ndarray) -> torch.Tensor:
    x = np.asarray(block, dtype=np.float32)
    x = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    return torch.from_numpy(np.clip(x, 0, None))[:, None]


def _median3(x: torch.Tensor) -> torch.Tensor:
    """Replace pixels far above their 3x3 median (hot pixels) by that median."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    med = p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*x.shape, 9).median(dim=-1).values
    return torch.where(x > 4 * med + 10, med, x)


#: Below this many counts per pattern the edge refinement reads the denoised pattern;
#: above it, the recorded one with hot pixels removed (the denoiser's smoothing then
#: costs more edge precision than its noise reduction brings; measured, see BENCHMARKS.md).
LOW_DOSE_COUNTS = 5e3


def _refinement_input(x: torch.Tensor, denoised: torch.Tensor | None) -> torch.Tensor:
    """Per pattern: denoised at low counts, hot-pixel-filtered recording otherwise."""
    raw = _median3(x).float()
    if denoised is None:
        return raw
    low = x.sum(dim=(1, 2, 3)) < LOW_DOSE_COUNTS
    return torch.where(low[:, None, None, None], denoised.float(), raw)


def _ellipse_from_aligned_mean(raw, origin: np.ndarray, r_bf: float | None, batch_size: int, dev):
    """Log-polar stretch fit on the origin-aligned mean (see :func:`refine_ellipse`).

    Two radial bands are fitted: everything inside the detector, and the band of the
    bright-field disk edge. The full band is used when its content is isotropic
    (rings; quality >= 0.97); otherwise the bright-field band, whose edge is the
    image of the round condenser aperture whatever the specimen.
    """
    nrx, nry, h, w = (int(s) for s in raw.shape)
    n = nrx * nry
    o_all = origin.reshape(n, 2)
    edge = float(min(o_all[:, 0].min(), h - 1 - o_all[:, 0].max(), o_all[:, 1].min(), w - 1 - o_all[:, 1].max())) - 2
    bands = {"full": (2.0, edge)}
    if r_bf is not None and np.isfinite(r_bf):
        bands["bright-field edge"] = (max(1.0, 0.4 * r_bf), min(edge, 1.2 * r_bf + 2))
    bands = {k: v for k, v in bands.items() if v[1] > 2 * v[0] and v[1] > 4}
    if not bands:
        return None
    sums = {k: 0.0 for k in bands}
    for i0 in range(0, n, batch_size):
        i1 = min(n, i0 + batch_size)
        x = _median3(_clean_batch(_read_batch(raw, i0, i1)))
        x = (x / x.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)).to(dev)
        o = torch.from_numpy(o_all[i0:i1]).float().to(dev)
        for k, (r0, r1) in bands.items():
            sums[k] = sums[k] + log_polar_view(x, o, r0, r1, 256, 180).sum(0).cpu().numpy()
    results = {k: refine_ellipse(sums[k], *bands[k], iterations=4) for k in bands}
    band = "full" if results.get("full", (0, 0, 0))[2] >= 0.97 or len(results) == 1 else "bright-field edge"
    ratio, theta, quality = results[band]
    return ratio, theta, quality, band


def preprocess(
    datacube,
    *,
    denoise: bool = True,
    center: bool = True,
    ellipse: bool = True,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    inplace: bool = False,
    progress: bool = True,
    refine: bool = True,
    fit_descan: bool = False,
    weights_dir: str | None = None,
):
    """Denoise a DataCube and calibrate its origin and elliptical distortion.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube
        4D data (R_Nx, R_Ny, Q_Nx, Q_Ny), any detector shape (>= 16 px) and dtype
        (uint8 to float64); NaN and Inf pixels are read as 0.
    denoise, center, ellipse : bool
        Run the denoiser, the origin calibration, the ellipse calibration.
    batch_size : int
        Patterns per batch.
    device : str or torch.device, optional
        'cpu', 'cuda', ...; CUDA when available if None.
    inplace : bool
        Write into ``datacube`` instead of returning a new DataCube.
    progress : bool
        Show a progress bar.
    refine : bool
        Physics refinement after the networks: the origin by the Friedel symmetry of
        disk edges near the network's estimate, and the ellipse by a log-polar
        stretch fit on the origin-aligned mean (the ResNet's median estimate is
        kept in the metadata as ``ellipse_network``).
    fit_descan : bool
        Replace the per-pattern origins by a robust smooth (parabolic) descan fit
        (py4DSTEM ``fit_origin``); the measured ones stay in the metadata.
    weights_dir : str, optional
        Folder of retrained weights (the shipped ones when None).

    Returns
    -------
    py4DSTEM.DataCube
        float32 data in the input's units (expected counts), with
        ``calibration.get_origin()`` -> (qx0, qy0) maps in pixels and
        ``calibration.get_ellipse()`` -> (a/b, 1, theta), and
        ``metadata['prenet']`` holding model versions, options, the per-pattern
        origin uncertainty ``origin_sigma`` (px) and the network-only origins.

    Raises
    ------
    TypeError
        If ``datacube`` is not a py4DSTEM DataCube.
    ValueError
        If its data is not 4D, the detector is smaller than 16 x 16 pixels, or the
        ellipse stage runs without origins (``center=False`` and no calibrated origin).
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
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [n for n, on in (("denoiser", denoise), ("centre", center), ("ellipse", ellipse)) if on]
    models = {n: load_model(n, weights_dir, dev) for n in names}

    n = nrx * nry
    out_data = np.empty((nrx, nry, h, w), np.float32)
    origin_net = np.full((n, 2), np.nan)
    origin = np.full((n, 2), np.nan)
    sigma = np.full(n, np.nan)
    radius = np.full(n, np.nan)
    e12 = np.full((n, 2), np.nan)
    if ellipse and not center:
        try:
            qx_in, qy_in = datacube.calibration.get_origin()
            given = np.stack([np.broadcast_to(qx_in, (nrx, nry)), np.broadcast_to(qy_in, (nrx, nry))], -1)
            origin[:] = given.reshape(n, 2)
        except Exception:
            origin[:] = np.nan
        if not np.all(np.isfinite(origin)):
            raise ValueError("the ellipse stage needs origins: pass center=True or set "
                             "datacube.calibration.set_origin(...) first")
    px_per_view = 0.5 * (h + w) / VIEW_SIZE
    with torch.inference_mode():
        for i0 in tqdm(range(0, n, batch_size), disable=not progress, desc="PreNet", unit="batch"):
            i1 = min(n, i0 + batch_size)
            x = _clean_batch(_read_batch(data, i0, i1)).to(dev)
            y = models["denoiser"](x) if denoise else x
            out_data.reshape(n, h, w)[i0:i1] = y[:, 0].float().cpu().numpy()
            if center:
                # the calibrators were trained on recorded (noisy) patterns: they see x
                pred = models["centre"](full_view(x)).float().cpu()
                o = view_to_detector(pred[:, :2], (h, w))
                origin_net[i0:i1] = o.numpy()
                s_px = torch.exp(pred[:, 2]) * px_per_view
                sigma[i0:i1] = s_px.numpy()
                radius[i0:i1] = (torch.exp(pred[:, 3]) * min(h, w)).numpy()
                if refine:
                    r = refine_origin(_refinement_input(x, y if denoise else None), o.to(dev), search=2.0).cpu()
                    # keep the refinement only where it agrees with the network's estimate
                    ok = torch.linalg.norm(r - o, dim=1) <= torch.clamp(3 * s_px, min=1.5)
                    o = torch.where(ok[:, None], r, o)
                origin[i0:i1] = o.numpy()
            if ellipse:
                o_e = torch.from_numpy(origin[i0:i1]).float()
                e = models["ellipse"](polar_view(x, o_e.to(dev), polar_rmax((h, w)))).float().cpu()
                e12[i0:i1] = e.numpy() * E12_SCALE

    if inplace:
        result = datacube
        result.data = out_data
    else:
        result = py4DSTEM.DataCube(data=out_data, name=datacube.name, calibration=datacube.calibration.copy())
    md = Metadata(name="prenet")
    md["version"] = __version__
    md["stages"] = ",".join(names) if names else "none"
    md["model_sha256"] = ",".join(model_card(nm, weights_dir)["sha256"][:12] for nm in names) or "none"
    md["refine"] = bool(refine)
    md["fit_descan"] = bool(fit_descan)
    if center:
        qx0 = origin[:, 0].reshape(nrx, nry)
        qy0 = origin[:, 1].reshape(nrx, nry)
        md["origin_measured"] = origin.reshape(nrx, nry, 2)
        md["origin_network"] = origin_net.reshape(nrx, nry, 2)
        md["origin_sigma"] = sigma.reshape(nrx, nry)
        if fit_descan and n >= 3:
            from .baselines import fit_origin

            qx0, qy0 = fit_origin(qx0, qy0, "parabola" if min(nrx, nry) >= 3 else "plane")
        result.calibration.set_origin((qx0, qy0))
    if ellipse:
        net_ratio, net_theta = e12_to_ellipse(np.median(e12, axis=0))
        md["e12_per_pattern"] = e12.reshape(nrx, nry, 2)
        md["ellipse_network"] = np.array([float(net_ratio), 1.0, float(net_theta)])
        ratio, theta = float(net_ratio), float(net_theta)
        md["ellipse_method"] = "network (median over scan)"
        if refine:
            r_bf = float(np.nanmedian(radius)) if center else None
            # the recorded patterns (hot pixels removed): averaging over the scan beats the noise,
            # and no denoiser smoothing touches the edges
            est = _ellipse_from_aligned_mean(data, origin, r_bf, batch_size, dev)
            if est is not None:
                ratio, theta, quality, band = est
                md["ellipse_refined_quality"] = quality
                md["ellipse_refined_band"] = band
                md["ellipse_method"] = "refined (log-polar stretch fit)"
        result.calibration.set_ellipse((float(ratio), 1.0, float(theta)))
    result.metadata = md
    return result
