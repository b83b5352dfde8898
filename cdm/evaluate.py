"""Score cascade checkpoints (and any .npz of samples) like a paper: `python -m cdm.evaluate`.

    python -m cdm.evaluate --checkpoint output/pretrained/cdm_mnist_cpu_15min.pt --npz ANCHORS/*.npz
    python -m cdm.evaluate --checkpoint CKPT --num-samples 10000 --seeds 0,1,2
    python -m cdm.evaluate --checkpoint CKPT --aug-level 0,25,50,100,200 \
        --aug-mode truncated,non_truncated --plot --out output/eval_aug      # a sweep: one loop
    python -m cdm.evaluate --checkpoint CKPT --base-steps 10,25,50 --sr-steps 2,5,10 --spacing uniform,quadratic
    python -m cdm.evaluate --checkpoint COND_CKPT --cfg-scale 0,1,3 --guidance-scale 0,1,3,10

Every set of samples is scored in two feature spaces, those of the two evaluation networks of
cdm.classifier (cnn32, the primary one, and resnet28), against the 10,000 MNIST test digits:
FD (with its N), precision, recall, class KL from uniform, share of the most frequent class,
and when classes were requested (a conditional model, or an .npz with `labels`) label_acc: how
often the evaluation network reads the requested digit. Cascades also get the consistency
MSE(downsample(x), base output) and the sampling time.

Spread: a checkpoint is sampled once per --seeds seed (default 3) and each number is the mean
± the standard deviation over seeds; an .npz holds one fixed set, so its spread is the standard
deviation over --bootstrap resamples with replacement (recall keeps each sample's k-NN radius
from the full set). The floor: for every N in the table, --floor-draws disjoint sets of N real
MNIST *training* digits scored exactly like samples (same reference, same code), mean ± std. A
row is "at the floor" in a space when its FD is within one floor standard deviation of the
floor's mean.

Classes (--classes): a conditional checkpoint draws its classes at random from the training
shares, and the floor's sets hold whatever classes fall in them, so at N = 10,000 the class
histogram moves every FD (most of the floor's spread, docs/results.md 9.21). --classes stratified
takes that noise out of both sides: each seed asks for every class exactly its share of N, and
each floor set holds exactly that many training digits of each class (class-conditional
checkpoints only; an .npz keeps its own classes).

SR table (SR3 style): the SR stages (all of them, in turn) given the true base-size test digits,
against bicubic upsampling: PSNR, SSIM, consistency, and how often each evaluation network still
reads the true digit. --aug-level and --aug-mode set every SR stage.

Stages apart (--split N): which stage limits the cascade, on N held-out training digits, the
last N of the floor's order (for N <= 10,000 no drawn floor set of the default 5 uses them): the
base's N samples against the digits' true base-size versions, and the SR stages given those true
versions against the test digits, each beside the same measure for real digits (stage_split;
each stage samples with its stored sampler, not the sweeps' options).
Writes results.md, results.json (with each seed's FDs, `fd_<space>_each`, for comparing two files
seed by seed), sr_grid_<run>.png (rows: HR | LR | bicubic | SR) and, with --plot,
fd_vs_aug_level.png to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image
from tqdm import tqdm

from cdm import metrics
from cdm.cascade import (CascadeSamples, Stage, class_counts, default_labels, load_cascade, sample_cascade,
                         with_augment, with_sampler)
from cdm.checkpoint import checkpoint_config, load_checkpoint
from cdm.classifier import DEFAULT_PATHS, load_classifier
from cdm.config import AUG_MODES, DATA_ROOT_ENV, SAMPLERS, SPACINGS
from cdm.data import downsample, to_unit_range
from cdm.datasets import load_mnist, load_npz_images
from cdm.errors import ArgumentParser, UserError, int_list, run_cli, scale_list
from cdm.grids import nearest_up
from cdm.guidance import Guidance
from cdm.noisy_classifier import default_guidance, load_noisy_classifier
from cdm.runtime import resolve_device, use_bf16
from cdm.unet import upsample_low_res


def load_npz_labels(path: str | Path) -> torch.Tensor | None:
    """The requested classes (N,) stored beside the images, if any."""
    with np.load(path) as data:
        return torch.from_numpy(data["labels"]).long() if "labels" in data else None


@dataclass
class FeatureSpace:
    """One evaluation network and, in its feature space, the reference set: the features of the
    10,000 MNIST test digits and their k-NN radii (computed once, used by every row)."""

    name: str
    net: torch.nn.Module
    real: torch.Tensor  # (M, D) float64
    real_radii: torch.Tensor  # (M,)

    @classmethod
    def build(cls, name: str, path: str | os.PathLike, reference: torch.Tensor) -> "FeatureSpace":
        return cls.from_network(name, load_classifier(path), reference)

    @classmethod
    def from_network(cls, name: str, net: torch.nn.Module, reference: torch.Tensor) -> "FeatureSpace":
        real = metrics.classifier_outputs(net, reference)[0]
        return cls(name, net, real, metrics.kth_neighbour_radius(real.float()))

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D), probabilities (N, 10)); RGB samples are averaged to grey first."""
        return metrics.classifier_outputs(self.net, images.float().mean(dim=1, keepdim=True))


def score(spaces: list[FeatureSpace], images: torch.Tensor, labels: torch.Tensor | None = None,
          bootstrap: int = 0, seed: int = 0) -> dict:
    """Images (N, C, 32, 32) in every feature space: {"fd_cnn32": ..., "recall_resnet28": ...};
    label_acc_* when labels (N,) are given. bootstrap > 0 adds the *_std of that many resamples."""
    row = {"n": len(images)}
    for space in spaces:
        feats, probs = space.outputs(images)
        precision, recall = metrics.precision_recall(space.real.float(), feats.float(),
                                                     real_radii=space.real_radii)
        values = {"fd": metrics.frechet_distance(feats, space.real), "precision": precision,
                  "recall": recall, **class_numbers(probs, labels)}
        row.update({f"{k}_{space.name}": v for k, v in values.items()})
        if bootstrap:
            row.update(bootstrap_std(space, feats, probs, labels, bootstrap, seed))
    return row


def cascade_row(spaces: list[FeatureSpace], samples: CascadeSamples, seconds: float) -> dict:
    """One seed of a cascade row: its samples scored (with the labels asked for), the sampling
    time, and the consistency of the final images with the base's outputs."""
    images = samples.images.cpu()
    return {**score(spaces, images, samples.labels), "sample_s": seconds,
            "consistency": metrics.consistency(images, samples.outputs[0].cpu()).mean().item()}


def class_numbers(probs: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """class_kl, max_class and (with labels) label_acc of class probabilities (N, 10)."""
    stats = metrics.class_statistics(probs)
    out = {"class_kl": stats["class_kl"], "max_class": max(stats["class_hist"])}
    if labels is not None:
        out["label_acc"] = (probs.argmax(1).cpu() == labels.cpu()).float().mean().item()
    return out


def bootstrap_std(space: FeatureSpace, feats: torch.Tensor, probs: torch.Tensor,
                  labels: torch.Tensor | None, draws: int, seed: int) -> dict:
    """Standard deviations over `draws` resamples (with replacement) of one fixed sample set.
    Precision and the class numbers are means over samples; recall asks which real points the
    resampled samples' balls (radii from the full set) cover."""
    n = len(feats)
    generator = torch.Generator().manual_seed(seed)
    fake, real = feats.float(), space.real.float()
    in_real = metrics.inside_balls(fake, real, space.real_radii)  # (N,) precision per sample
    fake_radii = metrics.kth_neighbour_radius(fake)
    cover = torch.cat([torch.cdist(real[i:i + 1000], fake) <= fake_radii[None]
                       for i in range(0, len(real), 1000)])  # (M, N) bool
    values: dict[str, list[float]] = {}
    for _ in range(draws):
        idx = torch.randint(0, n, (n,), generator=generator)
        draw = {"fd": metrics.frechet_distance(feats[idx], space.real),
                "precision": in_real[idx].float().mean().item(),
                "recall": cover[:, idx.unique()].any(dim=1).float().mean().item(),
                **class_numbers(probs[idx], labels[idx] if labels is not None else None)}
        for k, v in draw.items():
            values.setdefault(k, []).append(v)
    return {f"{k}_{space.name}_std": float(np.std(v, ddof=1)) for k, v in values.items()}


def mean_std(rows: list[dict]) -> dict:
    """The mean of every number the rows share and, over two or more rows, its std (ddof 1); the
    FDs also row by row (`fd_..._each`: a checkpoint's seeds or the floor's sets, in order). Two
    files scored with the same seeds draw the same classes, so their per-seed differences compare
    them more finely than the spreads."""
    out = {}
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in rows]
            out[key] = float(np.mean(values)) if isinstance(value, float) else value
            if len(rows) > 1 and isinstance(value, float):
                out[f"{key}_std"] = float(np.std(values, ddof=1))
                if key.startswith("fd"):
                    out[f"{key}_each"] = [float(v) for v in values]
    return out


def floor_order(count: int, seed: int = 0) -> torch.Tensor:
    """The order in which the floor draws its disjoint sets of real training digits."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def held_out(count: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """--split's two sets of n training-digit indices, the last 2n of the floor's order: (other,
    the real set beside the base; hr, the digits the stages are measured on)."""
    if 2 * n > count:
        raise UserError(f"--split {n}: needs twice that many training digits, there are {count}")
    last = floor_order(count)[count - 2 * n:]  # (2n,)
    return last[:n], last[n:]


def floor_rows(spaces: list[FeatureSpace], images: torch.Tensor, labels: torch.Tensor,
               sizes: list[int], draws: int, seed: int = 0, stratified: bool = False) -> list[dict]:
    """The real-data floor at each N: `draws` disjoint sets of N training digits, each scored
    exactly like a set of samples, mean ± std over the sets. stratified: each set holds exactly
    each class's share of N (class_counts of the training labels), in the floor's order per class."""
    order = floor_order(len(images), seed)
    by_class = [order[labels[order] == k] for k in range(int(labels.max()) + 1)] if stratified else []  # (n_k,) each
    rows = []
    for n in sizes:
        if n * draws > len(images):
            raise UserError(f"--floor-draws {draws}: {draws} disjoint sets of N = {n} need "
                            f"{n * draws} training digits, there are {len(images)}")
        if stratified:
            counts = class_counts(n, torch.tensor([len(idx) for idx in by_class])).tolist()
            short = next((k for k, c in enumerate(counts) if c * draws > len(by_class[k])), None)
            if short is not None:
                raise UserError(f"--classes stratified: {draws} disjoint sets of N = {n} need "
                                f"{counts[short] * draws} training digits of class {short}, "
                                f"there are {len(by_class[short])}")
            sets = [torch.cat([idx[i * c:(i + 1) * c] for idx, c in zip(by_class, counts)]) for i in range(draws)]
        else:
            sets = [order[i * n:(i + 1) * n] for i in range(draws)]
        scored = [score(spaces, images[idx], labels[idx]) for idx in tqdm(sets, desc=f"floor N={n}", leave=False)]
        kind = " class-stratified" if stratified else ""
        rows.append({"samples": f"real MNIST training digits (the floor; {draws} disjoint{kind} sets)",
                     "spread": f"{draws} sets", **mean_std(scored)})
    return rows


def at_floor(row: dict, floors: dict[int, dict], spaces: list[FeatureSpace]) -> str:
    """The spaces in which the row's FD is within one floor std of the floor at its N."""
    floor = floors.get(row["n"])
    if floor is None or row.get("floor"):
        return ""
    names = [s.name for s in spaces
             if row[f"fd_{s.name}"] <= floor[f"fd_{s.name}"] + floor[f"fd_{s.name}_std"]]
    return ", ".join(names) or "no"


def sr_report(stages: list[Stage], hr: torch.Tensor, labels: torch.Tensor, spaces: list[FeatureSpace],
              generator: torch.Generator, bf16: bool, grid_path: Path | None) -> list[dict]:
    """The SR stages (stages[1:], aug_level 0) given true base-size digits, against bicubic
    upsampling of the same digits; class-conditional SR stages are given the true labels."""
    device = next(stages[0].model.parameters()).device
    hr = hr.cpu()
    lr = downsample(hr, stages[0].cfg.image_size)  # (N, C, 8, 8)
    sr_stages = [with_augment(s, aug_level=0) for s in stages[1:]]
    sr_out = sample_cascade(sr_stages, len(hr), generator, batch_size=500, labels=labels.to(device),
                            bf16=bf16, low_res=lr.to(device)).images.cpu()  # (N, C, 32, 32)
    bicubic = upsample_low_res(lr, hr.shape[-1], "bicubic").clamp(-1, 1)
    rows = []
    for name, pred in (("bicubic", bicubic), ("SR stages", sr_out)):
        row = {"method": name, "n": len(hr), "psnr": metrics.psnr(pred, hr).mean().item(),
               "ssim": metrics.ssim(pred, hr).mean().item(),
               "consistency": metrics.consistency(pred, lr).mean().item()}
        for space in spaces:
            probs = space.outputs(pred)[1]
            row[f"digit_kept_{space.name}"] = (probs.argmax(1) == labels.cpu()).float().mean().item()
        rows.append(row)
    if grid_path is not None:
        k = 8
        grid = torch.stack([hr[:k], nearest_up(lr[:k], hr.shape[-1]), bicubic[:k], sr_out[:k]])  # (4, k, C, H, W)
        save_image(to_unit_range(grid.flatten(0, 1)), grid_path, nrow=k, padding=2, pad_value=0.5)
    return rows


def stage_split(stages: list[Stage], hr: torch.Tensor, labels: torch.Tensor, other: torch.Tensor,
                spaces: list[FeatureSpace], seeds: list[int], bf16: bool, batch_size: int) -> list[dict]:
    """Which stage limits a cascade: each measured apart on held-out training digits hr (N, C,
    32, 32) with their labels (docs/results.md 9.14), the sampled rows mean ± std over `seeds`.
    base: the FD, in each network's features of bicubic-upsampled images, between N base samples
    (asked for the same digits) and the digits' true base-size versions; its floor is the same FD
    for `other`, N more real digits. SR: the SR stages given the true base-size digits, scored
    against the test digits like samples, beside the N real digits themselves. A base alone
    (stages of one) gets the base rows only."""
    device = next(stages[0].model.parameters()).device
    size = stages[0].cfg.image_size

    def features(low: torch.Tensor) -> dict[str, torch.Tensor]:  # low: (N, C, size, size)
        up = upsample_low_res(low.cpu(), hr.shape[-1], "bicubic").clamp(-1, 1)
        return {space.name: space.outputs(up)[0] for space in spaces}

    low_res = downsample(hr.cpu(), size)  # (N, C, size, size)
    target = features(low_res)

    def base_fd(low: torch.Tensor) -> dict:
        return {"n": len(hr), **{f"fd_{name}": metrics.frechet_distance(f, target[name])
                                 for name, f in features(low).items()}}

    y = labels.to(device) if stages[0].model.num_classes else None
    sr_stages = [with_augment(s, aug_level=0) for s in stages[1:]]
    base_rows, sr_rows = [], []
    for seed in tqdm(seeds, desc="stages apart", leave=False):
        generator = torch.Generator(device).manual_seed(seed)
        base = sample_cascade(stages[:1], len(hr), generator, batch_size, labels=y, bf16=bf16).images
        base_rows.append(base_fd(base))
        if sr_stages:
            sr = sample_cascade(sr_stages, len(hr), generator, batch_size, labels=labels.to(device), bf16=bf16,
                                low_res=low_res.to(device)).images
            sr_rows.append(score(spaces, sr.cpu(), labels))
    rows = [{"part": f"real {size}x{size} digits (another set)", **base_fd(downsample(other.cpu(), size))},
            {"part": f"base samples at {size}x{size}", **mean_std(base_rows)}]
    return rows + ([{"part": "real digits", **score(spaces, hr.cpu(), labels)},
                    {"part": f"SR stages on the true {size}x{size} digits", **mean_std(sr_rows)}]
                   if sr_stages else [])


def choice_list(flag: str, text: str | None, choices: tuple[str, ...]) -> list[str | None]:
    """A comma-separated option value, each part one of `choices`; [None] (each stage's config)
    when the option was not given."""
    values = text.split(",") if text else [None]
    for value in values:
        if value is not None and value not in choices:
            raise UserError(f"{flag} {value!r}: expected {' or '.join(choices)}")
    return values


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a markdown table; a number with a `<key>_std` beside it shows as mean ± std."""
    def cell(r: dict, c: str) -> str:
        v = r.get(c, "")
        if not isinstance(v, float):
            return str(v)
        std = r.get(f"{c}_std")
        return f"{v:.3g} ± {std:.2g}" if std is not None else f"{v:.3g}"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_fd_vs_level(rows: list[dict], fd_key: str, path: Path) -> Path | None:
    """FD (in the space of `fd_key`) against aug_level, one line per (checkpoint, mode); needs
    matplotlib (optional)."""
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
            series.setdefault(f"{r['run']} {r['aug_mode']}", []).append((r["aug_level"], r[fd_key]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("aug_level s at sampling")
    ax.set_ylabel(f"{fd_key} (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def space_columns(spaces: list[FeatureSpace]) -> list[str]:
    return [f"{m}_{s.name}" for s in spaces for m in ("fd", "precision", "recall")]


def columns(spaces: list[FeatureSpace]) -> list[str]:
    return ["samples", "n", "spread", *space_columns(spaces), f"class_kl_{spaces[0].name}",
            f"max_class_{spaces[0].name}", *[f"label_acc_{s.name}" for s in spaces], "at_floor",
            "consistency", "sample_s"]


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="*", default=[], help="cascade checkpoints to sample and score")
    parser.add_argument("--npz", nargs="*", default=[], help="sample files (uint8 images N,H,W,C) to score beside them")
    parser.add_argument("--num-samples", type=int, default=1000, help="1000 quick, 10000 standard")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2],
                        help="sampling seeds of each checkpoint row: its spread (default 0,1,2)")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples for an .npz file's spread")
    parser.add_argument("--floor-draws", type=int, default=5, help="disjoint sets of real digits per floor")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--aug-level", type=int_list, help="one or more levels, e.g. 0,25,50 (default: config)")
    parser.add_argument("--aug-mode", help="truncated, non_truncated or both comma-separated (default: config)")
    parser.add_argument("--base-sampler", choices=SAMPLERS, help="default: config")
    parser.add_argument("--sr-sampler", choices=SAMPLERS, help="default: config")
    parser.add_argument("--base-steps", type=int_list, help="one or more base step counts")
    parser.add_argument("--sr-steps", type=int_list, help="one or more SR step counts")
    parser.add_argument("--spacing", help="the states every stage's sampler visits: uniform, "
                        "quadratic or both comma-separated (default: config)")
    parser.add_argument("--cfg-scale", type=scale_list, help="classifier-free guidance weights, "
                        "e.g. 0,1,3 (default: config; needs a conditional checkpoint)")
    parser.add_argument("--guidance-scale", type=scale_list, help="classifier guidance scales, e.g. "
                        "0,1,3,10 (default: config; needs a noisy classifier)")
    parser.add_argument("--noisy-classifier", help="checkpoint holding the noisy classifier for "
                        "classifier guidance (not the evaluation networks, --classifier)")
    parser.add_argument("--no-guidance", action="store_true",
                        help="sample without any guidance (overrides the defaults above)")
    parser.add_argument("--sr-digits", type=int, default=1000, help="test digits for the SR table (0: skip)")
    parser.add_argument("--split", type=int, default=0, help="held-out training digits to measure "
                        "each stage apart on, e.g. 10000 (0: skip; docs/results.md 9.14)")
    parser.add_argument("--classes", choices=("drawn", "stratified"), default="drawn",
                        help="a conditional checkpoint's classes: drawn at random from the training "
                        "shares, or stratified, exactly each share of N, beside class-stratified floor sets")
    parser.add_argument("--classifier", nargs="+", default=[str(p) for p in DEFAULT_PATHS.values()],
                        help="evaluation networks, one feature space each; the first is primary")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plot", action="store_true", help="also plot FD against aug_level")
    parser.add_argument("--out", default="output/eval")
    args = parser.parse_args()
    if not args.checkpoint and not args.npz:
        raise UserError("nothing to score: give --checkpoint and/or --npz files")
    modes = choice_list("--aug-mode", args.aug_mode, AUG_MODES)
    spacings = choice_list("--spacing", args.spacing, SPACINGS)
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: expected a positive number")
    if args.floor_draws < 2:
        raise UserError(f"--floor-draws {args.floor_draws}: the floor's spread needs at least 2 sets of real digits")
    if args.split < 0:
        raise UserError(f"--split {args.split}: expected a number of held-out digits, or 0 to skip")
    stratified = args.classes == "stratified"
    if stratified and args.npz:
        raise UserError("--classes stratified: an .npz keeps the classes it was drawn with; "
                        "score .npz files without it")
    for path in args.checkpoint if stratified else []:  # before the minutes of feature spaces
        if not any(s.model.num_classes for s in checkpoint_config(load_checkpoint(path), path).stages):
            raise UserError(f"--classes stratified: '{path}' is not class-conditional, so it cannot be "
                            f"asked for classes; score it without --classes")
    if args.no_guidance and (args.cfg_scale or args.guidance_scale or args.noisy_classifier):
        raise UserError("--no-guidance samples unguided: drop --cfg-scale, --guidance-scale and "
                        "--noisy-classifier, or drop --no-guidance")
    if args.guidance_scale and not args.noisy_classifier:
        raise UserError("--guidance-scale needs --noisy-classifier PATH")
    device = resolve_device(args.device) if args.checkpoint else None
    names = [Path(p).stem.removeprefix("mnist_") for p in args.classifier]
    if len(set(names)) < len(names):
        raise UserError(f"--classifier: two evaluation networks share the name {names}; rename one file")
    # files and data before any progress bar, so that a bad one is a single line
    networks = [load_classifier(path) for path in args.classifier]
    sample_files = [(Path(path).name, load_npz_images(path), load_npz_labels(path)) for path in args.npz]
    noisy = ((*load_noisy_classifier(args.noisy_classifier, device), args.noisy_classifier)
             if args.noisy_classifier else None)
    root = os.environ.get(DATA_ROOT_ENV, "data")
    test_images, test_labels = load_mnist(root, True, 32, 1, train=False)
    train_images, train_labels = load_mnist(root, True, 32, 1)
    other, hr = held_out(len(train_images), args.split)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    spaces = [FeatureSpace.from_network(name, net, test_images)
              for name, net in tqdm(list(zip(names, networks)), desc="feature spaces", leave=False)]
    rows = [{"samples": name, "spread": f"bootstrap {args.bootstrap}", **score(spaces, images, labels, args.bootstrap)}
            for name, images, labels in tqdm(sample_files, desc="sample files", leave=False)]
    sr_rows, split_rows = [], []
    for path in args.checkpoint:
        cfg, stages, ckpt = load_cascade(path, device)
        bf16 = use_bf16(cfg.train.precision, device)
        run = f"{Path(path).parent.name}/{Path(path).name}"
        for stage in stages[1:]:
            bad = [s for s in args.aug_level or [] if not 0 <= s <= stage.cfg.augment.max_level]
            if bad:
                raise UserError(f"--aug-level {bad[0]}: SR stage {stage.index} of '{path}' was trained "
                                f"on levels 0..{stage.cfg.augment.max_level}; choose levels in that range")
        guidance = label_guidance(args, cfg, ckpt, path, stages[0].model.num_classes, noisy, device)
        top = stages[-1].cfg.augment  # the row shows the top SR stage's level and mode (None: 1 stage)
        for level, mode, spacing, base_steps, sr_steps, cfg_scale, scale in itertools.product(
                args.aug_level or [None], modes, spacings, args.base_steps or [None],
                args.sr_steps or [None], args.cfg_scale or [guidance.cfg_scale],
                args.guidance_scale or [guidance.classifier_scale]):
            chain = [with_sampler(with_augment(stage, aug_level=level, aug_mode=mode),
                                  steps=base_steps if stage.index == 0 else sr_steps, spacing=spacing,
                                  name=args.base_sampler if stage.index == 0 else args.sr_sampler)
                     for stage in stages]
            level, mode = (chain[-1].cfg.augment.aug_level, chain[-1].cfg.augment.aug_mode) if top else (0, "")
            scored = []
            for seed in tqdm(args.seeds, desc=f"{run} seeds", leave=False):
                start = time.perf_counter()
                generator = torch.Generator(device).manual_seed(seed)
                labels = (default_labels(args.num_samples, cfg.num_labels, device, generator, cfg.data.class_prior,
                                         stratified=True) if stratified else None)  # None: drawn inside
                samples = sample_cascade(chain, args.num_samples, generator=generator, labels=labels,
                                         batch_size=args.batch_size, bf16=bf16, progress=True,
                                         guidance=replace(guidance, cfg_scale=cfg_scale, classifier_scale=scale),
                                         class_prior=cfg.data.class_prior)
                scored.append(cascade_row(spaces, samples, time.perf_counter() - start))
            guided = (f", cfg {cfg_scale:g}" * bool(chain[0].model.num_classes) + f", cg {scale:g}" * bool(scale)
                      + f", {guidance.redraw_text}" * bool(guidance.redraw) + ", classes stratified" * stratified)
            samplers = "/".join(s.cfg.sampler.label for s in chain)
            rows.append({"samples": f"{run} (step {ckpt['step']}, s={level} {mode}, {samplers}{guided})",
                         "run": run, "aug_level": level, "aug_mode": mode, "cfg_scale": cfg_scale,
                         "guidance_scale": scale, "spread": f"{len(args.seeds)} seeds", **mean_std(scored)})
            print(markdown_table(rows[-1:], columns(spaces)).splitlines()[-1], flush=True)
        if args.sr_digits and len(stages) > 1:
            runs = [sr_report(stages, test_images[:args.sr_digits].to(device),
                              test_labels[:args.sr_digits], spaces,
                              torch.Generator(device).manual_seed(seed), bf16,
                              out_dir / f"sr_grid_{Path(path).parent.name}.png" if seed == args.seeds[0] else None)
                    for seed in args.seeds]
            for method_rows in zip(*runs):
                sr_rows.append({"run": run, "method": method_rows[0]["method"], **mean_std(list(method_rows))})
        if args.split and len(stages) > 1:
            split_rows += [{"run": run, **row} for row in stage_split(
                stages, train_images[hr], train_labels[hr], train_images[other], spaces, args.seeds, bf16,
                args.batch_size)]
    floors = floor_rows(spaces, train_images, train_labels, sorted({r["n"] for r in rows}), args.floor_draws,
                        stratified=stratified)
    by_n = {r["n"]: r for r in floors}
    for r in rows:
        r["at_floor"] = at_floor(r, by_n, spaces)
    rows = [{**r, "floor": True} for r in floors] + rows
    text = (f"Sample quality in {len(spaces)} feature spaces ({', '.join(names)}; the first is "
            f"primary): FD, precision and recall against the 10,000 MNIST test digits (lower FD is "
            f"better), mean ± std over seeds (checkpoints) or bootstrap resamples (files); "
            f"at_floor = the spaces in which FD is within one std of the real-data floor at the "
            f"same N; consistency = MSE(downsample(final), base output):\n\n"
            + markdown_table(rows, columns(spaces)))
    if sr_rows:
        text += "\n\nSuper-resolution on true 8x8 test digits (aug_level 0), mean ± std over seeds:\n\n" + \
            markdown_table(sr_rows, ["run", "method", "n", "psnr", "ssim", "consistency",
                                     *[f"digit_kept_{s.name}" for s in spaces]])
    if split_rows:
        text += ("\n\nEach stage apart on held-out training digits, mean ± std over seeds: the base's FD "
                 "against the true base-size digits (both bicubic-upsampled), the SR stages' against "
                 "the test digits:\n\n" + markdown_table(split_rows, ["run", "part", "n", *space_columns(spaces)]))
    print(text)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps({"samples": rows, "super_resolution": sr_rows,
                                                        "stages_apart": split_rows}, indent=1))
    written = [out_dir / "results.md", out_dir / "results.json"]
    if args.plot:
        written.append(plot_fd_vs_level(rows, f"fd_{names[0]}", out_dir / "fd_vs_aug_level.png"))
    print("wrote " + ", ".join(str(p) for p in written if p))


def label_guidance(args, cfg, ckpt: dict, path: str, base_classes: int, noisy: tuple | None,
                   device: torch.device) -> Guidance:
    """The guidance a checkpoint's rows sample with (before the --cfg-scale/--guidance-scale
    sweeps), as sample.py's defaults: none with --no-guidance, else the config's guidance section
    (noisy_classifier.default_guidance), with --noisy-classifier's classifier (loaded once,
    `noisy`: (classifier, its config, its path))."""
    if any(args.cfg_scale or []) and not (base_classes and cfg.null_label_learned):
        raise UserError(f"--cfg-scale: '{path}' is not class-conditional with label dropout "
                        f"(stages.0.model.label_dropout > 0), so it has no null label to guide with")
    if args.no_guidance:
        return Guidance()
    return default_guidance(cfg, ckpt, path, device, noisy)


if __name__ == "__main__":
    run_cli(main)
