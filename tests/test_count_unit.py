"""Counts stored in other units (normalised, or scaled by a constant) are read as counts."""

import numpy as np
import pytest
import torch

import py4dstem_prenet as prenet
from py4dstem_prenet.engine import PreNet, count_quantum, measurement_block, whole_counts
from py4dstem_prenet.simulation import simulate_datacube


def _counts(seed=0, shape=(3, 32, 32), lam=0.8):
    return np.random.default_rng(seed).poisson(lam, shape).astype(np.float32)


def test_whole_counts_allows_float32_rounding_only():
    assert whole_counts(np.array([0.0, 3.0, 7.00005, 1e5 + 0.02])).all()  # 3e-7 of 1e5 is 0.03
    assert not whole_counts(np.array([0.5, 3.001, 1e5 + 0.2])).any()


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1 / 7, 50.0, 2.5e6])
def test_count_quantum_finds_the_value_of_one_count(scale):
    x = (_counts() * np.float32(scale)).astype(np.float32)
    before = x.copy()
    np.testing.assert_allclose(count_quantum(x), scale, rtol=1e-6)
    np.testing.assert_allclose(count_quantum(torch.from_numpy(x)[:, None]), scale, rtol=1e-6)
    np.testing.assert_array_equal(x, before)  # input unchanged


def test_count_quantum_when_the_dimmest_pixel_holds_several_counts():
    x = _counts(lam=40.0)
    x[:, 0, :4] = 3  # the dimmest pixels hold 3 counts
    np.testing.assert_allclose(count_quantum(x * np.float32(0.25)), 0.25, rtol=1e-6)
    np.testing.assert_array_equal(count_quantum(x), 1.0)
    high = _counts(lam=400.0)  # whole counts, the dimmest far above 4: still counts
    assert high.min() > 10
    np.testing.assert_array_equal(count_quantum(high), 1.0)
    np.testing.assert_array_equal(count_quantum(50 * high), 50.0)  # whole numbers: their common divisor


@pytest.mark.parametrize("stray", [0.5, 0.8001, 0.25])
def test_count_quantum_of_counts_with_a_stray_value_below_one_count(stray):
    # hot pixels, dead pixels replaced by their neighbours' mean: the counts are multiples of
    # the stray's fraction too, but the largest unit is one count
    x = _counts(lam=0.3)
    x[:, 5, :4] = stray
    np.testing.assert_array_equal(count_quantum(x), 1.0)
    np.testing.assert_allclose(count_quantum(x * np.float32(1e-3)), 1e-3, rtol=1e-6)


@pytest.mark.parametrize("case", ["continuous", "float32 grid", "few pixels", "empty"])
def test_count_quantum_is_one_where_no_unit_shows(case):
    rng = np.random.default_rng(2)
    if case == "continuous":  # noisier than counts: an integrating detector, flat-fielded counts
        x = rng.gamma(2.0, 3.0, (2, 32, 32)).astype(np.float32)
    elif case == "float32 grid":  # float32 values below 32 are all multiples of 2^-19, not counts of it
        x = np.abs(rng.normal(20.0, 10.0, (2, 32, 32))).astype(np.float32)
        x[:, 0, 0] = 2.0**-19
    elif case == "few pixels":
        x = np.zeros((2, 32, 32), np.float32)
        x[:, 0, :5] = 0.37 * np.arange(1, 6)
    else:
        x = np.zeros((2, 32, 32), np.float32)
    np.testing.assert_array_equal(count_quantum(x), 1.0)


def test_count_quantum_of_continuous_data_less_noisy_than_counts():
    yy, xx = np.mgrid[:64, :64]
    blob = np.exp(-((yy - 30.3) ** 2 + (xx - 33.1) ** 2) / 200.0)
    smooth = np.stack([blob / blob.sum(), 5.0 * blob]).astype(np.float32)  # noise-free, any scale
    equivalent = smooth.sum(axis=(1, 2)) / count_quantum(smooth)
    assert np.all(equivalent > 1e6) and equivalent[0] == pytest.approx(equivalent[1], rel=1e-3)
    # counts in units of 0.01 with 5% of the lit pixels off the grid: no unit, but noise of ~0.01 per count
    x = _counts(shape=(2, 32, 32), lam=20.0) * np.float32(0.01)
    lit = np.argwhere(x[0] > 0)[::20]
    x[:, lit[:, 0], lit[:, 1]] += 0.0043
    assert np.all((count_quantum(x) > 0.005) & (count_quantum(x) < 0.02))


@pytest.mark.parametrize("bad", [np.zeros((32, 32)), np.zeros((2, 2, 8, 8)), -np.ones((1, 8, 8)),
                                 np.full((1, 8, 8), np.nan)])
def test_count_quantum_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="patterns must be"):
        count_quantum(bad)


def test_measurement_block_is_in_counts():
    x = _counts()
    np.testing.assert_allclose(measurement_block(x * np.float32(1e-3))[:, 0].numpy(), x, rtol=1e-5)


def test_engine_counts_and_output_units_of_scaled_counts():
    dc, _ = simulate_datacube((2, 2), (64, 64), "crystal", 3e3, None, seed=44_000_001)
    block = np.asarray(dc.data, np.float32).reshape(4, 64, 64)
    engine = PreNet(denoise=True, center=False, ellipse=False, refine=False)
    ref = engine.run(block)
    out = engine.run(block * np.float32(1e-3))
    np.testing.assert_allclose(out["counts"], ref["counts"], rtol=1e-5)  # electrons, not 1e-3 of them
    np.testing.assert_allclose(out["count_quantum"], 1e-3, rtol=1e-6)
    np.testing.assert_array_equal(ref["count_quantum"], 1.0)
    np.testing.assert_allclose(out["data"], 1e-3 * ref["data"], rtol=1e-4, atol=1e-9)  # the input's units


def test_preprocess_reads_normalised_counts_as_counts():
    import py4DSTEM

    dc, truth = simulate_datacube((4, 4), (128, 128), "crystal", 1e4, (1.02, 0.5), seed=44_000_002)
    ref = prenet.preprocess(dc, progress=False)
    scaled = py4DSTEM.DataCube(data=(np.asarray(dc.data) / np.float32(1e4)).astype(np.float32))
    before = np.array(scaled.data)
    out = prenet.preprocess(scaled, progress=False)
    np.testing.assert_array_equal(scaled.data, before)
    for a, b in zip(out.calibration.get_origin(), ref.calibration.get_origin()):
        np.testing.assert_allclose(a, b, atol=2e-3)
    np.testing.assert_allclose(out.calibration.get_ellipse(), ref.calibration.get_ellipse(), atol=2e-4)
    assert out.metadata["prenet"]["detector_count_unit"] == pytest.approx(1e-4, rel=1e-5)
    assert ref.metadata["prenet"]["detector_count_unit"] == 1.0


def test_preprocess_reads_noise_free_patterns_at_any_scale_as_high_dose():
    import py4DSTEM

    _, truth = simulate_datacube((4, 4), (128, 128), "crystal", 1e4, None, seed=44_000_003)
    found = []
    for clean in (truth.clean, truth.clean / truth.clean.sum(axis=(2, 3), keepdims=True)):  # as simulated, per sum
        out = prenet.preprocess(py4DSTEM.DataCube(data=clean.astype(np.float32)), progress=False, ellipse=False)
        assert out.metadata["prenet"]["origin_pooled"] == 0  # not read as a few counts per pattern
        found.append(np.stack(out.calibration.get_origin(), axis=-1))
    np.testing.assert_allclose(found[0], found[1], atol=2e-3)
    assert np.mean(np.linalg.norm(found[0] - truth.origin, axis=-1)) < 0.05


def test_units_benchmark_quick_writes_its_section(tmp_path):
    from py4dstem_prenet.cli import main
    from py4dstem_prenet.evaluation.units import COUNTS_VARIANTS, UnitsConfig, run_units_benchmark

    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nkept\n")
    assert main(["benchmark-units", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "kept" in text and "<!-- begin units -->" in text and "noise-free, normalised to sum 1" in text
    assert "prenet benchmark-units --quick --out" in text
    with pytest.raises(ValueError, match="doses"):
        run_units_benchmark(UnitsConfig(doses=()))
    with pytest.raises(ValueError, match="doses"):
        run_units_benchmark(UnitsConfig(doses=(-1.0,)))
    rows = run_units_benchmark(UnitsConfig.quick())
    for method in {r["method"] for r in rows}:  # the same recording in any units: the same origins
        means = [r["mean"] for r in rows if r["method"] == method and r["data"] in COUNTS_VARIANTS]
        assert len(means) == 3 and np.ptp(means) < 1e-3
