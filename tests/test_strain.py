"""The strain benchmark's simulator, its truth, py4DSTEM strain mapping, and the pictures."""

import numpy as np
import pytest

from py4dstem_prenet.evaluation.strain import lattice_shape, measure_strain, true_strain
from py4dstem_prenet.simulation.strain import simulate_strain_datacube


@pytest.fixture(scope="module")
def two_grains():
    return simulate_strain_datacube((8, 6), dose=1e6, ellipse=(1.03, 0.4), grain_rotation_deg=(0.0, 30.0), seed=5)


def test_truth_has_the_strain_field_and_grains_it_was_given(two_grains):
    _, truth = two_grains
    true = true_strain(truth)
    lower = truth.strain[..., 0, 0] > 0
    grain0 = truth.grain == 0
    # py4DSTEM's formula on the exact bases gives back the applied strain in the reference grain
    np.testing.assert_allclose(true[0][lower & grain0], 0.01, atol=3e-4)
    np.testing.assert_allclose(true[0][~lower & grain0], 0.0, atol=1e-9)
    np.testing.assert_allclose(true[2][grain0], truth.strain[..., 0, 1][grain0], atol=3e-4)
    # py4DSTEM's strain is infinitesimal: an unstrained grain rotated by 30 degrees shows
    # e_xx = e_yy = 1 - cos 30 and a rotation of sin 30 (radians) against grain 0
    upper1 = (truth.grain == 1) & ~lower
    np.testing.assert_allclose(true[0][upper1], 1 - np.cos(np.radians(30)), atol=1e-9)
    np.testing.assert_allclose(np.abs(true[3][upper1]), np.sin(np.radians(30)), atol=1e-9)
    assert np.all(np.isnan(true[:, truth.grain < 0]))


def test_simulator_rejects_bad_input():
    with pytest.raises(ValueError, match="scan_shape"):
        simulate_strain_datacube((4, 6))
    with pytest.raises(ValueError, match="64 x 64"):
        simulate_strain_datacube((8, 6), detector_shape=(48, 48))
    with pytest.raises(ValueError, match="dose"):
        simulate_strain_datacube((8, 6), dose=0)


def test_py4dstem_strain_with_the_true_calibration_is_exact_and_without_it_is_not(two_grains):
    dc, truth = two_grains
    before = dc.data.copy()
    true = true_strain(truth)
    crystal = truth.grain >= 0
    good = measure_strain(dc, (truth.origin[..., 0], truth.origin[..., 1]), truth.ellipse, truth)
    assert np.all(np.isfinite(good[:, crystal]))
    assert np.sqrt(np.mean((good[:3] - true[:3])[:, crystal] ** 2)) < 3e-4
    # the rotated grain, uncorrected for a/b = 1.03: false strain of tenths of a percent
    raw = measure_strain(dc, (truth.origin[..., 0], truth.origin[..., 1]), None, truth)
    grain1 = truth.grain == 1
    assert np.sqrt(np.nanmean((raw[:3] - true[:3])[:, grain1] ** 2)) > 3e-3
    # the absolute lattice (phase identification): no reference cancels the ellipse, in any grain
    true_ratio = lattice_shape(truth.g1g2)[0]
    good_ratio, raw_ratio = (np.sqrt(np.nanmean((m[4] / true_ratio - 1)[crystal] ** 2)) for m in (good, raw))
    assert good_ratio < 1e-3 and raw_ratio > 5e-3
    assert np.array_equal(dc.data, before)


def test_lattice_shape_is_the_ratio_and_angle_of_the_basis():
    g = np.array([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 1.0]]])
    ratio, angle = lattice_shape(g)
    assert np.allclose(ratio, [2.0, 1.0]) and np.allclose(angle, [np.pi / 2, np.pi / 2])
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])
    assert np.allclose(lattice_shape(3 * g @ rot.T), lattice_shape(g))  # no camera length, no scan rotation


def test_show_functions_return_figures(two_grains):
    import matplotlib.pyplot as plt

    from py4dstem_prenet.visualize import show_denoising, show_ellipse, show_origin_maps, show_strain_maps

    dc, truth = two_grains
    qx, qy = truth.origin[..., 0], truth.origin[..., 1]
    fig = show_origin_maps((qx + 0.1, qy), (qx, qy), (qx, qy))
    assert len(fig.axes) == 16  # 4 columns x (qx0, qy0), each with a colour bar
    fig2 = show_ellipse(dc.data[0, 0], (qx[0, 0], qy[0, 0]), (1.03, 1.0, 0.4), 25.0, truth.ellipse)
    assert len(fig2.axes[0].lines) == 3
    fig3 = show_denoising(dc.data[0, :2], dc.data[0, :2])
    assert len(fig3.axes) == 4
    true = true_strain(truth)
    fig4 = show_strain_maps({"a": true, "b": true}, true)
    assert len([a for a in fig4.axes if a.images]) >= 12
    plt.close("all")


@pytest.mark.slow
def test_strain_benchmark_quick_runs_all_routes():
    from py4dstem_prenet.evaluation.strain import ROUTES, StrainConfig, run_strain_benchmark, strain_markdown

    rows = run_strain_benchmark(StrainConfig.quick())
    assert {r["route"] for r in rows} == set(ROUTES)
    none = next(r for r in rows if r["route"] == "none")
    classical = next(r for r in rows if r["route"] == "classical")
    assert classical["e_xx"] < none["e_xx"]
    assert "RMS e_xx" in strain_markdown(rows)


def _row(case, route, rms, unmeasured=0.0, dose=1e5):
    return {"case": case, "dose": dose, "route": route, "unmeasured": unmeasured,
            "e_xx": rms, "e_yy": 0.5 * rms, "e_xy": 0.5 * rms, "theta": 0.0,
            "lattice_ratio": 2 * rms, "lattice_angle": 0.0, "ring_ellipticity": 3 * rms}


def test_strain_verdicts_judge_against_the_exact_floor():
    from py4dstem_prenet.evaluation.strain import strain_verdicts, verdicts_markdown

    rows = [_row("met", "none", 0.01), _row("met", "classical", 0.003), _row("met", "prenet", 0.0011),
            _row("met", "exact", 0.001),
            _row("tie", "none", 0.008), _row("tie", "classical", 0.00102), _row("tie", "prenet", 0.00105),
            _row("tie", "exact", 0.001),
            _row("no", "none", 0.008), _row("no", "classical", 0.002), _row("no", "prenet", 0.002),
            _row("no", "exact", 0.001),
            _row("flat", "none", 0.00105), _row("flat", "classical", 0.001), _row("flat", "prenet", 0.001),
            _row("flat", "exact", 0.001),
            _row("unindexed", "none", float("nan"), unmeasured=1.0), _row("unindexed", "classical", 0.004),
            _row("unindexed", "prenet", 0.0012), _row("unindexed", "exact", 0.001)]
    rows += [_row(c, "exact, PreNet data", 0.001) for c in ("met", "tie", "no", "flat", "unindexed")]
    # PreNet's own data can have another floor: it is judged against that one
    rows += [_row("own floor", "none", 0.01), _row("own floor", "classical", 0.003),
             _row("own floor", "prenet", 0.0021), _row("own floor", "exact", 0.001),
             _row("own floor", "exact, PreNet data", 0.002)]
    before = [dict(r) for r in rows]
    v = {x["case"]: x for x in strain_verdicts(rows)}
    assert rows == before  # input unchanged
    assert v["met"]["verdict"] == "met"
    assert abs(v["met"]["added"]["classical"] - np.sqrt(0.003**2 - 0.001**2)) < 1e-12
    assert v["tie"]["verdict"] == "tie at the floor"
    assert v["no"]["verdict"] == "NO"
    assert v["flat"]["verdict"] == "calibration does not matter" and not v["flat"]["matters"]
    assert v["unindexed"]["matters"] and v["unindexed"]["added"]["none"] == float("inf")
    assert v["unindexed"]["verdict"] == "met"
    assert v["own floor"]["verdict"] == "met"
    assert abs(v["own floor"]["added"]["prenet"] - np.sqrt(0.0021**2 - 0.002**2)) < 1e-12
    table = verdicts_markdown(list(v.values()))
    assert "not measured" in table and "tie at the floor" in table
    # the denoising's own share: sqrt(0.002^2 - 0.001^2) on the "own floor" case, 0 elsewhere
    own = next(line for line in table.splitlines() if line.startswith("| own floor"))
    assert own.split(" | ")[9] == f"{100 * np.sqrt(0.002**2 - 0.001**2):.3f}"
    met = next(line for line in table.splitlines() if line.startswith("| met"))
    assert met.split(" | ")[9] == "0.000"


def test_lattice_verdicts_judge_the_absolute_lattice_not_the_strain():
    from py4dstem_prenet.evaluation.strain import LATTICE_KEYS, strain_verdicts

    # the strain ties, the absolute lattice does not: PreNet's |g1|/|g2| adds more than half the classical's
    rows = [_row("c", "none", 0.008), _row("c", "classical", 0.00102), _row("c", "prenet", 0.00105),
            _row("c", "exact", 0.001), _row("c", "exact, PreNet data", 0.001)]
    rows[1]["lattice_ratio"], rows[2]["lattice_ratio"] = 0.004, 0.005
    assert strain_verdicts(rows)[0]["verdict"] == "tie at the floor"
    lattice = strain_verdicts(rows, LATTICE_KEYS)[0]
    assert lattice["verdict"] == "NO" and lattice["rms"]["prenet"] == 0.005


def test_strain_verdicts_need_the_exact_route():
    from py4dstem_prenet.evaluation.strain import strain_verdicts

    with pytest.raises(ValueError, match="exact"):
        strain_verdicts([_row("a", "classical", 0.002), _row("a", "prenet", 0.001)])


def test_strain_markdown_shows_the_ellipse_each_route_used():
    from py4dstem_prenet.evaluation.strain import strain_markdown

    calibrated = dict(_row("c", "prenet", 1e-3), seconds=1.0, ratio=1.0301, ellipse_theta=np.radians(22.5))
    uncalibrated = dict(_row("c", "none", 1e-2), seconds=0.0)
    table = strain_markdown([calibrated, uncalibrated]).splitlines()
    assert "theta used deg" in table[0]
    assert table[2].split("|")[-3].strip() == "22.50" and table[2].split("|")[-4].strip() == "1.0301"
    assert table[3].split("|")[-3].strip() == "-" and table[3].split("|")[-4].strip() == "1.0000"
    # the absolute lattice and the ring ellipticity left, in %
    assert [table[3].split("|")[i].strip() for i in (8, 10)] == ["2.000", "3.000"]
