"""Sample the cascade from a checkpoint: the base stage, then each SR stage on the one before.

    python sample.py --checkpoint output/cdm_mnist_cpu/checkpoint.pt
    python sample.py --checkpoint CKPT --until 0                  # the base stage's output only
    python sample.py --checkpoint CKPT --low-res my_digits/       # super-resolve your own images
    python sample.py --checkpoint CKPT --num-samples 1000 --aug-level 0 --aug-mode non_truncated
    python sample.py --checkpoint CKPT --sampler ddpm --steps 1000 --device cpu
    python sample.py --checkpoint CKPT --base-sampler ddpm --base-steps 1000   # best FD, 17x slower
    python sample.py --checkpoint CKPT --spacing quadratic      # last calls near t = 0 (docs 9.12)
    python sample.py --checkpoint COND_CKPT --class-grid --cfg-scale 1          # a row per digit
    python sample.py --checkpoint COND_CKPT --labels 3           # its stored guidance draws them
    python sample.py --checkpoint COND_CKPT --labels 3 --no-guidance   # the conditional model alone
    python sample.py --checkpoint CKPT --labels 3,7 --classifier CLS_CKPT --guidance-scale 3
    python sample.py --checkpoint COND_CKPT --unconditional      # the same network, null label

Writes to --out (default: samples/ beside the checkpoint): cascade.png (the last stage run),
base.png, sr1.png, ... (the stages before it), side_by_side.png (each sample's chain, left to
right), labelled.png (one row per requested class, when there are labels) and samples.npz
(uint8 N,H,W,C: `images` the last stage's output, every stage's under its name, `input` the
--low-res images; labels when classes were requested).
--low-res takes a PNG, a folder of PNGs or an .npz (`images`, as written here) at the size of
some stage's output: the stages after it super-resolve them. Images at the top stage's size are
taken as the high-res truth: they are downsampled to the base size first, and side_by_side.png
shows truth | input | every stage.
Labels need a class-conditional checkpoint (cfg-scale: classifier-free guidance) or a noisy
classifier (--classifier: classifier guidance), or both. The defaults are the checkpoint's
guidance section: the published conditional cascade guides labels with CFG w = 0.3 and redraws
the base samples its own noisy classifier reads as another digit, or as the asked one with
p < 0.9 (guidance.redraw 5, redraw_confidence 0.9; docs/results.md 9.6: 99.5% / 99.2% of its
digits read as asked); --no-guidance turns all of it off.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cdm.cascade import load_cascade, sample_cascade, with_augment, with_sampler
from cdm.config import AUG_MODES, SAMPLERS, SPACINGS
from cdm.data import downsample, to_uint8_nhwc
from cdm.datasets import load_images
from cdm.errors import ArgumentParser, UserError, int_list, run_cli, scale
from cdm.grids import save_cascade_grids, save_labelled_grid
from cdm.guidance import Guidance
from cdm.noisy_classifier import default_guidance, load_noisy_classifier
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


def make_guidance(args, cfg, ckpt: dict, base_classes: int, device) -> tuple[Guidance, int]:
    """Guidance from the flags (defaults: the config's guidance section; none with
    --no-guidance) and the number of classes labels may take (0: nothing can follow a label).
    Classifier guidance needs --classifier; redrawing misread samples uses --classifier or the
    checkpoint's own noisy classifier."""
    if args.cfg_scale and not base_classes:
        raise UserError("--cfg-scale needs a class-conditional checkpoint (base.model.num_classes "
                        "> 0, trained with label dropout); this one is unconditional")
    if (args.cfg_scale or args.unconditional) and not cfg.null_label_learned:
        lacking = cfg.without_null_label or [0]
        raise UserError(f"--cfg-scale/--unconditional need a base trained with label dropout "
                        f"(stages.0.model.label_dropout > 0), and so every class-conditional stage: "
                        f"stage {lacking[0]} never learned the null label")
    if args.no_guidance and (args.classifier or args.guidance_scale is not None or args.cfg_scale is not None
                             or args.redraw is not None):
        raise UserError("--no-guidance samples unguided: drop --classifier, --guidance-scale, "
                        "--cfg-scale and --redraw, or drop --no-guidance")
    if args.guidance_scale is not None and not args.classifier:
        raise UserError("--guidance-scale needs --classifier PATH (a checkpoint holding a noisy classifier)")
    noisy = (*load_noisy_classifier(args.classifier, device), args.classifier) if args.classifier else None
    num_classes = base_classes or (noisy[0].num_classes if noisy else 0)
    if args.no_guidance:
        return Guidance(), num_classes
    guidance = default_guidance(cfg, ckpt, args.checkpoint, device, noisy, args.redraw)
    if args.cfg_scale is not None:
        guidance.cfg_scale = args.cfg_scale
    if args.guidance_scale is not None:
        guidance.classifier_scale = args.guidance_scale
    return guidance, num_classes


def low_res_input(args, cfg, device) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(--low-res images at the size of the stage they enter after, the high-res truth they were
    made from when the user gave top-size images, the index of the first stage to run)."""
    if args.low_res is None:
        return None, None, 0
    images = load_images(args.low_res, cfg.data.channels).to(device)  # (N, C, S, S)
    sizes = [stage.image_size for stage in cfg.stages]
    size = images.shape[-1]
    if len(sizes) == 1:
        raise UserError("--low-res: this checkpoint has a base stage only, no SR stage to run")
    if size == sizes[-1]:  # the truth: make the base-size input from it
        return downsample(images, sizes[0]), images, 1
    if size not in sizes[:-1]:
        raise UserError(f"--low-res '{args.low_res}': images are {size}x{size}; this cascade's "
                        f"stages make {sizes}: give images of a size in {sizes[:-1]} to super-resolve, "
                        f"or of {sizes[-1]} (downsampled to {sizes[0]} first)")
    return images, None, sizes.index(size) + 1


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by train_mnist.py")
    parser.add_argument("--num-samples", type=positive, default=64)
    parser.add_argument("--batch-size", type=positive, default=500)
    parser.add_argument("--sampler", choices=SAMPLERS, help="both stages (default: each stage's config)")
    parser.add_argument("--base-sampler", choices=SAMPLERS, help="the base stage's sampler")
    parser.add_argument("--sr-sampler", choices=SAMPLERS, help="every SR stage's sampler")
    parser.add_argument("--steps", type=positive, help="denoising steps for every stage")
    parser.add_argument("--base-steps", type=positive, help="denoising steps of the base stage")
    parser.add_argument("--sr-steps", type=positive, help="denoising steps of every SR stage")
    parser.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--spacing", choices=SPACINGS, help="the states every stage's sampler visits: "
                        "uniform in t or quadratic, denser near the clean end (default: config)")
    parser.add_argument("--aug-level", type=int, help="conditioning augmentation level s of every "
                                                      "SR stage (default: each stage's config)")
    parser.add_argument("--aug-mode", choices=AUG_MODES, help="default: each stage's config")
    parser.add_argument("--until", type=int, metavar="N", help="stop after stage N (0: the base)")
    parser.add_argument("--low-res", metavar="PATH", help="your own images (PNG, folder of PNGs, "
                                                          ".npz) for the SR stages to super-resolve")
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
    parser.add_argument("--redraw", type=int, metavar="K", help="redraw samples the noisy classifier "
                        "reads as another class (or as the asked one below guidance.redraw_confidence), "
                        "up to K times (default: config guidance.redraw; 0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cfg, stages, ckpt = load_cascade(args.checkpoint, device, use_ema=not args.raw_weights)
    stages = [with_sampler(with_augment(stage, aug_level=args.aug_level, aug_mode=args.aug_mode),
                           name=(args.base_sampler if stage.index == 0 else args.sr_sampler) or args.sampler,
                           eta=args.eta, spacing=args.spacing,
                           steps=(args.base_steps if stage.index == 0 else args.sr_steps) or args.steps)
              for stage in stages]
    for stage in stages[1:]:
        aug = stage.cfg.augment
        if not 0 <= aug.aug_level <= aug.max_level:
            raise UserError(f"--aug-level {aug.aug_level}: SR stage {stage.index} was trained on "
                            f"levels 0..{aug.max_level}; choose one in that range")
    given, reference, first = low_res_input(args, cfg, device)
    until = len(stages) - 1 if args.until is None else args.until
    if not first <= until < len(stages):
        raise UserError(f"--until {args.until}: expected a stage index in {first}..{len(stages) - 1}"
                        + (f" (the --low-res images enter at stage {first})" if given is not None else ""))
    stages = stages[first:until + 1]
    base_classes = stages[0].model.num_classes if first == 0 else 0
    guidance, num_classes = make_guidance(args, cfg, ckpt, base_classes, device)
    conditional_sr = [s.index for s in stages if s.index > 0 and s.model.num_classes]
    null_sr = given is not None and bool(conditional_sr) and args.labels is None and not args.class_grid
    unlearned = [i for i in conditional_sr if i in cfg.without_null_label]
    if null_sr and unlearned:
        raise UserError(f"--low-res: stage {unlearned[0]} is class-conditional and was trained "
                        f"without label dropout; say which class each image is with --labels")
    num_classes = num_classes or (stages[-1].model.num_classes if conditional_sr else 0)
    if (args.labels is not None or args.class_grid) and not num_classes:
        raise UserError("--labels/--class-grid need a class-conditional checkpoint or --classifier")
    if args.unconditional:  # the null label: what label dropout trained the network to do alone
        if not base_classes or guidance.classifier is not None or args.labels is not None or args.class_grid:
            raise UserError("--unconditional needs a class-conditional checkpoint, and no "
                            "--labels, --class-grid or --classifier")
        labels = torch.full((args.num_samples,), base_classes, device=device)
    elif null_sr:  # your images carry no label: the null label, which label dropout trained
        labels = torch.full((len(given),), num_classes, device=device)
    else:
        labels = requested_labels(args, num_classes, device)
    num_samples = args.num_samples if labels is None else len(labels)
    if given is not None:
        num_samples = len(given)
        if labels is not None:
            labels = labels.repeat(-(-num_samples // len(labels)))[:num_samples]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "samples"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as err:
        raise UserError(f"--out '{out}': cannot write there ({err.strerror})") from None

    generator = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    samples = sample_cascade(stages, num_samples, generator=generator, batch_size=args.batch_size,
                             labels=labels, bf16=use_bf16(cfg.train.precision, device), progress=True,
                             guidance=guidance, low_res=given, class_prior=cfg.data.class_prior)
    seconds = time.perf_counter() - start
    paths = save_cascade_grids(samples, out, given=given, reference=reference)
    arrays = {"images": to_uint8_nhwc(samples.images).numpy(),
              **{stage.name: to_uint8_nhwc(samples.outputs[stage.index]).numpy() for stage in stages[:-1]}}
    if given is not None:
        arrays["input"] = to_uint8_nhwc(given).numpy()
    if samples.labels is not None and not (args.unconditional or null_sr):
        arrays["labels"] = samples.labels.cpu().numpy()
        paths["labelled"] = save_labelled_grid(samples.images, samples.labels, out / "labelled.png")
    np.savez_compressed(out / "samples.npz", **arrays)
    chain = ", ".join(f"{s.name} {s.cfg.sampler.label}" + (
        f" (aug_level {s.cfg.augment.aug_level} {s.cfg.augment.aug_mode})" if s.index else "") for s in stages)
    print(f"{num_samples} samples in {seconds:.1f}s on {device} (step {ckpt['step']}; {chain}; "
          f"cfg_scale {guidance.cfg_scale}, classifier guidance {guidance.classifier_scale}, "
          f"{guidance.redraw_text})")
    for path in [*paths.values(), out / "samples.npz"]:
        print(path)


if __name__ == "__main__":
    run_cli(main)
