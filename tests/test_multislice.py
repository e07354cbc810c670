import numpy as np
import pytest

from py4dstem_prenet.simulation import simulate_patterns
from py4dstem_prenet.simulation.multislice import bank_to_detector, multislice_bank, simulate_multislice_datacube


@pytest.fixture(scope="module")
def bank():
    pytest.importorskip("abtem")
    return multislice_bank("Cu", thickness=60.0, exit_every=30.0, scan_gpts=1, cells=3, sampling=0.15)


def test_bank_patterns(bank):
    p = bank["patterns"]
    assert p.ndim == 3 and len(p) == len(bank["thickness"]) >= 2
    assert np.all(p >= 0) and bank["disk_radius"] > 1
    n = p.shape[-1]
    # the zero beam sits at N // 2: the bright-field disk is centred there
    assert np.unravel_index(np.argmax(p[0]), p[0].shape) == pytest.approx((n // 2, n // 2), abs=2)


def test_bank_to_detector_puts_the_zero_beam_on_the_origin():
    pat = np.zeros((41, 41))
    yy, xx = np.meshgrid(np.arange(41), np.arange(41))
    pat[np.hypot(xx - 20, yy - 20) <= 4] = 1.0
    img = bank_to_detector(pat, (96, 80), (40.3, 37.7), 2.0, 1.0, 0.0)
    from scipy import ndimage
    np.testing.assert_allclose(ndimage.center_of_mass(img), (40.3, 37.7), atol=0.02)
    with pytest.raises(ValueError):
        bank_to_detector(pat, (96, 80), (40, 37), 0.0)


def test_multislice_datacube_and_training_mix(bank):
    dc, truth = simulate_multislice_datacube(bank, (2, 2), (64, 64), 1e4, (1.03, 0.2), disk_radius=5.0, seed=1,
                                             compute_crlb=True)
    assert dc.data.shape == (2, 2, 64, 64) and np.all(np.isfinite(truth.crlb))
    out = simulate_patterns(6, (64, 64), np.random.default_rng(0), bank=bank, bank_fraction=1.0)
    assert out["noisy"].shape == (6, 64, 64) and np.all(out["clean"] >= 0)
    with pytest.raises(ValueError):
        simulate_patterns(2, (64, 64), bank=bank, bank_fraction=2.0)
    with pytest.raises(KeyError):
        multislice_bank("Unobtainium")
