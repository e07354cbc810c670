"""Swap py4DSTEM's classical calibration for PreNet in a strain-mapping workflow.

A simulated scan with two grains (0 and 30 degrees in plane), 1% tensile strain and a
shear gradient in its lower half, an amorphous strip, descan drift and an elliptical
distortion a/b = 1.03. The classical route needs a disk radius, a region with an
amorphous ring and fit radii; the PreNet route is one call. Both end in py4DSTEM's
unchanged find_Bragg_disks -> setcal -> StrainMap (see
py4dstem_prenet.evaluation.strain.measure_strain for those steps).

Run: python examples/strain_workflow.py [--fast]
"""

import sys
import warnings

import numpy as np

import py4dstem_prenet as prenet
from py4dstem_prenet.baselines import aligned_mean_pattern, ellipse_amorphous_ring, fit_origin, get_origin
from py4dstem_prenet.evaluation.strain import lattice_shape, measure_strain, true_strain
from py4dstem_prenet.simulation.strain import simulate_strain_datacube


def main(fast: bool = False, dose: float = 1e5, seed: int = 3):
    scan = (8, 6) if fast else (14, 12)
    datacube, truth = simulate_strain_datacube(scan, dose=dose, ellipse=(1.03, 0.4), grain_rotation_deg=(0.0, 30.0),
                                               seed=seed)
    routes = {}

    # classical: hand-set disk radius, descan fit, ellipse from the amorphous strip's ring
    qx0, qy0 = fit_origin(*get_origin(datacube, r=4.0), "parabola")
    strip = truth.grain < 0                          # the user picks the amorphous region ...
    mean, centre = aligned_mean_pattern(datacube.data[strip][None], qx0[strip][None], qy0[strip][None])
    ratio, theta = ellipse_amorphous_ring(mean, centre, (19.0, 32.0))   # ... and the ring's radii
    routes["classical"] = (datacube, (qx0, qy0), (ratio, 1.0, theta))

    # PreNet: one call, nothing hand-set
    out = prenet.preprocess(datacube, progress=False)
    routes["PreNet"] = (out, out.calibration.get_origin(), out.calibration.get_ellipse())

    # no calibration: origin at the detector centre, no ellipse
    centre_map = np.full(scan, 63.5)
    routes["none"] = (datacube, (centre_map, centre_map), None)

    true = true_strain(truth)
    crystal = truth.grain >= 0
    print(f"true a/b = {truth.ratio}, theta = {np.degrees(truth.theta):.1f} deg; {dose:.0e} e-/pattern")
    true_ratio = lattice_shape(truth.g1g2)[0]
    print("| route | a/b used | RMS error e_xx, e_yy, e_xy (%) | rotation (deg) | absolute |g1|/|g2| (%) |")
    print("|---|---|---|---|---|")
    errors = {}
    for name, (data, origin, ellipse) in routes.items():
        est = measure_strain(data, origin, ellipse, truth)
        err = (est[:4] - true)[:, crystal]
        with warnings.catch_warnings():  # a route that indexed no pattern: NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            rms = np.sqrt(np.nanmean(err ** 2, axis=1))
            lattice = np.sqrt(np.nanmean((est[4] / true_ratio - 1)[crystal] ** 2))  # what phase identification reads
        errors[name] = rms
        used = "-" if ellipse is None else f"{ellipse[0] / ellipse[1]:.4f}"
        print(f"| {name} | {used} | {100 * rms[0]:.3f}, {100 * rms[1]:.3f}, {100 * rms[2]:.3f} | "
              f"{np.degrees(rms[3]):.3f} | {100 * lattice:.3f} |")
    return errors


if __name__ == "__main__":
    main(fast="--fast" in sys.argv)
