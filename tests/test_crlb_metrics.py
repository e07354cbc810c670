import numpy as np
import pytest

from py4dstem_prenet.evaluation import centre_errors, ellipse_errors, fisher_information, mse, psnr, translation_crlb

YY, XX = np.meshgrid(np.arange(64.0), np.arange(64.0))


def _gauss(n, sigma):
    return lambda c: n * np.exp(-((XX - c[0]) ** 2 + (YY - c[1]) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


@pytest.mark.parametrize("n,sigma", [(1e3, 2.0), (1e5, 4.0)])
def test_crlb_of_gaussian_spot_matches_closed_form(n, sigma):
    # continuous Gaussian: var = sigma^2 / N; pixel integration adds ~1/12 px^2
    bound = translation_crlb(_gauss(n, sigma), (31.6, 30.2))
    np.testing.assert_allclose(bound, sigma / np.sqrt(n), rtol=0.02)


def test_crlb_read_noise_increases_bound_and_blank_is_infinite():
    assert np.all(translation_crlb(_gauss(1e3, 2.0), (32, 32), read_noise=3.0) > translation_crlb(_gauss(1e3, 2.0), (32, 32)))
    assert np.all(np.isinf(translation_crlb(lambda c: np.zeros((16, 16)), (8, 8))))
    info = fisher_information(_gauss(1e3, 2.0), (32, 32))
    assert info.shape == (2, 2) and abs(info[0, 1]) < 1e-6 * info[0, 0]
    with pytest.raises(ValueError):
        translation_crlb(_gauss(1e3, 2.0), (np.nan, 1))


def test_centre_errors():
    t = np.zeros((100, 2))
    p = t.copy()
    p[:, 0] = 0.1
    p[0] = [3.0, 4.0]
    e = centre_errors(p, t)
    assert e["median"] == pytest.approx(0.1) and e["fail"] == pytest.approx(0.01)
    assert e["mean"] == pytest.approx((99 * 0.1 + 5) / 100)
    p[1] = np.nan
    assert centre_errors(p, t)["fail"] == pytest.approx(0.02)
    with pytest.raises(ValueError):
        centre_errors(p[:3], t)


def test_ellipse_errors_wrap():
    e = ellipse_errors(1.021, np.pi - 0.01, 1.02, 0.01)
    assert e["d_ratio"] == pytest.approx(0.001) and e["d_theta_deg"] == pytest.approx(np.degrees(0.02))
    assert np.isnan(ellipse_errors(1.0, 0.3, 1.0, 0.0)["d_theta_deg"])


def test_mse_psnr():
    a = np.ones((4, 4))
    assert mse(a, a) == 0 and psnr(a, a) == np.inf
    assert psnr(a * 1.1, a) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        mse(a, np.ones(3))
