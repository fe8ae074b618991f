"""Images for the edge client: numpy arrays and files (PNG/JPEG via Pillow, .npy) as (N, C, H, W) batches.

No torch here: edge devices need numpy and, for image files, Pillow. ``read_idx`` reads the
gzipped IDX files Fashion-MNIST ships in (``data/fashion-mnist-sample``).

    batch = as_batch(np.zeros((28, 28), np.uint8))      # (1, 1, 28, 28)
    items = load_images(["shoe.png", "samples/"])       # [(name, (1, 1, 28, 28) uint8), ...]
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# Files the client reads: Pillow-readable pictures, and numpy arrays of uint8 pixels.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy",)
SUFFIXES = PICTURE_SUFFIXES + ARRAY_SUFFIXES
# First three bytes of an IDX file of unsigned bytes: two zero bytes, then type code 0x08.
IDX_UBYTE_MAGIC = b"\x00\x00\x08"


def as_batch(images: np.ndarray) -> np.ndarray:
    """(H, W) one grey image, (N, H, W) N grey images, or (N, C, H, W) -> (N, C, H, W).

    uint8 arrays are raw pixels; float32 arrays must already be normalised as the model expects
    (``(pixel / 255 - mean) / std``, see ``EdgeClient.info()``). Other dtypes are refused.
    """
    array = np.asarray(images)
    if array.dtype not in (np.uint8, np.float32):
        raise TypeError(f"images must be uint8 pixels (or normalised float32), got dtype {array.dtype}; "
                        "convert with array.astype(np.uint8)")
    if array.ndim == 2:
        return array[None, None]  # (1, 1, H, W)
    if array.ndim == 3:
        return array[:, None]  # (N, 1, H, W)
    if array.ndim == 4:
        return array
    raise ValueError(f"images must have shape (H, W), (N, H, W) or (N, C, H, W); got {array.shape}")


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, plus the image and .npy files directly inside named directories (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path} holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def _picture(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image  # only the CLI and file paths need Pillow

    with Image.open(path) as img:
        grey = img.convert("L")
        if size and grey.size != (size, size):
            grey = grey.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(grey, dtype=np.uint8)[None, None]  # (1, 1, H, W)


def load_image_file(path: str | Path, size: int | None = None) -> np.ndarray:
    """One file -> (N, C, H, W): a picture (converted to grey, resized to ``size`` x ``size`` when given)
    or a .npy array (loaded without pickle, shapes as :func:`as_batch`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        try:
            return as_batch(np.load(path, allow_pickle=False))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    if suffix in PICTURE_SUFFIXES:
        return _picture(path, size)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use {', '.join(SUFFIXES)}")


def load_images(paths: Iterable[str | Path], size: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, (1, C, H, W) image) for every image in the files and directories ``paths``.

    A .npy file of N images gives N items named ``file[i]``.
    """
    items: list[tuple[str, np.ndarray]] = []
    for file in expand_paths(paths):
        batch = load_image_file(file, size)
        if batch.shape[0] == 1:
            items.append((str(file), batch))
        else:
            items.extend((f"{file}[{i}]", batch[i:i + 1]) for i in range(batch.shape[0]))
    return items


def read_idx(path: str | Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (the MNIST format, e.g. ``t10k-images-idx3-ubyte.gz``) as uint8.

    The same format ``matmamba.data`` reads for training; this reader lets edge devices load held-out
    images without torch.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[:3] != IDX_UBYTE_MAGIC:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {data.size} bytes of data")
    return data.reshape(shape)
