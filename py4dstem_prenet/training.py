"""Training of the three 4D-PreNet models on the simulator, reproducible from a seed.

``train_all`` generates one training set and one held-out set of random patterns
(:func:`~py4dstem_prenet.simulation.simulate_patterns`, seeds disjoint from the
benchmark's), trains the denoiser, the centre network and the ellipse network, measures
them on the held-out set and writes ``<name>.pt`` (a plain state dict) and
``<name>.json`` (model card) for each into a folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .conventions import ellipse_to_e12
from .models import CBAMUNet, ResNetHeatmap, ResNetRegressor
from .simulation import simulate_patterns
from .simulation.crystals import STRUCTURES, ZONE_AXES
from .views import ELLIPSE_CHANNELS, detector_to_view, ellipse_view, full_view, polar_rmax, view_to_detector

__all__ = ["TrainConfig", "train_all", "build_model", "file_sha256", "E12_SCALE", "CENTRE_OUTPUTS"]

#: (e1, e2) are regressed in units of this ellipticity.
E12_SCALE = 0.02
#: Centre network outputs: (qx, qy) in view pixels, log sigma (view px), log(radius / min(shape)).
CENTRE_OUTPUTS = 4


@dataclass
class TrainConfig:
    """Training recipe (every number that defines the shipped weights).

    Attributes
    ----------
    seed : int
        Seed of data generation and initialisation.
    n_train, n_val : int
        Random training and held-out patterns.
    detector_shape : tuple of int
        Size of the simulated patterns.
    denoise_steps, centre_steps, ellipse_steps : int
        Optimiser steps of each model.
    batch : int
        Batch size of the calibrators.
    denoise_batch, crop : int
        Batch size and crop side of the denoiser.
    lr : float
        Peak learning rate (Adam, cosine decay).
    base : int
        Base channels of the U-Net.
    bank_structures, val_bank_structures : tuple of str
        abTEM multislice banks mixed into the training and held-out sets (disjoint
        structures); used when abtem is installed.
    bank_fraction : float
        Fraction of patterns drawn from the banks.
    bright_fraction : float
        Fraction of crystal patterns with Bragg disks brighter than the bright-field disk.
    wide_fraction : float
        Fraction of patterns with the wide geometry of
        :func:`~py4dstem_prenet.simulation.simulate_patterns` (disk radius 1.5-30% of the
        detector, origin up to 30% off centre). The shipped weights use none: a run with
        0.3 (and 6000 centre steps, 41 min) put the network closer on large and far
        off-centre disks but made it less sure (larger sigma) on bright Bragg disks
        with hot pixels, where the wider search near it then found lattice points.
    """

    seed: int = 1
    n_train: int = 16000
    n_val: int = 800
    detector_shape: tuple = (128, 128)
    denoise_steps: int = 2500
    centre_steps: int = 4000
    ellipse_steps: int = 3000
    batch: int = 32
    denoise_batch: int = 16
    crop: int = 64
    lr: float = 2e-3
    base: int = 16
    bank_structures: tuple = ("Si", "Cu", "GaAs", "Fe")
    val_bank_structures: tuple = ("Au", "MgO")
    bank_fraction: float = 0.15
    bright_fraction: float = 0.3
    wide_fraction: float = 0.0

    @classmethod
    def tiny(cls) -> "TrainConfig":
        """Seconds-long configuration for tests."""
        return cls(n_train=64, n_val=16, detector_shape=(64, 64), denoise_steps=3, centre_steps=3, ellipse_steps=3,
                   batch=8, denoise_batch=4, crop=32, base=8, bank_fraction=0.0)


def build_model(name: str, base: int = 16) -> torch.nn.Module:
    """Construct an untrained model: 'denoiser', 'centre' or 'ellipse'."""
    if name == "denoiser":
        return CBAMUNet(base=base, levels=3)
    if name == "centre":
        return ResNetHeatmap(extra=1)
    if name == "ellipse":
        return ResNetRegressor(2, channels=ELLIPSE_CHANNELS)
    raise ValueError(f"unknown model {name!r}; choose 'denoiser', 'centre' or 'ellipse'")


def _schedule(opt: torch.optim.Optimizer, steps: int, lr: float):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)


def _centre_targets(origin: torch.Tensor, radius: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.cat([detector_to_view(origin, shape), torch.log(radius / min(shape))[:, None]], dim=1)


def centre_nll(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood of the origin (view px) plus an L1 term on log radius.

    ``pred`` is (qx, qy, log sigma, log radius); ``target`` is (qx, qy, log radius).
    """
    d2 = ((pred[:, :2] - target[:, :2]) ** 2).sum(dim=1)
    log_s = pred[:, 2].clamp(-8, 4)
    return (0.5 * d2 * torch.exp(-2 * log_s) + 2 * log_s).mean() + 0.1 * d2.mean() + \
        (pred[:, 3] - target[:, 2]).abs().mean()


def _train_denoiser(data, cfg, gen, log) -> torch.nn.Module:
    model = build_model("denoiser", cfg.base)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = _schedule(opt, cfg.denoise_steps, cfg.lr)
    noisy, clean = data["noisy"], data["clean"]
    n, h, w = noisy.shape
    c = min(cfg.crop, h, w)
    for step in range(cfg.denoise_steps):
        idx = torch.randint(0, n, (cfg.denoise_batch,), generator=gen)
        i0 = torch.randint(0, h - c + 1, (1,), generator=gen).item()
        j0 = torch.randint(0, w - c + 1, (1,), generator=gen).item()
        x = torch.from_numpy(noisy[idx.numpy(), i0:i0 + c, j0:j0 + c])[:, None]
        y = torch.from_numpy(clean[idx.numpy(), i0:i0 + c, j0:j0 + c])[:, None]
        s = x.clamp_min(0).mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        loss = F.mse_loss(model(x) / s, y / s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"denoiser step {step}/{cfg.denoise_steps} loss {loss.item():.4f}")
    return model


def _train_regressor(name, data, cfg, gen, log) -> torch.nn.Module:
    model = build_model(name)
    steps = cfg.centre_steps if name == "centre" else cfg.ellipse_steps
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = _schedule(opt, steps, cfg.lr)
    shape = tuple(data["noisy"].shape[1:])
    n = len(data["noisy"])
    for step in range(steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=gen).numpy()
        x = torch.from_numpy(data["noisy"][idx])[:, None]
        origin = torch.from_numpy(data["origin"][idx]).float()
        if name == "centre":
            target = _centre_targets(origin, torch.from_numpy(data["disk_radius"][idx]).float(), shape)
            loss = centre_nll(model(full_view(x)), target)
        else:
            # train on origins perturbed like an imperfect centre estimate (0.1 px)
            jitter = 0.1 * torch.randn(origin.shape, generator=gen)
            target = torch.from_numpy(ellipse_to_e12(data["ratio"][idx], data["theta"][idx])).float() / E12_SCALE
            loss = F.mse_loss(model(ellipse_view(x, origin + jitter, polar_rmax(shape))), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f}")
    return model


@torch.no_grad()
def _validate(models: dict, val: dict) -> dict:
    shape = tuple(val["noisy"].shape[1:])
    x = torch.from_numpy(val["noisy"])[:, None]
    metrics = {}
    den = models["denoiser"].eval()
    out = torch.cat([den(x[i:i + 32]) for i in range(0, len(x), 32)])[:, 0].numpy()
    mse_d = np.mean((out - val["clean"]) ** 2, axis=(1, 2))
    mse_n = np.mean((val["noisy"] - val["clean"]) ** 2, axis=(1, 2))
    metrics["denoiser_median_mse_ratio"] = float(np.median(mse_d / np.maximum(mse_n, 1e-12)))
    cen = models["centre"].eval()
    pred = torch.cat([cen(full_view(x[i:i + 64])) for i in range(0, len(x), 64)])
    origin = view_to_detector(pred[:, :2], shape).numpy()
    err = np.hypot(*(origin - val["origin"]).T)
    metrics["centre_net_median_px"] = float(np.median(err))
    metrics["centre_net_fraction_over_1px"] = float(np.mean(err > 1))
    ell = models["ellipse"].eval()
    o = torch.from_numpy(val["origin"]).float()
    e = torch.cat([ell(ellipse_view(x[i:i + 64], o[i:i + 64], polar_rmax(shape))) for i in range(0, len(x), 64)]).numpy()
    true = ellipse_to_e12(val["ratio"], val["theta"])
    metrics["ellipse_net_rms_e12_per_pattern"] = float(np.sqrt(np.mean((e * E12_SCALE - true) ** 2)))
    high = val["dose"] >= 1e4
    metrics["ellipse_net_rms_e12_per_pattern_1e4_up"] = float(np.sqrt(np.mean((e[high] * E12_SCALE - true[high]) ** 2)))
    # what predicting no distortion scores: the network must do better to have learned
    metrics["ellipse_zero_prediction_rms_e12"] = float(np.sqrt(np.mean(true ** 2)))
    return metrics


def _banks(cfg: TrainConfig, log) -> tuple[list | None, list | None]:
    """abTEM banks for training and validation (None without abtem or with fraction 0)."""
    if cfg.bank_fraction <= 0:
        return None, None
    import importlib.util

    if importlib.util.find_spec("abtem") is None:
        log("abtem not installed: training on the analytic stream only")
        return None, None
    from .simulation.multislice import multislice_bank

    def build(names):
        banks = []
        for i, name in enumerate(names):
            log(f"abTEM bank: {name}")
            banks.append(multislice_bank(name, thickness=300.0, exit_every=50.0, scan_gpts=3, cells=6,
                                         semiangle=2.5 + i % 3))
        return banks

    return build(cfg.bank_structures), build(cfg.val_bank_structures)


def file_sha256(path: str) -> str:
    """SHA-256 hex digest of a file (the model cards record it for every weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def _data_recipe(cfg: TrainConfig, with_bank: bool) -> str:
    """Human-readable description of the training data, from the recipe itself."""
    bank = (f"{cfg.bank_fraction:.0%} abTEM multislice [001] patterns ({', '.join(cfg.bank_structures)}; 50-300 A)"
            if with_bank else "no abTEM patterns (abtem not installed)")
    return ("py4dstem_prenet.simulation.simulate_patterns: crystal (py4DSTEM kinematic spot lists of "
            f"{len(STRUCTURES)} structures x {len(ZONE_AXES)} zone axes, random 2D lattices), amorphous, "
            f"polycrystalline, vacuum and mixed patterns; {cfg.bright_fraction:.0%} of crystal patterns with Bragg "
            f"disks 1-3x brighter than the bright-field disk; {bank}; dose log-uniform 1e2-1e6 e-/pattern; counting "
            "and integrating detectors with hot/dead pixels; 10% beam stops; a/b - 1 up to 0.06; bright-field disk "
            "radius 3-10% of the detector and origin within 15% of its centre"
            + (f", except {cfg.wide_fraction:.0%} of the patterns with radius 1.5-30% (log-uniform) and origin "
               "within 30%" if cfg.wide_fraction > 0 else ""))


def train_all(out_dir: str, config: TrainConfig | None = None, log=print) -> dict:
    """Train the denoiser, the centre and the ellipse networks and write weights and cards.

    Parameters
    ----------
    out_dir : str
        Folder receiving ``denoiser.pt``, ``centre.pt``, ``ellipse.pt`` and their
        ``.json`` model cards.
    config : TrainConfig, optional
        Recipe; the shipped weights' recipe when None.
    log : callable
        Progress messages.

    Returns
    -------
    dict
        Held-out metrics.
    """
    import os

    cfg = config or TrainConfig()
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    shape = tuple(cfg.detector_shape)
    bank, val_bank = _banks(cfg, log)
    log(f"simulating {cfg.n_train} training and {cfg.n_val} held-out patterns")
    data = simulate_patterns(cfg.n_train, shape, np.random.default_rng(cfg.seed), bank=bank,
                             bank_fraction=cfg.bank_fraction if bank else 0.0, bright_fraction=cfg.bright_fraction,
                             wide_fraction=cfg.wide_fraction)
    val = simulate_patterns(cfg.n_val, shape, np.random.default_rng(cfg.seed + 7_000_000), bank=val_bank,
                            bank_fraction=cfg.bank_fraction if val_bank else 0.0, wide_fraction=cfg.wide_fraction)
    t_data = time.perf_counter() - t0
    models = {}
    models["denoiser"] = _train_denoiser(data, cfg, gen, log)
    models["centre"] = _train_regressor("centre", data, cfg, gen, log)
    models["ellipse"] = _train_regressor("ellipse", data, cfg, gen, log)
    metrics = _validate(models, val)
    log(f"held-out metrics: {metrics}")
    for name, model in models.items():
        path = os.path.join(out_dir, f"{name}.pt")
        torch.save(model.state_dict(), path)
        card = {
            "name": name,
            "package_version": __version__,
            "architecture": type(model).__name__,
            "base": cfg.base if name == "denoiser" else None,
            "train_config": asdict(cfg),
            "data_recipe": _data_recipe(cfg, bank is not None),
            "held_out_metrics": metrics,
            "seconds": {"data": t_data, "total": time.perf_counter() - t0},
            "torch": torch.__version__,
            "sha256": file_sha256(path),
        }
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(card, f, indent=2)
    return metrics
