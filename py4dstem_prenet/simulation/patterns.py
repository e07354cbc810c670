"""Analytic rendering of clean diffraction patterns with exact geometric labels.

A :class:`Scene` describes what the specimen scatters, in the *ideal* (undistorted)
diffraction plane, in pixels relative to the origin: disks (the bright-field disk and
Bragg disks, each an image of the circular condenser aperture), rings (amorphous or
polycrystalline) and a diffuse background.  :func:`render` maps it onto the detector
through the projector distortion ``p = origin + D q`` (see
:mod:`py4dstem_prenet.conventions`), so the origin label is the geometric centre of
the bright-field disk and the ellipse label is exact.

Intensity inside a disk may vary ("thickness-like" texture): that moves the disk's
centre of mass but not its edge, as dynamical scattering does in thick crystals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..conventions import distortion_matrix
from .crystals import STRUCTURES, ZONE_AXES, kinematic_spots, random_lattice_spots

__all__ = ["Scene", "render", "random_scene", "speckle", "KINDS"]

#: Pattern families the simulator draws from.
KINDS = ("crystal", "amorphous", "polycrystalline", "vacuum", "mixed")


@dataclass
class Scene:
    """Content of one clean pattern in the ideal diffraction plane.

    Attributes
    ----------
    disk_radius : float
        Radius of every disk (the condenser aperture image), pixels.
    edge_width : float
        Width of the disk edge ramp, pixels (partial coherence, detector PSF).
    spots : numpy.ndarray
        (K, 2) disk centres (qx, qy), pixels relative to the origin; row 0 is the
        bright-field disk at (0, 0).
    spot_intensity : numpy.ndarray, optional
        (K,) intensity per pixel of each disk, arbitrary units (all 1 when None).
    texture : numpy.ndarray, optional
        (K, 3) intensity variation inside each disk: linear gradients along qx and
        qy, and a radial (quadratic) term, as fractions of the mean (0 when None).
    rings : numpy.ndarray
        (M, 3) ring radius (px), Gaussian width (px) and peak intensity.
    speckle : float
        Speckle contrast of the rings, 0 (smooth) to 1 (fully developed).
    speckle_length : float
        Speckle correlation length, pixels.
    diffuse : tuple of float
        (amplitude, decay length in px) of an exponential diffuse background.
    kind : str
        One of :data:`KINDS` (for bookkeeping).
    """

    disk_radius: float
    edge_width: float = 1.0
    spots: np.ndarray = field(default_factory=lambda: np.zeros((1, 2)))
    spot_intensity: np.ndarray | None = None
    texture: np.ndarray | None = None
    rings: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    speckle: float = 0.0
    speckle_length: float = 2.0
    diffuse: tuple = (0.0, 10.0)
    kind: str = "vacuum"

    def __post_init__(self) -> None:
        if not (self.disk_radius > 0):
            raise ValueError(f"disk_radius must be > 0, got {self.disk_radius}")
        if not (self.edge_width > 0):
            raise ValueError(f"edge_width must be > 0, got {self.edge_width}")
        self.spots = np.asarray(self.spots, float).reshape(-1, 2)
        k = len(self.spots)
        if self.spot_intensity is None:
            self.spot_intensity = np.ones(k)
        if self.texture is None:
            self.texture = np.zeros((k, 3))
        self.spot_intensity = np.asarray(self.spot_intensity, float).reshape(k)
        self.texture = np.asarray(self.texture, float).reshape(k, 3)
        self.rings = np.asarray(self.rings, float).reshape(-1, 3)
        if not (0.0 <= self.speckle <= 1.0):
            raise ValueError(f"speckle must be in [0, 1], got {self.speckle}")


def _check_geometry(shape, origin, ratio) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 4:
        raise ValueError(f"detector shape must be two sizes >= 4, got {shape}")
    if not np.all(np.isfinite(origin)) or np.shape(origin) != (2,):
        raise ValueError(f"origin must be two finite numbers, got {origin}")
    if not (0.5 < ratio < 2.0):
        raise ValueError(f"ellipse ratio a/b must be in (0.5, 2), got {ratio}")
    return int(shape[0]), int(shape[1])


def render(
    scene: Scene,
    shape: tuple[int, int],
    origin: tuple[float, float],
    ratio: float = 1.0,
    theta: float = 0.0,
    speckle_field: np.ndarray | None = None,
) -> np.ndarray:
    """Render a clean pattern on the detector.

    Parameters
    ----------
    scene : Scene
        Pattern content in the ideal frame.
    shape : tuple of int
        Detector shape (Q_Nx, Q_Ny), pixels.
    origin : tuple of float
        Geometric centre of the bright-field disk (qx0, qy0), pixels.
    ratio, theta : float
        Elliptical distortion a/b and angle (radians), py4DSTEM convention.
    speckle_field : numpy.ndarray, optional
        Positive field of mean 1 multiplying the rings (see :func:`speckle`), defined
        in the ideal frame on a grid centred on the origin, so that it moves with the
        pattern; sampled bilinearly with periodic wrap.

    Returns
    -------
    numpy.ndarray
        (Q_Nx, Q_Ny) float64 image, arbitrary intensity units, non-negative.
    """
    nx, ny = _check_geometry(shape, origin, ratio)
    origin = np.asarray(origin, float)
    dmat = distortion_matrix(ratio, theta)
    dinv = np.linalg.inv(dmat)
    img = np.zeros(nx * ny)

    # Disks: vectorised over fixed-size patches around each disk.
    r, w = scene.disk_radius, scene.edge_width
    centres = origin + scene.spots @ dmat.T
    reach = r * max(ratio, 1.0) + w + 1.0
    inside = (
        (centres[:, 0] > -reach) & (centres[:, 0] < nx - 1 + reach)
        & (centres[:, 1] > -reach) & (centres[:, 1] < ny - 1 + reach)
        & (scene.spot_intensity > 0)
    )
    if np.any(inside):
        c = centres[inside]
        half = int(np.ceil(reach))
        grid = np.arange(-half, half + 1)
        tl = np.floor(c).astype(int)
        px = tl[:, 0, None, None] + grid[None, :, None]
        py = tl[:, 1, None, None] + grid[None, None, :]
        dx = px - c[:, 0, None, None]
        dy = py - c[:, 1, None, None]
        qx = dinv[0, 0] * dx + dinv[0, 1] * dy
        qy = dinv[1, 0] * dx + dinv[1, 1] * dy
        d = np.sqrt(qx * qx + qy * qy)
        val = np.clip((r - d) / w + 0.5, 0.0, 1.0)
        tex = scene.texture[inside]
        mod = (
            1.0
            + tex[:, 0, None, None] * qx / r
            + tex[:, 1, None, None] * qy / r
            + tex[:, 2, None, None] * ((d / r) ** 2 - 0.5)
        )
        val *= np.clip(mod, 0.0, None) * scene.spot_intensity[inside, None, None]
        ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny) & (val > 0)
        img += np.bincount((px * ny + py)[ok], weights=val[ok], minlength=nx * ny)
    img = img.reshape(nx, ny)

    need_radius = len(scene.rings) or scene.diffuse[0] > 0
    if need_radius:
        gx = np.arange(nx, dtype=float)[:, None] - origin[0]
        gy = np.arange(ny, dtype=float)[None, :] - origin[1]
        qx = dinv[0, 0] * gx + dinv[0, 1] * gy
        qy = dinv[1, 0] * gx + dinv[1, 1] * gy
        rr = np.sqrt(qx * qx + qy * qy)
        if len(scene.rings):
            ring_img = np.zeros((nx, ny))
            for radius, width, amp in scene.rings:
                ring_img += amp * np.exp(-0.5 * ((rr - radius) / width) ** 2)
            if speckle_field is not None and scene.speckle > 0:
                c = (np.asarray(speckle_field.shape, float) - 1) / 2
                field_ = ndimage.map_coordinates(speckle_field, [qx + c[0], qy + c[1]], order=1, mode="grid-wrap")
                ring_img *= (1.0 - scene.speckle) + scene.speckle * field_
            img += ring_img
        if scene.diffuse[0] > 0:
            img += scene.diffuse[0] * np.exp(-rr / scene.diffuse[1])
    return img


def speckle(rng: np.random.Generator, shape: tuple[int, int], length: float) -> np.ndarray:
    """Fully developed speckle of mean 1 with correlation length ``length`` pixels."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), length) + 1j * ndimage.gaussian_filter(
        rng.standard_normal(shape), length
    )
    inten = np.abs(field_) ** 2
    return inten / inten.mean()


def _texture(rng: np.random.Generator, k: int, strength: float) -> np.ndarray:
    return rng.normal(0.0, strength, (k, 3))


def random_scene(
    rng: np.random.Generator,
    shape: tuple[int, int],
    kind: str | None = None,
    disk_radius: float | None = None,
) -> Scene:
    """Draw a random scene of a given family.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    shape : tuple of int
        Detector shape; sizes scale with ``min(shape)``.
    kind : str, optional
        One of :data:`KINDS`; random when None.
    disk_radius : float, optional
        Bright-field disk radius in pixels; random in [0.03, 0.1] x min(shape) when
        None.

    Returns
    -------
    Scene
    """
    if kind is None:
        kind = str(rng.choice(KINDS, p=[0.45, 0.15, 0.15, 0.05, 0.2]))
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = float(min(shape))
    r = float(disk_radius) if disk_radius is not None else rng.uniform(0.03, 0.1) * n
    if not (r > 0):
        raise ValueError(f"disk_radius must be > 0, got {disk_radius}")
    w = rng.uniform(0.5, 1.5)
    spots = np.zeros((1, 2))
    inten = np.ones(1)
    rings = np.zeros((0, 3))
    diffuse = (rng.uniform(0.0, 0.05), rng.uniform(0.05, 0.3) * n)
    spk, spk_len = 0.0, 2.0

    if kind in ("crystal", "mixed"):
        if rng.random() < 0.8:
            name = str(rng.choice(sorted(STRUCTURES)))
            zone = ZONE_AXES[rng.integers(len(ZONE_AXES))]
            g, gi = kinematic_spots(name, zone, k_max=2.5, sigma_excitation_error=float(rng.choice([0.01, 0.02, 0.04])))
            keep = np.hypot(g[:, 0], g[:, 1]) > 1e-9
            g, gi = g[keep], gi[keep]
        else:
            g, gi = random_lattice_spots(rng, g_max=8.0)
            keep = gi > 0
            g, gi = g[keep], gi[keep]
        if len(g):
            gmin = np.min(np.hypot(g[:, 0], g[:, 1]))
            # first-order spacing between 2.1 r (nearly touching) and 0.35 n
            spacing = rng.uniform(2.1 * r, max(2.2 * r, min(5.0 * r, 0.35 * n)))
            phi = rng.uniform(0, 2 * np.pi)
            rot = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
            g = (g / gmin * spacing) @ rot.T
            gi = (gi / gi.max()) ** rng.uniform(0.5, 1.0)
            # Bragg disks may outshine the transmitted beam (thick or strongly
            # diffracting crystals): that is what breaks argmax-based centring.
            gi = gi * np.exp(rng.uniform(np.log(0.02), np.log(1.5)))
            gi *= rng.uniform(0.6, 1.4, len(gi))
            spots = np.vstack([spots, g])
            inten = np.concatenate([inten, gi])
    ring_min = 1.5 * r + 3  # rings lie outside the bright-field disk; a large disk can push them off the detector
    if kind in ("amorphous", "mixed"):
        radius = rng.uniform(ring_min, max(ring_min, 0.42 * n))
        rings = np.array([[radius, rng.uniform(0.04, 0.15) * radius, rng.uniform(0.02, 0.3)]])
        spk, spk_len = rng.uniform(0.0, 1.0), rng.uniform(1.0, 3.0)
    if kind == "polycrystalline":
        name = str(rng.choice(sorted(STRUCTURES)))
        g, gi = kinematic_spots(name, (0, 0, 1), k_max=2.5)
        gl = np.hypot(g[:, 0], g[:, 1])
        radii = np.unique(np.round(gl[gl > 1e-9], 3))[:6]
        scale = rng.uniform(ring_min, max(ring_min, 0.3 * n)) / radii[0]
        amps = rng.uniform(0.05, 0.5, len(radii))
        widths = rng.uniform(0.6, 2.0, len(radii))
        rings = np.stack([radii * scale, widths, amps], axis=1)
        rings = rings[rings[:, 0] < 0.7 * n]
        spk, spk_len = rng.uniform(0.2, 1.0), rng.uniform(0.8, 2.0)
    inten[0] = 1.0
    strength = {"crystal": 0.3, "mixed": 0.3, "polycrystalline": 0.05, "amorphous": 0.05, "vacuum": 0.0}[kind]
    tex = _texture(rng, len(spots), rng.uniform(0.0, strength))
    return Scene(
        disk_radius=r,
        edge_width=w,
        spots=spots,
        spot_intensity=inten,
        texture=tex,
        rings=rings,
        speckle=spk,
        speckle_length=spk_len,
        diffuse=diffuse,
        kind=kind,
    )
