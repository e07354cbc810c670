"""Out of core, resume, dask.distributed and live streaming (issue: scale and robustness)."""

import hashlib
import os

import h5py
import numpy as np
import pytest

import py4dstem_prenet as prenet
from py4dstem_prenet.distributed import block_bounds
from py4dstem_prenet.simulation import simulate_datacube
from py4dstem_prenet.storage import EMDWriter, open_datacube, read_block
from py4dstem_prenet.streaming import DescanFit, stream


@pytest.fixture(scope="module")
def scan():
    dc, truth = simulate_datacube((4, 5), (48, 48), "crystal", 1e4, (1.02, 0.3), seed=4)
    return dc, truth


def _file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_read_block_is_the_same_for_every_array_type(tmp_path):
    import dask.array as da

    a = np.arange(5 * 7 * 3 * 2, dtype=np.uint16).reshape(5, 7, 3, 2)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = a
    mm = np.lib.format.open_memmap(str(tmp_path / "a.npy"), mode="w+", dtype=a.dtype, shape=a.shape)
    mm[:] = a
    flat = a.reshape(35, 3, 2)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        for arr in (a, mm, f["x"], da.from_array(a, chunks=(2, 3, 3, 2))):
            for i0, i1 in [(0, 35), (3, 4), (5, 20), (6, 8), (34, 35)]:
                np.testing.assert_array_equal(read_block(arr, i0, i1), flat[i0:i1])
    with pytest.raises(ValueError, match="outside"):
        read_block(a, 30, 36)
    assert block_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError):
        block_bounds(0, 4)


def test_out_of_core_output_equals_in_memory_and_reopens(scan, tiny_weights, tmp_path):
    import py4DSTEM

    dc, _ = scan
    src = str(tmp_path / "in.h5")
    py4DSTEM.save(src, dc, mode="o")
    before = _file_hash(src)
    ref = prenet.preprocess(dc, weights_dir=tiny_weights, progress=False, batch_size=6)
    disk = open_datacube(src, mem="MEMMAP")
    assert isinstance(disk.data, h5py.Dataset)
    out = prenet.preprocess(disk, weights_dir=tiny_weights, progress=False, batch_size=6, out=str(tmp_path / "o.h5"))
    assert isinstance(out.data, h5py.Dataset)
    np.testing.assert_array_equal(out.data[()], ref.data)
    np.testing.assert_array_equal(out.calibration.get_origin()[0], ref.calibration.get_origin()[0])
    np.testing.assert_allclose(out.calibration.get_ellipse(), ref.calibration.get_ellipse(), rtol=1e-9)
    back = py4DSTEM.read(str(tmp_path / "o.h5"))
    np.testing.assert_array_equal(back.data, ref.data)
    np.testing.assert_array_equal(back.calibration.get_origin()[1], ref.calibration.get_origin()[1])
    assert back.metadata["prenet"]["origin_sigma"].shape == (4, 5)
    assert not os.path.exists(str(tmp_path / "o.h5.partial"))
    assert _file_hash(src) == before  # the input file is untouched
    with pytest.raises(FileExistsError, match="overwrite"):
        prenet.preprocess(disk, weights_dir=tiny_weights, progress=False, out=str(tmp_path / "o.h5"))
    with pytest.raises(ValueError, match="exclude"):
        prenet.preprocess(dc, weights_dir=tiny_weights, inplace=True, out=str(tmp_path / "p.h5"))


class _Interrupting:
    """An array-like that raises KeyboardInterrupt once, at the n-th block read, and counts reads."""

    def __init__(self, data, fail_at):
        self.data, self.fail_at, self.reads = data, fail_at, 0
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, key):
        self.reads += 1
        if self.reads == self.fail_at:
            raise KeyboardInterrupt
        return self.data[key]


def test_interrupted_run_leaves_a_partial_file_that_a_rerun_resumes(scan, tiny_weights, tmp_path):
    import py4DSTEM

    dc, _ = scan
    ref = prenet.preprocess(dc, weights_dir=tiny_weights, progress=False, batch_size=5)
    out = str(tmp_path / "o.h5")
    # the beam-stop search reads the scan's 20 patterns in runs of 16 (5 row segments), the
    # fingerprint 3 single patterns, then blocks of 5 = one scan row each
    flaky = _Interrupting(dc.data, fail_at=5 + 3 + 3)
    cube = py4DSTEM.DataCube(data=dc.data)
    cube.data = flaky
    with pytest.raises(KeyboardInterrupt):
        prenet.preprocess(cube, weights_dir=tiny_weights, progress=False, batch_size=5, out=out)
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    with h5py.File(out + ".partial", "r") as f:
        assert f["prenet_partial/done"][()].tolist() == [True, True, False, False]
    flaky.reads, flaky.fail_at = 0, -1
    res = prenet.preprocess(cube, weights_dir=tiny_weights, progress=False, batch_size=5, out=out)
    # resumed: 5 reads for the beam-stop search + 3 fingerprint reads + 2 remaining blocks +
    # the ellipse's 4 blocks for the disk radius (up to RADIUS_PATTERNS patterns) and 4 for its
    # bands; a crystal: 4 for the aligned mean that locates its disks and 4 for the disk-shape fits
    assert flaky.reads == 5 + 3 + 2 + 4 + 4 + 4 + 4
    np.testing.assert_array_equal(res.data[()], ref.data)
    np.testing.assert_array_equal(res.calibration.get_origin()[0], ref.calibration.get_origin()[0])
    assert not os.path.exists(out + ".partial")


def test_a_partial_file_from_other_options_is_not_resumed(scan, tiny_weights, tmp_path):
    dc, _ = scan
    out = str(tmp_path / "o.h5")
    w = EMDWriter(out, dc.data.shape, 4, {"options": "other"})
    w.write(0, 0, 5, {"data": np.full((5, 48, 48), 7.0, np.float32), "origin": np.zeros((5, 2))})
    w.close()
    res = prenet.preprocess(dc, weights_dir=tiny_weights, progress=False, batch_size=5, out=out)
    assert not np.any(res.data[()] == 7.0)
    w2 = EMDWriter(str(tmp_path / "x.h5"), dc.data.shape, 4, {"a": 1})
    with pytest.raises(RuntimeError, match="not written"):
        w2.finish(dc)
    w2.close()


def test_dask_distributed_gives_the_same_result(scan, tiny_weights):
    from dask.distributed import Client, LocalCluster

    dc, _ = scan
    ref = prenet.preprocess(dc, weights_dir=tiny_weights, progress=False, batch_size=6)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        out = prenet.preprocess(dc, weights_dir=tiny_weights, progress=False, batch_size=6, client=client)
    # workers run torch with one thread (dask sets OMP_NUM_THREADS=1), which changes the
    # order of float32 sums inside convolutions: equal to float32 rounding
    np.testing.assert_allclose(out.data, ref.data, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack(out.calibration.get_origin()), np.stack(ref.calibration.get_origin()),
                               atol=1e-3)
    np.testing.assert_allclose(out.calibration.get_ellipse(), ref.calibration.get_ellipse(), atol=1e-4)


def test_dask_array_input(scan, tiny_weights):
    import dask.array as da
    import py4DSTEM

    dc, _ = scan
    ref = prenet.preprocess(dc, weights_dir=tiny_weights, progress=False, batch_size=7)
    lazy = py4DSTEM.DataCube(data=da.from_array(dc.data, chunks=(2, 2, 48, 48)))
    out = prenet.preprocess(lazy, weights_dir=tiny_weights, progress=False, batch_size=7)
    np.testing.assert_array_equal(out.data, ref.data)


def test_stream_matches_preprocess_and_tracks_descan(scan, tiny_weights):
    dc, _ = scan
    ref = prenet.preprocess(dc, weights_dir=tiny_weights, progress=False, batch_size=4, ellipse=False)
    frames = (dc.data[i, j] for i in range(4) for j in range(5))
    updates = list(stream(frames, scan_shape=(4, 5), batch_size=4, weights_dir=tiny_weights))
    assert [len(u.index) for u in updates] == [4] * 5
    origin = np.concatenate([u.origin for u in updates])
    # live frames get no edge-blur correction (it is a median over scan neighbours, later rows included)
    md = ref.metadata["prenet"]
    np.testing.assert_array_equal(origin, (md["origin_measured"] + md["origin_blur_correction"]).reshape(-1, 2))
    np.testing.assert_array_equal(np.concatenate([u.data for u in updates]), ref.data.reshape(-1, 48, 48))
    u = updates[-1]
    assert u.latency_s > 0 and u.frames_per_s > 0 and u.origin_fit.shape == (4, 2)
    assert u.ellipse is None or u.ellipse[0] >= 1
    # chunks of any length regroup into the same blocks
    chunks = [dc.data.reshape(-1, 48, 48)[:7], dc.data.reshape(-1, 48, 48)[7:]]
    again = np.concatenate([u.origin for u in stream(chunks, batch_size=4, weights_dir=tiny_weights)])
    np.testing.assert_array_equal(again, origin)


def test_stream_bad_input(tiny_weights):
    with pytest.raises(ValueError, match="frames"):
        list(stream([np.zeros((2, 2, 32, 32))], weights_dir=tiny_weights))
    with pytest.raises(ValueError, match="changed"):
        list(stream([np.zeros((32, 32)), np.zeros((32, 30))], batch_size=4, weights_dir=tiny_weights))
    with pytest.raises(ValueError, match="16 x 16"):
        list(stream([np.zeros((8, 8))], weights_dir=tiny_weights))
    with pytest.raises(ValueError, match="batch_size"):
        list(stream([np.zeros((32, 32))], batch_size=0, weights_dir=tiny_weights))


def test_descan_fit_recovers_a_plane_and_rejects_outliers():
    rx, ry = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    truth = np.stack([30 + 0.5 * rx - 0.2 * ry, 40 + 0.1 * rx + 0.3 * ry], -1).reshape(-1, 2)
    measured = truth.copy()
    measured[[20, 33]] += 25.0  # two frames on a wrong disk
    fit = DescanFit((6, 8), "plane")
    for i0 in range(0, 48, 8):
        fitted = fit.update(np.arange(i0, i0 + 8), measured[i0:i0 + 8])
    np.testing.assert_allclose(fitted, truth[40:], atol=1e-9)
    with pytest.raises(ValueError):
        DescanFit((6, 8), "cubic")


def test_descan_fit_starting_on_a_later_scan_row_does_not_lock_out_the_next():
    """One row beyond the first leaves the plane undetermined (its row coordinate aliases the
    constant); rejecting frames against that fit once shut out every later row."""
    rx, ry = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    truth = np.stack([30 + 0.5 * rx - 0.2 * ry, 40 + 0.1 * rx + 0.3 * ry], -1).reshape(-1, 2)
    fit = DescanFit((6, 8), "plane")
    for i0 in range(16, 48, 8):  # rows 0 and 1 never arrive (a blanked beam)
        fitted = fit.update(np.arange(i0, i0 + 8), truth[i0:i0 + 8])
        assert fit.established == (i0 > 16)
    np.testing.assert_allclose(fitted, truth[40:], atol=1e-9)


def test_stream_leaves_blank_frames_out_of_its_descan_fit():
    """The beam comes on at the third scan row: before, the blank frames' origins set up the
    running fit, and the measured frames were 0.82 px off (up to 2.1), the fit 3.2 px."""
    dc, truth = simulate_datacube((8, 8), (128, 128), "crystal", 1e4, (1.03, 0.4), seed=33100031)
    data = dc.data.copy()
    data[:2] = 0
    origin, fitted = np.full((64, 2), np.nan), np.full((64, 2), np.nan)
    for u in stream(data.reshape(-1, 128, 128), scan_shape=(8, 8), batch_size=8, denoise=False):
        origin[u.index], fitted[u.index] = u.origin, u.origin_fit
    err = np.linalg.norm(origin - truth.origin.reshape(-1, 2), axis=1)[16:]
    err_fit = np.linalg.norm(fitted - truth.origin.reshape(-1, 2), axis=1)[16:]
    assert err.mean() < 0.25 and err.max() < 1.0 and err_fit.max() < 0.6, (err.mean(), err.max(), err_fit.max())


def test_open_datacube_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_datacube(str(tmp_path / "missing.h5"))
    good = tmp_path / "good.h5"
    with h5py.File(good, "w") as f:
        f["x"] = np.zeros((2, 2, 16, 16))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(ValueError):
        open_datacube(str(truncated))
    junk = tmp_path / "junk.mib"
    junk.write_bytes(b"not a recording" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        open_datacube(str(junk))
    with pytest.raises(ValueError, match="mem"):
        open_datacube(str(good), mem="disk")
    assert open_datacube(str(good)).data.shape == (2, 2, 16, 16)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["x"] = np.zeros((5, 16, 16))
    with pytest.raises(ValueError, match="4D"):
        open_datacube(str(tmp_path / "flat.h5"))


def test_stream_and_read_block_fuzz(tiny_weights):
    """Random frame shapes, dtypes, chunkings and values: clean updates or a clear ValueError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(n=st.integers(1, 9), qx=st.integers(12, 36), qy=st.integers(12, 36), chunk=st.integers(1, 4),
           batch=st.integers(1, 5), dtype=st.sampled_from(["uint8", "uint16", "int32", "float32", "float64"]),
           fill=st.sampled_from(["poisson", "zeros", "nan", "negative"]))
    def check(n, qx, qy, chunk, batch, dtype, fill):
        rng = np.random.default_rng(0)
        data = rng.poisson(3.0, (n, qx, qy)).astype(float)
        if fill == "zeros":
            data[:] = 0
        elif fill == "nan":
            data[:, 0, 0] = np.nan
            dtype = "float64"
        elif fill == "negative":
            data -= 10
        data = data.astype(dtype) if fill != "negative" or dtype[0] != "u" else data
        before = data.copy()
        chunks = [data[i:i + chunk] for i in range(0, n, chunk)]
        try:
            updates = list(stream(chunks, batch_size=batch, weights_dir=tiny_weights))
        except ValueError as exc:
            assert min(qx, qy) < 16 and "16 x 16" in str(exc)
            return
        assert min(qx, qy) >= 16
        assert np.array_equal(data, before, equal_nan=True)
        assert np.concatenate([u.index for u in updates]).tolist() == list(range(n))
        for u in updates:
            assert np.all(np.isfinite(u.data)) and np.all(np.isfinite(u.origin))
        cube = data.reshape(1, n, qx, qy)
        i0 = int(rng.integers(0, n))
        np.testing.assert_array_equal(read_block(cube, i0, n), data[i0:])

    check()
