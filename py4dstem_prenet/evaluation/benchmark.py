"""Benchmark harness: every method on the same simulated data, in the same run.

``run_benchmark`` simulates held-out scans (seeds disjoint from any training
stream), runs the registered origin, ellipse and denoising methods on them, and
returns a :class:`BenchmarkResult` whose :meth:`~BenchmarkResult.to_markdown` is
the table in BENCHMARKS.md and whose :meth:`~BenchmarkResult.plot` draws error
versus dose with the Cramer-Rao curve.
"""

from __future__ import annotations

import itertools
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import __version__
from ..baselines import (aligned_mean_pattern, ellipse_amorphous_ring, ellipse_fit_1d, ellipse_from_bragg_vectors,
                         fit_origin, gaussian_denoise, get_origin, get_origin_friedel, tensor_svd_denoise)
from ..preprocess import POOL_BELOW_COUNTS
from ..simulation import Detector, Scene, random_scene, simulate_datacube, simulate_patterns
from ..simulation.multislice import simulate_multislice_datacube
from .metrics import centre_errors, ellipse_errors, mse, psnr
from .timing import format_mb, timed_call

__all__ = ["BenchmarkConfig", "BenchmarkResult", "run_benchmark", "classical_methods", "prenet_methods",
           "bright_disk_scene", "flat_lattice_scene"]

#: Seeds of the benchmark's scans start here; training streams must never use them.
BENCHMARK_SEED = 10_000_000


#: Method names of the rows the targets are read from.
PRENET_CENTRE = "PreNet denoise -> centre net + refinement"
PRENET_CALIBRATION = "PreNet centre net + Friedel edge refinement (no denoising)"
PRENET_ELLIPSE = "PreNet (ResNet + refinement: rings' profile or log-polar fit, crystals' disk shapes)"

#: The PreNet issue's ellipse targets: abs d(a/b) and abs d(theta) (degrees) at most these,
#: on scans whose a/b - 1 is at least ELLIPSE_TARGET_FROM (a rounder ellipse has no angle
#: to measure to a degree).
ELLIPSE_RATIO_TOL, ELLIPSE_THETA_TOL_DEG, ELLIPSE_TARGET_FROM = 0.002, 1.0, 0.01


def _ellipse_targets_apply(true_ratio: float) -> bool:
    """Whether a scan of this true a/b counts for the ellipse targets."""
    return true_ratio - 1 >= ELLIPSE_TARGET_FROM - 1e-9
PRENET_DENOISER = "PreNet CBAM U-Net"
CLASSICAL_GET_ORIGIN = "py4DSTEM get_origin (default r)"

#: The conditions with a beam stop (disk and rod) over the bright-field disk, on a crystal
#: and on an amorphous film (rings only); the mask is given to the methods that take one
#: (py4DSTEM get_origin_friedel, PreNet).
STOP_CONDITION = "beam stop over the bright-field disk (mask given)"
STOP_RINGS_CONDITION = "amorphous rings, beam stop over the bright-field disk (mask given)"

#: A crystal whose beam stop sits off the direct beam (its tip centre half a tip radius
#: away, in a random direction) and whose mask is not given: the stop is PreNet's to find
#: (:func:`~py4dstem_prenet.preprocess.scan_beam_stop`). Added after the targets were set
#: and kept out of them (:meth:`BenchmarkResult.targets`).
OFF_STOP_CONDITION = "beam stop half a tip radius off the bright-field disk (no mask given)"
OFF_STOP = {"beam_stop_offset": 0.5}

#: A crystal recorded on an integrating detector, dark-subtracted: 10 counts per electron
#: and Gaussian read noise of 10 counts (one electron) in every pixel.
READ_NOISE_CONDITION = "integrating detector, read noise 1 e- per pixel"

#: A crystal scan whose descan is rough in time as well as smooth over the scan: rows
#: offset from each other (0.3 px per axis), each row's first positions lagging by up to
#: 1 px (flyback), and a 0.3 px mains oscillation.
ROUGH_DESCAN_CONDITION = "rough descan: scan-line offsets, flyback, mains ripple"

#: A dense lattice of Bragg disks as bright as the bright-field disk at every order
#: (:func:`flat_lattice_scene`), at least this many disks (the bright-field one included)
#: within the detector's inscribed circle (a quarter of random crystal scenes). A stress
#: condition, added after the targets were set and kept out of them (:meth:`targets`):
#: with no envelope, only the diffuse background and the descan's consistency over the
#: scan single out the origin among the lattice points.
FLAT_LATTICE_CONDITION = "stress: dense lattice, no envelope (every disk as bright as the bright-field disk)"
FLAT_LATTICE_MIN_SPOTS = 25
ROUGH_DESCAN = {"line_jitter": 0.3, "flyback": 1.0, "ripple": 0.3}


@dataclass
class BenchmarkConfig:
    """What the benchmark simulates.

    Attributes
    ----------
    doses : tuple of float
        Electrons per pattern.
    scan_shape : tuple of int
        Probe positions of each origin/denoising scan.
    n_scans : int
        Independent scans (different crystals, zone axes, descan) per dose.
    detector_shape : tuple of int
        Detector pixels.
    sim_patterns : int
        Patterns generated for the simulation-speed measurement.
    ellipse : tuple of float
        (a/b, theta) of the origin and denoising scans.
    ellipses : tuple of tuple
        (a/b, theta) of the ellipse scans.
    ellipse_scans : int
        Scans per (a/b, data kind), each a new scene; scan k has the angle theta +
        k x 180 deg / ellipse_scans, so that the angles cover the half-turn.
    ellipse_dose : float
        Electrons per pattern of the ellipse scans.
    multislice : bool
        Add an abTEM multislice condition (held-out structures Au and MgO) when
        abtem is installed.
    seed : int
        First seed of the scans. BENCHMARK_SEED gives the reported benchmark; any
        other value (e.g. 30_000_000) gives a development set with the same conditions,
        to check a change on every condition without tuning on the reported scans.
        Scans take seeds up to ``seed + 600_000``.
    """

    doses: tuple = (1e2, 1e3, 1e4, 1e5, 1e6)
    scan_shape: tuple = (12, 12)
    n_scans: int = 2
    detector_shape: tuple = (128, 128)
    sim_patterns: int = 10_000
    ellipse: tuple = (1.02, 0.6)
    ellipses: tuple = ((1.01, 2.0), (1.02, 0.6), (1.04, 1.2))
    ellipse_scans: int = 4
    ellipse_dose: float = 1e4
    multislice: bool = True
    seed: int = BENCHMARK_SEED

    @classmethod
    def quick(cls) -> "BenchmarkConfig":
        """A small configuration for tests and smoke runs (seconds)."""
        return cls(doses=(1e3, 1e5), scan_shape=(4, 4), n_scans=1, detector_shape=(96, 96), sim_patterns=200,
                   ellipses=((1.03, 0.4),), ellipse_scans=1, multislice=False)


@dataclass
class BenchmarkResult:
    """Tables of the benchmark (lists of row dicts) and run information."""

    config: BenchmarkConfig
    origin: list = field(default_factory=list)
    ellipse: list = field(default_factory=list)
    denoise: list = field(default_factory=list)
    simulation: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def targets(self) -> list[tuple[str, str, bool]]:
        """The PreNet issue's targets, each with the measured figures and whether it is met.

        Computed from the rows of this run (the PreNet route with denoising for the
        centre, the refined ellipse, the U-Net for denoising), so that the summary
        is regenerated with the tables. The stress condition FLAT_LATTICE_CONDITION and
        OFF_STOP_CONDITION, added after the targets were set, are reported in the
        tables, not here.

        Returns
        -------
        list of (target, measured, met)
        """
        out: list[tuple[str, str, bool]] = []
        ours = [r for r in self.origin
                if r["method"] == PRENET_CENTRE and r["data"] not in (FLAT_LATTICE_CONDITION, OFF_STOP_CONDITION)]
        by_dose: dict[float, list[dict]] = {}
        for r in ours:
            by_dose.setdefault(r["dose"], []).append(r)

        def spread(rows, key, fmt="{:.3f}"):
            vals = [r[key] for r in rows]
            return fmt.format(min(vals)) + ("" if len(vals) == 1 else " - " + fmt.format(max(vals)))

        for dose, rows in sorted(by_dose.items()):
            limit = 0.04 if dose >= 1e4 else 0.1 if dose >= 1e3 else None
            if limit is not None:
                out.append((f"centre mean error <= {limit} px at {dose:.0e}", spread(rows, "mean") + " px",
                            all(r["mean"] <= limit for r in rows)))
        for dose, rows in sorted(by_dose.items()):
            ratios = [r["rms"] / r["crlb_rms"] for r in rows]
            measured = f"{min(ratios):.1f} - {max(ratios):.1f} x"
            bound = 1.0
            if dose < POOL_BELOW_COUNTS:  # pooled 3 x 3: nine patterns' counts, whose bound is CRLB / 3
                bound = 3.0
                measured += (f" of one pattern's CRLB; pooled over 3x3 patterns, against their bound "
                             f"CRLB / 3: {3 * min(ratios):.1f} - {3 * max(ratios):.1f} x")
            out.append((f"centre RMS <= 2 x CRLB at {dose:.0e}", measured, bound * max(ratios) <= 2))
        for dose, rows in sorted(by_dose.items()):
            hard = [r for r in rows if r["data"].startswith("bright Bragg disks")
                    or r["data"] in (STOP_CONDITION, STOP_RINGS_CONDITION)]
            if hard:
                out.append((f"no pattern off by > 1 px where get_origin fails (bright disks, hot pixels, beam stop), "
                            f"{dose:.0e}",
                            ", ".join(f"{100 * r['fail']:.1f}%" for r in hard), all(r["fail"] == 0 for r in hard)))
        ell = [r for r in self.ellipse if r["method"] == PRENET_ELLIPSE and _ellipse_targets_apply(r["true_ratio"])]
        if ell:
            ok_r = sum(r["d_ratio"] <= ELLIPSE_RATIO_TOL for r in ell)
            ok_t = sum(r["d_theta_deg"] <= ELLIPSE_THETA_TOL_DEG for r in ell)
            worst_r = max(r["d_ratio"] for r in ell)
            worst_t = max(r["d_theta_deg"] for r in ell)
            scope = f"(a/b - 1 >= {ELLIPSE_TARGET_FROM:g})"
            out.append((f"ellipse abs d(a/b) <= {ELLIPSE_RATIO_TOL:g} {scope}",
                        f"{ok_r} of {len(ell)} scans (worst {worst_r:.4f})", ok_r == len(ell)))
            out.append((f"ellipse abs d(theta) <= {ELLIPSE_THETA_TOL_DEG:g} deg {scope}",
                        f"{ok_t} of {len(ell)} scans (worst {worst_t:.2f} deg)", ok_t == len(ell)))
        den: dict[float, dict[str, float]] = {}
        for r in self.denoise:
            den.setdefault(r["dose"], {})[r["method"]] = r["mse_ratio"]
        for dose, m in sorted(den.items()):
            if dose > 1e5 or PRENET_DENOISER not in m:
                continue
            others = [v for k, v in m.items() if k not in (PRENET_DENOISER, "noisy input")]
            out.append((f"denoising MSE <= 0.5 x noisy and below Gaussian and tensor SVD at {dose:.0e}",
                        f"{m[PRENET_DENOISER]:.3f} (others {', '.join(f'{v:.3f}' for v in others)})",
                        m[PRENET_DENOISER] <= 0.5 and all(m[PRENET_DENOISER] < v for v in others)))
        cal = [r for r in self.origin if r["method"] == PRENET_CALIBRATION]
        classical = [r for r in self.origin if r["method"] == CLASSICAL_GET_ORIGIN]
        if cal and classical:
            slow = min(r["per_second"] for r in cal)
            out.append(("calibration alone at least as fast as get_origin on the same data",
                        f"{slow:.0f} - {max(r['per_second'] for r in cal):.0f} vs "
                        f"{min(r['per_second'] for r in classical):.0f} - "
                        f"{max(r['per_second'] for r in classical):.0f} patterns/s",
                        all(a["per_second"] >= b["per_second"] for a in cal for b in classical
                            if (a["data"], a["dose"]) == (b["data"], b["dose"]))))
        if ours:
            out.append(("with denoising >= 20 patterns/s", spread(ours, "per_second", "{:.0f}") + " patterns/s",
                        min(r["per_second"] for r in ours) >= 20))
        return out

    def to_markdown(self) -> str:
        """Render the tables as markdown."""
        lines = [
            f"Run: py4dstem-prenet {self.info.get('version')}, {self.info.get('machine')}, "
            f"{self.info.get('date')}, {self.info.get('seconds', 0):.0f} s in all.",
            "",
            "### Targets (PreNet issue), from the tables below",
            "",
            "| target | measured | met |",
            "|---|---|---|",
            *[f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in self.targets()],
            "",
            "### Simulation speed",
            "",
            f"{self.simulation.get('n', 0)} random {self.simulation.get('shape')} training patterns "
            f"(all families, noise, defects, labels): {self.simulation.get('seconds', 0):.1f} s, "
            f"{self.simulation.get('per_second', 0):.0f} patterns/s, one process.",
            "",
            "### Origin (centre) on crystal scans with bright Bragg disks, with and without hot pixels",
            "",
            "Error is the distance to the geometric centre of the bright-field disk, px. "
            "CRLB: Cramer-Rao bound (RMS over the patterns of sqrt(var_qx + var_qy)). "
            "Speed: patterns/s on this machine, untraced; peak: the rise of the process's peak resident "
            "memory over the call (numpy and torch alike), largest over the scans.",
            "",
            "| method | data | dose (e-/pattern) | mean | median | p99 | RMS | CRLB RMS | RMS/CRLB | > 1 px "
            "| patterns/s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.origin:
            lines.append(
                f"| {r['method']} | {r['data']} | {r['dose']:.0e} | {r['mean']:.3f} | {r['median']:.3f} | {r['p99']:.2f} | "
                f"{r['rms']:.3f} | {r['crlb_rms']:.4f} | {r['rms'] / r['crlb_rms']:.1f} | {100 * r['fail']:.1f}% | "
                f"{r['per_second']:.0f} | {format_mb(r['peak_mb'])} |"
            )
        lines += [
            "",
            "### Ellipse (one estimate per scan, from all its patterns)",
            "",
            f"Scans of {self.config.scan_shape} patterns at {self.config.ellipse_dose:.0e} e-/pattern, "
            f"{self.config.ellipse_scans} per a/b and kind of data (each a new scene, the angles spread over the "
            "half-turn). Classical fits get the annulus from the true ring radius (+-15%), as a user hand-tunes it; "
            "they need a ring, so they have no row on single-crystal data.",
            "",
            "Summary per a/b and kind of data (median and worst over its scans):",
            "",
            "| method | data | true a/b | scans | median abs d(a/b) | worst abs d(a/b) | median abs d(theta) deg "
            "| worst abs d(theta) deg | within both targets |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        cells: dict[tuple, list] = {}
        for r in self.ellipse:
            cells.setdefault((r["method"], r["data"], r["true_ratio"]), []).append(r)
        for (method, data, ratio), rows in cells.items():
            dr = np.array([r["d_ratio"] for r in rows], float)
            dt = np.array([r["d_theta_deg"] for r in rows], float)
            both = int(np.sum((dr <= ELLIPSE_RATIO_TOL)
                              & ((dt <= ELLIPSE_THETA_TOL_DEG) | (not _ellipse_targets_apply(ratio)))))
            lines.append(f"| {method} | {data} | {ratio:.3f} | {len(rows)} | {np.median(dr):.4f} | {np.max(dr):.4f} | "
                         f"{np.median(dt):.2f} | {np.max(dt):.2f} | {both} of {len(rows)} |")
        lines += [
            "",
            "Every scan:",
            "",
            "| method | data | true a/b | true theta deg | est. a/b | abs d(a/b) | abs d(theta) deg | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.ellipse:
            lines.append(
                f"| {r['method']} | {r['data']} | {r['true_ratio']:.3f} | {np.degrees(r['true_theta']):.1f} | "
                f"{r['ratio']:.4f} | {r['d_ratio']:.4f} | {r['d_theta_deg']:.2f} | {r['seconds']:.2f} |"
            )
        lines += [
            "",
            "### Denoising (crystal scans; MSE against the clean expected counts)",
            "",
            "| method | dose | MSE | MSE / noisy MSE | PSNR dB | patterns/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.denoise:
            lines.append(
                f"| {r['method']} | {r['dose']:.0e} | {r['mse']:.4g} | {r['mse_ratio']:.3f} | {r['psnr']:.1f} | "
                f"{r['per_second']:.0f} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> None:
        """Write median origin error vs dose (one panel per condition, with the CRLB) and
        denoising MSE vs dose to ``path`` (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        conditions = list(dict.fromkeys(r["data"] for r in self.origin))
        n_panels = len(conditions) + 1
        cols = 3
        rows_ = (n_panels + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.8 * rows_), squeeze=False)
        axes = axes.ravel()
        shown = (PRENET_CALIBRATION,
                 "py4DSTEM get_origin (r hand-set to the true radius)", "py4DSTEM get_origin_friedel")
        for ax, cond in zip(axes, conditions):
            rows = [r for r in self.origin if r["data"] == cond]
            for m in shown:
                sel = [r for r in rows if r["method"] == m]
                if sel:
                    ax.loglog([r["dose"] for r in sel], [max(r["median"], 1e-4) for r in sel], "o-",
                              label=m.replace(" (no denoising)", ""))
            first = [r for r in rows if r["method"] == rows[0]["method"]]
            ax.loglog([r["dose"] for r in first], [r["crlb_rms"] for r in first], "k--", label="Cramer-Rao bound (RMS)")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_title(cond, fontsize=9)
            ax.set_xlabel("dose (electrons / pattern)")
            ax.set_ylabel("median origin error (px)")
        axes[0].legend(fontsize=7)
        ax = axes[len(conditions)]
        for m in dict.fromkeys(r["method"] for r in self.denoise):
            sel = [r for r in self.denoise if r["method"] == m]
            ax.semilogx([r["dose"] for r in sel], [r["mse_ratio"] for r in sel], "o-", label=m)
        ax.axhline(0.5, color="k", ls=":", lw=1)
        ax.set_xlabel("dose (electrons / pattern)")
        ax.set_ylabel("MSE / MSE of the noisy input")
        ax.set_title("Denoising", fontsize=9)
        ax.legend(fontsize=7)
        for ax in axes[n_panels:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _crystal_scene(rng: np.random.Generator, shape: tuple[int, int], accept) -> Scene:
    """The first random crystal scene (:func:`~py4dstem_prenet.simulation.random_scene`) that ``accept`` takes."""
    while True:
        scene = random_scene(rng, shape, "crystal")
        if accept(scene):
            return scene


def bright_disk_scene(rng: np.random.Generator, shape: tuple[int, int], brightness: float = 1.5) -> Scene:
    """A crystal scene whose brightest Bragg disk outshines the bright-field disk.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    shape : tuple of int
        Detector shape.
    brightness : float
        Brightest Bragg disk relative to the bright-field disk.
    """
    scene = _crystal_scene(rng, shape, lambda sc: len(sc.spots) > 4)
    inten = scene.spot_intensity.copy()
    inten[1:] *= brightness / inten[1:].max()
    scene.spot_intensity = inten
    return scene


def flat_lattice_scene(rng: np.random.Generator, shape: tuple[int, int]) -> Scene:
    """A dense crystal lattice with no intensity envelope: every Bragg disk 0.6-1.5 times as
    bright as the bright-field disk, whatever its order (a thick crystal).

    Every lattice point and half-lattice point is then a centre of inversion symmetry; only
    the diffuse background and the scan-wide consistency of the descan single out the origin.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source: crystal scenes are drawn until one is dense enough, then the
        disks' intensities.
    shape : tuple of int
        Detector shape, pixels; FLAT_LATTICE_MIN_SPOTS disks must lie within its
        inscribed circle.
    """
    scene = _crystal_scene(rng, shape,
                           lambda sc: (np.hypot(*sc.spots.T) < 0.5 * min(shape)).sum() >= FLAT_LATTICE_MIN_SPOTS)
    scene.spot_intensity = np.r_[1.0, rng.uniform(0.6, 1.5, len(scene.spots) - 1)]
    return scene


def classical_methods() -> dict[str, dict]:
    """py4DSTEM's classical methods and the classical denoisers, keyed by table."""

    def mean_ring(fit):
        def method(dc, ctx):
            qx0, qy0 = fit_origin(*get_origin(dc))
            mean, centre = aligned_mean_pattern(dc, qx0, qy0)
            return fit(mean, centre, ctx["fitradii"])
        return method

    def bragg(dc, ctx):
        qx0, qy0 = fit_origin(*get_origin(dc))
        return ellipse_from_bragg_vectors(dc, qx0, qy0, ctx["disk_radius"], ctx["fitradii"])

    return {
        "origin": {
            CLASSICAL_GET_ORIGIN: lambda dc, ctx: get_origin(dc),
            "py4DSTEM get_origin (r hand-set to the true radius)": lambda dc, ctx: get_origin(dc, r=ctx["disk_radius"]),
            "py4DSTEM get_origin (true r) + fit_origin": lambda dc, ctx: fit_origin(*get_origin(dc, r=ctx["disk_radius"])),
            "py4DSTEM get_origin_friedel": lambda dc, ctx: get_origin_friedel(dc, mask=ctx.get("mask")),
        },
        "ellipse": {
            "py4DSTEM fit_ellipse_1D (aligned mean)": (mean_ring(ellipse_fit_1d), ("polycrystalline", "amorphous")),
            "py4DSTEM fit_ellipse_amorphous_ring (aligned mean)": (mean_ring(ellipse_amorphous_ring), ("amorphous",)),
            "py4DSTEM Bragg vectors + fit_p_ellipse": (bragg, ("polycrystalline",)),
        },
        "denoise": {
            "gaussian filter (sigma of 0.25/0.5/1/2 best vs truth)": None,
            "tensor SVD (Anscombe, noise-edge ranks)": lambda x: tensor_svd_denoise(x),
        },
    }


def prenet_methods(weights_dir: str | None = None) -> dict[str, dict]:
    """PreNet's rows for the benchmark, in the layout of :func:`classical_methods`."""
    import py4DSTEM

    from ..preprocess import preprocess

    def calib(dc, ctx):
        out = preprocess(dc, denoise=False, ellipse=False, progress=False, weights_dir=weights_dir,
                         mask=ctx.get("mask"))
        return out.calibration.get_origin()

    def calib_denoised(dc, ctx):
        out = preprocess(dc, ellipse=False, progress=False, weights_dir=weights_dir, mask=ctx.get("mask"))
        return out.calibration.get_origin()

    def net_only(dc, ctx):
        out = preprocess(dc, denoise=False, ellipse=False, refine=False, progress=False, weights_dir=weights_dir,
                         mask=ctx.get("mask"))
        return out.calibration.get_origin()

    def ellipse(dc, ctx):
        out = preprocess(dc, progress=False, weights_dir=weights_dir)
        a, b, theta = out.calibration.get_ellipse()
        return a / b, theta

    def ellipse_net(dc, ctx):
        out = preprocess(dc, refine=False, progress=False, weights_dir=weights_dir)
        a, b, theta = out.calibration.get_ellipse()
        return a / b, theta

    def denoise(data):
        return preprocess(py4DSTEM.DataCube(data=data), center=False, ellipse=False, progress=False,
                          weights_dir=weights_dir).data

    return {
        "origin": {
            "PreNet centre net only": net_only,
            PRENET_CALIBRATION: calib,
            PRENET_CENTRE: calib_denoised,
        },
        "ellipse": {
            "PreNet ResNet (median over scan)": (ellipse_net, ("polycrystalline", "amorphous", "crystal")),
            PRENET_ELLIPSE: (ellipse, ("polycrystalline", "amorphous", "crystal")),
        },
        "denoise": {PRENET_DENOISER: denoise},
    }


def _timed(fn, *args):
    """``fn(*args)``, its wall seconds and peak memory, MB (:func:`~.timing.timed_call`)."""
    return timed_call(lambda: fn(*args))


def _origin_rows(methods: dict, cubes: list, condition: str, dose: float, give_mask: bool = True) -> list[dict]:
    crlb = np.concatenate([t.crlb.reshape(-1, 2) for _, t in cubes])
    crlb_rms = float(np.sqrt(np.mean(np.sum(crlb**2, axis=1))))
    truth_o = np.concatenate([t.origin.reshape(-1, 2) for _, t in cubes])
    rows = []
    for name, fn in methods.items():
        preds, seconds, peak = [], 0.0, float("nan")
        for dc, truth in cubes:
            # a known beam stop is given as a mask (the user knows where it is): False under it
            stop = None if not give_mask or np.all(truth.transmission >= 1) else truth.transmission > 0.5
            (qx0, qy0), dt, pk = _timed(fn, dc, {"disk_radius": truth.disk_radius, "mask": stop})
            preds.append(np.stack([qx0, qy0], -1).reshape(-1, 2))
            seconds += dt
            peak = float(np.fmax(peak, pk))
        rows.append({"method": name, "data": condition, "dose": dose,
                     **centre_errors(np.concatenate(preds), truth_o),
                     "crlb_rms": crlb_rms, "per_second": len(truth_o) / seconds, "peak_mb": peak})
    return rows


def _denoise_rows(methods: dict, cubes: list, dose: float) -> list[dict]:
    noisy = np.concatenate([dc.data for dc, _ in cubes])
    clean = np.concatenate([t.clean for _, t in cubes])
    n_pat = noisy.shape[0] * noisy.shape[1]
    base = mse(noisy, clean)
    rows = [{"method": "noisy input", "dose": dose, "mse": base, "mse_ratio": 1.0,
             "psnr": psnr(noisy, clean), "per_second": float("inf")}]
    for name, fn in methods.items():
        if fn is None:  # Gaussian filter with the sigma that is best against the truth
            best = None
            for sigma in (0.25, 0.5, 1.0, 2.0):
                out, dt, _ = _timed(lambda s=sigma: np.concatenate([gaussian_denoise(c.data, s) for c, _ in cubes]))
                m = mse(out, clean)
                if best is None or m < best[0]:
                    best = (m, out, dt)
            m, out, dt = best
        else:
            outs, dt = [], 0.0
            for dc, _ in cubes:
                o, d, _ = _timed(fn, dc.data)
                outs.append(o)
                dt += d
            out = np.concatenate(outs)
            m = mse(out, clean)
        rows.append({"method": name, "dose": dose, "mse": m, "mse_ratio": m / base,
                     "psnr": psnr(out, clean), "per_second": n_pat / dt})
    return rows


def run_benchmark(
    config: BenchmarkConfig | None = None,
    extra_methods: dict[str, dict] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Run every method on the same held-out simulated data.

    Parameters
    ----------
    config : BenchmarkConfig, optional
        What to simulate (the full default when None).
    extra_methods : dict, optional
        More methods in the layout of :func:`classical_methods` (e.g. PreNet's).
    progress : callable, optional
        Called with a short message before each stage.

    Returns
    -------
    BenchmarkResult

    Raises
    ------
    ValueError
        If a table of ``extra_methods`` is unknown, the config's seed is not an
        integer >= 2 or its ``ellipse_scans`` not an integer >= 1.
    """
    cfg = config or BenchmarkConfig()
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer)) or cfg.seed < 2:
        raise ValueError(f"seed must be an integer >= 2, got {cfg.seed!r}")
    if not (isinstance(cfg.ellipse_scans, int) and cfg.ellipse_scans >= 1):
        raise ValueError(f"ellipse_scans must be an integer >= 1, got {cfg.ellipse_scans!r}")
    say = progress or (lambda msg: None)
    methods = classical_methods()
    for table, entries in (extra_methods or {}).items():
        if table not in methods:
            raise ValueError(f"unknown table {table!r}; use 'origin', 'ellipse' or 'denoise'")
        methods[table].update(entries)
    t_start = time.perf_counter()
    res = BenchmarkResult(config=cfg)
    shape = tuple(cfg.detector_shape)

    say(f"simulation speed: {cfg.sim_patterns} patterns")
    simulate_patterns(50, shape, np.random.default_rng(cfg.seed - 2))  # warm py4DSTEM's caches
    t0 = time.perf_counter()
    simulate_patterns(cfg.sim_patterns, shape, np.random.default_rng(cfg.seed - 1))
    dt = time.perf_counter() - t0
    res.simulation = {"n": cfg.sim_patterns, "shape": shape, "seconds": dt, "per_second": cfg.sim_patterns / dt}

    bank = None
    if cfg.multislice:
        try:
            from ..simulation.multislice import multislice_bank

            say("abTEM banks (Au, MgO)")
            bank = [multislice_bank(name, thickness=300.0, exit_every=50.0, scan_gpts=3, cells=6)
                    for name in ("Au", "MgO")]
        except ImportError:
            say("abtem not installed: no multislice condition")
    # name -> (detector, scene drawn (None: random_scene of the kind), beam stop, kind, rough descan)
    conditions = {
        "crystal (random disk brightness)": (Detector(), None, False, "crystal", {}),
        "bright Bragg disks": (Detector(), bright_disk_scene, False, "crystal", {}),
        "bright Bragg disks + hot pixels": (Detector(hot_fraction=5e-4, hot_level=10.0), bright_disk_scene, False,
                                            "crystal", {}),
        STOP_CONDITION: (Detector(), None, True, "crystal", {}),
        STOP_RINGS_CONDITION: (Detector(), None, True, "amorphous", {}),
        READ_NOISE_CONDITION: (Detector(gain=10.0, read_noise=10.0), None, False, "crystal", {}),
        ROUGH_DESCAN_CONDITION: (Detector(), None, False, "crystal", ROUGH_DESCAN),
        FLAT_LATTICE_CONDITION: (Detector(), flat_lattice_scene, False, "crystal", {}),
        OFF_STOP_CONDITION: (Detector(), None, True, "crystal", OFF_STOP),
    }
    for di, dose in enumerate(cfg.doses):
        for ci, (condition, (detector, draw, stop, kind, rough)) in enumerate(conditions.items()):
            say(f"origin, {condition}, dose {dose:.0e}")
            cubes = []
            for s in range(cfg.n_scans):
                seed = cfg.seed + 1000 * di + 100 * ci + s
                rng = np.random.default_rng(seed)
                scene = draw(rng, shape) if draw is not None else None
                dc, truth = simulate_datacube(
                    cfg.scan_shape, shape, kind, dose, cfg.ellipse, detector=detector, beam_stop=stop,
                    scene=scene, seed=seed, compute_crlb=True, **rough,
                )
                cubes.append((dc, truth))
            res.origin.extend(_origin_rows(methods["origin"], cubes, condition, dose,
                                           give_mask=condition != OFF_STOP_CONDITION))
            if ci == 1:
                say(f"denoising, dose {dose:.0e}")
                res.denoise.extend(_denoise_rows(methods["denoise"], cubes, dose))
        if bank is not None:
            say(f"origin, abTEM multislice (held-out Au, MgO), dose {dose:.0e}")
            cubes = []
            for s in range(cfg.n_scans):
                rng = np.random.default_rng(cfg.seed + 1000 * di + 900 + s)
                b = bank[s % len(bank)]
                cubes.append(simulate_multislice_datacube(
                    b, cfg.scan_shape, shape, dose, cfg.ellipse, disk_radius=float(rng.uniform(5, 10)),
                    seed=int(rng.integers(2**31)), compute_crlb=True))
            res.origin.extend(_origin_rows(methods["origin"], cubes, "abTEM multislice, 0-300 A, held-out structures",
                                           dose))

    for (ei, (ratio, theta0)), (ki, data_kind), rep in itertools.product(
            enumerate(cfg.ellipses), enumerate(("polycrystalline", "amorphous", "crystal")), range(cfg.ellipse_scans)):
        theta = (theta0 + rep * np.pi / cfg.ellipse_scans) % np.pi
        say(f"ellipse, {data_kind}, a/b = {ratio}, scan {rep + 1} of {cfg.ellipse_scans}")
        seed = cfg.seed + 500_000 + 1000 * rep + 10 * ei + ki
        dc, truth = simulate_datacube(cfg.scan_shape, shape, data_kind, cfg.ellipse_dose, (ratio, theta),
                                      detector=Detector(), seed=seed)
        rings = truth.scene.rings
        ring = rings[int(np.argmax(rings[:, 2]))] if len(rings) else None
        ctx = {"disk_radius": truth.scene.disk_radius,
               "fitradii": (0.85 * ring[0], 1.15 * ring[0] * ratio) if ring is not None else None}
        for name, (fn, kinds) in methods["ellipse"].items():
            if data_kind not in kinds:
                continue
            t0 = time.perf_counter()
            try:
                est_ratio, est_theta = fn(dc, ctx)
            except Exception as exc:  # a failed classical fit is a result, not a crash
                say(f"  {name} failed: {exc}")
                est_ratio, est_theta = float("nan"), float("nan")
            dt = time.perf_counter() - t0
            res.ellipse.append({"method": name, "data": data_kind, "dose": cfg.ellipse_dose, "true_ratio": ratio,
                                "true_theta": theta, "ratio": est_ratio, "seconds": dt,
                                **ellipse_errors(est_ratio, est_theta, ratio, theta)})
    res.info = {
        "version": __version__,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                   f"{__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - t_start,
    }
    return res
