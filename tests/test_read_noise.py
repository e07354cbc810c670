"""Integrating detectors: origins are measured above the read-noise floor of dark-subtracted data."""

import numpy as np
import pytest
import torch

import py4dstem_prenet as prenet
from py4dstem_prenet.engine import (READ_NOISE_SIGMAS, _clean_block, dark_level, equivalent_counts,
                                    measurement_block, read_noise_sigma)
from py4dstem_prenet.simulation import Detector, simulate_datacube


def _noisy_block(sigma=3.0, seed=0):
    """(4, 64, 64) dark-subtracted frames: a bright disk on an empty detector, read noise ``sigma``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    signal = 50.0 * (((yy - 30) ** 2 + (xx - 33) ** 2) < 8**2)
    return (signal + rng.normal(0, sigma, (4, 64, 64))).astype(np.float32)


def test_read_noise_sigma_measures_the_noise_of_empty_pixels():
    block = _noisy_block(3.0)
    before = block.copy()
    np.testing.assert_allclose(read_noise_sigma(block), 3.0, rtol=0.05)
    np.testing.assert_array_equal(block, before)  # input unchanged
    block[0, 5, 5] = np.nan  # NaN pixels are ignored
    assert np.isfinite(read_noise_sigma(block)).all()


@pytest.mark.parametrize("case", ["poisson", "uint16", "few negatives", "signed offset", "bool"])
def test_read_noise_sigma_is_zero_without_a_read_noise_floor(case):
    rng = np.random.default_rng(1)
    block = rng.poisson(0.5, (3, 32, 32)).astype(np.float32)
    if case == "uint16":
        block = block.astype(np.uint16)
    elif case == "few negatives":
        block[:, 0, :5] = -3.0  # 5 of 1024 pixels: an over-subtracted dark column, not read noise
    elif case == "signed offset":
        block -= 10.0  # the median is negative: _clean_block shifts such patterns instead
    elif case == "bool":
        block = block > 0
    assert np.all(read_noise_sigma(block) == 0)


def test_low_dose_read_noise_with_a_negative_median_is_not_an_offset():
    # most pixels see no electron: the median of the read noise about 0 is negative half the time
    rng = np.random.default_rng(4)
    electrons = rng.poisson(np.full((6, 64, 64), 0.01))
    block = (10.0 * electrons + rng.normal(0, 10.0, (6, 64, 64))).astype(np.float32)
    block -= np.median(block, axis=(1, 2), keepdims=True) + 0.1  # every median 0.1 counts below 0
    before = block.copy()
    np.testing.assert_allclose(read_noise_sigma(block), 10.0, rtol=0.05)
    np.testing.assert_array_equal(_clean_block(block)[:, 0].numpy(), np.clip(block, 0, None))  # not lifted
    x = measurement_block(block)
    counts = equivalent_counts(block, x, read_noise_sigma(block)).numpy()
    assert np.all(counts < 200)  # ~40 electrons per pattern, not the lifted floor's ~40 x 4096
    np.testing.assert_array_equal(block, before)


def test_read_noise_sigma_rejects_bad_input():
    with pytest.raises(ValueError, match="block must be"):
        read_noise_sigma(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="block must be"):
        measurement_block(np.zeros((8, 8)))
    block = _noisy_block()
    x = measurement_block(block)
    with pytest.raises(ValueError, match="block must be"):
        equivalent_counts(block, x[:2], read_noise_sigma(block))
    with pytest.raises(ValueError, match="block must be"):
        equivalent_counts(block, x, np.zeros(3))


def test_measurement_block_removes_the_floor_and_leaves_counting_data_alone():
    block = _noisy_block(3.0)
    x = measurement_block(block)[:, 0].numpy()
    empty = np.ones((64, 64), bool)
    empty[18:43, 21:46] = False
    # the empty detector: clipped at 0 it averages 0.4 sigma; above 2 sigma, almost nothing
    assert _clean_block(block)[:, 0].numpy()[:, empty].mean() > 1.0
    assert (x[:, empty] > 0).mean() < 0.03
    # the disk keeps its counts less the floor
    np.testing.assert_allclose(x[:, 30, 33], block[:, 30, 33] - READ_NOISE_SIGMAS * read_noise_sigma(block), rtol=1e-5)
    counts = np.random.default_rng(2).poisson(3.0, (2, 16, 16)).astype(np.float32)
    assert torch.equal(measurement_block(counts), _clean_block(counts))
    import py4DSTEM

    out = prenet.preprocess(py4DSTEM.DataCube(data=counts[None]), progress=False, ellipse=False, denoise=False)
    assert out.metadata["prenet"]["detector_read_noise"] == 0 and out.metadata["prenet"]["detector_dark_level"] == 0


def test_equivalent_counts_are_electrons_of_an_integrating_detector():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:48, :48]
    disk = ((yy - 24) ** 2 + (xx - 22) ** 2 < 12**2).astype(float)  # an empty detector around the disk
    electrons = rng.poisson(np.broadcast_to(20.0 * disk, (3, 48, 48)))
    counts = measurement_block(electrons.astype(np.float32))
    np.testing.assert_array_equal(equivalent_counts(electrons, counts, np.zeros(3)).numpy(),
                                  counts.sum(dim=(1, 2, 3)).double().numpy())  # counting data: as recorded
    block = (10.0 * electrons + rng.normal(0, 10.0, electrons.shape)).astype(np.float32)  # gain 10
    sigma = read_noise_sigma(block)
    above = measurement_block(block)
    found = equivalent_counts(block, above, sigma).numpy()
    # the counts above the 2-sigma floor, read as electrons (1/10 of them); the disk's sharp
    # edge adds to the pixel-to-pixel variance, so the gain is overestimated (a lower bound)
    electrons_above = above.sum(dim=(1, 2, 3)).double().numpy() / 10.0
    assert np.all(found <= 1.05 * electrons_above) and np.all(found >= 0.5 * electrons_above), (found, electrons_above)


def test_origins_of_a_noisy_integrating_detector_are_found():
    """Read noise of 3 electrons per pixel at 1e4 electrons per pattern (gain 1, dark-subtracted).

    Clipped at 0, the noise of the empty detector is a floor of ~20000 counts that carry no
    edge; before the floor was subtracted, this scan's origins were 7.6 px off on average
    (24 px at most: the detector's symmetry centre).
    """
    dc, truth = simulate_datacube((6, 6), (128, 128), "crystal", 1e4, None, seed=43_000_003,
                                  detector=Detector(read_noise=3.0))
    assert (np.asarray(dc.data) < 0).mean() > 0.3
    out = prenet.preprocess(dc, progress=False, ellipse=False)
    error = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1)
    assert error.max() < 1.0 and error.mean() < 0.3, (error.mean(), error.max())
    md = out.metadata["prenet"]
    assert md["detector_dark_level"] == 0 and abs(md["detector_read_noise"] - 3.0) < 0.3


def test_dark_level_finds_a_pedestal_and_nothing_in_counts():
    block = _noisy_block(3.0) + 100.0  # a dark level of 100 counts that was not subtracted
    before = block.copy()
    np.testing.assert_allclose(dark_level(block), 100.0, atol=0.5)
    np.testing.assert_array_equal(block, before)  # input unchanged
    np.testing.assert_allclose(read_noise_sigma(block - dark_level(block)[:, None, None]), 3.0, rtol=0.1)
    rng = np.random.default_rng(5)
    assert np.all(dark_level(rng.poisson(50.0, (2, 32, 32)).astype(np.float32)) == 0)  # diffuse counts: Poisson
    assert np.all(dark_level(rng.poisson(0.5, (2, 32, 32)).astype(np.uint16)) == 0)  # counting: zeros
    assert np.all(dark_level(_noisy_block(3.0)) == 0)  # dark-subtracted
    nan = block.copy()
    nan[0, 3, 3] = np.nan
    assert dark_level(nan)[0] > 90
    with pytest.raises(ValueError, match="block must be"):
        dark_level(np.zeros((8, 8)))


def test_origins_under_an_unsubtracted_dark_level_are_found():
    """Development probe: a pedestal of 100 counts under read noise of 3 (gain 1), 1e3 electrons.

    Before the pedestal was measured, no pixel was negative, no read noise was found, and every
    origin went 13.7 px off, to the detector's symmetry centre.
    """
    dc, truth = simulate_datacube((8, 8), (128, 128), "crystal", 1e3, None, seed=42_103_050,
                                  detector=Detector(read_noise=3.0, background=100.0))
    out = prenet.preprocess(dc, progress=False, ellipse=False)
    error = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1)
    assert error.max() < 1.0 and error.mean() < 0.8, (error.mean(), error.max())
    md = out.metadata["prenet"]
    assert abs(md["detector_dark_level"] - 100.0) < 1.0 and abs(md["detector_read_noise"] - 3.0) < 0.3


def test_the_networks_see_the_counts_above_an_unsubtracted_dark_level():
    """An integrating detector (10 counts per electron, read noise of one electron) whose
    pedestal of 1000 counts was not subtracted, 1e4 electrons: while the networks saw the
    pedestal, this dev scan's origins were 15.5 px off and its ellipse a/b 1.0105 at 90 deg
    (true 1.03 at 23 deg). The output keeps the input's dark level."""
    dc, truth = simulate_datacube((8, 8), (128, 128), "crystal", 1e4, (1.03, 0.4), seed=42_200_001,
                                  detector=Detector(gain=10.0, read_noise=10.0, background=1000.0))
    before = dc.data.copy()
    out = prenet.preprocess(dc, progress=False, denoise=False)
    assert np.array_equal(dc.data, before)
    error = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1)
    assert error.mean() < 0.4 and error.max() < 1.0, (error.mean(), error.max())
    a, b, theta = out.calibration.get_ellipse()
    assert abs(a / b - 1.03) < 0.006 and abs(np.degrees(theta) - np.degrees(0.4)) < 5
    assert abs(np.median(out.data) / np.median(before) - 1) < 0.01  # still on its pedestal


def test_detector_gain_of_an_integrating_detector():
    from py4dstem_prenet.engine import detector_gain

    dc, _ = simulate_datacube((2, 2), (96, 96), "crystal", 1e4, (1.0, 0.0), detector=Detector(gain=10.0, read_noise=10.0),
                              seed=33_000_051)
    x = np.asarray(dc.data, np.float64).reshape(4, 96, 96)
    before = x.copy()
    gain = detector_gain(x, np.full(4, 10.0))
    assert np.array_equal(x, before)
    assert np.all((gain > 9.0) & (gain < 12.0))  # an upper bound: edges add to the pixel noise
    assert np.all(detector_gain(np.zeros((2, 96, 96)), np.full(2, 10.0)) == 0)  # no signal, no gain


def test_origin_noise_of_an_integrating_detector_by_data_fission():
    from py4dstem_prenet.engine import PreNet
    from py4dstem_prenet.preprocess import origin_noise

    engine = PreNet(ellipse=False, denoise=False)
    dc, truth = simulate_datacube((5, 5), (96, 96), "crystal", 1e5, (1.02, 0.6),
                                  detector=Detector(gain=10.0, read_noise=10.0), seed=33_000_052)
    before = dc.data.copy()
    res = engine.run(dc.data.reshape(25, 96, 96))
    noise = origin_noise(engine, dc.data, res["origin"], res["origin_source"], res["counts"])
    assert np.array_equal(dc.data, before)
    err = np.sqrt(np.mean(np.sum((res["origin"] - truth.origin.reshape(-1, 2)) ** 2, axis=1)))
    assert noise is not None and 0.2 * err < noise < 3 * err
