"""Two MNIST classifiers whose penultimate features score samples (`python -m cdm.classifier`).

They are the project's evaluation networks, not part of the cascade. Each gives the features for
the Fréchet distance, precision/recall and the class histogram of cdm.metrics, so every quality
number is measured in two feature spaces that differ in architecture, input size and training:

  cnn32     (primary) a plain 5-conv CNN on the 32x32 samples as they are, max-pooling, 128-d
            features; trained 3 epochs with small random shifts, seed 0.
  resnet28  a residual network (three BasicBlocks, strided convolutions, no pooling layers) on
            MNIST's native 28x28: samples are resized 32 -> 28 (antialiased bilinear) first;
            128-d features; trained 3 epochs with label smoothing 0.1 and random affine jitter,
            seed 1.

cnn32 is the primary space because it reads the samples at the resolution the cascade makes
them, with no resampling in between; resnet28 is the independent check (a design choice is kept
only when it wins or ties in both). Both must reach 99% test accuracy; the trained weights are
published in output/pretrained/ so that every reader scores with the same networks.

    python -m cdm.classifier --arch cnn32                   # train, print test accuracy, save
    python -m cdm.classifier --arch resnet28 --epochs 4 --out output/my_resnet28.pt
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

from cdm.checkpoint import CheckpointError, save_checkpoint
from cdm.config import DATA_ROOT_ENV
from cdm.datasets import load_mnist
from cdm.errors import ArgumentParser, UserError, run_cli

FEATURE_DIM = 128
PRETRAINED = Path("output") / "pretrained"
DEFAULT_PATHS = {"cnn32": PRETRAINED / "mnist_cnn32.pt", "resnet28": PRETRAINED / "mnist_resnet28.pt"}


class MnistClassifier(nn.Module):
    """cnn32: conv(32)-conv(32)-pool-conv(64)-conv(64)-pool-conv(128)-pool -> 128-d -> 10."""

    arch = "cnn32"

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
        """x (B, 1, 32, 32) in [-1, 1] -> (B, 128)."""
        return self.features_net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """He et al. 2016: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), stride on the first conv."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class MnistResNet(nn.Module):
    """resnet28: 28x28 input, stem conv(32) -> blocks 32 (28x28), 64 (14x14), 128 (7x7) -> mean
    over positions -> 128-d -> 10."""

    arch = "resnet28"

    def __init__(self, channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2),
                                    BasicBlock(64, FEATURE_DIM, 2))
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 32, 32) in [-1, 1] -> resized to 28x28 -> (B, 128)."""
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHS = {cls.arch: cls for cls in (MnistClassifier, MnistResNet)}
RECIPES = {  # how each network is trained: a different seed, augmentation and loss per space
    "cnn32": dict(seed=0, label_smoothing=0.0, augment=None),
    "resnet28": dict(seed=1, label_smoothing=0.1,
                     augment=v2.RandomAffine(degrees=8, translate=(0.08, 0.08), scale=(0.9, 1.1))),
}


def random_shift(x: torch.Tensor) -> torch.Tensor:
    """cnn32's augmentation: the whole batch rolled by up to 2 pixels."""
    return torch.roll(x, shifts=torch.randint(-2, 3, (2,)).tolist(), dims=(2, 3))


def train_classifier(root: str, download: bool, arch: str = "cnn32", epochs: int = 3,
                     batch_size: int = 128, progress: bool = True) -> tuple[nn.Module, float]:
    """Train one evaluation network on MNIST train, return (model, test accuracy)."""
    recipe = RECIPES[arch]
    torch.manual_seed(recipe["seed"])
    images, labels = load_mnist(root, download, 32, 1)
    test_images, test_labels = load_mnist(root, download, 32, 1, train=False)
    model = ARCHS[arch]()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    augment = recipe["augment"] or random_shift
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc=arch):
        idx = torch.randint(0, len(images), (batch_size,))
        x = augment(images[idx])  # (B, 1, 32, 32)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=recipe["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, accuracy(model, test_images, test_labels)


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([model(images[i:i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return (preds == labels).float().mean().item()


def load_classifier(path: str | os.PathLike) -> nn.Module:
    """Load an evaluation network (weights_only); files without an `arch` are cnn32 (the format
    before the second network existed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"evaluation network '{path}': no such file; train one with "
                              f"`python -m cdm.classifier --arch cnn32|resnet28 --out {path}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        arch = ckpt.get("arch", "cnn32")
        model = ARCHS[arch]()
        model.load_state_dict(ckpt["model"])
    except KeyError as err:
        raise CheckpointError(f"evaluation network '{path}': unknown architecture or missing "
                              f"entry {err}; expected one written by `python -m cdm.classifier`") from None
    except Exception as err:  # a corrupt or foreign file: name it in one line
        raise CheckpointError(f"evaluation network '{path}' cannot be loaded: "
                              f"{str(err).splitlines()[0]}") from None
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="cnn32")
    parser.add_argument("--out", help="where to save (default: output/pretrained/mnist_ARCH.pt)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-root", default=os.environ.get(DATA_ROOT_ENV, "data"))
    args = parser.parse_args()
    if args.epochs <= 0:
        raise UserError(f"--epochs {args.epochs}: expected a positive number of epochs")
    model, acc = train_classifier(args.data_root, True, args.arch, epochs=args.epochs)
    out = args.out or DEFAULT_PATHS[args.arch]
    save_checkpoint({"arch": args.arch, "model": model.state_dict(), "test_accuracy": acc}, out)
    print(f"{args.arch}: test accuracy {100 * acc:.2f}%; saved {out}")
    if acc < 0.99:
        print("warning: below 99%; train longer (--epochs) before trusting the metrics")


if __name__ == "__main__":
    run_cli(main)
