"""Sample the cascade from a checkpoint: base 8x8 -> conditioning augmentation -> SR 32x32.

    python sample.py --checkpoint output/cdm_mnist_cpu/checkpoint.pt
    python sample.py --checkpoint CKPT --num-samples 1000 --aug-level 0 --aug-mode non_truncated
    python sample.py --checkpoint CKPT --sampler ddpm --steps 1000 --device cpu
    python sample.py --checkpoint CKPT --base-sampler ddpm --base-steps 1000   # best FD, 17x slower

Writes to --out (default: samples/ beside the checkpoint): cascade.png, base.png,
side_by_side.png and samples.npz (images uint8 N,H,W,C; base uint8 N,8,8,C; labels if conditional).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cdm.cascade import load_cascade, sample_cascade, with_sampler
from cdm.config import AUG_MODES, SAMPLERS
from cdm.data import to_uint8_nhwc
from cdm.errors import ArgumentParser, UserError, run_cli
from cdm.grids import save_cascade_grids
from cdm.runtime import resolve_device, use_bf16


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    samples = sample_cascade(stages["base"], stages["sr"], args.num_samples, aug_level, aug_mode,
                             generator=generator, batch_size=args.batch_size,
                             bf16=use_bf16(cfg.train.precision, device), progress=True)
    seconds = time.perf_counter() - start
    paths = save_cascade_grids(samples, out)
    arrays = {"images": to_uint8_nhwc(samples.images).numpy(), "base": to_uint8_nhwc(samples.base).numpy()}
    if samples.labels is not None:
        arrays["labels"] = samples.labels.cpu().numpy()
    np.savez_compressed(out / "samples.npz", **arrays)
    b, s = stages["base"].sampler, stages["sr"].sampler
    print(f"{args.num_samples} samples in {seconds:.1f}s on {device} (step {ckpt['step']}; "
          f"base {b.name}-{b.steps}, sr {s.name}-{s.steps}, aug_level {aug_level} {aug_mode})")
    for path in [*paths.values(), out / "samples.npz"]:
        print(path)


if __name__ == "__main__":
    run_cli(main)
