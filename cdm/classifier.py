"""A small MNIST classifier whose penultimate features score samples (`python -m cdm.classifier`).

It is the project's own feature extractor for the Fréchet distance, precision/recall and the
class histogram in cdm.metrics: a CNN on 32x32 digits in [-1, 1], trained on the MNIST train
split and checked on the test split (it must reach 99% accuracy). It is an evaluation tool, not
part of the cascade.

    python -m cdm.classifier                      # train, print test accuracy, cache the weights
    python -m cdm.classifier --out output/classifier.pt --epochs 4
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cdm.checkpoint import CheckpointError, save_checkpoint
from cdm.config import DATA_ROOT_ENV
from cdm.data import load_mnist
from cdm.errors import ArgumentParser, run_cli

DEFAULT_PATH = Path("output") / "classifier" / "mnist_classifier.pt"
FEATURE_DIM = 128


class MnistClassifier(nn.Module):
    """conv(32)-conv(32)-pool-conv(64)-conv(64)-pool-conv(128)-pool -> 128-d features -> 10."""

    def __init__(self, channels: int = 1):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features_net = nn.Sequential(
            block(channels, 32), block(32, 32), nn.MaxPool2d(2),  # 16x16
            block(32, 64), block(64, 64), nn.MaxPool2d(2),  # 8x8
            block(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 128)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, 32, 32) in [-1, 1] -> (B, 128)."""
        return self.features_net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(root: str, download: bool, epochs: int = 3, batch_size: int = 128,
                     seed: int = 0, progress: bool = True) -> tuple[MnistClassifier, float]:
    """Train on MNIST train (with small random shifts), return (model, test accuracy)."""
    torch.manual_seed(seed)
    images, labels = load_mnist(root, download, 32, 1)
    test_images, test_labels = load_mnist(root, download, 32, 1, train=False)
    model = MnistClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc="classifier"):
        idx = torch.randint(0, len(images), (batch_size,))
        shift = torch.randint(-2, 3, (2,)).tolist()
        x = torch.roll(images[idx], shifts=shift, dims=(2, 3))  # (B, 1, 32, 32), small translation
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, accuracy(model, test_images, test_labels)


@torch.inference_mode()
def accuracy(model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([model(images[i:i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return (preds == labels).float().mean().item()


def load_classifier(path: str | os.PathLike) -> MnistClassifier:
    """Load cached classifier weights (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier '{path}': no such file; train it with "
                              f"`python -m cdm.classifier --out {path}`")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MnistClassifier()
    model.load_state_dict(ckpt["model"])
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-root", default=os.environ.get(DATA_ROOT_ENV, "data"))
    args = parser.parse_args()
    model, acc = train_classifier(args.data_root, True, epochs=args.epochs)
    save_checkpoint({"model": model.state_dict(), "test_accuracy": acc}, args.out)
    print(f"test accuracy {100 * acc:.2f}%; saved {args.out}")
    if acc < 0.99:
        print("warning: below 99%; train longer (--epochs) before trusting the metrics")


if __name__ == "__main__":
    run_cli(main)
