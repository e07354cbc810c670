"""Evaluation: accuracy metrics, the Cramer-Rao bound, and the benchmark harness
(:mod:`py4dstem_prenet.evaluation.benchmark`)."""

from .crlb import fisher_information, translation_crlb
from .metrics import centre_errors, ellipse_errors, mse, psnr

__all__ = ["centre_errors", "ellipse_errors", "fisher_information", "mse", "psnr", "translation_crlb"]
