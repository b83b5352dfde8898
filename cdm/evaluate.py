"""Score cascade checkpoints (and any .npz of samples) like a paper: `python -m cdm.evaluate`.

    python -m cdm.evaluate --checkpoint output/cdm_mnist_cpu/checkpoint.pt --npz ../shared/anchors/*.npz
    python -m cdm.evaluate --checkpoint CKPT --aug-level 0,25,50,100,200 \
        --aug-mode truncated,non_truncated --plot --out output/eval_aug      # a sweep: one loop
    python -m cdm.evaluate --checkpoint CKPT --base-steps 10,25,50 --sr-steps 2,5,10
    python -m cdm.evaluate --checkpoint CKPT --base-sampler ddpm --base-steps 1000
    python -m cdm.evaluate --checkpoint COND_CKPT --cfg-scale 0,1,3 \
        --guidance-scale 0,1,3,10 --noisy-classifier COND_CKPT        # guidance study

Sample table: every set is scored against the MNIST test split (10,000 digits) with the
classifier's features: FD (with its N), precision, recall, class KL from uniform, share of the
most frequent class, confidence, for cascades the consistency MSE(downsample(x), base output)
and the sampling time, and when classes were requested (a conditional model, or an .npz with
`labels`) label_acc: how often the evaluation classifier reads the requested digit. SR table
(SR3 style): each SR stage given the true 8x8 test digits, against bicubic upsampling: PSNR,
SSIM, consistency, and how often the classifier still reads the true digit. Writes results.md,
results.json, sr_grid_<run>.png (rows: HR | LR | bicubic | SR) and, with --plot,
fd_vs_aug_level.png to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from cdm import metrics
from cdm.augment import sr_cond
from cdm.cascade import Stage, load_cascade, sample_cascade, with_sampler
from cdm.classifier import DEFAULT_PATH, load_classifier
from cdm.config import AUG_MODES, DATA_ROOT_ENV, SAMPLERS
from cdm.data import downsample, load_mnist, to_model_range, to_unit_range
from cdm.errors import ArgumentParser, UserError, int_list, run_cli, scale_list
from cdm.grids import nearest_up
from cdm.guidance import Guidance
from cdm.noisy_classifier import check_fits, load_noisy_classifier
from cdm.runtime import autocast, resolve_device, use_bf16
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


def load_npz_labels(path: str | Path) -> torch.Tensor | None:
    """The requested classes (N,) stored beside the images, if any."""
    with np.load(path) as data:
        return torch.from_numpy(data["labels"]).long() if "labels" in data else None


def score_samples(classifier, real_feats: torch.Tensor, images: torch.Tensor,
                  labels: torch.Tensor | None = None) -> dict:
    """FD, precision, recall and class statistics of images (N, C, 32, 32) vs the real features;
    with the requested labels (N,), also the share the classifier reads as requested."""
    feats, probs = classifier_outputs_grey(classifier, images)
    precision, recall = metrics.precision_recall(real_feats.float(), feats.float())
    row = {"n": len(images), "fd": metrics.frechet_distance(feats, real_feats),
           "precision": precision, "recall": recall, **metrics.class_statistics(probs)}
    if labels is not None:
        row["label_acc"] = (probs.argmax(1).cpu() == labels.cpu()).float().mean().item()
    return row


def classifier_outputs_grey(classifier, images: torch.Tensor):
    """The classifier reads one channel: average RGB samples to grey first."""
    return metrics.classifier_outputs(classifier, images.float().mean(dim=1, keepdim=True))


@torch.inference_mode()
def sr_report(sr: Stage, hr: torch.Tensor, labels: torch.Tensor, base_size: int, classifier,
              generator: torch.Generator, bf16: bool, grid_path: Path) -> list[dict]:
    """The SR stage given true low-res digits (aug_level 0) against bicubic upsampling."""
    device = next(sr.model.parameters()).device
    hr = hr.cpu()
    lr = downsample(hr, base_size)  # (N, C, 8, 8)
    outs = []
    for i in range(0, len(hr), 500):
        batch = lr[i:i + 500].to(device)
        noise = torch.randn(hr[i:i + 500].shape, generator=generator, device=device)
        cond = sr_cond(batch, torch.zeros(len(batch), dtype=torch.long, device=device))
        with autocast(device, bf16):
            outs.append(sr.diffusion.sample(sr.model, noise, cond, sr.sampler, generator=generator).float().cpu())
    sr_out = torch.cat(outs)  # (N, C, 32, 32)
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
    save_image(to_unit_range(grid.flatten(0, 1)), grid_path, nrow=k, padding=2, pad_value=0.5)
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_fd_vs_level(rows: list[dict], path: Path) -> Path | None:
    """FD against aug_level, one line per (checkpoint, mode); needs matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot written (pip install matplotlib)")
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if "aug_level" in r:
            series.setdefault(f"{r['run']} {r['aug_mode']}", []).append((r["aug_level"], r["fd"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("aug_level s at sampling")
    ax.set_ylabel("classifier-feature FD (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="*", default=[], help="cascade checkpoints to sample and score")
    parser.add_argument("--npz", nargs="*", default=[], help="sample files (uint8 images N,H,W,C) to score beside them")
    parser.add_argument("--num-samples", type=int, default=1000, help="1000 quick, 10000 standard")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--aug-level", type=int_list, help="one or more levels, e.g. 0,25,50 (default: config)")
    parser.add_argument("--aug-mode", help="truncated, non_truncated or both comma-separated (default: config)")
    parser.add_argument("--base-sampler", choices=SAMPLERS, help="default: config")
    parser.add_argument("--sr-sampler", choices=SAMPLERS, help="default: config")
    parser.add_argument("--base-steps", type=int_list, help="one or more base step counts")
    parser.add_argument("--sr-steps", type=int_list, help="one or more SR step counts")
    parser.add_argument("--cfg-scale", type=scale_list, help="classifier-free guidance weights, "
                        "e.g. 0,1,3 (default: config; needs a conditional checkpoint)")
    parser.add_argument("--guidance-scale", type=scale_list, help="classifier guidance scales, e.g. "
                        "0,1,3,10 (default: config; needs --noisy-classifier)")
    parser.add_argument("--noisy-classifier", help="checkpoint holding the noisy classifier for "
                        "classifier guidance (not the evaluation classifier, --classifier)")
    parser.add_argument("--sr-digits", type=int, default=1000, help="test digits for the SR table (0: skip)")
    parser.add_argument("--classifier", default=str(DEFAULT_PATH))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plot", action="store_true", help="also plot FD against aug_level")
    parser.add_argument("--out", default="output/eval")
    args = parser.parse_args()
    if not args.checkpoint and not args.npz:
        raise UserError("nothing to score: give --checkpoint and/or --npz files")
    modes = args.aug_mode.split(",") if args.aug_mode else [None]
    for mode in modes:
        if mode is not None and mode not in AUG_MODES:
            raise UserError(f"--aug-mode {mode!r}: expected {' or '.join(AUG_MODES)}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(args.classifier)
    root = os.environ.get(DATA_ROOT_ENV, "data")
    test_images, test_labels = load_mnist(root, True, 32, 1, train=False)
    real_feats = metrics.classifier_outputs(classifier, test_images)[0]
    half = len(test_images) // 2
    rows = [{"samples": f"MNIST test (first {half} vs last {half})",
             **score_samples(classifier, real_feats[half:], test_images[:half])}]
    for path in args.npz:
        rows.append({"samples": Path(path).name, **score_samples(classifier, real_feats, load_npz_images(path),
                                                                 load_npz_labels(path))})

    sr_rows = []
    device = resolve_device(args.device) if args.checkpoint else None
    if args.guidance_scale and not args.noisy_classifier:
        raise UserError("--guidance-scale needs --noisy-classifier PATH")
    guide_classifier, guide_cfg = (load_noisy_classifier(args.noisy_classifier, device)
                                   if args.noisy_classifier else (None, None))
    for path in args.checkpoint:
        cfg, stages, ckpt = load_cascade(path, device)
        bf16 = use_bf16(cfg.train.precision, device)
        run = f"{Path(path).parent.name}/{Path(path).name}"
        if guide_classifier is not None:
            check_fits(guide_cfg, cfg, args.noisy_classifier)
        if args.cfg_scale and not stages["base"].model.num_classes:
            raise UserError(f"--cfg-scale: '{path}' is not class-conditional")
        for level, mode, base_steps, sr_steps, cfg_scale, scale in itertools.product(
                args.aug_level or [cfg.augment.aug_level], modes, args.base_steps or [None],
                args.sr_steps or [None], args.cfg_scale or [cfg.guidance.cfg_scale],
                args.guidance_scale or [cfg.guidance.classifier_scale if guide_classifier else 0.0]):
            mode = mode or cfg.augment.aug_mode
            guidance = Guidance(cfg_scale, guide_classifier, scale)
            base = with_sampler(stages["base"], steps=base_steps, name=args.base_sampler)
            sr = with_sampler(stages["sr"], steps=sr_steps, name=args.sr_sampler)
            generator = torch.Generator(device).manual_seed(args.seed)
            start = time.perf_counter()
            samples = sample_cascade(base, sr, args.num_samples, level, mode, generator=generator,
                                     batch_size=args.batch_size, bf16=bf16, progress=True,
                                     guidance=guidance)
            seconds = time.perf_counter() - start
            images = samples.images.cpu()
            guided = f", cfg {cfg_scale:g}" * bool(base.model.num_classes) + f", cg {scale:g}" * bool(scale)
            rows.append({"samples": f"{run} (step {ckpt['step']}, s={level} {mode}, "
                                    f"{base.sampler.name}-{base.sampler.steps}/{sr.sampler.name}-{sr.sampler.steps}"
                                    f"{guided})",
                         "run": run, "aug_level": level, "aug_mode": mode, "cfg_scale": cfg_scale,
                         "guidance_scale": scale, "sample_s": seconds,
                         **score_samples(classifier, real_feats, images, samples.labels),
                         "consistency": metrics.consistency(images, samples.base.cpu()).mean().item()})
            print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        if args.sr_digits:
            generator = torch.Generator(device).manual_seed(args.seed)
            for row in sr_report(stages["sr"], test_images[:args.sr_digits].to(device),
                                 test_labels[:args.sr_digits], cfg.base.image_size, classifier,
                                 generator, bf16, out_dir / f"sr_grid_{Path(path).parent.name}.png"):
                sr_rows.append({"run": run, **row})
    for r in rows:
        r["max_class"] = max(r["class_hist"])
    text = ("Sample quality (classifier-feature FD against the 10,000 MNIST test digits, lower is "
            "better; consistency = MSE(downsample(final), base output)):\n\n" + markdown_table(rows, COLUMNS))
    if sr_rows:
        text += "\n\nSuper-resolution on true 8x8 test digits (aug_level 0):\n\n" + markdown_table(
            sr_rows, ["run", "method", "n", "psnr", "ssim", "consistency", "digit_kept"])
    print(text)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps({"samples": rows, "super_resolution": sr_rows}, indent=1))
    written = [out_dir / "results.md", out_dir / "results.json"]
    if args.plot:
        written.append(plot_fd_vs_level(rows, out_dir / "fd_vs_aug_level.png"))
    print("wrote " + ", ".join(str(p) for p in written if p))


COLUMNS = ["samples", "n", "fd", "precision", "recall", "class_kl", "max_class", "confidence",
           "label_acc", "consistency", "sample_s"]


if __name__ == "__main__":
    run_cli(main)
