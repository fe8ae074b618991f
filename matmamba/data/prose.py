"""English prose: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``.

The R package stores each novel as a character vector (one element per printed line) in an
R lazy-load database (``data/Rdata.rdx`` index + ``data/Rdata.rdb`` blobs). We read it with the
PyPI package ``rdata``; R is not needed. ``prepare_prose`` writes the joined text once to
``austen.txt`` with an ``austen.json`` manifest; ``load_prose`` serves fixed splits from it.

Corpus text: the novels in publication order (AUSTEN_NOVELS), lines stripped of trailing
spaces and joined with "\\n"; each run of empty lines becomes one empty line, so paragraphs are
separated by "\\n\\n", and so are the novels.

Splits, by character position, each boundary moved forward to the next paragraph start:
    "train"  the first 96%,
    "val"    the next 2%  (PROSE_VAL_FRACTION),
    "test"   the last 2%  (PROSE_TEST_FRACTION, the end of "Persuasion").
The three are disjoint and concatenate to the whole corpus.

Prepare once (``make setup`` does this)::

    python -m matmamba.data.prose --prepare --deb r-cran-janeaustenr_1.0.0-1_all.deb
    python -m matmamba.data.prose --prepare --download     # runs `apt-get download` first
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# (R object name, title), in publication order: the order of the novels in the corpus.
AUSTEN_NOVELS: tuple[tuple[str, str], ...] = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
DEBIAN_PACKAGE = "r-cran-janeaustenr"
R_PACKAGE_SUBDIR = Path("usr/lib/R/site-library/janeaustenr")  # inside the .deb or the file system
PROSE_DIR_ENV = "MATMAMBA_PROSE_DIR"
DEFAULT_PROSE_DIR = Path(__file__).resolve().parents[2] / ".data" / "prose"
TEXT_FILE = "austen.txt"
MANIFEST_FILE = "austen.json"
PROSE_SPLITS = ("train", "val", "test")
PROSE_VAL_FRACTION = 0.02
PROSE_TEST_FRACTION = 0.02
PARAGRAPH_BREAK = "\n\n"

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER_LEN = 60  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2
_PREPARE_HINT = (
    "Create it with `python -m matmamba.data.prose --prepare --download` (or `--deb PATH` to a "
    f"downloaded {DEBIAN_PACKAGE} .deb; `make setup` runs this), or set {PROSE_DIR_ENV} to a "
    f"directory holding {TEXT_FILE} and {MANIFEST_FILE}."
)


def _ar_member(deb: Path, prefix: str) -> tuple[str, bytes]:
    """Return (name, bytes) of the first member of the ar archive ``deb`` whose name starts with prefix."""
    data = deb.read_bytes()
    if not data.startswith(_AR_MAGIC):
        raise ValueError(f"{deb} is not a Debian package (no ar header); download it again.")
    pos = len(_AR_MAGIC)
    while pos + _AR_HEADER_LEN <= len(data):
        header = data[pos : pos + _AR_HEADER_LEN]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = data[pos + _AR_HEADER_LEN : pos + _AR_HEADER_LEN + size]
        if name.startswith(prefix):
            return name, body
        pos += _AR_HEADER_LEN + size + (size % 2)  # members are padded to an even offset
    raise ValueError(f"{deb} has no {prefix}* member; it is truncated or not a binary package.")


def _extract_deb(deb: Path, dest: Path) -> None:
    """Extract the file tree of ``deb`` into ``dest`` with dpkg-deb, or in Python when it is absent."""
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
        return
    name, body = _ar_member(deb, "data.tar")
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            tar.extractall(dest, filter="data")
    except tarfile.ReadError as exc:
        raise ValueError(
            f"Cannot read {name} in {deb} without dpkg-deb ({exc}); install dpkg (`apt-get install dpkg`)."
        ) from exc


def _find_r_data_dir(root: Path) -> Path:
    """Find the janeaustenr ``data`` directory under an extracted root, the R package dir, or itself."""
    for candidate in (root / R_PACKAGE_SUBDIR / "data", root / "data", root):
        if (candidate / "Rdata.rdx").is_file() and (candidate / "Rdata.rdb").is_file():
            return candidate
    raise FileNotFoundError(
        f"No janeaustenr data (data/Rdata.rdx, Rdata.rdb) under {root}. Pass the {DEBIAN_PACKAGE} .deb, "
        f"its extracted root (with {R_PACKAGE_SUBDIR}), or the R package directory."
    )


def _decompress_blob(blob: bytes, compressed: int) -> bytes:
    """Undo R's lazy-load compression: 4-byte big-endian length, then (type byte,) payload."""
    length = int.from_bytes(blob[:4], "big")
    if compressed in (2, 3):  # R >= 2.10 with bzip2/xz: a type byte precedes the payload
        kind, payload = blob[4:5], blob[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if kind not in decoders:
            raise ValueError(f"Unknown R lazy-load compression type {kind!r}.")
        raw = decoders[kind](payload)
    else:
        raw = zlib.decompress(blob[4:])
    if len(raw) != length:
        raise ValueError(f"R lazy-load blob decompressed to {len(raw)} bytes, header says {length}.")
    return raw


def read_r_lazyload(data_dir: Path, stem: str = "Rdata") -> dict[str, Any]:
    """Read every object of an R lazy-load database (``{stem}.rdx`` + ``{stem}.rdb``) with ``rdata``.

    Returns:
        {object name: converted Python object}; a character vector becomes a numpy str array.
    """
    try:
        import rdata
    except ImportError as exc:
        raise ImportError(
            "Reading the Austen novels needs the PyPI package `rdata` (pip install rdata)."
        ) from exc
    index = rdata.read_rds(data_dir / f"{stem}.rdx")
    compressed = int(index["compressed"][0])
    blobs = (data_dir / f"{stem}.rdb").read_bytes()
    objects = {}
    for name, (offset, size) in index["variables"].items():
        raw = _decompress_blob(blobs[int(offset) : int(offset) + int(size)], compressed)
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
    return objects


def join_lines(lines: list[str]) -> str:
    """Join printed lines into text: trailing spaces dropped, runs of empty lines -> one paragraph break."""
    text = "\n".join(line.rstrip() for line in lines)
    return re.sub(r"\n{3,}", PARAGRAPH_BREAK, text).strip("\n")


def extract_austen(deb_or_dir: str | Path) -> str:
    """Return the six novels as one string (see the module docstring for the layout).

    Args:
        deb_or_dir: the ``r-cran-janeaustenr`` .deb, its extracted root (``/`` where it is
            installed), or the janeaustenr R package directory.
    """
    source = Path(deb_or_dir)
    if not source.exists():
        raise FileNotFoundError(
            f"{source} does not exist; pass the {DEBIAN_PACKAGE} .deb or its extracted root."
        )
    if source.is_file():
        with tempfile.TemporaryDirectory(prefix="janeaustenr-") as tmp:
            _extract_deb(source, Path(tmp))
            return extract_austen(tmp)
    objects = read_r_lazyload(_find_r_data_dir(source))
    missing = [name for name, _ in AUSTEN_NOVELS if name not in objects]
    if missing:
        raise ValueError(f"janeaustenr data under {source} lacks {missing}; expected version 1.0.0 or later.")
    return PARAGRAPH_BREAK.join(
        join_lines([str(line) for line in objects[name]]) for name, _ in AUSTEN_NOVELS
    )


def prose_dir(root: str | Path | None = None) -> Path:
    """The prepared-corpus directory: ``root``, else $MATMAMBA_PROSE_DIR, else <repo>/.data/prose."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(PROSE_DIR_ENV) or DEFAULT_PROSE_DIR)


def split_bounds(text: str) -> tuple[int, int]:
    """Character offsets (val_start, test_start): train = [0, a), val = [a, b), test = [b, len).

    Each target offset is moved forward to the start of the next paragraph.
    """

    def paragraph_start_after(target: int) -> int:
        found = text.find(PARAGRAPH_BREAK, target)
        if found < 0:
            raise ValueError(
                f"The corpus ({len(text)} chars) has no paragraph break after char {target}; "
                "it is too small to split. Re-run the prepare step."
            )
        return found + len(PARAGRAPH_BREAK)

    val_start = paragraph_start_after(int(len(text) * (1 - PROSE_VAL_FRACTION - PROSE_TEST_FRACTION)))
    test_start = paragraph_start_after(max(val_start, int(len(text) * (1 - PROSE_TEST_FRACTION))))
    return val_start, test_start


def prepare_prose(out_dir: str | Path | None = None, source: str | Path = "/") -> Path:
    """Write ``austen.txt`` (UTF-8) and the ``austen.json`` manifest into ``out_dir``.

    Args:
        out_dir: target directory (default: see ``prose_dir``).
        source: anything ``extract_austen`` accepts; "/" reads an installed r-cran-janeaustenr.

    Returns:
        The directory written.
    """
    text = extract_austen(source)
    out = prose_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    (out / TEXT_FILE).write_bytes(data)
    val_start, test_start = split_bounds(text)
    manifest = {
        "source": f"Debian {DEBIAN_PACKAGE} ({Path(source).name or source}), R data objects "
        + ", ".join(name for name, _ in AUSTEN_NOVELS),
        "novels": [title for _, title in AUSTEN_NOVELS],
        "sha256": hashlib.sha256(data).hexdigest(),
        "chars": len(text),
        "bytes": len(data),
        "splits": {"train": [0, val_start], "val": [val_start, test_start], "test": [test_start, len(text)]},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def load_prose(split: str, root: str | Path | None = None) -> str:
    """Return one split ("train", "val" or "test") of the prepared corpus as a string.

    Raises:
        FileNotFoundError: the corpus has not been prepared (the message gives the command).
        ValueError: unknown split, or the text no longer matches its manifest.
    """
    if split not in PROSE_SPLITS:
        raise ValueError(f"Unknown prose split {split!r}; expected one of {PROSE_SPLITS}.")
    directory = prose_dir(root)
    text_path, manifest_path = directory / TEXT_FILE, directory / MANIFEST_FILE
    if not text_path.is_file() or not manifest_path.is_file():
        raise FileNotFoundError(f"The prose corpus is not prepared in {directory}. {_PREPARE_HINT}")
    data = text_path.read_bytes()
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ValueError(f"{text_path} does not match the sha256 in {manifest_path}. {_PREPARE_HINT}")
    text = data.decode("utf-8")
    val_start, test_start = split_bounds(text)
    bounds = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, len(text))}
    start, end = bounds[split]
    return text[start:end]


def download_deb(dest_dir: Path) -> Path:
    """Run ``apt-get download r-cran-janeaustenr`` in ``dest_dir`` and return the .deb path."""
    if not shutil.which("apt-get"):
        raise FileNotFoundError(
            f"apt-get is not available; download {DEBIAN_PACKAGE} elsewhere and pass --deb."
        )
    command = ["apt-get", "download", DEBIAN_PACKAGE]
    result = subprocess.run(command, cwd=dest_dir, capture_output=True, text=True, check=False)
    debs = sorted(dest_dir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(
            f"`apt-get download {DEBIAN_PACKAGE}` failed: {result.stderr.strip()}. "
            "Run `apt-get update` first, or pass --deb with a downloaded .deb."
        )
    return debs[-1]


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--prepare`` with ``--deb PATH``, ``--download``, or an installed package."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prepare", action="store_true", help="write austen.txt and austen.json")
    parser.add_argument("--deb", type=Path, help=f"a downloaded {DEBIAN_PACKAGE} .deb (or an extracted root)")
    parser.add_argument(
        "--download", action="store_true", help=f"run `apt-get download {DEBIAN_PACKAGE}` first"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default {DEFAULT_PROSE_DIR})"
    )
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.error("nothing to do; pass --prepare")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="janeaustenr-deb-") as tmp:
        if args.deb is not None:
            source = args.deb
        elif args.download:
            source = download_deb(Path(tmp))
        elif (Path("/") / R_PACKAGE_SUBDIR).is_dir():
            source = Path("/")
        else:
            parser.error(f"{DEBIAN_PACKAGE} is not installed; pass --deb PATH or --download")
        out = prepare_prose(args.out, source)
    manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    logger.info("wrote %s: %d chars, splits %s", out / TEXT_FILE, manifest["chars"], manifest["splits"])


if __name__ == "__main__":
    main()
