import json

import pytest
import torch

from cdm.cascade import load_cascade
from cdm.config import load_config
from cdm.runtime import use_bf16
from cdm.train import StageMeter, StepStats, learning_rate, make_stage, train, train_step

from conftest import ROOT


@pytest.mark.parametrize("self_condition, noise_distribution, stratified, patch_size",
                         [(False, "uniform", False, 1), (True, "lognormal", True, 1),  # the options, together
                          (False, "uniform", False, 2)])
def test_tiny_stage_overfits_one_batch(tiny_cfg, self_condition, noise_distribution, stratified, patch_size):
    torch.manual_seed(0)
    tiny_cfg.base.optim.lr = 2e-3
    tiny_cfg.base.model.patch_size = patch_size  # 2: the 8x8 image as 4x4 positions of 2x2 patches
    tiny_cfg.base.model.self_condition = self_condition  # judged on its first pass (no estimate yet)
    tiny_cfg.base.diffusion.noise_distribution = noise_distribution  # EDM's draws, through train_step
    tiny_cfg.base.diffusion.stratified = stratified
    stage = make_stage(tiny_cfg, 0, torch.device("cpu"), compile_model=False, channels_last=False)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(1, 1, 8, 8, generator=gen) * 2 - 1).repeat(8, 1, 1, 1)  # one image to memorise
    t_eval = torch.linspace(100, 999, 8).long()  # at t ~ 0 even a perfect memoriser must guess eps
    noise_eval = torch.randn(x0.shape, generator=gen)

    def eval_loss():
        with torch.no_grad():
            return stage.diffusion.training_loss(stage.model, x0, t_eval, {}, noise_eval).mean().item()

    before = eval_loss()
    for step in range(200):
        train_step(stage, x0, {}, step, False, gen)
    assert eval_loss() < 0.15 * before


def test_learning_rate_warms_up_linearly(tiny_cfg):
    stage = tiny_cfg.base  # warmup_steps = 2, lr = 1e-3
    assert learning_rate(0, stage, 200) == pytest.approx(5e-4)
    assert learning_rate(1, stage, 200) == pytest.approx(1e-3)
    assert learning_rate(100, stage, 200) == pytest.approx(1e-3)


def test_cosine_decay_reaches_zero_at_the_last_step(tiny_cfg):
    stage = tiny_cfg.base
    stage.optim.lr_decay = "cosine"  # warm-up to step 2, then half a cosine over steps 2..102
    lrs = [learning_rate(step, stage, 102) for step in range(103)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[52] == pytest.approx(5e-4)
    assert lrs[102] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_stage_meter_buckets_by_quartile_and_ignores_skipped_steps():
    meter = StageMeter(1000, torch.device("cpu"))
    meter.add(StepStats(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0, 249, 500, 999]),
                        torch.tensor(2.0), torch.tensor(False)))
    meter.add(StepStats(torch.full((4,), float("nan")), torch.tensor([0, 1, 2, 3]),
                        torch.tensor(float("inf")), torch.tensor(True)))
    row = meter.read()
    assert row["loss"] == pytest.approx(2.75) and row["grad_norm"] == 2.0 and row["skipped"] == 1
    assert (row["loss_q1"], row["loss_q2"], row["loss_q3"], row["loss_q4"]) == (1.5, 0.0, 3.0, 5.0)
    assert meter.read()["skipped"] == 0  # reading resets the window


def test_cascade_trains_on_mnist_and_loss_falls(tiny_cfg):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out_dir={tiny_cfg.out_dir}", "data.download=false", "train.steps=60", "train.log_every=20",
        "train.sample_every=0", "train.save_every=60", "stages.0.optim.batch_size=32",
        "stages.1.optim.batch_size=16"])
    path = train(cfg, progress=False)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60]
    for stage in ("base", "sr1"):
        assert rows[-1][f"{stage}_loss"] < 0.7 * rows[0][f"{stage}_loss"], stage
    assert path.exists() and (cfg.run_dir / "config.yaml").exists()


def state_tensors(ckpt: dict):
    for index, entry in sorted(ckpt["stages"].items()):
        for part in ("model", "ema"):
            yield from ((f"{index}.{part}.{k}", v) for k, v in entry[part].items())
        for std, state in entry.get("power_ema", {}).items():
            yield from ((f"{index}.power_ema.{std}.{k}", v) for k, v in state.items())
        for pid, state in entry["optimizer"]["state"].items():
            yield from ((f"{index}.opt.{pid}.{k}", v) for k, v in state.items())


def test_resume_equals_uninterrupted_run(tmp_path):
    def cfg(run, steps):
        return load_config(ROOT / "configs" / "tiny.yaml", [
            f"out_dir={tmp_path}", f"run_name={run}", "data.download=false", f"train.steps={steps}",
            "stages.0.model.dropout=0.1", "stages.1.model.dropout=0.1", "stages.1.optim.crop_size=16",
            "stages.0.model.self_condition=true",  # its coin too must resume in step
            "stages.0.optim.posthoc_ema_std=[0.1]"])  # and the power EMA its step count

    straight = torch.load(train(cfg("straight", 4), progress=False), weights_only=True)
    half = train(cfg("resumed", 2), progress=False)
    resumed = torch.load(train(cfg("resumed", 4), resume=half, progress=False), weights_only=True)
    assert straight["step"] == resumed["step"] == 4
    pairs = list(zip(state_tensors(straight), state_tensors(resumed)))
    assert len(pairs) > 20
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name


def test_checkpoint_rebuilds_the_cascade_from_config_alone(tiny_cfg):
    path = train(tiny_cfg, progress=False)
    cfg, stages, ckpt = load_cascade(path, "cpu")
    assert cfg == tiny_cfg
    for stage in stages:
        for key, value in stage.model.state_dict().items():
            assert torch.equal(value, ckpt["stages"][stage.index]["ema"][key]), key
    x = torch.randn(2, 1, 8, 8)
    again = load_cascade(path, "cpu")[1][0].model
    torch.testing.assert_close(stages[0].model(x, torch.tensor([3, 700])),
                               again(x, torch.tensor([3, 700])), rtol=0, atol=0)


def test_gpu_code_paths_on_cpu_compile_bf16_channels_last(tmp_path, monkeypatch):
    """The CUDA defaults (torch.compile, bf16 autocast, channels_last) exercised on the CPU.
    The compiled step runs through dynamo and AOTAutograd (backend aot_eager): inductor's C++
    code generation would add 2-4 minutes on a cold cache (a fresh CI machine) and tests torch,
    not this project; test_cuda runs inductor on a GPU."""
    compile_, compiled = torch.compile, []

    def compile_aot_eager(model, **kwargs):
        compiled.append(model)
        return compile_(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path}", "data.download=false", "train.steps=2", "train.sample_every=2",
        "train.compile=always", "train.precision=bf16", "train.channels_last=true"])
    path = train(cfg, progress=False)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["metrics"]["skipped_steps"] == 0
    assert not any(k.startswith("_orig_mod") for k in ckpt["stages"][0]["model"])  # the uncompiled module is saved
    assert len(compiled) == len(cfg.stages)  # each stage's training step went through torch.compile
    assert (cfg.run_dir / "samples" / "cascade_step000002.png").exists()


def test_max_minutes_stops_early_with_a_checkpoint_and_a_final_grid(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path}", "data.download=false", "train.steps=1000", "train.sample_every=500",
        "train.max_minutes=0.0001"])
    ckpt = torch.load(train(cfg, progress=False), weights_only=True)
    assert ckpt["step"] == 1  # 6 ms of training time: the first step already used it up
    assert (cfg.run_dir / "samples" / "cascade_step000001.png").is_file()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    """Emulated bf16 is about 2x slower than fp32, so 'auto' picks bf16 on a CPU only when it
    has AVX512-BF16 or AMX; explicit choices are obeyed either way."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) is native
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
