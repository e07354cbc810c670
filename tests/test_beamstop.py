"""Beam stops: detection and the origin behind one."""

import numpy as np
import pytest

from py4dstem_prenet.beamstop import detect_beam_stop, origin_behind_stop
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
