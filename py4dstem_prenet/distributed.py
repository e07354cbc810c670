"""Running PreNet block by block in this process or on a dask.distributed cluster.

:func:`map_blocks` is the one scheduler :func:`~py4dstem_prenet.preprocess` uses.
Without a client it runs the blocks here, one after the other. With a
``dask.distributed.Client`` the driver reads each block (so any array-like works: a
memory map, an h5py dataset, a dask array) and submits it to the workers, keeping
at most a few blocks per worker in flight, so that memory stays bounded on both
sides; results come back in block order and are reduced in that order, so the
output is the same as in one process up to float32 rounding (dask runs each worker
with one BLAS/OpenMP thread, which changes the order of sums inside convolutions:
about 1e-6 relative; bit-identical when the thread counts match). Each worker
loads the networks once and keeps them.

Pointing it at a cluster of several machines::

    # on the scheduler machine:  dask scheduler
    # on every worker machine:   dask worker tcp://SCHEDULER:8786 --nthreads 1 --nworkers 4
    from dask.distributed import Client
    client = Client("tcp://SCHEDULER:8786")
    out = prenet.preprocess(datacube, client=client)

Every worker needs py4dstem-prenet installed (the weights ship inside it); the input
file only needs to be readable by the driver. One thread per worker process is
best: torch parallelises inside each block.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

import numpy as np

from .engine import PreNet
from .storage import read_block

__all__ = ["map_blocks", "block_bounds"]


def block_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Flat scan index ranges [(i0, i1), ...] of ``n`` positions cut into batches."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    return [(i0, min(n, i0 + batch_size)) for i0 in range(0, n, batch_size)]


def _run(engine: PreNet, method: str, block: np.ndarray, *args) -> dict[str, np.ndarray]:
    """One block, here or on a worker (models are cached per process by :func:`load_model`)."""
    return getattr(engine, method)(block, *args)


def map_blocks(engine: PreNet, method: str, data, bounds: list[tuple[int, int]],
               extra: Callable[[int, int], tuple] | None = None, client=None, skip=None,
               in_flight_per_worker: int = 2) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Apply ``engine.<method>(block, *extra(i0, i1))`` to every block, in order.

    Parameters
    ----------
    engine : PreNet
        The per-block computation.
    method : {'run', 'polar_sums'}
        Which of its methods to call.
    data : array_like
        (R_Nx, R_Ny, Q_Nx, Q_Ny) patterns, read block by block with :func:`read_block`.
    bounds : list of (int, int)
        Flat scan index ranges, from :func:`block_bounds`.
    extra : callable, optional
        ``extra(i0, i1)`` -> further positional arguments for the block.
    client : dask.distributed.Client, optional
        Run on this cluster instead of in this process.
    skip : array_like of bool, optional
        Blocks to leave out (already done, when resuming).
    in_flight_per_worker : int
        Blocks submitted ahead per worker thread (bounds the memory in flight).

    Yields
    ------
    k, result
        Block number and its result dict, in increasing ``k``.
    """
    todo = [k for k in range(len(bounds)) if skip is None or not skip[k]]

    def args(k):
        i0, i1 = bounds[k]
        return (read_block(data, i0, i1), *(extra(i0, i1) if extra else ()))

    if client is None:
        for k in todo:
            yield k, _run(engine, method, *args(k))
        return
    n_threads = max(1, sum(client.nthreads().values()))
    limit = max(1, in_flight_per_worker * n_threads)
    pending: deque = deque()
    it = iter(todo)
    for k in it:
        pending.append((k, client.submit(_run, engine, method, *args(k), pure=False)))
        if len(pending) >= limit:
            break
    while pending:
        k, fut = pending.popleft()
        result = fut.result()
        fut.release()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, client.submit(_run, engine, method, *args(nxt), pure=False)))
        yield k, result
