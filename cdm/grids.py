"""Sample grids written by training previews and sample.py (torchvision make_grid/save_image)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid, save_image

from cdm.cascade import CascadeSamples, stage_name
from cdm.data import to_unit_range


def nearest_up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Show a small image at `size` with visible pixels (nearest-neighbour)."""
    return F.interpolate(x.float(), size=(size, size), mode="nearest")


def save_cascade_grids(samples: CascadeSamples, out_dir: str | Path, suffix: str = "",
                       given: torch.Tensor | None = None, reference: torch.Tensor | None = None
                       ) -> dict[str, Path]:
    """Write one grid per stage output into out_dir: base.png, sr1.png, ... for the stages before
    the last (small images nearest-upscaled to the final size), cascade.png for the last, and
    side_by_side.png: per sample, [reference |] [given |] every stage's output, left to right.
    given: the low-res images the chain started from (sample.py --low-res); reference: the
    high-res images they were made from, when known. Returns the paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = samples.images
    size, n = final.shape[-1], final.shape[0]
    nrow = max(1, int(math.ceil(math.sqrt(n))))
    shown = {stage_name(k): samples.outputs[k] for k in list(samples.outputs)[:-1]}
    paths = {}
    for name, images in shown.items():
        paths[name] = out_dir / f"{name}{suffix}.png"
        save_image(to_unit_range(nearest_up(images, size)).cpu(), paths[name], nrow=nrow, padding=2, pad_value=0.5)
    paths["cascade"] = out_dir / f"cascade{suffix}.png"
    save_image(to_unit_range(final).cpu(), paths["cascade"], nrow=nrow, padding=2, pad_value=0.5)
    columns = [x for x in (reference, given) if x is not None] + list(samples.outputs.values())
    chains = torch.stack([to_unit_range(nearest_up(x.to(final.device), size)).cpu() for x in columns],
                         dim=1)  # (N, columns, C, size, size)
    paths["side_by_side"] = out_dir / f"side_by_side{suffix}.png"
    save_image(chains.flatten(0, 1), paths["side_by_side"], nrow=len(columns) * max(2, 16 // len(columns)),
               padding=2, pad_value=0.5)
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
