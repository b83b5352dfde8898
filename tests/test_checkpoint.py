import pytest
import torch

from cdm import checkpoint
from cdm.cascade import load_cascade
from cdm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cdm.train import train


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from cdm.config import load_config
    from conftest import ROOT
    out = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"out_dir={out}", "data.download=false",
                                                         "train.steps=2", "train.sample_every=0"])
    return train(cfg, progress=False)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"format_version": 2, "value": torch.tensor([1.0])}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(checkpoint.UserError, match="No space left on device"):
        save_checkpoint({"format_version": 2, "value": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["value"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "no temp file left behind"


def test_truncated_and_garbage_files(tiny_ckpt, tmp_path):
    data = tiny_ckpt.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "garbage.pt": b"\x00\x01 not a checkpoint" * 10,
             "config.yaml": b"train:\n  steps: 3\n"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


class Payload:
    """Not a tensor or plain data: weights_only loading must refuse to build it."""


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "obj": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot be read as a cdm checkpoint"):
        load_checkpoint(path)


def test_not_a_cdm_checkpoint_and_future_version(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no format_version"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_checkpoint(tmp_path / "future.pt")


def test_weights_that_do_not_fit_the_config(tiny_ckpt, tmp_path):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["config"]["stages"][0]["model"]["channels"] = 32  # stored weights were made with 16
    path = tmp_path / "mismatch.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="stage 0 ema weights does not fit"):
        load_cascade(path, "cpu")


def test_exported_ema_file_samples_but_cannot_resume(tiny_ckpt, tmp_path):
    out = checkpoint.export_ema(tiny_ckpt, tmp_path / "small.pt", ["stages.1.augment.aug_level=0"])
    assert out.stat().st_size < tiny_ckpt.stat().st_size / 3
    cfg, stages, _ = load_cascade(out, "cpu")
    assert cfg.stages[1].augment.aug_level == 0  # a sampling default changed on export
    _, full, _ = load_cascade(tiny_ckpt, "cpu")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    torch.testing.assert_close(stages[0].model(x, t), full[0].model(x, t), atol=2e-2, rtol=2e-2)
    with pytest.raises(CheckpointError, match="holds no stage 0 model state"):
        load_cascade(out, "cpu", use_ema=False)


def test_a_format_1_checkpoint_is_converted_on_load(tiny_ckpt, tmp_path):
    """Files written before stages were a list (entries base/sr, config keys base/sr/augment)
    load, sample and resume as today's layout."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    config = dict(ckpt["config"])
    base, sr = config.pop("stages")
    old = {"format_version": 1, "step": ckpt["step"], "rng": ckpt["rng"], "metrics": ckpt["metrics"],
           "config": {**config, "base": base, "sr": {k: v for k, v in sr.items() if k != "augment"},
                      "augment": sr["augment"]},
           "base": {k: v for k, v in ckpt["stages"][0].items() if k != "step"},
           "sr": {k: v for k, v in ckpt["stages"][1].items() if k != "step"}}
    path = tmp_path / "v1.pt"
    torch.save(old, path)
    cfg, stages, loaded = load_cascade(path, "cpu")
    assert loaded["format_version"] == checkpoint.FORMAT_VERSION and sorted(loaded["stages"]) == [0, 1]
    assert cfg.stages[1].augment.aug_level == sr["augment"]["aug_level"]
    _, today, _ = load_cascade(tiny_ckpt, "cpu")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    torch.testing.assert_close(stages[0].model(x, t), today[0].model(x, t))


def test_combine_refuses_overlap_gaps_and_stages_that_do_not_chain(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="every stage of .* is replaced by a later file"):
        checkpoint.combine([tiny_ckpt, tiny_ckpt], tmp_path / "x.pt")
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    only_sr = dict(ckpt, stages={1: dict(ckpt["stages"][1], step=99)})
    torch.save(only_sr, tmp_path / "sr.pt")
    replaced = torch.load(checkpoint.combine([tiny_ckpt, tmp_path / "sr.pt"], tmp_path / "r.pt"), weights_only=True)
    assert replaced["stages"][0]["step"] == ckpt["stages"][0]["step"] and replaced["stages"][1]["step"] == 99
    with pytest.raises(CheckpointError, match=r"no file holds stage\(s\) \[0\]"):
        checkpoint.combine([tmp_path / "sr.pt"], tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"holds stages \[1\], not \[0\].*combine it with"):
        load_cascade(tmp_path / "sr.pt", "cpu")
    other = dict(ckpt, stages={0: ckpt["stages"][0]})
    other["config"] = {**ckpt["config"], "stages": [dict(ckpt["config"]["stages"][0]), ckpt["config"]["stages"][1]]}
    other["config"]["stages"][0]["diffusion"] = {**other["config"]["stages"][0]["diffusion"], "schedule": "linear"}
    torch.save(other, tmp_path / "base_linear.pt")
    with pytest.raises(CheckpointError, match="stage 1 in .* was trained on 8x8 inputs noised with .*do not chain"):
        checkpoint.combine([tmp_path / "base_linear.pt", tmp_path / "sr.pt"], tmp_path / "x.pt")


def test_combine_joins_a_base_trained_with_another_loss_weight(tiny_ckpt, tmp_path):
    """Only the forward process must match between a stage and the next one's augmentation:
    a base retrained with min-SNR weighting still chains with an SR stage trained before it."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    base = dict(ckpt, stages={0: ckpt["stages"][0]})
    base["config"] = {**ckpt["config"], "stages": [dict(ckpt["config"]["stages"][0]), ckpt["config"]["stages"][1]]}
    base["config"]["stages"][0]["diffusion"] = {**base["config"]["stages"][0]["diffusion"], "loss_weight": "min_snr"}
    torch.save(base, tmp_path / "base_min_snr.pt")
    torch.save(dict(ckpt, stages={1: ckpt["stages"][1]}), tmp_path / "sr.pt")
    cfg, stages, _ = load_cascade(checkpoint.combine([tmp_path / "sr.pt", tmp_path / "base_min_snr.pt"],
                                                     tmp_path / "both.pt"), "cpu")
    assert cfg.stages[0].diffusion.loss_weight == "min_snr" and len(stages) == 2
