"""py4dstem-prenet: automatic, accurate and fast preprocessing of 4D-STEM data.

Denoising, origin (descan) and elliptical-distortion calibration for py4DSTEM
DataCubes, with an exact-truth simulator, py4DSTEM's classical baselines and an
evaluation harness.
"""

__version__ = "0.1.0"

from .preprocess import preprocess  # noqa: E402
from .storage import open_datacube  # noqa: E402
from .streaming import stream  # noqa: E402

__all__ = ["preprocess", "open_datacube", "stream", "__version__"]
