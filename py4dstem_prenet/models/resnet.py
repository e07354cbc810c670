"""ResNet regressors for the origin and the ellipse (CoordConv input, fixed 64x64 view)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNetRegressor", "ResNetHeatmap"]


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with GroupNorm."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.GroupNorm(4, cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(4, cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(y)) + self.skip(x))


def _stem_and_stages(cin: int, widths: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """A 3x3 stem and stages of two basic blocks each (strides 1, 2, 2, ...)."""
    stem = nn.Sequential(nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False), nn.GroupNorm(4, widths[0]), nn.ReLU())
    layers, c = [], widths[0]
    for i, w in enumerate(widths):
        layers += [BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w)]
        c = w
    return stem, nn.Sequential(*layers)


class ResNetRegressor(nn.Module):
    """ResNet mapping a (N, C, 64, 64) view to ``outputs`` numbers.

    Two coordinate channels (CoordConv) are appended to the input and the final
    8x8 feature map is flattened rather than pooled, so that positions survive.

    Parameters
    ----------
    outputs : int
        Number of regressed values.
    channels : int
        Channels C of the input view.
    widths : tuple of int
        Channels of the four stages (strides 1, 2, 2, 2).
    size : int
        Side of the square input view, pixels.
    """

    def __init__(self, outputs: int, channels: int = 1, widths: tuple[int, int, int, int] = (16, 32, 48, 64),
                 size: int = 64) -> None:
        super().__init__()
        if outputs < 1 or channels < 1 or size % 8:
            raise ValueError("outputs and channels must be >= 1 and size a multiple of 8")
        self.size, self.channels = size, channels
        self.stem, self.body = _stem_and_stages(channels + 2, widths)
        cin = widths[-1]
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * (size // 8) ** 2, 128), nn.ReLU(), nn.Linear(128, outputs))
        g = torch.linspace(-1, 1, size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(g, g, indexing="ij"))[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Regress from a batch (N, C, size, size) of already normalised views."""
        if x.ndim != 4 or x.shape[1:] != (self.channels, self.size, self.size):
            raise ValueError(f"expected views (N, {self.channels}, {self.size}, {self.size}), got {tuple(x.shape)}")
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.head(self.body(self.stem(x)))


class ResNetHeatmap(nn.Module):
    """Fully convolutional ResNet locating one point by a soft-argmax heatmap.

    Returns (qx, qy) in view pixels and log sigma, the log of the heatmap's
    standard deviation (a per-pattern uncertainty), plus ``extra`` regressed numbers
    from globally pooled features.

    Parameters
    ----------
    extra : int
        Additional regressed outputs (e.g. log disk radius).
    widths : tuple of int
        Channels of the three stages (strides 1, 2, 2): the heatmap is at 1/4 of
        the view's resolution, upsampled bilinearly before the soft-argmax.
    """

    def __init__(self, extra: int = 1, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem, self.body = _stem_and_stages(1, widths)
        cin = widths[-1]
        self.heat = nn.Conv2d(cin, 1, 1)
        self.extra = nn.Linear(cin, extra) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) view -> (N, 3 + extra): qx, qy (view px), log sigma, extras."""
        n, _, h, w = x.shape
        f = self.body(self.stem(x))
        logits = F.interpolate(self.heat(f), size=(h, w), mode="bilinear", align_corners=False).reshape(n, -1)
        p = torch.softmax(logits, dim=1).reshape(n, h, w)
        gx = torch.arange(h, dtype=x.dtype, device=x.device)
        gy = torch.arange(w, dtype=x.dtype, device=x.device)
        px, py = p.sum(dim=2), p.sum(dim=1)
        mx, my = (px * gx).sum(dim=1), (py * gy).sum(dim=1)
        var = (px * (gx - mx[:, None]) ** 2).sum(dim=1) + (py * (gy - my[:, None]) ** 2).sum(dim=1)
        out = [mx[:, None], my[:, None], 0.5 * torch.log(var.clamp_min(1e-6) / 2)[:, None]]
        if self.extra is not None:
            out.append(self.extra(f.mean(dim=(2, 3))))
        return torch.cat(out, dim=1)
