"""Throughput benchmark: patterns per second and peak memory of ``preprocess`` on a device.

``prenet benchmark-throughput --device cuda --out BENCHMARKS.md`` times, in one
process and on one scan:

- py4DSTEM ``get_origin`` (default radius; CPU), the classical baseline;
- ``prenet.preprocess`` without denoising (the calibration: centre network, Friedel
  edge refinement, ellipse) and with denoising, at several batch sizes, on the CPU
  and on the requested device.

Every device run is compared with the CPU run of the same stages: the largest origin
difference (px) and the relative difference of the ellipse's a/b tell whether the
device gives the CPU's results. The scan is a simulated crystal (32x32 positions,
128x128 px, 1e4 electrons per pattern) unless a recording is given with ``data``.
Timings exclude the first call's one-off costs (weights loading, CUDA context and
kernel selection), which a warm-up on a few patterns pays.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import numpy as np
import torch

from .. import __version__
from .timing import format_mb, timed_call

__all__ = ["ThroughputConfig", "run_throughput_benchmark", "throughput_datacube", "throughput_markdown"]


@dataclass
class ThroughputConfig:
    """What the throughput benchmark runs.

    Attributes
    ----------
    device : str
        Torch device of the PreNet runs besides the CPU ('cuda', 'cuda:1', 'cpu', ...).
    scan : tuple of int
        Simulated scan positions (R_Nx, R_Ny).
    detector : int
        Square detector size of the simulated scan, pixels.
    dose : float
        Electrons per simulated pattern.
    batch_sizes : tuple of int
        Patterns per block of the PreNet runs.
    seed : int
        Seed of the simulated scan.
    """

    device: str = "cpu"
    scan: tuple[int, int] = (32, 32)
    detector: int = 128
    dose: float = 1e4
    batch_sizes: tuple[int, ...] = (64, 256)
    seed: int = 3

    @classmethod
    def quick(cls, device: str = "cpu") -> "ThroughputConfig":
        """Seconds-long configuration for tests."""
        return cls(device=device, scan=(3, 4), detector=32, batch_sizes=(8,))


def throughput_datacube(cfg: ThroughputConfig):
    """The simulated crystal scan of the benchmark (descan, ellipse a/b 1.02, hot pixels).

    Returns
    -------
    py4DSTEM.DataCube
        Recorded counts, float32, shape ``cfg.scan + (cfg.detector, cfg.detector)``.
    """
    from ..simulation import simulate_datacube

    dc, _ = simulate_datacube(cfg.scan, (cfg.detector, cfg.detector), "crystal", cfg.dose, (1.02, 0.6),
                              seed=cfg.seed)
    return dc


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def _time_call(fn, device: torch.device) -> tuple[object, float, float, float]:
    """Run ``fn``; its result, seconds, the peak host memory (MB, see
    :func:`~py4dstem_prenet.evaluation.timing.timed_call`) and peak GPU memory (MB, NaN on the CPU)."""
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def call():
        out = fn()
        if gpu:
            torch.cuda.synchronize(device)
        return out

    out, dt, host = timed_call(call)
    return out, dt, host, torch.cuda.max_memory_allocated(device) / 2**20 if gpu else float("nan")


def run_throughput_benchmark(datacube, cfg: ThroughputConfig, log=lambda m: None) -> dict:
    """Time get_origin and preprocess on ``datacube``, on the CPU and on ``cfg.device``.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube
        The scan (never changed).
    cfg : ThroughputConfig
        Device and batch sizes.
    log : callable
        Receives progress messages.

    Returns
    -------
    dict
        'rows': one dict per run (method, device, batch, patterns_per_s, host_mb (rise of the
        peak resident memory, see :func:`~py4dstem_prenet.evaluation.timing.timed_call`),
        gpu_mb (peak GPU memory of torch, NaN on the CPU), origin_diff_px and ratio_diff
        against the CPU run of the same stages, NaN for the CPU runs themselves);
        'patterns', 'detector', 'devices' (names), 'version'.

    Raises
    ------
    ValueError
        If the device is unknown or unavailable, or a batch size is below 1.
    """
    import py4DSTEM

    from ..baselines import get_origin
    from ..preprocess import preprocess

    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {cfg.batch_sizes}")
    try:
        target = torch.device(cfg.device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {cfg.device!r}: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    devices = [torch.device("cpu")] + ([target] if target.type != "cpu" else [])
    data = datacube.data
    n = int(np.prod(data.shape[:2]))
    warm = py4DSTEM.DataCube(data=np.array(data[:1, :min(4, data.shape[1])]))

    rows = []
    log(f"py4DSTEM get_origin on {n} patterns")
    _, dt, host, gpu = _time_call(lambda: get_origin(datacube), torch.device("cpu"))
    rows.append({"method": "py4DSTEM get_origin (default r)", "device": "cpu", "batch": None,
                 "patterns_per_s": n / dt, "host_mb": host, "gpu_mb": gpu, "origin_diff_px": np.nan,
                 "ratio_diff": np.nan})
    reference: dict[bool, tuple[np.ndarray, float]] = {}
    for dev in devices:
        for denoise in (False, True):
            name = "PreNet preprocess, denoising" if denoise else "PreNet preprocess, calibration only"
            preprocess(warm, denoise=denoise, device=str(dev), progress=False)
            for bs in cfg.batch_sizes:
                log(f"{name}, {dev}, batch {bs}")
                out, dt, host, gpu = _time_call(lambda: preprocess(datacube, denoise=denoise, batch_size=bs,
                                                              device=str(dev), progress=False), dev)
                origin = np.stack(out.calibration.get_origin(), axis=-1)
                a, b, _ = out.calibration.get_ellipse()
                row = {"method": name, "device": dev.type, "batch": bs, "patterns_per_s": n / dt, "host_mb": host,
                       "gpu_mb": gpu, "origin_diff_px": np.nan, "ratio_diff": np.nan}
                if denoise in reference:
                    ref_origin, ref_ratio = reference[denoise]
                    row["origin_diff_px"] = float(np.max(np.abs(origin - ref_origin)))
                    row["ratio_diff"] = float(abs(a / b - ref_ratio))
                else:
                    reference[denoise] = (origin, a / b)
                rows.append(row)
    return {"rows": rows, "patterns": n, "detector": tuple(int(s) for s in data.shape[2:]),
            "devices": [_device_name(d) for d in devices], "version": __version__,
            "cpu_count": os.cpu_count()}


def throughput_markdown(res: dict) -> str:
    """The results as a markdown table with a line on the machine."""
    lines = [
        f"{res['patterns']} patterns of {res['detector'][0]}x{res['detector'][1]} px; py4dstem-prenet "
        f"{res['version']}, torch {torch.__version__}; {res['cpu_count']} CPU cores; devices: "
        + "; ".join(res["devices"]) + ". Patterns/s untraced; peak memory: the rise of the process's "
        "peak resident memory over the call (host: numpy and torch alike) and the GPU memory torch "
        "allocated. Difference: largest origin difference (px) and a/b difference of the ellipse "
        "from the CPU run of the same stages.",
        "",
        "| method | device | batch | patterns/s | peak host MB | peak GPU MB | difference from CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        diff = "-" if np.isnan(r["origin_diff_px"]) else (
            f"origin {r['origin_diff_px']:.1e} px, a/b {r['ratio_diff']:.1e}")
        lines.append(f"| {r['method']} | {r['device']} | {r['batch'] or '-'} | {r['patterns_per_s']:.1f} | "
                     f"{format_mb(r['host_mb'])} | {format_mb(r['gpu_mb'])} | {diff} |")
    return "\n".join(lines) + "\n"
