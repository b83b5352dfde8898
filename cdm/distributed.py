"""Several processes, one per GPU (or CPU process with gloo), launched by torchrun.

    torchrun --nproc_per_node 2 train_mnist.py --config configs/cdm_mnist.yaml

As in nanoGPT, data parallelism switches on only when torchrun sets RANK in the environment:
each rank trains both stages, wrapped in DistributedDataParallel, on its own slice of the
training set (images[rank::world_size]); gradients are averaged across ranks in backward; rank 0
alone logs, draws previews and writes checkpoints (holding every rank's RNG state, so a resumed
run continues each rank's stream).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device, split_stages: bool = False) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on the CPU)."""
    if "RANK" not in os.environ:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":  # one GPU per rank (two with train.split_stages)
        per_rank = 2 if split_stages else 1
        device = torch.device("cuda", per_rank * info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather(info: DistInfo, obj):
    """Every rank's `obj`, as a list in rank order (just [obj] in a single process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    return any(gather(info, flag))
