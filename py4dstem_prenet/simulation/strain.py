"""Simulated scans with a known strain field, grains, descan and elliptical distortion.

A 2D crystal (an oblique lattice, so that no in-plane rotation maps it onto itself)
is deformed at every probe position by ``F = R(omega) (I + eps)``: its reciprocal
basis becomes ``F^-T g``. Grains differ by their in-plane rotation; a strip of
amorphous support film (a ring, no Bragg disks) runs along the first scan rows, as
on a real specimen edge. Each pattern is rendered through the same projector
distortion and descan as :func:`~py4dstem_prenet.simulation.simulate_datacube`,
so the labels (origin, ellipse, true reciprocal basis per position) are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .descan import descan_origin
from .detector import Detector
from .patterns import Scene, render

__all__ = ["StrainTruth", "simulate_strain_datacube", "REFERENCE_BASIS"]

#: Reciprocal basis (g1, g2) of the unstrained crystal at a 128-pixel detector,
#: pixels in (qx, qy); scaled with the detector size.
REFERENCE_BASIS = np.array([[17.0, 3.0], [-5.0, 19.0]])


def _rotation(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s], [s, c]])


@dataclass
class StrainTruth:
    """Exact labels of a strain scan.

    Attributes
    ----------
    origin : numpy.ndarray
        (R_Nx, R_Ny, 2) origin (qx0, qy0), pixels.
    ratio, theta : float
        Elliptical distortion a/b and angle (rad), py4DSTEM convention.
    grain : numpy.ndarray
        (R_Nx, R_Ny) int: grain number, -1 for the amorphous strip.
    grain_rotation : tuple of float
        In-plane rotation of each grain, radians.
    strain : numpy.ndarray
        (R_Nx, R_Ny, 2, 2) symmetric small strain ``eps`` applied to the real-space
        lattice, in (qx, qy) axes.
    g1g2 : numpy.ndarray
        (R_Nx, R_Ny, 2, 2) true reciprocal basis [g1, g2] in the undistorted,
        origin-centred frame, pixels (NaN in the amorphous strip).
    basis : numpy.ndarray
        (2, 2) unstrained, unrotated reciprocal basis [g1, g2], pixels.
    reference : numpy.ndarray
        (R_Nx, R_Ny) bool: the unstrained region of grain 0 used as the strain reference.
    disk_radius : float
        Disk radius, pixels.
    ring_radius : float
        Radius of the amorphous ring in the undistorted frame, pixels.
    dose : float
        Electrons per pattern.
    """

    origin: np.ndarray
    ratio: float
    theta: float
    grain: np.ndarray
    grain_rotation: tuple
    strain: np.ndarray
    g1g2: np.ndarray
    basis: np.ndarray
    reference: np.ndarray
    disk_radius: float
    ring_radius: float
    dose: float

    @property
    def ellipse(self) -> tuple[float, float, float]:
        """(a/b, 1, theta) for ``calibration.set_ellipse``."""
        return (self.ratio, 1.0, self.theta)


def simulate_strain_datacube(
    scan_shape: tuple[int, int] = (16, 16),
    detector_shape: tuple[int, int] = (128, 128),
    dose: float = 1e5,
    ellipse: tuple[float, float] = (1.03, 0.5),
    grain_rotation_deg: tuple[float, ...] = (0.0, 30.0),
    tensile: float = 0.01,
    shear: float = 0.005,
    descan_amplitude: float = 3.0,
    amorphous_rows: int = 2,
    bright_disks: bool = False,
    detector: Detector | None = None,
    seed: int = 0,
):
    """Simulate a strain-mapping scan with exact labels.

    Parameters
    ----------
    scan_shape : tuple of int
        (R_Nx, R_Ny) probe positions (R_Nx >= amorphous_rows + 4, R_Ny >= 2).
    detector_shape : tuple of int
        (Q_Nx, Q_Ny) pixels; the lattice and disks scale with min(Q_Nx, Q_Ny) / 128.
    dose : float
        Electrons per pattern.
    ellipse : tuple of float
        (a/b, theta in radians).
    grain_rotation_deg : tuple of float
        In-plane rotation of each grain, degrees; grains are vertical bands of the
        scan (columns), grain 0 first.
    tensile : float
        Uniaxial strain eps_xx (along qx, the scan rows' direction) in the lower half
        of the scan.
    shear : float
        Peak eps_xy of a shear gradient across the columns of the lower half.
    descan_amplitude : float
        Peak-to-peak descan drift, pixels (plus curvature and jitter).
    amorphous_rows : int
        Scan rows of amorphous film (a ring around the bright-field disk).
    bright_disks : bool
        Make the first-order Bragg disks 1.5x brighter per pixel than the
        bright-field disk (where py4DSTEM's get_origin fails).
    detector : Detector, optional
        Detector model (a counting detector without defects by default).
    seed : int
        Seed of the random generator.

    Returns
    -------
    datacube : py4DSTEM.DataCube
        Recorded counts, float32.
    truth : StrainTruth
    """
    import py4DSTEM

    nrx, nry = (int(s) for s in scan_shape)
    if nrx < amorphous_rows + 4 or nry < 2:
        raise ValueError(f"scan_shape must be at least ({amorphous_rows + 4}, 2), got {scan_shape}")
    if dose <= 0 or not np.isfinite(dose):
        raise ValueError(f"dose must be > 0, got {dose}")
    h, w = (int(s) for s in detector_shape)
    if min(h, w) < 64:
        raise ValueError(f"detector must be at least 64 x 64 pixels, got {detector_shape}")
    rng = np.random.default_rng(seed)
    detector = detector or Detector()
    scale = min(h, w) / 128
    basis = REFERENCE_BASIS * scale
    radius = 4.0 * scale
    g_max = 0.36 * min(h, w)
    ij = np.array([(i, j) for i in range(-6, 7) for j in range(-6, 7) if (i, j) != (0, 0)])
    ratio, theta = ellipse
    origin = descan_origin(rng, (nrx, nry), (h, w), descan_amplitude, 0.25 * descan_amplitude, 0.05,
                           centre_offset=0.03)

    rows = np.arange(nrx)[:, None] * np.ones((1, nry), int)
    cols = np.ones((nrx, 1), int) * np.arange(nry)[None, :]
    n_grains = len(grain_rotation_deg)
    grain = np.minimum(cols * n_grains // nry, n_grains - 1)
    grain[rows < amorphous_rows] = -1
    lower = rows >= amorphous_rows + (nrx - amorphous_rows) // 2
    strain = np.zeros((nrx, nry, 2, 2))
    strain[..., 0, 0] = np.where(lower, tensile, 0.0)
    exy = np.where(lower, shear * cols / max(nry - 1, 1), 0.0)
    strain[..., 0, 1] = strain[..., 1, 0] = exy
    reference = (grain == 0) & ~lower
    g1g2 = np.full((nrx, nry, 2, 2), np.nan)

    hot, dead = detector.defect_masks(rng, (h, w))
    data = np.empty((nrx, nry, h, w), np.float32)
    ring = np.array([[0.55 * g_max, 2.5 * scale, 0.08]])
    for rx in range(nrx):
        for ry in range(nry):
            k = grain[rx, ry]
            if k < 0:
                scene = Scene(disk_radius=radius, spots=np.zeros((1, 2)), rings=ring, diffuse=(0.02, 20 * scale),
                              kind="amorphous")
            else:
                f = _rotation(np.radians(grain_rotation_deg[k])) @ (np.eye(2) + strain[rx, ry])
                g = basis @ np.linalg.inv(f)  # rows g1, g2 -> F^-T g
                g1g2[rx, ry] = g
                spots = ij @ g
                keep = np.hypot(spots[:, 0], spots[:, 1]) < g_max
                spots = spots[keep]
                order = np.abs(ij[keep]).max(axis=1)
                inten = np.where(order == 1, 1.5 if bright_disks else 0.5, 0.5 / order)
                scene = Scene(disk_radius=radius, spots=np.vstack([[0, 0], spots]),
                              spot_intensity=np.r_[1.0, inten], diffuse=(0.02, 20 * scale), kind="crystal")
            img = render(scene, (h, w), origin[rx, ry], ratio, theta)
            electrons = img * (dose / img.sum())
            data[rx, ry] = detector.record(electrons, rng, hot, dead)
    truth = StrainTruth(origin=origin, ratio=float(ratio), theta=float(theta) % np.pi, grain=grain,
                        grain_rotation=tuple(np.radians(grain_rotation_deg)), strain=strain, g1g2=g1g2,
                        basis=basis, reference=reference, disk_radius=radius, ring_radius=float(ring[0, 0]),
                        dose=float(dose))
    return py4DSTEM.DataCube(data=data), truth
