"""A stage's loss and its backward, recorded once as a CUDA graph and replayed every step
(`train.cuda_graphs`).

On a GPU this cascade's small stages are launch-bound: a training step of the 8x8 base is a few
thousand kernels of microseconds each, and Python issuing them one by one takes longer than the
GPU runs them (docs/performance.md 10.3 measured 2-7 TFLOP/s for the bases, of ~790). A CUDA graph
(PyTorch notes, "CUDA Graphs": whole-network capture) records the kernels once and replays them
with one launch. Recorded: the loss (q_sample, the network under autocast, the weighted MSE) and
its backward, reading static input buffers that each step overwrites. Eager, as before: the draws
(batch, t, noise, augmentation), gradient clipping, the fused AdamW with its on-device skip and
the EMAs, each a few multi-tensor kernels. Dropout inside the graph draws from the default CUDA
generator, whose offset every replay advances (graph-safe RNG), so runs and resumes reproduce.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

WARMUP_ITERS = 3  # eager passes on a side stream before recording: cuDNN picks its kernels


class GraphedLoss:
    """loss_fn(**inputs) -> per-example losses (B,), with `.mean().backward()` writing the
    parameters' .grad, as one CUDA graph. Recorded at construction from `inputs` (their shapes
    and dtypes fix the graph's); each call copies new inputs in, replays, and returns the graph's
    losses tensor (overwritten by the next call) with the gradients in the parameters' .grad."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Iterable[torch.nn.Parameter],
                 inputs: dict[str, torch.Tensor]):
        self.params = list(params)  # the parameters whose gradients the graph writes
        self.inputs = {name: value.clone() for name, value in inputs.items()}  # static buffers
        device = next(iter(self.inputs.values())).device
        rng = torch.cuda.get_rng_state(device)  # warm-up and recording draw dropout masks: undone below
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                loss_fn(**self.inputs).mean().backward()
        torch.cuda.current_stream(device).wait_stream(side)
        for p in self.params:  # backward inside the graph allocates the .grad tensors it writes
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.losses = loss_fn(**self.inputs)  # (B,)
            self.losses.mean().backward()
        torch.cuda.set_rng_state(rng, device)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        self.graph.replay()
        return self.losses
