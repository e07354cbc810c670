"""Wall time and peak memory of one call (evaluation.timing)."""

import math
import time

import numpy as np
import pytest

from py4dstem_prenet.evaluation.timing import format_mb, peak_memory_supported, timed_call


def test_timed_call_returns_the_result_and_the_wall_time():
    out, seconds, _ = timed_call(lambda: (time.sleep(0.05), 7)[1])
    assert out == 7 and 0.05 <= seconds < 1.0


@pytest.mark.skipif(not peak_memory_supported(), reason="the system reports no peak resident memory")
def test_timed_call_sees_numpy_memory_that_the_call_touched_and_freed():
    def touch() -> float:
        a = np.ones(200 * 2**20 // 8)  # 200 MB, written, then freed before the call returns
        return float(a[-1])

    _, _, peak = timed_call(touch)
    assert 150 < peak < 400, peak
    _, _, idle = timed_call(lambda: None)
    assert 0 <= idle < 20, idle


def test_timed_call_answers_bad_input_clearly():
    with pytest.raises(TypeError, match="callable"):
        timed_call(42)


def test_peak_is_nan_where_the_system_does_not_report_it(monkeypatch):
    import py4dstem_prenet.evaluation.timing as timing

    monkeypatch.setattr(timing, "_CLEAR_REFS", "/nonexistent/clear_refs")
    out, _, peak = timed_call(lambda: 3)
    assert out == 3 and math.isnan(peak)


def test_format_mb_writes_whole_megabytes_and_a_dash_where_not_measured():
    assert format_mb(354.4) == "354" and format_mb(float("nan")) == "-"
