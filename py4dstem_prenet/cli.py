"""The ``prenet`` command line.

Commands
--------
prenet demo          simulate the built-in crystal scan and calibrate it, print a table
prenet simulate OUT  write a simulated DataCube (EMD/HDF5) and its ground truth (.npz)
prenet benchmark     run the benchmark, write BENCHMARKS.md tables and plots
prenet benchmark-scale   peak memory out of core, dask throughput, streaming latency
prenet benchmark-strain  py4DSTEM strain mapping with no, classical and PreNet calibration
prenet train DIR     retrain the three networks from a seed
prenet preprocess IN OUT   denoise and calibrate a file (any py4DSTEM format), write EMD block by block
prenet info          versions of the package, its dependencies and the shipped model cards

Exit codes: 0 success, 2 bad arguments or input, 1 any other failure (e.g. a bad
weights file), 130 interrupted.
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


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
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
    if args.seed is not None:
        cfg.seed = args.seed
    extra = prenet_methods() if os.path.exists(os.path.join(WEIGHTS_DIR, "centre.pt")) else None
    res = run_benchmark(cfg, extra, progress=lambda m: print(f"[benchmark] {m}", file=sys.stderr))
    table = res.to_markdown()
    print(table)
    if args.out:
        command = ("prenet benchmark" + (" --quick" if args.quick else "")
                   + (f" --seed {args.seed}" if args.seed is not None else "") + f" --out {args.out}")
        _write_section(args.out, "accuracy", "## Accuracy and speed\n\nRegenerate with:\n\n```\n" + command
                       + "\n```\n\n" + _BENCHMARK_INTRO + table)
        plot = os.path.splitext(args.out)[0] + "_origin_denoise.png"
        res.plot(plot)
        print(f"wrote {args.out} and {plot}", file=sys.stderr)
    return 0


def _write_section(path: str, name: str, text: str) -> None:
    """Replace the section ``name`` of a markdown report (or add it), keeping the others."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def _cmd_benchmark_scale(args: argparse.Namespace) -> int:
    from .evaluation.scale import ScaleConfig, run_scale_benchmark, scale_markdown

    cfg = ScaleConfig.quick() if args.quick else ScaleConfig(size_gb=args.size_gb, denoise_out_of_core=args.denoise)
    res = run_scale_benchmark(cfg, log=lambda m: print(f"[benchmark-scale] {m}", file=sys.stderr))
    table = scale_markdown(res)
    print(table)
    if args.out:
        command = "prenet benchmark-scale" + (" --quick" if args.quick else f" --size-gb {args.size_gb:g}") + (
            " --denoise" if args.denoise else "") + f" --out {args.out}"
        _write_section(args.out, "scale", "## Scale: out of core, dask, live streaming\n\nRegenerate with:\n\n```\n"
                       + command + "\n```\n\n" + table)
    return 0


_DEVICE_TITLES = {"cuda": "a GPU", "cpu": "the CPU"}


def _cmd_benchmark_throughput(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.throughput import (ThroughputConfig, run_throughput_benchmark, throughput_datacube,
                                        throughput_markdown)
    from .storage import open_datacube

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ThroughputConfig.quick(device) if args.quick else ThroughputConfig(
        device=device, batch_sizes=tuple(args.batch_sizes))
    dc = open_datacube(args.data, dataset=args.dataset) if args.data else throughput_datacube(cfg)
    res = run_throughput_benchmark(dc, cfg, log=lambda m: print(f"[benchmark-throughput] {m}", file=sys.stderr))
    table = throughput_markdown(res)
    print(table)
    if args.out:
        command = (f"prenet benchmark-throughput --device {device}" + (" --quick" if args.quick else "")
                   + (f" --data {args.data}" if args.data else "")
                   + (f" --dataset {args.dataset}" if args.dataset else "")
                   + ("" if args.quick else " --batch-sizes " + " ".join(map(str, cfg.batch_sizes)))
                   + f" --out {args.out}")
        kind = device.split(":")[0]
        _write_section(args.out, f"throughput-{kind}", f"## Throughput on {_DEVICE_TITLES.get(kind, kind)}\n\n"
                       "Regenerate with:\n\n```\n" + command + "\n```\n\n" + table)
    return 0


def _cmd_benchmark_strain(args: argparse.Namespace) -> int:
    from .evaluation.strain import (LATTICE_KEYS, StrainConfig, run_strain_benchmark, strain_markdown,
                                    strain_verdicts, verdicts_markdown, write_pictures)

    cfg = StrainConfig.quick() if args.quick else StrainConfig()
    rows = run_strain_benchmark(cfg, log=lambda m: print(f"[benchmark-strain] {m}", file=sys.stderr))
    table = ("### Targets (strain issue), from the table below\n\n" + _VERDICT_INTRO
             + verdicts_markdown(strain_verdicts(rows)) + _LATTICE_INTRO
             + verdicts_markdown(strain_verdicts(rows, LATTICE_KEYS)) + "\n### Every route\n\n" + strain_markdown(rows))
    print(table)
    if args.out:
        prefix = os.path.splitext(args.out)[0]
        files = write_pictures(prefix, rows)
        command = "prenet benchmark-strain" + (" --quick" if args.quick else "") + f" --out {args.out}"
        pictures = "\n".join(f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files)
        _write_section(args.out, "strain", "## Strain mapping in py4DSTEM: no calibration, classical, PreNet\n\n"
                       "Regenerate with:\n\n```\n" + command + "\n```\n\n" + _STRAIN_INTRO + table + "\n"
                       + pictures + "\n")
        print(f"wrote {args.out} and " + ", ".join(files), file=sys.stderr)
    return 0


def _cmd_benchmark_units(args: argparse.Namespace) -> int:
    from .evaluation.units import UnitsConfig, run_units_benchmark, units_markdown

    cfg = UnitsConfig.quick() if args.quick else UnitsConfig()
    rows = run_units_benchmark(cfg, progress=lambda m: print(f"[benchmark-units] {m}", file=sys.stderr))
    table = units_markdown(rows, cfg)
    print(table)
    if args.out:
        command = "prenet benchmark-units" + (" --quick" if args.quick else "") + f" --out {args.out}"
        _write_section(args.out, "units", "## Units of the data: counts normalised or scaled, noise-free patterns\n\n"
                       "Regenerate with:\n\n```\n" + command + "\n```\n\n" + table)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


_VERDICT_INTRO = """\
Worst of e_xx, e_yy, e_xy (RMS). "added by": the false strain a route's calibration adds
to the exact route's floor, sqrt(RMS^2 - floor^2). Calibration matters where the
uncalibrated route adds more than the floor or cannot measure over 5% of the crystal.
Target: PreNet adds at most half of what the classical route adds ("met"); where both
are within 10% of the floor, calibration no longer limits the map and the routes tie
("tie at the floor"); and PreNet <= 0.1% at the highest dose. PreNet's calibration is
judged against the floor on its own denoised output; what denoising itself adds or
removes is in "added by PreNet's denoising" (the exact calibration on PreNet's data
against the same on the recording; 0 where denoising helps disk detection).

"""

_LATTICE_INTRO = """
### Where nothing cancels: the absolute lattice (phase identification)

The same judgement on the worst of each route's RMS error of
the absolute lattice of every measured pattern: |g1|/|g2| (relative) and the angle
between g1 and g2 (radians), read as % in the table. No reference region cancels a
calibration error here, in any grain.

"""

_STRAIN_INTRO = """\
Every route ends in py4DSTEM's unchanged `find_Bragg_disks` -> `braggvectors.setcal` ->
`StrainMap.fit_basis_vectors` -> `get_strain`, against one reference region (the
unstrained upper half of grain 0). Scans of 14x12 positions: two rows of amorphous
film, then an oblique 2D crystal (grains as vertical bands), unstrained in the upper
half, 1% tensile e_xx plus a shear gradient (e_xy 0 to 0.5% across the columns) in
the lower half; descan drift, elliptical distortion, Poisson noise. Routes: **none**
(origin at the detector centre, no ellipse); **classical** (py4DSTEM `get_origin` with
the radius hand-set to the true disk radius + `fit_origin` parabola; ellipse from
`fit_ellipse_amorphous_ring` on the origin-aligned mean of the amorphous strip, whose
region and fit radii the user picks); **prenet** (`prenet.preprocess(datacube)` and
nothing else; disks found in its denoised output); **exact** (the true origin maps and
ellipse on the recorded data: the floor that calibration cannot go below with this disk
detection). Hands-on steps shared by all: the
disk template and thresholds, and each grain's basis vectors (the clicks of
`choose_basis_vectors`). Errors are RMS over the crystal positions a route measured,
against py4DSTEM's own strain formula applied to the exact reciprocal bases. That
formula is infinitesimal: an unstrained grain rotated by 30 degrees shows e_xx = e_yy =
1 - cos 30 = 13.4% and a rotation of sin 30 rad against grain 0 even when perfectly
calibrated (the saturated right half of the maps below); the errors measure what
calibration adds on top. "not measured": crystal positions where py4DSTEM could not
index or fit the lattice (no reference could be indexed at all: every position).
Where nothing cancels: "RMS abs. |g1|/|g2|" and "g1-g2 angle" are the errors of each
pattern's absolute lattice (the fitted basis, no reference), what phase identification
compares with a database (neither depends on the camera length or the scan rotation);
"ring ellipticity left" is |(e1, e2) used - (e1, e2) true|, the peak-to-peak fraction by
which a ring's radius still varies with angle after the route's correction, which blurs
a polar or radial-distribution analysis of the amorphous strip.

"""


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train_all

    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    cfg.seed = args.seed
    metrics = train_all(args.out_dir, cfg, log=lambda m: print(f"[train] {m}", file=sys.stderr))
    print(metrics)
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    import contextlib

    from .preprocess import preprocess
    from .storage import open_datacube

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        print("prenet: the output must be a new file; the input is never written", file=sys.stderr)
        return 2
    if os.path.exists(args.output) and not args.overwrite:
        print(f"prenet: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    dc = open_datacube(args.input, mem="MEMMAP", dataset=args.dataset, scan=args.scan)
    if os.path.exists(args.output + ".partial"):
        print(f"prenet: found {args.output}.partial; resuming it if it was made from the same input and options",
              file=sys.stderr)
    with contextlib.ExitStack() as stack:
        client = None
        if args.scheduler or args.workers:
            from dask.distributed import Client, LocalCluster

            if args.scheduler:
                client = stack.enter_context(Client(args.scheduler))
            else:
                cluster = stack.enter_context(LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                                           dashboard_address=None))
                client = stack.enter_context(Client(cluster))
        mask = None
        if args.mask:
            mask = np.load(args.mask)
            if mask.dtype != bool:
                raise ValueError(f"--mask must hold a boolean array (True = recorded pixel), got {mask.dtype}")
        out = preprocess(dc, mask=mask, denoise=not args.no_denoise, ellipse=not args.no_ellipse, refine=not args.no_refine,
                         fit_descan=args.fit_descan, batch_size=args.batch_size, device=args.device,
                         progress=not args.quiet, out=args.output, overwrite=args.overwrite, client=client)
    qx0, qy0 = out.calibration.get_origin()
    summary = (f"wrote {args.output}: {out.data.shape[0]}x{out.data.shape[1]} patterns of "
               f"{out.data.shape[2]}x{out.data.shape[3]} px; origin qx0 {np.mean(qx0):.2f} +- {np.std(qx0):.2f}, "
               f"qy0 {np.mean(qy0):.2f} +- {np.std(qy0):.2f} px")
    if not args.no_ellipse:
        a, b, theta = out.calibration.get_ellipse()
        summary += f", ellipse a/b = {a / b:.4f}, theta = {np.degrees(theta):.1f} deg"
    print(summary)
    return 0


_BENCHMARK_INTRO = """\
All methods run in the same process on the same held-out simulated scans (seeds disjoint
from training; the abTEM condition uses structures, Au and MgO, that the training banks
do not contain). Crystal scans have descan drift (3 px plane + curvature + jitter), an
elliptical distortion, and thickness-like intensity variation inside the disks (which
moves the centre of mass but not the disk edge); "bright Bragg disks" scans have a Bragg
disk 1.5x brighter per pixel than the bright-field disk; "beam stop" scans (a crystal, and
an amorphous film whose rings are all that is left) have a disk and rod over the
bright-field disk (the dose is counted before the stop), whose mask is
given to the methods that take one (py4DSTEM get_origin_friedel, PreNet's `mask=`), as a
user who knows the stop would; "integrating detector" scans are crystals recorded at 10
counts per electron with Gaussian read noise of 10 counts (one electron) in every pixel,
dark-subtracted (half of the empty pixels read negative); "rough descan" scans are crystals
whose descan is also rough in time (the scan is raster order, rows along R_Ny): every row
offset by 0.3 px per axis, every row's first positions lagging by up to 1 px (flyback,
decaying over 1.5 positions), and a 0.3 px mains oscillation with a period of 3-20
positions; "stress" scans (added after the targets were set, and kept out of them) are
dense crystal lattices (at least 25 disks within the detector) whose Bragg disks of every
order are 0.6-1.5x as bright as the bright-field disk: with no intensity envelope, every
lattice and half-lattice point is a centre of symmetry. The origin label is the geometric centre of the bright-field disk. py4DSTEM's classical methods are run with their
defaults and, where a radius is needed, with the true radius (the hand-tuning a user
does); their failures are results, not crashes. PreNet runs with the shipped weights
and no hand-set parameter, as `prenet.preprocess` (its refined rows): below 2000 counts
per pattern the origin is measured on the sum of the 3x3 neighbouring patterns (descan
is smooth; the per-position jitter of 0.05 px per axis is then not followed; offsets of
whole scan rows or columns, and a mains ripple, that the patterns' own origins show are
given back). The CRLB
is that of one pattern: such pooled estimates use up to nine patterns' counts, so their
RMS/CRLB can fall below 1.

"""


def _cmd_info(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    print(f"py4dstem-prenet {__version__}")
    for pkg in ("py4DSTEM", "torch", "numpy", "scipy", "h5py", "emdfile", "abtem"):
        try:
            print(f"  {pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg} not installed")
    import json

    from .pretrained import WEIGHTS_DIR

    print(f"shipped weights: {WEIGHTS_DIR}")
    for name in ("denoiser", "centre", "ellipse"):
        path = os.path.join(WEIGHTS_DIR, name + ".json")
        if not os.path.exists(path):
            print(f"  {name}: missing")
            continue
        with open(path) as f:
            card = json.load(f)
        metrics = ", ".join(f"{k} {v:.3g}" for k, v in card.get("held_out_metrics", {}).items()
                            if k.startswith(name[:5]))
        print(f"  {name}: {card['architecture']}, version {card['package_version']}, "
              f"sha256 {card['sha256'][:12]}; held out: {metrics}")
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
    b.add_argument("--seed", type=int, default=None,
                   help="first seed of the scans (default 10000000, the reported benchmark's); another value, "
                        "e.g. 30000000, gives a development set with the same conditions")
    b.set_defaults(func=_cmd_benchmark)

    bs = sub.add_parser("benchmark-scale", help="peak memory out of core, dask throughput, streaming latency")
    bs.add_argument("--size-gb", type=_positive_float, default=4.0, help="size of the out-of-core input file (GB)")
    bs.add_argument("--denoise", action="store_true", help="denoise in the out-of-core run (slower)")
    bs.add_argument("--quick", action="store_true", help="small configuration (seconds)")
    bs.add_argument("--out", default=None, help="write the tables into this markdown file (section 'scale')")
    bs.set_defaults(func=_cmd_benchmark_scale)

    st = sub.add_parser("benchmark-strain", help="strain mapping end to end: no calibration, classical, PreNet")
    st.add_argument("--quick", action="store_true", help="small configuration (a minute)")
    st.add_argument("--out", default=None, help="write the table (section 'strain') and pictures next to this file")
    st.set_defaults(func=_cmd_benchmark_strain)

    un = sub.add_parser("benchmark-units", help="the same scans as counts, normalised, scaled and noise-free")
    un.add_argument("--quick", action="store_true", help="small configuration (seconds)")
    un.add_argument("--out", default=None, help="write the table into this markdown file (section 'units')")
    un.set_defaults(func=_cmd_benchmark_units)

    tp = sub.add_parser("benchmark-throughput",
                        help="patterns/s and peak memory of preprocess on the CPU and a device, next to get_origin")
    tp.add_argument("--device", default=None,
                    help="device of the PreNet runs besides the CPU (default: cuda when available)")
    tp.add_argument("--data", default=None, help="time this recording instead of the simulated 32x32 crystal scan")
    tp.add_argument("--dataset", default=None, help="path of the 4D dataset inside a plain HDF5 --data file")
    tp.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[64, 256], help="patterns per block")
    tp.add_argument("--quick", action="store_true", help="small configuration (seconds)")
    tp.add_argument("--out", default=None,
                    help="write the table into this markdown file (section 'throughput-<device type>')")
    tp.set_defaults(func=_cmd_benchmark_throughput)

    t = sub.add_parser("train", help="retrain the denoiser, centre and ellipse networks from a seed")
    t.add_argument("out_dir", help="folder for <model>.pt and <model>.json")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser(
        "preprocess", help="denoise and calibrate a 4D-STEM file, write EMD with the calibration",
        description="Denoise a 4D-STEM recording and calibrate its origin (descan) and elliptical distortion. "
                    "The result is an EMD file that py4DSTEM.read opens, with calibration.get_origin() and "
                    "calibration.get_ellipse() set, ready for find_Bragg_disks and strain mapping. The input is "
                    "read block by block and never changed; the output is written to OUT.partial and renamed "
                    "when complete; rerunning an interrupted command resumes it.",
        epilog="exit codes: 0 done; 2 bad arguments or unreadable input; 1 any other failure; "
               "130 interrupted (OUT.partial kept for a resume)")
    r.add_argument("input", help="a file py4DSTEM reads: EMD/HDF5, Merlin .mib, Gatan .dm3/.dm4, EMPAD .raw, ...")
    r.add_argument("output", help="output EMD file (.h5)")
    r.add_argument("--scan", type=_shape, default=None,
                   help="scan shape, e.g. 64x64, for files that do not store it (a Merlin .mib without its .hdr)")
    r.add_argument("--dataset", default=None,
                   help="path of the 4D dataset inside a plain (non-EMD) HDF5 file (default: the largest one)")
    r.add_argument("--mask", default=None,
                   help="a .npy boolean array of the detector shape, False on a beam stop or dead regions "
                        "(without it, a beam stop is looked for on the scan's sum)")
    r.add_argument("--no-denoise", action="store_true", help="calibrate only; the data are copied as float32")
    r.add_argument("--no-ellipse", action="store_true", help="skip the elliptical-distortion calibration")
    r.add_argument("--no-refine", action="store_true", help="network estimates only, no physics refinement")
    r.add_argument("--fit-descan", action="store_true",
                   help="replace the measured origins by a smooth parabolic descan fit (py4DSTEM fit_origin)")
    r.add_argument("--batch-size", type=_positive_int, default=64,
                   help="patterns per block; memory grows with it (default 64)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--workers", type=_positive_int, default=0,
                   help="run on a local dask cluster with this many worker processes")
    r.add_argument("--scheduler", default=None,
                   help="run on an existing dask.distributed cluster, e.g. tcp://host:8786")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_preprocess)

    i = sub.add_parser("info", help="versions of the package, its dependencies and the shipped model cards")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``prenet``; returns the exit code (0 done, 2 bad input, 1 other failure, 130 interrupted)."""
    from .pretrained import WeightsError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("prenet: interrupted; a partial output is kept as OUT.partial and the same command resumes it",
              file=sys.stderr)
        return 130
    except WeightsError as exc:
        print(f"prenet: weights error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError) as exc:
        print(f"prenet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
