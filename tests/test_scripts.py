"""The two scripts end to end, as a user runs them (subprocesses, real MNIST from the shared root;
the one-line error checks run in-process, which reads the same exit status and stderr)."""
import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_in_process
from conftest import run_script as run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run("train_mnist.py", "--config", "configs/tiny.yaml", "--set", f"out_dir={out}",
        "--set", "data.download=false", "--set", "train.steps=6", "--no-progress")
    return out / "tiny"


def test_train_mnist_smoke_run_writes_grids_and_checkpoint(trained):
    assert (trained / "checkpoint.pt").is_file()
    assert (trained / "metrics.jsonl").read_text().count("\n") == 3  # log_every = 2
    for name in ("base", "cascade", "side_by_side"):
        assert (trained / "samples" / f"{name}_step000006.png").is_file()
    assert (trained / "config.yaml").is_file() and (trained / "run_info.json").is_file()


@pytest.mark.parametrize("mode", ["truncated", "non_truncated"])
def test_sample_writes_pngs_and_npz(trained, tmp_path, mode):
    out = tmp_path / mode
    proc = run("sample.py", "--checkpoint", str(trained / "checkpoint.pt"), "--num-samples", "10",
               "--batch-size", "4", "--aug-mode", mode, "--aug-level", "20", "--out", str(out),
               "--device", "cpu")
    assert str(out / "samples.npz") in proc.stdout
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (10, 32, 32, 1) and data["images"].dtype == np.uint8
    assert data["base"].shape == (10, 8, 8, 1) and data["base"].dtype == np.uint8
    assert "labels" not in data  # unconditional
    assert Image.open(out / "cascade.png").size[0] > 32 * 3


def test_sampling_is_deterministic_for_a_seed(trained, tmp_path):
    arrays = []
    for name in ("a", "b"):
        run("sample.py", "--checkpoint", str(trained / "checkpoint.pt"), "--num-samples", "4",
            "--seed", "3", "--out", str(tmp_path / name), "--device", "cpu", "--sampler", "ddpm",
            "--steps", "5", "--spacing", "quadratic")
        arrays.append(np.load(tmp_path / name / "samples.npz")["images"])
    assert np.array_equal(*arrays)


@pytest.mark.parametrize("args, message", [
    (["train_mnist.py", "--config", "configs/tiny.yaml", "--set", "train.stepz=3"],
     "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["train_mnist.py", "--config", "configs/missing.yaml"], "config file 'configs/missing.yaml': cannot read it"),
    (["sample.py", "--checkpoint", "nowhere.pt"], "checkpoint 'nowhere.pt': no such file"),
    (["sample.py", "--checkpoint", "configs/tiny.yaml"], "not a torch checkpoint file"),
    (["-m", "cdm.evaluate", "--npz", "s.npz", "--spacing", "karras"],
     "--spacing 'karras': expected uniform or quadratic"),
    (["-m", "cdm.evaluate", "--npz", "s.npz", "--split", "-5"],
     "--split -5: expected a number of held-out digits, or 0 to skip"),
    (["-m", "cdm.evaluate", "--npz", "s.npz", "--classes", "stratified"],
     "--classes stratified: an .npz keeps the classes it was drawn with; score .npz files without it"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, capsys):
    assert_one_line_error(run_in_process(*args, expect=2, capsys=capsys), message)


def test_evaluate_refuses_stratified_classes_for_an_unconditional_checkpoint(trained, tmp_path, capsys):
    path = trained / "checkpoint.pt"
    out = run_in_process("-m", "cdm.evaluate", "--checkpoint", str(path), "--classes", "stratified",
                         "--out", str(tmp_path), "--device", "cpu", expect=2, capsys=capsys)
    assert_one_line_error(out, f"--classes stratified: '{path}' is not class-conditional")


def test_sample_rejects_an_aug_level_outside_the_trained_range(trained):
    proc = run("sample.py", "--checkpoint", str(trained / "checkpoint.pt"), "--aug-level", "999",
               "--device", "cpu", expect=2)
    assert "trained on levels 0..200" in proc.stderr
