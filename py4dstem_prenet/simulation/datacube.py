"""Simulated 4D-STEM scans and single training patterns with exact ground truth."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..evaluation.crlb import translation_crlb
from .descan import descan_origin
from .detector import Detector, beam_stop_mask, scale_to_dose
from .patterns import KINDS, Scene, random_scene, render, speckle

#: Bright-field disk radii of :func:`simulate_patterns`' wide geometry, fractions of the
#: detector's smaller size (log-uniform): a selected-area direct beam of a few pixels on a
#: 1k detector to a convergent-beam disk of a third of the detector.
WIDE_RADIUS = (0.015, 0.3)
#: Largest origin offset from the detector centre of the wide geometry, fraction of each size.
WIDE_OFFSET = 0.3

__all__ = [
    "SimulationTruth",
    "simulate_datacube",
    "simulate_patterns",
    "random_ellipse",
    "random_detector",
]


@dataclass
class SimulationTruth:
    """Exact labels of a simulated scan.

    Attributes
    ----------
    origin : numpy.ndarray
        (R_Nx, R_Ny, 2) geometric centre of the bright-field disk (qx0, qy0), pixels.
    ratio, theta : float
        Elliptical distortion a/b and angle (radians); py4DSTEM's
        ``calibration.set_ellipse((ratio, 1, theta))`` undoes it.
    clean : numpy.ndarray
        (R_Nx, R_Ny, Q_Nx, Q_Ny) float32 expected counts (no noise, no defects).
    dose : float
        Electrons per pattern before the beam stop.
    scene : Scene
        Ideal-frame content (position-independent part).
    transmission : numpy.ndarray
        (Q_Nx, Q_Ny) beam-stop transmission (all ones without a beam stop).
    hot, dead : numpy.ndarray
        (Q_Nx, Q_Ny) boolean defect masks.
    detector : Detector
        Detector parameters.
    crlb : numpy.ndarray
        (R_Nx, R_Ny, 2) Cramer-Rao bound of the origin's standard deviation along
        qx and qy, pixels (NaN unless computed).
    disk_radius : float
        Bright-field disk radius, pixels (before the elliptical stretch).
    rotation : float
        Rotation applied to the ideal pattern, radians.
    """

    origin: np.ndarray
    ratio: float
    theta: float
    clean: np.ndarray
    dose: float
    scene: Scene
    transmission: np.ndarray
    hot: np.ndarray
    dead: np.ndarray
    detector: Detector
    crlb: np.ndarray
    disk_radius: float = float("nan")
    rotation: float = 0.0

    @property
    def ellipse(self) -> tuple[float, float, float]:
        """(a, b, theta) in py4DSTEM's convention, with b = 1."""
        return (self.ratio, 1.0, self.theta)


def random_ellipse(rng: np.random.Generator, max_excess: float = 0.06) -> tuple[float, float]:
    """Draw (a/b, theta) with weight at small ellipticities (real a/b is 1.00-1.04).

    Half the draws have a/b - 1 log-uniform in [1e-3, max_excess], a quarter
    uniform in [0, max_excess], a quarter exactly round (a/b = 1).
    """
    u = rng.random()
    if u < 0.5:
        excess = np.exp(rng.uniform(np.log(1e-3), np.log(max_excess)))
    elif u < 0.75:
        excess = rng.uniform(0, max_excess)
    else:
        excess = 0.0
    return 1.0 + excess, rng.uniform(0, np.pi)


def random_detector(rng: np.random.Generator) -> Detector:
    """Draw a detector: counting (gain 1) or integrating, with occasional defects."""
    counting = rng.random() < 0.5
    return Detector(
        gain=1.0 if counting else float(np.exp(rng.uniform(np.log(0.5), np.log(20)))),
        read_noise=0.0 if counting else float(rng.uniform(0, 2.0)),
        background=0.0 if counting else float(rng.uniform(0, 5.0)),
        hot_fraction=float(rng.choice([0.0, 0.0, 1e-4, 5e-4])),
        hot_level=float(rng.uniform(1.0, 20.0)),
        dead_fraction=float(rng.choice([0.0, 0.0, 1e-4, 1e-3])),
    )


def _validate_common(detector_shape, dose) -> tuple[int, int]:
    if len(detector_shape) != 2 or min(detector_shape) < 16:
        raise ValueError(f"detector_shape must be two sizes >= 16, got {detector_shape}")
    if not (np.isfinite(dose) and dose > 0):
        raise ValueError(f"dose must be finite and > 0 electrons per pattern, got {dose}")
    return int(detector_shape[0]), int(detector_shape[1])


def simulate_datacube(
    scan_shape: tuple[int, int] = (16, 16),
    detector_shape: tuple[int, int] = (128, 128),
    kind: str = "crystal",
    dose: float = 1e4,
    ellipse: tuple[float, float] | None = (1.02, 0.5),
    descan_amplitude: float = 3.0,
    descan_curvature: float = 0.5,
    jitter: float = 0.05,
    detector: Detector | None = None,
    beam_stop: bool = False,
    beam_stop_offset: float = 0.0,
    thickness_variation: float = 0.3,
    disk_radius: float | None = None,
    scene: Scene | None = None,
    seed: int | None = 0,
    compute_crlb: bool = False,
    rotation: float = 0.0,
    line_jitter: float = 0.0,
    flyback: float = 0.0,
    ripple: float = 0.0,
):
    """Simulate a 4D-STEM scan with descan drift, elliptical distortion and noise.

    Parameters
    ----------
    scan_shape : tuple of int
        (R_Nx, R_Ny) probe positions.
    detector_shape : tuple of int
        (Q_Nx, Q_Ny) detector pixels, any sizes >= 16 (square or not).
    kind : str
        Pattern family, one of :data:`~py4dstem_prenet.simulation.patterns.KINDS`.
    dose : float
        Electrons per pattern (1e2 to 1e6 covers practice).
    ellipse : tuple of float or None
        (a/b, theta in radians); None draws a random one.
    descan_amplitude, descan_curvature, jitter : float
        Descan plane drift (peak-to-peak), curvature and per-position jitter, pixels.
    detector : Detector, optional
        Detector model; a counting detector with 5 hot pixels per 1e4 by default.
    beam_stop : bool
        Put a rod-shaped beam stop over the bright-field disk.
    beam_stop_offset : float
        Distance of the stop's round tip from the scan's mean origin, as a fraction
        of the tip's radius (0 to 1), in a random direction: a stop put in by hand
        is not centred on the beam. 0 by default (centred).
    thickness_variation : float
        Relative modulation of Bragg-disk intensities and disk textures across the
        scan (thickness and tilt changes; moves the centre of mass, not the edge).
    disk_radius : float, optional
        Bright-field disk radius in pixels (random when None).
    scene : Scene, optional
        Use this scene instead of drawing one.
    seed : int or None
        Seed of the random generator.
    compute_crlb : bool
        Also compute the Cramer-Rao bound of every origin (four extra renders per
        pattern), stored in ``truth.crlb``.
    rotation : float
        Rotation of the diffraction pattern relative to the scan axes, radians
        (counter-clockwise from qx towards qy), applied to the ideal pattern before
        the elliptical distortion: ``p = origin + D R(rotation) q``.
    line_jitter, flyback, ripple : float
        Rough descan, pixels: scan-row offsets, the lag of each row's first positions,
        a mains oscillation in time (see
        :func:`~py4dstem_prenet.simulation.descan.descan_origin`). 0 by default.

    Returns
    -------
    datacube : py4DSTEM.DataCube
        Recorded counts, float32, shape (R_Nx, R_Ny, Q_Nx, Q_Ny).
    truth : SimulationTruth
        Exact labels.

    Examples
    --------
    >>> dc, truth = simulate_datacube((4, 4), (64, 64), dose=1e3, seed=1)
    >>> dc.data.shape, truth.origin.shape
    ((4, 4, 64, 64), (4, 4, 2))
    """
    import py4DSTEM

    shape = _validate_common(detector_shape, dose)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(scan_shape) != 2 or min(scan_shape) < 1:
        raise ValueError(f"scan_shape must be two sizes >= 1, got {scan_shape}")
    if thickness_variation < 0:
        raise ValueError("thickness_variation must be >= 0")
    if not 0 <= beam_stop_offset <= 1:
        raise ValueError(f"beam_stop_offset must be in [0, 1] (a fraction of the stop's tip radius), got "
                         f"{beam_stop_offset}")
    rng = np.random.default_rng(seed)
    if detector is None:
        detector = Detector(hot_fraction=5e-4, hot_level=10.0)
    ratio, theta = ellipse if ellipse is not None else random_ellipse(rng)
    if not (0.8 <= ratio <= 1.25):
        raise ValueError(f"ellipse a/b must be in [0.8, 1.25], got {ratio}")
    if scene is None:
        scene = random_scene(rng, shape, kind, disk_radius)
    if rotation:
        c, s_ = np.cos(rotation), np.sin(rotation)
        scene = replace(scene, spots=scene.spots @ np.array([[c, -s_], [s_, c]]).T)
    origin = descan_origin(rng, scan_shape, shape, descan_amplitude, descan_curvature, jitter,
                           line_jitter=line_jitter, flyback=flyback, ripple=ripple)
    hot, dead = detector.defect_masks(rng, shape)
    transmission = np.ones(shape)
    if beam_stop:
        tip = origin.reshape(-1, 2).mean(axis=0)
        tip_radius = 1.3 * scene.disk_radius + descan_amplitude / 2
        direction, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.2) * scene.disk_radius
        if beam_stop_offset:  # drawn only then: centred stops keep their random streams
            phi = rng.uniform(0, 2 * np.pi)
            tip = tip + beam_stop_offset * tip_radius * np.array([np.cos(phi), np.sin(phi)])
        transmission = beam_stop_mask(shape, tip, tip_radius, direction, width)

    nrx, nry = scan_shape
    su = np.linspace(0, 1, nrx)[:, None] * np.ones((1, nry))
    sv = np.linspace(0, 1, nry)[None, :] * np.ones((nrx, 1))
    phases = rng.uniform(0, 2 * np.pi, (4,))
    freq = rng.uniform(0.5, 2.0, 2)
    thick = 1 + thickness_variation * np.sin(2 * np.pi * (freq[0] * su + freq[1] * sv) + phases[0])
    k = len(scene.spots)
    dynamic = scene.kind in ("crystal", "mixed")
    tex_dir = rng.normal(0, thickness_variation if dynamic else 0.0, (k, 3))

    clean = np.empty((nrx, nry) + shape, np.float32)
    crlb = np.full((nrx, nry, 2), np.nan)
    seen = transmission * ~(hot | dead)  # pixels that carry information about the origin
    noisy = np.empty((nrx, nry) + shape, np.float32)
    for rx in range(nrx):
        for ry in range(nry):
            t = thick[rx, ry]
            inten = scene.spot_intensity.copy()
            inten[1:] *= t
            s = replace(scene, spot_intensity=inten,
                        texture=scene.texture + tex_dir * np.sin(2 * np.pi * (su[rx, ry] - sv[rx, ry]) + phases[1]))
            field_ = speckle(rng, shape, scene.speckle_length) if scene.speckle > 0 else None
            img = render(s, shape, origin[rx, ry], ratio, theta, field_)
            norm = dose / img.sum()
            electrons = img * norm * transmission
            if compute_crlb:
                crlb[rx, ry] = translation_crlb(
                    lambda c, s=s, f=field_, k=norm: render(s, shape, c, ratio, theta, f) * k * seen,
                    origin[rx, ry], detector.gain, detector.read_noise)
            clean[rx, ry] = detector.expected_counts(electrons)
            noisy[rx, ry] = detector.record(electrons, rng, hot, dead)
    truth = SimulationTruth(
        origin=origin, ratio=float(ratio), theta=float(theta) % np.pi, clean=clean, dose=float(dose),
        scene=scene, transmission=transmission, hot=hot, dead=dead, detector=detector, crlb=crlb,
        disk_radius=float(scene.disk_radius), rotation=float(rotation),
    )
    return py4DSTEM.DataCube(data=noisy), truth


def simulate_patterns(
    n: int,
    detector_shape: tuple[int, int] = (128, 128),
    rng: np.random.Generator | None = None,
    dose_range: tuple[float, float] = (1e2, 1e6),
    kinds: tuple[str, ...] | None = None,
    beam_stop_probability: float = 0.1,
    max_origin_offset: float = 0.15,
    bank: dict | list | None = None,
    bank_fraction: float = 0.0,
    bright_fraction: float = 0.0,
    wide_fraction: float = 0.0,
) -> dict[str, np.ndarray]:
    """Draw independent random training patterns with exact labels.

    Every pattern has its own scene, origin, ellipse, dose and detector.

    Parameters
    ----------
    n : int
        Number of patterns.
    detector_shape : tuple of int
        (Q_Nx, Q_Ny).
    rng : numpy.random.Generator, optional
        Random source (a fresh unseeded one when None).
    dose_range : tuple of float
        Electrons per pattern, drawn log-uniformly.
    kinds : tuple of str, optional
        Restrict the pattern families.
    beam_stop_probability : float
        Probability that a pattern has a beam stop.
    max_origin_offset : float
        Largest origin offset from the detector centre, fraction of each size.
    bank : dict or list of dict, optional
        abTEM multislice bank(s) (:func:`~py4dstem_prenet.simulation.multislice.multislice_bank`);
        a fraction ``bank_fraction`` of the patterns is drawn from them, scaled to a random
        disk radius and mapped through the same origin/ellipse/detector path.
    bank_fraction : float
        Fraction of patterns drawn from ``bank``.
    bright_fraction : float
        Fraction of crystal patterns whose brightest Bragg disk is rescaled to 1-3x
        the bright-field disk (thick or strongly diffracting crystals, where
        argmax-based centring fails).
    wide_fraction : float
        Fraction of patterns drawn from a wider geometry: the bright-field disk radius
        log-uniform in WIDE_RADIUS (fractions of ``min(detector_shape)``; the others:
        0.03-0.1) and the origin up to WIDE_OFFSET of each size off centre (the others:
        ``max_origin_offset``). It covers the small direct beam of selected-area
        patterns on large detectors, the large disks of wide convergence angles, and
        beams far off centre.

    Returns
    -------
    dict
        ``noisy`` and ``clean`` (n, Q_Nx, Q_Ny) float32 counts, ``origin`` (n, 2),
        ``ratio`` and ``theta`` (n,), ``dose`` (n,), ``disk_radius`` (n,) and
        ``gain`` (n,).
    """
    shape = _validate_common(detector_shape, 1.0)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lo, hi = dose_range
    if not (0 < lo <= hi):
        raise ValueError(f"dose_range must satisfy 0 < low <= high, got {dose_range}")
    rng = np.random.default_rng() if rng is None else rng
    out = {
        "noisy": np.empty((n,) + shape, np.float32),
        "clean": np.empty((n,) + shape, np.float32),
        "origin": np.empty((n, 2)),
        "ratio": np.empty(n),
        "theta": np.empty(n),
        "dose": np.empty(n),
        "disk_radius": np.empty(n),
        "gain": np.empty(n),
    }
    centre = (np.asarray(shape, float) - 1) / 2
    if bank is not None and not (0 <= bank_fraction <= 1):
        raise ValueError(f"bank_fraction must be in [0, 1], got {bank_fraction}")
    banks = [bank] if isinstance(bank, dict) else list(bank or [])
    if not (0 <= wide_fraction <= 1):
        raise ValueError(f"wide_fraction must be in [0, 1], got {wide_fraction}")
    for i in range(n):
        wide = wide_fraction > 0 and rng.random() < wide_fraction
        offset = WIDE_OFFSET if wide else max_origin_offset
        origin = centre + rng.uniform(-offset, offset, 2) * np.asarray(shape)
        ratio, theta = random_ellipse(rng)
        dose = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        det = random_detector(rng)
        wide_radius = min(shape) * float(np.exp(rng.uniform(*np.log(WIDE_RADIUS)))) if wide else None
        if banks and rng.random() < bank_fraction:
            from .multislice import bank_to_detector

            b = banks[rng.integers(len(banks))]
            radius = wide_radius if wide else rng.uniform(0.03, 0.1) * min(shape)
            pattern = b["patterns"][rng.integers(len(b["patterns"]))]
            img = bank_to_detector(pattern, shape, origin, radius / b["disk_radius"], ratio, theta)
        else:
            kind = str(rng.choice(kinds)) if kinds else None
            scene = random_scene(rng, shape, kind, wide_radius)
            if len(scene.spots) > 1 and rng.random() < bright_fraction:
                inten = scene.spot_intensity.copy()
                inten[1:] *= rng.uniform(1.0, 3.0) / max(inten[1:].max(), 1e-12)
                scene.spot_intensity = inten
            field_ = speckle(rng, shape, scene.speckle_length) if scene.speckle > 0 else None
            img = render(scene, shape, origin, ratio, theta, field_)
            radius = scene.disk_radius
        electrons = scale_to_dose(img, dose)
        if rng.random() < beam_stop_probability:
            electrons = electrons * beam_stop_mask(
                shape, origin + rng.normal(0, 1, 2), 1.2 * radius,
                rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.2) * radius,
            )
        hot, dead = det.defect_masks(rng, shape)
        out["clean"][i] = det.expected_counts(electrons)
        out["noisy"][i] = det.record(electrons, rng, hot, dead)
        out["origin"][i] = origin
        out["ratio"][i], out["theta"][i] = ratio, theta
        out["dose"][i] = dose
        out["disk_radius"][i] = radius
        out["gain"][i] = det.gain
    return out
