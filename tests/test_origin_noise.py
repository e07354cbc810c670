"""Masks and detector borders in the symmetry search, rings behind a beam stop, noisy origins."""

import sys

import numpy as np
import pytest
import torch

import py4dstem_prenet as prenet
from py4dstem_prenet.engine import _angular_fraction, _median3
from py4dstem_prenet.preprocess import (NOISY_ORIGIN_PX, origin_scatter, origins_are_noise, robust_descan_fit,
                                        scan_line_offsets, scan_ripple, scan_roughness)
from py4dstem_prenet.refine import (_masked_edges, _upsampled_peak, intensity_symmetry_centre, intensity_symmetry_halves,
                                    refine_origin)
from py4dstem_prenet.simulation import Detector, Scene, render, simulate_datacube


def _rings_behind_stop(scan=(4, 4), dose=1e4, seed=33_000_009):
    # an amorphous film whose bright-field disk is under a disk-and-rod stop (dev seed, not
    # a benchmark one): only broad speckled rings are left
    return simulate_datacube(scan, (128, 128), "amorphous", dose, (1.02, 0.6), seed=seed, beam_stop=True)


def test_symmetry_search_is_not_pulled_by_a_mask():
    scene = Scene(disk_radius=7.0, spots=[[0, 0], [22, 6], [-22, -6], [-5, 21], [5, -21]])
    true = torch.tensor([[60.4, 63.7]])
    x = torch.from_numpy(render(scene, (128, 128), true[0].numpy()) * 100).float()[None, None]
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    valid = (yy - 70) ** 2 + (xx - 58) ** 2 > 8**2  # a stop off the centre, over part of the disk
    valid[70:, 55:61] = False
    found = refine_origin(x, true + 0.6, valid=valid)
    # the plain self-convolution of the masked edge map (the search before it was normalised)
    g, _ = _masked_edges(x * valid, valid)
    gf = torch.fft.rfft2(g, s=(256, 256))
    plain = _upsampled_peak(gf * gf, torch.round(2 * true), (256, 256)) / 2
    assert torch.linalg.norm(found - true) < 0.015 < 0.03 < torch.linalg.norm(plain - true)


def test_intensity_symmetry_finds_rings_behind_a_stop():
    dc, truth = _rings_behind_stop()
    x = torch.from_numpy(np.asarray(dc.data, np.float32).reshape(-1, 1, 128, 128))
    valid = torch.from_numpy(truth.transmission > 0.5)
    true = torch.from_numpy(truth.origin.reshape(-1, 2)).float()
    start = true + torch.tensor([1.5, -1.0])
    before = x.clone()
    found = intensity_symmetry_centre(x, start, valid=valid)
    edges = refine_origin(x, start, search=4.0, valid=valid)
    assert torch.equal(x, before)
    err = torch.linalg.norm(found - true, dim=1).mean()
    assert err < 0.3 and 2 * err < torch.linalg.norm(edges - true, dim=1).mean()


def test_intensity_symmetry_rejects_bad_input():
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="origins"):
        intensity_symmetry_centre(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="valid"):
        intensity_symmetry_centre(x, torch.full((2, 2), 16.0), valid=torch.ones(31, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="patterns"):
        intensity_symmetry_centre(x[:, 0], torch.full((2, 2), 16.0))


def _prepared(raw, valid):
    # the engine's input for these origins: hot pixels removed, the stop read as 0
    return _median3(torch.from_numpy(np.asarray(raw, np.float32))[:, None] * valid).float()


def test_intensity_symmetry_is_not_pulled_by_its_own_noise(monkeypatch):
    # rings behind a stop reaching the detector's border, nearly without speckle, at 1e4
    # counts (dev seed): the noise's energy over the pixels that the inversion keeps pulled
    # the centre by an amount set by the geometry, so that two independent noise draws of
    # the same patterns erred alike; less the noise's variance, their errors are unrelated
    from py4dstem_prenet import refine

    dc, truth = simulate_datacube((8, 8), (128, 128), "amorphous", 1e4, (1.02, 0.6), seed=33_004_401,
                                  beam_stop=True)
    valid = torch.from_numpy(truth.transmission > 0.5)
    expected = truth.clean.reshape(-1, 128, 128) * truth.transmission
    true = torch.from_numpy(truth.origin.reshape(-1, 2)).float()
    rng = np.random.default_rng(5)
    draws = [_prepared(rng.poisson(expected), valid) for _ in range(2)]

    def correlation():
        e = [(intensity_symmetry_centre(x, true + 0.5, valid=valid) - true).numpy().ravel() for x in draws]
        return np.corrcoef(*e)[0, 1], np.sqrt(2 * np.mean(e[0] ** 2))

    corr, rms = correlation()
    monkeypatch.setattr(refine, "_noise_variance", lambda g, m, s: torch.zeros(len(g), dtype=g.dtype))
    corr_uncorrected, rms_uncorrected = correlation()
    assert abs(corr) < 0.25 < 0.4 < corr_uncorrected and rms < 0.9 * rms_uncorrected


def test_intensity_symmetry_halves_measure_the_speckles_share_of_the_error():
    # strongly speckled rings behind a stop at 1e6 counts (dev seed): the error is the
    # speckle's, which both halves of a binomial split of the counts share, but not two
    # sets of angular sectors
    from py4dstem_prenet.preprocess import _robust_rms

    dc, truth = _rings_behind_stop((6, 6), 1e6, seed=33_000_011)
    valid = torch.from_numpy(truth.transmission > 0.5)
    raw = np.asarray(dc.data).reshape(-1, 128, 128)
    x = _prepared(raw, valid)
    true = torch.from_numpy(truth.origin.reshape(-1, 2)).float()
    full = intensity_symmetry_centre(x, true + 0.5, valid=valid)
    before = x.clone()
    a, b = intensity_symmetry_halves(x, full, 2.0, valid)
    assert torch.equal(x, before) and a.shape == b.shape == full.shape
    err = np.sqrt(np.mean(np.sum((full - true).numpy() ** 2, axis=1)))
    sectors = _robust_rms((a - b).numpy()) / 2
    half = np.random.default_rng(0).binomial(raw.astype(np.int64), 0.5)
    t1 = intensity_symmetry_centre(_prepared(half, valid), full, 2.0, valid)
    t2 = intensity_symmetry_centre(_prepared(raw - half, valid), full, 2.0, valid)
    thinning = _robust_rms((t1 - t2).numpy()) / 2
    assert 0.5 * err < sectors < 2 * err and thinning < 0.3 * err
    with pytest.raises(ValueError, match="origins"):
        intensity_symmetry_halves(x, full[:3])


def test_origin_noise_of_rings_behind_a_stop_counts_their_speckle():
    from py4dstem_prenet.engine import PreNet
    from py4dstem_prenet.preprocess import origin_noise

    engine = PreNet(denoise=False, ellipse=False)
    dc, truth = _rings_behind_stop((5, 5), 1e6, seed=33_000_011)
    mask = truth.transmission > 0.5
    res = engine.run(dc.data.reshape(25, 128, 128), mask=mask)
    assert np.all(res["origin_source"] == 8)
    before = dc.data.copy()
    noise = origin_noise(engine, dc.data, res["origin"], res["origin_source"], res["counts"], mask)
    assert np.array_equal(dc.data, before)
    err = np.sqrt(np.mean(np.sum((res["origin"] - truth.origin.reshape(-1, 2)) ** 2, axis=1)))
    assert 0.5 * err < noise < 2 * err


def test_rings_behind_a_stop_are_searched_from_the_stops_most_symmetric_point():
    # broad rings (52 px) running off the detector behind a stop, 1e5 counts (dev seed): the
    # edge steps left origins up to 10 px off under the stop, and a search about them left
    # 8 of these 12 0.4-2.7 px off; the rings are symmetric about their centre alone
    from py4dstem_prenet.engine import PreNet

    dc, truth = simulate_datacube((2, 6), (128, 128), "amorphous", 1e5, (1.02, 0.6), seed=36_505_400,
                                  beam_stop=True)
    res = PreNet(denoise=False, ellipse=False).run(dc.data.reshape(12, 128, 128), mask=truth.transmission > 0.5)
    assert np.all(res["origin_source"] == 8)
    assert np.linalg.norm(res["origin"] - truth.origin.reshape(-1, 2), axis=1).max() < 0.3


def test_angular_fraction_tells_rings_from_bragg_disks_behind_a_stop():
    fractions = {}
    for kind in ("amorphous", "crystal"):
        dc, truth = simulate_datacube((2, 2), (128, 128), kind, 1e4, (1.02, 0.6), seed=33_000_109, beam_stop=True,
                                      detector=Detector())  # no hot pixels (the engine removes them first)
        x = torch.from_numpy(np.asarray(dc.data, np.float32).reshape(-1, 1, 128, 128))
        fractions[kind] = _angular_fraction(x, torch.from_numpy(truth.origin.reshape(-1, 2)).float(),
                                            torch.from_numpy(truth.transmission > 0.5))
    assert fractions["amorphous"].max() < 0.4 < 0.6 < fractions["crystal"].min()


def _descan(scan):
    u, v = np.meshgrid(np.linspace(-1, 1, scan[0]), np.linspace(-1, 1, scan[1]), indexing="ij")
    return np.stack([60 + 1.5 * u + 0.4 * u * v, 64 - 1.0 * v + 0.3 * u * u], -1).reshape(-1, 2)


def test_origin_scatter_separates_noise_from_descan_structure():
    scan = (12, 12)
    smooth = _descan(scan)
    noisy = smooth + np.random.default_rng(0).normal(0, 0.3, smooth.shape)
    before = noisy.copy()
    white, total, fitted = origin_scatter(noisy, scan)
    assert np.array_equal(noisy, before)
    assert 0.3 < white < 0.55 and total < 1.3 * white  # 0.3 px per axis: 0.42 px over both
    assert np.sqrt(np.mean(np.sum((fitted - smooth) ** 2, axis=1))) < 0.15
    # a structure the parabola misses (a wave across the scan's diagonal) is not white
    u = np.arange(scan[0])[:, None] + np.arange(scan[1])[None, :]
    wavy = smooth + 0.5 * np.sin(2 * np.pi * u / 12).reshape(-1, 1) + np.random.default_rng(1).normal(0, 0.05, smooth.shape)
    white, total, _ = origin_scatter(wavy, scan)
    assert total > 2 * white
    # whole scan rows offset from the rest (line sync) are descan: given, they are in the fit
    rows = (np.random.default_rng(2).normal(0, 0.5, (scan[0], 1, 2)) + np.zeros((*scan, 2))).reshape(-1, 2)
    lined = smooth + rows + np.random.default_rng(3).normal(0, 0.05, smooth.shape)
    white_without, _, _ = origin_scatter(lined, scan)
    lines = scan_line_offsets(lined - robust_descan_fit(lined, scan), scan)
    white, total, fitted = origin_scatter(lined, scan, lines)
    assert white < 0.1 < white_without and np.sqrt(np.mean(np.sum((fitted - lined) ** 2, axis=1))) < 0.1
    with pytest.raises(ValueError, match="finite"):
        origin_scatter(lined, scan, lines[:-1])
    with pytest.raises(ValueError, match="finite"):
        origin_scatter(noisy[:-1], scan)
    # blank patterns whose origins are the others' fit scatter by nothing: left out, they do not
    # dilute the scatter of the measured ones
    empty = np.zeros(len(smooth), bool)
    empty[::3] = True
    filled = np.where(empty[:, None], smooth, noisy)
    white_all, total_all, _ = origin_scatter(noisy, scan)
    white, total, _ = origin_scatter(filled, scan, empty=empty)
    assert abs(white / white_all - 1) < 0.15 and abs(total / total_all - 1) < 0.15
    assert origin_scatter(filled, scan)[0] < 0.8 * white_all
    with pytest.raises(ValueError, match="finite"):
        origin_scatter(np.where(np.arange(len(noisy))[:, None] == 3, np.nan, noisy), scan)


def test_scan_line_offsets_finds_row_and_column_offsets_and_not_noise():
    scan = (12, 16)
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 0.1, (scan[0] * scan[1], 2))
    rows = np.repeat(rng.normal(0, 0.4, (scan[0], 2)), scan[1], axis=0)
    lag = np.tile(np.outer(1.2 * np.exp(-np.arange(scan[1]) / 1.5), [0.6, 0.8]), (scan[0], 1))
    residual = noise + rows + lag
    before = residual.copy()
    found = scan_line_offsets(residual, scan)
    assert np.array_equal(residual, before)
    miss = found - (rows + lag)
    miss -= miss.mean(axis=0)  # an offset common to the scan is not a line's: the fit keeps it
    assert np.sqrt(np.mean(np.sum(miss**2, axis=1))) < 0.08
    # noise alone: nothing, on (nearly) every draw
    kept = sum(np.any(scan_line_offsets(np.random.default_rng(s).normal(0, 0.1, noise.shape), scan) != 0)
               for s in range(40))
    assert kept <= 1
    # a single row offset by a step stands out of the noise
    step = noise.copy()
    step[5 * scan[1]:6 * scan[1]] += [0.5, 0.0]
    assert abs(scan_line_offsets(step, scan)[5 * scan[1], 0] - 0.5) < 0.1
    assert not np.any(scan_line_offsets(residual[:4 * scan[1]], (4, scan[1])))  # too few rows: nothing
    # unknown departures (NaN) are left out, and a line with fewer than half of its own known
    # gets no offset: row 3's few known departures (failed measurements, 2 px off) are not one
    holes = (noise + rows).copy()
    holes[3 * scan[1]:4 * scan[1]] += [2.0, 0.0]
    holes[::7] = np.nan
    holes[3 * scan[1]:4 * scan[1] - 3] = np.nan
    found = scan_line_offsets(holes, scan).reshape(*scan, 2)
    truth = rows.reshape(*scan, 2)
    assert np.all(np.isfinite(found))
    miss = np.delete(found - truth, 3, axis=0)
    miss -= np.median(miss.reshape(-1, 2), axis=0)
    assert np.abs(miss).max() < 0.15  # the other rows are found
    assert np.abs(found[3, :, 0] - np.median(found[:, :, 0])).max() < 0.5  # row 3 is not moved by 2 px
    with pytest.raises(ValueError, match="NaN"):
        scan_line_offsets(residual[:-1], scan)
    with pytest.raises(ValueError, match="NaN"):
        scan_line_offsets(np.where(np.arange(len(residual))[:, None] == 3, np.inf, residual), scan)
    with pytest.raises(ValueError, match="NaN"):
        scan_line_offsets(np.where((np.arange(len(residual)) == 3)[:, None] & [True, False], np.nan, residual), scan)


def _raster_ripple(scan, amplitude, period, phase, direction, row_time=None):
    """A sinusoid in raster time (row_time: positions' worth of time per row, flyback included)."""
    i, j = np.divmod(np.arange(scan[0] * scan[1]), scan[1])
    t = i * (row_time or scan[1]) + j
    return amplitude * np.sin(2 * np.pi * t / period + phase)[:, None] * np.asarray(direction)


def test_scan_ripple_finds_a_mains_ripple_and_not_noise_lines_or_smooth_structure():
    scan = (12, 14)
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.1, (scan[0] * scan[1], 2))
    # any period, with or without flyback time between rows: one plane wave over the scan
    for period, row_time in ((5.3, None), (9.0, 20.0), (3.4, 16.0)):
        wave = _raster_ripple(scan, 0.3, period, 0.7, [0.8, 0.6], row_time)
        residual = noise + wave
        before = residual.copy()
        found = scan_ripple(residual, scan)
        assert np.array_equal(residual, before)
        assert np.sqrt(np.mean(np.sum((found - wave) ** 2, axis=1))) < 0.06, (period, row_time)
    # noise alone (normal, and heavy-tailed), line offsets and smooth structure: nothing
    for s in range(30):
        r = np.random.default_rng(100 + s)
        assert not np.any(scan_ripple(r.normal(0, 0.1, noise.shape), scan))
        assert not np.any(scan_ripple(0.1 * r.standard_t(3, noise.shape), scan))
    i, j = np.divmod(np.arange(scan[0] * scan[1]), scan[1])
    rows = np.repeat(rng.normal(0, 0.4, (scan[0], 2)), scan[1], axis=0)
    bowl = 0.3 * np.cos(2 * np.pi * (i / scan[0] + j / scan[1]))[:, None] * [1.0, 0.0]  # one period across
    assert not np.any(scan_ripple(noise + rows, scan)) and not np.any(scan_ripple(noise + bowl, scan))
    # scan_roughness: the line offsets, then the ripple of what they leave
    wave = _raster_ripple(scan, 0.3, 5.3, 0.7, [0.8, 0.6])
    lines, ripple = scan_roughness(noise + rows + wave, scan)
    miss = lines + ripple - rows - wave
    miss -= miss.mean(axis=0)
    assert np.sqrt(np.mean(np.sum(miss**2, axis=1))) < 0.1
    # unknown departures (NaN) are left out; too few known, or too small a scan: nothing
    holes = noise + wave
    holes[::5] = np.nan
    assert np.sqrt(np.mean(np.sum((scan_ripple(holes, scan) - wave) ** 2, axis=1))) < 0.08
    holes[::2] = np.nan
    holes[1::4] = np.nan
    assert not np.any(scan_ripple(holes, scan))
    assert not np.any(scan_ripple((noise + wave)[:4 * scan[1]], (4, scan[1])))
    with pytest.raises(ValueError, match="NaN"):
        scan_ripple(noise[:-1], scan)
    with pytest.raises(ValueError, match="NaN"):
        scan_ripple(np.where(np.arange(len(noise))[:, None] == 3, np.inf, noise), scan)
    with pytest.raises(ValueError, match="NaN"):
        scan_ripple(np.where((np.arange(len(noise)) == 3)[:, None] & [True, False], np.nan, noise), scan)


def test_a_mains_ripple_is_given_back_to_pooled_low_dose_origins(monkeypatch):
    # 1e3 counts: the 3 x 3 pooling averages a ripple of 0.3 px away
    dc, truth = simulate_datacube((12, 12), (96, 96), "crystal", 1e3, (1.02, 0.5), ripple=0.3, seed=46_000_002)
    errors = []
    for found in (True, False):
        if not found:
            module = sys.modules["py4dstem_prenet.preprocess"]
            monkeypatch.setattr(module, "scan_ripple", lambda residual, scan: np.zeros(np.shape(residual)))
        out = prenet.preprocess(dc, progress=False, ellipse=False)
        md = out.metadata["prenet"]
        assert md["origin_pooled"] == 144 and np.any(md["origin_ripple"]) == found
        errors.append(np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1).mean())
    assert errors[0] < 0.75 * errors[1], errors


def test_rough_descan_is_followed_at_low_and_high_dose():
    # 1e3 counts: origins are measured on pooled 3 x 3 windows, which mix scan rows of
    # different origins (0.48-0.73 px mean error on 16 x 16 probes before the line
    # offsets were given back); 1e4: a mains ripple of 1 px must not be taken for noise
    cases = [(1e3, dict(line_jitter=0.5), 44_001_000, 0.3), (1e4, dict(ripple=1.0), 44_010_002, 0.08)]
    for dose, rough, seed, bound in cases:
        dc, truth = simulate_datacube((12, 12), (128, 128), "crystal", dose, (1.02, 0.5), seed=seed, **rough)
        out = prenet.preprocess(dc, ellipse=False, progress=False)
        err = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1)
        assert err.mean() < bound and err.max() < 1.0, (dose, err.mean(), err.max())
        md = out.metadata["prenet"]
        assert not md["origin_descan_smoothed"] and md["origin_line_offsets"].shape == (12, 12, 2)


def test_a_blanked_scan_row_is_not_a_line_offset():
    # at 1e3 counts origins are pooled; the blanked row's own origins are failures, which
    # the line offsets once took for that row's offset (3.1 px off instead of 0.07)
    dc, truth = simulate_datacube((8, 8), (96, 96), "crystal", 1e3, (1.02, 0.5), seed=46_000_001)
    data = dc.data.copy()
    data[5] = 0
    import py4DSTEM

    out = prenet.preprocess(py4DSTEM.DataCube(data=data), progress=False, ellipse=False)
    err = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1)
    assert err[5].mean() < 0.3 and np.delete(err, 5, axis=0).mean() < 0.2
    assert not np.any(out.metadata["prenet"]["origin_line_offsets"])


def test_rings_behind_a_stop_are_calibrated_from_their_intensity_and_the_descan():
    dc, truth = _rings_behind_stop((6, 6))
    out = prenet.preprocess(dc, ellipse=False, progress=False, mask=truth.transmission > 0.5)
    md = out.metadata["prenet"]
    err = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1)
    assert np.all(md["origin_source"] == 8) and np.all(np.isnan(md["origin_symmetry"]))
    assert err.mean() < 0.3 and err.max() < 1.0
    assert md["origin_descan_smoothed"] == (md["origin_scatter"] > NOISY_ORIGIN_PX)


def test_pooled_noisy_origins_take_the_descan_fit():
    # rings behind a stop at 1e3 counts (dev seed): every origin is measured on its 3 x 3
    # neighbourhood's sum, whose noise neighbours share, so their differences understate it
    from py4dstem_prenet.preprocess import POOLED_SHARED

    dc, truth = _rings_behind_stop((12, 12), 1e3, seed=32_004_400)
    out = prenet.preprocess(dc, denoise=False, ellipse=False, progress=False, mask=truth.transmission > 0.5)
    md = out.metadata["prenet"]
    final = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1).mean()
    measured = np.linalg.norm(md["origin_measured"] - truth.origin, axis=-1).mean()
    white, _, _ = origin_scatter(md["origin_measured"].reshape(-1, 2), (12, 12),
                                 (md["origin_line_offsets"] + md["origin_ripple"]).reshape(-1, 2))
    assert md["origin_pooled"] == 144 and white < NOISY_ORIGIN_PX < md["origin_scatter"]
    assert md["origin_scatter"] == pytest.approx(white / np.sqrt(1 - POOLED_SHARED))
    assert md["origin_descan_smoothed"] and final < 0.8 * measured


def test_well_measured_origins_are_not_smoothed():
    dc, truth = simulate_datacube((6, 6), (128, 128), "crystal", 1e5, (1.02, 0.6), seed=33_000_211)
    out = prenet.preprocess(dc, ellipse=False, progress=False)
    md = out.metadata["prenet"]
    assert not md["origin_descan_smoothed"] and md["origin_scatter"] < NOISY_ORIGIN_PX
    # at 1e5 counts the measurement noise is a small part of the scatter: the origins stay
    # within a small fraction of it of the measured ones
    assert md["origin_shrinkage"] > 0.9
    assert np.allclose(np.stack(out.calibration.get_origin(), -1), md["origin_measured"], atol=0.01)


def test_stop_region_is_the_stops_thick_part_not_its_rod():
    from py4dstem_prenet.engine import _stop_region

    yy, xx = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    stop = (yy - 53) ** 2 + (xx - 68) ** 2 <= 17**2
    stop |= (np.abs(xx - 68 - 0.4 * (yy - 53)) <= 3) & (yy > 53)  # a rod 7 px wide to the detector's edge
    valid = torch.from_numpy(~stop)
    # a bright-field disk of radius 12 hidden whole: its centre is within 5 px of the stop's
    # centre (the region: the half-depth core, 8.5 px, widened by 2), never on the rod
    region = _stop_region(valid, 12.0)[0].numpy()
    assert region[53, 68] and region[53 + 10, 68] and not region[53 + 11, 68]
    assert not region[110, 68 + 23] and not region[stop & ~region].all()
    # a small disk (radius 5) may sit anywhere it is hidden: up to 12 px from the centre
    assert _stop_region(valid, 5.0)[0, 53 + 13, 68] and not _stop_region(valid, 5.0)[0, 53 + 15, 68]
    # no stop: a dead band 5 px wide alone has no core
    assert _stop_region(torch.from_numpy(~(np.abs(xx - 60) <= 2)), 5.0) is None


def test_only_sub_pixel_scatter_counts_as_noise_about_the_descan():
    assert not origins_are_noise(0.1, 0.1)  # the pattern pins the origin down: keep it
    assert origins_are_noise(0.5, 0.6)  # speckle-limited rings: the descan fit is better
    assert not origins_are_noise(0.5, 2.0)  # structure the parabola misses
    # wrong disks and lattice points, not noise: a fit through them put every origin 0.4-88 px off
    assert not origins_are_noise(22.0, 16.8)


def test_descan_shrinkage_is_a_wiener_weight():
    from py4dstem_prenet.preprocess import descan_shrinkage

    assert descan_shrinkage(0.1, 0.05) == pytest.approx(0.75)
    assert descan_shrinkage(0.1, 0.2) == 0.0  # all of the scatter is noise
    assert descan_shrinkage(0.0, 0.05) == 1.0 and descan_shrinkage(0.1, 0.0) == 1.0
    for bad in ((-0.1, 0.05), (0.1, float("nan")), (float("inf"), 0.05)):
        with pytest.raises(ValueError, match="finite and >= 0"):
            descan_shrinkage(*bad)


def test_origin_noise_by_binomial_thinning_scales_with_dose():
    from py4dstem_prenet.engine import PreNet
    from py4dstem_prenet.preprocess import origin_noise

    engine = PreNet(ellipse=False)
    found = {}
    for dose in (1e4, 1e6):
        dc, truth = simulate_datacube((5, 5), (96, 96), "crystal", dose, (1.02, 0.6), seed=33_000_031)
        before = dc.data.copy()
        res = engine.run(dc.data.reshape(25, 96, 96))
        found[dose] = origin_noise(engine, dc.data, res["origin"], res["origin_source"], res["counts"])
        assert np.array_equal(dc.data, before)
        err = np.linalg.norm(res["origin"] - truth.origin.reshape(-1, 2), axis=1)
        if dose == 1e4:  # the measured origins scatter about the truth by about the noise
            assert 0.3 * np.sqrt(np.mean(err**2)) < found[dose] < 3 * np.sqrt(np.mean(err**2))
    assert found[1e4] > 4 * found[1e6]  # sqrt(100) = 10 if the estimator were efficient at both
    # counts in other units (a scaled recording) are split as counts; not counts (continuous
    # values: flat-fielded), or too few patterns: no estimate (res: the 1e6 scan)
    assert origin_noise(engine, np.float32(1.37) * dc.data, res["origin"], res["origin_source"],
                        res["counts"]) == pytest.approx(found[1e6], rel=1e-6)
    flat = dc.data * np.random.default_rng(0).uniform(0.95, 1.05, dc.data.shape[2:]).astype(np.float32)
    assert origin_noise(engine, flat, res["origin"], res["origin_source"], res["counts"]) is None
    assert origin_noise(engine, dc.data[:2], res["origin"][:10], res["origin_source"][:10], res["counts"][:10]) is None
    with pytest.raises(ValueError, match="one entry per pattern|for its N patterns"):
        origin_noise(engine, dc.data, res["origin"][:10], res["origin_source"], res["counts"])
    with pytest.raises(ValueError, match="4D"):
        origin_noise(engine, dc.data.reshape(25, 96, 96), res["origin"], res["origin_source"], res["counts"])


def test_preprocess_shrinks_origins_towards_the_descan_by_their_noise():
    # a development scan at 1e4 counts (the benchmark's crystal condition, seed disjoint from
    # it): the per-pattern noise (0.063 px) is most of the origins' scatter about the descan
    from py4dstem_prenet.evaluation.benchmark import BenchmarkConfig

    dc, truth = simulate_datacube((12, 12), (128, 128), "crystal", 1e4, BenchmarkConfig().ellipse, seed=30_002_001)
    out = prenet.preprocess(dc, denoise=False, ellipse=False, progress=False)
    md = out.metadata["prenet"]
    final = np.linalg.norm(np.stack(out.calibration.get_origin(), -1) - truth.origin, axis=-1).mean()
    measured = np.linalg.norm(md["origin_measured"] - truth.origin, axis=-1).mean()
    assert 0.3 < md["origin_shrinkage"] < 0.9 and 0.03 < md["origin_noise"] < 0.1
    assert final < 0.92 * measured


def _lattice_under_stop(seed=0, envelope=35.0, stop_offset=None, stop_radius=24.0):
    """Poisson counts of a lattice of disks (radius 6) whose intensity falls off about the
    origin (the Bragg disks' envelope a Gaussian of ``envelope`` px), and a stop of
    ``stop_radius`` px centred ``stop_offset`` (2,) px from the origin; by default one
    (radius 24) that hides the origin's disk and its neighbour at origin + a: the disks'
    edges are about as symmetric about either, the envelope about the origin alone."""
    rng = np.random.default_rng(seed)
    origin, a, b = np.array([60.3, 58.7]), np.array([20.0, 3.0]), np.array([-4.0, 19.0])
    rr, cc = np.indices((128, 128))
    expected = 5.0 * np.exp(-np.hypot(rr - origin[0], cc - origin[1]) / 30.0)
    for i in range(-6, 7):
        for j in range(-6, 7):
            p = origin + i * a + j * b
            d2 = (rr - p[0]) ** 2 + (cc - p[1]) ** 2
            expected += (1000.0 if i == j == 0 else 200.0 * np.exp(-np.sum((p - origin) ** 2) / (2 * envelope**2))) * (
                d2 <= 36)
    centre = origin + (a / 2 if stop_offset is None else np.asarray(stop_offset, float))
    stop = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= stop_radius**2
    x = torch.from_numpy(np.where(stop, 0.0, rng.poisson(expected)).astype(np.float32))[None, None]
    return x, torch.from_numpy(~stop), origin, a


def test_an_origin_on_another_lattice_point_under_a_stop_moves_to_the_intensitys_centre():
    from py4dstem_prenet.engine import _intensity_under_stop, _stop_region
    from py4dstem_prenet.refine import intensity_symmetry_map

    x, valid, origin, a = _lattice_under_stop()
    region = _stop_region(valid, 6.0)
    maps = intensity_symmetry_map(x, valid, min_overlap=0.4)
    s_true, s_wrong = np.round(2 * origin).astype(int), np.round(2 * (origin + a)).astype(int)
    assert maps.shape == (1, 256, 256) and maps[0, s_true[0], s_true[1]] > maps[0, s_wrong[0], s_wrong[1]] + 0.2
    before = x.clone()
    wrong = torch.tensor([origin + a])
    moved, o, score = _intensity_under_stop(x, valid, region, wrong, torch.tensor([0.5]), 6.0, torch.tensor([True]),
                                            torch.tensor([False]))
    assert moved.item() and np.hypot(*(o[0].numpy() - origin)) < 0.5 and torch.isfinite(score).all()
    # an origin already there stays, and the inputs are not changed
    right = torch.tensor([origin])
    moved, o, _ = _intensity_under_stop(x, valid, region, right, torch.tensor([0.5]), 6.0, torch.tensor([True]),
                                        torch.tensor([False]))
    assert not moved.item() and torch.equal(o, right) and torch.equal(x, before)
    moved, _, _ = _intensity_under_stop(x, valid, region, wrong, torch.tensor([0.5]), 6.0, torch.tensor([False]),
                                        torch.tensor([False]))
    assert not moved.item()
    with pytest.raises(ValueError, match="valid"):
        intensity_symmetry_map(x, torch.ones(31, 32, dtype=torch.bool))


def test_an_origin_beside_a_stop_off_the_beam_stays_where_the_intensity_is_symmetric():
    # the stop's tip lies 12 px off the direct beam: the bright-field disk is mostly in view
    # and the origin outside the stop's region, which holds the lattice point origin + a;
    # the Bragg disks' envelope (20 px) falls off about the origin alone
    from py4dstem_prenet.engine import _inside, _stop_region, _under_given_stop
    from py4dstem_prenet.refine import symmetry_centre

    x, valid, origin, a = _lattice_under_stop(seed=1, envelope=20.0, stop_offset=(12.0, 0.0), stop_radius=14.0)
    region = _stop_region(valid, 6.0)
    here = torch.tensor([origin])
    assert not _inside(region, here).item() and _inside(region, torch.tensor([origin + a])).item()
    score = symmetry_centre(x, search=2.0, valid=valid)[1]
    # the lattice point under the stop is symmetric enough in its edges for the stop prior
    sg = symmetry_centre(x, search=2.0, valid=valid, min_overlap=0.15, allowed=region)[1]
    assert sg.item() >= 0.5 * score.item()
    moved, o, _ = _under_given_stop(x, valid, region, here, score, torch.tensor([True]))
    assert not moved.item() and torch.equal(o, here)


def test_an_origin_placed_at_the_detectors_edge_by_the_stop_search_moves_to_the_intensitys_centre():
    # _under_given_stop can place an origin on a stop's rod near the detector's edge, a
    # few pixels outside the stop's region after its sub-pixel refinement; the inversion
    # about it keeps too little of the detector for its intensity to be scored there
    from py4dstem_prenet.engine import INTENSITY_MIN_SCORE, _inside, _intensity_under_stop, _stop_region
    from py4dstem_prenet.refine import intensity_symmetry_map

    x, valid, origin, a = _lattice_under_stop()
    region = _stop_region(valid, 6.0)
    edge = torch.tensor([[124.0, 60.0]])
    maps = intensity_symmetry_map(x, valid, min_overlap=0.4)
    assert not _inside(region, edge).item() and maps[0, 248, 120] == -1
    assert maps[0, round(2 * origin[0]), round(2 * origin[1])] >= INTENSITY_MIN_SCORE
    moved, o, score = _intensity_under_stop(x, valid, region, edge, torch.tensor([0.9]), 6.0, torch.tensor([True]),
                                            torch.tensor([True]))
    assert moved.item() and np.hypot(*(o[0].numpy() - origin)) < 0.5 and torch.isfinite(score).all()
    # not placed there by the stop search, an origin outside the region stays
    moved, o, _ = _intensity_under_stop(x, valid, region, edge, torch.tensor([0.9]), 6.0, torch.tensor([True]),
                                        torch.tensor([False]))
    assert not moved.item() and torch.equal(o, edge)


def test_combine_disk_fit_is_an_inverse_variance_mean():
    from py4dstem_prenet.preprocess import combine_disk_fit

    origin = np.zeros((5, 2))
    fit = np.ones((5, 2))
    fit[4] = np.nan  # no fit
    sigma = np.array([0.05, 0.1, 0.05, 0.05, 0.05])
    source = np.array([1, 2, 0, 1, 1], np.int8)  # pattern 2: the network's origin
    counts = np.array([1e4, 1e4, 1e4, 1e3, 1e4])  # pattern 3: read denoised (below LOW_DOSE_COUNTS)
    before = [a.copy() for a in (origin, fit, sigma, source, counts)]
    out, noise, n = combine_disk_fit(origin, fit, sigma, source, counts, 0.05)
    for a, b in zip((origin, fit, sigma, source, counts), before):
        assert np.array_equal(a, b, equal_nan=True)
    assert n == 2
    assert np.allclose(out[0], 0.5) and np.allclose(out[1], 0.2)  # weights 1/2 and 0.05^2 / (0.1^2 + 0.05^2)
    assert np.array_equal(out[2:], origin[2:])
    # noise: 0.05 / sqrt(2) where the two are equal, 0.05 x sqrt(0.8) at 1 : 4, 0.05 unweighed
    expected = np.sqrt(np.mean([0.05**2 / 2, 0.8 * 0.05**2, 0.05**2, 0.05**2, 0.05**2]))
    assert noise == pytest.approx(expected)
    with pytest.raises(ValueError, match="finite and > 0"):
        combine_disk_fit(origin, fit, sigma, source, counts, 0.0)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        combine_disk_fit(origin, fit[:4], sigma, source, counts, 0.05)


def test_preprocess_weighs_in_the_bright_field_disk_fit(monkeypatch):
    # a development crystal scan at 1e5 counts (seed disjoint from the benchmark's): the
    # symmetry centres weighed against their bright-field disk's fit are nearer the truth
    # (RMS 0.0206 -> 0.0201 px; see DISK_FIT_SIGMA_SCALE for 12 x 12 dev scans)
    pp = sys.modules["py4dstem_prenet.preprocess"]
    dc, truth = simulate_datacube((8, 8), (128, 128), "crystal", 1e5, (1.02, 0.6), seed=33_000_041)
    rms = {}
    for scale in (1e9, pp.DISK_FIT_SIGMA_SCALE):  # 1e9: the fit weighs nothing
        monkeypatch.setattr(pp, "DISK_FIT_SIGMA_SCALE", scale)
        out = prenet.preprocess(dc, denoise=False, ellipse=False, progress=False)
        err = np.stack(out.calibration.get_origin(), -1) - truth.origin
        rms[scale] = np.sqrt(np.mean(np.sum(err**2, -1)))
        assert out.metadata["prenet"]["origin_disk_weighed"] > 32
    assert rms[pp.DISK_FIT_SIGMA_SCALE] < 0.99 * rms[1e9]
