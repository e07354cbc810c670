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


def _ring_centre(image):
    """Independent reference: least-squares circle through the brightest ring's pixels."""
    from scipy import ndimage

    sm = ndimage.gaussian_filter(image - image.min(), 1.5)
    r, c = np.nonzero(sm > np.percentile(sm, 98.5))
    a = np.stack([r, c, np.ones_like(r)], 1).astype(float)
    x = np.linalg.lstsq(a, (r**2 + c**2).astype(float), rcond=None)[0]
    return x[0] / 2, x[1] / 2


def test_bismuth_rings_with_a_beam_stop():
    """scikit-ued's bismuth.dm4: one SAED-like ring pattern, beam stop, signed 8-bit values."""
    from py4dstem_prenet.storage import open_datacube

    dc = open_datacube(os.path.join(os.path.dirname(DATA), "bismuth.dm4"))
    assert dc.data.shape == (1, 1, 256, 256)
    out = prenet.preprocess(dc, progress=False)
    qx0, qy0 = (float(v[0, 0]) for v in out.calibration.get_origin())
    rx, ry = _ring_centre(np.asarray(dc.data[0, 0], float))
    assert abs(qx0 - rx) < 0.5 and abs(qy0 - ry) < 0.5
    a, b, _ = out.calibration.get_ellipse()
    assert 1.0 <= a / b < 1.02  # projector ellipticity of a real microscope
    assert out.metadata["prenet"]["ellipse_refined_band"] == "rings"  # the ring fit of the pattern (py4DSTEM fit_ellipse_1D
    # on the 45-75 px annulus about this origin: a/b 1.0101 at 140.8 degrees; the ring fit 1.0088 at 139.0)


def test_direct_beam_hidden_behind_a_beam_stop_at_the_detector_edge():
    """scikit-ued's test.mib: a single crystal whose direct beam is under a beam stop at the left edge.

    Reference: the spot lattice. A least-squares lattice through the centroids of the seven
    Bragg spots (rms 0.24 px) puts the g = 0 point under the stop at (132.9, 7.1). The inversion
    about it keeps a 15 px strip of the detector, all under the stop, so symmetry cannot find it;
    before the beam-stop stage PreNet returned a Bragg spot 90 px away.
    """
    from py4dstem_prenet.storage import open_datacube

    dc = open_datacube(os.path.join(os.path.dirname(DATA), "test.mib"), scan=(1, 1))
    out = prenet.preprocess(dc, progress=False, ellipse=False)
    qx0, qy0 = (float(v[0, 0]) for v in out.calibration.get_origin())
    md = out.metadata["prenet"]
    assert md["origin_source"][0, 0] == 4
    error = np.hypot(qx0 - 132.9, qy0 - 7.1)
    assert error <= md["origin_sigma"][0, 0] <= 10, (qx0, qy0, md["origin_sigma"])


def _burn_label(img: np.ndarray) -> np.ndarray:
    """A copy of ``img`` with a text label and a 3 px scale bar burned in at its maximum, as exported images have."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = img.shape
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    fig.patch.set_facecolor("black")
    fig.text(0.04, 0.05, "50 cm  200 kV", fontsize=9, color="white", family="monospace")
    fig.canvas.draw()
    strokes = np.asarray(fig.canvas.buffer_rgba())[..., 0] > 128
    plt.close(fig)
    out = img.copy()
    out[strokes] = img.max()
    out[int(0.93 * h):int(0.93 * h) + 3, int(0.6 * w):int(0.9 * w)] = img.max()
    return out


@pytest.mark.parametrize("name", ["bismuth.dm4", "fpd_file_test.hdf5"])
def test_burned_in_label_and_scale_bar_do_not_move_the_origin(name):
    """Without the annotation mask a label and a scale bar moved the origin by 100 and 69 px."""
    import py4DSTEM

    from py4dstem_prenet.storage import open_datacube

    img = np.asarray(open_datacube(os.path.join(os.path.dirname(DATA), name)).data, float).reshape(-1, 256, 256)[0]
    img -= min(img.min(), 0.0)
    labelled = _burn_label(img)
    assert (labelled != img).sum() > 300
    found = []
    for im in (img, labelled):
        out = prenet.preprocess(py4DSTEM.DataCube(data=im[None, None]), ellipse=False, progress=False)
        found.append([float(v[0, 0]) for v in out.calibration.get_origin()])
    assert np.linalg.norm(np.subtract(*found)) < 0.05, found


@pytest.mark.parametrize("name,extra", [("test_multi.mib", ["--scan", "3x3"]), ("test.mib", ["--scan", "1x1"]),
                                        ("fpd_file_test.hdf5", [])])
def test_cli_preprocesses_real_files_into_emd_py4dstem_reopens(name, extra, tmp_path):
    import py4DSTEM

    from py4dstem_prenet.cli import main

    src = os.path.join(os.path.dirname(DATA), name)
    out = str(tmp_path / "out.h5")
    assert main(["preprocess", src, out, "--quiet", "--no-denoise", *extra]) == 0
    back = py4DSTEM.read(out)
    qx0, qy0 = back.calibration.get_origin()
    assert back.data.dtype == np.float32 and qx0.shape == back.data.shape[:2]
    assert np.all((qx0 >= 0) & (qx0 <= 255) & (qy0 >= 0) & (qy0 <= 255))
    if name == "test_multi.mib":  # nine frames of the same illumination: one origin
        assert np.ptp(qx0) < 1 and np.ptp(qy0) < 1
        # each frame is a flat field (value 32) with one dark disk (value 1) about 45 px
        # across, its only feature: the origin is its centre (the dark region's centroid,
        # which a faint tail on one side pulls by 1 px, within 2 px); it used to be the
        # symmetry centre of the featureless field, 130 px away
        from scipy import ndimage

        dark = ndimage.binary_opening(np.asarray(back.data[0, 0]) < 16, np.ones((3, 3)))  # the copied recording
        labels, _ = ndimage.label(dark)
        disk = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        assert np.hypot(*(np.subtract(ndimage.center_of_mass(disk), (qx0[0, 0], qy0[0, 0])))) < 2
    assert main(["preprocess", src, out, "--quiet", *extra]) == 2  # refuses to overwrite
