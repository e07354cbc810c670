"""Units of the data: the same recording in other units, and noise-free patterns.

Counting detectors record whole electrons, but data reach a notebook normalised (by the
dose, the sum, the maximum) or scaled, and simulations come noise-free (abTEM's
intensities sum to 1 per pattern). Each crystal scan is given to py4DSTEM's
``get_origin`` and to PreNet (``preprocess(datacube)``, as a user runs it) as recorded
and in other units; the errors should not depend on the units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..baselines import get_origin
from ..simulation import Detector, simulate_datacube
from .benchmark import BENCHMARK_SEED
from .metrics import centre_errors, ellipse_errors

__all__ = ["UnitsConfig", "run_units_benchmark", "units_markdown"]

#: The variants of each scan, in table order (the noise-free ones for the first dose only).
COUNTS_VARIANTS = ("counts (as recorded)", "counts / dose (normalised, float32)", "counts x 50")
NOISE_FREE_VARIANTS = ("noise-free (expected counts)", "noise-free, normalised to sum 1")


@dataclass
class UnitsConfig:
    """What the units benchmark simulates.

    Attributes
    ----------
    doses : tuple of float
        Electrons per pattern of the crystal scans (one scan each); the first dose's
        scan also gives the noise-free variants.
    scan_shape, detector_shape : tuple of int
        Probe positions and detector pixels.
    ellipse : tuple of float
        (a/b, theta in radians) of the scans.
    seed : int
        Seed of the first scan.
    """

    doses: tuple = (1e3, 1e4, 1e5)
    scan_shape: tuple = (12, 12)
    detector_shape: tuple = (128, 128)
    ellipse: tuple = (1.02, 0.6)
    seed: int = BENCHMARK_SEED + 700_000

    @classmethod
    def quick(cls) -> "UnitsConfig":
        """A seconds-long configuration for tests."""
        return cls(doses=(1e4,), scan_shape=(3, 3), detector_shape=(96, 96))


def _variants(counts: np.ndarray, clean: np.ndarray | None, dose: float) -> dict[str, np.ndarray]:
    """The recording (and the noise-free patterns, when given) in each unit of the table, float32."""
    counts = np.asarray(counts, np.float32)
    out = dict(zip(COUNTS_VARIANTS, (counts, counts / np.float32(dose), counts * np.float32(50))))
    if clean is not None:
        clean = np.asarray(clean, np.float32)
        out.update(zip(NOISE_FREE_VARIANTS, (clean, clean / clean.sum(axis=(2, 3), keepdims=True))))
    return out


def run_units_benchmark(cfg: UnitsConfig | None = None, weights_dir: str | None = None,
                        progress: Callable[[str], None] | None = None) -> list[dict]:
    """Origins (and PreNet's ellipse) of crystal scans given in several units.

    Parameters
    ----------
    cfg : UnitsConfig, optional
        What to simulate (the default when None).
    weights_dir : str, optional
        Folder of retrained weights (the shipped ones when None).
    progress : callable, optional
        Called with a short message before each variant.

    Returns
    -------
    list of dict
        One row per method, variant and dose: 'method', 'data', 'dose', the centre
        errors of :func:`~py4dstem_prenet.evaluation.metrics.centre_errors` (px), and for
        PreNet 'ratio' (a/b) and the ellipse errors of
        :func:`~py4dstem_prenet.evaluation.metrics.ellipse_errors`.

    Raises
    ------
    ValueError
        If the configuration has no dose or a dose is not > 0.
    """
    import py4DSTEM

    from ..preprocess import preprocess

    cfg = cfg or UnitsConfig()
    if not cfg.doses or not all(d > 0 for d in cfg.doses):
        raise ValueError(f"doses must be one or more values > 0, got {cfg.doses!r}")
    say = progress or (lambda msg: None)
    rows = []
    for di, dose in enumerate(cfg.doses):
        dc, truth = simulate_datacube(cfg.scan_shape, cfg.detector_shape, "crystal", dose, cfg.ellipse,
                                      detector=Detector(), seed=cfg.seed + di)
        true_origin = truth.origin.reshape(-1, 2)
        for variant, data in _variants(dc.data, truth.clean if di == 0 else None, dose).items():
            say(f"{variant}, dose {dose:.0e}")
            cube = py4DSTEM.DataCube(data=data)
            qx0, qy0 = get_origin(cube)
            rows.append({"method": "py4DSTEM get_origin (default r)", "data": variant, "dose": dose,
                         **centre_errors(np.stack([qx0, qy0], -1).reshape(-1, 2), true_origin)})
            out = preprocess(cube, progress=False, weights_dir=weights_dir)
            a, b, theta = out.calibration.get_ellipse()
            origin = np.stack(out.calibration.get_origin(), -1).reshape(-1, 2)
            rows.append({"method": "PreNet preprocess (denoise, centre, ellipse)", "data": variant, "dose": dose,
                         **centre_errors(origin, true_origin), "ratio": a / b,
                         **ellipse_errors(a / b, theta, truth.ratio, truth.theta)})
    return rows


def units_markdown(rows: list[dict], cfg: UnitsConfig) -> str:
    """The rows of :func:`run_units_benchmark` as a markdown table with its legend."""
    lines = [
        f"Crystal scans of {tuple(cfg.scan_shape)} patterns on a {tuple(cfg.detector_shape)} detector "
        f"(a/b = {cfg.ellipse[0]:g}), the same recording in other units; noise-free: the expected counts "
        "without noise, as simulated and normalised to sum 1 per pattern (as abTEM gives them). Origin "
        "errors in px; PreNet's ellipse from the same run.",
        "",
        "| method | data | dose (e-/pattern) | mean | p99 | > 1 px | a/b | abs d(theta) deg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ell = f"{r['ratio']:.4f} | {r['d_theta_deg']:.2f}" if "ratio" in r else "- | -"
        lines.append(f"| {r['method']} | {r['data']} | {r['dose']:.0e} | {r['mean']:.3f} | {r['p99']:.2f} | "
                     f"{100 * r['fail']:.1f}% | {ell} |")
    return "\n".join(lines) + "\n"
