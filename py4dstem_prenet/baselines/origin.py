"""py4DSTEM's classical origin (descan) calibrations behind one interface.

Each function takes a DataCube (or a 4D array) and returns ``(qx0, qy0)``, two
(R_Nx, R_Ny) arrays in pixels (qx = rows), without touching the input's calibration.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from .._validation import as_datacube_array

__all__ = ["get_origin", "get_origin_friedel", "fit_origin"]


@contextlib.contextmanager
def _quiet():
    """Silence py4DSTEM's progress bars, prints and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _as_datacube(datacube):
    import py4DSTEM

    data = as_datacube_array(datacube)
    if isinstance(datacube, py4DSTEM.DataCube):
        return datacube
    return py4DSTEM.DataCube(data=np.asarray(data))


def get_origin(datacube, r: float | None = None, rscale: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """py4DSTEM ``get_origin``: blurred argmax, then centre of mass in a disk of ``rscale r``.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube or numpy.ndarray
        4D data (R_Nx, R_Ny, Q_Nx, Q_Ny).
    r : float, optional
        Bright-field disk radius, pixels; py4DSTEM estimates it from the maximum
        pattern when None (its default, hand-tuned in practice).
    rscale : float
        Mask radius for the centre of mass, in units of r.

    Returns
    -------
    qx0, qy0 : numpy.ndarray
        (R_Nx, R_Ny) origin, pixels.
    """
    from py4DSTEM.process.calibration.origin import get_origin as _get_origin

    dc = _as_datacube(datacube)
    if r is not None and not (r > 0):
        raise ValueError(f"r must be > 0, got {r}")
    with _quiet():
        qx0, qy0, _ = _get_origin(dc, r=r, rscale=rscale)
    return np.asarray(qx0, float), np.asarray(qy0, float)


def get_origin_friedel(datacube, mask: np.ndarray | None = None, upsample_factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """py4DSTEM ``get_origin_friedel``: the centre of Friedel (inversion) symmetry.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube or numpy.ndarray
        4D data.
    mask : numpy.ndarray, optional
        Boolean (Q_Nx, Q_Ny), False under a beam stop.
    upsample_factor : int
        Sub-pixel upsampling of the correlation peak.

    Returns
    -------
    qx0, qy0 : numpy.ndarray
        (R_Nx, R_Ny) origin, pixels.
    """
    from py4DSTEM.process.calibration.origin import get_origin_friedel as _friedel

    dc = _as_datacube(datacube)
    if upsample_factor < 1:
        raise ValueError(f"upsample_factor must be >= 1, got {upsample_factor}")
    with _quiet():
        qx0, qy0 = _friedel(dc, mask=mask, upsample_factor=int(upsample_factor))
    return np.asarray(qx0, float), np.asarray(qy0, float)


def fit_origin(
    qx0: np.ndarray, qy0: np.ndarray, fitfunction: str = "parabola", robust: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """py4DSTEM ``fit_origin``: a smooth descan model fitted to measured origins.

    Parameters
    ----------
    qx0, qy0 : numpy.ndarray
        (R_Nx, R_Ny) measured origin, pixels.
    fitfunction : {'plane', 'parabola', 'bezier_two', 'constant'}
        Descan model.
    robust : bool
        Refit after discarding outliers (py4DSTEM's robust mode).

    Returns
    -------
    qx0_fit, qy0_fit : numpy.ndarray
        (R_Nx, R_Ny) fitted origin, pixels.
    """
    from py4DSTEM.process.calibration.origin import fit_origin as _fit_origin

    qx0 = np.asarray(qx0, float)
    qy0 = np.asarray(qy0, float)
    if qx0.ndim != 2 or qx0.shape != qy0.shape:
        raise ValueError(f"qx0 and qy0 must be 2D arrays of one shape, got {qx0.shape} and {qy0.shape}")
    if fitfunction not in ("plane", "parabola", "bezier_two", "constant"):
        raise ValueError(f"unknown fitfunction {fitfunction!r}")
    if not (np.all(np.isfinite(qx0)) and np.all(np.isfinite(qy0))):
        raise ValueError("measured origins must be finite")
    if fitfunction != "constant" and min(qx0.shape) < 3:
        fitfunction = "constant" if qx0.size < 3 else "plane"
    with _quiet():
        qx0_fit, qy0_fit, _, _ = _fit_origin((qx0, qy0), fitfunction=fitfunction, robust=robust)
    return np.asarray(qx0_fit, float), np.asarray(qy0_fit, float)

