"""router/thresholds.py: the thresholds file, its validation, defaults and reloading."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import grpc
import pytest

from router.thresholds import DEFAULTS, ThresholdsError, ThresholdStore, load_thresholds, write_thresholds

FP = "ab" * 32
OTHER_FP = "cd" * 32


def _write(tmp_path: Path, data: object, name: str = "t.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _refused(path: Path, code: grpc.StatusCode, match: str, **kwargs: object) -> None:
    args = {"task": "vision", "fingerprint": FP, "edge_level": 4, **kwargs}
    with pytest.raises(ThresholdsError, match=match) as info:
        load_thresholds(path, **args)
    assert info.value.code == code


def test_a_complete_file_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, {"measure": "margin", "threshold": 0.3, "checkpoint_fingerprint": FP, "edge_level": 4,
                             "version": "v7", "target_escalation": 0.2, "tuned_on": "fashion-mnist val"})
    t = load_thresholds(path, task="vision", fingerprint=FP, edge_level=4)
    assert (t.measure, t.threshold, t.version, t.edge_level, t.target_escalation) == ("margin", 0.3, "v7", 4, 0.2)
    assert t.checkpoint_fingerprint == FP and not t.is_default and t.path == str(path.resolve())
    msg = t.to_proto()
    assert msg.checkpoint_sha256 == FP and msg.measure == "margin" and msg.loaded_unix_ms > 0


def test_version_defaults_to_the_sha256_of_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"measure": "max_prob", "threshold": 0.9})
    t = load_thresholds(path, task="vision", fingerprint=FP)
    assert t.version == hashlib.sha256(path.read_bytes()).hexdigest()
    assert t.measure == "max_softmax"  # the alias is stored under its canonical name


def test_defaults_per_task() -> None:
    assert DEFAULTS == {"vision": ("max_softmax", 0.8), "lm": ("mean_token_logprob", -4.0)}
    store = ThresholdStore(task="lm", fingerprint=FP, edge_level=4)
    assert store.current.is_default and store.current.version == "default"
    assert (store.current.measure, store.current.threshold) == ("mean_token_logprob", -4.0)


@pytest.mark.parametrize(("data", "match"), [
    ("{not json", "not UTF-8 JSON"),
    ([1, 2], "expected a JSON object"),
    ({"threshold": 0.5}, '"measure" must be a string'),
    ({"measure": "entropy", "threshold": 0.5}, "unknown confidence measure"),
    ({"measure": "mean_token_logprob", "threshold": -1}, "for lm checkpoints"),
    ({"measure": "max_softmax"}, '"threshold" is missing'),
    ({"measure": "max_softmax", "threshold": "0.8"}, "finite number"),
    ({"measure": "max_softmax", "threshold": True}, "finite number"),
    ({"measure": "max_softmax", "threshold": 1.5}, r"outside the range of max_softmax, \[0.0, 1.0\]"),
    ({"measure": "neg_entropy", "threshold": 0.1}, "outside the range"),
    ({"measure": "max_softmax", "threshold": 0.5, "checkpoint_fingerprint": "xyz"}, "64 lowercase hex"),
    ({"measure": "max_softmax", "threshold": 0.5, "edge_level": "4"}, '"edge_level" must be a positive integer'),
    ({"measure": "max_softmax", "threshold": 0.5, "target_escalation": 2}, r"must be in \[0, 1\]"),
    ({"measure": "max_softmax", "threshold": 0.5, "version": 3}, '"version" must be a string'),
])
def test_invalid_files_are_refused(tmp_path: Path, data: object, match: str) -> None:
    _refused(_write(tmp_path, data), grpc.StatusCode.INVALID_ARGUMENT, match)


def test_a_file_for_another_checkpoint_or_level_is_refused(tmp_path: Path) -> None:
    other = _write(tmp_path, {"measure": "max_softmax", "threshold": 0.5, "checkpoint_fingerprint": OTHER_FP})
    _refused(other, grpc.StatusCode.FAILED_PRECONDITION, "tuned for checkpoint cdcdcdcdcdcd")
    level = _write(tmp_path, {"measure": "max_softmax", "threshold": 0.5, "edge_level": 2}, "l.json")
    _refused(level, grpc.StatusCode.FAILED_PRECONDITION, "tuned for edge level 2.*--edge-level 2")


def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.json", grpc.StatusCode.NOT_FOUND, "does not exist")


def test_reload_keeps_the_thresholds_in_force_on_a_bad_file(tmp_path: Path) -> None:
    good = _write(tmp_path, {"measure": "max_softmax", "threshold": 0.6, "checkpoint_fingerprint": FP})
    store = ThresholdStore(task="vision", fingerprint=FP, edge_level=4, path=good)
    assert store.current.threshold == 0.6
    bad = _write(tmp_path, {"measure": "max_softmax", "threshold": 0.7, "checkpoint_fingerprint": OTHER_FP}, "b.json")
    with pytest.raises(ThresholdsError):
        store.reload(str(bad))
    assert store.current.threshold == 0.6
    good.write_text(json.dumps({"measure": "margin", "threshold": 0.2}))
    loaded, previous = store.reload()  # "" = re-read the start-up file
    assert (loaded.measure, previous.measure) == ("margin", "max_softmax") and store.current is loaded


def test_reload_without_a_startup_file_needs_a_path() -> None:
    store = ThresholdStore(task="vision", fingerprint=FP, edge_level=4)
    with pytest.raises(ThresholdsError, match="without --thresholds") as info:
        store.reload("")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_written_files_load_back(tmp_path: Path) -> None:
    store = ThresholdStore(task="vision", fingerprint=FP, edge_level=4)
    path = tmp_path / "out.json"
    write_thresholds(path, store.current)
    again = load_thresholds(path, task="vision", fingerprint=FP, edge_level=4)
    assert (again.measure, again.threshold, again.version) == ("max_softmax", 0.8, "default")


def test_a_changed_file_is_picked_up_and_a_bad_change_keeps_the_old_thresholds(tmp_path: Path) -> None:
    path = _write(tmp_path, {"measure": "max_softmax", "threshold": 0.6, "checkpoint_fingerprint": FP})
    store = ThresholdStore(task="vision", fingerprint=FP, edge_level=4, path=path)
    assert store.reload_if_changed() is None  # unchanged since start-up
    path.write_text(json.dumps({"measure": "margin", "threshold": 0.25, "checkpoint_fingerprint": FP}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    loaded = store.reload_if_changed()
    assert loaded is not None and store.current is loaded and loaded.measure == "margin"
    assert store.reload_if_changed() is None  # seen already
    path.write_text(json.dumps({"measure": "margin", "threshold": 0.3, "checkpoint_fingerprint": OTHER_FP}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert store.reload_if_changed() is None
    assert store.current is loaded  # the refused file left the thresholds in force
