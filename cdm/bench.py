"""Benchmark: training and sampling speed of each stage (`python -m cdm.bench`). Never a test.

    python -m cdm.bench --preset cpu                      # the CPU config's two stages
    python -m cdm.bench --preset cpu3                     # the 3-stage CPU config (8 -> 16 -> 32)
    python -m cdm.bench --preset anchor --compare-diffusers --precision fp32
    python -m cdm.bench --preset gpu --device cuda --json output/bench_gpu.json
    python -m cdm.bench --preset cpu --compile always     # torch.compile, compile time reported
    python -m cdm.bench --preset gpu --device cuda --cuda-graphs never   # eager launches, no CUDA graph
    python -m cdm.bench --preset evaluation               # cdm.evaluate's scoring in both spaces
    python -m cdm.bench --preset cpu --set stages.0.model.channels=32   # any config key

Per stage: parameters, FLOPs per image for one training step (forward + backward, counted by
torch.utils.flop_counter), images/s and ms/step for training (fused AdamW, the config's
precision), the achieved FLOP/s, and sampling: ms per denoising step at --sample-batch, giving
samples/s for DDIM-N and DDPM-1000 (from the measured per-step time). Peak memory: CUDA's
allocator peak, or the process's peak RSS on the CPU. `--compare-diffusers` times diffusers'
UNet2DModel at the anchor layout in the same run, when diffusers is installed (optional; not in
requirements.txt). `--preset evaluation` times cdm.evaluate instead: building both feature spaces
(10,000 test digits), scoring 10,000 images in both, and the 5-set floor at N = 10,000.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cdm.augment import sr_cond
from cdm.cascade import stage_name
from cdm.config import Config, ModelConfig, StageConfig, load_config
from cdm.cuda_graphs import graphed_training_loss, use_cuda_graph
from cdm.diffusion import GaussianDiffusion
from cdm.errors import ArgumentParser, UserError, run_cli
from cdm.runtime import autocast, resolve_device, use_bf16
from cdm.unet import build_unet

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# diffusers' anchor (../shared/anchors): a single-stage 32x32 UNet, channels 32/64/64, one residual
# block per level, attention at 8x8, GroupNorm 8; here as the SR-sized stage without conditioning.
ANCHOR = ModelConfig(channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[8],
                     num_heads=8, norm_groups=8)  # 8 heads of 8 channels, as diffusers' default
# the reference lesson's sizes (16.4M base, 35.2M SR parameters), approximated with this UNet
LESSON_BASE = ModelConfig(channels=96, channel_mult=[1, 2, 2], num_res_blocks=2,
                          attention_resolutions=[4], num_heads=4, norm_groups=32)  # 15.6M
LESSON_SR = ModelConfig(channels=128, channel_mult=[1, 1, 2, 2], num_res_blocks=2,
                        attention_resolutions=[8, 4], num_heads=4, norm_groups=32)  # 32.4M


def preset_stages(preset: str, overrides: list[str] = ()) -> tuple[Config, dict[str, tuple[StageConfig, bool]]]:
    """(config, {stage name: (stage config, is SR)}) for a preset, with --set overrides on its
    config file (cpu, cpu3, gpu)."""
    if preset == "cpu":
        cfg = load_config(CONFIGS / "cdm_mnist_cpu.yaml", overrides)
    elif preset in ("gpu", "lesson"):
        cfg = load_config(CONFIGS / "cdm_mnist.yaml", overrides)
    elif preset == "anchor":
        cfg = load_config(CONFIGS / "cdm_mnist_cpu.yaml")
        top = cfg.stages[-1]
        anchor = replace(top, model=ANCHOR, optim=replace(top.optim, batch_size=64, crop_size=0))
        return cfg, {"anchor32": (anchor, False)}
    elif preset == "cpu3":
        cfg = load_config(CONFIGS / "cdm_mnist_cpu_3stage.yaml", overrides)
    else:
        raise UserError(f"--preset {preset!r}: expected cpu, cpu3, gpu, lesson or anchor")
    if preset == "lesson":
        base, sr = cfg.stages
        cfg.stages = [replace(base, model=LESSON_BASE, optim=replace(base.optim, batch_size=128)),
                      replace(sr, model=LESSON_SR, optim=replace(sr.optim, batch_size=128))]
    return cfg, {stage_name(i): (stage, i > 0) for i, stage in enumerate(cfg.stages)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Seconds per call of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def bench_model(name: str, model: torch.nn.Module, size: int, sample_size: int, channels: int,
                batch: int, make_cond, device: torch.device, bf16: bool, steps: int,
                sample_batch: int, sample_steps: int, compile_model: bool = False,
                cuda_graphs: str = "never") -> dict:
    """Train-step (at `size`, a patch size for the SR stage) and sampling-step (at `sample_size`)
    timings of one network taking (x, t, **cond). With `compile_model` the network runs under
    torch.compile; the first training and sampling calls (which compile) are timed apart. With
    cuda_graphs 'auto' the loss and backward replay as a CUDA graph where training would record
    one (cdm.cuda_graphs.use_cuda_graph); the first call records it, within the warm-up."""
    model = model.to(device)
    eager = model
    diffusion = GaussianDiffusion(StageConfig().diffusion, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x0 = torch.randn(batch, channels, size, size, device=device)
    cond = make_cond(batch, size)
    calls = itertools.count()
    self_condition = getattr(eager, "self_condition", False)  # its extra pass: every other step
    cuda_graph = use_cuda_graph(cuda_graphs, device, compile_model, self_condition)

    def loss_fn(x0, t, noise, heads=False, **cond):
        with autocast(device, bf16):
            return diffusion.training_loss(model, x0, t, cond, noise, heads)  # (B,)

    graph = graphed_training_loss(diffusion, model, device, bf16) if cuda_graph else None

    def train_step():
        inputs = {"x0": x0, "t": torch.randint(0, 1000, (batch,), device=device), "noise": torch.randn_like(x0), **cond}
        if graph is not None:
            graph(**inputs)
        else:
            opt.zero_grad(set_to_none=True)
            loss_fn(**inputs, heads=self_condition and next(calls) % 2 == 0).mean().backward()
        opt.step()

    passes = {False, self_condition}  # self-conditioning's extra forward pass: every other step
    with FlopCounterMode(display=False) as counter:
        for heads in passes:
            loss_fn(x0, torch.randint(0, 1000, (batch,), device=device), torch.randn_like(x0), heads,
                    **cond).mean().backward()
    flops_per_image = counter.get_total_flops() / batch / len(passes)
    compile_s = {}
    if compile_model:
        model = torch.compile(eager, dynamic=False)
        compile_s["train_compile_s"] = time_calls(train_step, device, warmup=0, repeats=1)
    seconds = time_calls(train_step, device, warmup=2, repeats=steps)

    x_sample = torch.randn(sample_batch, channels, sample_size, sample_size, device=device)
    sample_cond = make_cond(sample_batch, sample_size)
    t_sample = torch.full((sample_batch,), 500, device=device)

    @torch.inference_mode()
    def denoise_step():
        with autocast(device, bf16):
            model(x_sample, t_sample, **sample_cond)

    if compile_model:
        compile_s["sample_compile_s"] = time_calls(denoise_step, device, warmup=0, repeats=1)
    step_s = time_calls(denoise_step, device, warmup=1, repeats=3)
    return {"stage": name, "params_M": sum(p.numel() for p in eager.parameters()) / 1e6, **compile_s,
            "cuda_graph": cuda_graph,
            "batch": batch, "train_size": size, "sample_size": sample_size, "ms_per_step": 1000 * seconds,
            "images_per_s": batch / seconds, "gflops_per_image": flops_per_image / 1e9,
            "achieved_tflops": flops_per_image * batch / seconds / 1e12,
            "sample_ms_per_denoise_step": 1000 * step_s, "sample_batch": sample_batch,
            f"samples_per_s_ddim{sample_steps}": sample_batch / (step_s * sample_steps),
            "samples_per_s_ddpm1000": sample_batch / (step_s * 1000),
            "peak_memory_MB": peak_memory_mb(device)}


def stage_cond(stage: StageConfig, super_res: bool, n: int, channels: int, hw: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Random conditioning of the kind the stage takes, for n inputs at hw x hw: the SR stage a
    resized low-res input and an augmentation level, a class-conditional stage labels."""
    classes = stage.model.num_classes
    labels = torch.randint(0, classes, (n,), device=device) if classes else None
    if not super_res:
        return {"y": labels} if classes else {}
    return sr_cond(torch.randn(n, channels, hw, hw, device=device),
                   torch.randint(0, 200, (n,), device=device), labels)


def diffusers_anchor(channels: int) -> torch.nn.Module:
    """diffusers' UNet2DModel at the anchor layout, wrapped to take (x, t) and return a tensor."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UserError("--compare-diffusers needs diffusers: pip install diffusers "
                        "(an optional tool, not a project dependency)") from None
    net = UNet2DModel(sample_size=32, in_channels=channels, out_channels=channels, norm_num_groups=8,
                      layers_per_block=1, block_out_channels=(32, 64, 64),
                      down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x, t).sample

    return Wrapped()


def bench_evaluation() -> dict:
    """Seconds for each part of cdm.evaluate on real digits standing in for samples."""
    import os

    from cdm.classifier import DEFAULT_PATHS
    from cdm.config import DATA_ROOT_ENV
    from cdm.datasets import load_mnist
    from cdm.evaluate import FeatureSpace, floor_rows, score

    root = os.environ.get(DATA_ROOT_ENV, "data")
    test_images = load_mnist(root, True, 32, 1, train=False)[0]
    images, labels = load_mnist(root, True, 32, 1)
    start = time.perf_counter()
    spaces = [FeatureSpace.build(name, path, test_images) for name, path in DEFAULT_PATHS.items()]
    timings = {"build_spaces_s": time.perf_counter() - start}
    start = time.perf_counter()
    score(spaces, images[:10000], labels[:10000])
    timings["score_10000_both_spaces_s"] = time.perf_counter() - start
    start = time.perf_counter()
    floor_rows(spaces, images, labels, [10000], draws=5)
    timings["floor_n10000_5_sets_s"] = time.perf_counter() - start
    return timings


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="cpu | cpu3 | gpu | lesson | anchor | evaluation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["config", "fp32", "bf16"], default="config")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per stage")
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=25, help="N of the DDIM-N column")
    parser.add_argument("--compile", choices=["config", "never", "always"], default="config",
                        help="torch.compile the networks (config: the preset config's train.compile)")
    parser.add_argument("--cuda-graphs", choices=["config", "never", "auto"], default="config",
                        help="replay the loss and backward as a CUDA graph (config: train.cuda_graphs)")
    parser.add_argument("--compare-diffusers", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the preset's config, e.g. --set stages.0.model.channels=32")
    args = parser.parse_args()

    if args.preset == "evaluation":
        result = {"preset": "evaluation", "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                  **bench_evaluation()}
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))
        return
    device = resolve_device(args.device)
    cfg, stages = preset_stages(args.preset, args.overrides)
    precision = cfg.train.precision if args.precision == "config" else args.precision
    bf16 = use_bf16(precision, device)
    compile_mode = cfg.train.compile if args.compile == "config" else args.compile
    compile_model = compile_mode == "always" or (compile_mode == "auto" and device.type == "cuda")
    cuda_graphs = cfg.train.cuda_graphs if args.cuda_graphs == "config" else args.cuda_graphs
    channels = cfg.data.channels
    rows = []
    for name, (stage, super_res) in stages.items():
        size = stage.optim.crop_size or stage.image_size
        model = build_unet(stage.model, stage.image_size, channels, super_res)

        def make_cond(n, hw, stage=stage, super_res=super_res):
            return stage_cond(stage, super_res, n, channels, hw, device)

        rows.append(bench_model(name, model, size, stage.image_size, channels, stage.optim.batch_size,
                                make_cond, device, bf16, args.steps, args.sample_batch, args.sample_steps,
                                compile_model, cuda_graphs))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    if args.compare_diffusers:
        batch = next(iter(stages.values()))[0].optim.batch_size
        rows.append(bench_model("diffusers_UNet2DModel_anchor", diffusers_anchor(channels), 32, 32,
                                channels, batch, lambda n, hw: {}, device, bf16, args.steps,
                                args.sample_batch, args.sample_steps, compile_model, cuda_graphs))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
        ours = rows[0]["images_per_s"]
        print(f"cdm / diffusers training images/s: {ours / rows[-1]['images_per_s']:.2f}x")
    if len(stages) > 1:
        cascade_ms = sum(r["ms_per_step"] for r in rows[:len(stages)])
        print(f"cascade (every stage per batch): {cascade_ms:.0f} ms/step, "
              f"{max(r['batch'] for r in rows[:len(stages)]) / cascade_ms * 1000:.0f} images/s")
    result = {"preset": args.preset, "device": str(device), "precision": precision,
              "compile": compile_model,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "stages": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
