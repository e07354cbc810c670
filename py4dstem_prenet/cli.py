"""The ``prenet`` command line.

Commands
--------
prenet demo          simulate the built-in crystal scan and calibrate it, print a table
prenet simulate OUT  write a simulated DataCube (EMD/HDF5) and its ground truth (.npz)
prenet benchmark     run the benchmark, write BENCHMARKS.md tables and plots
prenet train DIR     retrain the three networks from a seed
prenet preprocess IN OUT   denoise and calibrate a file, write EMD
prenet info          versions of the package and its dependencies

Exit codes: 0 success, 2 bad arguments or input, 1 any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from . import __version__

__all__ = ["main", "build_parser"]


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and np.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 128x128, got {text!r}") from None
    if len(shape) != 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must be two positive sizes like 128x128, got {text!r}")
    return shape


def _save_complete(path: str, datacube) -> None:
    """Write an EMD file under a temporary name and rename it only once complete."""
    import py4DSTEM

    tmp = path + ".partial"
    if os.path.exists(tmp):
        os.remove(tmp)
    py4DSTEM.save(tmp, datacube, mode="o")
    os.replace(tmp, path)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .conventions import angle_difference
    from .evaluation import centre_errors
    from .evaluation.benchmark import bright_disk_scene, classical_methods
    from .preprocess import preprocess
    from .simulation import Detector, simulate_datacube

    rng = np.random.default_rng(args.seed)
    scene = bright_disk_scene(rng, args.detector)
    dc, truth = simulate_datacube(args.scan, args.detector, "crystal", args.dose, (1.02, 0.6),
                                  detector=Detector(hot_fraction=2e-4, hot_level=10.0), scene=scene, seed=args.seed)
    print(f"Simulated crystal scan: scan {args.scan}, detector {args.detector}, {args.dose:.0e} e-/pattern, "
          f"bright Bragg disks, hot pixels, descan drift, a/b = {truth.ratio}")
    results = {}

    def prenet_run(dc, ctx):
        results["out"] = preprocess(dc, progress=False)
        return results["out"].calibration.get_origin()

    # the benchmark's classical origin methods, so that the demo and BENCHMARKS.md agree
    methods = {"PreNet (denoise, centre net + refinement, ellipse)": prenet_run, **classical_methods()["origin"]}
    ctx = {"disk_radius": truth.disk_radius}
    print("\nOrigin error = distance to the true centre of the bright-field disk, in detector pixels.")
    print("\n| origin method | mean error px | median error px | patterns off by > 1 px | patterns/s |")
    print("|---|---|---|---|---|")
    n = truth.origin[..., 0].size
    for name, fn in methods.items():
        t0 = time.perf_counter()
        qx0, qy0 = fn(dc, ctx)
        dt = time.perf_counter() - t0
        e = centre_errors(np.stack([qx0, qy0], -1), truth.origin)
        print(f"| {name} | {e['mean']:.3f} | {e['median']:.3f} | {100 * e['fail']:.0f}% | {n / dt:.0f} |")
    a, b, theta = results["out"].calibration.get_ellipse()
    print(f"\nPreNet ellipse: a/b = {a / b:.4f} (true {truth.ratio}), theta = {np.degrees(theta):.2f} deg "
          f"(true {np.degrees(truth.theta):.2f}); error {np.degrees(angle_difference(theta, truth.theta)):.2f} deg")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulation import Detector, simulate_datacube

    if os.path.exists(args.out) and not args.overwrite:
        print(f"prenet: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    dc, truth = simulate_datacube(args.scan, args.detector, args.kind, args.dose, (args.ratio, np.radians(args.theta)),
                                  detector=Detector(hot_fraction=args.hot_fraction), beam_stop=args.beam_stop,
                                  seed=args.seed)
    _save_complete(args.out, dc)
    np.savez(args.out + ".truth.npz", origin=truth.origin, ellipse=np.array(truth.ellipse), clean=truth.clean,
             dose=truth.dose)
    print(f"wrote {args.out} and {args.out}.truth.npz")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .evaluation.benchmark import BenchmarkConfig, prenet_methods, run_benchmark
    from .pretrained import WEIGHTS_DIR

    cfg = BenchmarkConfig.quick() if args.quick else BenchmarkConfig()
    extra = prenet_methods() if os.path.exists(os.path.join(WEIGHTS_DIR, "centre.pt")) else None
    res = run_benchmark(cfg, extra, progress=lambda m: print(f"[benchmark] {m}", file=sys.stderr))
    table = res.to_markdown()
    print(table)
    if args.out:
        command = "prenet benchmark" + (" --quick" if args.quick else "") + f" --out {args.out}"
        with open(args.out, "w") as f:
            f.write("# Benchmarks\n\nRegenerate with:\n\n```\n" + command + "\n```\n\n" + _BENCHMARK_INTRO + table)
        plot = os.path.splitext(args.out)[0] + "_origin_denoise.png"
        res.plot(plot)
        print(f"wrote {args.out} and {plot}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train_all

    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    cfg.seed = args.seed
    metrics = train_all(args.out_dir, cfg, log=lambda m: print(f"[train] {m}", file=sys.stderr))
    print(metrics)
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    import py4DSTEM

    from .preprocess import preprocess

    if not os.path.exists(args.input):
        raise FileNotFoundError(f"no such file: {args.input}")
    if os.path.exists(args.output) and not args.overwrite:
        print(f"prenet: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    dc = py4DSTEM.read(args.input)
    if not isinstance(dc, py4DSTEM.DataCube):
        raise ValueError(f"{args.input} does not hold a DataCube at its root")
    out = preprocess(dc, denoise=not args.no_denoise, batch_size=args.batch_size, device=args.device)
    _save_complete(args.output, out)
    print(f"wrote {args.output}")
    return 0


_BENCHMARK_INTRO = """\
All methods run in the same process on the same held-out simulated scans (seeds disjoint
from training; the abTEM condition uses structures, Au and MgO, that the training banks
do not contain). Crystal scans have descan drift (3 px plane + curvature + jitter), an
elliptical distortion, and thickness-like intensity variation inside the disks (which
moves the centre of mass but not the disk edge); "bright Bragg disks" scans have a Bragg
disk 1.5x brighter per pixel than the bright-field disk. The origin label is the geometric
centre of the bright-field disk. py4DSTEM's classical methods are run with their
defaults and, where a radius is needed, with the true radius (the hand-tuning a user
does); their failures are results, not crashes. PreNet runs with the shipped weights
and no hand-set parameter.

"""


def _cmd_info(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    print(f"py4dstem-prenet {__version__}")
    for pkg in ("py4DSTEM", "torch", "numpy", "scipy", "h5py", "emdfile", "abtem"):
        try:
            print(f"  {pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg} not installed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``prenet``."""
    p = argparse.ArgumentParser(
        prog="prenet",
        description="Automatic preprocessing of 4D-STEM data for py4DSTEM: denoising, origin (descan) and "
                    "elliptical-distortion calibration, with a simulator and benchmarks.",
    )
    p.add_argument("--version", action="version", version=f"py4dstem-prenet {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate the built-in crystal scan, calibrate it and print a table")
    d.add_argument("--dose", type=_positive_float, default=1e4, help="electrons per pattern (default 1e4)")
    d.add_argument("--scan", type=_shape, default=(16, 16), help="scan shape, e.g. 16x16")
    d.add_argument("--detector", type=_shape, default=(128, 128), help="detector shape, e.g. 128x128")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("simulate", help="write a simulated DataCube (EMD) and its ground truth")
    s.add_argument("out", help="output .h5 file (EMD, opens with py4DSTEM.read)")
    s.add_argument("--kind", default="crystal", choices=["crystal", "amorphous", "polycrystalline", "vacuum", "mixed"])
    s.add_argument("--dose", type=_positive_float, default=1e4, help="electrons per pattern")
    s.add_argument("--scan", type=_shape, default=(16, 16))
    s.add_argument("--detector", type=_shape, default=(128, 128))
    s.add_argument("--ratio", type=_positive_float, default=1.02, help="ellipse a/b")
    s.add_argument("--theta", type=float, default=30.0, help="ellipse angle, degrees from the qx (row) axis")
    s.add_argument("--hot-fraction", type=float, default=0.0, help="fraction of hot pixels")
    s.add_argument("--beam-stop", action="store_true", help="add a beam stop over the bright-field disk")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.set_defaults(func=_cmd_simulate)

    b = sub.add_parser("benchmark", help="compare methods on held-out simulated data")
    b.add_argument("--quick", action="store_true", help="small configuration (seconds)")
    b.add_argument("--out", default=None, help="write the tables to this markdown file, plots next to it")
    b.set_defaults(func=_cmd_benchmark)

    t = sub.add_parser("train", help="retrain the denoiser, centre and ellipse networks from a seed")
    t.add_argument("out_dir", help="folder for <model>.pt and <model>.json")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("preprocess", help="denoise and calibrate a 4D-STEM file, write EMD with the calibration")
    r.add_argument("input", help="a file py4DSTEM.read opens (EMD/HDF5)")
    r.add_argument("output", help="output EMD (.h5), written to a temporary name and renamed when complete")
    r.add_argument("--no-denoise", action="store_true", help="calibrate only")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=_cmd_preprocess)

    i = sub.add_parser("info", help="versions of the package and its dependencies")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``prenet``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError) as exc:
        print(f"prenet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
