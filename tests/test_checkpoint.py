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
    save_checkpoint({"format_version": 1, "value": torch.tensor([1.0])}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(checkpoint.UserError, match="No space left on device"):
        save_checkpoint({"format_version": 1, "value": torch.tensor([2.0])}, path)
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
    ckpt["config"]["base"]["model"]["channels"] = 32  # stored weights were made with 16
    path = tmp_path / "mismatch.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="base ema weights does not fit"):
        load_cascade(path, "cpu")


def test_exported_ema_file_samples_but_cannot_resume(tiny_ckpt, tmp_path):
    out = checkpoint.export_ema(tiny_ckpt, tmp_path / "small.pt", ["augment.aug_level=0"])
    assert out.stat().st_size < tiny_ckpt.stat().st_size / 3
    cfg, stages, _ = load_cascade(out, "cpu")
    assert cfg.augment.aug_level == 0  # a sampling default changed on export
    _, full, _ = load_cascade(tiny_ckpt, "cpu")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    torch.testing.assert_close(stages["base"].model(x, t), full["base"].model(x, t), atol=2e-2, rtol=2e-2)
    with pytest.raises(CheckpointError, match="holds no base model state"):
        load_cascade(out, "cpu", use_ema=False)
