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
from .refine import refine_origin
from .training import E12_SCALE
from .views import centred_view, full_view

__all__ = ["preprocess", "PreprocessResult"]


class PreprocessResult(dict):
    """What ``preprocess`` measured (also stored in ``datacube.metadata['prenet']``)."""


def _clean_batch(block: np.ndarray) -> torch.Tensor:
    x = np.asarray(block, dtype=np.float32)
    x = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    return torch.from_numpy(np.clip(x, 0, None))[:, None]


def _median3(x: torch.Tensor) -> torch.Tensor:
    """Replace pixels far above their 3x3 median (hot pixels) by that median."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    med = p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*x.shape, 9).median(dim=-1).values
    return torch.where(x > 4 * med + 10, med, x)


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
        Refine the network's origin by the Friedel symmetry of disk edges.
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
        If its data is not 4D or the detector is smaller than 16 x 16 pixels.
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
    flat = data.reshape(n, h, w) if isinstance(data, np.ndarray) else None
    out_data = np.empty((nrx, nry, h, w), np.float32)
    origin_net = np.full((n, 2), np.nan)
    origin = np.full((n, 2), np.nan)
    sigma = np.full(n, np.nan)
    e12 = np.full((n, 2), np.nan)
    half = torch.tensor([h / 2, w / 2])
    centre_px = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    with torch.inference_mode():
        for i0 in tqdm(range(0, n, batch_size), disable=not progress, desc="PreNet", unit="batch"):
            i1 = min(n, i0 + batch_size)
            block = flat[i0:i1] if flat is not None else np.stack(
                [np.asarray(data[i // nry, i % nry]) for i in range(i0, i1)])
            x = _clean_batch(block).to(dev)
            if denoise:
                x = models["denoiser"](x)
                dn = x
            else:
                dn = _median3(x)
            out_data.reshape(n, h, w)[i0:i1] = x[:, 0].float().cpu().numpy()
            if center:
                pred = models["centre"](full_view(dn)).float().cpu()
                o = pred[:, :2] * half + centre_px
                origin_net[i0:i1] = o.numpy()
                sigma[i0:i1] = (torch.exp(pred[:, 3]) * half.min()).numpy()
                if refine:
                    r = refine_origin(dn.float(), o.to(dev)).cpu()
                    # keep the refinement only where it agrees with the network's estimate
                    ok = torch.linalg.norm(r - o, dim=1) <= torch.clamp(3 * torch.exp(pred[:, 3]) * half.min(), min=1.5)
                    o = torch.where(ok[:, None], r, o)
                origin[i0:i1] = o.numpy()
            if ellipse:
                o_e = torch.from_numpy(origin[i0:i1]).float() if center else centre_px.expand(i1 - i0, 2)
                e = models["ellipse"](centred_view(dn.float(), o_e.to(dev), float(min(h, w)))).float().cpu()
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
        med = np.median(e12, axis=0)
        ratio, theta = e12_to_ellipse(med)
        md["e12_per_pattern"] = e12.reshape(nrx, nry, 2)
        result.calibration.set_ellipse((float(ratio), 1.0, float(theta)))
    result.metadata = md
    return result
