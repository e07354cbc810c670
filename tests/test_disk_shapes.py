"""The ellipse from the shapes of every disk (bright-field and Bragg), fitted pattern by pattern."""

import sys

import numpy as np
import pytest
import torch

import py4dstem_prenet as prenet
from py4dstem_prenet.conventions import angle_difference, distortion_matrix, ellipse_to_e12
from py4dstem_prenet.engine import DISK_SHAPE_FLOOR, PreNet, combine_disk_ellipses, disk_offsets
from py4dstem_prenet.refine import disk_ellipses, disk_fits
from py4dstem_prenet.simulation import Detector, Scene, render, simulate_datacube

SPOTS = np.array([[0.0, 0.0], [30.0, 5.0], [-10.0, 28.0], [25.0, -27.0], [-31.0, -6.0]])


def _scan(ratio: float, theta: float, n: int = 12, dose: float = 400.0, seed: int = 0):
    """Poisson patterns of a bright-field disk and four Bragg disks (radius 9 px) at random origins."""
    rng = np.random.default_rng(seed)
    scene = Scene(disk_radius=9.0, edge_width=0.5, spots=SPOTS, spot_intensity=np.array([1.0, 0.5, 0.7, 0.6, 0.4]))
    origin = np.array([62.0, 65.0]) + rng.uniform(-3, 3, (n, 2))
    patterns = np.stack([rng.poisson(render(scene, (128, 128), o, ratio, theta) * dose) for o in origin])
    return patterns.astype(np.float32), origin


def test_disk_ellipses_measure_the_distortion_from_every_disk():
    ratio, theta = 1.03, 0.4
    patterns, origin = _scan(ratio, theta)
    rng = np.random.default_rng(1)
    centre = (origin[:, None] + SPOTS @ distortion_matrix(ratio, theta).T).reshape(-1, 2)
    centre = centre + rng.uniform(-0.4, 0.4, centre.shape)  # first centres a few tenths off
    which = np.repeat(np.arange(len(origin)), len(SPOTS))
    x = torch.from_numpy(patterns)[:, None]
    before = x.clone()
    e12, cov, ok = disk_ellipses(x, torch.from_numpy(centre), 9.0, torch.from_numpy(which), edge_width=0.7)
    assert torch.equal(x, before) and bool(ok.all())
    true = ellipse_to_e12(ratio, theta)
    # each disk, the Bragg disks as well as the bright-field disk, agrees with the distortion
    # within its own standard error plus the pixel sampling's
    z = (e12.numpy() - true) ** 2 / (np.diagonal(cov.numpy(), axis1=1, axis2=2) + DISK_SHAPE_FLOOR**2)
    assert z.max() < 16, z.max()
    est_ratio, est_theta, sigma = combine_disk_ellipses(e12.numpy(), cov.numpy())
    assert abs(est_ratio - ratio) < 0.002 and np.degrees(angle_difference(est_theta, theta)) < 1
    assert 0 < sigma < 0.001


def test_disk_fits_recover_each_disks_centre_radius_and_edge():
    patterns, origin = _scan(1.0, 0.0, n=4, dose=4000.0, seed=5)
    centre = (origin[:, None] + SPOTS).reshape(-1, 2)
    which = torch.from_numpy(np.repeat(np.arange(len(origin)), len(SPOTS)))
    first = torch.from_numpy(centre + 0.4)
    for shape_fit in (False, True):
        fit = disk_fits(torch.from_numpy(patterns)[:, None], first, 8.0, which, edge_width=1.0, shape_fit=shape_fit)
        assert bool(fit.ok.all()) and torch.equal(first, torch.from_numpy(centre + 0.4))
        err = np.linalg.norm(fit.centre.numpy() - centre, axis=1)
        assert err.max() < 4 * fit.sigma.max() and fit.sigma.max() < 0.05, (err, fit.sigma)
        assert np.allclose(fit.shape[:, 2].numpy(), 9.0, atol=0.1)  # the true radius, from a first 8 px
        # the simulated edge, a linear ramp 0.5 px wide: an error function of sigma 0.5 / sqrt(12)
        assert np.all(np.abs(np.exp(fit.shape[:, 3].numpy()) - 0.5 / np.sqrt(12)) < 0.05)
        assert fit.covariance.shape == (len(centre), 6, 6)
    with pytest.raises(ValueError, match="shape_fit"):
        disk_fits(torch.from_numpy(patterns)[:, None], first, 8.0, which, shape_fit=1)


def test_disk_ellipses_of_round_disks_are_round():
    patterns, origin = _scan(1.0, 0.0, n=8, dose=2000.0, seed=3)
    centre = (origin[:, None] + SPOTS).reshape(-1, 2)
    which = np.repeat(np.arange(len(origin)), len(SPOTS))
    e12, cov, ok = disk_ellipses(torch.from_numpy(patterns)[:, None], torch.from_numpy(centre), 9.0,
                                 torch.from_numpy(which))
    ratio, _, sigma = combine_disk_ellipses(e12[ok].numpy(), cov[ok].numpy())
    assert ratio - 1 < 0.0015 and sigma < 0.001


def test_a_fit_with_a_covariance_not_positive_definite_or_a_collapsed_edge_does_not_count(monkeypatch):
    import py4dstem_prenet.refine as refine

    patterns, origin = _scan(1.0, 0.0, n=2, dose=2000.0, seed=3)
    centre = torch.from_numpy((origin[:, None] + SPOTS).reshape(-1, 2))
    which = torch.from_numpy(np.repeat(np.arange(len(origin)), len(SPOTS)))

    def broken(*args, **kwargs):
        fit = disk_fits(*args, **kwargs)
        cov, shape = fit.covariance.clone(), fit.shape.clone()
        cov[0] = -cov[0]  # negative-definite, its determinant positive
        shape[1, 3] = np.log(0.001)  # an edge collapsed to a step between pixel centres
        return fit._replace(covariance=cov, shape=shape)

    monkeypatch.setattr(refine, "disk_fits", broken)
    e12, cov, ok = disk_ellipses(torch.from_numpy(patterns)[:, None], centre, 9.0, which)
    assert not ok[:2].any() and bool(ok[2:].all()) and torch.isnan(cov[:2]).all()


def test_disk_ellipses_answer_bad_input_clearly():
    x = torch.zeros(2, 1, 64, 64)
    c = torch.tensor([[30.0, 30.0]])
    w = torch.tensor([0])
    with pytest.raises(ValueError, match="which"):
        disk_ellipses(x, c, 8.0, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="which must index"):
        disk_ellipses(x, c, 8.0, torch.tensor([2]))
    with pytest.raises(ValueError, match="centres"):
        disk_ellipses(x, torch.tensor([30.0, 30.0]), 8.0, w)
    with pytest.raises(ValueError, match="radius"):
        disk_ellipses(x, c, -1.0, w)
    with pytest.raises(ValueError, match="edge_width"):
        disk_ellipses(x, c, 8.0, w, edge_width=0.0)
    with pytest.raises(ValueError, match="iterations"):
        disk_ellipses(x, c, 8.0, w, iterations=0)
    with pytest.raises(ValueError, match="patterns"):
        disk_ellipses(x[:, 0], c, 8.0, w)
    # a disk that is not there is not a fit that counts
    e12, cov, ok = disk_ellipses(x + 5.0, c, 8.0, w)
    assert not ok.any() and torch.isnan(e12).all()


def test_combine_disk_ellipses_weighs_down_stray_fits():
    rng = np.random.default_rng(4)
    true = ellipse_to_e12(1.02, 2.0)
    e12 = true + rng.normal(0, 0.003, (200, 2))
    e12[:10] = [0.05, -0.04]  # a neighbour's edge in the window, a wrong disk
    cov = np.tile(np.eye(2) * 0.003**2, (200, 1, 1))
    before = e12.copy()
    ratio, theta, sigma = combine_disk_ellipses(e12, cov)
    assert np.array_equal(e12, before)
    assert abs(ratio - 1.02) < 0.001 and np.degrees(angle_difference(theta, 2.0)) < 2
    # the floor and the scatter: about (0.003^2 + floor^2)^0.5 / sqrt(200)
    assert 0.0002 < sigma < 0.0006
    with pytest.raises(ValueError, match="K >= 2"):
        combine_disk_ellipses(e12[:1], cov[:1])
    with pytest.raises(ValueError, match="covariance"):
        combine_disk_ellipses(e12, cov[:, :1])
    with pytest.raises(ValueError, match="finite"):
        combine_disk_ellipses(np.where(np.arange(200)[:, None] == 3, np.nan, e12), cov)
    # a negative-definite covariance (positive determinant) is no fit that counts
    bad = cov.copy()
    bad[5] = -bad[5]
    with pytest.raises(ValueError, match="positive-definite"):
        combine_disk_ellipses(e12, bad)


def test_disk_offsets_find_the_disks_on_the_aligned_mean():
    ratio, theta = 1.02, 1.1
    patterns, origin = _scan(ratio, theta, n=16, dose=200.0, seed=5)
    engine = PreNet(denoise=False, center=False, ellipse=False)
    part = engine.aligned_sum(patterns, origin)
    assert part["aligned cover"].max() == len(origin)
    lost = origin.copy()
    lost[0] = np.nan  # a pattern without an origin is left out
    assert engine.aligned_sum(patterns, lost)["aligned cover"].max() == len(origin) - 1
    offsets, radius, width = disk_offsets(part["aligned"], part["aligned cover"], 8.0)
    true = SPOTS @ distortion_matrix(ratio, theta).T
    # every disk found, each within a pixel (the whole-pixel alignment blurs by up to half a pixel)
    dist = np.linalg.norm(offsets[:, None] - true[None], axis=-1)
    assert len(offsets) >= 4 and np.all(dist.min(axis=1) < 1.0)
    assert abs(radius - 9.0) < 0.3 and 0.2 < width < 1.5
    empty = disk_offsets(np.zeros((64, 64)), np.zeros((64, 64)), 8.0)
    assert len(empty[0]) == 0
    with pytest.raises(ValueError, match="one shape"):
        disk_offsets(part["aligned"], part["aligned cover"][:-1], 8.0)
    with pytest.raises(ValueError, match="radius"):
        disk_offsets(part["aligned"], part["aligned cover"], 0.0)


def test_disk_offsets_on_a_large_detector_in_seconds():
    # the disk-kernel smoothing was a direct convolution, whose cost grows with the radius squared:
    # 14 s on one 1024^2 mean of 60 px disks, 330 s for a whole 2048^2 pattern
    import time

    scene = Scene(disk_radius=60.0, edge_width=2.0, spots=SPOTS * 11,
                  spot_intensity=np.array([1.0, 0.5, 0.7, 0.6, 0.4]))
    mean = render(scene, (1024, 1024), (512.0, 512.0), 1.0, 0.0) * 100
    t = time.perf_counter()
    offsets, radius, _ = disk_offsets(mean, np.ones_like(mean), 60.0)
    assert time.perf_counter() - t < 5
    dist = np.linalg.norm(offsets[:, None] - SPOTS[None] * 11, axis=-1)
    assert len(offsets) >= 4 and np.all(dist.min(axis=1) < 0.5) and abs(radius - 60.0) < 1


def test_preprocess_takes_a_crystals_ellipse_from_its_disk_shapes():
    dc, truth = simulate_datacube((6, 6), (128, 128), "crystal", 1e5, (1.03, 1.0), detector=Detector(), seed=31)
    before = dc.data.copy()
    out = prenet.preprocess(dc, denoise=False, progress=False)
    md = out.metadata["prenet"]
    assert np.array_equal(dc.data, before)
    assert md["ellipse_refined_band"] == "disk shapes" and md["ellipse_disk_fits"] >= 30
    a, b, theta = out.calibration.get_ellipse()
    assert abs(a / b - 1.03) < 0.002 and np.degrees(angle_difference(theta, 1.0)) < 1


@pytest.mark.slow
def test_a_crystal_behind_a_beam_stop_gets_its_ellipse_from_the_bragg_disks():
    # the stop hides the bright-field disk: the log-polar fit had no edge to fit (the network's
    # a/b = 1.011, 18 degrees off, on this scan); the Bragg disks' shapes still carry the ellipse
    dc, t = simulate_datacube((6, 6), (128, 128), "crystal", 1e5, (1.03, 0.5), detector=Detector(), beam_stop=True,
                              seed=31)
    out = prenet.preprocess(dc, denoise=False, progress=False, mask=t.transmission > 0.5)
    assert out.metadata["prenet"]["ellipse_refined_band"] == "disk shapes"
    a, b, theta = out.calibration.get_ellipse()
    assert abs(a / b - 1.03) < 0.002 and np.degrees(angle_difference(theta, 0.5)) < 1


def test_a_mixed_scan_takes_the_disk_shapes_only_where_they_beat_its_rings(monkeypatch):
    # a strip of amorphous film beside a crystal: the log-polar fit of the ring patterns carries
    # the ellipse unless the crystal's disk shapes have a standard error under MIXED_SHAPES_MAX_SIGMA
    from py4dstem_prenet.simulation.strain import simulate_strain_datacube

    pp = sys.modules["py4dstem_prenet.preprocess"]
    dc, truth = simulate_strain_datacube((8, 6), dose=1e5, seed=5, ellipse=(1.03, 0.4), grain_rotation_deg=(0.0,))
    before = dc.data.copy()
    bands = {}
    for limit in (0.0, 1.0):
        monkeypatch.setattr(pp, "MIXED_SHAPES_MAX_SIGMA", limit)
        out = prenet.preprocess(dc, denoise=False, progress=False)
        md = out.metadata["prenet"]
        bands[limit] = md["ellipse_refined_band"]
        a, b, theta = out.calibration.get_ellipse()
        assert abs(a / b - 1.03) < 0.003 and np.degrees(angle_difference(theta, 0.4)) < 3
    assert bands == {0.0: "isotropic patterns", 1.0: "disk shapes"}
    assert np.array_equal(dc.data, before)


def test_smallest_eigenvalue_of_2x2_matrices():
    from py4dstem_prenet.refine import smallest_eigenvalue

    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 2, 2))
    c = a @ a.transpose(0, 2, 1) - 0.5 * np.eye(2)  # some positive-, some indefinite
    expected = np.linalg.eigvalsh(c)[:, 0]
    assert np.allclose(smallest_eigenvalue(c), expected)
    assert torch.allclose(smallest_eigenvalue(torch.from_numpy(c)), torch.from_numpy(expected))
    assert smallest_eigenvalue(-np.eye(2)) == -1.0  # negative-definite, determinant 1
    with pytest.raises(ValueError, match="2, 2"):
        smallest_eigenvalue(np.ones((3, 3)))
