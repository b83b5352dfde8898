"""Train the cascade: every stage together in one run (by default MNIST, 8x8 base -> 32x32 SR).

    python train_mnist.py                                    # GPU config (CPU config if no CUDA)
    python train_mnist.py --config configs/cdm_mnist_cpu.yaml  # ~15 min on a 2-core CPU
    python train_mnist.py --config configs/cdm_mnist_cpu_cond.yaml  # class-conditional + classifier
    python train_mnist.py --config configs/tiny.yaml --set train.steps=20 --device cpu
    python train_mnist.py --config configs/cdm_mnist_cpu_3stage.yaml  # 8 -> 16 -> 32
    python train_mnist.py --resume output/cdm_mnist/checkpoint.pt   # continue exactly
    python train_mnist.py --stages 0 --set run_name=base_only        # the base alone; then the
    python train_mnist.py --stages 1 --set run_name=sr_only          # SR stage elsewhere, and
    python -m cdm.checkpoint combine output/base_only/checkpoint.pt output/sr_only/checkpoint.pt both.pt

Writes output/<run_name>/: samples/*.png by step, checkpoint.pt, metrics.jsonl, config.yaml.
"""
import argparse
from pathlib import Path

import torch

from cdm.checkpoint import checkpoint_config, load_checkpoint
from cdm.config import apply_override, config_from_dict, load_config
from cdm.errors import ArgumentParser, int_list, run_cli
from cdm.train import train

CONFIGS = Path(__file__).resolve().parent / "configs"
GPU_CONFIG, CPU_CONFIG = "configs/cdm_mnist.yaml", "configs/cdm_mnist_cpu.yaml"


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (default {GPU_CONFIG}, or {CPU_CONFIG} without CUDA)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.steps=200 (repeatable)")
    parser.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the config)")
    parser.add_argument("--stages", type=int_list, metavar="I,J", help="train only these consecutive "
                        "stages, e.g. 0 or 1,2 (sets train.stages; default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.device:
        args.overrides.append(f"device={args.device}")
    if args.stages is not None:
        args.overrides.append(f"train.stages={args.stages}")
    if args.resume and not args.config:  # continue with the checkpoint's own config
        cfg_dict = checkpoint_config(load_checkpoint(args.resume), args.resume).to_dict()
        for assignment in args.overrides:
            apply_override(cfg_dict, assignment)
        cfg = config_from_dict(cfg_dict)
    else:
        path = args.config
        if path is None:
            name = GPU_CONFIG
            if not torch.cuda.is_available() and args.device in (None, "auto", "cpu"):
                print(f"no CUDA device: using the CPU config {CPU_CONFIG} (pass --config to choose)")
                name = CPU_CONFIG
            path = CONFIGS / Path(name).name
        cfg = load_config(path, args.overrides)
    train(cfg, resume=args.resume, progress=not args.no_progress)


if __name__ == "__main__":
    run_cli(main)
