"""Reading blocks of patterns from any array-like, opening files, and writing EMD safely.

- :func:`read_block` reads a run of scan positions from a numpy array, a memory map,
  an h5py dataset or a dask array, touching only the positions it needs.
- :func:`open_datacube` opens anything py4DSTEM reads (EMD/HDF5, Merlin .mib, .dm4,
  EMPAD, ...), in memory or file-backed (``mem="MEMMAP"``: an h5py dataset or a
  memory map, so that data larger than memory are never loaded whole).
- :class:`EMDWriter` writes a result DataCube chunk by chunk to ``PATH.partial`` and
  renames it to ``PATH`` only when complete. Per-block results and a record of the
  finished blocks live in the partial file, so an interrupted run resumes where it
  stopped; the final file is a normal EMD 1.0 file that ``py4DSTEM.read`` opens with
  the calibration in place.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

__all__ = ["read_block", "open_datacube", "EMDWriter", "find_datacube_group", "fill_value"]

#: Group of the partial file holding the work in progress.
_WORK = "prenet_partial"


def read_block(data, i0: int, i1: int) -> np.ndarray:
    """Patterns ``i0:i1`` of a 4D array-like, in scan (row-major) order.

    Parameters
    ----------
    data : array_like
        (R_Nx, R_Ny, Q_Nx, Q_Ny) numpy array, memory map, h5py dataset or dask array.
    i0, i1 : int
        First and one-past-last flat scan index, ``0 <= i0 < i1 <= R_Nx * R_Ny``.

    Returns
    -------
    numpy.ndarray
        (i1 - i0, Q_Nx, Q_Ny) in the data's dtype. Only those positions are read,
        as one contiguous slice per scan row.
    """
    nrx, nry = int(data.shape[0]), int(data.shape[1])
    if not 0 <= i0 < i1 <= nrx * nry:
        raise ValueError(f"block {i0}:{i1} outside a scan of {nrx * nry} positions")
    parts = [data[r, c0:c1] for r, c0, c1 in _row_segments(nry, i0, i1)]
    if hasattr(parts[0], "compute"):  # dask: one graph for the whole block
        import dask.array as da

        return np.asarray(da.concatenate(parts).compute())
    return np.concatenate([np.asarray(p) for p in parts])


def _row_segments(nry: int, i0: int, i1: int) -> list[tuple[int, int, int]]:
    """(row, first column, one-past-last column) runs covering flat scan indices i0:i1."""
    segments = []
    i = i0
    while i < i1:
        r, c0 = divmod(i, nry)
        c1 = min(nry, c0 + (i1 - i))
        segments.append((r, c0, c1))
        i += c1 - c0
    return segments


def fill_value(dtype) -> float:
    """Value of results not yet computed: NaN for floats, -1 for integers."""
    return np.nan if np.issubdtype(dtype, np.floating) else -1


def find_datacube_group(f: h5py.File) -> str:
    """Path of the first DataCube group of an EMD 1.0 file (raises ValueError if none)."""
    found: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and obj.attrs.get("python_class") == "DataCube" and not found:
            found.append(name)

    f.visititems(visit)
    if not found:
        raise ValueError(f"{f.filename} holds no py4DSTEM DataCube")
    return found[0]


def _plain_hdf5_datacube(f: h5py.File, dataset: str | None, mem: str):
    """A DataCube from a 4D dataset (or one with extra length-1 axes) of a non-EMD HDF5 file."""
    import py4DSTEM

    if dataset is None:
        found: list[tuple[int, str]] = []
        f.visititems(lambda name, obj: found.append((obj.size, name)) if isinstance(obj, h5py.Dataset)
                     and sum(s > 1 for s in obj.shape) in (3, 4) and obj.ndim >= 4 else None)
        if not found:
            raise ValueError(f"{f.filename} holds no 4D dataset; name one with dataset=")
        dataset = max(found)[1]
    dset = f[dataset]
    squeeze = [i for i in range(dset.ndim - 4) if dset.shape[2 + i] == 1] if dset.ndim > 4 else []
    if dset.ndim - len(squeeze) != 4:
        raise ValueError(f"{f.filename}:{dataset} has shape {dset.shape}; need (R_Nx, R_Ny, Q_Nx, Q_Ny)")
    if mem == "RAM":
        data = np.asarray(dset)
    else:
        import dask.array as da

        data = da.from_array(dset, chunks=(1, 1, *dset.shape[2:]))
    if squeeze:
        data = data.reshape(*dset.shape[:2], *dset.shape[-2:])
    return py4DSTEM.DataCube(data=data, name=dataset.split("/")[-1])


def open_datacube(path: str, mem: str = "RAM", dataset: str | None = None, scan: tuple[int, int] | None = None):
    """Open a 4D-STEM file as a py4DSTEM DataCube.

    Parameters
    ----------
    path : str
        An EMD/HDF5 file written by py4DSTEM, or any format py4DSTEM's
        ``import_file`` reads (Merlin .mib, Gatan .dm3/.dm4, EMPAD .raw, K2 .gtg,
        Arina, abTEM .h5, ...).
        A plain (non-EMD) HDF5 file works too: its largest 4D dataset is used
        (extra length-1 axes, as in fpd files, are dropped).
    mem : {'RAM', 'MEMMAP'}
        'MEMMAP' keeps the data on disk (an h5py dataset for EMD, a lazy dask array
        for plain HDF5, a memory map otherwise); the file stays open while the
        DataCube lives.
    dataset : str, optional
        Path of the dataset inside a plain HDF5 file (default: the largest 4D one).
    scan : tuple of int, optional
        (R_Nx, R_Ny) for formats that may not store it (a Merlin .mib without its
        .hdr file).

    Returns
    -------
    py4DSTEM.DataCube
        A single pattern (an SAED image) becomes a 1 x 1 scan, a frame series a
        1 x N scan.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is corrupt, truncated, or holds no 4D DataCube.
    """
    import py4DSTEM
    from emdfile import Metadata
    from py4DSTEM.data import Calibration

    if mem not in ("RAM", "MEMMAP"):
        raise ValueError(f"mem must be 'RAM' or 'MEMMAP', got {mem!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if h5py.is_hdf5(path):
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise ValueError(f"{path} is not a readable HDF5 file ({exc})") from None
        try:
            is_emd = "emd_group_type" in json.dumps({k: list(f[k].attrs) for k in f})
            if not is_emd:
                dc = _plain_hdf5_datacube(f, dataset, mem)
                if mem == "RAM":
                    f.close()
            elif mem == "RAM":
                f.close()
                dc = py4DSTEM.read(path)
            else:
                grp = find_datacube_group(f)
                cal_path = grp.split("/")[0] + "/metadatabundle/calibration"
                cal = Calibration.from_h5(f[cal_path]) if cal_path in f else None
                dc = py4DSTEM.DataCube(data=f[grp + "/data"], name=grp.split("/")[-1], calibration=cal)
                md_path = grp + "/metadatabundle"
                for name in (f[md_path] if md_path in f else []):
                    dc.metadata = Metadata.from_h5(f[md_path + "/" + name])
        except (OSError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{path} is corrupt or truncated ({exc})") from None
    else:
        try:
            dc = py4DSTEM.import_file(path, mem=mem, **({"scan": tuple(scan)} if scan is not None else {}))
        except Exception as exc:  # the readers raise anything from AssertionError to struct.error
            raise ValueError(f"py4DSTEM cannot read {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(dc, py4DSTEM.DataCube):
        data = getattr(dc, "data", None)
        if data is None or len(data.shape) not in (2, 3):
            raise ValueError(f"{path} holds no diffraction data py4DSTEM can read (got {type(dc).__name__})")
        # one pattern (SAED, a single frame) -> 1x1 scan; a frame series -> 1xN scan
        dc = py4DSTEM.DataCube(data=data.reshape((1,) * (4 - len(data.shape)) + tuple(data.shape)))
    if len(dc.data.shape) != 4:
        raise ValueError(f"{path} does not hold 4D data (shape {dc.data.shape})")
    return dc


class EMDWriter:
    """Chunk-by-chunk, resumable writer of a result DataCube to an EMD 1.0 file.

    Parameters
    ----------
    path : str
        Final output file. Work goes to ``path + '.partial'``; ``path`` appears only
        when :meth:`finish` succeeds.
    shape : tuple of int
        (R_Nx, R_Ny, Q_Nx, Q_Ny) of the result.
    n_blocks : int
        Number of blocks the scan is cut into.
    fingerprint : dict
        JSON-able description of the input and options. A partial file is resumed
        only if its fingerprint is identical; otherwise it is started afresh.
    overwrite : bool
        Replace an existing ``path`` (at :meth:`finish`, never before).

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """

    def __init__(self, path: str, shape: tuple[int, int, int, int], n_blocks: int, fingerprint: dict,
                 overwrite: bool = False):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        self.path = str(path)
        self.partial = self.path + ".partial"
        self.shape = tuple(int(s) for s in shape)
        self._fp = json.dumps(fingerprint, sort_keys=True)
        self.resumed_blocks = 0
        f = None
        if os.path.exists(self.partial):
            try:
                f = h5py.File(self.partial, "a")
                ok = (_WORK in f and f[_WORK].attrs.get("fingerprint") == self._fp
                      and f[_WORK + "/data"].shape == self.shape and f[_WORK + "/done"].shape == (n_blocks,))
            except (OSError, KeyError):
                ok = False
            if not ok:
                if f is not None:
                    f.close()
                f = None
                os.remove(self.partial)
        if f is None:
            f = h5py.File(self.partial, "w")
            g = f.create_group(_WORK)
            g.attrs["fingerprint"] = self._fp
            g.create_dataset("data", shape=self.shape, dtype=np.float32, chunks=(1, 1, *self.shape[2:]))
            g.create_dataset("done", shape=(n_blocks,), dtype=bool)
        else:
            self.resumed_blocks = int(np.count_nonzero(f[_WORK + "/done"][()]))
        self._f = f

    @property
    def done(self) -> np.ndarray:
        """(n_blocks,) bool: blocks already written."""
        return self._f[_WORK + "/done"][()]

    def write(self, k: int, i0: int, i1: int, result: dict[str, np.ndarray]) -> None:
        """Store block ``k`` (flat scan indices ``i0:i1``): patterns and per-pattern results."""
        g = self._f[_WORK]
        data = g["data"]
        block = result["data"]
        j = 0
        for r, c0, c1 in _row_segments(self.shape[1], i0, i1):
            data[r, c0:c1] = block[j:j + c1 - c0]
            j += c1 - c0
        n = self.shape[0] * self.shape[1]
        for key, val in result.items():
            if key == "data":
                continue
            if key not in g:
                g.create_dataset(key, shape=(n, *val.shape[1:]), dtype=val.dtype, fillvalue=fill_value(val.dtype))
            g[key][i0:i1] = val
        g["done"][k] = True
        self._f.flush()

    def results(self) -> dict[str, np.ndarray]:
        """Per-pattern results of all blocks written so far, (R_Nx * R_Ny, ...) each."""
        g = self._f[_WORK]
        return {k: g[k][()] for k in g if k not in ("data", "done")}

    @property
    def data(self) -> h5py.Dataset:
        """The result patterns written so far (R_Nx, R_Ny, Q_Nx, Q_Ny), on disk."""
        return self._f[_WORK + "/data"]

    def finish(self, skeleton) -> None:
        """Complete the file: the EMD tree of ``skeleton`` around the written data, then rename.

        Parameters
        ----------
        skeleton : py4DSTEM.DataCube
            A DataCube with the final name, calibration and metadata, whose data
            is any small placeholder of the same detector size (it is not stored).
        """
        import py4DSTEM

        if not bool(np.all(self.done)):
            raise RuntimeError(f"{int(np.count_nonzero(~self.done))} blocks of {self.partial} are not written")
        tree = self.path + ".tree.partial"
        py4DSTEM.save(tree, skeleton, mode="o")
        with h5py.File(tree, "r") as src:
            grp = find_datacube_group(src)
            root = grp.split("/")[0]
            for name in list(self._f):
                if name != _WORK:
                    del self._f[name]
            src.copy(src[root], self._f, name=root)
            self._f.attrs.update(dict(src.attrs))
        units = self._f[grp + "/data"].attrs.get("units", "pixel intensity")
        del self._f[grp + "/data"]
        self._f.move(_WORK + "/data", grp + "/data")
        self._f[grp + "/data"].attrs["units"] = units
        del self._f[_WORK]
        self._f.close()
        os.remove(tree)
        os.replace(self.partial, self.path)

    def close(self) -> None:
        """Close the partial file, leaving it for a later resume."""
        if self._f.id.valid:
            self._f.close()
