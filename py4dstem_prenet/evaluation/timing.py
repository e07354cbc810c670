"""Wall time and peak memory of one call, measured without slowing it down.

Python's ``tracemalloc`` hooks every allocation: it slowed py4DSTEM ``get_origin``
(numpy-heavy, a few small arrays per pattern) from about 1080 to 610 patterns/s on
this project's 2-core machine, and it sees neither torch's tensors nor other native
memory. The benchmarks therefore time calls untraced and read the peak memory from
the operating system: the rise of the process's peak resident set (Linux ``VmHWM``,
reset before the call through ``/proc/self/clear_refs``) above its resident set at the
call's start. That counts everything the call touched, numpy and torch alike. Before
the call, the heap's free memory is handed back to the system (glibc ``malloc_trim``),
so that memory kept from earlier calls does not hide the call's own use.
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from typing import Any, Callable

__all__ = ["format_mb", "peak_memory_supported", "timed_call"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _release_free_memory() -> None:
    """Give the heap's free memory back to the system (glibc), so that a call's peak
    counts the memory it uses, not only what it needed beyond earlier calls' leftovers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the process's peak resident set to its current one (Linux >= 4.0)."""
    _release_free_memory()
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_supported() -> bool:
    """Whether :func:`timed_call` can measure peak memory here (Linux with /proc)."""
    return _status_kb("VmHWM") is not None and _reset_peak()


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``fn()`` once; its result, wall seconds and peak memory.

    Parameters
    ----------
    fn : callable
        Called with no arguments.

    Returns
    -------
    result : object
        What ``fn`` returned.
    seconds : float
        Wall-clock time of the call, s.
    peak_mb : float
        Rise of the peak resident set over the call above the resident set at its start,
        MB (2**20 bytes); NaN where the system does not report it (not Linux).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    gc.collect()
    start = _status_kb("VmRSS") if _reset_peak() else None
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if start is not None else None
    peak_mb = math.nan if peak is None or start is None else max(peak - start, 0) / 1024
    return out, seconds, peak_mb


def format_mb(value: float) -> str:
    """A memory figure in MB for the benchmark tables: whole MB, '-' where not measured (NaN)."""
    return "-" if math.isnan(value) else f"{value:.0f}"
