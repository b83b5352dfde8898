"""A stage's loss and its backward, recorded once as a CUDA graph and replayed every step
(`train.cuda_graphs`).

On a GPU this cascade's small stages are launch-bound: a training step of the 8x8 base is a few
thousand kernels of microseconds each, and Python issuing them one by one takes longer than the
GPU runs them (docs/performance.md 10.3 and 10.4: 2-8 TFLOP/s for the bases, of ~790). A CUDA
graph (PyTorch notes, "CUDA Graphs": whole-network capture) records the kernels once and replays
them with one launch. Recorded: the loss (q_sample, the network under autocast, the weighted MSE)
and its backward, reading static input buffers that each step overwrites. Eager, as before: the
draws (batch, t, noise, augmentation), gradient clipping, the fused AdamW with its on-device skip
and the EMAs, each a few multi-tensor kernels. Dropout inside the graph draws from the default
CUDA generator, whose offset every replay advances (graph-safe RNG), so runs and resumes reproduce.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from cdm.diffusion import GaussianDiffusion
from cdm.runtime import autocast

WARMUP_ITERS = 3  # eager passes on a side stream before recording: cuDNN picks its kernels


def use_cuda_graph(setting: str, device: torch.device, compiled: bool, self_condition: bool,
                   data_parallel: bool = False, split_stages: bool = False) -> bool:
    """train.cuda_graphs 'auto' records a stage on a CUDA device, unless torch.compile runs it, it
    self-conditions (a coin picks one of two computations each step), DDP syncs its gradients
    during backward, or the stages are split over GPUs."""
    return setting == "auto" and device.type == "cuda" and not (
        compiled or self_condition or data_parallel or split_stages)


class GraphedLoss:
    """loss_fn(**inputs) -> per-example losses (B,), and `.mean().backward()` writing the
    parameters' .grad, as one CUDA graph, recorded at the first call (the inputs' shapes and
    dtypes fix the graph's). Each call copies its inputs into the graph's buffers, replays, and
    returns the graph's losses (overwritten by the next call), the gradients in .grad."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Iterable[torch.nn.Parameter]):
        self.loss_fn = loss_fn
        self.params = list(params)  # the parameters whose gradients the graph writes
        self.graph: torch.cuda.CUDAGraph | None = None

    def record(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = {name: value.clone() for name, value in inputs.items()}  # static buffers
        device = next(iter(self.inputs.values())).device
        rng = torch.cuda.get_rng_state(device)  # warm-up and recording draw dropout masks: undone below
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self.loss_fn(**self.inputs).mean().backward()
        torch.cuda.current_stream(device).wait_stream(side)
        for p in self.params:  # backward inside the graph allocates the .grad tensors it writes
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate while this thread records
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.losses = self.loss_fn(**self.inputs)  # (B,)
            self.losses.mean().backward()
        torch.cuda.set_rng_state(rng, device)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self.record(inputs)
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        self.graph.replay()
        return self.losses


def graphed_training_loss(diffusion: GaussianDiffusion, network: torch.nn.Module, device: torch.device, bf16: bool) -> GraphedLoss:
    """A stage's diffusion training loss (without self-conditioning, which use_cuda_graph rules
    out) under autocast, as a GraphedLoss. Autocast's weight-cast cache is off, as PyTorch's CUDA
    graph notes ask of autocast inside a captured region."""
    def loss_fn(x0, t, noise, **cond):
        with autocast(device, bf16, cache=False):
            return diffusion.training_loss(network, x0, t, cond, noise)  # (B,)
    return GraphedLoss(loss_fn, network.parameters())
