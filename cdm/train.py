"""Train the stages of the cascade together, from one data stream (`train(cfg)`).

Each step draws one batch at the top stage's size (32x32 digits for MNIST). The base stage learns
the batch downsampled to its size (8x8); each SR stage learns the batch at its own size given the
next-lower version, blurred and noised by its conditioning augmentation; a noisy classifier, when
the config has a `classifier:` section, learns the labels of the base stage's noisy x_t. Each has
its own network, AdamW, warm-up, gradient clipping and EMA. train.stages (--stages) trains a
consecutive subset: python -m cdm.checkpoint combine joins the files afterwards.
The loop reads top to bottom: lr -> batch -> cond -> loss -> backward -> clip -> step -> EMA ->
log -> preview -> checkpoint. Ctrl-C saves a checkpoint before exiting.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cdm.augment import blur_low_res, noise_low_res, sample_aug_levels, sr_cond
from cdm.cascade import Stage, build_stage, sample_cascade, stage_name
from cdm.checkpoint import (CLASSIFIER, FORMAT_VERSION, SNAPSHOT_DIR, checkpoint_config, load_checkpoint,
                            load_state, save_checkpoint, stage_weights)
from cdm.config import Config, StageConfig
from cdm.cuda_graphs import GraphedLoss, graphed_training_loss, use_cuda_graph
from cdm.data import downsample
from cdm.datasets import load_data
from cdm.distributed import DistInfo, any_rank, gather, setup, teardown
from cdm.diffusion import GaussianDiffusion, gaussian_noise
from cdm.ema import PowerEMA, ema_decay, ema_update
from cdm.errors import UserError
from cdm.grids import save_cascade_grids
from cdm.guidance import drop_labels
from cdm.noisy_classifier import NoisyClassifier, classifier_losses, classifier_stage_config
from cdm.runtime import autocast, git_commit, resolve_device, use_bf16
from cdm.unet import UNet, upsample_low_res


@dataclass
class TrainStage:
    """A trained part: a cascade stage (index 0, 1, ...) or the noisy classifier (index None)."""

    name: str  # base, sr1, sr2, ... or classifier: the prefix of its log columns
    index: int | None
    cfg: StageConfig
    model: UNet | NoisyClassifier  # the trained weights (uncompiled module: what is saved)
    forward: Callable  # model, or torch.compile(model)
    ema: UNet | NoisyClassifier  # exponential moving average of `model`, used for sampling
    optimizer: torch.optim.Optimizer
    steps: int  # the run's length (train.steps): where a decaying learning rate reaches zero
    diffusion: GaussianDiffusion
    low_res_diffusion: GaussianDiffusion | None = None  # SR stages: the previous stage's schedule
    power_emas: list[PowerEMA] = field(default_factory=list)  # optim.posthoc_ema_std, for post-hoc EMAs
    graph: GraphedLoss | None = None  # set: loss + backward replayed as a CUDA graph (train.cuda_graphs)

    def for_sampling(self) -> Stage:
        """The stage with its EMA weights, as the sampler takes it."""
        return Stage(self.index, self.cfg, self.ema, self.diffusion, self.low_res_diffusion)


def learning_rate(step: int, cfg: StageConfig, total_steps: int) -> float:
    """Linear warm-up over warmup_steps, then constant (lr_decay none) or a half cosine from the
    peak down to zero at total_steps (lr_decay cosine, Loshchilov & Hutter 2017)."""
    warmup = cfg.optim.warmup_steps
    lr = cfg.optim.lr * min(1.0, (step + 1) / warmup) if warmup else cfg.optim.lr
    if cfg.optim.lr_decay == "cosine" and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def make_stage(cfg: Config, index: int | None, device: torch.device, compile_model: bool,
               channels_last: bool, data_parallel: bool = False, bf16: bool = False) -> TrainStage:
    """A trainable part: cascade stage `index`, or (None) the noisy classifier (always eager),
    which learns on the base stage's forward process."""
    low_res = None
    if index is None:
        name, stage_cfg = CLASSIFIER, classifier_stage_config(cfg)
        model = NoisyClassifier(cfg).to(device)
        diffusion = GaussianDiffusion(stage_cfg.diffusion, device)
    else:
        name, stage_cfg = stage_name(index), cfg.stages[index]
        model, diffusion, low_res = build_stage(cfg, index, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    stds = stage_cfg.optim.posthoc_ema_std if index is not None else []
    power_emas = [PowerEMA(std, copy.deepcopy(ema)) for std in stds]
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage_cfg.optim.lr,  # fused: CPU and CUDA
                                  weight_decay=stage_cfg.optim.weight_decay, fused=True)
    forward = model
    if data_parallel:  # gradients are averaged across ranks during backward
        forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if compile_model:  # static shapes: each stage (same UNet class, other sizes) gets its own graph
        forward = torch.compile(forward, dynamic=False)
    graph = None
    if index is not None and use_cuda_graph(cfg.train.cuda_graphs, device, compile_model, stage_cfg.model.self_condition,
                                            data_parallel, cfg.train.split_stages):
        graph = graphed_training_loss(diffusion, forward, device, bf16)
    return TrainStage(name, index, stage_cfg, model, forward, ema, optimizer, cfg.train.steps, diffusion, low_res,
                      power_emas, graph)


class StepStats(NamedTuple):
    losses: torch.Tensor  # (B,) per-example loss
    t: torch.Tensor  # (B,) their timesteps
    grad_norm: torch.Tensor  # () global gradient norm before clipping
    skipped: torch.Tensor  # () bool: the loss or gradient was not finite, no update was made


def draw_t_and_noise(stage: TrainStage, x0: torch.Tensor, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t (B,) from the stage's noise distribution and standard normal noise shaped like x0."""
    t = stage.diffusion.training_timesteps(x0.shape[0], generator).to(x0.device)
    return t, gaussian_noise(x0, generator)


def self_condition_coin(step: int) -> bool:
    """Heads on half the steps: self-conditioning's first pass runs then (Chen et al. 2022).
    A function of the step alone, so every rank agrees and a resumed run draws the same."""
    return random.Random(step).random() < 0.5


def train_step(stage: TrainStage, x0: torch.Tensor, cond: dict, step: int, bf16: bool,
               generator: torch.Generator) -> StepStats:
    """One optimizer step of a diffusion stage on clean images x0 (B, C, H, W)."""
    t, noise = draw_t_and_noise(stage, x0, generator)
    if stage.graph is not None:  # the recorded loss and backward (cdm/cuda_graphs.py)
        losses = stage.graph(x0=x0, t=t, noise=noise, **cond)  # (B,)
    else:
        self_condition = stage.cfg.model.self_condition and self_condition_coin(step)
        with autocast(x0.device, bf16):
            losses = stage.diffusion.training_loss(stage.forward, x0, t, cond, noise, self_condition)  # (B,)
        backward(stage, losses)
    return optimizer_step(stage, losses, t, step)


def classifier_step(stage: TrainStage, x0: torch.Tensor, y: torch.Tensor, step: int, bf16: bool,
                    generator: torch.Generator) -> StepStats:
    """One optimizer step of the noisy classifier on base-size images x0 (B, C, h, w), labels y."""
    t, noise = draw_t_and_noise(stage, x0, generator)
    with autocast(x0.device, bf16):
        losses = classifier_losses(stage.forward, stage.diffusion, x0, y, t, noise)  # (B,)
    backward(stage, losses)
    return optimizer_step(stage, losses, t, step)


def backward(stage: TrainStage, losses: torch.Tensor) -> None:
    """The gradients of the batch's mean loss, in the parameters' .grad."""
    stage.optimizer.zero_grad(set_to_none=True)
    losses.mean().backward()


def optimizer_step(stage: TrainStage, losses: torch.Tensor, t: torch.Tensor, step: int) -> StepStats:
    """Clip, AdamW and EMA after the backward pass of per-example losses (B,), with no host sync:
    a non-finite gradient norm makes the fused AdamW skip its update on the device (its
    `found_inf` flag, as GradScaler uses it)."""
    for group in stage.optimizer.param_groups:
        group["lr"] = learning_rate(step, stage.cfg, stage.steps)
    clip = stage.cfg.optim.grad_clip or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(stage.model.parameters(), clip)
    skipped = ~torch.isfinite(grad_norm)
    stage.optimizer.found_inf = skipped.float()
    stage.optimizer.step()
    ema_update(stage.ema, stage.model, ema_decay(step, stage.cfg.optim.ema_decay))
    for average in stage.power_emas:
        average.update(stage.model, step)
    return StepStats(losses.detach(), t, grad_norm.detach(), skipped)


def random_crop(tensors: list[torch.Tensor], size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The same random size x size window of each (B, C, H, W) tensor (one offset per batch)."""
    H = tensors[0].shape[-1]
    i, j = torch.randint(0, H - size + 1, (2,), generator=generator, device=generator.device).tolist()
    return [x[..., i:i + size, j:j + size] for x in tensors]


class StageMeter:
    """Device-side sums for one stage between two log rows: loss overall and by timestep
    quartile, gradient norm, skipped steps. Read (one host sync) only when logging."""

    def __init__(self, timesteps: int, device: torch.device):
        self.timesteps = timesteps
        self.sums = torch.zeros(6, device=device)  # [loss, q1, q2, q3, q4, grad_norm]
        self.counts = torch.zeros(6, device=device)
        self.skipped = torch.zeros((), device=device)

    def add(self, stats: StepStats) -> None:
        ok = (~stats.skipped).float()  # a skipped step's loss may be nan: count it nowhere
        losses = torch.where(stats.skipped, 0.0, stats.losses.float())
        quartile = 1 + (stats.t * 4 // self.timesteps)  # (B,) in 1..4
        self.sums.index_add_(0, quartile, losses)
        self.counts.index_add_(0, quartile, ok.expand_as(losses))
        self.sums[0] += losses.sum()
        self.counts[0] += ok * losses.numel()
        self.sums[5] += torch.where(stats.skipped, 0.0, stats.grad_norm.float())
        self.counts[5] += ok
        self.skipped += stats.skipped.float()

    def read(self) -> dict[str, float]:
        means = (self.sums / self.counts.clamp(min=1)).tolist()
        row = {"loss": means[0], **{f"loss_q{q}": means[q] for q in range(1, 5)},
               "grad_norm": means[5], "skipped": int(self.skipped.item())}
        for x in (self.sums, self.counts, self.skipped):
            x.zero_()
        return row


def check_finite(row: dict, names, window_steps: int, step: int, metrics: dict,
                 ckpt_path: Path) -> None:
    """Count skipped (non-finite) steps and warn; stop when every step of a log window was
    skipped in a stage, leaving the last checkpoint as it was."""
    for name in names:
        skipped = row[f"{name}_skipped"]
        if not skipped:
            continue
        metrics["skipped_steps"] += skipped
        tqdm.write(f"warning: step {step}: {skipped} {name} step(s) had a non-finite loss or "
                   f"gradient and were skipped ({metrics['skipped_steps']} so far)", file=sys.stderr)
        if skipped == window_steps:
            raise UserError(f"training stopped at step {step}: all of the last {window_steps} "
                            f"{name} steps were non-finite (diverged). The last checkpoint, "
                            f"{ckpt_path}, is kept as it was; lower {name}.optim.lr and resume")


def preview(stages: dict[str, TrainStage], cfg: Config, step: int, bf16: bool,
            real: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """Draw num_preview samples through the trained stages from their EMA weights with a fixed
    seed (so grids can be compared across steps) and write a grid per stage; returns the seconds
    it took. When the base is trained elsewhere (--stages 1,2), the first trained stage starts
    from `real` images (num_preview, C, H, W) downsampled to its input size, with their labels."""
    start = time.perf_counter()
    cascade = [s.for_sampling() for s in stages.values() if s.index is not None]
    device = next(cascade[0].model.parameters()).device
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)
    low_res = reference = labels = None
    if cascade[0].index > 0:
        images, labels = real
        low_res = downsample(images, cfg.stages[cascade[0].index - 1].image_size)
        reference = downsample(images, cascade[-1].cfg.image_size)
    samples = sample_cascade(cascade, num=cfg.train.num_preview, generator=generator,
                             batch_size=cfg.train.num_preview, bf16=bf16, low_res=low_res,
                             labels=labels if any(s.model.num_classes for s in cascade) else None,
                             class_prior=cfg.data.class_prior)
    save_cascade_grids(samples, cfg.run_dir / "samples", suffix=f"_step{step:06d}", given=low_res,
                       reference=reference)
    return time.perf_counter() - start


def rng_state(generator: torch.Generator) -> dict:
    """This process's RNG states: the global CPU and CUDA generators (dropout) and the training
    generator (data order, t, noise, augmentation)."""
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def checkpoint_payload(cfg: Config, stages: dict[str, TrainStage], step: int,
                       rng_states: list[dict], metrics: dict) -> dict:
    """The checkpoint dict; rng_states holds one entry per rank (one in a single process)."""
    payload = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "step": step,
               "metrics": metrics, "git_commit": git_commit(), "rng": rng_states}
    payload["stages"] = {}
    for stage in stages.values():
        entry = {"model": stage.model.state_dict(), "ema": stage.ema.state_dict(),
                 "optimizer": stage.optimizer.state_dict(), "step": step}
        if stage.power_emas:
            entry["power_ema"] = {average.key: average.average.state_dict() for average in stage.power_emas}
        if stage.index is None:
            payload[CLASSIFIER] = entry
        else:
            payload["stages"][stage.index] = entry
    return payload


def snapshot_payload(payload: dict) -> dict | None:
    """The power-function EMAs of a checkpoint payload's stages that track them, in the same
    layout (stages {index: {"power_ema": {std: state_dict}, "step"}}); None when none does."""
    tracked = {i: {"power_ema": entry["power_ema"], "step": entry["step"]}
               for i, entry in payload["stages"].items() if "power_ema" in entry}
    if not tracked:
        return None
    return {**{k: payload[k] for k in ("format_version", "config", "step")}, "stages": tracked}


def restore(path: str | Path, cfg: Config, stages: dict[str, TrainStage],
            generator: torch.Generator, info: DistInfo) -> tuple[int, dict]:
    """Load weights, EMA, optimizers and RNG states from a checkpoint; returns (step, metrics)."""
    indices = [s.index for s in stages.values() if s.index is not None]
    ckpt = load_checkpoint(path, "cpu", stages=indices, classifier=CLASSIFIER in stages)
    stored = checkpoint_config(ckpt, path)
    if len(stored.stages) != len(cfg.stages):
        raise UserError(f"--resume '{path}': it holds a {len(stored.stages)}-stage cascade, this "
                        f"config has {len(cfg.stages)}; resume with the checkpoint's own config")
    for stage in stages.values():
        if stage.index is None:
            states = ckpt[CLASSIFIER]
            same = stored.classifier is not None and stored.classifier.model == cfg.classifier.model
        else:
            states = {part: stage_weights(ckpt, stage.index, part, path) for part in ("model", "ema", "optimizer")}
            same = stored.stages[stage.index].model == cfg.stages[stage.index].model
        if not same:
            key = "classifier" if stage.index is None else f"stages.{stage.index}"
            raise UserError(f"--resume '{path}': its {key}.model config differs from this run's; "
                            f"resume with the checkpoint's own config (no --config)")
        for part, target in (("model", stage.model), ("ema", stage.ema), ("optimizer", stage.optimizer)):
            load_state(target, states[part], path, f"{stage.name} {part} state")
        if stage.power_emas:
            stored_emas = ckpt["stages"][stage.index].get("power_ema", {})
            for average in stage.power_emas:
                if average.key not in stored_emas:
                    raise UserError(f"--resume '{path}': it tracked no power-function EMA with std "
                                    f"{average.key} for stages.{stage.index} (it has {sorted(stored_emas)}); "
                                    f"resume with the checkpoint's own optim.posthoc_ema_std")
                load_state(average.average, stored_emas[average.key], path, f"{stage.name} power EMA {average.key}")
    if len(ckpt["rng"]) != info.world_size:
        raise UserError(f"--resume '{path}': it was saved by {len(ckpt['rng'])} process(es); resume "
                        f"with the same number (this run has {info.world_size})")
    rng = ckpt["rng"][info.rank]
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(ckpt["step"]), dict(ckpt.get("metrics", {}))


def with_class_prior(cfg: Config, labels: torch.Tensor) -> Config:
    """cfg with data.class_prior, when null and the cascade has classes, set to each class's share
    of the training labels (N,): the mix sampling draws when no class is asked for."""
    classes = cfg.num_labels
    if cfg.data.class_prior is not None or not classes:
        return cfg
    counts = torch.bincount(labels.cpu(), minlength=classes)  # (classes,)
    if len(counts) > classes:
        key = next((f"stages.{i}.model.num_classes" for i, s in enumerate(cfg.stages) if s.model.num_classes),
                   "classifier.num_classes")
        raise UserError(f"config key '{key}': expected at least {len(counts)} (the training data's "
                        f"classes), got {classes}")
    shares = [round(count / len(labels), 6) for count in counts.tolist()]
    return replace(cfg, data=replace(cfg.data, class_prior=shares))


def write_run_info(cfg: Config, device: torch.device, graphed: list[str]) -> None:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "run_info.json").write_text(json.dumps(
        {"git_commit": git_commit(), "torch": torch.__version__, "device": str(device),
         "threads": torch.get_num_threads(), "cuda_graphs": graphed}, indent=1))


def cascade_step(stages: dict[str, TrainStage], cfg: Config, hr: torch.Tensor, y: torch.Tensor,
                 step: int, bf16: bool, generator: torch.Generator) -> dict[str, StepStats]:
    """One step of every trained cascade stage on one batch hr (B, C, S, S) at the top stage's
    size S, labels y (B,). Stage k takes the first optim.batch_size images of the batch."""
    stats = {}
    for stage in stages.values():
        if stage.index is None:
            continue
        n = stage.cfg.optim.batch_size
        target = downsample(hr[:n], stage.cfg.image_size)  # (n, C, H_k, W_k)
        labels = stage_labels(y[:n], stage.cfg, generator) if stage.cfg.model.num_classes else None
        if stage.index == 0:  # the base stage: learn the images at its size
            cond = {"y": labels} if labels is not None else {}
        else:  # SR stage k: learn them given the blurred, noised stage k-1 version (CDM section 4)
            aug = stage.cfg.augment
            low_res = downsample(hr[:n], cfg.stages[stage.index - 1].image_size)  # (n, C, h, w)
            levels = sample_aug_levels(n, aug.max_level, generator, hr.device)  # (n,)
            z = blur_low_res(low_res, aug.blur_prob, aug.blur_sigma, generator)
            z = noise_low_res(z, levels, stage.low_res_diffusion, generator)  # z_s
            if stage.cfg.optim.crop_size:  # patches: crop the target and the resized conditioning alike
                z = upsample_low_res(z, stage.cfg.image_size, stage.cfg.model.upsample_mode)  # (n, C, H_k, W_k)
                target, z = random_crop([target, z], stage.cfg.optim.crop_size, generator)
            cond = sr_cond(z, levels, labels)
        device = next(stage.model.parameters()).device  # its own GPU with train.split_stages
        target, cond = target.to(device), {k: v.to(device) for k, v in cond.items()}
        stats[stage.name] = train_step(stage, target, cond, step, bf16, generator)
    return stats


def stage_labels(y: torch.Tensor, stage: StageConfig, generator: torch.Generator) -> torch.Tensor:
    """A conditional stage's training labels (B,), with label dropout to the null label."""
    return drop_labels(y, stage.model.label_dropout, stage.model.num_classes, generator)


def run_step(stages: dict[str, TrainStage], cfg: Config, hr: torch.Tensor, y: torch.Tensor,
             step: int, bf16: bool, generator: torch.Generator) -> dict[str, StepStats]:
    """One step of every part this run trains, all on the same batch."""
    stats = cascade_step(stages, cfg, hr, y, step, bf16, generator)
    if CLASSIFIER in stages:  # the classifier sees the base stage's images, in [-1, 1]
        n = stages[CLASSIFIER].cfg.optim.batch_size
        x0 = downsample(hr[:n], cfg.base.image_size)  # (Bc, C, 8, 8)
        stats[CLASSIFIER] = classifier_step(stages[CLASSIFIER], x0, y[:n], step, bf16, generator)
    return stats


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (`kill`, a batch scheduler, a closing terminal)
    into a flag the loop checks between steps, so the step in flight completes and a consistent
    checkpoint is saved; a second signal of the same kind acts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None  # the signal that asked to stop
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def split_devices(device: torch.device, info: DistInfo, count: int) -> list[torch.device]:
    """train.split_stages: stage k of process r on GPU count * r + k. The batch is drawn on the
    first GPU and each stage's inputs are copied to its own; the stages' kernels then run
    concurrently on their GPUs."""
    needed = count * (info.local_rank + 1)
    if device.type != "cuda" or torch.cuda.device_count() < needed:
        raise UserError(f"train.split_stages needs {needed} CUDA devices for this process "
                        f"(found {torch.cuda.device_count() if device.type == 'cuda' else 0})")
    return [torch.device("cuda", count * info.local_rank + k) for k in range(count)]


def train(cfg: Config, resume: str | Path | None = None, progress: bool = True,
          classifier_only: bool = False) -> Path:
    """Train for cfg.train.steps steps; returns the final checkpoint's path. Trains the stages
    of cfg.trained_stages, plus the noisy classifier when the config has one and the base is
    trained; classifier_only trains the classifier alone. Under torchrun, every rank runs this
    (see cdm/distributed.py)."""
    parts: list[int | None] = [] if classifier_only else list(cfg.trained_stages)
    if cfg.classifier is not None and (classifier_only or 0 in parts):
        parts.append(None)
    # --- choose-once settings
    info, device = setup(resolve_device(cfg.device), cfg.train.split_stages)
    try:
        return _train(cfg, resume, progress, info, device, parts)
    finally:
        teardown(info)


def _train(cfg: Config, resume, progress: bool, info: DistInfo, device: torch.device,
           parts: list[int | None]) -> Path:
    torch.manual_seed(cfg.seed + info.rank)
    generator = torch.Generator(device).manual_seed(cfg.seed + info.rank)  # data order, t, noise, aug
    bf16 = use_bf16(cfg.train.precision, device)
    compile_model = cfg.train.compile == "always" or (cfg.train.compile == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data (this rank's slice), models, optimizers, optional resume
    data = load_data(cfg.data.dataset, cfg.data_root, cfg.data.download, cfg.stages[-1].image_size,
                     cfg.data.channels, device=device, max_resident_mb=cfg.data.max_resident_mb,
                     workers=cfg.data.workers)
    cfg = with_class_prior(cfg, data.labels)
    if info.enabled:
        data = data.shard(info.rank, info.world_size)
    devices = split_devices(device, info, len(cfg.stages)) if cfg.train.split_stages else [device] * len(cfg.stages)
    stages = {}
    for index in parts:  # the classifier sits with the base
        stage = make_stage(cfg, index, devices[index or 0], compile_model, cfg.train.channels_last, info.enabled,
                           bf16)
        stages[stage.name] = stage
    previewed = [s for s in stages.values() if s.index is not None]
    real = None  # an SR stage trained apart previews on real inputs: (images, labels)
    if previewed and previewed[0].index > 0:
        real = data.head(cfg.train.num_preview), data.labels[:cfg.train.num_preview].to(device)
    step, metrics = 0, {"skipped_steps": 0, "train_seconds": 0.0, "preview_seconds": 0.0}
    if resume is not None:
        step, metrics = restore(resume, cfg, stages, generator, info)
    if info.is_main:
        write_run_info(cfg, device, [s.name for s in stages.values() if s.graph is not None])
    ckpt_path = cfg.run_dir / "checkpoint.pt"
    meters = {name: StageMeter(stage.diffusion.num_timesteps, device) for name, stage in stages.items()}
    batch = max(stage.cfg.optim.batch_size for stage in stages.values())

    def save() -> Path:
        rng_states = gather(info, rng_state(generator))  # every rank takes part
        if info.is_main:
            payload = checkpoint_payload(cfg, stages, step, rng_states, metrics)
            save_checkpoint(payload, ckpt_path)
            snapshot = snapshot_payload(payload)
            if snapshot is not None:  # for python -m cdm.checkpoint posthoc
                save_checkpoint(snapshot, cfg.run_dir / SNAPSHOT_DIR / f"{step:07d}.pt")
        return ckpt_path

    def out_of_time() -> bool:
        """train.max_minutes of training time (this session's plus earlier ones') are used up."""
        used = metrics["train_seconds"] - metrics["preview_seconds"] + time.perf_counter() - session_start
        return bool(cfg.train.max_minutes) and used >= 60 * cfg.train.max_minutes

    def stop_now(requested: bool) -> bool:
        """A single process stops at once; ranks agree at log steps, so none waits on another."""
        if not info.enabled:
            return requested
        return step % cfg.train.log_every == 0 and any_rank(info, requested)

    # --- the loop
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (progress and info.is_main),
               desc=cfg.run_name, dynamic_ncols=True)
    log_path = cfg.run_dir / "metrics.jsonl" if info.is_main else Path(os.devnull)
    window_start, window_steps, session_start = time.perf_counter(), 0, time.perf_counter()
    interrupted = timed_out = False
    with StopRequest() as stop, log_path.open("a") as log_file:
        try:
            while step < cfg.train.steps:
                hr, y = data.batch(batch, generator)  # (B, C, 32, 32), (B,)
                hr = hr.contiguous(memory_format=memory_format)
                for name, stats in run_step(stages, cfg, hr, y, step, bf16, generator).items():
                    meters[name].add(stats)
                step += 1
                window_steps += 1
                bar.update(1)

                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    row = {"step": step, "images_per_s": window_steps * batch * info.world_size / elapsed,
                           "ms_per_step": 1000 * elapsed / window_steps}
                    for name in stages:
                        row.update({f"{name}_{k}": v for k, v in meters[name].read().items()})
                        row[f"{name}_lr"] = learning_rate(step - 1, stages[name].cfg, stages[name].steps)
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    check_finite(row, stages, window_steps, step, metrics, ckpt_path)
                    bar.set_postfix(**{name: f"{row[f'{name}_loss']:.4f}" for name in stages},
                                    img_s=f"{row['images_per_s']:.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if info.is_main and cfg.train.sample_every and previewed and (
                        step % cfg.train.sample_every == 0 or step == cfg.train.steps):
                    seconds = preview(stages, cfg, step, bf16, real)
                    metrics["preview_seconds"] += seconds
                    window_start += seconds  # images/s counts training time only
                if step % cfg.train.save_every == 0:
                    save()
                if stop_now(stop.requested):
                    interrupted = True
                    break
                if stop_now(out_of_time()):
                    timed_out = True
                    break
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory at step {step} with batch {batch}: lower the stages' "
                            f"optim.batch_size (e.g. --set stages.{len(cfg.stages) - 1}.optim.batch_size="
                            f"{max(1, batch // 2)}) and resume from {ckpt_path}") from None
        finally:
            bar.close()
    if timed_out and info.is_main and cfg.train.sample_every and previewed and step % cfg.train.sample_every:
        metrics["preview_seconds"] += preview(stages, cfg, step, bf16, real)  # the grids of the last step
    metrics["train_seconds"] += time.perf_counter() - session_start
    path = save()
    if interrupted:
        if info.is_main:
            print(f"interrupted at step {step} ({signal.Signals(stop.signum).name}): saved {path}; "
                  f"continue with python train_mnist.py --resume {path}")
        raise SystemExit(128 + stop.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if info.is_main:
        share = 100 * metrics["preview_seconds"] / max(metrics["train_seconds"], 1e-9)
        grids = f"; grids in {cfg.run_dir / 'samples'}" if previewed else ""
        limit = f" (train.max_minutes = {cfg.train.max_minutes:g} reached)" if timed_out else ""
        print(f"done: {step} steps{limit} in {metrics['train_seconds']:.0f}s (previews {share:.1f}% of it); "
              f"checkpoint {path}{grids}")
    return path
