"""PyTorch models of 4D-PreNet: the CBAM U-Net denoiser and the ResNet calibrators."""

from .cbam_unet import CBAM, CBAMUNet
from .resnet import ResNetHeatmap, ResNetRegressor

__all__ = ["CBAM", "CBAMUNet", "ResNetHeatmap", "ResNetRegressor"]
