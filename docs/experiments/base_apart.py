"""docs/results.md 9.33: base stages scored on their own, as `python -m cdm.evaluate --split N`
scores a cascade's base (stage_split): N base samples, asked for the labels of N held-out training
digits, against those digits' true base-size versions, both bicubically upsampled to 32x32 and
read in both feature spaces, beside the same FD for N more real digits. The files may hold the
base alone (trained with `train_mnist.py --stages 0`), which cdm.evaluate refuses.

    python docs/experiments/base_apart.py A.pt B.pt --split 10000 --seeds 0,1 --out base.json
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where cdm/ is
from cdm.cascade import load_cascade
from cdm.classifier import DEFAULT_PATHS, load_classifier
from cdm.config import DATA_ROOT_ENV
from cdm.datasets import load_mnist
from cdm.errors import ArgumentParser, UserError, int_list, run_cli
from cdm.evaluate import FeatureSpace, held_out, markdown_table, stage_split
from cdm.runtime import use_bf16


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("checkpoints", nargs="+", help="files holding a base stage (stage 0)")
    parser.add_argument("--split", type=int, default=10000, help="held-out training digits")
    parser.add_argument("--seeds", type=int_list, default=[0], help="sampling seeds: the spread")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", required=True, help="JSON file for the rows")
    args = parser.parse_args()
    if args.split < 1:
        raise UserError(f"--split {args.split}: expected a positive number of held-out digits")
    bases = [(path, *load_cascade(path, "cpu", indices=[0])[:2]) for path in args.checkpoints]
    root = os.environ.get(DATA_ROOT_ENV, "data")
    test_images, _ = load_mnist(root, True, 32, 1, train=False)
    train_images, train_labels = load_mnist(root, True, 32, 1)
    other, hr = held_out(len(train_images), args.split)  # as cdm.evaluate's
    spaces = [FeatureSpace.from_network(name, load_classifier(path), test_images)
              for name, path in DEFAULT_PATHS.items()]
    rows = []
    for path, cfg, stages in bases:
        rows += [{"run": path, **row} for row in stage_split(
            stages, train_images[hr], train_labels[hr], train_images[other], spaces, args.seeds,
            use_bf16(cfg.train.precision, torch.device("cpu")), args.batch_size)]
    print(markdown_table(rows, ["run", "part", "n", *[f"fd_{s.name}" for s in spaces]]))
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_cli(main)
