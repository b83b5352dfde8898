"""Sample the cascade from a checkpoint: base 8x8 -> conditioning augmentation -> SR 32x32.

    python sample.py --checkpoint output/cdm_mnist_cpu/checkpoint.pt
    python sample.py --checkpoint CKPT --num-samples 1000 --aug-level 0 --aug-mode non_truncated
    python sample.py --checkpoint CKPT --sampler ddpm --steps 1000 --device cpu
    python sample.py --checkpoint CKPT --base-sampler ddpm --base-steps 1000   # best FD, 17x slower
    python sample.py --checkpoint COND_CKPT --class-grid --cfg-scale 1          # a row per digit
    python sample.py --checkpoint COND_CKPT --labels 3           # its stored CFG weight guides them
    python sample.py --checkpoint COND_CKPT --labels 3 --no-guidance   # the conditional model alone
    python sample.py --checkpoint CKPT --labels 3,7 --classifier CLS_CKPT --guidance-scale 3
    python sample.py --checkpoint COND_CKPT --unconditional      # the same network, null label

Writes to --out (default: samples/ beside the checkpoint): cascade.png, base.png,
side_by_side.png, labelled.png (one row per requested class, when there are labels) and
samples.npz (images uint8 N,H,W,C; base uint8 N,8,8,C; labels when classes were requested).
Labels need a class-conditional checkpoint (cfg-scale: classifier-free guidance) or a noisy
classifier (--classifier: classifier guidance), or both. The defaults are the checkpoint's
guidance section: the published conditional cascade guides labels with CFG w = 0.5 (README 9.6:
99% of its digits read as asked); --no-guidance turns all guidance off.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cdm.cascade import load_cascade, sample_cascade, with_sampler
from cdm.config import AUG_MODES, SAMPLERS
from cdm.data import to_uint8_nhwc
from cdm.errors import ArgumentParser, UserError, int_list, run_cli, scale
from cdm.grids import save_cascade_grids, save_labelled_grid
from cdm.guidance import Guidance
from cdm.noisy_classifier import check_fits, load_noisy_classifier
from cdm.runtime import resolve_device, use_bf16


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def requested_labels(args, num_classes: int, device) -> torch.Tensor | None:
    """The labels asked for on the command line (N,), or None for the default."""
    if args.class_grid:  # one row per class, --num-samples split evenly (rounded up)
        per_class = -(-args.num_samples // num_classes)
        return torch.arange(num_classes, device=device).repeat_interleave(per_class)
    if args.labels is None:
        return None
    bad = [v for v in args.labels if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"--labels: {bad[0]} is not a class of this model; expected digits in "
                        f"0..{num_classes - 1}")
    return torch.tensor(args.labels, device=device).repeat(-(-args.num_samples // len(args.labels))
                                                          )[:args.num_samples]


def make_guidance(args, cfg, base_classes: int, device) -> tuple[Guidance, int]:
    """Guidance from the flags (defaults: the config's guidance section; none with
    --no-guidance) and the number of classes labels may take (0: nothing can follow a label)."""
    if args.cfg_scale and not base_classes:
        raise UserError("--cfg-scale needs a class-conditional checkpoint (base.model.num_classes "
                        "> 0, trained with label dropout); this one is unconditional")
    if (args.cfg_scale or args.unconditional) and not cfg.base.model.label_dropout:
        raise UserError("--cfg-scale/--unconditional need a base trained with label dropout "
                        "(base.model.label_dropout > 0): this model never learned the null label")
    if args.no_guidance and (args.classifier or args.guidance_scale is not None or args.cfg_scale is not None):
        raise UserError("--no-guidance samples unguided: drop --classifier, --guidance-scale "
                        "and --cfg-scale, or drop --no-guidance")
    classifier = None
    if args.classifier:
        classifier, classifier_cfg = load_noisy_classifier(args.classifier, device)
        check_fits(classifier_cfg, cfg, args.classifier)
    elif args.guidance_scale is not None:
        raise UserError("--guidance-scale needs --classifier PATH (a checkpoint holding a noisy classifier)")
    cfg_scale = cfg.guidance.cfg_scale if args.cfg_scale is None else args.cfg_scale
    classifier_scale = cfg.guidance.classifier_scale if args.guidance_scale is None else args.guidance_scale
    num_classes = base_classes or (classifier.num_classes if classifier is not None else 0)
    if args.no_guidance:
        return Guidance(), num_classes
    return Guidance(cfg_scale, classifier, classifier_scale if classifier is not None else 0.0), num_classes


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by train_mnist.py")
    parser.add_argument("--num-samples", type=positive, default=64)
    parser.add_argument("--batch-size", type=positive, default=500)
    parser.add_argument("--sampler", choices=SAMPLERS, help="both stages (default: each stage's config)")
    parser.add_argument("--base-sampler", choices=SAMPLERS, help="the base stage's sampler")
    parser.add_argument("--sr-sampler", choices=SAMPLERS, help="the SR stage's sampler")
    parser.add_argument("--steps", type=positive, help="denoising steps for both stages")
    parser.add_argument("--base-steps", type=positive, help="denoising steps of the base stage")
    parser.add_argument("--sr-steps", type=positive, help="denoising steps of the SR stage")
    parser.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--aug-level", type=int, help="conditioning augmentation level s (default: config)")
    parser.add_argument("--aug-mode", choices=AUG_MODES, help="default: config")
    parser.add_argument("--labels", type=int_list, help="classes to draw, e.g. 3,7 (repeated to "
                                                          "fill --num-samples)")
    parser.add_argument("--class-grid", action="store_true", help="one row per class")
    parser.add_argument("--unconditional", action="store_true",
                        help="conditional checkpoint: sample with the null label (no class asked)")
    parser.add_argument("--classifier", help="checkpoint holding a noisy classifier: classifier guidance")
    parser.add_argument("--no-guidance", action="store_true",
                        help="no classifier or classifier-free guidance, whatever the defaults")
    parser.add_argument("--guidance-scale", type=scale, help="classifier guidance scale s "
                                                              "(default: config guidance.classifier_scale)")
    parser.add_argument("--cfg-scale", type=scale, help="classifier-free guidance weight w "
                                                         "(default: config guidance.cfg_scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cfg, stages, ckpt = load_cascade(args.checkpoint, device, use_ema=not args.raw_weights)
    aug_level = cfg.augment.aug_level if args.aug_level is None else args.aug_level
    aug_mode = args.aug_mode or cfg.augment.aug_mode
    if not 0 <= aug_level <= cfg.augment.max_level:
        raise UserError(f"--aug-level {aug_level}: this SR stage was trained on levels "
                        f"0..{cfg.augment.max_level}; choose one in that range")
    base_classes = stages["base"].model.num_classes
    guidance, num_classes = make_guidance(args, cfg, base_classes, device)
    if (args.labels is not None or args.class_grid) and not num_classes:
        raise UserError("--labels/--class-grid need a class-conditional checkpoint or --classifier")
    if args.unconditional:  # the null label: what label dropout trained the network to do alone
        if not base_classes or guidance.classifier is not None or args.labels is not None or args.class_grid:
            raise UserError("--unconditional needs a class-conditional checkpoint, and no "
                            "--labels, --class-grid or --classifier")
        labels = torch.full((args.num_samples,), base_classes, device=device)
    else:
        labels = requested_labels(args, num_classes, device)
    num_samples = args.num_samples if labels is None else len(labels)
    for name in ("base", "sr"):
        stages[name] = with_sampler(stages[name], name=getattr(args, f"{name}_sampler") or args.sampler,
                                    eta=args.eta, steps=getattr(args, f"{name}_steps") or args.steps)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "samples"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as err:
        raise UserError(f"--out '{out}': cannot write there ({err.strerror})") from None

    generator = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    samples = sample_cascade(stages["base"], stages["sr"], num_samples, aug_level, aug_mode,
                             generator=generator, batch_size=args.batch_size, labels=labels,
                             bf16=use_bf16(cfg.train.precision, device), progress=True,
                             guidance=guidance)
    seconds = time.perf_counter() - start
    paths = save_cascade_grids(samples, out)
    arrays = {"images": to_uint8_nhwc(samples.images).numpy(), "base": to_uint8_nhwc(samples.base).numpy()}
    if samples.labels is not None and not args.unconditional:
        arrays["labels"] = samples.labels.cpu().numpy()
        paths["labelled"] = save_labelled_grid(samples.images, samples.labels, out / "labelled.png")
    np.savez_compressed(out / "samples.npz", **arrays)
    b, s = stages["base"].sampler, stages["sr"].sampler
    print(f"{num_samples} samples in {seconds:.1f}s on {device} (step {ckpt['step']}; "
          f"base {b.name}-{b.steps}, sr {s.name}-{s.steps}, aug_level {aug_level} {aug_mode}; "
          f"cfg_scale {guidance.cfg_scale}, classifier guidance {guidance.classifier_scale})")
    for path in [*paths.values(), out / "samples.npz"]:
        print(path)


if __name__ == "__main__":
    run_cli(main)
