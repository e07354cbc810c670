import numpy as np
import pytest

from py4dstem_prenet.cli import main
from py4dstem_prenet.evaluation.benchmark import BenchmarkConfig, run_benchmark


@pytest.fixture(scope="module")
def quick_result():
    cfg = BenchmarkConfig(doses=(1e3, 1e5), scan_shape=(3, 3), n_scans=1, detector_shape=(64, 64), sim_patterns=50)
    return run_benchmark(cfg)


def test_benchmark_tables(quick_result, tmp_path):
    md = quick_result.to_markdown()
    assert "py4DSTEM get_origin" in md and "CRLB" in md and "tensor SVD" in md
    conditions = {r["data"] for r in quick_result.origin}
    assert "bright Bragg disks + hot pixels" in conditions
    for r in quick_result.origin:
        assert r["crlb_rms"] > 0 and r["per_second"] > 0 and 0 <= r["fail"] <= 1
    crlb = {r["dose"]: r["crlb_rms"] for r in quick_result.origin}
    assert crlb[1e5] < crlb[1e3]  # the bound falls with dose
    quick_result.plot(str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_benchmark_rejects_unknown_table():
    with pytest.raises(ValueError, match="unknown table"):
        run_benchmark(BenchmarkConfig.quick(), extra_methods={"strain": {}})


def test_cli_info_and_demo(capsys):
    assert main(["info"]) == 0
    assert "py4DSTEM" in capsys.readouterr().out
    assert main(["demo", "--scan", "3x3", "--detector", "64x64"]) == 0
    assert "get_origin" in capsys.readouterr().out


def test_cli_simulate_writes_emd_that_py4dstem_reads(tmp_path):
    import py4DSTEM

    out = str(tmp_path / "sim.h5")
    assert main(["simulate", out, "--scan", "2x3", "--detector", "32x32", "--dose", "1e3"]) == 0
    dc = py4DSTEM.read(out)
    assert dc.data.shape == (2, 3, 32, 32)
    truth = np.load(out + ".truth.npz")
    assert truth["origin"].shape == (2, 3, 2)
    assert main(["simulate", out, "--scan", "2x3", "--detector", "32x32"]) == 2  # refuses to overwrite


def test_cli_bad_arguments():
    with pytest.raises(SystemExit) as e:
        main(["demo", "--dose", "-5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["demo", "--scan", "abc"])
    assert main(["simulate", "/tmp/x.h5", "--overwrite", "--kind", "vacuum", "--detector", "8x8"]) == 2
