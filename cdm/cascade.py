"""The cascade at sampling time: a list of stages, each one's output the next one's input.

    x_0 of stage 0       <- the base reverse process from noise (class-guided when asked)
    for each SR stage k:
        z_s              <- stage k-1's output, noised to aug_level s on stage k-1's schedule
                            (or, truncated, stage k-1's chain stopped at state s - 1)
        cond             <- {low_res: z_s, aug_level: s}
        x_0 of stage k   <- stage k's reverse process given cond

`--until N` runs stages 0..N; `--low-res` images start the chain at the SR stage that takes
their size (sample.py).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from tqdm import tqdm

from cdm.augment import noise_low_res, sr_cond
from cdm.checkpoint import checkpoint_config, load_checkpoint, load_state, stage_weights
from cdm.config import Config, StageConfig
from cdm.diffusion import GaussianDiffusion
from cdm.errors import UserError
from cdm.guidance import Guidance, classifier_free, classifier_score, misread
from cdm.runtime import autocast
from cdm.unet import UNet, build_unet


@dataclass
class Stage:
    """One stage as sampling (and training's previews) use it: its config (size, sampler,
    augmentation), network and diffusion. An SR stage also holds the previous stage's diffusion:
    its conditioning augmentation noises with that schedule (augment.py)."""

    index: int  # 0: the base; k > 0: SR stage k, conditioned on stage k - 1
    cfg: StageConfig
    model: torch.nn.Module
    diffusion: GaussianDiffusion
    low_res_diffusion: GaussianDiffusion | None = None  # SR stages: stage k - 1's schedule

    @property
    def name(self) -> str:
        return stage_name(self.index)


def stage_name(index: int) -> str:
    """'base' for stage 0, then 'sr1', 'sr2', ...: how logs, grids and .npz keys call a stage."""
    return "base" if index == 0 else f"sr{index}"


def build_stage(cfg: Config, index: int, device: torch.device | str
                ) -> tuple[UNet, GaussianDiffusion, GaussianDiffusion | None]:
    """Stage `index`'s network, its diffusion, and (SR stages) the previous stage's diffusion."""
    stage = cfg.stages[index]
    model = build_unet(stage.model, stage.image_size, cfg.data.channels, super_res=index > 0)
    low_res = GaussianDiffusion(cfg.stages[index - 1].diffusion, device) if index else None
    return model.to(device), GaussianDiffusion(stage.diffusion, device), low_res


def load_cascade(path: str | os.PathLike, device: torch.device | str, use_ema: bool = True,
                 indices: list[int] | None = None) -> tuple[Config, list[Stage], dict]:
    """Rebuild the stages `indices` (default: every stage) from a checkpoint alone; EMA weights
    unless use_ema=False. A file trained with --stages 0 gives its base with indices=[0]."""
    ckpt = load_checkpoint(path, device, stages=indices)
    cfg = checkpoint_config(ckpt, path)
    stages = []
    key = "ema" if use_ema else "model"
    for index in range(len(cfg.stages)) if indices is None else indices:
        model, diffusion, low_res = build_stage(cfg, index, device)
        load_state(model, stage_weights(ckpt, index, key, path), path, f"stage {index} {key} weights")
        stages.append(Stage(index, cfg.stages[index], model.eval().requires_grad_(False), diffusion, low_res))
    return cfg, stages, ckpt


class CascadeSamples(NamedTuple):
    outputs: dict[int, torch.Tensor]  # stage index -> its clean output (N, C, H_k, W_k), in order
    low_res: dict[int, torch.Tensor]  # SR stage index -> what it was given, z_s (N, C, h, w)
    labels: torch.Tensor | None  # (N,) requested classes, when conditional

    @property
    def images(self) -> torch.Tensor:
        """The last stage's output: the cascade's samples."""
        return list(self.outputs.values())[-1]


def class_counts(num: int, shares: torch.Tensor) -> torch.Tensor:
    """(C,) whole counts summing to `num`, in proportion to `shares` (C,) (largest remainder)."""
    quota = num * shares.double() / shares.sum()
    counts = quota.floor().long()
    counts[torch.argsort(quota - counts, descending=True)[:num - int(counts.sum())]] += 1
    return counts


def default_labels(num: int, num_classes: int, device, generator: torch.Generator | None = None,
                   prior: list[float] | None = None, stratified: bool = False) -> torch.Tensor | None:
    """`num` labels drawn at random from `prior` (one share per class; None: every class alike)
    for a conditional model, else None. A class-conditional cascade models
    p(x) = sum_y p(y) p(x | y): drawn from the training labels' shares (data.class_prior), the
    classes come in the data's mix, which a set of class-balanced real digits is not (docs/results.md 9.15).
    stratified: each class exactly its share of `num` (class_counts), in random order, so that
    no draw of the class histogram moves a score (docs/results.md 9.21)."""
    if not num_classes:
        return None
    if prior is not None and len(prior) != num_classes:
        raise UserError(f"data.class_prior has {len(prior)} shares, the model asks for {num_classes} classes")
    weights = torch.ones(num_classes) if prior is None else torch.tensor(prior, dtype=torch.float64)
    if stratified:
        labels = torch.repeat_interleave(torch.arange(num_classes), class_counts(num, weights)).to(device)
        return labels[torch.randperm(num, generator=generator, device=device)]
    return torch.multinomial(weights.to(device), num, replacement=True, generator=generator)


@torch.no_grad()  # not inference_mode: classifier guidance differentiates through x_t
def sample_cascade(stages: list[Stage], num: int, generator: torch.Generator | None = None,
                   batch_size: int = 256, labels: torch.Tensor | None = None, bf16: bool = False,
                   progress: bool = False, guidance: Guidance | None = None,
                   low_res: torch.Tensor | None = None, class_prior: list[float] | None = None) -> CascadeSamples:
    """Draw `num` samples through `stages` (consecutive, e.g. all, or 0..N for --until N),
    `batch_size` at a time. Each SR stage's augment section sets its aug_level s and mode
    (CDM section 4): non_truncated runs the stage before to its clean x_0 and forward-noises it
    to z_s; truncated stops that chain at state s - 1 and hands its z_s over (the clean output
    kept for grids is the guided model's x0 prediction there).
    labels (num,): the classes asked for (default, when anything is conditional: drawn from
    class_prior, the config's data.class_prior, by the generator before any noise);
    guidance steers the stages toward them (guidance.py). low_res (num, C, h, w): start from
    these images as the input of stages[0], an SR stage (super-resolve your own images).
    An out-of-memory batch is retried at half the size from the same generator state."""
    device = next(stages[0].model.parameters()).device
    guidance = guidance or Guidance()
    if labels is None:
        classifier_classes = guidance.classifier.num_classes if guidance.classifier else 0
        labels = default_labels(num, next((s.model.num_classes for s in stages if s.model.num_classes),
                                          classifier_classes), device, generator, class_prior)
    outputs, start = [], 0
    bar = tqdm(total=num, desc="sampling", disable=not progress, leave=False)
    while start < num:
        n = min(batch_size, num - start)
        y = labels[start:start + n] if labels is not None else None
        given = low_res[start:start + n].to(device) if low_res is not None else None
        state = generator.get_state() if generator is not None else None
        try:
            outputs.append(_sample_batch(stages, n, y, given, generator, bf16, guidance))
            _redraw_misread(outputs[-1], stages, y, generator, bf16, guidance)
        except torch.OutOfMemoryError:
            if n == 1:
                raise
            batch_size = max(1, n // 2)
            if generator is not None:  # redraw from where this batch began
                generator.set_state(state)
            tqdm.write(f"out of memory at batch size {n}: retrying with {batch_size}", file=sys.stderr)
            continue
        start += n
        bar.update(n)
    bar.close()
    return CascadeSamples({k: torch.cat([o[0][k] for o in outputs]) for k in outputs[0][0]},
                          {k: torch.cat([o[1][k] for o in outputs]) for k in outputs[0][1]}, labels)


def guided(stage: Stage, guidance: Guidance) -> torch.nn.Module:
    """The stage's network, under classifier-free guidance when asked and conditional."""
    if guidance.cfg_scale and stage.model.num_classes:
        return classifier_free(stage.model, guidance.cfg_scale, stage.model.num_classes,
                               guidance.cfg_interval)
    return stage.model


def handoff_state(next_stage: Stage | None) -> int:
    """The state a stage's chain stops at: -1 (clean), or s - 1 when the next stage takes a
    truncated chain's z_s at aug_level s > 0."""
    if next_stage is None:
        return -1
    aug = next_stage.cfg.augment
    return aug.aug_level - 1 if aug.aug_mode == "truncated" and aug.aug_level > 0 else -1


def _redraw_misread(batch: tuple[dict, dict], stages: list[Stage], y: torch.Tensor | None,
                    generator: torch.Generator | None, bf16: bool, guidance: Guidance) -> None:
    """Guidance.redraw: draw again, in place, the samples whose base output the classifier reads
    as another class than asked, up to `redraw` times (those still misread after that stay)."""
    if not guidance.redraw or guidance.classifier is None or y is None or stages[0].index != 0:
        return
    outputs, given = batch
    for _ in range(guidance.redraw):
        idx = misread(guidance.classifier, outputs[0], y, guidance.redraw_confidence).nonzero().flatten()
        if len(idx) == 0:
            return
        again, again_given = _sample_batch(stages, len(idx), y[idx], None, generator, bf16, guidance)
        for parts, new in ((outputs, again), (given, again_given)):
            for k in parts:
                parts[k][idx] = new[k]


def _sample_batch(stages: list[Stage], n: int, y: torch.Tensor | None, low_res: torch.Tensor | None,
                  generator: torch.Generator | None, bf16: bool, guidance: Guidance
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One batch through the stages: ({index: clean output}, {SR index: z_s it was given})."""
    outputs, given = {}, {}
    x, z_handoff = low_res, None  # the previous stage's clean output; a truncated chain's state
    for k, stage in enumerate(stages):
        device = next(stage.model.parameters()).device  # stages may sit on different GPUs
        channels = stage.model.channels
        cond = {"y": y.to(device)} if stage.model.num_classes else {}
        if stage.index > 0:
            levels = torch.full((n,), stage.cfg.augment.aug_level, device=x.device, dtype=torch.long)
            z_s = z_handoff if z_handoff is not None else noise_low_res(x, levels, stage.low_res_diffusion,
                                                                         generator)
            cond.update(sr_cond(z_s.to(device), levels.to(device)))
            given[stage.index] = z_s.float()
        model = guided(stage, guidance)
        if stage.cfg.model.self_condition:
            model = stage.diffusion.self_conditioned(model)
        score_fn = None
        if stage.index == 0 and guidance.classifier is not None and guidance.classifier_scale:
            score_fn = classifier_score(guidance.classifier, y, guidance.classifier_scale)
        end = handoff_state(stages[k + 1] if k + 1 < len(stages) else None)
        size = stage.cfg.image_size
        noise = torch.randn((n, channels, size, size), generator=generator,
                            device=generator.device if generator is not None else device).to(device)
        with autocast(device, bf16):
            x_end = stage.diffusion.sample(model, noise, cond, stage.cfg.sampler, end=end,
                                           generator=generator, score_fn=score_fn)
            if end >= 0:  # truncated: hand z_s over; keep the guided model's clean estimate
                t = torch.full((n,), end, device=device, dtype=torch.long)
                x = stage.diffusion.model_predictions(model, x_end, t, cond, clip_x0=True,
                                                      score_fn=score_fn).x0
                z_handoff = x_end
            else:
                x, z_handoff = x_end, None
        outputs[stage.index] = x.float()
    return outputs, given


def with_sampler(stage: Stage, **changes) -> Stage:
    """A copy of `stage` whose sampler settings are changed (e.g. steps=25); a change given as
    None (an option the user did not set) keeps the stage's own value."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return replace(stage, cfg=replace(stage.cfg, sampler=replace(stage.cfg.sampler, **changes)))


def with_augment(stage: Stage, **changes) -> Stage:
    """A copy of SR `stage` whose sampling-time augmentation (aug_level, aug_mode) is changed;
    None keeps the stage's own value. The base stage is returned as it is."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if stage.cfg.augment is None:
        return stage
    return replace(stage, cfg=replace(stage.cfg, augment=replace(stage.cfg.augment, **changes)))
