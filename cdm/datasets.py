"""Training images behind one interface: MNIST, Fashion-MNIST, CIFAR-10 or a folder of images.

Every source becomes square images (N, channels, S, S) in [-1, 1] with integer labels, resized
once, by an antialiased bilinear filter (for MNIST: the whole train split, 28 -> 32, on the device).
A set that fits in `max_resident_mb` is kept on the training device as one tensor (`ResidentData`:
a batch is one index operation); a larger image folder is read from disk by DataLoader worker
processes (`StreamingData`), shuffled in an order drawn from the caller's generator. Grey data is
repeated to 3 channels; RGB sets are turned into luminance for 1 channel, except image folders,
where a colour image with data.channels 1 is an error (it would silently lose its colour).
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.transforms.v2.functional import center_crop, pil_to_tensor

from cdm.config import DATASETS
from cdm.data import to_model_range
from cdm.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # matched case-insensitively
# name -> (torchvision class, display name, the folder it needs under the data root)
_TORCHVISION = {
    "mnist": (MNIST, "MNIST", "MNIST/raw"),
    "fashion_mnist": (FashionMNIST, "Fashion-MNIST", "FashionMNIST/raw"),
    "cifar10": (CIFAR10, "CIFAR-10", "cifar-10-batches-py"),
}
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luminance weights of R, G, B
_LOAD_BATCH = 64  # images per worker batch when reading a folder into memory


class ResidentData:
    """The whole set as one tensor on the device; a batch is drawn with replacement."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images = images  # (N, C, S, S) in [-1, 1]
        self.labels = labels  # (N,) long
        self.classes = classes
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.images)

    def shard(self, rank: int, world_size: int) -> "ResidentData":
        """This rank's share (every world_size-th image) for data-parallel training."""
        return ResidentData(self.images[rank::world_size], self.labels[rank::world_size], self.classes)

    def head(self, n: int) -> torch.Tensor:
        """The first n images (n, C, S, S): fixed real inputs for previews of SR stages."""
        return self.images[:n]

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n random images (n, C, S, S) and their labels (n,)."""
        idx = torch.randint(0, len(self.images), (n,), generator=generator, device=self.images.device)
        return self.images[idx], self.labels[idx]


class StreamingData:
    """An image folder too large for memory, read by DataLoader workers, epoch after epoch.

    Each epoch is a fresh shuffle seeded from the generator given to `batch`, so a run with the
    same seed sees the same images in the same order. The last partial batch of an epoch is
    dropped: every batch has exactly n images.
    """

    def __init__(self, files: _ImageFiles, classes: list[str], device: torch.device | str,
                 workers: int):
        self.files = files
        self.classes = classes
        self.num_classes = len(classes)
        self.device = torch.device(device)
        self.workers = workers
        self._order = torch.Generator()  # the loader's shuffling, reseeded from `batch`'s generator
        self._loader: DataLoader | None = None
        self._batches = iter(())

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        """Every file's label (N,), in file order (as ResidentData.labels)."""
        return torch.tensor([label for _, label in self.files.samples])

    def shard(self, rank: int, world_size: int) -> "StreamingData":
        """This rank's share (every world_size-th file) for data-parallel training."""
        files = self.files
        share = _ImageFiles(files.root, files.samples[rank::world_size], files.image_size, files.channels)
        return StreamingData(share, self.classes, self.device, self.workers)

    def head(self, n: int) -> torch.Tensor:
        """The first n images in file order (n, C, S, S), on the device (as ResidentData.head)."""
        return torch.stack([self.files[i][0] for i in range(min(n, len(self.files)))]).to(self.device)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next n images (n, C, S, S) and their labels (n,), on the device."""
        if n > len(self.files):
            raise UserError(f"image folder '{self.files.root}': {len(self.files)} images, "
                            f"fewer than a batch of {n}")
        if self._loader is None or self._loader.batch_size != n:
            self._loader = DataLoader(self.files, batch_size=n, shuffle=True, generator=self._order,
                                      num_workers=self.workers, drop_last=True,
                                      persistent_workers=self.workers > 0,
                                      pin_memory=self.device.type == "cuda")
            self._batches = iter(())
        with _worker_errors():
            try:
                images, labels = next(self._batches)
            except StopIteration:  # a new epoch, in an order drawn from the caller's generator
                seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
                self._order.manual_seed(int(seed))
                self._batches = iter(self._loader)
                images, labels = next(self._batches)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class _ImageFiles(Dataset):
    """Image files as (image (channels, S, S) in [-1, 1], label) items, for a DataLoader."""

    def __init__(self, root: str, samples: list[tuple[str, int]], image_size: int, channels: int):
        self.root = root
        self.samples = samples  # (path, label)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return _read_image(path, self.image_size, self.channels), label


def load_data(dataset: str, root: str, download: bool, image_size: int, channels: int,
              train: bool = True, device: torch.device | str = "cpu", max_resident_mb: float = 2048,
              workers: int = 2) -> ResidentData | StreamingData:
    """The named data set as batches of (images (n, channels, S, S) in [-1, 1], labels (n,) long).

    mnist, fashion_mnist and cifar10 are torchvision's (downloaded into `root` if `download`), always
    resident. image_folder reads `root` (labels from its sub-folders, if they hold the images;
    `train` is ignored): resident when N * channels * S * S float32 fits in `max_resident_mb` MiB,
    else streamed by `workers` DataLoader processes.
    """
    if dataset in _TORCHVISION:
        return _load_torchvision(dataset, root, download, image_size, channels, train, device)
    if dataset != "image_folder":
        raise UserError(f"config key 'data.dataset': expected one of {', '.join(DATASETS)}, "
                        f"got {dataset!r}")
    samples, classes = _find_images(root)
    files = _ImageFiles(root, samples, image_size, channels)
    if len(files) * channels * image_size**2 * 4 > max_resident_mb * 2**20:
        return StreamingData(files, classes, device, workers)
    images = torch.empty(len(files), channels, image_size, image_size)  # (N, C, S, S)
    with _worker_errors():
        for start, (batch, _) in zip(range(0, len(files), _LOAD_BATCH),
                                     DataLoader(files, batch_size=_LOAD_BATCH, num_workers=workers)):
            images[start:start + len(batch)] = batch
    labels = torch.tensor([label for _, label in samples])
    return ResidentData(images.to(device), labels.to(device), classes)


def load_mnist(root: str, download: bool, image_size: int, channels: int, train: bool = True,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as tensors (images (N, channels, S, S) in [-1, 1], labels (N,) long): what the
    evaluation networks and the noisy-classifier report read."""
    data = _load_torchvision("mnist", root, download, image_size, channels, train, device)
    return data.images, data.labels


def _load_torchvision(dataset: str, root: str, download: bool, image_size: int, channels: int,
                      train: bool, device: torch.device | str) -> ResidentData:
    cls, name, folder = _TORCHVISION[dataset]
    try:
        data = cls(root=root, train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found ... You can use download=True ..."
        raise UserError(f"{name} not found under data root '{Path(root).resolve()}' "
                        f"(download={download}): {err}. Set data.root or $CDM_DATA_ROOT to a folder "
                        f"holding {folder}, or enable data.download") from None
    except OSError as err:
        raise UserError(f"could not download {name} into '{root}': {err}") from None
    pixels = torch.as_tensor(data.data)  # MNIST-like (N, H, W) or CIFAR-10 (N, H, W, 3), uint8
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)  # (N, C, H, W)
    images = _to_model_images(pixels, image_size, channels)
    return ResidentData(images.to(device), torch.as_tensor(data.targets).long().to(device),
                        list(data.classes))


def _to_model_images(pixels: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) -> (N, channels, S, S) float32 in [-1, 1]; RGB to 1 channel is
    luminance."""
    x = pixels.float().div(255)  # (N, C, H, W) in [0, 1]
    if x.shape[1] == 3 and channels == 1:
        x = (x * _LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)  # (N, 1, H, W)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                      antialias=True, align_corners=False).clamp(0, 1)
    return to_model_range(x).expand(-1, channels, -1, -1).contiguous()


def _find_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image and the class names: ImageFolder's layout when the root's
    sub-folders hold images (sorted folder names are the classes), else the root's own images,
    unlabelled (label 0, no classes)."""
    folder = Path(root)
    samples, classes = [], []
    if folder.is_dir():
        try:
            classes, class_to_idx = find_classes(root)
            samples = make_dataset(root, class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        except FileNotFoundError:  # no sub-folders
            pass
        if samples:
            found = {label for _, label in samples}
            empty = [name for i, name in enumerate(classes) if i not in found]
            if empty:
                raise UserError(f"image folder '{root}': class sub-folder(s) {', '.join(empty)} hold "
                                f"no images; remove them or add images")
        else:
            classes = []
            samples = sorted((str(p), 0) for p in folder.iterdir()
                             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not samples:
        raise UserError(f"image folder '{root}': no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return samples, classes


def _read_image(path: str, image_size: int, channels: int) -> torch.Tensor:
    """One image file -> (channels, S, S) float32 in [-1, 1]: centre-cropped square, resized."""
    try:
        with Image.open(path) as image:
            pixels = pil_to_tensor(image.convert("RGB"))  # (3, H, W) uint8
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"image '{path}' cannot be read: {err}") from None
    if channels == 1:
        if (pixels != pixels[:1]).any():
            raise UserError(f"image '{path}': has colour but data.channels is 1; set data.channels: 3")
        pixels = pixels[:1]  # (1, H, W)
    side = min(pixels.shape[-2:])
    square = center_crop(pixels, [side, side])  # (C, side, side)
    return _to_model_images(square[None], image_size, channels)[0]


def load_images(path: str | Path, channels: int) -> torch.Tensor:
    """Your own images, as sample.py --low-res takes them: one image file, a folder of image
    files (sorted by name) or an .npz whose uint8 `images` are (N, H, W, C), the layout sample.py
    writes. They must be square and all one size; they are not resized. Returns
    (N, channels, S, S) in [-1, 1]; grey is repeated to 3 channels, colour with 1 channel is an
    error naming the file."""
    source = Path(path)
    if source.suffix == ".npz" and source.is_file():
        images = load_npz_images(source)  # (N, C, H, W)
        if images.shape[-1] != images.shape[-2]:
            raise UserError(f"samples file '{source}': images are {images.shape[-2]}x{images.shape[-1]}, not square")
        if images.shape[1] == 3 and channels == 1:
            if (images != images[:, :1]).any():
                raise UserError(f"samples file '{source}': has colour but this cascade has 1 channel")
            images = images[:, :1]
        return images.expand(-1, channels, -1, -1).contiguous()
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"folder '{source}': no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    elif source.is_file():
        files = [source]
    else:
        raise UserError(f"'{source}': no such image file, folder or .npz")
    sizes = {}
    for file in files:
        try:
            with Image.open(file) as image:
                sizes[file] = image.size  # (W, H)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UserError(f"image '{file}' cannot be read: {err}") from None
    size = sizes[files[0]]
    for file, (w, h) in sizes.items():
        if w != h or (w, h) != size:
            raise UserError(f"image '{file}' is {w}x{h}; expected square images all of one size "
                            f"({size[0]}x{size[1]}, as '{files[0].name}')")
    return torch.stack([_read_image(str(file), size[0], channels) for file in files])


def load_npz_images(path: str | Path) -> torch.Tensor:
    """uint8 (N, H, W, C) `images` from an .npz -> float (N, C, H, W) in [-1, 1]."""
    try:
        images = np.load(path)["images"]
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"samples file '{path}': cannot read an 'images' array ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"samples file '{path}': expected uint8 images (N, H, W, C), "
                        f"got {images.dtype} {images.shape}")
    return to_model_range(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


@contextmanager
def _worker_errors() -> Iterator[None]:
    """A UserError raised in a DataLoader worker comes back with the worker's traceback in its
    message: re-raise it as its own one line."""
    try:
        yield
    except UserError as err:
        # torch's re-raise holds the DataLoader iterator in a reference cycle: free it now, so its
        # workers shut down at once and in order, not seconds later in the garbage collector
        traceback.clear_frames(err.__traceback__)
        prefix = f"{UserError.__module__}.{UserError.__qualname__}: "  # the traceback's last line
        raise UserError(str(err).rpartition(prefix)[2].strip()) from None
