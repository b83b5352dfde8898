"""Train the base and SR stages together, from one data stream (`train(cfg)`).

Each step draws one batch of 32x32 digits. The base stage learns the 8x8 downsampled batch; the
SR stage learns the 32x32 batch given its own 8x8 version, blurred and noised by conditioning
augmentation; a noisy classifier, when the config has a `classifier:` section, learns the labels
of the base stage's noisy 8x8 x_t. Each has its own network, AdamW, warm-up, gradient clipping
and EMA.
The loop reads top to bottom: lr -> batch -> cond -> loss -> backward -> clip -> step -> EMA ->
log -> preview -> checkpoint. Ctrl-C saves a checkpoint before exiting.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cdm.augment import blur_low_res, noise_low_res, sample_aug_levels, sr_cond
from cdm.cascade import Stage, build_stage, sample_cascade
from cdm.checkpoint import (CLASSIFIER, FORMAT_VERSION, STAGES, checkpoint_config, load_checkpoint,
                            load_state, save_checkpoint, stage_weights)
from cdm.config import Config, StageConfig
from cdm.data import downsample
from cdm.datasets import load_data
from cdm.distributed import DistInfo, any_rank, gather, setup, teardown
from cdm.diffusion import GaussianDiffusion, gaussian_noise
from cdm.errors import UserError
from cdm.grids import save_cascade_grids
from cdm.guidance import drop_labels
from cdm.noisy_classifier import NoisyClassifier, classifier_losses, classifier_stage_config
from cdm.runtime import autocast, git_commit, resolve_device, use_bf16
from cdm.unet import UNet, upsample_low_res


@dataclass
class TrainStage:
    name: str
    cfg: StageConfig
    model: UNet | NoisyClassifier  # the trained weights (uncompiled module: what is saved)
    forward: Callable  # model, or torch.compile(model)
    ema: UNet | NoisyClassifier  # exponential moving average of `model`, used for sampling
    optimizer: torch.optim.Optimizer
    diffusion: GaussianDiffusion


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def ema_decay(step: int, cfg: StageConfig) -> float:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)): early on the average
    forgets the random initial weights quickly, which matters in short runs."""
    return min(cfg.optim.ema_decay, (1 + step) / (10 + step))


def learning_rate(step: int, cfg: StageConfig) -> float:
    """Linear warm-up over warmup_steps, then constant."""
    warmup = cfg.optim.warmup_steps
    return cfg.optim.lr * min(1.0, (step + 1) / warmup) if warmup else cfg.optim.lr


def make_stage(cfg: Config, name: str, device: torch.device, compile_model: bool,
               channels_last: bool, data_parallel: bool = False) -> TrainStage:
    """A trainable part: a cascade stage, or the noisy classifier (on the base's forward process)."""
    if name == CLASSIFIER:
        stage_cfg = classifier_stage_config(cfg)
        model = NoisyClassifier(cfg).to(device)
        diffusion = GaussianDiffusion(cfg.base.diffusion, device)
    else:
        stage_cfg = getattr(cfg, name)
        model, diffusion = build_stage(cfg, name, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage_cfg.optim.lr,  # fused: CPU and CUDA
                                  weight_decay=stage_cfg.optim.weight_decay, fused=True)
    forward = model
    if data_parallel:  # gradients are averaged across ranks during backward
        forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if compile_model:
        forward = torch.compile(forward)
    return TrainStage(name, stage_cfg, model, forward, ema, optimizer, diffusion)


class StepStats(NamedTuple):
    losses: torch.Tensor  # (B,) per-example loss
    t: torch.Tensor  # (B,) their timesteps
    grad_norm: torch.Tensor  # () global gradient norm before clipping
    skipped: torch.Tensor  # () bool: the loss or gradient was not finite, no update was made


def draw_t_and_noise(stage: TrainStage, x0: torch.Tensor, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform timesteps t (B,) in [0, T-1] and standard normal noise shaped like x0."""
    t = torch.randint(0, stage.diffusion.num_timesteps, (x0.shape[0],), generator=generator,
                      device=generator.device).to(x0.device)
    return t, gaussian_noise(x0, generator)


def train_step(stage: TrainStage, x0: torch.Tensor, cond: dict, step: int, bf16: bool,
               generator: torch.Generator) -> StepStats:
    """One optimizer step of a diffusion stage on clean images x0 (B, C, H, W)."""
    t, noise = draw_t_and_noise(stage, x0, generator)
    with autocast(x0.device, bf16):
        losses = stage.diffusion.training_loss(stage.forward, x0, t, cond, noise)  # (B,)
    return optimizer_step(stage, losses, t, step)


def classifier_step(stage: TrainStage, x0: torch.Tensor, y: torch.Tensor, step: int, bf16: bool,
                    generator: torch.Generator) -> StepStats:
    """One optimizer step of the noisy classifier on base-size images x0 (B, C, h, w), labels y."""
    t, noise = draw_t_and_noise(stage, x0, generator)
    with autocast(x0.device, bf16):
        losses = classifier_losses(stage.forward, stage.diffusion, x0, y, t, noise)  # (B,)
    return optimizer_step(stage, losses, t, step)


def optimizer_step(stage: TrainStage, losses: torch.Tensor, t: torch.Tensor, step: int) -> StepStats:
    """Backward, clip, AdamW and EMA for per-example losses (B,), with no host sync: a non-finite
    gradient norm makes the fused AdamW skip its update on the device (its `found_inf` flag, as
    GradScaler uses it)."""
    for group in stage.optimizer.param_groups:
        group["lr"] = learning_rate(step, stage.cfg)
    stage.optimizer.zero_grad(set_to_none=True)
    losses.mean().backward()
    clip = stage.cfg.optim.grad_clip or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(stage.model.parameters(), clip)
    skipped = ~torch.isfinite(grad_norm)
    stage.optimizer.found_inf = skipped.float()
    stage.optimizer.step()
    ema_update(stage.ema, stage.model, ema_decay(step, stage.cfg))
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


def preview(stages: dict[str, TrainStage], cfg: Config, step: int, bf16: bool) -> float:
    """Draw num_preview cascaded samples from the EMA weights with a fixed seed (so grids can be
    compared across steps) and write the three grids; returns the seconds it took."""
    start = time.perf_counter()
    device = next(stages["base"].ema.parameters()).device
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)
    samples = sample_cascade(
        *(Stage(stages[n].ema, stages[n].diffusion, stages[n].cfg.sampler) for n in STAGES),
        num=cfg.train.num_preview, aug_level=cfg.augment.aug_level, aug_mode=cfg.augment.aug_mode,
        generator=generator, batch_size=cfg.train.num_preview, bf16=bf16)
    save_cascade_grids(samples, cfg.run_dir / "samples", suffix=f"_step{step:06d}")
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
    for name, stage in stages.items():
        payload[name] = {"model": stage.model.state_dict(), "ema": stage.ema.state_dict(),
                         "optimizer": stage.optimizer.state_dict()}
    return payload


def restore(path: str | Path, cfg: Config, stages: dict[str, TrainStage],
            generator: torch.Generator, info: DistInfo) -> tuple[int, dict]:
    """Load weights, EMA, optimizers and RNG states from a checkpoint; returns (step, metrics)."""
    ckpt = load_checkpoint(path, "cpu", parts=tuple(stages))
    stored = checkpoint_config(ckpt, path)
    for name in stages:
        if getattr(stored, name).model != getattr(cfg, name).model:
            raise UserError(f"--resume '{path}': its {name}.model config differs from this run's; "
                            f"resume with the checkpoint's own config (no --config)")
        stage = stages[name]
        for part, target in (("model", stage.model), ("ema", stage.ema), ("optimizer", stage.optimizer)):
            load_state(target, stage_weights(ckpt, name, part, path), path, f"{name} {part} state")
    if len(ckpt["rng"]) != info.world_size:
        raise UserError(f"--resume '{path}': it was saved by {len(ckpt['rng'])} process(es); resume "
                        f"with the same number (this run has {info.world_size})")
    rng = ckpt["rng"][info.rank]
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(ckpt["step"]), dict(ckpt.get("metrics", {}))


def write_run_info(cfg: Config, device: torch.device) -> None:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "run_info.json").write_text(json.dumps(
        {"git_commit": git_commit(), "torch": torch.__version__, "device": str(device),
         "threads": torch.get_num_threads()}, indent=1))


def cascade_step(stages: dict[str, TrainStage], cfg: Config, hr: torch.Tensor, y: torch.Tensor,
                 step: int, bf16: bool, generator: torch.Generator) -> dict[str, StepStats]:
    """One step of both stages on one batch of 32x32 digits hr (B, C, 32, 32), labels y (B,)."""
    base, sr, aug = stages["base"], stages["sr"], cfg.augment
    lr_img = downsample(hr, cfg.base.image_size)  # (B, C, 8, 8)

    # base stage: learn the 8x8 images
    nb = base.cfg.optim.batch_size
    base_cond = {"y": stage_labels(y[:nb], cfg.base, generator)} if cfg.base.model.num_classes else {}
    base_stats = train_step(base, lr_img[:nb], base_cond, step, bf16, generator)

    # SR stage: learn 32x32 given the blurred and noised 8x8 version (CDM section 4)
    ns = sr.cfg.optim.batch_size
    levels = sample_aug_levels(ns, aug.max_level, generator, hr.device)  # (Bs,)
    z = blur_low_res(lr_img[:ns], aug.blur_prob, aug.blur_sigma, generator)
    z = noise_low_res(z, levels, base.diffusion, generator)  # z_s, (Bs, C, 8, 8)
    target = hr[:ns]
    if sr.cfg.optim.crop_size:  # patches: crop the target and the resized conditioning alike
        z = upsample_low_res(z, cfg.sr.image_size, cfg.sr.model.upsample_mode)  # (Bs, C, 32, 32)
        target, z = random_crop([target, z], sr.cfg.optim.crop_size, generator)
    cond = sr_cond(z, levels, stage_labels(y[:ns], cfg.sr, generator) if cfg.sr.model.num_classes else None)
    sr_device = next(sr.model.parameters()).device  # another GPU with train.split_stages
    target, cond = target.to(sr_device), {k: v.to(sr_device) for k, v in cond.items()}
    return {"base": base_stats, "sr": train_step(sr, target, cond, step, bf16, generator)}


def stage_labels(y: torch.Tensor, stage: StageConfig, generator: torch.Generator) -> torch.Tensor:
    """A conditional stage's training labels (B,), with label dropout to the null label."""
    return drop_labels(y, stage.model.label_dropout, stage.model.num_classes, generator)


def run_step(stages: dict[str, TrainStage], cfg: Config, hr: torch.Tensor, y: torch.Tensor,
             step: int, bf16: bool, generator: torch.Generator) -> dict[str, StepStats]:
    """One step of every part this run trains, all on the same batch."""
    stats = cascade_step(stages, cfg, hr, y, step, bf16, generator) if "base" in stages else {}
    if CLASSIFIER in stages:  # the classifier sees the base stage's images, in [-1, 1]
        n = stages[CLASSIFIER].cfg.optim.batch_size
        x0 = downsample(hr[:n], cfg.base.image_size)  # (Bc, C, 8, 8)
        stats[CLASSIFIER] = classifier_step(stages[CLASSIFIER], x0, y[:n], step, bf16, generator)
    return stats


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a flag the loop checks between steps, so the step in
    flight completes and a consistent checkpoint is saved; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def split_devices(device: torch.device, info: DistInfo) -> tuple[torch.device, torch.device]:
    """train.split_stages: the base stage on GPU 2k and the SR stage on GPU 2k+1 (k = local
    rank). The batch is drawn on the base GPU and the SR inputs are copied over; kernels of the
    two stages then run concurrently on their two GPUs."""
    needed = 2 * (info.local_rank + 1)
    if device.type != "cuda" or torch.cuda.device_count() < needed:
        raise UserError(f"train.split_stages needs {needed} CUDA devices for this process "
                        f"(found {torch.cuda.device_count() if device.type == 'cuda' else 0})")
    return torch.device("cuda", 2 * info.local_rank), torch.device("cuda", 2 * info.local_rank + 1)


def train(cfg: Config, resume: str | Path | None = None, progress: bool = True,
          parts: tuple[str, ...] | None = None) -> Path:
    """Train for cfg.train.steps steps; returns the final checkpoint's path. `parts`: what to
    train, by default both stages plus the classifier when the config has one; (CLASSIFIER,)
    trains the classifier alone. Under torchrun, every rank runs this (see cdm/distributed.py)."""
    if parts is None:
        parts = STAGES + ((CLASSIFIER,) if cfg.classifier is not None else ())
    # --- choose-once settings
    info, device = setup(resolve_device(cfg.device), cfg.train.split_stages)
    try:
        return _train(cfg, resume, progress, info, device, parts)
    finally:
        teardown(info)


def _train(cfg: Config, resume, progress: bool, info: DistInfo, device: torch.device,
           parts: tuple[str, ...]) -> Path:
    torch.manual_seed(cfg.seed + info.rank)
    generator = torch.Generator(device).manual_seed(cfg.seed + info.rank)  # data order, t, noise, aug
    bf16 = use_bf16(cfg.train.precision, device)
    compile_model = cfg.train.compile == "always" or (cfg.train.compile == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data (this rank's slice), models, optimizers, optional resume
    data = load_data(cfg.data.dataset, cfg.data_root, cfg.data.download, cfg.sr.image_size,
                     cfg.data.channels, device=device, max_resident_mb=cfg.data.max_resident_mb,
                     workers=cfg.data.workers)
    if info.enabled:
        data = data.shard(info.rank, info.world_size)
    base_device, sr_device = split_devices(device, info) if cfg.train.split_stages else (device, device)
    devices = {"base": base_device, "sr": sr_device, CLASSIFIER: base_device}
    stages = {name: make_stage(cfg, name, devices[name], compile_model, cfg.train.channels_last,
                               info.enabled) for name in parts}
    step, metrics = 0, {"skipped_steps": 0, "train_seconds": 0.0, "preview_seconds": 0.0}
    if resume is not None:
        step, metrics = restore(resume, cfg, stages, generator, info)
    if info.is_main:
        write_run_info(cfg, device)
    ckpt_path = cfg.run_dir / "checkpoint.pt"
    meters = {name: StageMeter(stage.diffusion.num_timesteps, device) for name, stage in stages.items()}
    batch = max(stage.cfg.optim.batch_size for stage in stages.values())

    def save() -> Path:
        rng_states = gather(info, rng_state(generator))  # every rank takes part
        if info.is_main:
            save_checkpoint(checkpoint_payload(cfg, stages, step, rng_states, metrics), ckpt_path)
        return ckpt_path

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
    interrupted = False
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
                        row[f"{name}_lr"] = learning_rate(step - 1, stages[name].cfg)
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    check_finite(row, stages, window_steps, step, metrics, ckpt_path)
                    bar.set_postfix(**{name: f"{row[f'{name}_loss']:.4f}" for name in stages},
                                    img_s=f"{row['images_per_s']:.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if info.is_main and cfg.train.sample_every and "base" in stages and (
                        step % cfg.train.sample_every == 0 or step == cfg.train.steps):
                    seconds = preview(stages, cfg, step, bf16)
                    metrics["preview_seconds"] += seconds
                    window_start += seconds  # images/s counts training time only
                if step % cfg.train.save_every == 0:
                    save()
                if stop_now(stop.requested):
                    interrupted = True
                    break
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory at step {step} with batch {batch}: lower "
                            f"base.optim.batch_size / sr.optim.batch_size (e.g. --set "
                            f"sr.optim.batch_size={max(1, batch // 2)}) and resume from "
                            f"{ckpt_path}") from None
        finally:
            bar.close()
    metrics["train_seconds"] += time.perf_counter() - session_start
    path = save()
    if interrupted:
        if info.is_main:
            print(f"interrupted at step {step}: saved {path}; continue with "
                  f"python train_mnist.py --resume {path}")
        raise SystemExit(130)
    if info.is_main:
        share = 100 * metrics["preview_seconds"] / max(metrics["train_seconds"], 1e-9)
        grids = f"; grids in {cfg.run_dir / 'samples'}" if "base" in stages else ""
        print(f"done: {step} steps in {metrics['train_seconds']:.0f}s (previews {share:.1f}% of it); "
              f"checkpoint {path}{grids}")
    return path
