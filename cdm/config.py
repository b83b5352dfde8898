"""Configuration: a typed dataclass tree loaded from YAML and validated once.

Every field has a default and a comment. `load_config(path, overrides)` reads a YAML file,
applies `--set key.path=value` overrides, rejects unknown keys and wrong types, and runs the
cross-field checks in `Config.validate()`. Any problem raises `ConfigError` with one line that
names the key and what is expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cdm.errors import UserError

DATA_ROOT_ENV = "CDM_DATA_ROOT"  # environment variable that overrides data.root
DATASETS = ("mnist", "fashion_mnist", "cifar10", "image_folder")
MAX_EMA_STD = 0.28  # the widest power-function EMA: sigma_rel of gamma = 0 (a plain mean) is 0.289


class ConfigError(UserError):
    """A config file, key or value a user must fix."""


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | fashion_mnist | cifar10 (torchvision) | image_folder
    root: str = "data"  # torchvision sets: their folder ($CDM_DATA_ROOT overrides it); image_folder:
    # the folder of images (sub-folders, if any, are the classes)
    download: bool = True  # fetch a torchvision data set into `root` when it is missing
    channels: int = 1  # 1 grey, 3 RGB (grey data is repeated, RGB data turned to luminance for 1)
    max_resident_mb: float = 2048  # image_folder: larger sets stream from disk through workers
    workers: int = 2  # DataLoader worker processes for a streamed image_folder
    class_prior: list[float] | None = None  # each class's share when sampling asks for no class
    # (p(y) of p(x) = sum_y p(y) p(x | y)); null: training counts the training labels' shares


@dataclass
class ModelConfig:
    channels: int = 64  # width of the first UNet level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # width multiplier per level
    num_res_blocks: int = 2  # residual blocks per level (the decoder has one more)
    attention_resolutions: list[int] = field(default_factory=list)  # feature sizes with self-attention
    mid_attention: bool = True  # self-attention in the middle block (at the lowest resolution); off:
    # fully convolutional, so a stage trained on patches sees the same operations at full size
    num_heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout inside residual blocks
    norm_groups: int = 32  # GroupNorm groups (must divide every level's width)
    num_classes: int = 0  # >0: class-conditional, label embedding with a reserved null label
    label_dropout: float = 0.0  # training: fraction of labels replaced by the null label (for CFG)
    self_condition: bool = False  # also input its own previous x0 estimate (Chen et al. 2022)
    upsample_mode: str = "bilinear"  # SR stage: how the low-res input is resized (bilinear|bicubic)
    patch_size: int = 1  # >1: the UNet works on p x p patches folded into channels (pixel_unshuffle,
    # "simple diffusion", Hoogeboom et al. 2023): a 16x16 image at p = 2 costs about what an 8x8 one does


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T, number of forward-process steps
    schedule: str = "cosine"  # beta schedule: linear (DDPM) | cosine (Nichol & Dhariwal)
    log_snr_shift: float = 0.0  # added to log SNR(t) at every t (Hoogeboom et al. 2023): > 0 = less noise
    prediction: str = "v"  # what the UNet predicts: eps | v (Salimans & Ho 2022)
    loss_weight: str = "uniform"  # uniform (the plain MSE of eps or v) | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # min_snr: the x0-error weight min(SNR, gamma)
    noise_distribution: str = "uniform"  # training timesteps: uniform in [0, T-1] | lognormal (EDM)
    p_mean: float = -1.2  # lognormal: ln(sigma) ~ N(p_mean, p_std^2), sigma = sqrt((1 - abar) / abar)
    p_std: float = 1.2  # (Karras et al. 2022, Table 1: P_mean, P_std), taken to the first state at or above
    stratified: bool = False  # one training state in each 1/B-th of the distribution, not B independent
    # draws (the low-discrepancy sampler of Kingma et al. 2021): less noise in each batch's loss

    @property
    def forward_process(self) -> tuple[int, str, float]:
        """What q(x_t | x_0) depends on: a stage noised on this schedule (an SR stage's
        augmentation, a noisy classifier) fits any model trained with the same three."""
        return self.timesteps, self.schedule, self.log_snr_shift


@dataclass
class OptimConfig:
    batch_size: int = 64  # images per step for this stage (taken from the shared batch)
    lr: float = 2e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 200  # linear learning-rate warm-up
    lr_decay: str = "none"  # after warm-up: none (constant) | cosine (to zero at train.steps)
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    ema_decay: float = 0.999  # EMA of the weights; previews and sampling use the EMA copy
    crop_size: int = 0  # >0: train on random square patches of this size (SR stage); 0 = whole image
    posthoc_ema_std: list[float] = field(default_factory=list)  # relative stds of power-function EMAs
    # (Karras et al. 2024) tracked beside ema_decay's and saved every train.save_every steps to
    # output/<run>/ema_snapshots/, e.g. [0.05, 0.1], which python -m cdm.checkpoint posthoc mixes
    # into an EMA of any other length after training (cdm/ema.py); [] tracks none


@dataclass
class SamplerConfig:
    name: str = "ddim"  # ddpm (ancestral, DDPM Alg. 2) | ddim (Song et al. 2021) | dpm++2m (Lu et al.)
    steps: int = 50  # number of denoising steps (ddpm with steps < T uses a respaced chain)
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 matches DDPM's variance
    spacing: str = "uniform"  # the states a sampler visits: uniform in t, or quadratic (denser
    # near the clean end, Song et al. 2021 appendix D.2), whose last model call sees less noise
    clip_x0: bool = True  # clamp the predicted x0 to [-1, 1] at every step

    @property
    def label(self) -> str:
        """How sample.py and cdm.evaluate name it, e.g. dpm++2m-10 or dpm++2m-10 quadratic."""
        return f"{self.name}-{self.steps}" + f" {self.spacing}" * (self.spacing != "uniform")


@dataclass
class AugmentConfig:
    """Conditioning augmentation of an SR stage's low-res input (CDM section 4). The noise uses
    the *previous* stage's schedule, so `aug_level` s is that stage's state after s forward steps
    (0 = clean), and a truncated chain can hand its state s - 1 over unchanged."""

    max_level: int = 200  # training draws s uniformly from [0, max_level]
    aug_level: int = 0  # s used at sampling time (sample.py --aug-level overrides)
    aug_mode: str = "truncated"  # truncated | non_truncated (sample.py --aug-mode overrides)
    blur_prob: float = 0.5  # fraction of training examples whose low-res input is blurred
    blur_sigma: list[float] = field(default_factory=lambda: [0.4, 0.6])  # blur sigma range (LR pixels)


@dataclass
class StageConfig:
    """One stage of the cascade. stages[0] is the base (it generates from noise); every later
    stage super-resolves the output of the one before it."""

    image_size: int = 8  # resolution this stage generates
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig | None = None  # SR stages: how their low-res input is corrupted
    # (absent on an SR stage: the defaults; the base stage has no input and no section)


@dataclass
class ClassifierConfig:
    """The noisy classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021): the
    UNet's encoder half plus a pooling head, trained on x_t from the base stage's forward process
    at the base resolution. Its presence in a config trains it in the same run."""

    num_classes: int = 10  # classes it tells apart
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[4]))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=128, lr=1e-3))


@dataclass
class GuidanceConfig:
    """Sampling-time guidance of the base stage toward requested labels (sample.py overrides)."""

    classifier_scale: float = 3.0  # s of classifier guidance, used when a classifier is given
    # (README 9.6: on the unconditional CPU cascade s = 3 reads 98.9% as asked, with the best FD)
    cfg_scale: float = 0.0  # w of classifier-free guidance (needs a conditional, label-dropout model)
    redraw: int = 0  # with a noisy classifier (the checkpoint's own, or sample.py --classifier):
    # redraw base samples it reads as another class than asked, up to this many times
    redraw_confidence: float = 0.0  # ... also those it reads as asked with a probability below this


@dataclass
class TrainConfig:
    steps: int = 10000  # optimizer steps (every stage steps once per batch)
    max_minutes: float = 0.0  # >0: stop earlier, at the first step after this much training time
    # (previews excluded; summed over resumes): runs compared at equal wall time
    log_every: int = 50  # steps between log lines / metrics.jsonl rows
    sample_every: int = 1000  # steps between preview grids (0 disables)
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    num_preview: int = 64  # samples in each preview grid
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16
    compile: str = "auto"  # torch.compile the UNets: auto (on CUDA only) | always | never
    cuda_graphs: str = "auto"  # replay each stage's loss + backward as one CUDA graph: auto (on one
    # CUDA device, uncompiled, no DDP, split_stages or self-conditioning) | never
    channels_last: bool = True  # NHWC memory format for the convolutions
    split_stages: bool = False  # each stage on its own GPU (len(stages) GPUs per process)
    stages: list[int] = field(default_factory=list)  # the stages this run trains, e.g. [1, 2]
    # (consecutive indices; [] = all): train_mnist.py --stages, then python -m cdm.checkpoint combine


@dataclass
class Config:
    run_name: str = "cdm_mnist"  # output/<run_name>/ holds grids, checkpoint, metrics
    out_dir: str = "output"  # parent folder of all runs
    seed: int = 0  # seeds data order, noise, dropout: same seed -> same run on CPU
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [  # base first, then SR stages
        StageConfig(image_size=8), StageConfig(image_size=32, augment=AugmentConfig())])
    classifier: ClassifierConfig | None = None  # a section here trains a noisy classifier too
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        for stage in self.stages[1:]:  # an SR stage without an augment: section gets the defaults
            if stage.augment is None:
                stage.augment = AugmentConfig()

    def validate(self) -> "Config":
        """Cross-field checks; raises ConfigError naming the first bad key."""
        _check(self.data.dataset in DATASETS, "data.dataset", ", ".join(DATASETS), self.data.dataset)
        _check(self.data.channels in (1, 3), "data.channels", "1 or 3", self.data.channels)
        _check(self.data.max_resident_mb >= 0, "data.max_resident_mb", ">= 0", self.data.max_resident_mb)
        _check(self.data.workers >= 0, "data.workers", ">= 0", self.data.workers)
        _check(len(self.stages) >= 1, "stages", "a list of at least one stage (the base)", self.stages)
        prior, classes = self.data.class_prior, self.num_labels
        _check(prior is None or (len(prior) == classes > 0 and min(prior) >= 0 and sum(prior) > 0),
               "data.class_prior", f"null or {classes} shares >= 0, one per class, not all 0" if classes
               else "null (nothing in this cascade is class-conditional)", prior)
        for i, stage in enumerate(self.stages):
            _validate_stage(stage, i, self.stages[i - 1] if i else None)
        if self.classifier is not None:
            c = self.classifier
            _check(c.num_classes >= 2, "classifier.num_classes", ">= 2", c.num_classes)
            _check(c.model.num_classes == 0, "classifier.model.num_classes",
                   "0 (the classifier predicts labels; it is not conditioned on them)",
                   c.model.num_classes)
            _validate_model(c.model, self.base.image_size, "classifier")
            _validate_optim(c.optim, "classifier")
        g = self.guidance
        _check(g.classifier_scale >= 0, "guidance.classifier_scale", ">= 0", g.classifier_scale)
        _check(g.cfg_scale >= 0, "guidance.cfg_scale", ">= 0", g.cfg_scale)
        _check(g.redraw >= 0, "guidance.redraw", ">= 0", g.redraw)
        _check(0 <= g.redraw_confidence < 1, "guidance.redraw_confidence", "in [0, 1)", g.redraw_confidence)
        _check(g.cfg_scale == 0 or self.null_label_learned,
               "guidance.cfg_scale", "0 unless stages.0.model.label_dropout > 0, and so for every "
               "class-conditional stage (without it the null label is never learned)", g.cfg_scale)
        t = self.train
        _check(t.steps > 0, "train.steps", "> 0", t.steps)
        _check(t.max_minutes >= 0, "train.max_minutes", ">= 0 (0: no limit)", t.max_minutes)
        for key in ("log_every", "save_every"):
            _check(getattr(t, key) > 0, f"train.{key}", "> 0", getattr(t, key))
        _check(t.sample_every >= 0, "train.sample_every", ">= 0 (0 disables)", t.sample_every)
        _check(t.num_preview > 0, "train.num_preview", "> 0", t.num_preview)
        indices = list(range(len(self.stages)))
        _check(not t.stages or (set(t.stages) <= set(indices)
                                and t.stages == list(range(t.stages[0], t.stages[0] + len(t.stages)))),
               "train.stages", f"[] (all) or consecutive, ascending stage indices from {indices}", t.stages)
        _check(t.precision in ("auto", "fp32", "bf16"), "train.precision", "auto, fp32 or bf16",
               t.precision)
        _check(t.compile in ("auto", "always", "never"), "train.compile", "auto, always or never",
               t.compile)
        _check(t.cuda_graphs in ("auto", "never"), "train.cuda_graphs", "auto or never", t.cuda_graphs)
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", "auto, cpu, cuda or cuda:N", self.device)
        _check(bool(self.run_name) and "/" not in self.run_name, "run_name",
               "a non-empty folder name without '/'", self.run_name)
        return self

    @property
    def base(self) -> StageConfig:
        """stages[0], the stage that generates from noise (guidance and the classifier use it)."""
        return self.stages[0]

    @property
    def num_labels(self) -> int:
        """How many classes sampling can ask for: the first class-conditional stage's, else the
        noisy classifier's, else 0."""
        return next((s.model.num_classes for s in self.stages if s.model.num_classes),
                    self.classifier.num_classes if self.classifier else 0)

    @property
    def without_null_label(self) -> list[int]:
        """Class-conditional stages trained without label dropout: they never learned the null
        label that classifier-free guidance and unconditional sampling feed them."""
        return [i for i, s in enumerate(self.stages) if s.model.num_classes and not s.model.label_dropout]

    @property
    def null_label_learned(self) -> bool:
        """Classifier-free guidance and unconditional sampling can run: the base is class-conditional
        with label dropout, and so is every other class-conditional stage."""
        return self.base.model.label_dropout > 0 and not self.without_null_label

    @property
    def trained_stages(self) -> list[int]:
        """The indices of the stages this run trains (train.stages, or all)."""
        return self.train.stages or list(range(len(self.stages)))

    @property
    def data_root(self) -> str:
        """data.root, unless the CDM_DATA_ROOT environment variable is set (it names where the
        torchvision data sets live, so it never replaces an image_folder's path)."""
        if self.data.dataset == "image_folder":
            return self.data.root
        return os.environ.get(DATA_ROOT_ENV) or self.data.root

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


AUG_MODES = ("truncated", "non_truncated")
SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
NOISE_DISTRIBUTIONS = ("uniform", "lognormal")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SPACINGS = ("uniform", "quadratic")


def _check(ok: bool, key: str, expected: str, got) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}")


def _validate_stage(stage: StageConfig, i: int, prev: StageConfig | None) -> None:
    """One stage's keys, named stages.<i>.<key>; an SR stage is also checked against the stage
    before it (prev), whose output it super-resolves."""
    name = f"stages.{i}"
    m, d, o, s = stage.model, stage.diffusion, stage.optim, stage.sampler
    _check(stage.image_size >= 4, f"{name}.image_size", ">= 4", stage.image_size)
    _validate_model(m, stage.image_size, name)
    _check(d.timesteps >= 2, f"{name}.diffusion.timesteps", ">= 2", d.timesteps)
    _check(d.schedule in SCHEDULES, f"{name}.diffusion.schedule", " or ".join(SCHEDULES), d.schedule)
    _check(math.isfinite(d.log_snr_shift) and abs(d.log_snr_shift) <= 10, f"{name}.diffusion.log_snr_shift",
           "a number in [-10, 10]", d.log_snr_shift)
    _check(d.prediction in PREDICTIONS, f"{name}.diffusion.prediction", " or ".join(PREDICTIONS),
           d.prediction)
    _check(d.loss_weight in ("uniform", "min_snr"), f"{name}.diffusion.loss_weight", "uniform or min_snr",
           d.loss_weight)
    _check(d.min_snr_gamma > 0, f"{name}.diffusion.min_snr_gamma", "> 0", d.min_snr_gamma)
    _check(d.noise_distribution in NOISE_DISTRIBUTIONS, f"{name}.diffusion.noise_distribution",
           " or ".join(NOISE_DISTRIBUTIONS), d.noise_distribution)
    _check(d.p_std > 0, f"{name}.diffusion.p_std", "> 0", d.p_std)
    _validate_optim(o, name)
    _check(s.name in SAMPLERS, f"{name}.sampler.name", " or ".join(SAMPLERS), s.name)
    _check(1 <= s.steps <= d.timesteps, f"{name}.sampler.steps",
           f"in [1, {name}.diffusion.timesteps = {d.timesteps}]", s.steps)
    _check(0.0 <= s.eta <= 1.0, f"{name}.sampler.eta", "in [0, 1]", s.eta)
    _check(s.spacing in SPACINGS, f"{name}.sampler.spacing", " or ".join(SPACINGS), s.spacing)
    if prev is None:
        _check(stage.augment is None, f"{name}.augment",
               "no augment section on the base stage (it has no low-res input)", stage.augment)
        _check(o.crop_size == 0, f"{name}.optim.crop_size", "0 (patches are for SR stages)", o.crop_size)
        return
    _check(stage.image_size > prev.image_size and stage.image_size % prev.image_size == 0,
           f"{name}.image_size", f"a multiple of stages.{i - 1}.image_size ({prev.image_size}), "
           f"larger than it", stage.image_size)
    _check(m.upsample_mode in ("bilinear", "bicubic"), f"{name}.model.upsample_mode",
           "bilinear or bicubic", m.upsample_mode)
    if o.crop_size:
        scale = stage.image_size // prev.image_size
        levels = m.patch_size * 2 ** (len(m.channel_mult) - 1)
        _check(o.crop_size <= stage.image_size and o.crop_size % scale == 0 and o.crop_size % levels == 0,
               f"{name}.optim.crop_size", f"0 or a size <= {stage.image_size} divisible by {scale} "
               f"and by {levels}", o.crop_size)
    a, T = stage.augment, prev.diffusion.timesteps
    _check(0 <= a.max_level <= T, f"{name}.augment.max_level",
           f"in [0, stages.{i - 1}.diffusion.timesteps = {T}] (levels on the previous stage's schedule)",
           a.max_level)
    _check(0 <= a.aug_level <= a.max_level, f"{name}.augment.aug_level",
           f"in [0, {name}.augment.max_level = {a.max_level}]", a.aug_level)
    _check(a.aug_mode in AUG_MODES, f"{name}.augment.aug_mode", " or ".join(AUG_MODES), a.aug_mode)
    _check(0.0 <= a.blur_prob <= 1.0, f"{name}.augment.blur_prob", "in [0, 1]", a.blur_prob)
    _check(len(a.blur_sigma) == 2 and 0 < a.blur_sigma[0] <= a.blur_sigma[1],
           f"{name}.augment.blur_sigma", "[low, high] with 0 < low <= high", a.blur_sigma)


def _validate_model(m: ModelConfig, image_size: int, name: str) -> None:
    _check(m.channels > 0, f"{name}.model.channels", "> 0", m.channels)
    _check(len(m.channel_mult) > 0 and all(c > 0 for c in m.channel_mult),
           f"{name}.model.channel_mult", "a non-empty list of positive ints", m.channel_mult)
    _check(m.patch_size >= 1, f"{name}.model.patch_size", ">= 1", m.patch_size)
    down = m.patch_size * 2 ** (len(m.channel_mult) - 1)
    _check(image_size % down == 0, f"{name}.image_size",
           f"divisible by patch_size * 2**(len(channel_mult)-1) = {down}", image_size)
    reached = [image_size // m.patch_size // 2 ** i for i in range(len(m.channel_mult))]
    for r in m.attention_resolutions:
        _check(r in reached, f"{name}.model.attention_resolutions",
               f"resolutions this UNet reaches {reached}", m.attention_resolutions)
    _check(m.num_res_blocks >= 1, f"{name}.model.num_res_blocks", ">= 1", m.num_res_blocks)
    _check(m.num_heads >= 1, f"{name}.model.num_heads", ">= 1", m.num_heads)
    for mult in m.channel_mult:
        width = m.channels * mult
        _check(width % m.norm_groups == 0, f"{name}.model.norm_groups",
               f"a divisor of every level's width ({width} at mult {mult})", m.norm_groups)
        if m.attention_resolutions or m.mid_attention:
            _check(width % m.num_heads == 0, f"{name}.model.num_heads",
                   f"a divisor of every level's width ({width})", m.num_heads)
    _check(0.0 <= m.dropout < 1.0, f"{name}.model.dropout", "in [0, 1)", m.dropout)
    _check(m.num_classes >= 0, f"{name}.model.num_classes", ">= 0", m.num_classes)
    _check(0.0 <= m.label_dropout < 1.0, f"{name}.model.label_dropout", "in [0, 1)", m.label_dropout)
    _check(m.label_dropout == 0 or m.num_classes > 0, f"{name}.model.label_dropout",
           "0 unless model.num_classes > 0 (there are no labels to drop)", m.label_dropout)


def _validate_optim(o: OptimConfig, name: str) -> None:
    _check(o.batch_size >= 1, f"{name}.optim.batch_size", ">= 1", o.batch_size)
    _check(o.lr > 0, f"{name}.optim.lr", "> 0", o.lr)
    _check(o.weight_decay >= 0, f"{name}.optim.weight_decay", ">= 0", o.weight_decay)
    _check(o.warmup_steps >= 0, f"{name}.optim.warmup_steps", ">= 0", o.warmup_steps)
    _check(o.lr_decay in ("none", "cosine"), f"{name}.optim.lr_decay", "none or cosine", o.lr_decay)
    _check(o.grad_clip >= 0, f"{name}.optim.grad_clip", ">= 0 (0 disables)", o.grad_clip)
    _check(0.0 <= o.ema_decay < 1.0, f"{name}.optim.ema_decay", "in [0, 1)", o.ema_decay)
    _check(o.crop_size >= 0, f"{name}.optim.crop_size", ">= 0", o.crop_size)
    _check(all(0 < std <= MAX_EMA_STD for std in o.posthoc_ema_std) and
           len(set(o.posthoc_ema_std)) == len(o.posthoc_ema_std), f"{name}.optim.posthoc_ema_std",
           f"distinct relative stds in (0, {MAX_EMA_STD}]", o.posthoc_ema_std)


# ----------------------------------------------------------------------------- loading


def from_dict(cls, data, prefix: str = "", base=None):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types. Keys not
    given keep the values of `base` (default: cls()), so a partial section keeps the defaults of
    its parent; each item of a list of sections (`stages:`) starts from that section's defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key in OLD_KEYS and cls is Config:
            raise ConfigError(f"config key '{key}': {OLD_KEYS[key]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}; valid keys here: "
                              f"{', '.join(names)}")
        section = _optional_section(hints[key])
        item = typing.get_args(hints[key])[0] if typing.get_origin(hints[key]) is list else None
        if dataclasses.is_dataclass(item):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"config key '{path}': expected a non-empty list of sections, got {value!r}")
            kwargs[key] = [from_dict(item, v, f"{path}.{i}.") for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = from_dict(hints[key], value, path + ".", getattr(base, key))
        elif section is not None:  # an optional section: absent (None) or built from its defaults
            kwargs[key] = None if value is None else from_dict(section, value, path + ".",
                                                                getattr(base, key))
        else:
            kwargs[key] = _coerce(hints[key], value, path)
    return dataclasses.replace(base, **kwargs)


def _optional_section(hint):
    """The dataclass D of a `D | None` type hint, else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 \
            and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _coerce(hint, value, path: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(inner, value, path)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}': expected a list of {item.__name__}, "
                              f"got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"config key '{path}': expected {hint.__name__}, got {value!r}")
    return value


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `key.path=value` (value parsed as YAML) to a nested dict, in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{assignment}': expected key.path=value, "
                          f"e.g. train.steps=200")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part, last in zip(parts, [False] * (len(parts) - 1) + [True]):
        if isinstance(node, list):  # stages.1.optim.lr: an index into a list of sections
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"override '{assignment}': '{part}' is not an index of this "
                                  f"list (0..{len(node) - 1})")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{assignment}': '{part}' is inside a value, not a section")
        if last:
            node[part] = value
        elif isinstance(node, list) or part in node:
            node = node[part]
        else:
            node = node.setdefault(part, {})


OLD_KEYS = {k: "the cascade is now a list of stages: write 'stages:' with the base as its first item "
                 "and each SR stage (with its own 'augment:') after it, as configs/cdm_mnist_cpu.yaml "
                 "does; in --set, base.* is stages.0.* and sr.* stages.1.*"
            for k in ("base", "sr", "augment")}


def upgrade_config_dict(data: dict) -> dict:
    """A stored config of format 1 (two stages as `base:`, `sr:` and `augment:`) as today's
    `stages:` list; a config that has `stages:` is returned as it is."""
    if "stages" in data or not OLD_KEYS.keys() & data.keys():
        return data
    data = dict(data)
    base, sr = data.pop("base", {}), dict(data.pop("sr", {}))
    sr.setdefault("image_size", 32)  # format 1's default SR size
    sr["augment"] = data.pop("augment", {})
    data["stages"] = [base, sr]
    return data


def config_from_dict(data: dict) -> Config:
    return from_dict(Config, data).validate()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"config file '{path}': cannot read it ({err.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}': not valid YAML ({err})".replace("\n", " "))
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': expected a mapping of sections at the top")
    if "stages" not in data:  # overrides such as stages.1.optim.lr index the default list
        data["stages"] = [dataclasses.asdict(stage) for stage in Config().stages]
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)
