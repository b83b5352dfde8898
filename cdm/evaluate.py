"""Score a cascade checkpoint (and any .npz of samples) like a paper: `python -m cdm.evaluate`.

    python -m cdm.evaluate --checkpoint output/cdm_mnist_cpu/checkpoint.pt --num-samples 1000 \
        --npz ../shared/anchors/*.npz --out output/eval

Sample table: every set is scored against the MNIST test split (10,000 digits) with the
classifier's features: FD (with its N), precision, recall, class KL from uniform, confidence.
SR table (SR3 style): the SR stage given the true 8x8 test digits vs bicubic upsampling: PSNR,
SSIM, consistency, and how often the classifier still reads the true digit. Writes
results.json, results.md and sr_grid.png (rows: HR | LR | bicubic | SR) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from cdm import metrics
from cdm.cascade import Stage, load_cascade, sample_cascade, with_sampler
from cdm.classifier import DEFAULT_PATH, load_classifier
from cdm.config import DATA_ROOT_ENV
from cdm.data import downsample, load_mnist, to_model_range, to_unit_range
from cdm.errors import ArgumentParser, UserError, run_cli
from cdm.grids import nearest_up
from cdm.runtime import resolve_device, use_bf16
from cdm.unet import upsample_low_res


def load_npz_images(path: str | Path) -> torch.Tensor:
    """uint8 (N, H, W, C) `images` from an .npz -> float (N, C, H, W) in [-1, 1]."""
    try:
        images = np.load(path)["images"]
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"samples file '{path}': cannot read an 'images' array ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"samples file '{path}': expected uint8 images (N, H, W, C), "
                        f"got {images.dtype} {images.shape}")
    return to_model_range(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def score_samples(classifier, real_feats: torch.Tensor, images: torch.Tensor) -> dict:
    """FD, precision, recall and class statistics of images (N, C, 32, 32) vs the real features."""
    feats, probs = classifier_outputs_grey(classifier, images)
    precision, recall = metrics.precision_recall(real_feats.float(), feats.float())
    return {"n": len(images), "fd": metrics.frechet_distance(feats, real_feats),
            "precision": precision, "recall": recall, **metrics.class_statistics(probs)}


def classifier_outputs_grey(classifier, images: torch.Tensor):
    """The classifier reads one channel: average RGB samples to grey first."""
    return metrics.classifier_outputs(classifier, images.float().mean(dim=1, keepdim=True))


@torch.inference_mode()
def sr_report(sr: Stage, hr: torch.Tensor, labels: torch.Tensor, base_size: int, classifier,
              generator: torch.Generator, bf16: bool, out_dir: Path) -> list[dict]:
    """The SR stage given true low-res digits (aug_level 0) against bicubic upsampling."""
    device = next(sr.model.parameters()).device
    lr = downsample(hr, base_size)  # (N, C, 8, 8)
    levels = torch.zeros(len(hr), dtype=torch.long, device=device)
    outs = []
    for i in range(0, len(hr), 500):
        noise = torch.randn(hr[i:i + 500].shape, generator=generator, device=device)
        cond = {"low_res": lr[i:i + 500].to(device), "aug_level": levels[i:i + 500]}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outs.append(sr.diffusion.sample(sr.model, noise.to(device), cond, sr.sampler,
                                            generator=generator).float().cpu())
    sr_out = torch.cat(outs)
    bicubic = upsample_low_res(lr, hr.shape[-1], "bicubic").clamp(-1, 1)
    rows = []
    for name, pred in (("bicubic", bicubic), ("SR stage", sr_out)):
        probs = classifier_outputs_grey(classifier, pred)[1]
        rows.append({"method": name, "n": len(hr), "psnr": metrics.psnr(pred, hr).mean().item(),
                     "ssim": metrics.ssim(pred, hr).mean().item(),
                     "consistency": metrics.consistency(pred, lr).mean().item(),
                     "digit_kept": (probs.argmax(1) == labels).float().mean().item()})
    k = 8
    grid = torch.stack([hr[:k], nearest_up(lr[:k], hr.shape[-1]), bicubic[:k], sr_out[:k]])  # (4, k, C, H, W)
    save_image(to_unit_range(grid.flatten(0, 1)), out_dir / "sr_grid.png", nrow=k, padding=2, pad_value=0.5)
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="cascade checkpoint to sample and score")
    parser.add_argument("--npz", nargs="*", default=[], help="extra sample files to score beside it")
    parser.add_argument("--num-samples", type=int, default=1000, help="1000 quick, 10000 standard")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--aug-level", type=int)
    parser.add_argument("--aug-mode")
    parser.add_argument("--base-steps", type=int)
    parser.add_argument("--sr-steps", type=int)
    parser.add_argument("--sr-digits", type=int, default=1000, help="test digits for the SR table (0: skip)")
    parser.add_argument("--classifier", default=str(DEFAULT_PATH))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="output/eval")
    args = parser.parse_args()
    if not args.checkpoint and not args.npz:
        raise UserError("nothing to score: give --checkpoint and/or --npz files")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(args.classifier)
    root = os.environ.get(DATA_ROOT_ENV, "data")
    test_images, test_labels = load_mnist(root, True, 32, 1, train=False)
    real_feats = metrics.classifier_outputs(classifier, test_images)[0]
    half = len(test_images) // 2
    rows = [{"samples": f"MNIST test (first {half} vs last {half})",
             **score_samples(classifier, real_feats[half:], test_images[:half])}]
    rows[0]["n"] = half
    for path in args.npz:
        rows.append({"samples": Path(path).name, **score_samples(classifier, real_feats, load_npz_images(path))})

    sr_rows = []
    if args.checkpoint:
        device = resolve_device(args.device)
        cfg, stages, ckpt = load_cascade(args.checkpoint, device)
        for name, steps in (("base", args.base_steps), ("sr", args.sr_steps)):
            if steps:
                stages[name] = with_sampler(stages[name], steps=steps)
        bf16 = use_bf16(cfg.train.precision, device)
        aug_level = cfg.augment.aug_level if args.aug_level is None else args.aug_level
        aug_mode = args.aug_mode or cfg.augment.aug_mode
        generator = torch.Generator(device).manual_seed(args.seed)
        start = time.perf_counter()
        samples = sample_cascade(stages["base"], stages["sr"], args.num_samples, aug_level, aug_mode,
                                 generator=generator, batch_size=args.batch_size, bf16=bf16, progress=True)
        seconds = time.perf_counter() - start
        images = samples.images.cpu()
        b, s = stages["base"].sampler, stages["sr"].sampler
        rows.append({"samples": f"{Path(args.checkpoint).name} (step {ckpt['step']}, s={aug_level} "
                                f"{aug_mode}, {b.name}-{b.steps}/{s.name}-{s.steps})",
                     **score_samples(classifier, real_feats, images), "sample_s": seconds,
                     "cascade_consistency": metrics.consistency(images, samples.base.cpu()).mean().item()})
        if args.sr_digits:
            sr_rows = sr_report(stages["sr"], test_images[:args.sr_digits].to(device),
                                test_labels[:args.sr_digits], cfg.base.image_size, classifier,
                                generator, bf16, out_dir)
    for r in rows:
        r["max_class"] = max(r["class_hist"])
    columns = ["samples", "n", "fd", "precision", "recall", "class_kl", "max_class", "confidence", "sample_s"]
    text = "Sample quality (classifier-feature FD vs MNIST test, lower is better):\n\n" + markdown_table(rows, columns)
    if sr_rows:
        text += "\n\nSuper-resolution on true 8x8 test digits:\n\n" + markdown_table(
            sr_rows, ["method", "n", "psnr", "ssim", "consistency", "digit_kept"])
    print(text)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps({"samples": rows, "super_resolution": sr_rows}, indent=1))
    print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}"
          + (f", {out_dir / 'sr_grid.png'}" if sr_rows else ""))


if __name__ == "__main__":
    run_cli(main)
