"""Input checks shared by the public entry points (clear errors, inputs never changed)."""

from __future__ import annotations

import numpy as np

__all__ = ["as_patterns", "as_datacube_array", "check_detector_mask"]


def as_patterns(data, name: str = "data", ndim: tuple[int, ...] = (2, 3, 4)) -> np.ndarray:
    """Return ``data`` as a float64 array after checking its dimensionality.

    NaN and Inf are replaced by 0 in the returned copy; the input is never changed.

    Parameters
    ----------
    data : array_like
        Pattern(s) with detector axes last.
    name : str
        Name used in error messages.
    ndim : tuple of int
        Allowed numbers of dimensions.

    Raises
    ------
    TypeError
        If ``data`` is not numeric.
    ValueError
        If the dimensionality is not allowed or a detector axis is shorter than 4.
    """
    arr = np.asarray(data)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {arr.shape}")
    if arr.ndim >= 2 and min(arr.shape[-2:]) < 4:
        raise ValueError(f"{name} detector axes must be >= 4 pixels, got shape {arr.shape}")
    out = arr.astype(np.float64, copy=True)
    bad = ~np.isfinite(out)
    if bad.any():
        out[bad] = 0.0
    return out


def as_datacube_array(datacube) -> np.ndarray:
    """Return the 4D data of a py4DSTEM DataCube (or a 4D array) without copying."""
    # a numpy array's own .data is its memory buffer, not the pattern data
    data = datacube if isinstance(datacube, np.ndarray) else getattr(datacube, "data", datacube)
    if not hasattr(data, "shape") or len(data.shape) != 4:
        raise ValueError(
            f"expected a py4DSTEM DataCube or a 4D array (R_Nx, R_Ny, Q_Nx, Q_Ny), got {type(datacube).__name__}"
            + (f" of shape {data.shape}" if hasattr(data, "shape") else "")
        )
    return data


def check_detector_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    """Return ``mask`` as an array after checking that it is boolean and of the detector ``shape``.

    Raises
    ------
    ValueError
        If it is not a boolean array of ``shape`` (Q_Nx, Q_Ny).
    """
    arr = np.asarray(mask)
    if arr.shape != tuple(shape) or arr.dtype != bool:
        raise ValueError(f"mask must be a boolean array of the detector shape {tuple(shape)}, "
                         f"got {arr.dtype} {arr.shape}")
    return arr
