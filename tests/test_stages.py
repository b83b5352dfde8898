"""The general cascade: N stages, subsets trained apart and combined, --until and --low-res."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cdm.cascade import load_cascade, sample_cascade, with_augment
from cdm.checkpoint import CheckpointError, combine
from cdm.config import load_config
from cdm.errors import UserError
from cdm.train import train

from conftest import ROOT, assert_one_line_error, run_in_process, run_script
from test_train import state_tensors


def tiny3_config(tmp_path) -> str:
    """configs/tiny.yaml with a 16x16 SR stage inserted: 8 -> 16 -> 32."""
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    middle = yaml.safe_load(yaml.safe_dump(data["stages"][1]))
    middle["image_size"] = 16
    data["stages"].insert(1, middle)
    path = tmp_path / "tiny3.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def tiny3(tmp_path, run, *overrides):
    return load_config(tiny3_config(tmp_path), [f"out_dir={tmp_path}", f"run_name={run}",
                                                "data.download=false", "train.sample_every=0", *overrides])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A tiny 3-stage cascade trained for 4 steps, with previews; its middle stage works on 2x2
    patches (model.patch_size), so every use of it also runs a patched stage."""
    tmp = tmp_path_factory.mktemp("three")
    return train(tiny3(tmp, "three", "train.sample_every=4", "stages.1.model.patch_size=2"), progress=False)


def test_three_stages_train_preview_and_sample_in_both_modes(three):
    grids = three.parent / "samples"
    for name in ("base", "sr1", "cascade", "side_by_side"):
        assert (grids / f"{name}_step000004.png").is_file(), name
    cfg, stages, ckpt = load_cascade(three, "cpu")
    assert sorted(ckpt["stages"]) == [0, 1, 2] and [s.name for s in stages] == ["base", "sr1", "sr2"]
    assert stages[2].low_res_diffusion is not None and stages[1].cfg.image_size == 16
    assert stages[1].model.input_conv.in_channels == 8  # (x_t, low-res) in 2x2 patches
    for mode in ("truncated", "non_truncated"):
        chain = [with_augment(s, aug_level=30, aug_mode=mode) for s in stages]
        out = sample_cascade(chain, 3, torch.Generator().manual_seed(0))
        assert [tuple(x.shape) for x in out.outputs.values()] == [(3, 1, 8, 8), (3, 1, 16, 16), (3, 1, 32, 32)]
        assert [tuple(x.shape) for x in out.low_res.values()] == [(3, 1, 8, 8), (3, 1, 16, 16)]
        assert torch.isfinite(out.images).all()


def test_three_stage_resume_equals_an_uninterrupted_run(tmp_path):
    straight = torch.load(train(tiny3(tmp_path, "straight", "train.steps=4"), progress=False), weights_only=True)
    half = train(tiny3(tmp_path, "resumed", "train.steps=2"), progress=False)
    resumed = torch.load(train(tiny3(tmp_path, "resumed", "train.steps=4"), resume=half, progress=False),
                         weights_only=True)
    pairs = list(zip(state_tensors(straight), state_tensors(resumed)))
    assert len(pairs) > 30 and {name.split(".")[0] for name, _ in state_tensors(straight)} == {"0", "1", "2"}
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name


def layout(ckpt: dict) -> dict:
    """Every entry's key path and, for tensors, shape: what a checkpoint holds, not its values."""
    def walk(value, prefix=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{prefix}{k}/")
        elif isinstance(value, torch.Tensor):
            yield prefix, tuple(value.shape)
        elif not isinstance(value, (list, str)):
            yield prefix, type(value).__name__
    return dict(walk({k: v for k, v in ckpt.items() if k not in ("config", "metrics", "rng")}))


def test_subsets_trained_apart_combine_into_the_joint_layout_and_resume(tmp_path):
    joint = torch.load(train(tiny3(tmp_path, "joint", "train.steps=2"), progress=False), weights_only=True)
    base = train(tiny3(tmp_path, "base_only", "train.steps=2", "train.stages=[0]"), progress=False)
    srs = train(tiny3(tmp_path, "sr_only", "train.steps=3", "train.stages=[1, 2]", "train.sample_every=3"),
                progress=False)
    assert sorted(torch.load(srs, weights_only=True)["stages"]) == [1, 2]
    assert (srs.parent / "samples" / "side_by_side_step000003.png").is_file()  # previewed from real inputs
    # resume works for a subset: the SR stages continue where they stopped
    more = train(tiny3(tmp_path, "sr_only", "train.steps=4", "train.stages=[1, 2]"), resume=srs, progress=False)
    assert torch.load(more, weights_only=True)["stages"][1]["step"] == 4
    both = combine([base, more], tmp_path / "combined.pt")
    combined = torch.load(both, weights_only=True)
    assert layout(combined) == layout(joint)
    _, stages, _ = load_cascade(both, "cpu")
    assert sample_cascade(stages, 2, torch.Generator().manual_seed(0)).images.shape == (2, 1, 32, 32)
    proc = run_script("-m", "cdm.checkpoint", "combine", str(base), str(more), str(tmp_path / "c2.pt"))
    assert "wrote" in proc.stdout and torch.load(tmp_path / "c2.pt", weights_only=True)["stages"].keys() == {0, 1, 2}


def test_a_two_stage_files_base_starts_a_three_stage_cascade(two, three, tmp_path):
    """combine takes the cascade's length from its longest file: the base of a published
    2-stage file joins SR stages trained apart for 8 -> 16 -> 32, and the chain check still
    refuses the 2-stage file's 8 -> 32 stage in front of a stage that wants 16x16 inputs."""
    whole = torch.load(three, weights_only=True)
    srs, last = tmp_path / "sr_only.pt", tmp_path / "last_only.pt"  # as --stages 1,2 and --stages 2 save them
    torch.save(dict(whole, stages={i: whole["stages"][i] for i in (1, 2)}), srs)
    torch.save(dict(whole, stages={2: whole["stages"][2]}), last)
    cfg, stages, ckpt = load_cascade(combine([two, srs], tmp_path / "three.pt"), "cpu")
    assert [s.image_size for s in cfg.stages] == [8, 16, 32] and sorted(ckpt["stages"]) == [0, 1, 2]
    base = torch.load(two, weights_only=True)["stages"][0]
    assert ckpt["stages"][0]["ema"].keys() == base["ema"].keys()
    assert all(torch.equal(value, base["ema"][key]) for key, value in ckpt["stages"][0]["ema"].items())
    assert sample_cascade(stages, 2, torch.Generator().manual_seed(0)).images.shape == (2, 1, 32, 32)
    with pytest.raises(CheckpointError, match="stage 2 in .* was trained on 16x16 inputs .* makes 32x32"):
        combine([two, last], tmp_path / "x.pt")


def test_resuming_a_subset_checkpoint_for_a_stage_it_lacks_is_refused(tmp_path):
    base = train(tiny3(tmp_path, "b", "train.steps=1", "train.stages=[0]"), progress=False)
    with pytest.raises(UserError, match=r"holds stages \[0\], not \[1, 2\]"):
        train(tiny3(tmp_path, "b", "train.steps=2", "train.stages=[1, 2]"), resume=base, progress=False)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    return train(load_config(ROOT / "configs" / "tiny.yaml", [f"out_dir={tmp}", "data.download=false",
                                                              "train.steps=2", "train.sample_every=0"]),
                 progress=False)


def test_until_stops_after_a_stage(three, tmp_path):
    run_script("sample.py", "--checkpoint", str(three), "--until", "1", "--num-samples", "3",
               "--out", str(tmp_path), "--device", "cpu")
    data = np.load(tmp_path / "samples.npz")
    assert data["images"].shape == (3, 16, 16, 1) and data["base"].shape == (3, 8, 8, 1)
    assert "sr1" not in data  # the last stage run is `images`


def write_pngs(folder, count, size, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("source", ["png", "folder", "npz", "top_size"])
def test_low_res_super_resolves_your_own_images(three, tmp_path, source, capsys):
    pngs = write_pngs(tmp_path / "mine", 3, 32 if source == "top_size" else 16)
    if source == "png":
        path, count = pngs / "01.png", 1
    elif source == "npz":  # the layout sample.py writes: a run stopped after stage 1
        run_in_process("sample.py", "--checkpoint", str(three), "--until", "1", "--num-samples", "2",
                       "--out", str(tmp_path / "first"), "--device", "cpu", capsys=capsys)
        path, count = tmp_path / "first" / "samples.npz", 2
    else:
        path, count = pngs, 3
    out = tmp_path / "out"
    run_in_process("sample.py", "--checkpoint", str(three), "--low-res", str(path), "--out", str(out),
                   "--device", "cpu", capsys=capsys)
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (count, 32, 32, 1)
    entry = 8 if source == "top_size" else 16  # top-size images are the truth, downsampled to the base
    assert data["input"].shape == (count, entry, entry, 1)
    if source == "png":
        given = np.asarray(Image.open(path))[None, :, :, None]
        assert np.abs(data["input"].astype(int) - given).max() <= 1  # your image, not resized
    columns = 4 if source == "top_size" else 2  # [truth |] input | the stage outputs
    width = Image.open(out / "side_by_side.png").size[0]
    assert ((width - 2) // (32 + 2)) % columns == 0  # whole chains per row


@pytest.mark.parametrize("make, flags, message", [
    (lambda d: write_pngs(d / "x", 2, 12), [], "images are 12x12; this cascade's stages make [8, 16, 32]"),
    (lambda d: d / "nothing.png", [], "no such image file, folder or .npz"),
    (lambda d: write_pngs(d / "empty", 0, 8), [], "no images"),
    (lambda d: write_pngs(d / "rgb", 1, 16, "RGB"), [], "has colour but data.channels is 1"),
    (lambda d: write_pngs(d / "ok", 1, 16), ["--until", "0"], "--until 0: expected a stage index in 2..2"),
])
def test_low_res_and_until_errors_are_one_line(three, tmp_path, make, flags, message, capsys):
    path = make(tmp_path)
    proc = run_in_process("sample.py", "--checkpoint", str(three), "--low-res", str(path), "--device", "cpu",
                          *flags, expect=2, capsys=capsys)
    assert_one_line_error(proc, message)


def test_mixed_image_sizes_name_the_file(three, tmp_path, capsys):
    folder = write_pngs(tmp_path / "mixed", 2, 16)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "zz.png")
    proc = run_in_process("sample.py", "--checkpoint", str(three), "--low-res", str(folder), "--device", "cpu",
                          expect=2, capsys=capsys)
    assert_one_line_error(proc, "zz.png' is 8x8; expected square images all of one size (16x16")


def test_until_out_of_range_on_two_stages(two, capsys):
    proc = run_in_process("sample.py", "--checkpoint", str(two), "--until", "2", "--device", "cpu", expect=2,
                          capsys=capsys)
    assert_one_line_error(proc, "--until 2: expected a stage index in 0..1")


def test_train_mnist_stages_flag_sets_the_subset(tmp_path, capsys):
    proc = run_script("train_mnist.py", "--config", "configs/tiny.yaml", "--stages", "1", "--set",
                      f"out_dir={tmp_path}", "--set", "data.download=false", "--set", "train.steps=1",
                      "--set", "train.sample_every=0", "--no-progress")
    assert "done: 1 steps" in proc.stdout
    assert sorted(torch.load(tmp_path / "tiny" / "checkpoint.pt", weights_only=True)["stages"]) == [1]
    proc = run_in_process("train_mnist.py", "--config", "configs/tiny.yaml", "--stages", "0,2", expect=2,
                          capsys=capsys)
    assert_one_line_error(proc, "config key 'train.stages': expected [] (all) or consecutive")
