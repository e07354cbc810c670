"""PreNet on a real Merlin recording (pixstem's test file, GPL-3.0)."""

import os

import h5py
import numpy as np
import pytest

import py4dstem_prenet as prenet
from py4dstem_prenet.pretrained import WEIGHTS_DIR

DATA = os.path.join(os.path.dirname(__file__), "data", "fpd_file_test.hdf5")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(WEIGHTS_DIR, "centre.pt")), reason="no shipped weights")


@pytest.fixture(scope="module")
def merlin():
    import py4DSTEM

    with h5py.File(DATA, "r") as f:
        data = np.asarray(f["fpd_expt/fpd_data/data"])[:, :, 0]  # big-endian uint16, (2, 2, 256, 256)
    return py4DSTEM.DataCube(data=data)


def test_origin_is_on_the_direct_beam_and_repeatable(merlin):
    out = prenet.preprocess(merlin, progress=False)
    qx0, qy0 = out.calibration.get_origin()
    # the four frames are repeats: the origin must agree between them
    assert np.ptp(qx0) < 0.5 and np.ptp(qy0) < 0.5
    # and sit on the direct beam (its blurred maximum is at about (125.9, 129.1))
    assert abs(np.mean(qx0) - 125.9) < 1.0 and abs(np.mean(qy0) - 129.1) < 1.0
    a, b, theta = out.calibration.get_ellipse()
    assert 1.0 <= a / b < 1.05
    assert out.data.dtype == np.float32 and np.all(np.isfinite(out.data))


def test_output_reopens_in_py4dstem_with_calibration(merlin, tmp_path):
    import py4DSTEM

    out = prenet.preprocess(merlin, denoise=False, progress=False)
    path = str(tmp_path / "out.h5")
    py4DSTEM.save(path, out, mode="o")
    back = py4DSTEM.read(path)
    np.testing.assert_allclose(back.calibration.get_origin()[0], out.calibration.get_origin()[0])
    np.testing.assert_allclose(back.calibration.get_ellipse(), out.calibration.get_ellipse())
