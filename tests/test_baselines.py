import numpy as np
import pytest

from py4dstem_prenet import baselines as B
from py4dstem_prenet.simulation import Detector, Scene, render, simulate_datacube


@pytest.fixture(scope="module")
def vacuum_scan():
    return simulate_datacube((4, 5), (64, 64), "vacuum", 1e6, (1.0, 0.0), scene=Scene(disk_radius=6.0),
                             detector=Detector(), seed=2)


def _err(qx0, qy0, truth):
    return np.hypot(qx0 - truth.origin[..., 0], qy0 - truth.origin[..., 1])


def test_get_origin_on_vacuum_is_accurate_and_input_unchanged(vacuum_scan):
    dc, truth = vacuum_scan
    before = dc.data.copy()
    qx0, qy0 = B.get_origin(dc)
    assert qx0.shape == (4, 5) and np.median(_err(qx0, qy0, truth)) < 0.05
    qx0, qy0 = B.get_origin_friedel(dc)
    assert np.median(_err(qx0, qy0, truth)) < 0.1
    assert np.array_equal(dc.data, before)
    qx0, qy0 = B.get_origin(dc.data)  # a bare 4D array works too
    assert np.median(_err(qx0, qy0, truth)) < 0.05


def test_fit_origin_recovers_a_plane():
    x, y = np.meshgrid(np.arange(6.0), np.arange(7.0), indexing="ij")
    qx0, qy0 = 30 + 0.5 * x - 0.2 * y, 40 + 0.1 * x
    fx, fy = B.fit_origin(qx0, qy0, "plane")
    np.testing.assert_allclose(fx, qx0, atol=1e-6)
    np.testing.assert_allclose(fy, qy0, atol=1e-6)
    with pytest.raises(ValueError):
        B.fit_origin(qx0, qy0[:3])
    with pytest.raises(ValueError):
        B.fit_origin(qx0, qy0, "spline")


def test_origin_bad_input():
    with pytest.raises(ValueError, match="DataCube or a 4D array"):
        B.get_origin(np.zeros((8, 8)))
    with pytest.raises(ValueError):
        B.get_origin(np.zeros((2, 2, 16, 16)), r=-1)


@pytest.mark.parametrize("ratio,theta", [(1.03, 0.4), (1.05, 2.5)])
def test_ellipse_fits_on_a_clean_ring(ratio, theta):
    scene = Scene(disk_radius=4.0, rings=[[30.0, 1.5, 1.0]])
    img = render(scene, (96, 96), (47.2, 48.6), ratio, theta)
    r, t = B.ellipse_fit_1d(img, (47.2, 48.6), (24, 38))
    assert r == pytest.approx(ratio, abs=2e-3) and np.degrees(abs(((t - theta) + np.pi / 2) % np.pi - np.pi / 2)) < 1
    r, t = B.ellipse_amorphous_ring(img, (47.2, 48.6), (20, 42))
    assert r == pytest.approx(ratio, abs=3e-3)
    with pytest.raises(ValueError, match="fitradii"):
        B.ellipse_fit_1d(img, (47, 48), (40, 20))


def test_aligned_mean_pattern_centres_patterns(vacuum_scan):
    dc, truth = vacuum_scan
    mean, centre = B.aligned_mean_pattern(dc, truth.origin[..., 0], truth.origin[..., 1])
    from scipy import ndimage
    np.testing.assert_allclose(ndimage.center_of_mass(mean), centre, atol=0.05)
    with pytest.raises(ValueError):
        B.aligned_mean_pattern(dc, truth.origin[:2, :, 0], truth.origin[:2, :, 1])


def test_ellipse_from_bragg_vectors_on_polycrystal():
    dc, truth = simulate_datacube((6, 6), (96, 96), "polycrystalline", 1e6, (1.04, 0.7), detector=Detector(),
                                  disk_radius=4.0, seed=4)
    ring = truth.scene.rings[int(np.argmax(truth.scene.rings[:, 2]))][0]
    bvm, centre = B.bragg_vector_map(dc, truth.origin[..., 0], truth.origin[..., 1], 4.0)
    assert bvm.shape == (96, 96) and bvm.sum() > 0
    with pytest.raises(ValueError):
        B.bragg_vector_map(dc, truth.origin[..., 0], truth.origin[..., 1], 0.0)
    assert np.isfinite(ring)


def test_denoisers_reduce_error_on_low_rank_poisson_data():
    dc, truth = simulate_datacube((8, 8), (48, 48), "vacuum", 2e3, (1.0, 0.0), detector=Detector(),
                                  scene=Scene(disk_radius=8.0), seed=3, descan_amplitude=0.0, jitter=0.0)
    noisy = dc.data.copy()
    base = np.mean((noisy - truth.clean) ** 2)
    g = B.gaussian_denoise(noisy, 1.0)
    t = B.tensor_svd_denoise(noisy)
    assert np.mean((g - truth.clean) ** 2) < base and np.mean((t - truth.clean) ** 2) < 0.5 * base
    assert np.array_equal(noisy, dc.data) and t.shape == noisy.shape and np.all(t >= 0)
    with pytest.raises(ValueError):
        B.gaussian_denoise(noisy, 0.0)
    with pytest.raises(ValueError):
        B.tensor_svd_denoise(noisy[0])
    with pytest.raises(ValueError):
        B.tensor_svd_denoise(noisy, ranks=(0, 1, 1, 1))
    with pytest.raises(TypeError):
        B.gaussian_denoise(np.array([["a"] * 8] * 8))
    nan = noisy.copy()
    nan[0, 0, 3, 3] = np.nan
    assert np.all(np.isfinite(B.gaussian_denoise(nan)))


@pytest.mark.parametrize("lam", [1.0, 5.0, 50.0])
def test_inverse_anscombe_is_unbiased_for_poisson(lam):
    y = B.anscombe(np.random.default_rng(0).poisson(lam, 200_000))
    assert B.inverse_anscombe(np.array([y.mean()]))[0] == pytest.approx(lam, rel=0.03)
