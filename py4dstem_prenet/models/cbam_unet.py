"""Attention (CBAM) U-Net denoiser: fully convolutional, any detector size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM", "CBAMUNet"]


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared MLP over average- and max-pooled features."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(w)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7x7 convolution over channel mean and max."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(s))


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel, then spatial."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(inplace=True),
        )
        self.att = CBAM(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.att(self.body(x))


class CBAMUNet(nn.Module):
    """U-Net with CBAM attention in every block, predicting clean expected counts.

    The input pattern is normalised by its mean count ``s`` and log-compressed; the
    output is ``s * softplus(residual + log-input decoding)``: in the input's units,
    never negative.

    Parameters
    ----------
    base : int
        Channels of the first level (doubled at each level).
    levels : int
        Number of resolution levels (input sizes are padded to a multiple of
        ``2 ** (levels - 1)`` internally; any detector size works).
    """

    def __init__(self, base: int = 16, levels: int = 3) -> None:
        super().__init__()
        if base < 4 or levels < 2:
            raise ValueError("base must be >= 4 and levels >= 2")
        self.levels = levels
        chans = [base * 2**i for i in range(levels)]
        self.enc = nn.ModuleList([_Block(1 if i == 0 else chans[i - 1], c) for i, c in enumerate(chans)])
        self.dec = nn.ModuleList([_Block(chans[i] + chans[i + 1], chans[i]) for i in range(levels - 1)])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch (N, 1, H, W) of non-negative counts; returns (N, 1, H, W)."""
        n, _, h, w = x.shape
        s = x.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        z = torch.log1p(x.clamp_min(0) / s)
        m = 2 ** (self.levels - 1)
        ph, pw = (-h) % m, (-w) % m
        z = F.pad(z, (0, pw, 0, ph), mode="replicate")
        skips = []
        for i, blk in enumerate(self.enc):
            z = blk(z if i == 0 else F.max_pool2d(z, 2))
            skips.append(z)
        for i in reversed(range(self.levels - 1)):
            z = F.interpolate(z, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            z = self.dec[i](torch.cat([z, skips[i]], dim=1))
        out = self.head(z)[..., :h, :w]
        return s * F.softplus(out) * 1.4427  # softplus(0)/ln2 -> 1: starts near the mean level
