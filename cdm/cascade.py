"""The cascade at sampling time: base 8x8 -> conditioning augmentation -> SR 32x32.

    z_0 or z_s  <- base reverse process (to the clean image, or stopped at state s - 1)
    cond        <- the low-res image (noised to z_s) and aug_level s
    x_0         <- SR reverse process given cond
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from tqdm import tqdm

from cdm.augment import noise_low_res, sr_cond
from cdm.checkpoint import STAGES, checkpoint_config, load_checkpoint, load_state, stage_weights
from cdm.config import Config, SamplerConfig, StageConfig
from cdm.diffusion import GaussianDiffusion
from cdm.guidance import Guidance, classifier_free, classifier_score
from cdm.runtime import autocast
from cdm.unet import UNet, build_unet


@dataclass
class Stage:
    """What a sampler needs of one stage: a network, its diffusion and its default sampler."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    sampler: SamplerConfig


def build_stage(cfg: Config, name: str, device: torch.device | str) -> tuple[UNet, GaussianDiffusion]:
    stage: StageConfig = getattr(cfg, name)
    model = build_unet(stage.model, stage.image_size, cfg.data.channels, super_res=name == "sr")
    return model.to(device), GaussianDiffusion(stage.diffusion, device)


def load_cascade(path: str | os.PathLike, device: torch.device | str, use_ema: bool = True
                 ) -> tuple[Config, dict[str, Stage], dict]:
    """Rebuild both stages from a checkpoint alone; EMA weights unless use_ema=False."""
    ckpt = load_checkpoint(path, device)
    cfg = checkpoint_config(ckpt, path)
    stages = {}
    for name in STAGES:
        model, diffusion = build_stage(cfg, name, device)
        key = "ema" if use_ema else "model"
        load_state(model, stage_weights(ckpt, name, key, path), path, f"{name} {key} weights")
        stages[name] = Stage(model.eval().requires_grad_(False), diffusion,
                             getattr(cfg, name).sampler)
    return cfg, stages, ckpt


class CascadeSamples(NamedTuple):
    base: torch.Tensor  # (N, C, 8, 8) the base stage's clean estimate z_0
    low_res: torch.Tensor  # (N, C, 8, 8) what the SR stage was given, z_s
    images: torch.Tensor  # (N, C, 32, 32) the cascade's output
    labels: torch.Tensor | None  # (N,) requested classes, when conditional


def default_labels(num: int, num_classes: int, device) -> torch.Tensor | None:
    """Class-balanced labels 0, 1, ..., 9, 0, 1, ... for a conditional model, else None."""
    return torch.arange(num, device=device) % num_classes if num_classes else None


@torch.no_grad()  # not inference_mode: classifier guidance differentiates through x_t
def sample_cascade(base: Stage, sr: Stage, num: int, aug_level: int, aug_mode: str,
                   generator: torch.Generator | None = None, batch_size: int = 256,
                   labels: torch.Tensor | None = None, bf16: bool = False,
                   progress: bool = False, guidance: Guidance | None = None) -> CascadeSamples:
    """Draw `num` cascaded samples, `batch_size` at a time; CDM section 4 for the two modes.
    aug_mode "non_truncated": base runs to z_0, which is forward-noised to z_s.
    aug_mode "truncated": the base chain stops at state s - 1 and hands its z_s over; the base
    clean estimate shown is the model's x0 prediction there.
    labels (num,): the classes asked for (default: balanced, when anything is conditional);
    guidance steers the base stage toward them (guidance.py)."""
    device = next(base.model.parameters()).device
    guidance = guidance or Guidance()
    if labels is None:
        classifier_classes = guidance.classifier.num_classes if guidance.classifier else 0
        labels = default_labels(num, base.model.num_classes or sr.model.num_classes
                                or classifier_classes, device)
    outputs, start = [], 0
    bar = tqdm(total=num, desc="sampling", disable=not progress, leave=False)
    while start < num:
        n = min(batch_size, num - start)
        y = labels[start:start + n] if labels is not None else None
        try:
            outputs.append(_sample_batch(base, sr, n, aug_level, aug_mode, y, generator, bf16, guidance))
        except torch.OutOfMemoryError:
            if n == 1:
                raise
            batch_size = max(1, n // 2)
            tqdm.write(f"out of memory at batch size {n}: retrying with {batch_size}", file=sys.stderr)
            continue
        start += n
        bar.update(n)
    bar.close()
    base_out, low_res, images = (torch.cat(parts) for parts in zip(*outputs))
    return CascadeSamples(base_out, low_res, images, labels)


def guided(stage: Stage, guidance: Guidance) -> torch.nn.Module:
    """The stage's network, under classifier-free guidance when asked and conditional."""
    if guidance.cfg_scale and stage.model.num_classes:
        return classifier_free(stage.model, guidance.cfg_scale, null_label=stage.model.num_classes)
    return stage.model


def _sample_batch(base: Stage, sr: Stage, n: int, aug_level: int, aug_mode: str,
                  y: torch.Tensor | None, generator: torch.Generator | None, bf16: bool,
                  guidance: Guidance) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of the cascade: (z_0 estimate, z_s given to SR, final images)."""
    device = next(base.model.parameters()).device
    sr_device = next(sr.model.parameters()).device  # differs when the stages sit on two GPUs
    channels = base.model.out[-1].out_channels
    base_cond = {"y": y} if base.model.num_classes else {}
    base_model, sr_model = guided(base, guidance), guided(sr, guidance)
    score_fn = None
    if guidance.classifier is not None and guidance.classifier_scale:
        score_fn = classifier_score(guidance.classifier, y, guidance.classifier_scale)
    levels = torch.full((n,), aug_level, device=device, dtype=torch.long)
    noise = torch.randn((n, channels, base.model.image_size, base.model.image_size),
                        generator=generator, device=device)
    with autocast(device, bf16):
        if aug_mode == "truncated" and aug_level > 0:
            z_s = base.diffusion.sample(base_model, noise, base_cond, base.sampler,
                                        end=aug_level - 1, generator=generator, score_fn=score_fn)
            z_0 = base.diffusion.model_predictions(base.model, z_s, levels - 1, base_cond,
                                                   clip_x0=True).x0
        else:
            z_0 = base.diffusion.sample(base_model, noise, base_cond, base.sampler,
                                        generator=generator, score_fn=score_fn)
            z_s = noise_low_res(z_0, levels, base.diffusion, generator)
        cond = {k: v.to(sr_device) for k, v in
                sr_cond(z_s, levels, y if sr.model.num_classes else None).items()}
        sr_noise = torch.randn((n, channels, sr.model.image_size, sr.model.image_size),
                               generator=generator, device=device).to(sr_device)
        images = sr.diffusion.sample(sr_model, sr_noise, cond, sr.sampler, generator=generator)
    return z_0.float(), z_s.float(), images.float().to(device)


def with_sampler(stage: Stage, **changes) -> Stage:
    """A copy of `stage` whose sampler settings are changed (e.g. steps=25); a change given as
    None (an option the user did not set) keeps the stage's own value."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return replace(stage, sampler=replace(stage.sampler, **changes))
