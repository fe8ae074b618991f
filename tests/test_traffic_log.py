"""The traffic log writer (router/traffic_log.py): plain msgpack, rotation within the bound, never blocking."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from router import traffic_log
from router.traffic_log import LogSettings, TrafficLog, input_field, log_files, read_records, topk


def _plain_read(directory: Path) -> list[dict]:
    """Every record, read with nothing but msgpack (as an operator's script would)."""
    out = []
    for path in sorted(directory.glob("traffic-*.msgpack")):
        with open(path, "rb") as f:
            out.extend(msgpack.Unpacker(f, raw=False))
    return out


def _record(i: int, pad: int = 0) -> dict:
    return {"v": 1, "kind": "request", "key": f"k-{i}", "t": time.time(), "pad": "x" * pad}


def test_records_are_plain_msgpack_in_order(tmp_path: Path) -> None:
    log = TrafficLog(LogSettings(tmp_path)).start()
    for i in range(50):
        assert log.submit(_record(i))
    log.close()
    records = _plain_read(tmp_path)
    assert [r["key"] for r in records] == [f"k-{i}" for i in range(50)]
    assert [r["key"] for r in read_records(tmp_path)] == [f"k-{i}" for i in range(50)]
    assert log.written == 50 and log.dropped == 0 and log.failed == 0


def test_rotation_keeps_the_directory_within_its_bound(tmp_path: Path) -> None:
    settings = LogSettings(tmp_path, max_bytes=40_000, max_files=4)
    log = TrafficLog(settings).start()
    for i in range(400):  # ~120 kB in all: three times the bound
        log.submit(_record(i, pad=250))
    log.close()
    files = log_files(tmp_path)
    assert len(files) == 4
    assert all(f.stat().st_size <= settings.file_bytes for f in files)
    assert sum(f.stat().st_size for f in files) <= settings.max_bytes
    keys = [r["key"] for r in _plain_read(tmp_path)]
    assert keys[-1] == "k-399" and keys == [f"k-{i}" for i in range(400 - len(keys), 400)]  # the newest, contiguous
    # A restarted writer continues after the highest file number and applies the same bound.
    log = TrafficLog(settings).start()
    log.submit(_record(1000))
    log.close()
    files_after = log_files(tmp_path)
    assert len(files_after) == 4 and files_after[-1].name > files[-1].name
    assert _plain_read(tmp_path)[-1]["key"] == "k-1000"


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    dropped = []
    log = TrafficLog(LogSettings(tmp_path, queue_records=10), on_dropped=dropped.append)  # writer not started
    start = time.perf_counter()
    accepted = [log.submit(_record(i)) for i in range(25)]
    assert time.perf_counter() - start < 0.05
    assert accepted.count(True) == 10 and log.dropped == 15 and sum(dropped) == 15
    log.start()
    log.close()
    assert [r["key"] for r in _plain_read(tmp_path)] == [f"k-{i}" for i in range(10)]


def test_fsync_every_n_records_and_at_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(traffic_log.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    log = TrafficLog(LogSettings(tmp_path, fsync_records=10, fsync_ms=60_000)).start()
    for i in range(35):
        log.submit(_record(i))
    deadline = time.monotonic() + 5
    while log.written < 35 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 3  # after records 10, 20 and 30; 5 wait for the 11th or for fsync_ms
    log.close()
    assert len(calls) == 4


def test_fsync_after_fsync_ms_when_traffic_is_light(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(traffic_log.os, "fsync", calls.append)
    log = TrafficLog(LogSettings(tmp_path, fsync_records=1000, fsync_ms=50)).start()
    log.submit(_record(0))
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 1
    log.close()


def test_one_writer_per_directory_and_unwritable_records_are_counted(tmp_path: Path) -> None:
    log = TrafficLog(LogSettings(tmp_path)).start()
    with pytest.raises(ValueError, match="in use by another router"):
        TrafficLog(LogSettings(tmp_path))
    log.submit({"bad": object()})  # msgpack cannot encode it: counted, the writer goes on
    log.submit(_record(1))
    log.close()
    assert log.failed == 1 and [r["key"] for r in _plain_read(tmp_path)] == ["k-1"]


def test_a_torn_tail_is_skipped(tmp_path: Path) -> None:
    log = TrafficLog(LogSettings(tmp_path)).start()
    for i in range(3):
        log.submit(_record(i))
    log.close()
    path = log_files(tmp_path)[-1]
    path.write_bytes(path.read_bytes()[:-5])  # as after a power cut in the middle of the last record
    assert [r["key"] for r in read_records(tmp_path)] == ["k-0", "k-1"]


def test_settings_and_fields() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        LogSettings(Path("x"), max_files=1)
    with pytest.raises(ValueError, match="too small"):
        LogSettings(Path("x"), max_bytes=100)
    probs = np.array([0.1, 0.6, 0.05, 0.25])
    assert topk(probs) == [[1, 0.6], [3, 0.25], [0, 0.1]]
    image = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    field = input_field(image, 1024)
    assert np.array_equal(np.frombuffer(field["data"], field["dtype"]).reshape(field["shape"]), image)
    assert input_field(image, 8) == {"omitted": True, "bytes": 16}
