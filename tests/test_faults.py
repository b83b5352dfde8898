"""Faults and bad input: nothing lost, one clear line each (issue: faults and bad input)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from cdm import cascade, train as train_module
from cdm.cascade import load_cascade, sample_cascade
from cdm.config import load_config
from cdm.datasets import load_mnist
from cdm.errors import UserError
from cdm.train import train

from conftest import ROOT, run_in_process


def tiny(tmp_path, run="tiny", *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"out_dir={tmp_path}", f"run_name={run}", "data.download=false", *overrides])


def nan_on_calls(monkeypatch, bad_calls):
    """Make GaussianDiffusion.training_loss return nan on the given (0-based) call numbers."""
    original = train_module.GaussianDiffusion.training_loss
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        return losses * float("nan") if calls["n"] - 1 in bad_calls else losses

    monkeypatch.setattr(train_module.GaussianDiffusion, "training_loss", patched)


def test_a_non_finite_loss_skips_the_step_and_is_counted(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, {2})  # the base stage's loss at step 1 (base, sr1 alternate)
    path = train(tiny(tmp_path, "nan", "train.sample_every=0"), progress=False)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["metrics"]["skipped_steps"] == 1
    for entry in ckpt["stages"].values():
        assert all(torch.isfinite(v).all() for v in entry["model"].values())
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["base_skipped"] == 1 and rows[0]["sr1_skipped"] == 0
    assert rows[0]["base_grad_norm"] > 0


def test_repeated_non_finite_losses_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch):
    first = train(tiny(tmp_path, "div", "train.sample_every=0"), progress=False)  # 4 good steps
    before = first.read_bytes()
    nan_on_calls(monkeypatch, set(range(0, 100, 2)))  # every base step from now on
    with pytest.raises(UserError, match="all of the last 2 base steps were non-finite"):
        train(tiny(tmp_path, "div", "train.sample_every=0", "train.steps=8"), resume=first, progress=False)
    assert first.read_bytes() == before


def test_out_of_memory_in_sampling_retries_with_half_the_batch(tmp_path, monkeypatch, capsys):
    """The retry redraws from the generator state its batch began with: the samples are those of
    a run started at the smaller batch size, not a reshuffle of an already-advanced stream."""
    path = train(tiny(tmp_path, "oom", "train.sample_every=0"), progress=False)
    _, stages, _ = load_cascade(path, "cpu")
    original, sizes = cascade._sample_batch, []

    def flaky(stages, n, y, low_res, generator, *args):
        sizes.append(n)
        if n > 3:
            torch.randn(n, generator=generator)  # out of memory part-way, after drawing noise
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(stages, n, y, low_res, generator, *args)

    monkeypatch.setattr(cascade, "_sample_batch", flaky)
    out = sample_cascade(stages, 8, torch.Generator().manual_seed(0), batch_size=8)
    assert out.images.shape == (8, 1, 32, 32)
    assert sizes[:3] == [8, 4, 2]
    assert "retrying with 4" in capsys.readouterr().err
    monkeypatch.undo()
    small = sample_cascade(stages, 8, torch.Generator().manual_seed(0), batch_size=2)
    torch.testing.assert_close(out.images, small.images)


def test_out_of_memory_in_training_names_the_batch_keys(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_module, "cascade_step", oom)
    with pytest.raises(UserError, match=r"out of memory at step 0 with batch 8: lower the stages' optim.batch_size"):
        train(tiny(tmp_path, "oom2"), progress=False)


def test_missing_data_root_without_download(tmp_path):
    with pytest.raises(UserError, match="MNIST not found under data root"):
        load_mnist(str(tmp_path / "empty"), download=False, image_size=32, channels=1)


def start_training(tmp_path, run, steps):
    cmd = [sys.executable, "train_mnist.py", "--config", "configs/tiny.yaml", "--no-progress",
           "--set", f"out_dir={tmp_path}", "--set", f"run_name={run}", "--set", "data.download=false",
           "--set", f"train.steps={steps}", "--set", "train.save_every=5", "--set", "train.sample_every=0",
           "--set", "train.log_every=5"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_mid_training_resumes_like_an_uninterrupted_run(tmp_path):
    proc = start_training(tmp_path, "killed", 100000)
    ckpt_path = tmp_path / "killed" / "checkpoint.pt"
    wait_for(ckpt_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    step = torch.load(ckpt_path, weights_only=True)["step"]
    assert step % 5 == 0 and step > 0  # at most save_every steps were lost
    final = step + 5
    resumed = subprocess.run([sys.executable, "train_mnist.py", "--resume", str(ckpt_path), "--no-progress",
                              "--set", f"train.steps={final}"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = train(tiny(tmp_path, "straight", f"train.steps={final}", "train.save_every=5",
                          "train.sample_every=0", "train.log_every=5"), progress=False)
    a, b = torch.load(ckpt_path, weights_only=True), torch.load(straight, weights_only=True)
    assert a["step"] == b["step"] == final
    for index in (0, 1):
        for key, value in a["stages"][index]["ema"].items():
            assert torch.equal(value, b["stages"][index]["ema"][key]), key


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    proc = start_training(tmp_path, "interrupted", 100000)
    wait_for(tmp_path / "interrupted" / "metrics.jsonl")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "interrupted at step" in out and "--resume" in out and signal.Signals(signum).name in out
    assert "Traceback" not in err
    ckpt = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 1 and f"interrupted at step {ckpt['step']} " in out


def test_cli_argument_errors_are_one_line(tmp_path, capsys):
    for args in (["sample.py", "--checkpoint", "x.pt", "--num-samples", "0"],
                 ["sample.py", "--checkpoint", "x.pt", "--num-samples", "-3"],
                 ["train_mnist.py", "--bogus"],
                 ["-m", "cdm.evaluate", "--npz", "x.npz", "--floor-draws", "1"]):  # a floor needs a spread
        proc = run_in_process(*args, expect=2, capsys=capsys)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
        assert args[-2] in proc.stderr or args[-1] in proc.stderr, proc.stderr  # names the flag


def test_unwritable_out_folder(tmp_path):
    path = train(tiny(tmp_path, "w", "train.sample_every=0"), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(path), "--out",
                           str(blocker / "sub"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--out" in proc.stderr and "cannot write there" in proc.stderr


def test_run_folder_records_config_and_commit(tmp_path):
    train(tiny(tmp_path, "info", "train.sample_every=0"), progress=False)
    info = json.loads((tmp_path / "info" / "run_info.json").read_text())
    assert set(info) >= {"git_commit", "torch", "device"}
    assert load_config(tmp_path / "info" / "config.yaml") == tiny(tmp_path, "info", "train.sample_every=0")
