"""The examples run (fast mode)."""

import importlib.util
import os

import numpy as np
import pytest

from py4dstem_prenet.pretrained import WEIGHTS_DIR

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(not os.path.exists(os.path.join(WEIGHTS_DIR, "centre.pt")), reason="no shipped weights")
def test_quickstart_runs(capsys):
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(HERE, "..", "examples", "quickstart.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(scan=(3, 3), dose=1e4, seed=1)
    assert out.calibration.get_origin()[0].shape == (3, 3)
    assert "PreNet origin error" in capsys.readouterr().out


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.path.exists(os.path.join(WEIGHTS_DIR, "centre.pt")), reason="no shipped weights")
def test_strain_workflow_runs(capsys):
    errors = _load("strain_workflow").main(fast=True)
    assert set(errors) == {"classical", "PreNet", "none"}
    # without calibration the descan breaks indexing (nothing measured: NaN) or the
    # uncorrected ellipse shows up as false strain in the rotated grain
    assert np.isnan(errors["none"][0]) or errors["none"][0] > errors["PreNet"][0]
    assert np.all(np.isfinite(errors["PreNet"]))
    assert "| PreNet |" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists(os.path.join(WEIGHTS_DIR, "centre.pt")), reason="no shipped weights")
def test_benchmark_example_runs():
    table = _load("benchmark").main(fast=True)
    assert "PreNet" in table and "py4DSTEM get_origin" in table
