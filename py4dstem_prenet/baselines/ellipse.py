"""py4DSTEM's classical elliptical-distortion calibrations behind one interface.

Every function returns ``(ratio, theta)``: the axis ratio a/b >= 1 and the angle of
the a semi-axis in radians (mod pi, from the qx axis), so that
``calibration.set_ellipse((ratio, 1, theta))`` corrects the data (see
:mod:`py4dstem_prenet.conventions`).

An ellipse is a property of the projector optics: estimate it from many patterns
(the origin-aligned mean pattern, or Bragg vectors pooled over the scan).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .._validation import as_datacube_array, as_patterns
from .origin import _quiet

__all__ = [
    "aligned_mean_pattern",
    "ellipse_fit_1d",
    "ellipse_amorphous_ring",
    "ellipse_from_bragg_vectors",
    "bragg_vector_map",
]


def _canonical(a: float, b: float, theta: float) -> tuple[float, float]:
    if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0):
        raise RuntimeError(f"ellipse fit failed (a={a}, b={b})")
    if a < b:
        a, b, theta = b, a, theta + np.pi / 2
    return float(a / b), float(np.mod(theta, np.pi))


def _check_fit_region(image: np.ndarray, center, fitradii) -> None:
    if np.shape(center) != (2,) or not np.all(np.isfinite(center)):
        raise ValueError(f"center must be two finite numbers, got {center}")
    if np.shape(fitradii) != (2,) or not (0 <= fitradii[0] < fitradii[1]):
        raise ValueError(f"fitradii must be (inner, outer) with 0 <= inner < outer, got {fitradii}")


def aligned_mean_pattern(datacube, qx0: np.ndarray, qy0: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Mean pattern after shifting every pattern onto the mean origin.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube or numpy.ndarray
        4D data.
    qx0, qy0 : numpy.ndarray
        (R_Nx, R_Ny) origin, pixels.

    Returns
    -------
    mean : numpy.ndarray
        (Q_Nx, Q_Ny) mean of the aligned patterns.
    centre : tuple of float
        The mean origin, where the aligned mean is centred.
    """
    data = as_datacube_array(datacube)
    qx0 = np.asarray(qx0, float)
    qy0 = np.asarray(qy0, float)
    if qx0.shape != tuple(data.shape[:2]) or qy0.shape != qx0.shape:
        raise ValueError(f"origin maps must have the scan shape {tuple(data.shape[:2])}, got {qx0.shape}, {qy0.shape}")
    cx, cy = float(np.mean(qx0)), float(np.mean(qy0))
    acc = np.zeros(data.shape[2:])
    for rx in range(data.shape[0]):
        for ry in range(data.shape[1]):
            dp = as_patterns(data[rx, ry], ndim=(2,))
            acc += ndimage.shift(dp, (cx - qx0[rx, ry], cy - qy0[rx, ry]), order=1, mode="nearest")
    return acc / (data.shape[0] * data.shape[1]), (cx, cy)


def ellipse_fit_1d(image: np.ndarray, center: tuple[float, float], fitradii: tuple[float, float],
                   mask: np.ndarray | None = None) -> tuple[float, float]:
    """py4DSTEM ``fit_ellipse_1D``: an elliptical curve fitted to a ring in an annulus.

    Parameters
    ----------
    image : numpy.ndarray
        (Q_Nx, Q_Ny) pattern holding a ring (mean pattern or Bragg-vector map).
    center : tuple of float
        Approximate centre, pixels.
    fitradii : tuple of float
        Inner and outer radius of the annulus holding one ring, pixels (hand-chosen).
    mask : numpy.ndarray, optional
        Boolean, True where pixels are ignored.

    Returns
    -------
    ratio, theta : float
    """
    from py4DSTEM.process.calibration.ellipse import fit_ellipse_1D

    image = as_patterns(image, "image", (2,))
    _check_fit_region(image, center, fitradii)
    with _quiet():
        _, _, a, b, theta = fit_ellipse_1D(image, center, fitradii, mask)
    return _canonical(a, b, theta)


def ellipse_amorphous_ring(image: np.ndarray, center: tuple[float, float], fitradii: tuple[float, float],
                           mask: np.ndarray | None = None) -> tuple[float, float]:
    """py4DSTEM ``fit_ellipse_amorphous_ring``: a double-sided Gaussian ring model.

    Parameters
    ----------
    image : numpy.ndarray
        (Q_Nx, Q_Ny) pattern with an amorphous halo.
    center : tuple of float
        Approximate centre, pixels.
    fitradii : tuple of float
        Annulus holding the halo, pixels (hand-chosen).
    mask : numpy.ndarray, optional
        Boolean, True where pixels are used (py4DSTEM's convention for this fit).

    Returns
    -------
    ratio, theta : float
    """
    from py4DSTEM.process.calibration.ellipse import fit_ellipse_amorphous_ring

    image = as_patterns(image, "image", (2,))
    _check_fit_region(image, center, fitradii)
    with _quiet():
        (_, _, a, b, theta), _ = fit_ellipse_amorphous_ring(image, center, fitradii, mask=mask)
    return _canonical(a, b, theta)


def bragg_vector_map(
    datacube, qx0: np.ndarray, qy0: np.ndarray, probe_radius: float,
    min_relative_intensity: float = 0.02, edge_boundary: int = 4,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Origin-centred map of Bragg vectors from py4DSTEM ``find_Bragg_disks``.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube or numpy.ndarray
        4D data.
    qx0, qy0 : numpy.ndarray
        (R_Nx, R_Ny) origin used to centre the vectors, pixels.
    probe_radius : float
        Disk radius for the sigmoid-edge template, pixels (hand-chosen).
    min_relative_intensity : float
        py4DSTEM's ``minRelativeIntensity``.
    edge_boundary : int
        py4DSTEM's ``edgeBoundary``, pixels.

    Returns
    -------
    bvm : numpy.ndarray
        (Q_Nx, Q_Ny) intensity-weighted histogram of the vectors, bilinear.
    centre : tuple of float
        Where the origin sits in ``bvm``.
    """
    import py4DSTEM

    data = as_datacube_array(datacube)
    if not (probe_radius > 0):
        raise ValueError(f"probe_radius must be > 0, got {probe_radius}")
    qshape = tuple(data.shape[2:])
    dc = datacube if isinstance(datacube, py4DSTEM.DataCube) else py4DSTEM.DataCube(data=np.asarray(data))
    with _quiet():
        probe = py4DSTEM.Probe.generate_synthetic_probe(probe_radius, 1.0, qshape)
        # origin=None: py4DSTEM centres the kernel on the synthetic probe's centre of mass
        kernel = probe.get_kernel(mode="sigmoid", origin=None, radii=(probe_radius, 2 * probe_radius))
        bv = dc.find_Bragg_disks(
            kernel, minRelativeIntensity=min_relative_intensity, minPeakSpacing=probe_radius,
            edgeBoundary=edge_boundary, maxNumPeaks=100, subpixel="poly",
        )
    centre = ((qshape[0] - 1) / 2, (qshape[1] - 1) / 2)
    xs, ys, ws = [], [], []
    for rx in range(data.shape[0]):
        for ry in range(data.shape[1]):
            v = bv.raw[rx, ry]
            xs.append(v.qx - qx0[rx, ry] + centre[0])
            ys.append(v.qy - qy0[rx, ry] + centre[1])
            ws.append(v.I)
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    bvm = np.zeros(qshape)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < qshape[0]) & (yi >= 0) & (yi < qshape[1])
        np.add.at(bvm, (xi[ok], yi[ok]), (w * wt)[ok])
    return bvm, centre


def ellipse_from_bragg_vectors(
    datacube, qx0: np.ndarray, qy0: np.ndarray, probe_radius: float, fitradii: tuple[float, float],
) -> tuple[float, float]:
    """Ellipse from Bragg vectors pooled over the scan (py4DSTEM ``fit_p_ellipse`` route).

    ``fit_p_ellipse`` fits ``fit_ellipse_1D`` to the Bragg-vector map; this does the
    same without plotting. Valid for polycrystalline or multi-grain data: the lattice
    of one single-crystal orientation cannot tell an ellipse from a strain.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube or numpy.ndarray
        4D data.
    qx0, qy0 : numpy.ndarray
        (R_Nx, R_Ny) origin, pixels.
    probe_radius : float
        Disk radius for the template, pixels.
    fitradii : tuple of float
        Annulus around one ring of Bragg vectors, pixels from the origin.

    Returns
    -------
    ratio, theta : float
    """
    bvm, centre = bragg_vector_map(datacube, qx0, qy0, probe_radius)
    return ellipse_fit_1d(bvm, centre, fitradii)
