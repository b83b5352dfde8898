"""One self-describing checkpoint file for the whole cascade.

Layout (a plain dict of tensors, numbers and strings, loadable with weights_only=True):
  format_version  int, FORMAT_VERSION
  config          Config.to_dict(): enough to rebuild both stages without other input
  step            optimizer steps done
  base, sr        {"model": state_dict, "ema": state_dict, "optimizer": state_dict}
  classifier      the same for the noisy classifier, when the run trained one
  rng             {"torch": CPU RNG state, "cuda": [per-device states], "generator": the
                   training generator's state}
  metrics         {"skipped_steps": int, ...}
Files are written atomically: to a temporary file in the same folder, fsynced, then renamed over
the old one, so a crash or a full disk mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from cdm.config import Config, ConfigError, apply_override, config_from_dict
from cdm.errors import ArgumentParser, UserError, run_cli

FORMAT_VERSION = 1
STAGES = ("base", "sr")
CLASSIFIER = "classifier"  # the noisy classifier for guidance (cdm/noisy_classifier.py)


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
                    parts: tuple[str, ...] = STAGES) -> dict:
    """Load and check a checkpoint that holds `parts` (default: both cascade stages); raises
    CheckpointError with one line on any problem. Uses torch.load(weights_only=True): no code
    from the file is run."""
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
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}': format version {version} is not supported "
                              f"by this cdm (it reads version {FORMAT_VERSION}); "
                              f"{'update cdm' if version > FORMAT_VERSION else 'retrain'}")
    missing = [k for k in ("config", "step", *parts) if k not in ckpt]
    if missing:
        hint = (" (only runs whose config has a classifier: section train one)"
                if CLASSIFIER in missing else "")
        raise CheckpointError(f"checkpoint '{path}': missing entries {missing}{hint}")
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
    for name in (*STAGES, CLASSIFIER):
        if name in ckpt:
            out[name] = {"ema": {k: v.to(dtype) if v.is_floating_point() else v
                                 for k, v in ckpt[name]["ema"].items()}}
    return save_checkpoint(out, dst)


def stage_weights(ckpt: dict, name: str, key: str, path: str | os.PathLike) -> dict:
    """ckpt[name][key] (key: model, ema or optimizer), or a CheckpointError saying it is absent."""
    if key not in ckpt[name]:
        raise CheckpointError(f"checkpoint '{path}': holds no {name} {key} state (an exported "
                              f"file keeps only the EMA weights, for sampling)")
    return ckpt[name][key]


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
    """python -m cdm.checkpoint SRC DST: export SRC's EMA weights (bf16) to DST."""
    parser = ArgumentParser(prog="python -m cdm.checkpoint",
                            description="Export a checkpoint's EMA weights (bf16) for sampling.")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a sampling default in the stored config, e.g. augment.aug_level=0")
    args = parser.parse_args()
    path = export_ema(args.src, args.dst, args.overrides)
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    run_cli(main)
