"""The CUDA paths on a real GPU: torch.compile, CUDA graphs, bf16 autocast, channels_last, fused
AdamW's on-device skip, generators and resident data on the GPU, resume. Skipped where no GPU is
visible (CI); the CPU stand-in for the same settings is test_train's compile/bf16 test."""
import itertools
import json

import pytest
import torch

import cdm.train as train_module
from cdm.cascade import load_cascade, sample_cascade
from cdm.train import train

from test_faults import nan_on_calls, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ("device=cuda", "train.compile=always", "train.precision=bf16", "train.channels_last=true")


def test_trains_compiled_in_bf16_on_the_gpu_and_samples_reproducibly(tmp_path):
    path = train(tiny(tmp_path, "gpu", *GPU, "train.steps=6"), progress=False)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["step"] == 6 and ckpt["metrics"]["skipped_steps"] == 0
    assert ckpt["rng"][0]["cuda"]  # the CUDA generator states, for resume
    assert (tmp_path / "gpu" / "samples" / "cascade_step000006.png").is_file()
    _, stages, _ = load_cascade(path, "cuda")
    draws = [sample_cascade(stages, num=6, generator=torch.Generator("cuda").manual_seed(3), bf16=True)
             for _ in range(2)]
    assert draws[0].images.shape == (6, 1, 32, 32) and draws[0].images.is_cuda
    assert torch.isfinite(draws[0].images).all()
    torch.testing.assert_close(draws[0].images, draws[1].images, rtol=0, atol=1e-4)  # same seed, same samples


def graphed_stages(tmp_path, run):
    """The stages a run recorded as CUDA graphs (its run_info.json)."""
    return json.loads((tmp_path / run / "run_info.json").read_text())["cuda_graphs"]


def assert_finite_and_one_skipped(path):
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["metrics"]["skipped_steps"] == 1
    for entry in ckpt["stages"].values():
        assert all(torch.isfinite(v).all() for v in entry["model"].values())


def test_a_non_finite_loss_skips_the_update_on_the_gpu(tmp_path, monkeypatch):
    """Fused AdamW reads `found_inf` on the device: the nan step leaves the weights finite."""
    nan_on_calls(monkeypatch, {2})  # the base stage's loss at step 1 (eager: one call per step)
    assert_finite_and_one_skipped(train(tiny(tmp_path, "nan", "device=cuda", "train.precision=bf16",
                                             "train.sample_every=0", "train.cuda_graphs=never"), progress=False))


def test_a_non_finite_loss_inside_the_cuda_graph_skips_the_update(tmp_path, monkeypatch):
    """A nan noise draw at step 1 makes the replayed graph's loss and gradients nan; the eager
    fused AdamW after it skips the update."""
    draw = train_module.draw_t_and_noise
    calls = itertools.count()

    def nan_noise_at_call_2(stage, x0, generator):  # calls: step 0 base, sr1; step 1 base, ...
        t, noise = draw(stage, x0, generator)
        return t, noise * float("nan") if next(calls) == 2 else noise

    monkeypatch.setattr(train_module, "draw_t_and_noise", nan_noise_at_call_2)
    path = train(tiny(tmp_path, "nan", "device=cuda", "train.precision=bf16", "train.sample_every=0"),
                 progress=False)
    assert graphed_stages(tmp_path, "nan") == ["base", "sr1"]
    assert_finite_and_one_skipped(path)


def test_cuda_graph_steps_equal_eager_steps(tmp_path):
    """The same draws through the recorded graph and through eager launches: the first step's
    loss and gradient norm agree to float rounding, every later step's within 1% (a graph that
    wrote wrong or no gradients would not), and the weights after 4 steps up to Adam's steps."""
    runs = {}
    for mode in ("never", "auto"):
        path = train(tiny(tmp_path, mode, "device=cuda", "train.log_every=1", "train.sample_every=0",
                          f"train.cuda_graphs={mode}"), progress=False)
        rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = rows, torch.load(path, weights_only=True, map_location="cpu")
    assert graphed_stages(tmp_path, "never") == [] and graphed_stages(tmp_path, "auto") == ["base", "sr1"]
    (eager_rows, eager), (graph_rows, graphed) = runs["never"], runs["auto"]
    for step, (graph_row, eager_row) in enumerate(zip(graph_rows, eager_rows, strict=True)):
        for key in ("base_loss", "base_grad_norm", "sr1_loss", "sr1_grad_norm"):
            assert graph_row[key] == pytest.approx(eager_row[key], rel=1e-3 if step == 0 else 1e-2), (step, key)
    for index, entry in eager["stages"].items():
        for name, weight in entry["model"].items():
            torch.testing.assert_close(weight, graphed["stages"][index]["model"][name], rtol=0, atol=1e-2,
                                       msg=f"stage {index} {name}")


@pytest.mark.parametrize("cuda_graphs", ["auto", "never"])
def test_resume_on_the_gpu_continues_the_same_run(tmp_path, cuda_graphs):
    """The CUDA generators (training draws, dropout) restored exactly: their states after the
    resumed run equal the straight run's (a CUDA graph's recording gives back the dropout draws
    it made). Weights agree up to the GPU's non-deterministic reductions, which Adam's normalised
    steps can lift to about lr per step."""
    def cfg(run, steps):
        return tiny(tmp_path, run, "device=cuda", f"train.steps={steps}", "train.sample_every=0",
                    "stages.0.model.dropout=0.1", "stages.1.optim.crop_size=16",
                    f"train.cuda_graphs={cuda_graphs}")

    def load(path):
        return torch.load(path, weights_only=True, map_location="cpu")

    def generator_states(ckpt):
        return [ckpt["rng"][0]["generator"], *ckpt["rng"][0]["cuda"]]

    straight = load(train(cfg("straight", 6), progress=False))
    half = train(cfg("resumed", 3), progress=False)
    resumed = load(train(cfg("resumed", 6), resume=half, progress=False))
    for a, b in zip(generator_states(straight), generator_states(resumed), strict=True):
        assert torch.equal(a, b)
    for index, entry in straight["stages"].items():
        for name, weight in entry["model"].items():
            torch.testing.assert_close(weight, resumed["stages"][index]["model"][name], rtol=0, atol=1e-2,
                                       msg=f"stage {index} {name}")
