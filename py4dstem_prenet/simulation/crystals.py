"""Kinematic Bragg-spot lists from py4DSTEM's ``Crystal`` for a library of structures.

The library is built from fractional coordinates, atomic numbers and cell
parameters (no ase or pymatgen needed).  Spot lists are in reciprocal Angstroms,
relative to the transmitted beam, axes (qx, qy) as py4DSTEM returns them.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["STRUCTURES", "ZONE_AXES", "Structure", "kinematic_spots", "random_lattice_spots"]


@dataclass(frozen=True)
class Structure:
    """A crystal structure: fractional positions, atomic numbers and cell.

    Attributes
    ----------
    name : str
        Human-readable name.
    positions : tuple of tuple of float
        Fractional coordinates of the basis atoms.
    numbers : tuple of int
        Atomic numbers.
    cell : tuple of float
        (a, b, c, alpha, beta, gamma) in Angstrom and degrees.
    """

    name: str
    positions: tuple
    numbers: tuple
    cell: tuple


_FCC = ((0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5))
_BCC = ((0, 0, 0), (0.5, 0.5, 0.5))
_DIAMOND = _FCC + tuple(tuple(np.add(p, 0.25)) for p in _FCC)
_ROCKSALT_B = tuple(tuple(np.mod(np.add(p, (0.5, 0, 0)), 1)) for p in _FCC)
_HCP = ((1 / 3, 2 / 3, 0.25), (2 / 3, 1 / 3, 0.75))


def _cubic(a: float) -> tuple:
    return (a, a, a, 90.0, 90.0, 90.0)


def _hex(a: float, c: float) -> tuple:
    return (a, a, c, 90.0, 90.0, 120.0)


#: Structures used by the simulator (lattice parameters in Angstrom).
STRUCTURES: dict[str, Structure] = {
    s.name: s
    for s in [
        Structure("Cu", _FCC, (29,) * 4, _cubic(3.615)),
        Structure("Al", _FCC, (13,) * 4, _cubic(4.05)),
        Structure("Au", _FCC, (79,) * 4, _cubic(4.078)),
        Structure("Fe", _BCC, (26,) * 2, _cubic(2.866)),
        Structure("W", _BCC, (74,) * 2, _cubic(3.165)),
        Structure("Si", _DIAMOND, (14,) * 8, _cubic(5.431)),
        Structure("GaAs", _DIAMOND, (31,) * 4 + (33,) * 4, _cubic(5.653)),
        Structure("MgO", _FCC + _ROCKSALT_B, (12,) * 4 + (8,) * 4, _cubic(4.212)),
        Structure(
            "SrTiO3",
            ((0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)),
            (38, 22, 8, 8, 8),
            _cubic(3.905),
        ),
        Structure("Mg", _HCP, (12, 12), _hex(3.209, 5.211)),
        Structure("Ti", _HCP, (22, 22), _hex(2.951, 4.686)),
        Structure(
            "MoS2",
            ((1 / 3, 2 / 3, 0.25), (2 / 3, 1 / 3, 0.75), (1 / 3, 2 / 3, 0.621),
             (1 / 3, 2 / 3, 0.879), (2 / 3, 1 / 3, 0.121), (2 / 3, 1 / 3, 0.379)),
            (42, 42, 16, 16, 16, 16),
            _hex(3.16, 12.29),
        ),
    ]
}

#: Zone axes (lattice indices) tried for every structure.
ZONE_AXES: tuple = ((0, 0, 1), (0, 1, 1), (1, 1, 1), (1, 1, 2), (0, 1, 2), (1, 2, 3), (0, 1, 3))


@functools.lru_cache(maxsize=None)
def _crystal(name: str, k_max: float):
    from py4DSTEM.process.diffraction import Crystal

    s = STRUCTURES[name]
    crystal = Crystal(np.array(s.positions, float), np.array(s.numbers), np.array(s.cell, float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crystal.calculate_structure_factors(k_max)
    crystal.setup_diffraction(300e3)
    return crystal


@functools.lru_cache(maxsize=4096)
def _spots_cached(name: str, zone: tuple, k_max: float, sigma_excitation_error: float):
    crystal = _crystal(name, k_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl = crystal.generate_diffraction_pattern(
            zone_axis_lattice=np.array(zone, float),
            sigma_excitation_error=sigma_excitation_error,
            k_max=k_max,
        )
    d = pl.data
    return np.stack([d["qx"], d["qy"]], axis=1), np.asarray(d["intensity"], float)


def kinematic_spots(
    name: str,
    zone: tuple[int, int, int],
    k_max: float = 2.0,
    sigma_excitation_error: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """Kinematic Bragg spots of a library structure along a zone axis.

    Parameters
    ----------
    name : str
        Key of :data:`STRUCTURES`.
    zone : tuple of int
        Zone axis in lattice indices.
    k_max : float
        Largest scattering vector kept, 1/Angstrom.
    sigma_excitation_error : float
        Excitation-error tolerance, 1/Angstrom (larger: more spots, thinner foil).

    Returns
    -------
    g : numpy.ndarray
        Shape (K, 2), spot positions (qx, qy) in 1/Angstrom, the 000 beam included.
    intensity : numpy.ndarray
        Shape (K,), kinematic intensities (arbitrary units).
    """
    if name not in STRUCTURES:
        raise KeyError(f"unknown structure {name!r}; choose from {sorted(STRUCTURES)}")
    zone = tuple(int(z) for z in zone)
    if len(zone) != 3 or not any(zone):
        raise ValueError(f"zone must be three integers, not all zero, got {zone}")
    if not (k_max > 0):
        raise ValueError(f"k_max must be > 0, got {k_max}")
    g, inten = _spots_cached(name, zone, float(k_max), float(sigma_excitation_error))
    return g.copy(), inten.copy()


def random_lattice_spots(rng: np.random.Generator, g_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Spots of a random 2D reciprocal lattice, in units of the shortest basis vector.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    g_max : float
        Largest |g| kept, in units of the first basis vector's length.

    Returns
    -------
    g, intensity : numpy.ndarray
        Shapes (K, 2) and (K,), 000 beam included (intensity 0: the caller sets the
        transmitted beam).
    """
    if not (g_max > 0):
        raise ValueError(f"g_max must be > 0, got {g_max}")
    ang = rng.uniform(np.pi / 3, np.pi / 2)
    b_len = rng.uniform(1.0, 1.6)
    a1 = np.array([1.0, 0.0])
    a2 = b_len * np.array([np.cos(ang), np.sin(ang)])
    n = int(np.ceil(g_max / min(1.0, b_len * np.sin(ang)))) + 1
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    g = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    keep = np.hypot(g[:, 0], g[:, 1]) <= g_max
    g = g[keep]
    r = np.hypot(g[:, 0], g[:, 1])
    inten = np.exp(-r / rng.uniform(0.7, 2.5)) * rng.uniform(0.2, 1.0, len(g))
    inten[r == 0] = 0.0
    return g, inten
