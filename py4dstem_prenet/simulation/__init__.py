"""Simulation of 4D-STEM data with exact ground truth.

- :mod:`.crystals`: kinematic Bragg-spot lists (py4DSTEM ``Crystal``) and random lattices.
- :mod:`.patterns`: analytic rendering of disks, rings and diffuse background through
  the projector distortion.
- :mod:`.detector`: dose, shot noise, gain, read noise, defects, saturation, beam stop.
- :mod:`.descan`: smooth origin drift across the scan.
- :mod:`.datacube`: whole scans (py4DSTEM DataCubes) and independent training patterns.
- :mod:`.multislice`: an abTEM multislice bank (optional, needs ``abtem``).
"""

from .datacube import SimulationTruth, random_detector, random_ellipse, simulate_datacube, simulate_patterns
from .descan import descan_origin
from .detector import Detector, beam_stop_mask, scale_to_dose
from .patterns import KINDS, Scene, random_scene, render, speckle

__all__ = [
    "KINDS", "Detector", "Scene", "SimulationTruth", "beam_stop_mask", "descan_origin",
    "random_detector", "random_ellipse", "random_scene", "render", "scale_to_dose",
    "simulate_datacube", "simulate_patterns", "speckle",
]
