"""Tokenizers that need no download: raw UTF-8 bytes, or a byte-level BPE trained offline.

Both share one interface (``Tokenizer``): ``encode``, ``decode``, ``vocab_size``, ``eos_id``,
``save(dir)`` and ``load(dir)``. ``save`` writes ``tokenizer_config.json`` naming the kind, so
``load_tokenizer(dir)`` can rebuild either one.

Example::

    tok = BPETokenizer.train(load_prose("train"), vocab_size=4096)
    tok.save("checkpoints/tok"); tok = load_tokenizer("checkpoints/tok")
    assert tok.decode(tok.encode("Emma Woodhouse")) == "Emma Woodhouse"
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

CONFIG_FILE = "tokenizer_config.json"
BPE_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
NUM_BYTES = 256  # distinct byte values; the byte tokenizer's ids 0..255


@runtime_checkable
class Tokenizer(Protocol):
    """What the models and servers need from a tokenizer."""

    kind: ClassVar[str]

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


def _write_config(directory: str | Path, config: dict[str, object]) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def _read_config(directory: str | Path) -> dict[str, object]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {directory}; save a tokenizer there with `tok.save(dir)`."
        )
    return json.loads(path.read_text(encoding="utf-8"))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus EOS = 256. Any text round-trips exactly."""

    kind: ClassVar[str] = "byte"

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + 1

    @property
    def eos_id(self) -> int:
        return NUM_BYTES

    def encode(self, text: str) -> list[int]:
        """Text -> byte ids (len = number of UTF-8 bytes). EOS is never added; append ``eos_id`` yourself."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Byte ids -> text; EOS ids are dropped and invalid UTF-8 becomes U+FFFD."""
        bad = [i for i in ids if not 0 <= i <= NUM_BYTES]
        if bad:
            raise ValueError(f"Byte tokenizer ids must be in 0..{NUM_BYTES}, got {bad[:5]}.")
        return bytes(i for i in ids if i != NUM_BYTES).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer_config.json`` (the byte tokenizer has no other state)."""
        _write_config(directory, {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id})

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        config = _read_config(directory)
        if config.get("kind") != cls.kind:
            raise ValueError(
                f"{directory} holds a {config.get('kind')!r} tokenizer; use load_tokenizer(dir)."
            )
        return cls()


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from the ``tokenizers`` library; EOS is ``<|endoftext|>``."""

    kind: ClassVar[str] = "bpe"

    def __init__(self, tokenizer: HFTokenizer) -> None:
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"The BPE tokenizer has no {EOS_TOKEN} token; train it with BPETokenizer.train.")
        self._tok = tokenizer
        self._eos_id = eos

    @classmethod
    def train(cls, text: str, vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
        """Train on ``text`` offline. The same text and arguments give the same merges and ids.

        Args:
            text: training corpus (e.g. ``load_prose("train")``); fed to the trainer paragraph by
                paragraph, each keeping its trailing newlines.
            vocab_size: total ids, including the 256 byte symbols and EOS; at least 257.
            min_frequency: a pair must occur this often to be merged.
        """
        if vocab_size < NUM_BYTES + 1:
            raise ValueError(f"vocab_size must be >= {NUM_BYTES + 1} (bytes + EOS), got {vocab_size}.")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(re.split(r"(?<=\n\n)", text), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. EOS is never added; append ``eos_id`` yourself."""
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text; EOS is dropped and bytes that are not valid UTF-8 become U+FFFD."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``."""
        path = _write_config(
            directory, {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        )
        self._tok.save(os.fspath(path / BPE_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        path = Path(directory) / BPE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"No {BPE_FILE} in {directory}; train and save one with BPETokenizer.train."
            )
        return cls(HFTokenizer.from_file(os.fspath(path)))


_KINDS: dict[str, type[ByteTokenizer | BPETokenizer]] = {
    ByteTokenizer.kind: ByteTokenizer,
    BPETokenizer.kind: BPETokenizer,
}


def load_tokenizer(directory: str | Path) -> ByteTokenizer | BPETokenizer:
    """Load whichever tokenizer ``save`` wrote into ``directory`` (by ``kind`` in tokenizer_config.json)."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() and (path / BPE_FILE).is_file():
        return BPETokenizer.load(path)
    kind = _read_config(path).get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path / CONFIG_FILE} names kind {kind!r}; expected one of {sorted(_KINDS)}.")
    return _KINDS[kind].load(path)
