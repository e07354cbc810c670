import time

import numpy as np
import pytest
from scipy import ndimage

from py4dstem_prenet.simulation import (KINDS, Detector, Scene, beam_stop_mask, descan_origin, random_scene, render,
                                        scale_to_dose, simulate_datacube, simulate_patterns)
from py4dstem_prenet.simulation.crystals import kinematic_spots, random_lattice_spots


def test_render_disk_centre_is_the_origin():
    img = render(Scene(disk_radius=7.0), (64, 80), (30.3, 41.8))
    np.testing.assert_allclose(ndimage.center_of_mass(img), (30.3, 41.8), atol=0.01)


def test_render_ellipse_stretches_disk_along_theta():
    img = render(Scene(disk_radius=10.0, edge_width=0.5), (96, 96), (48.0, 48.0), ratio=1.2, theta=0.0)
    rows = np.sum(img > 0.5, axis=0).max()
    cols = np.sum(img > 0.5, axis=1).max()
    assert rows == pytest.approx(24, abs=1.5) and cols == pytest.approx(20, abs=1.5)


def test_texture_moves_centre_of_mass_not_the_edge():
    flat = render(Scene(disk_radius=8.0), (64, 64), (32.0, 32.0))
    tex = render(Scene(disk_radius=8.0, texture=[[0.5, 0.0, 0.0]]), (64, 64), (32.0, 32.0))
    assert ndimage.center_of_mass(tex)[0] - 32.0 > 0.5
    assert np.array_equal(flat > 0, tex > 0)


def test_render_bad_input():
    with pytest.raises(ValueError, match="origin"):
        render(Scene(disk_radius=3.0), (32, 32), (np.nan, 1.0))
    with pytest.raises(ValueError, match="detector shape"):
        render(Scene(disk_radius=3.0), (2, 32), (1.0, 1.0))
    with pytest.raises(ValueError, match="disk_radius"):
        Scene(disk_radius=-1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_random_scene_kinds(kind):
    scene = random_scene(np.random.default_rng(0), (128, 128), kind)
    assert scene.kind == kind and scene.spots[0].tolist() == [0.0, 0.0]
    img = render(scene, (128, 128), (64.0, 64.0), 1.02, 0.3)
    assert np.all(img >= 0) and img.max() > 0


def test_kinematic_spots_and_bad_structure():
    g, inten = kinematic_spots("Si", (0, 0, 1))
    assert g.shape[1] == 2 and len(g) == len(inten) > 5
    with pytest.raises(KeyError):
        kinematic_spots("Unobtainium", (0, 0, 1))
    with pytest.raises(ValueError):
        kinematic_spots("Si", (0, 0, 0))
    g, inten = random_lattice_spots(np.random.default_rng(1), 4.0)
    assert np.all(np.hypot(g[:, 0], g[:, 1]) <= 4.0)


def test_detector_poisson_statistics_and_defects():
    rng = np.random.default_rng(0)
    det = Detector(gain=2.0, background=1.0)
    lam = np.full((200, 200), 4.0)
    rec = det.record(lam, rng)
    assert rec.mean() == pytest.approx(2 * 4 + 1, rel=0.02)
    assert rec.var() == pytest.approx(4 * 4, rel=0.05)
    det = Detector(hot_fraction=0.01, dead_fraction=0.01, saturation=50.0)
    hot, dead = det.defect_masks(rng, lam.shape)
    rec = det.record(lam, rng, hot, dead)
    assert np.all(rec[dead] == 0) and np.all(rec <= 50.0) and np.all(rec[hot] == 20.0)
    with pytest.raises(ValueError):
        Detector(gain=0)
    with pytest.raises(ValueError):
        det.record(-lam, rng)


def test_scale_to_dose_and_beam_stop():
    x = np.ones((3, 8, 8))
    y = scale_to_dose(x, 640.0)
    np.testing.assert_allclose(y.sum(axis=(1, 2)), 640.0)
    assert np.all(x == 1)
    with pytest.raises(ValueError):
        scale_to_dose(x, 0.0)
    m = beam_stop_mask((32, 32), (16, 16), 3.0, 0.0, 2.0)
    assert m[16, 16] == 0 and m[30, 16] == 0 and m[2, 16] == 1 and m[16, 28] == 1


def test_descan_origin_is_smooth_plus_jitter():
    o = descan_origin(np.random.default_rng(0), (20, 30), (128, 128), amplitude=4.0, curvature=0.0, jitter=0.0)
    assert o.shape == (20, 30, 2)
    assert np.ptp(o[..., 0]) == pytest.approx(4.0)
    assert np.abs(np.diff(o[..., 0], 2, axis=0)).max() < 1e-9  # a plane
    with pytest.raises(ValueError):
        descan_origin(np.random.default_rng(0), (0, 3), (64, 64))


def test_rough_descan_adds_line_offsets_flyback_and_ripple():
    args = (np.random.default_rng(3), (12, 16), (128, 128))
    smooth = descan_origin(*args, jitter=0.0)
    # the smooth scan is the same random draw with the rough parts off
    assert np.array_equal(descan_origin(np.random.default_rng(3), (12, 16), (128, 128), jitter=0.0,
                                        line_jitter=0.0, flyback=0.0, ripple=0.0), smooth)
    rows = descan_origin(np.random.default_rng(3), (12, 16), (128, 128), jitter=0.0, line_jitter=0.5) - smooth
    assert np.allclose(rows, rows[:, :1]) and 0.2 < rows.std() < 1.0  # one offset per scan row
    lag = descan_origin(np.random.default_rng(3), (12, 16), (128, 128), jitter=0.0, flyback=1.5) - smooth
    assert np.allclose(lag, lag[:1]) and np.linalg.norm(lag[0, 0]) == pytest.approx(1.5)
    assert np.linalg.norm(lag[0, -1]) < 1e-3  # settled by the end of the row
    wave = descan_origin(np.random.default_rng(3), (12, 16), (128, 128), jitter=0.0, ripple=1.0) - smooth
    assert 0.9 < np.linalg.norm(wave, axis=-1).max() <= 1.0 + 1e-9 and abs(wave.mean()) < 0.2
    with pytest.raises(ValueError, match="flyback"):
        descan_origin(*args, flyback=-1.0)


def test_simulate_datacube_shapes_truth_and_seed():
    dc, truth = simulate_datacube((3, 4), (64, 48), "mixed", 1e3, (1.03, 0.4), seed=7)
    assert dc.data.shape == (3, 4, 64, 48) and dc.data.dtype == np.float32
    assert truth.origin.shape == (3, 4, 2) and truth.clean.shape == dc.data.shape
    assert truth.ellipse == (1.03, 1.0, 0.4)
    np.testing.assert_allclose(truth.clean.sum(axis=(2, 3)), 1e3, rtol=1e-4)
    dc2, truth2 = simulate_datacube((3, 4), (64, 48), "mixed", 1e3, (1.03, 0.4), seed=7)
    assert np.array_equal(dc.data, dc2.data)


def test_simulate_datacube_with_beam_stop_and_crlb():
    dc, truth = simulate_datacube((2, 2), (64, 64), "vacuum", 1e4, (1.0, 0.0), beam_stop=True, seed=1,
                                  compute_crlb=True)
    assert (truth.transmission == 0).any()
    assert np.all(np.isfinite(truth.crlb)) and np.all(truth.crlb > 0)


def test_beam_stop_offset_moves_the_tip_off_the_beam_and_zero_keeps_the_centred_stop():
    from scipy import ndimage

    args = ((1, 1), (128, 128), "crystal", 1e4, (1.0, 0.0))
    _, centred = simulate_datacube(*args, beam_stop=True, seed=3)
    _, same = simulate_datacube(*args, beam_stop=True, beam_stop_offset=0.0, seed=3)
    assert np.array_equal(centred.transmission, same.transmission)  # the same random stream
    _, off = simulate_datacube(*args, beam_stop=True, beam_stop_offset=1.0, seed=3)
    o = np.round(off.origin.reshape(2)).astype(int)
    tip_radius = 1.3 * off.disk_radius + 3.0 / 2  # the default descan amplitude
    # the beam is at the tip's rim: the stop's depth there (distance to its edge) is a few px,
    # where the centred stop's is about the tip radius
    depth = ndimage.distance_transform_edt(off.transmission == 0)
    depth_centred = ndimage.distance_transform_edt(centred.transmission == 0)
    assert depth[o[0], o[1]] < 0.35 * tip_radius < 0.7 * tip_radius < depth_centred[o[0], o[1]]
    with pytest.raises(ValueError, match="beam_stop_offset"):
        simulate_datacube(*args, beam_stop=True, beam_stop_offset=1.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"dose": -1.0}, "dose"), ({"kind": "liquid"}, "kind"), ({"detector_shape": (8, 8)}, "detector_shape"),
    ({"scan_shape": (0, 2)}, "scan_shape"), ({"ellipse": (3.0, 0.0)}, "a/b"),
])
def test_simulate_datacube_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_datacube(**{"scan_shape": (2, 2), "detector_shape": (32, 32), **kwargs})


def test_simulate_patterns_labels_and_speed():
    rng = np.random.default_rng(0)
    simulate_patterns(20, (128, 128), rng)
    t0 = time.perf_counter()
    out = simulate_patterns(500, (128, 128), rng)
    per_pattern = (time.perf_counter() - t0) / 500
    assert per_pattern < 0.012  # 10,000 in < 60 s on one core of this machine has margin
    assert out["noisy"].shape == (500, 128, 128)
    assert np.all(out["ratio"] >= 1) and np.all((out["dose"] >= 1e2) & (out["dose"] <= 1e6))
    with pytest.raises(ValueError):
        simulate_patterns(0)


def test_simulate_patterns_wide_geometry():
    from py4dstem_prenet.simulation.datacube import WIDE_OFFSET, WIDE_RADIUS

    base = simulate_patterns(60, (96, 96), np.random.default_rng(3))
    r = base["disk_radius"] / 96
    assert r.min() >= 0.03 and r.max() <= 0.1
    assert np.abs(base["origin"] - 47.5).max() <= 0.15 * 96
    wide = simulate_patterns(60, (96, 96), np.random.default_rng(3), wide_fraction=1.0)
    r = wide["disk_radius"] / 96
    assert WIDE_RADIUS[0] <= r.min() < 0.03 and 0.1 < r.max() <= WIDE_RADIUS[1]
    assert 0.15 * 96 < np.abs(wide["origin"] - 47.5).max() <= WIDE_OFFSET * 96
    assert np.isfinite(wide["noisy"]).all() and (wide["clean"] >= 0).all()
    # the default stream is unchanged by the option
    again = simulate_patterns(60, (96, 96), np.random.default_rng(3), wide_fraction=0.0)
    assert all(np.array_equal(base[k], again[k]) for k in base)
    with pytest.raises(ValueError, match="wide_fraction"):
        simulate_patterns(2, (64, 64), wide_fraction=1.5)


@pytest.mark.slow
def test_ten_thousand_patterns_under_a_minute():
    t0 = time.perf_counter()
    simulate_patterns(10_000, (128, 128), np.random.default_rng(1))
    assert time.perf_counter() - t0 < 60


def test_rotation_rotates_the_ideal_pattern():
    scene = Scene(disk_radius=3.0, spots=[[0, 0], [20, 0]], spot_intensity=[1, 1])
    _, truth = simulate_datacube((1, 1), (96, 96), "crystal", 1e6, (1.0, 0.0), scene=scene, rotation=np.pi / 2,
                                 descan_amplitude=0, jitter=0, thickness_variation=0, seed=0)
    img = truth.clean[0, 0]
    o = truth.origin[0, 0]
    # the Bragg disk at +20 px along qx now sits at +20 px along qy
    assert img[int(round(o[0])), int(round(o[1] + 20))] > 0.5 * img.max()
    assert truth.rotation == pytest.approx(np.pi / 2)
