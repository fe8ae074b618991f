"""Regenerate the shipped Fashion-MNIST sample: the first 2,000 images of the 10k test set.

Usage::

    python -m matmamba.data.make_sample                      # from the Debian package into data/
    python -m matmamba.data.make_sample --source DIR --out DIR --count 2000

The files are written with a zeroed gzip timestamp, so regenerating gives identical bytes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from matmamba.data.fashion_mnist import (
    DEFAULT_SAMPLE_DIR,
    FMNIST_SAMPLE_SIZE,
    FMNIST_TEST_FILE_SIZE,
    load_fashion_mnist,
    write_idx,
)

logger = logging.getLogger(__name__)


def make_sample(
    out_dir: str | Path, source: str | Path | None = None, count: int = FMNIST_SAMPLE_SIZE
) -> Path:
    """Write the first ``count`` test images (count, 28, 28) and labels (count,) as gzipped IDX files.

    Args:
        out_dir: directory to write ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
        source: the full Fashion-MNIST directory (default: $MATMAMBA_FMNIST_DIR or the Debian path).
        count: how many images, from the start of the test file.

    Returns:
        The output directory.
    """
    if not 0 < count <= FMNIST_TEST_FILE_SIZE:
        raise ValueError(f"count must be in 1..{FMNIST_TEST_FILE_SIZE}, got {count}.")
    images, labels = load_fashion_mnist("test", root=source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "t10k-images-idx3-ubyte.gz", images[:count].numpy())
    write_idx(out / "t10k-labels-idx1-ubyte.gz", labels[:count].numpy().astype("uint8"))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: parse arguments and write the sample."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=None, help="full Fashion-MNIST directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_SAMPLE_DIR, help="output directory")
    parser.add_argument("--count", type=int, default=FMNIST_SAMPLE_SIZE, help="number of test images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_sample(args.out, args.source, args.count)
    logger.info("wrote %d test images to %s", args.count, out)


if __name__ == "__main__":
    main()
