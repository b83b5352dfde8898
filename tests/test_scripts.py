"""The two scripts (and the two experiments in docs/experiments/) end to end, as a user runs them
(subprocesses, real MNIST from the shared root; the one-line error checks run in-process, which
reads the same exit status and stderr)."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cdm.unet import upsample_low_res

from conftest import ROOT, assert_one_line_error, run_in_process
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


def _experiment(name: str):
    """docs/experiments/<name>.py imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"docs/experiments/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_redraws_from_later_base_states_move_the_inputs_further():
    """docs/results.md 9.26: a redraw from the base's last state keeps a true 8x8 digit close;
    one from a deeper state moves it further (in the published file: 0.008 against 0.054)."""
    from cdm.cascade import load_cascade
    from cdm.data import downsample
    from cdm.datasets import load_data
    _, (base, _), _ = load_cascade(ROOT / "output/pretrained/cdm_mnist_cpu_2h_redraw.pt", "cpu")
    data = load_data("mnist", os.environ["CDM_DATA_ROOT"], False, 32, 1, train=False)
    generator = torch.Generator().manual_seed(0)
    digits, labels = data.batch(64, generator)
    low_res = downsample(digits, 8)  # (64, 1, 8, 8)
    redraw, change = _experiment("redraw_finetune").redraw, {}
    for t0 in (9, 159):
        redrawn = redraw(base, low_res, labels, [t0], generator)
        assert redrawn.shape == low_res.shape and redrawn.abs().max() <= 1.0
        change[t0] = (redrawn - low_res).abs().mean().item()
    assert change[9] < 0.03 < change[159]


@pytest.mark.parametrize("stage", [0, 1])
def test_the_fine_tuning_experiment_changes_only_the_stage_asked_for(tmp_path, stage, capsys):
    src, out = ROOT / "output/pretrained/cdm_mnist_cpu_2h_redraw.pt", tmp_path / "ft.pt"
    redraw = "0.5" if stage else "0"
    run("docs/experiments/redraw_finetune.py", str(src), str(out), "--stage", str(stage), "--redraw", redraw,
        "--steps", "2", "--warmup", "1")
    before, after = (torch.load(p, weights_only=True)["stages"] for p in (src, out))
    kept, tuned = before[1 - stage]["ema"], before[stage]["ema"]
    assert all(torch.equal(kept[k], after[1 - stage]["ema"][k]) for k in kept)
    assert any(not torch.equal(tuned[k], after[stage]["ema"][k]) for k in tuned)
    # bad arguments: exit code 2 and the message (in this process: no second interpreter start-up)
    bad_args = ([(["--steps", "1"], "--steps (1) must exceed --warmup (100)"),
                 (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                 (["--crop-size", "40"], "--crop-size is the SR stage's patch, 1 to 32 with --stage 1, got 40")]
                if stage else [(["--stage", "0"], "--stage 0 fine-tunes the base on true digits: give --redraw 0")])
    for bad, message in bad_args:
        proc = run_in_process("docs/experiments/redraw_finetune.py", str(src), str(out), *bad, expect=2, capsys=capsys)
        assert message in proc.stderr


def test_the_fine_tuning_experiment_trains_on_whole_images_when_asked(tmp_path, monkeypatch):
    """docs/results.md 9.31: --crop-size 32 --batch-size 4 trains the SR stage on whole 32x32
    images, 4 a step, and changes its weights."""
    src, out = ROOT / "output/pretrained/cdm_mnist_cpu_2h_redraw.pt", tmp_path / "ft.pt"
    module, targets = _experiment("redraw_finetune"), []
    random_crop = module.random_crop

    def crop(tensors, size, generator):  # records each training target's shape
        cropped = random_crop(tensors, size, generator)
        targets.append(cropped[0].shape)
        return cropped
    monkeypatch.setattr(module, "random_crop", crop)
    monkeypatch.setattr(sys, "argv", ["redraw_finetune.py", str(src), str(out), "--redraw", "0",
                                      "--crop-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1"])
    module.main()
    assert targets == [torch.Size([4, 1, 32, 32])] * 2
    before, after = (torch.load(p, weights_only=True)["stages"][1]["ema"] for p in (src, out))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_sr_experiment_averages_members_covers_with_tiles_and_guides(capsys):
    """docs/results.md 9.29: an ensemble returns the mean of its members' outputs; tiles that
    cover the image reproduce a pixel-wise network exactly, and the whole-image window the network;
    SR-only guidance mixes the label's and the null label's outputs."""
    from cdm.cascade import load_cascade
    experiment = _experiment("sr_ensemble")
    sr = [load_cascade(ROOT / f"output/pretrained/{name}.pt", "cpu")[1][1].model
          for name in ("cdm_mnist_cpu_2h_redraw", "cdm_mnist_cpu_default")]
    generator = torch.Generator().manual_seed(0)
    x, low_res = torch.randn(2, 1, 32, 32, generator=generator), torch.randn(2, 1, 8, 8, generator=generator)
    cond = {"t": torch.tensor([443, 110]), "low_res": low_res, "aug_level": torch.zeros(2, dtype=torch.long),
            "y": torch.tensor([3, 7])}
    with torch.no_grad():
        a, b = (m(x, **cond) for m in sr)
        torch.testing.assert_close(experiment.Ensemble(sr)(x, **cond), (a + b) / 2)
        torch.testing.assert_close(experiment.Tiled(sr[0], 32, 8)(x, **cond), a)
        torch.testing.assert_close(experiment.Tiled(experiment.Ensemble(sr), 32, 8)(x, **cond), (a + b) / 2)  # nested
        pixelwise = torch.nn.Module()
        pixelwise.num_classes, pixelwise.channels, pixelwise.upsample_mode = 10, 1, "bilinear"
        pixelwise.forward = lambda x, t, low_res, **_: x * low_res + t.view(-1, 1, 1, 1)
        expected = pixelwise(x, cond["t"], upsample_low_res(low_res, 32, "bilinear"))
        torch.testing.assert_close(experiment.Tiled(pixelwise, 16, 8)(x, **cond), expected)
        assert not torch.allclose(experiment.Tiled(sr[0], 16, 8)(x, **cond), a, atol=1e-3)  # a UNet is not
        null = sr[0](x, **{**cond, "y": torch.full((2,), 10)})  # the null label
        torch.testing.assert_close(experiment.Guided(sr[0], 0.5)(x, **cond), 1.5 * a - 0.5 * null)
    src = str(ROOT / "output/pretrained/cdm_mnist_cpu_2h_redraw.pt")
    uncond = str(ROOT / "output/pretrained/cdm_mnist_cpu_uncond.pt")
    for args, message in (([src, uncond], "does not take the inputs"),
                          ([src, "--tile", "12"], "must cover the 32x32 image exactly"),
                          ([uncond, "--sr-cfg-scale", "1"], "has no learned null label")):
        proc = run_in_process("docs/experiments/sr_ensemble.py", *args, "--out", "x.json", expect=2, capsys=capsys)
        assert message in proc.stderr
