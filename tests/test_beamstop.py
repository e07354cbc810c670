"""Beam stops: detection and the origin behind one."""

import numpy as np
import pytest

from py4dstem_prenet.beamstop import detect_beam_stop, inversion_centre, origin_behind_stop
from py4dstem_prenet.preprocess import scan_beam_stop
from py4dstem_prenet.simulation import beam_stop_mask


def _halo_pattern(origin, shape=(128, 128), stop=True, seed=0):
    """Diffuse halo exp(-r / 30) on a flat background, Poisson counts; a rod stop over the origin from the left."""
    rng = np.random.default_rng(seed)
    rr, cc = np.indices(shape)
    expected = 4.0 + 60.0 * np.exp(-np.hypot(rr - origin[0], cc - origin[1]) / 30.0)
    t = beam_stop_mask(shape, origin, 8.0, -np.pi / 2, 10.0) if stop else 1.0
    return rng.poisson(expected * t).astype(float), (t == 0) if stop else None


def test_a_stop_is_found_and_the_origin_behind_it_from_the_halo():
    true = (70.0, 10.0)
    img, stop_true = _halo_pattern(true)
    before = img.copy()
    stop = detect_beam_stop(img)
    # most of the stop, and nothing but the stop (its rim pixels next to the bright halo read as pattern)
    assert stop is not None and (stop & stop_true).sum() >= 0.7 * stop_true.sum() and not (stop & ~stop_true).any()
    origin, sigma, score, score_elsewhere = origin_behind_stop(img, stop, current=(64.0, 90.0))
    assert np.hypot(*(origin - true)) <= sigma and score > score_elsewhere + 0.2
    assert np.array_equal(img, before)  # inputs are not changed


def test_no_stop_without_one():
    img, _ = _halo_pattern((64.0, 64.0), stop=False)
    assert detect_beam_stop(img) is None
    # a background that fades smoothly into a dim corner has no sharp rim: not a stop
    rr, cc = np.indices((128, 128))
    fading = 50.0 * np.exp(-np.hypot(rr, cc) / 25.0) + 0.01
    assert detect_beam_stop(fading) is None
    # below one count per pixel there is no background to be dark against
    assert detect_beam_stop(np.random.default_rng(1).poisson(0.3, (64, 64)).astype(float)) is None


def test_bad_input():
    with pytest.raises(ValueError, match="2D"):
        detect_beam_stop(np.ones((2, 16, 16)))


def _stopped_crystal(dose, seed, offset, stop=True, shape=(256, 256)):
    """A simulated single-crystal pattern in counts, its origin, and a rod stop whose tip
    (radius 1.3 disk radii) sits ``offset`` tip radii off the direct beam."""
    from py4dstem_prenet.engine import measurement_block
    from py4dstem_prenet.simulation import simulate_datacube

    dc, truth = simulate_datacube((1, 1), shape, "crystal", dose, (1.03, 0.4), seed=seed)
    origin, r = truth.origin.reshape(2), truth.disk_radius
    tip = origin + offset * 1.3 * r * np.array([np.cos(1.0), np.sin(1.0)])
    t = beam_stop_mask(shape, tip, 1.3 * r, 2.5, r) if stop else np.ones(shape)
    return measurement_block(dc.data[0, 0][None] * t)[0, 0].numpy().astype(float), origin, t < 0.5


def test_inversion_centre_finds_the_origin_hidden_behind_a_stop():
    # every Friedel pair of Bragg disks adds up at twice the origin, the direct beam unseen
    img, origin, stop = _stopped_crystal(1e5, 33500001, 0.2)
    before = img.copy()
    assert np.abs(inversion_centre(img) - origin).max() <= 1.0
    assert np.abs(inversion_centre(img, ~stop) - origin).max() <= 1.0
    assert np.array_equal(img, before)
    with pytest.raises(ValueError, match="2D"):
        inversion_centre(np.ones((2, 16, 16)))
    with pytest.raises(ValueError, match="shape"):
        inversion_centre(np.ones((16, 16)), np.ones((8, 8), bool))


def test_an_off_centre_stop_is_found_on_a_crystal_and_no_stop_where_there_is_none():
    img, _, true = _stopped_crystal(1e6, 33500002, 0.3)
    found = detect_beam_stop(img)
    assert found is not None and (found & true).sum() / (found | true).sum() >= 0.6
    clean, _, _ = _stopped_crystal(1e6, 33500002, 0.3, stop=False)
    assert detect_beam_stop(clean) is None


def _off_stop_scan(seed, dose=1e4):
    """A crystal scan (12 x 12 patterns of ``dose`` counts), its stop half a tip radius off the beam: DataCube, truth."""
    from py4dstem_prenet.simulation import simulate_datacube

    dc, truth = simulate_datacube((12, 12), (128, 128), "crystal", dose, (1.02, 0.6), beam_stop=True,
                                  beam_stop_offset=0.5, seed=seed)
    return dc, truth


def test_a_stop_half_off_the_beam_is_found_where_the_pattern_is_more_symmetric_about_another_point():
    # the bright-field crescent beside the stop and the lattice's half-lattice points pull
    # the self-convolution's highest peak ~19 px away; the stop is found through a lower one
    from py4dstem_prenet.engine import measurement_block

    dc, truth = _off_stop_scan(36005000, 1e5)
    total = measurement_block(dc.data.reshape(-1, 128, 128))[:, 0].double().sum(0).numpy()
    assert np.hypot(*(inversion_centre(total) - truth.origin.reshape(-1, 2).mean(0))) > 10
    true = truth.transmission < 0.5
    found = detect_beam_stop(total)
    assert found is not None and (found & true).sum() / (found | true).sum() >= 0.8


def test_a_stop_over_a_dim_background_is_judged_on_blocks_sized_by_the_median():
    # the direct beam and Bragg disks hold most counts: blocks sized by the mean level
    # hold ~5 counts off them, and the stop does not read dark there
    dc, truth = _off_stop_scan(38900000)
    true = truth.transmission < 0.5
    total = dc.data.reshape(-1, 128, 128).sum(0).astype(float)
    assert np.median(total) < 0.1 * total.mean()
    found = scan_beam_stop(dc.data)
    assert found is not None and (found & true).sum() / (found | true).sum() >= 0.6


def test_a_small_tip_beside_a_bright_crescent_is_grown_from_two_pixels():
    # the 3 x 3 mean takes a pixel off the tip beside the bright-field crescent, so it
    # reads as dark over only 2 px about the origin
    dc, truth = _off_stop_scan(38900001)
    true = truth.transmission < 0.5
    found = scan_beam_stop(dc.data)
    assert found is not None and (found & true).sum() / (found | true).sum() >= 0.6


def test_a_stop_that_hides_too_little_about_the_beam_is_judged_about_the_centre_of_the_pattern_off_it():
    # at 1e3 counts a pattern the stop's mates through the origin are its own tip and a
    # dim background: no dark region there; grown through a centre 23 px away, the stop
    # does not cover that centre, but the pattern off it is symmetric about the origin
    dc, truth = _off_stop_scan(38900009, 1e3)
    true = truth.transmission < 0.5
    found = scan_beam_stop(dc.data)
    assert found is not None and (found & true).sum() / (found | true).sum() >= 0.6


def test_origins_under_a_stop_found_about_the_centre_of_the_pattern_off_it():
    # without the stop the origins went 37 px off, to the brightest Bragg disk
    import py4dstem_prenet as prenet

    dc, truth = _off_stop_scan(38900015, 1e3)
    out = prenet.preprocess(dc, denoise=False, ellipse=False, progress=False)
    qx0, qy0 = out.calibration.get_origin()
    assert np.hypot(qx0 - truth.origin[..., 0], qy0 - truth.origin[..., 1]).mean() < 0.5


def test_the_centre_of_a_pattern_off_its_stop_is_found_on_blocks_of_a_large_detector():
    # rings about a known centre, a round stop a little off it with a rod to the edge; a
    # detector 1024 px or more across is judged on 2 px blocks, to a pixel
    from py4dstem_prenet.beamstop import _centre_off

    for n, centre, tolerance in ((256, (131.5, 120.0), 0.0), (1024, (531.0, 497.0), 0.75)):
        rows, cols = np.indices((n, n))
        r = np.hypot(rows - centre[0], cols - centre[1])
        x = 1e3 * np.exp(-(((r - 0.2 * n) / (0.02 * n)) ** 2)) + 1e2 * np.exp(-r / (0.1 * n))
        tip = (centre[0] + 0.03 * n, centre[1])
        stop = (np.hypot(rows - tip[0], cols - tip[1]) <= 0.06 * n) | ((np.abs(cols - tip[1]) <= 0.01 * n)
                                                                        & (rows >= tip[0]))
        x[stop] = 0
        assert np.hypot(*(_centre_off(x, stop) - centre)) <= tolerance


def test_dark_gaps_between_disks_are_not_a_stop():
    # a dense lattice with no diffuse background: its gaps read nothing, but Friedel's
    # law maps them onto gaps, and their centre of symmetry is not hidden under them
    from py4dstem_prenet.evaluation.benchmark import flat_lattice_scene
    from py4dstem_prenet.simulation import simulate_datacube

    for seed in (33500010, 33500011, 33500012):
        scene = flat_lattice_scene(np.random.default_rng(seed), (128, 128))
        dc, _ = simulate_datacube((6, 6), (128, 128), "crystal", 1e4, (1.02, 0.6), scene=scene, seed=seed)
        assert scan_beam_stop(dc.data) is None


def test_a_scan_sum_shows_a_stop_that_one_low_dose_pattern_does_not():
    from py4dstem_prenet.engine import measurement_block
    from py4dstem_prenet.simulation import simulate_datacube

    for seed in (33500020, 33500021):
        dc, truth = simulate_datacube((8, 8), (128, 128), "amorphous", 3e4, (1.02, 0.6), beam_stop=True, seed=seed)
        true = truth.transmission < 0.5
        assert detect_beam_stop(measurement_block(dc.data[0, 0][None])[0, 0].numpy()) is None
        found = scan_beam_stop(dc.data)
        assert found is not None and (found & true).sum() / (found | true).sum() >= 0.6
    with pytest.raises(ValueError, match="4D"):
        scan_beam_stop(dc.data[0])


def test_a_low_dose_scan_is_summed_until_it_holds_enough_counts_to_show_a_stop(monkeypatch):
    import sys

    pp = sys.modules["py4dstem_prenet.preprocess"]
    summed = []
    monkeypatch.setattr(pp, "detect_beam_stop", lambda total: summed.append(total))
    rng = np.random.default_rng(0)
    # 256 counts a pattern: the 16 runs of 16 hold 6.6e4, so the whole scan is summed
    low = rng.poisson(1.0, (40, 40, 16, 16)).astype(np.uint16)
    before = low.copy()
    scan_beam_stop(low)
    assert np.array_equal(summed[-1], low.sum(axis=(0, 1))) and np.array_equal(low, before)
    # ... up to STOP_MAX_RUNS runs of a scan larger than those
    big = np.zeros((130, 130, 16, 16), np.uint16)
    big[..., 6:8, 6:10] = 1  # 8 counts a pattern
    scan_beam_stop(big)
    assert summed[-1].max() == pp.STOP_MAX_RUNS * pp.STOP_RUN < 130 * 130
    # 2.6e4 counts a pattern: the 16 runs of 16 are enough
    high = rng.poisson(100.0, (40, 40, 16, 16)).astype(np.uint16)
    scan_beam_stop(high)
    runs = np.linspace(0, 1600 - pp.STOP_RUN, pp.STOP_RUNS).round().astype(int)
    flat = high.reshape(1600, 16, 16)
    assert np.array_equal(summed[-1], sum(flat[i:i + pp.STOP_RUN].sum(axis=0) for i in runs))


def test_a_stop_hidden_in_a_low_dose_scans_first_runs_is_found_on_more_of_it():
    # 1e2 counts a pattern: the 256 patterns of 16 runs hold 2.6e4 counts, and show no stop
    from py4dstem_prenet.simulation import simulate_datacube

    dc, truth = simulate_datacube((32, 32), (128, 128), "crystal", 1e2, (1.02, 0.6), beam_stop=True,
                                  beam_stop_offset=0.5, seed=39520007)
    true = truth.transmission < 0.5
    found = scan_beam_stop(dc.data)
    assert found is not None and (found & true).sum() / (found | true).sum() >= 0.6


def test_pooled_origins_that_agree_on_a_wrong_point_do_not_overrule_the_whole_scans_sum():
    # 1e2 counts a pattern, the stop (given) half a tip radius off the beam: every pooled
    # pattern (9 x 1e2 counts) lands on the same point 19 px off, so the pooled origins
    # agree with their own descan fit; the tile model, on the whole scan's sum, does not
    import py4dstem_prenet as prenet

    dc, truth = _off_stop_scan(39520005, 1e2)
    out = prenet.preprocess(dc, denoise=False, ellipse=False, progress=False, mask=truth.transmission > 0.5)
    qx0, qy0 = out.calibration.get_origin()
    assert np.hypot(qx0 - truth.origin[..., 0], qy0 - truth.origin[..., 1]).mean() < 0.5


def test_preprocess_finds_a_hidden_beam_under_an_unmasked_stop():
    # the network takes a bright Bragg disk for the hidden direct beam; the stop found on
    # the pattern is then used as the mask, and the origin is looked for under it
    import py4DSTEM

    import py4dstem_prenet as prenet

    img, origin, true = _stopped_crystal(1e6, 33500003, 0.2)
    out = prenet.preprocess(py4DSTEM.DataCube(data=img[None, None]), progress=False, ellipse=False)
    found = np.asarray(out.metadata["prenet"]["beam_stop_detected"])
    assert found.shape == img.shape and (found & true).sum() / (found | true).sum() >= 0.6
    qx0, qy0 = (float(v[0, 0]) for v in out.calibration.get_origin())
    assert np.hypot(qx0 - origin[0], qy0 - origin[1]) < 0.5
    # a given mask is used as it is: nothing is looked for
    given = prenet.preprocess(py4DSTEM.DataCube(data=img[None, None]), progress=False, ellipse=False, mask=~true)
    assert "beam_stop_detected" not in given.metadata["prenet"].keys


def test_the_engine_takes_the_stop_a_mask_holds_and_searches_only_where_told(monkeypatch):
    import torch

    import py4dstem_prenet.engine as engine
    from py4dstem_prenet.engine import _behind_beam_stops, _mask_stop, _stop_region

    true = (70.0, 10.0)
    img, stop_true = _halo_pattern(true)
    valid = ~stop_true.copy()
    valid[:, 100] = False  # a dead column and a hot pixel elsewhere: masked, but no stop
    valid[20, 60] = False
    valid_t = torch.from_numpy(valid)
    stops = _mask_stop(valid_t, _stop_region(valid_t, 8.0))
    assert stops.shape == (1, 128, 128) and np.array_equal(stops[0], stop_true)
    assert _mask_stop(valid_t, None) is None
    calls = []
    monkeypatch.setattr(engine, "detect_beam_stop", lambda p: calls.append(1) or detect_beam_stop(p))
    x = torch.from_numpy(img * valid)[None, None]
    far = torch.tensor([[64.0, 90.0]], dtype=torch.float64)
    before = x.clone()
    # the mask's stop: the origin from the halo behind it, with no search
    moved, o, sigma = _behind_beam_stops(x, far, torch.tensor([True]), stops, search=True)
    assert moved.item() and np.hypot(*(o[0].numpy() - true)) <= sigma.item() and not calls
    # no stop known and no search (the scan's sum was searched): nothing moves
    moved, o, _ = _behind_beam_stops(x, far, torch.tensor([True]), None, search=False)
    assert not moved.item() and torch.equal(o, far) and not calls
    # no stop known: the pattern is searched
    moved, o, _ = _behind_beam_stops(x, far, torch.tensor([True]), None, search=True)
    assert calls and moved.item() and np.hypot(*(o[0].numpy() - true)) <= 4
    assert torch.equal(x, before)


def test_preprocess_searches_the_scans_sum_not_each_pattern(monkeypatch):
    import importlib

    import py4dstem_prenet.engine as engine
    from py4dstem_prenet.evaluation.benchmark import flat_lattice_scene
    from py4dstem_prenet.simulation import simulate_datacube

    # a dense flat lattice (dev seed): the network is unsure of most origins
    shape = (128, 128)
    dc, _ = simulate_datacube((3, 3), shape, "crystal", 1e5, None,
                              scene=flat_lattice_scene(np.random.default_rng(31_006_700), shape), seed=31_006_700)
    pp = importlib.import_module("py4dstem_prenet.preprocess")  # the package's name is the function
    per_pattern, on_sum = [], []
    monkeypatch.setattr(engine, "detect_beam_stop", lambda p: per_pattern.append(1) or detect_beam_stop(p))
    monkeypatch.setattr(pp, "detect_beam_stop", lambda p: on_sum.append(1) or detect_beam_stop(p))
    res = engine.PreNet(ellipse=False).run(dc.data.reshape(-1, *shape))
    assert (res["origin_source"] >= 0).all() and per_pattern  # the engine alone searches the patterns
    per_pattern.clear()
    pp.preprocess(dc, ellipse=False, progress=False)
    assert on_sum and not per_pattern
