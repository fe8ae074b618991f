"""Fashion-MNIST from local IDX files: loading, the train/val split, normalisation, batches.

Nothing is downloaded. The full set (70,000 images) comes from the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``); a held-out
sample of the first 2,000 test images ships in the repository (``data/fashion-mnist-sample``)
so the demo runs on machines without the package.

Splits:
    "train"        55,000 images of the 60k training file (fixed seeded permutation).
    "val"           5,000 images of the 60k training file, disjoint from "train".
    "test"         the 10,000-image test file.
    "test-sample"  the first 2,000 images of the test file, shipped in the repository.

Example::

    images, labels = load_fashion_mnist("test-sample")  # (2000, 28, 28) uint8, (2000,) int64
    for x, y in ImageBatches(images, labels, batch_size=256, shuffle=False):
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

FMNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(FMNIST_CLASSES)
IMAGE_SIZE = 28  # images are IMAGE_SIZE x IMAGE_SIZE, one grey channel

# Mean and std of pixel/255 over all 55,000 * 28 * 28 pixels of the "train" split, computed with
# x = load_fashion_mnist("train")[0].double() / 255; (x.mean().item(), x.std().item()).
FMNIST_MEAN = 0.28587
FMNIST_STD = 0.35297

# The train/val split: np.random.default_rng(FMNIST_SPLIT_SEED).permutation(60000);
# the last FMNIST_VAL_SIZE indices are "val", the rest "train" (each kept in file order).
FMNIST_SPLIT_SEED = 20240607
FMNIST_TRAIN_FILE_SIZE = 60_000
FMNIST_TEST_FILE_SIZE = 10_000
FMNIST_VAL_SIZE = 5_000
FMNIST_SAMPLE_SIZE = 2_000  # first images of the test file shipped in data/fashion-mnist-sample

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SAMPLE_DIR = REPO_ROOT / "data" / "fashion-mnist-sample"
FMNIST_DIR_ENV = "MATMAMBA_FMNIST_DIR"
FMNIST_SAMPLE_DIR_ENV = "MATMAMBA_FMNIST_SAMPLE_DIR"
SPLITS = ("train", "val", "test", "test-sample")

CROP_PADDING = 2  # pixels of zero padding around each image before the random 28x28 crop

_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type Fashion-MNIST uses
_IMAGE_MAGIC = (_IDX_UBYTE << 8) | 3  # 0x00000803: ubyte, 3 dimensions (N, 28, 28)
_LABEL_MAGIC = (_IDX_UBYTE << 8) | 1  # 0x00000801: ubyte, 1 dimension (N,)


class IDXFormatError(ValueError):
    """An IDX file is corrupt, truncated, or not the expected kind."""


def _fix_hint(path: Path) -> str:
    return (
        f"Replace {path}: `apt-get install --reinstall dataset-fashion-mnist` for the full set, "
        "or `python -m matmamba.data.make_sample` for the shipped sample."
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes.

    Returns:
        A uint8 array whose shape is the one in the file header, e.g. (N, 28, 28) or (N,).

    Raises:
        IDXFormatError: the file is not gzip, is truncated, or its header or size is wrong.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise IDXFormatError(f"{path} is not a readable gzip file ({exc}). {_fix_hint(path)}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXFormatError(f"{path} does not start with an IDX magic number. {_fix_hint(path)}")
    if raw[2] != _IDX_UBYTE:
        raise IDXFormatError(f"{path} holds IDX type 0x{raw[2]:02x}, expected 0x08 (unsigned byte).")
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(f"{path} is truncated inside its header. {_fix_hint(path)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header_len != expected:
        raise IDXFormatError(
            f"{path} header says shape {shape} ({expected} bytes) but holds {len(raw) - header_len} "
            f"bytes of data. {_fix_hint(path)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array of any shape as a gzipped IDX file, byte-for-byte reproducible."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx writes uint8 only, got {array.dtype}; convert with .astype(np.uint8).")
    header = bytes([0, 0, _IDX_UBYTE, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as raw_file, gzip.GzipFile(fileobj=raw_file, mode="wb", filename="", mtime=0) as f:
        f.write(header + array.tobytes())


def _read_pair(directory: Path, prefix: str, expected_n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``{prefix}-images-idx3-ubyte.gz`` (N, 28, 28) and ``{prefix}-labels-idx1-ubyte.gz`` (N,)."""
    image_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    label_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise IDXFormatError(f"{image_path} has shape {images.shape}, expected (N, 28, 28).")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise IDXFormatError(f"{label_path} has shape {labels.shape}, expected ({images.shape[0]},).")
    if expected_n is not None and images.shape[0] != expected_n:
        raise IDXFormatError(f"{image_path} holds {images.shape[0]} images, expected {expected_n}.")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise IDXFormatError(f"{label_path} holds label {labels.max()}, expected 0..{NUM_CLASSES - 1}.")
    return images, labels


def fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """The full-set directory: ``root``, else $MATMAMBA_FMNIST_DIR, else /usr/share/datasets/fashion-mnist."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FMNIST_DIR_ENV) or DEFAULT_FMNIST_DIR)


def fashion_mnist_sample_dir(root: str | Path | None = None) -> Path:
    """The shipped-sample directory: ``root``, else $MATMAMBA_FMNIST_SAMPLE_DIR, else <repo>/data/..."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FMNIST_SAMPLE_DIR_ENV) or DEFAULT_SAMPLE_DIR)


def has_full_fashion_mnist(root: str | Path | None = None) -> bool:
    """Whether the four full-set files exist (so "train", "val" and "test" can load)."""
    directory = fashion_mnist_dir(root)
    return all(
        (directory / f"{prefix}-{kind}-ubyte.gz").is_file()
        for prefix in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )


def available_fashion_mnist_splits(root: str | Path | None = None) -> list[str]:
    """The splits loadable here (``root``: the full set), e.g. ["test-sample"] without the Debian package."""
    splits = ["train", "val", "test"] if has_full_fashion_mnist(root) else []
    sample = fashion_mnist_sample_dir()
    if (sample / "t10k-images-idx3-ubyte.gz").is_file() and (sample / "t10k-labels-idx1-ubyte.gz").is_file():
        splits.append("test-sample")
    return splits


def train_val_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices into the 60k training file: (55,000,) for "train" and (5,000,) for "val", both sorted."""
    perm = np.random.default_rng(FMNIST_SPLIT_SEED).permutation(FMNIST_TRAIN_FILE_SIZE)
    cut = FMNIST_TRAIN_FILE_SIZE - FMNIST_VAL_SIZE
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def _require_dir(directory: Path, split: str) -> None:
    if split == "test-sample":
        if not (directory / "t10k-images-idx3-ubyte.gz").is_file():
            raise FileNotFoundError(
                f"The Fashion-MNIST sample is missing from {directory}. Regenerate it with "
                f"`python -m matmamba.data.make_sample`, or set {FMNIST_SAMPLE_DIR_ENV} to its directory."
            )
    elif not has_full_fashion_mnist(directory):
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {directory}. Install it with `apt-get install dataset-fashion-mnist`, "
            f"or set {FMNIST_DIR_ENV} to a directory holding the four *-ubyte.gz files. Without it, "
            'load the shipped split "test-sample".'
        )


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST.

    Args:
        split: "train", "val", "test" or "test-sample" (see the module docstring).
        root: directory of the files for this split; defaults to $MATMAMBA_FMNIST_DIR or the Debian
            path for the full set, and $MATMAMBA_FMNIST_SAMPLE_DIR or <repo>/data/fashion-mnist-sample
            for "test-sample". "test" never falls back to the sample.

    Returns:
        images: uint8 (N, 28, 28); labels: int64 (N,) with values in 0..9.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}; expected one of {SPLITS}.")
    directory = fashion_mnist_sample_dir(root) if split == "test-sample" else fashion_mnist_dir(root)
    _require_dir(directory, split)
    if split == "test-sample":
        images, labels = _read_pair(directory, "t10k", None)
    elif split == "test":
        images, labels = _read_pair(directory, "t10k", FMNIST_TEST_FILE_SIZE)
    else:
        images, labels = _read_pair(directory, "train", FMNIST_TRAIN_FILE_SIZE)
        train_idx, val_idx = train_val_indices()
        keep = train_idx if split == "train" else val_idx
        images, labels = images[keep], labels[keep]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Scale uint8 images (N, 28, 28) or (N, 1, 28, 28) to float32 (N, 1, 28, 28) with train mean/std."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 pixels, got {images.dtype}.")
    if images.dim() == 3:
        images = images.unsqueeze(1)  # (N, 1, 28, 28)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(
            f"Expected images of shape (N, 28, 28) or (N, 1, 28, 28), got {tuple(images.shape)}."
        )
    return (images.to(torch.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding, vectorised over the batch.

    Args:
        images: uint8 (B, H, W).
        generator: CPU generator; the same generator state gives the same output.

    Returns:
        uint8 (B, H, W): each image flipped with probability 1/2, then shifted by up to
        CROP_PADDING pixels in each direction with zeros (background) filling the gap.
    """
    b, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5  # (B,)
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)  # (B, H + 2p, W + 2p)
    top = torch.randint(0, 2 * CROP_PADDING + 1, (b,), generator=generator)  # (B,)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (b,), generator=generator)  # (B,)
    rows = top[:, None] + torch.arange(h)  # (B, H)
    cols = left[:, None] + torch.arange(w)  # (B, W)
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W)


class ImageBatches:
    """Mini-batches of normalised images, optionally shuffled and augmented.

    Each pass yields ``(x, y)`` with x float32 (B, 1, 28, 28) and y int64 (B,); the last batch may
    be smaller unless ``drop_last``. Pass ``e`` (0, 1, 2, ...) draws its order and augmentation from
    a generator seeded with ``seed + e``, so a run is reproducible and can resume with ``set_epoch``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        augment: bool = False,
        drop_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(f"images must be uint8 (N, 28, 28), got {images.dtype} {tuple(images.shape)}.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.images, self.labels = images, labels.to(torch.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.drop_last = augment, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the given epoch (to resume a run at the same order)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = self.images.shape[0]
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            batch = self.images[idx]  # (B, 28, 28) uint8
            if self.augment:
                batch = augment_images(batch, generator)
            yield normalize_images(batch), self.labels[idx]
