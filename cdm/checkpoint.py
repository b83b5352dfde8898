"""One self-describing checkpoint file for the whole cascade.

Layout (a plain dict of tensors, numbers and strings, loadable with weights_only=True):
  format_version  int, FORMAT_VERSION
  config          Config.to_dict(): enough to rebuild every stage without other input
  step            optimizer steps done by the run that wrote it
  stages          {index: {"model": state_dict, "ema": state_dict, "optimizer": state_dict,
                   "step": steps this stage trained}} for the stages the run trained (all, or
                   train.stages); `combine` merges files that trained different stages. A stage
                   with optim.posthoc_ema_std also has "power_ema": {std: state_dict}, and the
                   run writes those alone to <run>/ema_snapshots/<step>.pt (same layout) for `posthoc`
  classifier      {"model", "ema", "optimizer"} of the noisy classifier, when the run trained one
  rng             {"torch": CPU RNG state, "cuda": [per-device states], "generator": the
                   training generator's state}
  metrics         {"skipped_steps": int, ...}
Files are written atomically: to a temporary file in the same folder, fsynced, then renamed over
the old one, so a crash or a full disk mid-write leaves the previous checkpoint intact.
Format 1 files (two stages stored as `base` and `sr`) are converted when loaded.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from cdm.config import (MAX_EMA_STD, Config, ConfigError, apply_override, config_from_dict,
                        upgrade_config_dict)
from cdm.ema import posthoc_weights, profile_error
from cdm.errors import ArgumentParser, UserError, run_cli

FORMAT_VERSION = 2
CLASSIFIER = "classifier"  # the noisy classifier for guidance (cdm/noisy_classifier.py)
SNAPSHOT_DIR = "ema_snapshots"  # beside a run's checkpoint.pt: its power-function EMA snapshots


class CheckpointError(UserError):
    """A checkpoint file that cannot be used, with the reason."""


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write `payload` to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"could not write checkpoint '{path}' ({err.strerror}); "
                            f"the previous checkpoint, if any, is untouched") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    stages: list[int] | None = None, classifier: bool = False) -> dict:
    """Load and check a checkpoint; raises CheckpointError with one line on any problem.
    `stages`: the stage indices it must hold (default: every stage of its config); `classifier`:
    it must hold a noisy classifier. Uses torch.load(weights_only=True): no code from the file
    is run. A format 1 file is converted in memory."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}': no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint '{path}': not a torch checkpoint file (truncated, "
                              f"corrupted or another format)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"checkpoint '{path}': cannot be read as a cdm checkpoint "
                              f"(corrupted, or holds more than tensors and plain data): {reason}") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"checkpoint '{path}': not a cdm checkpoint (no format_version)")
    version = ckpt["format_version"]
    if version == 1:
        ckpt = upgrade_v1(ckpt)
    elif version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}': format version {version} is not supported "
                              f"by this cdm (it reads versions 1 and {FORMAT_VERSION}); update cdm")
    missing = [k for k in ("config", "step", "stages") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint '{path}': missing entries {missing}")
    if stages is None:
        stages = list(range(len(ckpt["config"].get("stages", []))))
    absent = [i for i in stages if i not in ckpt["stages"]]
    if absent:
        held = sorted(ckpt["stages"])
        raise CheckpointError(f"checkpoint '{path}': holds stages {held}, not {absent} (it was "
                              f"trained with --stages {','.join(map(str, held))}); combine it with "
                              f"the other stages first: python -m cdm.checkpoint combine A.pt B.pt OUT.pt")
    if classifier and CLASSIFIER not in ckpt:
        raise CheckpointError(f"checkpoint '{path}': holds no noisy classifier (only runs whose "
                              f"config has a classifier: section train one)")
    return ckpt


def upgrade_v1(ckpt: dict) -> dict:
    """A format 1 checkpoint (entries `base` and `sr`, config keys base/sr/augment) in today's
    layout: stages {0: base, 1: sr}, the config's `stages:` list."""
    ckpt = dict(ckpt, format_version=FORMAT_VERSION)
    ckpt["stages"] = {i: dict(ckpt.pop(name), step=ckpt.get("step", 0))
                      for i, name in enumerate(("base", "sr")) if name in ckpt}
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = upgrade_config_dict(ckpt["config"])
    return ckpt


def checkpoint_config(ckpt: dict, path: str | os.PathLike) -> Config:
    """The Config stored in a checkpoint, validated."""
    try:
        return config_from_dict(ckpt["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint '{path}': its stored config is invalid: {err}") from None


def export_ema(src: str | os.PathLike, dst: str | os.PathLike, overrides: list[str] = (),
               dtype=torch.bfloat16) -> Path:
    """A small file for sampling only: config, step, metrics and each stage's EMA weights in
    `dtype` (no raw weights, optimizer or RNG state, so it cannot be resumed). `overrides`
    (key=value) may change sampling defaults such as augment.aug_level."""
    ckpt = load_checkpoint(src)
    out = {k: ckpt[k] for k in ("format_version", "step", "metrics") if k in ckpt}
    config = checkpoint_config(ckpt, src).to_dict()
    for assignment in overrides:
        apply_override(config, assignment)
    out["config"] = config_from_dict(config).to_dict()

    def small(entry: dict) -> dict:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in entry["ema"].items()}

    out["stages"] = {i: {"ema": small(entry), "step": entry["step"]} for i, entry in ckpt["stages"].items()}
    if CLASSIFIER in ckpt:
        out[CLASSIFIER] = {"ema": small(ckpt[CLASSIFIER])}
    return save_checkpoint(out, dst)


def combine(paths: list[str | os.PathLike], dst: str | os.PathLike) -> Path:
    """One cascade from files that trained different stages (train.stages / --stages): each
    stage, and its part of the config, comes from the last file that holds it (so a later file
    can replace a stage of a whole cascade, e.g. a retrained SR stage); everything else (data,
    guidance, train, the classifier, RNG state) from the first file. The cascade has as many
    stages as the longest file's config, so the base of a 2-stage file can start a 3-stage
    cascade whose SR stages trained apart. Refuses files that contribute no stage and stages
    that do not chain: a stage must have been trained on exactly the sizes, channels and
    schedule of the stage before it that the combined cascade uses."""
    ckpts = [load_checkpoint(p, stages=[]) for p in paths]
    configs = [checkpoint_config(c, p) for c, p in zip(ckpts, paths)]
    owner: dict[int, int] = {}  # stage index -> which file holds it
    for k, ckpt in enumerate(ckpts):
        for i in ckpt["stages"]:
            owner[i] = k
    unused = [str(paths[k]) for k in range(len(paths)) if k not in owner.values()]
    if unused:
        raise CheckpointError(f"combine: every stage of '{unused[0]}' is replaced by a later file; "
                              f"leave it out")
    count = max(len(cfg.stages) for cfg in configs)
    if sorted(owner) != list(range(count)):
        missing = sorted(set(range(count)) - set(owner))
        raise CheckpointError(f"combine: no file holds stage(s) {missing} of the {count}-stage cascade")
    for k, cfg in enumerate(configs):
        if cfg.data.channels != configs[0].data.channels:
            raise CheckpointError(f"combine: '{paths[k]}' makes {cfg.data.channels}-channel images and "
                                  f"'{paths[0]}' {configs[0].data.channels}-channel ones: they do not chain")
    stages = [configs[owner[i]].stages[i] for i in range(count)]
    for i in range(1, count):  # the SR stage i learned from its own config's stage i - 1
        seen = configs[owner[i]].stages[i - 1]
        made = stages[i - 1]
        if (seen.image_size, seen.diffusion.forward_process) != (made.image_size, made.diffusion.forward_process):
            raise CheckpointError(f"combine: stage {i} in '{paths[owner[i]]}' was trained on "
                                  f"{seen.image_size}x{seen.image_size} inputs noised with (T, schedule, log_snr_shift) "
                                  f"{seen.diffusion.forward_process}, but stage {i - 1} in "
                                  f"'{paths[owner[i - 1]]}' makes {made.image_size}x{made.image_size} "
                                  f"with {made.diffusion.forward_process}: they do not chain")
    config = configs[0].to_dict()
    config["stages"] = [configs[owner[i]].to_dict()["stages"][i] for i in range(count)]
    config["train"]["stages"] = []
    out = {k: v for k, v in ckpts[0].items() if k != "stages"}
    out["config"] = config_from_dict(config).to_dict()
    out["stages"] = {i: ckpts[owner[i]]["stages"][i] for i in range(count)}
    out["step"] = max(int(c["step"]) for c in ckpts)
    return save_checkpoint(out, dst)


def posthoc(src: str | os.PathLike, dst: str | os.PathLike, std: float, step: int | None = None
            ) -> tuple[Path, dict[int, float]]:
    """SRC with each stage's EMA replaced by the power-function EMA of relative std `std` at
    `step` (default: SRC's step), mixed from the snapshots in SRC's folder (cdm/ema.py). Stages
    without snapshots keep their EMA. Returns the path and, per mixed stage, the relative L2
    error of the mixed profile against the asked one (a few percent: a faithful mix)."""
    src = Path(src)
    if not 0 < std <= MAX_EMA_STD:
        raise UserError(f"posthoc: --std must be in (0, {MAX_EMA_STD}] (a relative std), got {std}")
    ckpt = load_checkpoint(src, stages=[])  # a run of some stages (--stages 1) mixes those
    step = int(ckpt["step"]) if step is None else step
    if not 0 < step <= int(ckpt["step"]):
        raise UserError(f"posthoc: --step must be in [1, {ckpt['step']}] (the steps '{src}' trained), got {step}")
    folder = src.parent / SNAPSHOT_DIR
    snapshots = [load_checkpoint(f, stages=[]) for f in sorted(folder.glob("*.pt"))]
    snapshots = [s for s in snapshots if int(s["step"]) <= step]
    if not snapshots:
        raise CheckpointError(f"posthoc: no power-function EMA snapshots up to step {step} in '{folder}': "
                              f"train with stages.N.optim.posthoc_ema_std set, e.g. [0.05, 0.1]")
    errors = {}
    for index, entry in ckpt["stages"].items():
        parts = [(int(s["step"]), float(key), state) for s in snapshots if index in s["stages"]
                 for key, state in s["stages"][index]["power_ema"].items()]
        if not parts:
            continue
        if any(s["config"]["stages"][index]["model"] != ckpt["config"]["stages"][index]["model"]
               for s in snapshots if index in s["stages"]):
            raise CheckpointError(f"posthoc: the snapshots in '{folder}' hold another stages.{index}.model "
                                  f"than '{src}' (snapshots of another run?)")
        steps, stds, states = zip(*parts)
        weights = posthoc_weights(list(steps), list(stds), step, std)  # (K,)
        errors[index] = profile_error(list(steps), list(stds), step, std, weights)
        entry["ema"] = {key: mix([s[key] for s in states], weights) if value.is_floating_point() else value
                        for key, value in entry["ema"].items()}
    if not errors:
        raise CheckpointError(f"posthoc: the snapshots in '{folder}' hold none of the stages of '{src}'")
    return save_checkpoint(ckpt, dst), errors


def mix(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * tensors[k], accumulated in float64, in the tensors' dtype."""
    total = sum(w * t.double() for w, t in zip(weights.tolist(), tensors))
    return total.to(tensors[0].dtype)


def stage_weights(ckpt: dict, index: int, key: str, path: str | os.PathLike) -> dict:
    """ckpt["stages"][index][key] (model, ema or optimizer), or a CheckpointError if absent."""
    if key not in ckpt["stages"][index]:
        raise CheckpointError(f"checkpoint '{path}': holds no stage {index} {key} state (an "
                              f"exported file keeps only the EMA weights, for sampling)")
    return ckpt["stages"][index][key]


def load_state(module: torch.nn.Module, state: dict, path: str | os.PathLike, what: str) -> None:
    """load_state_dict that reports a shape/key mismatch as a CheckpointError."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"checkpoint '{path}': {what} does not fit the model built from "
                              f"the config (another config?): {detail}") from None


def main() -> None:
    """python -m cdm.checkpoint export SRC DST | combine A B [...] DST | posthoc SRC DST --std S."""
    parser = ArgumentParser(prog="python -m cdm.checkpoint",
                            description="Export a checkpoint's EMA weights (bf16) for sampling, "
                                        "combine checkpoints that trained different stages, or "
                                        "choose a run's EMA length after training.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="SRC DST: a small, sampling-only copy of SRC")
    export.add_argument("src")
    export.add_argument("dst")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a sampling default in the stored config, e.g. "
                             "stages.1.augment.aug_level=0")
    merge = commands.add_parser("combine", help="A B [...] DST: one cascade from files trained "
                                                "with different --stages")
    merge.add_argument("paths", nargs="+", metavar="PATH", help="the stage files, then DST")
    average = commands.add_parser("posthoc", help="SRC DST --std S: SRC with the power-function EMA "
                                                  "of relative std S, mixed from its run's snapshots")
    average.add_argument("src", help="a run's checkpoint.pt (its ema_snapshots/ folder beside it)")
    average.add_argument("dst")
    average.add_argument("--std", type=float, required=True,
                         help=f"relative std of the EMA profile (Karras et al. 2024), in (0, {MAX_EMA_STD}]")
    average.add_argument("--step", type=int, default=None, help="the step it ends at (default: SRC's)")
    args = parser.parse_args()
    if args.command == "export":
        path = export_ema(args.src, args.dst, args.overrides)
    elif args.command == "posthoc":
        path, errors = posthoc(args.src, args.dst, args.std, args.step)
        for index, error in errors.items():
            print(f"stage {index}: EMA std {args.std:g} mixed from snapshots, profile error {100 * error:.1f}%")
    else:
        if len(args.paths) < 3:
            raise UserError("combine: give at least two stage checkpoints and the output path")
        path = combine(args.paths[:-1], args.paths[-1])
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    run_cli(main)
