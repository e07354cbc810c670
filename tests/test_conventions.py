import numpy as np
import pytest

from py4dstem_prenet.conventions import angle_difference, distortion_matrix, e12_to_ellipse, ellipse_to_e12


def test_distortion_stretches_along_theta():
    d = distortion_matrix(1.1, np.pi / 2)
    np.testing.assert_allclose(d @ [0, 1], [0, 1.1], atol=1e-12)
    np.testing.assert_allclose(d @ [1, 0], [1, 0], atol=1e-12)


@pytest.mark.parametrize("ratio,theta", [(1.03, 0.2), (1.001, 3.0), (1.2, 1.5707)])
def test_e12_round_trip(ratio, theta):
    r, t = e12_to_ellipse(ellipse_to_e12(ratio, theta))
    assert r == pytest.approx(ratio)
    assert angle_difference(t, theta) < 1e-9


def test_angle_difference_wraps_mod_pi():
    assert angle_difference(0.01, np.pi - 0.01) == pytest.approx(0.02)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_bad_ratio_is_refused(bad):
    with pytest.raises(ValueError, match="ratio"):
        distortion_matrix(bad, 0.0)
    with pytest.raises(ValueError):
        ellipse_to_e12(bad, 0.0)


def test_bad_e12_shape():
    with pytest.raises(ValueError, match="last axis"):
        e12_to_ellipse(np.zeros(3))
