"""Data parallelism on the CPU: torchrun with 2 processes and the gloo backend."""
import subprocess
import sys

import torch

from conftest import ROOT


def torchrun(tmp_path, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_mnist.py", "--no-progress", "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_train_save_once_and_resume(tmp_path):
    common = ["--set", f"out_dir={tmp_path}", "--set", "data.download=false", "--set", "train.sample_every=0"]
    proc = torchrun(tmp_path, "--config", "configs/tiny.yaml", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 4 steps") == 1  # rank 0 alone reports and writes
    path = tmp_path / "tiny" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    # each rank has its own stream (seed + rank): different data, noise and timesteps
    assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])
    assert len((tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()) == 2

    proc = torchrun(tmp_path, "--resume", str(path), "--set", "train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(path, weights_only=True)["step"] == 6

    single = subprocess.run([sys.executable, "train_mnist.py", "--resume", str(path), "--set", "train.steps=8",
                             "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 2 and "saved by 2 process(es)" in single.stderr
