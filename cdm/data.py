"""The pixel conversions used everywhere, and `downsample`.

Images live in [-1, 1] as (N, C, H, W) float tensors (cdm/datasets.py loads them so). The base
stage's target and the SR stage's low-res input are made from the same batch by `downsample`
(area averaging, which is the exact antialiasing filter for an integer factor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def to_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) -> uint8 (N, H, W, C) on the CPU, as stored in samples.npz."""
    return (to_unit_range(x.float()) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased downsampling (B, C, H, W) -> (B, C, size, size) by area averaging."""
    return F.interpolate(x, size=(size, size), mode="area")
