"""MNIST, resident in memory as one tensor, and the pixel conversions used everywhere.

The whole train split (60,000 digits) is resized once from 28x28 to the SR stage's size
(antialiased bilinear), scaled to [-1, 1] and kept on the training device: a batch is one
index operation, with no per-image PIL work. The base stage's 8x8 target and the SR stage's
low-res input are made from the same batch by `downsample` (area averaging, which is the exact
antialiasing filter for an integer factor).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import MNIST

from cdm.errors import UserError


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


def load_mnist(root: str, download: bool, image_size: int, channels: int, train: bool = True,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as (images (N, channels, S, S) float32 in [-1, 1], labels (N,) long) on `device`."""
    try:
        dataset = MNIST(root=root, train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
        raise UserError(f"MNIST not found under data root '{Path(root).resolve()}' "
                        f"(download={download}): {err}. Set data.root or $CDM_DATA_ROOT to a folder "
                        f"holding MNIST/raw, or enable data.download") from None
    except OSError as err:
        raise UserError(f"could not download MNIST into '{root}': {err}") from None
    digits = dataset.data.unsqueeze(1).float().div(255)  # (N, 1, 28, 28) in [0, 1]
    images = F.interpolate(digits, size=(image_size, image_size), mode="bilinear",
                           antialias=True, align_corners=False).clamp(0, 1)
    images = to_model_range(images).expand(-1, channels, -1, -1).contiguous()
    return images.to(device), dataset.targets.long().to(device)
