"""load_data on every source: MNIST exactly as the project always prepared it, tiny Fashion-MNIST and CIFAR-10 files in
their real on-disk formats, generated image folders (resident and streamed), and the user errors."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar
from PIL import Image
from torchvision.datasets import MNIST, FashionMNIST

from cdm.datasets import ResidentData, StreamingData, load_data
from cdm.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _root() -> str:
    return os.environ.get("CDM_DATA_ROOT", "/work/shared/data")


def _one_line_error(call, *fragments) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message
    return message


def _png(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def reference_mnist(train: bool, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as every published checkpoint was trained on it: 28 -> 32 antialiased bilinear,
    [-1, 1], the grey channel repeated."""
    dataset = MNIST(root=_root(), train=train, download=False)
    digits = dataset.data.unsqueeze(1).float().div(255)  # (N, 1, 28, 28)
    images = F.interpolate(digits, size=(32, 32), mode="bilinear", antialias=True,
                           align_corners=False).clamp(0, 1) * 2 - 1
    return images.expand(-1, channels, -1, -1).contiguous(), dataset.targets.long()


@pytest.mark.parametrize("train, channels", [(True, 1), (False, 3)])
def test_mnist_is_prepared_as_before(train, channels):
    data = load_data("mnist", _root(), False, 32, channels, train=train)
    images, labels = reference_mnist(train, channels)
    assert isinstance(data, ResidentData)
    assert torch.equal(data.images, images) and torch.equal(data.labels, labels)
    assert len(data) == (60000 if train else 10000) and data.num_classes == 10
    # the batch formula of existing runs, bit for bit
    got = data.batch(16, torch.Generator().manual_seed(3))
    idx = torch.randint(0, len(images), (16,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got[0], images[idx]) and torch.equal(got[1], labels[idx])


def _write_idx(path, magic: int, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    splits = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) + 3
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, pixels)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, labels)
        splits[prefix] = pixels, labels
    for train, prefix in ((True, "train"), (False, "t10k")):
        data = load_data("fashion_mnist", str(tmp_path), False, 28, 1, train=train)
        pixels, labels = splits[prefix]
        expected = torch.from_numpy(pixels).float().div(255).unsqueeze(1) * 2 - 1  # identity resize
        assert torch.equal(data.images, expected)
        assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.long
    assert data.classes == FashionMNIST.classes and data.num_classes == 10
    big = load_data("fashion_mnist", str(tmp_path), False, 32, 3)
    assert big.images.shape == (6, 3, 32, 32) and big.images.dtype == torch.float32
    assert big.images.min() >= -1 and big.images.max() <= 1
    assert torch.equal(big.images[:, 0], big.images[:, 2])  # grey repeated


def _cifar_row(left, right) -> np.ndarray:
    """One CIFAR-10 row: 3 planes of 32x32 (R, G, B), `left` colour in columns 0-15, `right` after."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16], image[:, 16:] = left, right
    return image.transpose(2, 0, 1).reshape(3072)


def test_cifar10_from_batch_files(tmp_path, monkeypatch):
    # torchvision checks the md5 of the real files: accept any existing file (loading still runs)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    colours = [RED, GREEN, BLUE, (255, 128, 0), (90, 90, 90)]
    # str keys, as torchvision reads the real (Python 2) pickles with encoding="latin1"
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                              "data_batch_5", "test_batch"]):
        rows = np.stack([_cifar_row(colours[i % 5], colours[i % 5]), _cifar_row(RED, BLUE)])
        (folder / name).write_bytes(pickle.dumps({"data": rows, "labels": [i, 9]}))
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))

    data = load_data("cifar10", str(tmp_path), False, 32, 3)
    assert data.images.shape == (10, 3, 32, 32) and data.classes == names and data.num_classes == 10
    assert data.labels.tolist() == [0, 9, 1, 9, 2, 9, 3, 9, 4, 9]
    red, orange, split = data.images[0], data.images[6], data.images[1]
    assert (red[0] == 1).all() and (red[1:] == -1).all()
    torch.testing.assert_close(orange[1], torch.full((32, 32), 128 / 255 * 2 - 1))
    assert (split[0, :, :16] == 1).all() and (split[2, :, :16] == -1).all()  # planes, not pixels
    assert (split[2, :, 16:] == 1).all() and (split[0, :, 16:] == -1).all()

    grey = load_data("cifar10", str(tmp_path), False, 16, 1, train=False)
    assert grey.images.shape == (2, 1, 16, 16) and grey.labels.tolist() == [5, 9]
    luma = load_data("cifar10", str(tmp_path), False, 32, 1).images[[0, 2, 4], 0, 5, 5]
    torch.testing.assert_close(luma, torch.tensor([0.299, 0.587, 0.114]) * 2 - 1)


def test_image_folder_with_class_folders(tmp_path):
    stripes = Image.new("RGB", (30, 10), GREEN)  # green | red | blue: the centre crop is red
    stripes.paste(RED, (10, 0, 20, 10))
    stripes.paste(BLUE, (20, 0, 30, 10))
    (tmp_path / "cat").mkdir()
    stripes.save(tmp_path / "cat" / "stripes.PNG")
    _png(tmp_path / "cat" / "deeper" / "red.png", (12, 12), RED)
    _png(tmp_path / "dog" / "blue.png", (20, 30), BLUE)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")

    data = load_data("image_folder", str(tmp_path), False, 8, 3, workers=0)
    assert isinstance(data, ResidentData) and len(data) == 3
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    assert data.images.shape == (3, 3, 8, 8) and data.labels.tolist() == [0, 0, 1]
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(data.images[0], red)  # cropped, not squashed
    torch.testing.assert_close(data.images[2], red.flip(0))  # blue


def test_image_folder_unlabelled_grey(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", (9, 7), 60 * i, mode="L")
    for channels in (1, 3):
        data = load_data("image_folder", str(tmp_path), False, 4, channels, workers=0)
        assert data.num_classes == 0 and data.classes == []
        assert data.images.shape == (3, channels, 4, 4) and data.labels.tolist() == [0, 0, 0]
        expected = (torch.tensor([0, 60, 120]) / 255 * 2 - 1)[:, None].expand(3, channels)
        torch.testing.assert_close(data.images[:, :, 0, 0], expected)


def _streaming_folder(root, n=12):
    """n solid images; class a red, class b blue, each with its own intensity."""
    for i in range(n):
        colour = (20 * i + 10, 0, 0) if i % 2 == 0 else (0, 0, 20 * i + 10)
        _png(root / ("a" if i % 2 == 0 else "b") / f"{i}.png", (10, 10), colour)


def test_image_folder_streams_when_too_large(tmp_path):
    _streaming_folder(tmp_path)

    def first_batches(seed, count):
        data = load_data("image_folder", str(tmp_path), False, 8, 3, max_resident_mb=1e-3, workers=2)
        assert isinstance(data, StreamingData) and len(data) == 12 and data.classes == ["a", "b"]
        generator = torch.Generator().manual_seed(seed)
        return [data.batch(5, generator) for _ in range(count)]

    batches = first_batches(0, 3)
    for images, labels in batches:
        assert images.shape == (5, 3, 8, 8) and labels.shape == (5,) and labels.dtype == torch.long
        red, blue = images[:, 0, 0, 0], images[:, 2, 0, 0]
        assert torch.equal(labels, (blue > red).long())  # each label is its image's folder
    ids = torch.cat([images[:, :, 0, 0].sum(1) for images, _ in batches[:2]])
    assert len(set(ids.round(decimals=4).tolist())) == 10  # one epoch: no image twice
    same = first_batches(0, 1)[0]
    assert torch.equal(same[0], batches[0][0]) and torch.equal(same[1], batches[0][1])
    assert not torch.equal(first_batches(1, 1)[0][0], batches[0][0])


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    for folder in (empty, tmp_path / "missing"):
        _one_line_error(lambda: load_data("image_folder", str(folder), False, 8, 3),
                        f"image folder '{folder}'", "no images (.png, .jpg")

    colour = tmp_path / "colour"
    _png(colour / "grey.png", (8, 8), 128, mode="L")
    _png(colour / "red.png", (8, 8), RED)
    _one_line_error(lambda: load_data("image_folder", str(colour), False, 8, 1, workers=0),
                    f"image '{colour / 'red.png'}': has colour", "set data.channels: 3")

    classes = tmp_path / "classes"
    _png(classes / "a" / "x.png", (8, 8), RED)
    (classes / "b").mkdir()
    _one_line_error(lambda: load_data("image_folder", str(classes), False, 8, 3, workers=0),
                    f"image folder '{classes}'", "sub-folder(s) b hold no images")

    small = tmp_path / "small"
    _png(small / "x.png", (8, 8), RED)
    data = load_data("image_folder", str(small), False, 8, 3, max_resident_mb=0, workers=0)
    _one_line_error(lambda: data.batch(2, torch.Generator()), f"image folder '{small}'", "1 images")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_one_line_even_from_a_worker(tmp_path, workers):
    _png(tmp_path / "good.png", (8, 8), RED)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    _one_line_error(lambda: load_data("image_folder", str(tmp_path), False, 8, 3, workers=workers),
                    f"image '{tmp_path / 'bad.png'}' cannot be read: ")


def test_unknown_dataset():
    _one_line_error(lambda: load_data("x", _root(), False, 8, 1),
                    "config key 'data.dataset': expected one of mnist, fashion_mnist, cifar10, "
                    "image_folder, got 'x'")


@pytest.mark.parametrize("dataset, name", [("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST"),
                                           ("cifar10", "CIFAR-10")])
def test_missing_torchvision_dataset(tmp_path, dataset, name):
    _one_line_error(lambda: load_data(dataset, str(tmp_path), False, 8, 1),
                    f"{name} not found under data root '{tmp_path.resolve()}'",
                    "$CDM_DATA_ROOT", "data.download")


def test_an_rgb_image_folder_trains_and_samples_in_three_channels(tmp_path, capsys):
    """3 channels end to end: training on coloured PNGs, previews, sample.py's npz and grids."""
    from conftest import run_in_process

    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        for i in range(6):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # colour, not square
            (tmp_path / "images" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    run_in_process("train_mnist.py", "--config", "configs/tiny.yaml", "--no-progress", "--set", f"out_dir={tmp_path}",
                   "--set", "data.dataset=image_folder", "--set", f"data.root={tmp_path / 'images'}",
                   "--set", "data.channels=3", "--set", "data.workers=0", "--set", "train.steps=2",
                   "--set", "train.sample_every=2", capsys=capsys)
    run_dir = tmp_path / "tiny"
    assert Image.open(run_dir / "samples" / "cascade_step000002.png").mode == "RGB"
    run_in_process("sample.py", "--checkpoint", str(run_dir / "checkpoint.pt"), "--num-samples", "3",
                   "--out", str(tmp_path / "s"), "--device", "cpu", capsys=capsys)
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (3, 32, 32, 3) and data["base"].shape == (3, 8, 8, 3)
