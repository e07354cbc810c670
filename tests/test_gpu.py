"""preprocess on a CUDA GPU gives the CPU's results (skipped where torch sees no GPU)."""

import numpy as np
import pytest
import torch

import py4dstem_prenet as prenet
from py4dstem_prenet.evaluation.benchmark import bright_disk_scene
from py4dstem_prenet.simulation import Detector, simulate_datacube

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cases():
    rng = np.random.default_rng(41_000_004)
    yield "pooled low dose", simulate_datacube((6, 6), (64, 64), "crystal", 1e2, None, seed=41_000_001), False
    yield "crystal, beam stop", simulate_datacube((6, 6), (96, 96), "crystal", 1e3, None, beam_stop=True,
                                                  seed=41_000_002), True
    yield "rings behind a stop", simulate_datacube((6, 6), (96, 96), "amorphous", 1e4, None, beam_stop=True,
                                                   seed=41_000_003), True
    yield "bright disks, hot pixels", simulate_datacube(
        (6, 6), (96, 96), "crystal", 1e5, None, detector=Detector(hot_fraction=5e-4, hot_level=10.0),
        scene=bright_disk_scene(rng, (96, 96)), seed=41_000_004), False
    yield "integrating detector, read noise", simulate_datacube(
        (8, 8), (128, 128), "crystal", 1e3, None, detector=Detector(gain=10.0, read_noise=10.0), seed=41_000_009), False
    yield "mains ripple, pooled", simulate_datacube((12, 12), (96, 96), "crystal", 1e3, (1.02, 0.5), ripple=0.3,
                                                    seed=46_000_002), False
    yield "rough descan, scan-line offsets", simulate_datacube(
        (12, 12), (96, 96), "crystal", 1e4, None, line_jitter=0.3, flyback=1.0, ripple=0.3, seed=41_000_011), False


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_cuda_matches_the_cpu(case):
    _, (dc, truth), stop = case
    mask = truth.transmission > 0.5 if stop else None
    cpu = prenet.preprocess(dc, device="cpu", progress=False, mask=mask)
    gpu = prenet.preprocess(dc, device="cuda", progress=False, mask=mask)
    # float32 convolutions and FFTs sum in another order: measured 2e-5 to 5e-3 px on an H200 and an H100
    np.testing.assert_allclose(np.stack(gpu.calibration.get_origin()), np.stack(cpu.calibration.get_origin()),
                               atol=0.02)
    np.testing.assert_array_equal(gpu.metadata["prenet"]["origin_source"], cpu.metadata["prenet"]["origin_source"])
    (ag, bg, _), (ac, bc, _) = gpu.calibration.get_ellipse(), cpu.calibration.get_ellipse()
    assert abs(ag / bg - ac / bc) < 1e-3
    assert np.abs(gpu.data - cpu.data).max() <= 1e-3 * np.abs(cpu.data).max()
    has_lines = ["origin_line_offsets" in out.metadata["prenet"].keys for out in (gpu, cpu)]
    assert has_lines[0] == has_lines[1]
    if has_lines[1]:
        for key in ("origin_line_offsets", "origin_ripple"):
            np.testing.assert_allclose(gpu.metadata["prenet"][key], cpu.metadata["prenet"][key], atol=0.02)


def test_cuda_streaming_matches_the_cpu():
    from py4dstem_prenet.streaming import stream

    dc, _ = simulate_datacube((6, 6), (96, 96), "crystal", 1e3, None, seed=41_000_002)
    frames = dc.data.reshape(-1, 96, 96)
    found = [np.concatenate([u.origin for u in stream(iter(frames), scan_shape=(6, 6), batch_size=8, device=d)])
             for d in ("cpu", "cuda")]
    np.testing.assert_allclose(found[1], found[0], atol=0.02)
