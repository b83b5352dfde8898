"""Device and precision choices, made once per run."""
from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from pathlib import Path

import torch

from cdm.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu with a warning; 'cuda[:N]' must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("note: no CUDA device found, running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}': CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def native_cpu_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX). Without it PyTorch emulates
    bf16, and autocast runs about 2x *slower* than fp32 (measured: docs/performance.md)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(precision: str, device: torch.device) -> bool:
    """precision 'auto' means bf16 autocast on CUDA and on CPUs with native bf16, else fp32."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())


def autocast(device: torch.device, bf16: bool, cache: bool = True):
    """bf16 autocast on `device` when asked, else a no-op context. cache=False recasts the weights
    at each use instead of keeping the casts for the context's life (as CUDA graph capture wants)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the cdm checkout in use, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
