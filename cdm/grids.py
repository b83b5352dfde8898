"""Sample grids written by training previews and sample.py (torchvision make_grid/save_image)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid, save_image

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


def save_labelled_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path,
                       padding: int = 2, margin: int = 16) -> Path:
    """One row per requested class (ascending), its label written in a left margin; rows with
    fewer samples are padded with black. images (N, C, H, W) in [-1, 1], labels (N,)."""
    images, labels = images.float().cpu(), labels.cpu()
    classes = labels.unique().tolist()
    cols = max(int((labels == c).sum()) for c in classes)
    rows = []
    for c in classes:
        row = images[labels == c]  # (k, C, H, W)
        rows += [row, row.new_full((cols - len(row), *row.shape[1:]), -1.0)]
    grid = make_grid(to_unit_range(torch.cat(rows)), nrow=cols, padding=padding, pad_value=0.5)
    canvas = Image.new("RGB", (grid.shape[-1] + margin, grid.shape[-2]), (128, 128, 128))
    canvas.paste(to_pil_image(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    step = images.shape[-2] + padding
    for i, c in enumerate(classes):
        draw.text((4, padding + i * step + step // 2 - 6), str(c), fill=(255, 255, 0))
    canvas.save(path)
    return Path(path)
