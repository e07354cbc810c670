"""Scale benchmark: larger-than-memory files, dask.distributed, live streaming.

``prenet benchmark-scale --out BENCHMARKS.md`` measures, on this machine:

- out of core: a file of ``size_gb`` (a simulated scan tiled to size, float32) is
  processed from disk to disk by ``preprocess(open_datacube(IN, mem="MEMMAP"),
  out=OUT)`` in a fresh process, whose peak resident memory (``ru_maxrss``) and
  time are recorded;
- scale-out: the same scan in memory through one process and through a dask
  ``LocalCluster``, with the largest difference of their results;
- live mode: :func:`~py4dstem_prenet.streaming.stream` on frames delivered one by
  one, latency (median and 95th percentile) and frames per second for several
  block sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["ScaleConfig", "run_scale_benchmark", "write_tiled_emd"]


@dataclass
class ScaleConfig:
    """What the scale benchmark runs.

    Attributes
    ----------
    size_gb : float
        Size of the out-of-core input file, GB (1e9 bytes), float32.
    detector : int
        Square detector size, pixels.
    denoise_out_of_core : bool
        Run the denoiser in the out-of-core job (else calibration only).
    scan_dask : tuple of int
        Scan of the in-memory dask comparison.
    workers : int
        Dask worker processes.
    stream_frames : int
        Frames streamed per block size.
    stream_batches : tuple of int
        Block sizes of the live-mode runs.
    """

    size_gb: float = 4.0
    detector: int = 128
    denoise_out_of_core: bool = False
    scan_dask: tuple[int, int] = (16, 16)
    workers: int = 2
    stream_frames: int = 256
    stream_batches: tuple[int, ...] = (1, 8, 32)

    @classmethod
    def quick(cls) -> "ScaleConfig":
        """Seconds-long configuration for tests."""
        return cls(size_gb=0.005, detector=32, scan_dask=(3, 3), workers=1, stream_frames=12, stream_batches=(4,))


def write_tiled_emd(path: str, size_gb: float, detector: int, seed: int = 0) -> tuple[int, int]:
    """Write a float32 EMD DataCube of about ``size_gb`` by tiling a simulated 16x16 scan.

    Written block by block (memory stays small). Returns the scan shape.
    """
    import py4DSTEM

    from ..simulation import simulate_datacube
    from ..storage import EMDWriter

    tile, _ = simulate_datacube((16, 16), (detector, detector), "crystal", 1e4, (1.02, 0.6), seed=seed)
    frames = tile.data.reshape(256, detector, detector).astype(np.float32)
    n_side = max(1, int(round(np.sqrt(size_gb * 1e9 / (4 * detector * detector)))))
    n = n_side * n_side
    bounds = [(i0, min(n, i0 + 256)) for i0 in range(0, n, 256)]
    w = EMDWriter(path, (n_side, n_side, detector, detector), len(bounds), {"tiled": path}, overwrite=True)
    for k, (i0, i1) in enumerate(bounds):
        w.write(k, i0, i1, {"data": frames[np.arange(i0, i1) % 256]})
    w.finish(py4DSTEM.DataCube(data=np.zeros((2, 2, detector, detector), np.float32), name="datacube"))
    return n_side, n_side


_CHILD = """
import json, resource, sys, time
import py4dstem_prenet as prenet
from py4dstem_prenet.storage import open_datacube
src, dst, denoise = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t0 = time.perf_counter()
dc = open_datacube(src, mem="MEMMAP")
out = prenet.preprocess(dc, denoise=denoise, out=dst, progress=False, batch_size=64)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                  "patterns": int(dc.data.shape[0] * dc.data.shape[1])}))
"""


def _out_of_core(cfg: ScaleConfig, log) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("PRENET_SCRATCH")) as d:
        src, dst = os.path.join(d, "in.h5"), os.path.join(d, "out.h5")
        log(f"writing a {cfg.size_gb:g} GB input file")
        scan = write_tiled_emd(src, cfg.size_gb, cfg.detector)
        size = os.path.getsize(src) / 1e9
        log(f"preprocessing {scan[0]}x{scan[1]} patterns from disk to disk in a fresh process")
        run = subprocess.run([sys.executable, "-c", _CHILD, src, dst, "1" if cfg.denoise_out_of_core else "0"],
                             capture_output=True, text=True, check=True)
        res = json.loads(run.stdout.strip().splitlines()[-1])
        res.update(file_gb=size, output_gb=os.path.getsize(dst) / 1e9, scan=list(scan), detector=cfg.detector,
                   denoise=cfg.denoise_out_of_core)
        return res


def _dask(cfg: ScaleConfig, log) -> dict:
    from dask.distributed import Client, LocalCluster

    from ..preprocess import preprocess
    from ..simulation import simulate_datacube

    dc, _ = simulate_datacube(cfg.scan_dask, (cfg.detector, cfg.detector), "crystal", 1e4, (1.02, 0.6), seed=1)
    n = dc.data.shape[0] * dc.data.shape[1]
    log("single process vs dask LocalCluster")
    t0 = time.perf_counter()
    ref = preprocess(dc, progress=False)
    t_one = time.perf_counter() - t0
    with LocalCluster(n_workers=cfg.workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        preprocess(dc, progress=False, client=client, batch_size=16)  # warm-up: workers load the models
        t0 = time.perf_counter()
        out = preprocess(dc, progress=False, client=client)
        t_dask = time.perf_counter() - t0
    return {"patterns": n, "one_process_per_s": n / t_one, "dask_per_s": n / t_dask, "workers": cfg.workers,
            "max_data_diff": float(np.max(np.abs(out.data - ref.data))),
            "max_origin_diff_px": float(np.max(np.abs(np.stack(out.calibration.get_origin())
                                                      - np.stack(ref.calibration.get_origin()))))}


def _streaming(cfg: ScaleConfig, log) -> list[dict]:
    from ..simulation import simulate_datacube
    from ..streaming import stream

    side = int(np.ceil(np.sqrt(cfg.stream_frames)))
    dc, truth = simulate_datacube((side, side), (cfg.detector, cfg.detector), "crystal", 1e4, (1.02, 0.6), seed=2)
    frames = dc.data.reshape(-1, cfg.detector, cfg.detector)[:cfg.stream_frames]
    rows = []
    for denoise in (True, False):
        for bs in cfg.stream_batches:
            log(f"streaming, block size {bs}, denoise {denoise}")
            lat, fps = [], 0.0
            for u in stream(iter(frames), scan_shape=(side, side), batch_size=bs, denoise=denoise):
                lat.append(u.latency_s)
                fps = u.frames_per_s
            rows.append({"batch": bs, "denoise": denoise, "latency_median_s": float(np.median(lat)),
                         "latency_p95_s": float(np.percentile(lat, 95)), "frames_per_s": fps})
    return rows


def run_scale_benchmark(cfg: ScaleConfig | None = None, log=lambda m: None) -> dict:
    """Run the three measurements; returns a dict with 'out_of_core', 'dask', 'streaming'."""
    cfg = cfg or ScaleConfig()
    return {"out_of_core": _out_of_core(cfg, log), "dask": _dask(cfg, log), "streaming": _streaming(cfg, log)}


def scale_markdown(res: dict) -> str:
    """The results as markdown tables."""
    o, d = res["out_of_core"], res["dask"]
    lines = [
        "### Larger than memory",
        "",
        f"`preprocess(open_datacube(IN, mem='MEMMAP'), out=OUT)` in a fresh process, "
        f"{'with' if o['denoise'] else 'without'} denoising, batch 64:",
        "",
        "| input file | scan x detector | output file | peak RSS | time | patterns/s |",
        "|---|---|---|---|---|---|",
        f"| {o['file_gb']:.2f} GB float32 | {o['scan'][0]}x{o['scan'][1]} x {o['detector']}x{o['detector']} | "
        f"{o['output_gb']:.2f} GB | {o['peak_rss_gb']:.2f} GB | {o['seconds']:.0f} s | "
        f"{o['patterns'] / o['seconds']:.0f} |",
        "",
        "### dask.distributed",
        "",
        f"The same in-memory scan ({d['patterns']} patterns) in one process and on a LocalCluster of "
        f"{d['workers']} worker processes (one thread each) on this machine:",
        "",
        "| run | patterns/s | largest difference from one process |",
        "|---|---|---|",
        f"| one process | {d['one_process_per_s']:.1f} | - |",
        f"| dask, {d['workers']} workers | {d['dask_per_s']:.1f} | data {d['max_data_diff']:.1e} counts, "
        f"origin {d['max_origin_diff_px']:.1e} px |",
        "",
        "### Live streaming",
        "",
        "Frames handed over one at a time; latency from a block's first frame to its results.",
        "",
        "| block size | denoise | latency median | latency p95 | frames/s |",
        "|---|---|---|---|---|",
    ]
    for r in res["streaming"]:
        lines.append(f"| {r['batch']} | {'yes' if r['denoise'] else 'no'} | {1e3 * r['latency_median_s']:.0f} ms | "
                     f"{1e3 * r['latency_p95_s']:.0f} ms | {r['frames_per_s']:.1f} |")
    return "\n".join(lines) + "\n"
