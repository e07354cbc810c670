"""Every bad input gets a clear error or a documented, safe behaviour; inputs are never changed."""

import os
import shutil

import numpy as np
import pytest

import py4dstem_prenet as prenet
from py4dstem_prenet.cli import main
from py4dstem_prenet.simulation import Detector, simulate_datacube


def _cube(data):
    import py4DSTEM

    dc = py4DSTEM.DataCube(data=np.zeros((1, 1, 16, 16)))
    dc.data = data
    return dc


@pytest.mark.parametrize("shape", [(32, 32), (4, 32, 32), (1, 2, 2, 32, 32)])
def test_wrong_dimensionality_is_refused(shape, tiny_weights):
    with pytest.raises(ValueError, match="4D"):
        prenet.preprocess(_cube(np.ones(shape)), weights_dir=tiny_weights, progress=False)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                                   "float16", "float32", "float64"])
def test_every_numeric_dtype_at_its_extremes(dtype, tiny_weights):
    """Saturated values of every type: no overflow in sums, finite output, input unchanged."""
    info = np.iinfo(dtype) if dtype[0] in "ui" else np.finfo(dtype)
    data = np.full((1, 2, 24, 20), info.max, dtype=dtype)
    data[0, 0, 5:9, 5:9] = 0
    before = data.copy()
    out = prenet.preprocess(_cube(data), weights_dir=tiny_weights, progress=False)
    assert np.array_equal(data, before)
    assert np.all(np.isfinite(out.data)) and np.all(np.isfinite(out.calibration.get_origin()[0]))


def test_non_numeric_and_bad_options(tiny_weights):
    with pytest.raises(TypeError, match="numeric"):
        prenet.preprocess(_cube(np.full((1, 1, 16, 16), "a")), weights_dir=tiny_weights)
    dc = _cube(np.ones((1, 1, 32, 32)))
    for bs in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            prenet.preprocess(dc, batch_size=bs, weights_dir=tiny_weights)


def test_large_non_square_detector_and_all_zero_patterns(tiny_weights):
    data = np.zeros((1, 2, 300, 180), np.uint16)
    data[0, 1] = np.random.default_rng(1).poisson(2.0, (300, 180))
    out = prenet.preprocess(_cube(data), weights_dir=tiny_weights, progress=False)
    assert out.data.shape == (1, 2, 300, 180) and np.all(np.isfinite(out.data))
    qx0, qy0 = out.calibration.get_origin()
    assert np.all((qx0 >= 0) & (qx0 <= 299) & (qy0 >= 0) & (qy0 <= 179))


def test_beam_stop_and_hot_pixels_keep_the_origin_on_the_disk():
    from py4dstem_prenet.pretrained import WEIGHTS_DIR

    if not os.path.exists(os.path.join(WEIGHTS_DIR, "centre.pt")):
        pytest.skip("no shipped weights")
    dc, truth = simulate_datacube((3, 3), (128, 128), "crystal", 1e5, (1.01, 0.2), beam_stop=True,
                                  detector=Detector(hot_fraction=5e-4, hot_level=20.0), seed=8)
    out = prenet.preprocess(dc, progress=False)
    err = np.hypot(*(np.stack(out.calibration.get_origin(), -1) - truth.origin).transpose(2, 0, 1))
    assert np.median(err) < 1.0


def test_cli_bad_files_and_weights(tmp_path, tiny_weights, monkeypatch):
    out = str(tmp_path / "o.h5")
    assert main(["preprocess", str(tmp_path / "missing.h5"), out]) == 2
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert main(["preprocess", str(bad), out]) == 2
    good = str(tmp_path / "good.h5")
    assert main(["simulate", good, "--scan", "2x2", "--detector", "32x32"]) == 0
    assert main(["preprocess", good, good]) == 2  # never writes over its input
    with pytest.raises(SystemExit):
        main(["preprocess", good, out, "--batch-size", "0"])
    broken = str(tmp_path / "w")
    shutil.copytree(tiny_weights, broken)
    with open(os.path.join(broken, "centre.pt"), "ab") as f:
        f.write(b"x")
    import py4dstem_prenet.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", broken)
    assert main(["preprocess", good, out, "--quiet"]) == 1
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_cli_mask_option(tmp_path, tiny_weights, monkeypatch):
    import py4DSTEM

    import py4dstem_prenet.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tiny_weights)
    src = str(tmp_path / "in.h5")
    assert main(["simulate", src, "--scan", "2x2", "--detector", "32x32"]) == 0
    np.save(tmp_path / "ints.npy", np.ones((32, 32), int))
    assert main(["preprocess", src, str(tmp_path / "a.h5"), "--mask", str(tmp_path / "ints.npy")]) == 2
    np.save(tmp_path / "small.npy", np.ones((16, 16), bool))
    assert main(["preprocess", src, str(tmp_path / "a.h5"), "--mask", str(tmp_path / "small.npy")]) == 2
    stop = np.ones((32, 32), bool)
    stop[:14, 14:18] = False
    np.save(tmp_path / "stop.npy", stop)
    assert main(["preprocess", src, str(tmp_path / "b.h5"), "--mask", str(tmp_path / "stop.npy"), "--quiet"]) == 0
    assert py4DSTEM.read(str(tmp_path / "b.h5")).calibration.get_origin()[0].shape == (2, 2)


def test_refinement_functions_refuse_bad_tensors():
    import torch

    from py4dstem_prenet.engine import overlay_mask
    from py4dstem_prenet.refine import edge_map, gaussian_blur, refine_origin, symmetry_centre

    x = torch.rand(2, 1, 32, 32)
    before = x.clone()
    for bad in (x[:, 0], x.double().numpy(), x.to(torch.int32), torch.rand(2, 1, 4, 4)):
        for f in (symmetry_centre, edge_map):
            with pytest.raises(ValueError, match="patterns"):
                f(bad)
    for bad in (x[:, 0], x.numpy(), x.to(torch.int32)):
        with pytest.raises(ValueError, match="patterns"):
            gaussian_blur(bad, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, 0.0)
    with pytest.raises(ValueError, match="floor_counts"):
        edge_map(x, floor_counts=-1.0)
    with pytest.raises(ValueError, match="origins"):
        refine_origin(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="valid"):
        refine_origin(x, torch.zeros(2, 2), valid=torch.ones(31, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        symmetry_centre(x, valid=torch.ones(32, 32))
    refine_origin(x, torch.full((2, 2), 16.0), valid=torch.ones(2, 32, 32, dtype=torch.bool))
    overlay_mask(x)
    edge_map(x, floor_counts=10.0)
    gaussian_blur(x, 1.0)
    assert torch.equal(x, before)  # nothing changes its input


def test_engine_refuses_a_mask_of_another_shape_or_type(tiny_weights):
    from py4dstem_prenet.engine import PreNet

    engine = PreNet(denoise=False, ellipse=False, weights_dir=tiny_weights)
    block = np.random.default_rng(0).poisson(5.0, (3, 32, 32)).astype(np.float32)
    before = block.copy()
    origin = np.full((3, 2), 16.0)
    for mask in (np.ones((31, 32), bool), np.ones((32, 32), int)):
        for call in (lambda: engine.run(block, mask=mask), lambda: engine.refine_at(block, origin, mask=mask),
                     lambda: engine.intensity_halves_at(block, origin, mask=mask)):
            with pytest.raises(ValueError, match="mask must be a boolean array of the detector shape"):
                call()
    assert np.array_equal(block, before)


def test_a_scan_of_blank_patterns_is_refused(tiny_weights):
    data = np.zeros((4, 4, 32, 32), np.float32)
    with pytest.raises(ValueError, match="blank"):
        prenet.preprocess(_cube(data), weights_dir=tiny_weights, progress=False)
    # the denoiser alone has nothing to measure and passes it through
    out = prenet.preprocess(_cube(data), center=False, ellipse=False, weights_dir=tiny_weights, progress=False)
    assert out.data.shape == data.shape and np.abs(out.data).max() < 1e-3
