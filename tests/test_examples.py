"""The examples run (fast mode)."""

import importlib.util
import os

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
