"""Tests for matmamba.data: IDX parsing, Fashion-MNIST splits and batches, prose, tokenizers.

Fast CPU tests. Those needing the Debian package dataset-fashion-mnist skip without it; those on
the shipped sample (data/fashion-mnist-sample) and on synthetic files in tmp_path always run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from matmamba.data import fashion_mnist as fm
from matmamba.data import prose
from matmamba.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

HAS_FULL = fm.has_full_fashion_mnist()
needs_full = pytest.mark.skipif(not HAS_FULL, reason="apt-get install dataset-fashion-mnist to run")


# ---------------------------------------------------------------- IDX files


def _idx_bytes(magic_dims: int, shape: tuple[int, ...], data: bytes) -> bytes:
    """An IDX file written by hand from the format spec (independent of write_idx)."""
    header = bytes([0, 0, 0x08, magic_dims]) + b"".join(d.to_bytes(4, "big") for d in shape)
    return gzip.compress(header + data)


def test_read_idx_parses_handwritten_file(tmp_path: Path) -> None:
    pixels = bytes(range(2 * 3 * 4))
    (tmp_path / "x.gz").write_bytes(_idx_bytes(3, (2, 3, 4), pixels))
    array = fm.read_idx(tmp_path / "x.gz")
    assert array.dtype == np.uint8 and array.shape == (2, 3, 4)
    assert array[1, 2, 3] == 23 and array[0, 1, 0] == 4


def test_write_idx_round_trips_and_is_reproducible(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    fm.write_idx(tmp_path / "a.gz", array)
    fm.write_idx(tmp_path / "b.gz", array)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not gzip at all", "not a readable gzip file"),
        (gzip.compress(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big")), "truncated inside its header"),
        (_idx_bytes(1, (10,), bytes(7)), "holds 7 bytes"),
        (gzip.compress(b"\x12\x34\x08\x01" + (1).to_bytes(4, "big") + b"\x00"), "magic number"),
        (gzip.compress(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00" * 4), "expected 0x08"),
        (_idx_bytes(1, (4,), bytes(4))[:-6], "not a readable gzip file"),  # truncated gzip stream
    ],
)
def test_corrupt_idx_raises_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(content)
    with pytest.raises(fm.IDXFormatError, match=message) as info:
        fm.read_idx(path)
    assert str(path) in str(info.value)


def _write_sample_dir(directory: Path, n: int, label_max: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % (label_max + 1)).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    fm.write_idx(directory / "t10k-images-idx3-ubyte.gz", images)
    fm.write_idx(directory / "t10k-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_corrupt_pair_in_a_split_is_reported(tmp_path: Path) -> None:
    _write_sample_dir(tmp_path, 16, label_max=12)
    with pytest.raises(fm.IDXFormatError, match=r"expected 0\.\.9"):
        fm.load_fashion_mnist("test-sample", root=tmp_path)
    fm.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(fm.IDXFormatError, match=r"expected \(16,\)"):
        fm.load_fashion_mnist("test-sample", root=tmp_path)


# ---------------------------------------------------------------- Fashion-MNIST splits


def test_missing_full_set_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fm.FMNIST_DIR_ENV, str(tmp_path / "nowhere"))
    assert not fm.has_full_fashion_mnist()
    for split in ("train", "val", "test"):
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            fm.load_fashion_mnist(split)
    assert "test-sample" in fm.available_fashion_mnist_splits()
    assert "test" not in fm.available_fashion_mnist_splits()


def test_missing_sample_says_how_to_regenerate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(fm.FMNIST_SAMPLE_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"matmamba\.data\.make_sample"):
        fm.load_fashion_mnist("test-sample")


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="test-sample"):
        fm.load_fashion_mnist("validation")


def test_sample_dir_env_and_root_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _write_sample_dir(tmp_path / "s", 12)
    monkeypatch.setenv(fm.FMNIST_SAMPLE_DIR_ENV, str(tmp_path / "s"))
    for x, y in (
        fm.load_fashion_mnist("test-sample"),
        fm.load_fashion_mnist("test-sample", root=tmp_path / "s"),
    ):
        assert torch.equal(x, torch.from_numpy(images)) and y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(labels).long())


def test_train_val_indices_are_a_fixed_disjoint_partition() -> None:
    train, val = fm.train_val_indices()
    assert train.shape == (55_000,) and val.shape == (5_000,)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(60_000))
    assert val[:5].tolist() == [0, 9, 12, 24, 27]  # pinned: a change here changes every reported result


def test_shipped_sample_loads() -> None:
    images, labels = fm.load_fashion_mnist("test-sample")
    assert images.shape == (2000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (2000,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < len(fm.FMNIST_CLASSES)
    assert torch.bincount(labels, minlength=10).min() > 150  # roughly balanced, all ten classes present
    assert len(fm.FMNIST_CLASSES) == 10


@needs_full
def test_full_splits_sizes_and_disjointness() -> None:
    train_x, train_y = fm.load_fashion_mnist("train")
    val_x, val_y = fm.load_fashion_mnist("val")
    test_x, test_y = fm.load_fashion_mnist("test")
    assert train_x.shape == (55_000, 28, 28) and train_y.shape == (55_000,)
    assert val_x.shape == (5_000, 28, 28) and val_y.shape == (5_000,)
    assert test_x.shape == (10_000, 28, 28) and test_y.shape == (10_000,)
    raw = torch.from_numpy(fm.read_idx(fm.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").copy())
    train_idx, val_idx = fm.train_val_indices()
    assert torch.equal(raw[train_idx], train_x) and torch.equal(raw[val_idx], val_x)
    sample_x, sample_y = fm.load_fashion_mnist("test-sample")
    assert torch.equal(sample_x, test_x[:2000]) and torch.equal(sample_y, test_y[:2000])


@needs_full
def test_normalisation_constants_match_train_split() -> None:
    x = fm.normalize_images(fm.load_fashion_mnist("train")[0][:20_000])
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


# ---------------------------------------------------------------- normalisation, augmentation, batches


def test_normalize_images_shapes_and_errors() -> None:
    images = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    out = fm.normalize_images(images)
    assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, (1 - fm.FMNIST_MEAN) / fm.FMNIST_STD))
    assert torch.equal(fm.normalize_images(images.unsqueeze(1)), out)
    with pytest.raises(TypeError, match="uint8"):
        fm.normalize_images(images.float())


def _augment_candidates_ref(image: torch.Tensor) -> list[torch.Tensor]:
    """Every image the augmentation may produce from one (28, 28) image: 2 flips x 5 x 5 shifts."""
    p = fm.CROP_PADDING
    outs = []
    for flipped in (image, image.flip(-1)):
        padded = torch.nn.functional.pad(flipped, (p, p, p, p))
        outs += [padded[t : t + 28, s : s + 28] for t in range(2 * p + 1) for s in range(2 * p + 1)]
    return outs


def test_augment_images_matches_reference_and_is_seeded() -> None:
    images = torch.randint(
        1, 256, (64, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    out = fm.augment_images(images, torch.Generator().manual_seed(7))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for source, augmented in zip(images, out, strict=True):
        assert any(torch.equal(augmented, c) for c in _augment_candidates_ref(source))
    assert torch.equal(out, fm.augment_images(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, fm.augment_images(images, torch.Generator().manual_seed(8)))
    assert not torch.equal(out, images)


def _collect(batches: fm.ImageBatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(batches)


def test_image_batches_shapes_and_determinism() -> None:
    images = torch.randint(
        0, 256, (100, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    labels = torch.arange(100) % 10
    plain = fm.ImageBatches(images, labels, batch_size=32, shuffle=False)
    assert len(plain) == 4
    xs, ys = zip(*_collect(plain), strict=True)
    assert [x.shape[0] for x in xs] == [32, 32, 32, 4] and xs[0].shape[1:] == (1, 28, 28)
    assert torch.equal(torch.cat(xs), fm.normalize_images(images)) and torch.equal(torch.cat(ys), labels)

    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return _collect(
            fm.ImageBatches(images, labels, 32, shuffle=True, seed=seed, augment=True, drop_last=True)
        )

    first, again, other = run(3), run(3), run(4)
    assert len(first) == 3 and all(x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])


def test_image_batches_epochs_differ_and_resume() -> None:
    images = torch.randint(
        0, 256, (40, 28, 28), generator=torch.Generator().manual_seed(2), dtype=torch.uint8
    )
    batches = fm.ImageBatches(
        images, torch.zeros(40, dtype=torch.int64), 8, shuffle=True, seed=5, augment=True
    )
    epoch0, epoch1 = _collect(batches), _collect(batches)
    assert not torch.equal(epoch0[0][0], epoch1[0][0])
    batches.set_epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_collect(batches), epoch1, strict=True))


# ---------------------------------------------------------------- tokenizers

UNICODE_SAMPLES = [
    "",
    "plain ASCII",
    "naïve café — “quotes” …",
    "中文, 日本語, 한국어, العربية, עברית",
    "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧",
    "e\u0301 combining, \x00 NUL, \t tab\r\nCRLF",
]
ENGLISH = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\n\nHowever little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters.\n\n"
) * 20


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_byte_tokenizer_round_trips_unicode(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text and tok.decode([*ids, tok.eos_id]) == text


def test_byte_tokenizer_invalid_input() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut-off multi-byte character
    with pytest.raises(ValueError, match=r"0\.\.256"):
        tok.decode([300])


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(ENGLISH, vocab_size=400)


def test_bpe_round_trips_english_and_compresses(bpe: BPETokenizer) -> None:
    assert bpe.vocab_size <= 400 and bpe.decode([bpe.eos_id]) == ""
    for text in (ENGLISH[:300], "A quite unseen sentence: Zebras, 1813!\n", *UNICODE_SAMPLES):
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(ENGLISH)) < len(ENGLISH.encode("utf-8")) / 3


def test_bpe_training_is_deterministic(bpe: BPETokenizer) -> None:
    again = BPETokenizer.train(ENGLISH, vocab_size=400)
    assert again.encode(ENGLISH) == bpe.encode(ENGLISH) and again.eos_id == bpe.eos_id
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(ENGLISH, vocab_size=100)


def test_save_and_load_tokenizer(tmp_path: Path, bpe: BPETokenizer) -> None:
    for tok in (ByteTokenizer(), bpe):
        directory = tmp_path / tok.kind
        tok.save(directory)
        loaded = load_tokenizer(directory)
        assert isinstance(loaded, type(tok)) and isinstance(loaded, Tokenizer)
        assert loaded.encode(ENGLISH[:200]) == tok.encode(ENGLISH[:200])
        assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json"):
        load_tokenizer(tmp_path / "empty")


# ---------------------------------------------------------------- prose


FAKE_PARAGRAPHS = 20  # per fake novel: enough paragraph breaks for the 2% val and test cuts


def _fake_novels() -> dict[str, list[str]]:
    """Stand-in novels: a title, paragraphs of two lines (one with trailing spaces), runs of blanks."""
    novels = {}
    for name, title in prose.AUSTEN_NOVELS:
        lines = [title.upper(), "", "", ""]
        for k in range(FAKE_PARAGRAPHS):
            lines += [f"Paragraph {k} of {title}.  ", "second line.", "", ""]
        novels[name] = [*lines, "The end."]
    return novels


def _write_fake_janeaustenr(root: Path) -> None:
    """A janeaustenr R lazy-load database (data/Rdata.rdx + .rdb) with tiny stand-in novels."""
    import rdata

    data_dir = root / prose.R_PACKAGE_SUBDIR / "data"
    data_dir.mkdir(parents=True)
    blobs, offsets = b"", {}
    for name, lines in _fake_novels().items():
        r_obj = rdata.conversion.convert_python_to_r_data(np.array(lines, dtype=object))
        raw = rdata.unparser.unparse_data(r_obj)
        blob = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        offsets[name] = np.array([len(blobs), len(blob)], dtype=np.int32)
        blobs += blob
    (data_dir / "Rdata.rdb").write_bytes(blobs)
    index = {"variables": offsets, "references": {}, "compressed": np.array([True])}
    rdata.write_rds(data_dir / "Rdata.rdx", index)


def _write_fake_deb(root: Path, deb: Path) -> None:
    """Pack ``root`` as data.tar.xz in an ar archive laid out like a .deb."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        tar.add(root, arcname=".")
    members = [(b"debian-binary", b"2.0\n"), (b"data.tar.xz", tar_bytes.getvalue())]
    out = b"!<arch>\n"
    for name, body in members:
        header = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8)
        out += header + str(len(body)).encode().ljust(10) + b"`\n" + body + b"\n" * (len(body) % 2)
    deb.write_bytes(out)


def test_extract_austen_from_dir_and_deb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_janeaustenr(tmp_path / "root")
    text = prose.extract_austen(tmp_path / "root")
    titles = [title for _, title in prose.AUSTEN_NOVELS]
    expected = [
        f"{t.upper()}\n\n"
        + "".join(f"Paragraph {k} of {t}.\nsecond line.\n\n" for k in range(FAKE_PARAGRAPHS))
        + "The end."
        for t in titles
    ]
    assert text == "\n\n".join(expected)
    assert prose.extract_austen(tmp_path / "root" / prose.R_PACKAGE_SUBDIR) == text
    _write_fake_deb(tmp_path / "root", tmp_path / "fake.deb")
    real_which = prose.shutil.which
    monkeypatch.setattr(prose.shutil, "which", lambda cmd: None if cmd == "dpkg-deb" else real_which(cmd))
    assert prose.extract_austen(tmp_path / "fake.deb") == text  # the pure-Python .deb reader
    with pytest.raises(FileNotFoundError, match=r"Rdata\.rdx"):
        prose.extract_austen(tmp_path)


def _write_fake_prose_dir(directory: Path) -> str:
    rng = np.random.default_rng(0)
    paragraphs = [
        " ".join(f"word{rng.integers(1000)}" for _ in range(rng.integers(5, 40))) for _ in range(300)
    ]
    text = "\n\n".join(paragraphs)
    directory.mkdir(parents=True)
    (directory / prose.TEXT_FILE).write_text(text, encoding="utf-8")
    manifest = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text), "source": "test"}
    (directory / prose.MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return text


def test_prose_splits_are_deterministic_disjoint_and_at_paragraphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _write_fake_prose_dir(tmp_path / "prose")
    monkeypatch.setenv(prose.PROSE_DIR_ENV, str(tmp_path / "prose"))
    parts = [prose.load_prose(split) for split in prose.PROSE_SPLITS]
    assert parts == [prose.load_prose(split, root=tmp_path / "prose") for split in prose.PROSE_SPLITS]
    assert "".join(parts) == text  # disjoint, in order, nothing lost
    assert parts[0].endswith("\n\n") and parts[1].endswith("\n\n")  # cut only at paragraph starts
    assert not parts[1].startswith("\n") and not parts[2].startswith("\n")
    for part, fraction in zip(parts[1:], (prose.PROSE_VAL_FRACTION, prose.PROSE_TEST_FRACTION), strict=True):
        assert 0.5 * fraction * len(text) < len(part) < 1.5 * fraction * len(text)


def test_prepare_prose_writes_manifest(tmp_path: Path) -> None:
    _write_fake_janeaustenr(tmp_path / "root")
    out = prose.prepare_prose(tmp_path / "prepared", source=tmp_path / "root")
    manifest = json.loads((out / prose.MANIFEST_FILE).read_text(encoding="utf-8"))
    assert manifest["chars"] == len((out / prose.TEXT_FILE).read_text(encoding="utf-8"))
    assert manifest["novels"][0] == "Sense and Sensibility" and len(manifest["sha256"]) == 64


def test_prose_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"matmamba\.data\.prose --prepare"):
        prose.load_prose("train", root=tmp_path / "missing")
    with pytest.raises(ValueError, match="expected one of"):
        prose.load_prose("dev", root=tmp_path)
    _write_fake_prose_dir(tmp_path / "prose")
    (tmp_path / "prose" / prose.TEXT_FILE).write_text("tampered", encoding="utf-8")
    with pytest.raises(ValueError, match="sha256"):
        prose.load_prose("val", root=tmp_path / "prose")
