"""The noisy classifier p(y | x_t, t) behind classifier guidance (Dhariwal & Nichol 2021, sec. 4).

It is the UNet's encoder half (cdm/unet.py `Encoder`: time embedding, residual and attention
blocks, downsampling, middle block) plus a pooling head, trained with cross-entropy on x_t drawn
from the base stage's forward process q(x_t | x_0) at the base resolution, in the same [-1, 1]
scale the base sampler works in. A config with a `classifier:` section trains it in the same
`train_mnist.py` run, from the same batches; this module also trains it alone and reports its
accuracy against t on the MNIST test split:

    python -m cdm.noisy_classifier --config configs/cdm_mnist_cpu_cond.yaml           # train alone
    python -m cdm.noisy_classifier --checkpoint output/cdm_mnist_cpu_cond/checkpoint.pt  # report
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdm.checkpoint import CLASSIFIER, checkpoint_config, load_checkpoint, load_state
from cdm.config import Config, StageConfig, load_config
from cdm.data import downsample
from cdm.datasets import load_mnist
from cdm.diffusion import GaussianDiffusion
from cdm.errors import ArgumentParser, UserError, run_cli
from cdm.guidance import Guidance
from cdm.unet import Encoder


class NoisyClassifier(Encoder):
    """Encoder -> GroupNorm, SiLU, global average pool, linear: logits (B, num_classes)."""

    def __init__(self, cfg: Config):
        c = cfg.classifier
        super().__init__(c.model, cfg.base.image_size, cfg.data.channels)
        self.num_classes = c.num_classes
        self.head = nn.Sequential(nn.GroupNorm(c.model.norm_groups, self.width), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(self.width, c.num_classes))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, h, w) at the base size, t (B,) in [0, T-1] -> logits (B, num_classes)."""
        h, _ = self.encode(x_t, self.embed_time(t))
        return self.head(h)


def classifier_stage_config(cfg: Config) -> StageConfig:
    """The classifier as a training stage: its own model and optimizer settings, the base
    stage's size and forward process, trained on every state alike (guidance reads each one the
    base's sampler visits), whatever states the base itself trains on."""
    if cfg.classifier is None:
        raise UserError("the config has no classifier: section (add `classifier: {}` to train "
                        "a noisy classifier with the defaults)")
    return StageConfig(image_size=cfg.base.image_size, model=cfg.classifier.model,
                       diffusion=replace(cfg.base.diffusion, noise_distribution="uniform"),
                       optim=cfg.classifier.optim)


def classifier_losses(classifier, diffusion: GaussianDiffusion, x0: torch.Tensor, y: torch.Tensor,
                      t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (B,) of classifying x_t ~ q(x_t | x_0) (DDPM Eq. 4) as y. x0 (B, C, h, w):
    base-size images in [-1, 1], exactly what the base stage learns and samples."""
    logits = classifier(diffusion.q_sample(x0, t, noise), t)  # (B, classes)
    return F.cross_entropy(logits.float(), y, reduction="none")


def load_noisy_classifier(path: str | os.PathLike, device: torch.device | str
                          ) -> tuple[NoisyClassifier, Config]:
    """The noisy classifier stored in a checkpoint (EMA weights, ready for guidance) and the
    checkpoint's config."""
    ckpt = load_checkpoint(path, device, stages=[], classifier=True)
    cfg = checkpoint_config(ckpt, path)
    model = NoisyClassifier(cfg).to(device)
    load_state(model, ckpt[CLASSIFIER]["ema"], path, "classifier ema weights")
    return model.eval().requires_grad_(False), cfg


def check_fits(classifier_cfg: Config, cascade: Config, path: str | os.PathLike) -> None:
    """Raise unless the classifier (config `classifier_cfg`, from `path`) was trained on the
    cascade's base images and forward process (size, channels, schedule): else its gradient
    means nothing to that base stage."""
    for key, ours, theirs in (("stages.0.image_size", classifier_cfg.base.image_size, cascade.base.image_size),
                              ("data.channels", classifier_cfg.data.channels, cascade.data.channels),
                              ("stages.0.diffusion (timesteps, schedule, log_snr_shift)", classifier_cfg.base.diffusion.forward_process,
                               cascade.base.diffusion.forward_process)):
        if ours != theirs:
            raise UserError(f"classifier '{path}' was trained with {key} = {ours}, but this "
                            f"cascade has {theirs}: train a classifier for it")


def default_guidance(cfg: Config, ckpt: dict, path: str | os.PathLike, device: torch.device | str,
                     noisy: tuple[NoisyClassifier, Config, str] | None = None,
                     redraw: int | None = None) -> Guidance:
    """The guidance a checkpoint (config cfg, loaded as ckpt from path) samples labels with when
    nothing else is asked: its config's guidance section. Classifier guidance needs an outside
    noisy classifier, `noisy` = (classifier, its config, its path); guidance.redraw (or `redraw`)
    checks the asked labels with that classifier, else with the checkpoint's own."""
    g = cfg.guidance
    redraw = g.redraw if redraw is None else redraw
    classifier = None
    if noisy is not None:
        classifier, classifier_cfg, source = noisy
        check_fits(classifier_cfg, cfg, source)
    elif redraw and cfg.base.model.num_classes and CLASSIFIER in ckpt:
        classifier = load_noisy_classifier(path, device)[0]
    return Guidance(g.cfg_scale, classifier, g.classifier_scale if noisy is not None else 0.0,
                    redraw=redraw if classifier is not None else 0, redraw_confidence=g.redraw_confidence)


@torch.no_grad()
def accuracy_by_t(classifier: NoisyClassifier, diffusion: GaussianDiffusion, x0: torch.Tensor,
                  y: torch.Tensor, t_values: list[int], seed: int = 0,
                  batch_size: int = 2000) -> dict[int, float]:
    """Top-1 accuracy on x_t ~ q(x_t | x0) for each t in t_values; x0 (N, C, h, w), y (N,)."""
    generator = torch.Generator(x0.device).manual_seed(seed)
    result = {}
    for t_value in t_values:
        correct = 0
        for i in range(0, x0.shape[0], batch_size):
            batch = x0[i:i + batch_size]
            t = torch.full((batch.shape[0],), t_value, device=x0.device, dtype=torch.long)
            noise = torch.randn(batch.shape, generator=generator, device=x0.device)
            logits = classifier(diffusion.q_sample(batch, t, noise), t)
            correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
        result[t_value] = correct / x0.shape[0]
    return result


def report(path: str | os.PathLike) -> dict[int, float]:
    """Print the classifier's MNIST-test accuracy at t = 0, T/10, ..., T-1 and return it."""
    classifier, cfg = load_noisy_classifier(path, "cpu")
    images, labels = load_mnist(cfg.data_root, cfg.data.download, cfg.stages[-1].image_size,
                                cfg.data.channels, train=False)
    x0 = downsample(images, cfg.base.image_size)  # (10000, C, 8, 8), as in training
    T = cfg.base.diffusion.timesteps
    t_values = sorted({*range(0, T, T // 10), T - 1})
    accuracies = accuracy_by_t(classifier, GaussianDiffusion(cfg.base.diffusion), x0, labels, t_values)
    print("t      " + " ".join(f"{t:>5d}" for t in t_values))
    print("acc %  " + " ".join(f"{100 * a:5.1f}" for a in accuracies.values()))
    return accuracies


def main() -> None:
    from cdm.train import train  # here, not at the top: cdm.train imports this module

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="train the config's classifier: section alone, then report")
    source.add_argument("--checkpoint", help="report the accuracy against t of this checkpoint's "
                                             "classifier")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    path = args.checkpoint
    if args.config:
        cfg = load_config(args.config, args.overrides)
        cfg.run_name += "_classifier"
        path = train(cfg, progress=not args.no_progress, classifier_only=True)
    report(path)


if __name__ == "__main__":
    run_cli(main)
