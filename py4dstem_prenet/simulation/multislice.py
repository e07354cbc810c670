"""abTEM multislice bank: dynamical CBED patterns resampled onto a distorted detector.

The cost of multislice is dominated by the potential, so a bank is computed as
thickness series (``exit_planes``) x scan positions per potential. Each clean bank
pattern (fftshifted, zero beam at index N//2 on abTEM's angular grid) is then mapped
onto the detector through the same distortion path as the analytic patterns:
detector pixel ``p`` samples the bank at ``N//2 + D^-1 (p - origin) / scale``, so the
origin label is the exact geometric centre of the bright-field disk.

Needs the optional ``abtem`` extra (``pip install -e .[multislice]``).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from scipy import ndimage

from ..conventions import distortion_matrix

__all__ = ["BANK_STRUCTURES", "multislice_bank", "bank_to_detector", "simulate_multislice_datacube"]

#: Structures (ase.build.bulk names and cubic lattice parameters, Angstrom) for the bank.
BANK_STRUCTURES = {
    "Si": ("diamond", 5.431), "Cu": ("fcc", 3.615), "Au": ("fcc", 4.078), "Al": ("fcc", 4.05),
    "GaAs": ("zincblende", 5.653), "MgO": ("rocksalt", 4.212), "Fe": ("bcc", 2.866),
}


def _atoms(name: str, cells: int, thickness: float):
    import ase.build

    kind, a = BANK_STRUCTURES[name]
    if kind in ("zincblende", "rocksalt"):
        symbols = {"GaAs": "GaAs", "MgO": "MgO"}[name]
        unit = ase.build.bulk(symbols, kind, a=a, cubic=True)
    else:
        unit = ase.build.bulk(name, kind, a=a, cubic=True)
    nz = int(np.ceil(thickness / a))
    return unit * (cells, cells, nz)


def multislice_bank(
    name: str = "Si",
    thickness: float = 300.0,
    exit_every: float = 50.0,
    scan_gpts: int = 3,
    energy: float = 200e3,
    semiangle: float = 3.0,
    cells: int = 5,
    sampling: float = 0.12,
) -> dict:
    """Compute clean CBED patterns of a [001] crystal with abTEM.

    Parameters
    ----------
    name : str
        Key of :data:`BANK_STRUCTURES`.
    thickness : float
        Largest thickness, Angstrom.
    exit_every : float
        Thickness step of the exit planes, Angstrom (2 A slices).
    scan_gpts : int
        Probe positions per side inside one unit cell.
    energy : float
        Beam energy, eV.
    semiangle : float
        Probe convergence semi-angle, mrad (sets the disk radius).
    cells : int
        Lateral unit cells of the supercell (sets the angular pixel).
    sampling : float
        Real-space sampling, Angstrom.

    Returns
    -------
    dict
        ``patterns`` (M, N, N) float32 clean intensities (each sums to ~1),
        ``thickness`` (M,) Angstrom (exit-plane index x ``exit_every``), ``disk_radius``
        (bank pixels), ``mrad_per_px``.
    """
    import abtem

    if name not in BANK_STRUCTURES:
        raise KeyError(f"unknown structure {name!r}; choose from {sorted(BANK_STRUCTURES)}")
    if not (thickness > 0 and exit_every > 0 and scan_gpts >= 1 and semiangle > 0):
        raise ValueError("thickness, exit_every, semiangle must be > 0 and scan_gpts >= 1")
    atoms = _atoms(name, cells, thickness)
    a = BANK_STRUCTURES[name][1]
    slice_t = 2.0
    pot = abtem.Potential(atoms, sampling=sampling, slice_thickness=slice_t, projection="infinite",
                          exit_planes=max(1, int(round(exit_every / slice_t))))
    probe = abtem.Probe(energy=energy, semiangle_cutoff=semiangle)
    probe.grid.match(pot)
    scan = abtem.GridScan(start=(0, 0), end=(a, a), gpts=(scan_gpts, scan_gpts), endpoint=False)
    meas = probe.scan(pot, scan=scan, detectors=abtem.PixelatedDetector(max_angle="cutoff"))
    with contextlib.redirect_stderr(io.StringIO()):
        res = meas.compute()
    arr = np.asarray(res.array, np.float32)  # (planes, sx, sy, N, N)
    n_planes = arr.shape[0]
    thick = np.repeat(np.arange(n_planes) * exit_every, scan_gpts * scan_gpts)  # one per pattern
    pats = arr.reshape(-1, *arr.shape[-2:])
    keep = thick > 0  # drop the entrance plane
    mrad = float(res.angular_sampling[0])
    return {
        "patterns": pats[keep],
        "thickness": thick[keep],
        "disk_radius": semiangle / mrad,
        "mrad_per_px": mrad,
    }


def bank_to_detector(
    pattern: np.ndarray,
    shape: tuple[int, int],
    origin: tuple[float, float],
    scale: float,
    ratio: float = 1.0,
    theta: float = 0.0,
) -> np.ndarray:
    """Map a bank pattern onto the detector through the origin and the ellipse.

    Parameters
    ----------
    pattern : numpy.ndarray
        (N, M) fftshifted clean pattern, zero beam at (N//2, M//2).
    shape : tuple of int
        Detector shape.
    origin : tuple of float
        Where the zero beam lands, detector pixels.
    scale : float
        Detector pixels per bank pixel (> 0).
    ratio, theta : float
        Elliptical distortion (py4DSTEM convention).

    Returns
    -------
    numpy.ndarray
        (Q_Nx, Q_Ny) float64 non-negative intensity.
    """
    if not (scale > 0):
        raise ValueError(f"scale must be > 0, got {scale}")
    dinv = np.linalg.inv(distortion_matrix(ratio, theta))
    gx = np.arange(shape[0], dtype=float)[:, None] - origin[0]
    gy = np.arange(shape[1], dtype=float)[None, :] - origin[1]
    qx = (dinv[0, 0] * gx + dinv[0, 1] * gy) / scale + pattern.shape[0] // 2
    qy = (dinv[1, 0] * gx + dinv[1, 1] * gy) / scale + pattern.shape[1] // 2
    src = pattern
    if scale < 1:  # downsampling: low-pass first to avoid aliasing
        src = ndimage.gaussian_filter(pattern, 0.5 / scale)
    out = ndimage.map_coordinates(src, [qx, qy], order=1, mode="constant", cval=0.0)
    return np.clip(out, 0, None)


def simulate_multislice_datacube(
    bank: dict,
    scan_shape: tuple[int, int] = (12, 12),
    detector_shape: tuple[int, int] = (128, 128),
    dose: float = 1e4,
    ellipse: tuple[float, float] = (1.02, 0.6),
    disk_radius: float = 8.0,
    descan_amplitude: float = 3.0,
    detector=None,
    seed: int | None = 0,
    compute_crlb: bool = False,
):
    """A scan of dynamical (multislice) patterns with descan, ellipse and noise.

    Each probe position takes a random bank pattern (thickness and position in the
    cell vary across the scan, as over a wedge or a bent crystal).

    Parameters
    ----------
    bank : dict
        From :func:`multislice_bank`.
    scan_shape, detector_shape : tuple of int
        Scan and detector sizes.
    dose : float
        Electrons per pattern.
    ellipse : tuple of float
        (a/b, theta radians).
    disk_radius : float
        Bright-field disk radius on the detector, pixels (sets the scale).
    descan_amplitude : float
        Peak-to-peak descan drift, pixels.
    detector : Detector, optional
        Detector model (counting, no defects by default).
    seed : int or None
        Random seed.
    compute_crlb : bool
        Also compute the Cramer-Rao bound of every origin.

    Returns
    -------
    datacube : py4DSTEM.DataCube
    truth : SimulationTruth
        ``scene`` is None (the content is the bank's).
    """
    import py4DSTEM

    from ..evaluation.crlb import translation_crlb
    from .datacube import SimulationTruth
    from .descan import descan_origin
    from .detector import Detector

    if not (dose > 0 and disk_radius > 0):
        raise ValueError("dose and disk_radius must be > 0")
    rng = np.random.default_rng(seed)
    det = detector or Detector()
    shape = tuple(int(s) for s in detector_shape)
    ratio, theta = ellipse
    origin = descan_origin(rng, scan_shape, shape, descan_amplitude, 0.5, 0.05)
    scale = disk_radius / bank["disk_radius"]
    hot, dead = det.defect_masks(rng, shape)
    clean = np.empty(tuple(scan_shape) + shape, np.float32)
    noisy = np.empty_like(clean)
    crlb = np.full(tuple(scan_shape) + (2,), np.nan)
    good = ~(hot | dead)  # pixels that carry information about the origin
    for rx in range(scan_shape[0]):
        for ry in range(scan_shape[1]):
            pattern = bank["patterns"][rng.integers(len(bank["patterns"]))]
            img = bank_to_detector(pattern, shape, origin[rx, ry], scale, ratio, theta)
            norm = dose / img.sum()
            electrons = img * norm
            clean[rx, ry] = det.expected_counts(electrons)
            noisy[rx, ry] = det.record(electrons, rng, hot, dead)
            if compute_crlb:
                crlb[rx, ry] = translation_crlb(
                    lambda c, p=pattern, k=norm: bank_to_detector(p, shape, c, scale, ratio, theta) * k * good,
                    origin[rx, ry], det.gain, det.read_noise)
    truth = SimulationTruth(origin=origin, ratio=float(ratio), theta=float(theta) % np.pi, clean=clean,
                            dose=float(dose), scene=None, transmission=np.ones(shape), hot=hot, dead=dead,
                            detector=det, crlb=crlb, disk_radius=float(disk_radius))
    return py4DSTEM.DataCube(data=noisy), truth
