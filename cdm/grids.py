"""Sample grids written by training previews and sample.py (torchvision make_grid/save_image)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from cdm.cascade import CascadeSamples
from cdm.data import to_unit_range


def nearest_up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Show a small image at `size` with visible pixels (nearest-neighbour)."""
    return F.interpolate(x.float(), size=(size, size), mode="nearest")


def save_cascade_grids(samples: CascadeSamples, out_dir: str | Path, suffix: str = "") -> dict[str, Path]:
    """Write base.png (8x8 shown nearest-upscaled), cascade.png (32x32) and side_by_side.png
    (pairs: base | SR output) into out_dir; returns the paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = samples.images.shape[-1]
    n = samples.images.shape[0]
    nrow = max(1, int(math.ceil(math.sqrt(n))))
    base = to_unit_range(nearest_up(samples.base, size)).cpu()  # (N, C, 32, 32)
    final = to_unit_range(samples.images).cpu()  # (N, C, 32, 32)
    pairs = torch.stack([base, final], dim=1).flatten(0, 1)  # (2N, C, 32, 32): base, SR, ...
    paths = {"base": out_dir / f"base{suffix}.png", "cascade": out_dir / f"cascade{suffix}.png",
             "side_by_side": out_dir / f"side_by_side{suffix}.png"}
    save_image(base, paths["base"], nrow=nrow, padding=2, pad_value=0.5)
    save_image(final, paths["cascade"], nrow=nrow, padding=2, pad_value=0.5)
    save_image(pairs, paths["side_by_side"], nrow=2 * min(8, nrow), padding=2, pad_value=0.5)
    return paths

