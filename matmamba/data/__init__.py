"""Local data for MatMamba: Fashion-MNIST images, Jane Austen prose, and tokenizers.

Nothing here downloads at run time; see DESIGN.md "Data" for where each data set comes from.
The prose functions load on first use, so ``python -m matmamba.data.prose`` runs its module once.
"""

from typing import TYPE_CHECKING, Any

from matmamba.data.fashion_mnist import (
    FMNIST_CLASSES,
    FMNIST_MEAN,
    FMNIST_STD,
    IDXFormatError,
    ImageBatches,
    augment_images,
    available_fashion_mnist_splits,
    has_full_fashion_mnist,
    load_fashion_mnist,
    normalize_images,
    read_idx,
    write_idx,
)
from matmamba.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from matmamba.data.prose import extract_austen, load_prose, prepare_prose

_LAZY_PROSE = ("extract_austen", "load_prose", "prepare_prose")


def __getattr__(name: str) -> Any:
    """Import the prose module on first access to one of its functions."""
    if name in _LAZY_PROSE:
        from matmamba.data import prose

        return getattr(prose, name)
    raise AttributeError(f"module 'matmamba.data' has no attribute {name!r}")


__all__ = [
    "FMNIST_CLASSES",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "BPETokenizer",
    "ByteTokenizer",
    "IDXFormatError",
    "ImageBatches",
    "Tokenizer",
    "augment_images",
    "available_fashion_mnist_splits",
    "extract_austen",
    "has_full_fashion_mnist",
    "load_fashion_mnist",
    "load_prose",
    "load_tokenizer",
    "normalize_images",
    "prepare_prose",
    "read_idx",
    "write_idx",
]
