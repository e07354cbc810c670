"""Quick start: simulate a crystal scan, run PreNet, compare with py4DSTEM's get_origin.

Run: python examples/quickstart.py [--fast]
"""

import sys

import numpy as np

import py4dstem_prenet as prenet
from py4dstem_prenet.baselines import get_origin
from py4dstem_prenet.evaluation import centre_errors
from py4dstem_prenet.simulation import Detector, simulate_datacube


def main(scan=(8, 8), dose=1e4, seed=0):
    datacube, truth = simulate_datacube(scan, (128, 128), "crystal", dose, (1.02, 0.6),
                                        detector=Detector(hot_fraction=2e-4, hot_level=10.0), seed=seed)
    out = prenet.preprocess(datacube, progress=False)            # denoise -> centre -> ellipse
    qx0, qy0 = out.calibration.get_origin()
    a, b, theta = out.calibration.get_ellipse()
    print("PreNet origin error:", centre_errors(np.stack([qx0, qy0], -1), truth.origin))
    cx, cy = get_origin(datacube, r=truth.scene.disk_radius)
    print("py4DSTEM get_origin error:", centre_errors(np.stack([cx, cy], -1), truth.origin))
    print(f"ellipse a/b = {a / b:.4f} (true {truth.ratio}), theta = {np.degrees(theta):.1f} deg "
          f"(true {np.degrees(truth.theta):.1f})")
    return out


if __name__ == "__main__":
    main(scan=(3, 3) if "--fast" in sys.argv else (8, 8))
