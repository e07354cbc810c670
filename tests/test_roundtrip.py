"""The conventions round trip: simulated truth -> py4DSTEM calibration -> ideal lattice."""

import numpy as np
import pytest

from py4dstem_prenet.simulation import Scene, simulate_datacube


def _lattice_scene(r=4.0):
    a1, a2 = np.array([17.0, 3.0]), np.array([-5.0, 19.0])
    ij = [(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0)]
    g = np.array([i * a1 + j * a2 for i, j in ij])
    g = g[np.hypot(g[:, 0], g[:, 1]) < 45]
    spots = np.vstack([[0, 0], g])
    return Scene(disk_radius=r, edge_width=1.0, spots=spots, spot_intensity=np.r_[1.0, 0.5 * np.ones(len(g))],
                 texture=np.zeros((len(spots), 3)))


@pytest.mark.parametrize("ratio,theta", [(1.04, 0.35), (1.03, 2.2)])
def test_true_calibration_maps_bragg_disks_onto_ideal_lattice(ratio, theta):
    import py4DSTEM

    scene = _lattice_scene()
    _, truth = simulate_datacube((2, 3), (128, 128), "crystal", 1e6, (ratio, theta), descan_amplitude=4,
                                 scene=scene, thickness_variation=0.0, seed=3)
    dc = py4DSTEM.DataCube(data=truth.clean.copy())
    probe = py4DSTEM.Probe.generate_synthetic_probe(4.0, 1.0, (128, 128))
    kernel = probe.get_kernel(mode="sigmoid", origin=None, radii=(4.0, 8.0))
    bv = dc.find_Bragg_disks(kernel, minRelativeIntensity=0.05, minPeakSpacing=6, edgeBoundary=6,
                             subpixel="multicorr", upsample_factor=32)
    dc.calibration.set_origin((truth.origin[..., 0], truth.origin[..., 1]))
    dc.calibration.set_ellipse(truth.ellipse)
    bv.setcal(center=True, ellipse=True, pixel=False, rotate=False)
    errs = []
    for rx in range(2):
        for ry in range(3):
            v = bv.cal[rx, ry]
            p = np.stack([v.qx, v.qy], axis=1)
            assert len(p) >= 8
            d = np.hypot(p[:, None, 0] - scene.spots[None, :, 0], p[:, None, 1] - scene.spots[None, :, 1])
            errs.append(d.min(axis=1))
    errs = np.concatenate(errs)
    assert np.median(errs) < 0.05
    # the wrong theta sign must fail by far: the test can tell conventions apart
    dc.calibration.set_ellipse((ratio, 1.0, -theta))
    bv.setcal(center=True, ellipse=True, pixel=False, rotate=False)
    v = bv.cal[0, 0]
    p = np.stack([v.qx, v.qy], axis=1)
    d = np.hypot(p[:, None, 0] - scene.spots[None, :, 0], p[:, None, 1] - scene.spots[None, :, 1]).min(axis=1)
    assert np.median(d) > 0.3
