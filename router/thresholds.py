"""The router's confidence policy: which measure, which threshold, from a validated JSON file.

A thresholds file (``python -m router.tune`` writes one; any JSON object with these keys works)::

    {
      "measure": "max_softmax",            # required: a measure of router/confidence.py for this task
      "threshold": 0.8,                    # required: escalate when confidence < threshold
      "checkpoint_fingerprint": "4be7...", # recommended: sha256 of the checkpoint it was tuned on
      "edge_level": 4,                     # optional: the edge nesting level it was tuned for
      "version": "2026-11-24.1",           # optional: default = sha256 of the file's bytes
      "target_escalation": 0.2,            # optional: the escalation rate it was tuned for, in [0, 1]
      "expected_escalation": {"rate": 0.2, "ci95": [0.183, 0.218]}  # optional: the calibrated band
    }

A chain of edge tiers (``python -m router --edge-level 8,2``) reads a file with one entry per
stage, in the chain's order, instead of the top-level measure, threshold and edge level::

    {
      "stages": [
        {"edge_level": 8, "measure": "max_softmax", "threshold": 0.93},
        {"edge_level": 2, "measure": "max_softmax", "threshold": 0.71}
      ],
      "checkpoint_fingerprint": "4be7...", "version": "...", "target_escalation": 0.1
    }

An item is answered by the first stage whose confidence is at or above its threshold, and by
the cloud when every stage doubts it; ``target_escalation`` is then the share sent to the
cloud. A file's stages must name exactly the router's levels.

``expected_escalation`` (``{"rate": r, "ci95": [low, high]}``, written by the tuner) is the
calibrated band of the router's drift signal (router/metrics.py). Other keys are kept out of
the policy and ignored (tuning reports may add their own).
A file is refused, and the thresholds in force stay, when it is missing (NOT_FOUND), not a
valid thresholds file or names a measure of another task (INVALID_ARGUMENT), or was tuned
for another checkpoint fingerprint or edge level (FAILED_PRECONDITION).

Without a file the router uses the documented default of its task (:data:`DEFAULTS`):
vision ``max_softmax >= 0.8``, language model ``mean_token_logprob >= -4.0``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from proto import matmamba_pb2 as pb

from .confidence import LM, VISION, get_measure

log = logging.getLogger(__name__)

# Built-in policy per task when no thresholds file is given (see docs/ROUTER.md for how they were chosen).
DEFAULTS: dict[str, tuple[str, float]] = {
    VISION: ("max_softmax", 0.8),
    LM: ("mean_token_logprob", -4.0),
}
DEFAULT_VERSION = "default"
FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
# A thresholds file is a few hundred bytes; anything far larger is not one.
MAX_FILE_BYTES = 1 << 20


class ThresholdsError(ValueError):
    """A thresholds file the router refuses, with the gRPC status RouterAdmin answers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(path: str, why: str) -> ThresholdsError:
    return ThresholdsError(grpc.StatusCode.INVALID_ARGUMENT, f"{path} is not a valid thresholds file: {why}")


@dataclass(frozen=True)
class Stage:
    """One edge tier of a chain: answer at ``edge_level`` when ``measure`` >= ``threshold``."""

    edge_level: int
    measure: str
    threshold: float


@dataclass(frozen=True)
class Thresholds:
    """The policy in force: escalate an item when its confidence under ``measure`` is below ``threshold``."""

    measure: str
    threshold: float
    version: str
    path: str = ""  # file it came from; "" for the built-in default
    is_default: bool = False
    target_escalation: float = 0.0  # 0 = unknown
    edge_level: int = 0  # 0 = unknown
    checkpoint_fingerprint: str = ""  # "" = unknown
    loaded_unix_ms: int = 0
    band: tuple[float, float, float] | None = None  # calibrated escalation (rate, low, high); None = unknown
    stages: tuple[Stage, ...] = ()  # a chain's stages; () = one stage (measure, threshold, edge_level)

    @property
    def chain(self) -> tuple[Stage, ...]:
        """The stages in order (one stage for a single-level policy)."""
        return self.stages or (Stage(self.edge_level, self.measure, self.threshold),)

    def stage_for(self, level: int) -> Stage:
        """The stage judging answers of edge ``level`` (the first stage when no stage has that level)."""
        return next((s for s in self.chain if s.edge_level == level), self.chain[0])

    def to_proto(self) -> pb.Thresholds:
        """The RouterAdmin message of this policy."""
        return pb.Thresholds(version=self.version, measure=self.measure, threshold=self.threshold, path=self.path,
                             is_default=self.is_default, target_escalation=self.target_escalation,
                             edge_level=self.edge_level, checkpoint_sha256=self.checkpoint_fingerprint,
                             loaded_unix_ms=self.loaded_unix_ms,
                             stages=[pb.ThresholdStage(edge_level=s.edge_level, measure=s.measure,
                                                       threshold=s.threshold) for s in self.stages])

    def to_file_dict(self) -> dict[str, Any]:
        """The JSON object of a thresholds file holding this policy."""
        if len(self.stages) > 1:
            data: dict[str, Any] = {"stages": [{"edge_level": s.edge_level, "measure": s.measure,
                                                "threshold": s.threshold} for s in self.stages],
                                    "version": self.version}
        else:
            data = {"measure": self.measure, "threshold": self.threshold, "version": self.version}
            if self.edge_level:
                data["edge_level"] = self.edge_level
        if self.checkpoint_fingerprint:
            data["checkpoint_fingerprint"] = self.checkpoint_fingerprint
        if self.target_escalation:
            data["target_escalation"] = self.target_escalation
        return data


def parse_levels(text: str) -> tuple[int, ...]:
    """``--edge-level``: "4" -> (4,); "8,2" -> (8, 2), a chain from the narrowest to the widest edge level."""
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--edge-level takes a level or a chain of levels such as 8,2; got {text!r}") from None
    if any(k < 1 for k in levels):
        raise ValueError(f"--edge-level levels must be positive integers, got {text!r}")
    if any(a <= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"--edge-level {text}: a chain runs from narrow to wide, so its levels must decrease "
                         "(e.g. 8,2: level 8 first, then level 2, then the cloud)")
    return levels


def _now_ms() -> int:
    return int(time.time() * 1000)


def default_thresholds(task: str, edge_levels: tuple[int, ...] = ()) -> Thresholds:
    """The built-in policy of ``task`` ("vision" or "lm"); for a chain, the same for every stage."""
    measure, threshold = DEFAULTS[task]
    stages = tuple(Stage(k, measure, threshold) for k in edge_levels) if len(edge_levels) > 1 else ()
    return Thresholds(measure, threshold, DEFAULT_VERSION, is_default=True, loaded_unix_ms=_now_ms(), stages=stages)


def _number(data: dict[str, Any], key: str, path: str, *, required: bool) -> float | None:
    value = data.get(key)
    if value is None:
        if required:
            raise _invalid(path, f'"{key}" is missing; expected a number')
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(path, f'"{key}" must be a finite number, got {value!r}')
    return float(value)


def _measure_and_threshold(data: dict[str, Any], path: str, task: str) -> tuple[str, float]:
    name = data.get("measure")
    if not isinstance(name, str):
        raise _invalid(path, f'"measure" must be a string naming a confidence measure, got {name!r}')
    try:
        measure = get_measure(name, task)
    except ValueError as err:
        raise _invalid(path, str(err)) from None
    threshold = _number(data, "threshold", path, required=True)
    assert threshold is not None
    if not measure.low <= threshold <= measure.high:
        raise _invalid(path, f"threshold {threshold} is outside the range of {measure.name}, "
                             f"[{measure.low}, {measure.high}]")
    return measure.name, threshold


def _check_origin(data: dict[str, Any], path: str, fingerprint: str) -> str:
    """The file's checkpoint fingerprint, refused when it is not this router's."""
    tuned_on = data.get("checkpoint_fingerprint", "")
    if not isinstance(tuned_on, str) or (tuned_on and not FINGERPRINT.match(tuned_on)):
        raise _invalid(path, f'"checkpoint_fingerprint" must be 64 lowercase hex characters, got {tuned_on!r}')
    if tuned_on and fingerprint and tuned_on != fingerprint:
        raise ThresholdsError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{path} was tuned for checkpoint {tuned_on[:12]}..., but this router runs "
                              f"{fingerprint[:12]}...; tune a new file for this checkpoint (python -m router.tune)")
    if not tuned_on:
        log.warning("%s names no checkpoint_fingerprint; it cannot be checked against this checkpoint", path)
    return tuned_on


def _level(data: dict[str, Any], path: str) -> int:
    level = data.get("edge_level", 0)
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise _invalid(path, f'"edge_level" must be a positive integer, got {level!r}')
    return level


def _levels_text(levels: tuple[int, ...]) -> str:
    return ",".join(str(k) for k in levels)


def _stages(data: dict[str, Any], path: str, task: str, edge_levels: tuple[int, ...]) -> tuple[Stage, ...]:
    """The file's stages (one for a single-stage file), refused when they are not the router's levels."""
    if "stages" in data:
        raw = data["stages"]
        if not isinstance(raw, list) or not raw or not all(isinstance(x, dict) for x in raw):
            raise _invalid(path, '"stages" must be a non-empty list of {"edge_level", "measure", "threshold"}')
        if "measure" in data or "threshold" in data:
            raise _invalid(path, 'give either "stages" or a top-level "measure" and "threshold", not both')
        stages = tuple(Stage(_level(x, path), *_measure_and_threshold(x, path, task)) for x in raw)
        if any(not s.edge_level for s in stages):
            raise _invalid(path, 'every stage needs its "edge_level"')
    else:
        stages = (Stage(_level(data, path), *_measure_and_threshold(data, path, task)),)
    levels = tuple(s.edge_level for s in stages)
    if edge_levels and (len(levels) != len(edge_levels) or any(a and a != b for a, b in zip(levels, edge_levels))):
        raise ThresholdsError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{path} was tuned for edge level {_levels_text(levels)}, but this router runs level "
                              f"{_levels_text(edge_levels)}; start the router with --edge-level "
                              f"{_levels_text(levels)} or tune a file for {_levels_text(edge_levels)}")
    return stages


def _band(data: dict[str, Any], path: str) -> tuple[float, float, float] | None:
    """(rate, low, high) of ``expected_escalation`` (router.tune's calibrated band), None when absent."""
    exp = data.get("expected_escalation")
    if exp is None:
        return None
    try:
        rate, (low, high) = float(exp["rate"]), map(float, exp["ci95"])
    except (TypeError, KeyError, ValueError):
        raise _invalid(path, '"expected_escalation" must be {"rate": R, "ci95": [LOW, HIGH]}') from None
    if not 0.0 <= low <= rate <= high <= 1.0:
        raise _invalid(path, f'"expected_escalation" needs 0 <= low <= rate <= high <= 1, got {rate} [{low}, {high}]')
    return rate, low, high


def parse_thresholds(raw: bytes, *, path: str, task: str, fingerprint: str = "", edge_level: int = 0,
                     edge_levels: tuple[int, ...] = ()) -> Thresholds:
    """Validate the bytes of a thresholds file for a router running ``task`` on checkpoint ``fingerprint``.

    ``edge_levels``: the router's chain (``edge_level`` is the one-stage spelling); empty = not checked.
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _invalid(path, f"not UTF-8 JSON ({err})") from None
    if not isinstance(data, dict):
        raise _invalid(path, f"expected a JSON object, got {type(data).__name__}")
    stages = _stages(data, path, task, edge_levels or ((edge_level,) if edge_level else ()))
    tuned_on = _check_origin(data, path, fingerprint)
    target = _number(data, "target_escalation", path, required=False) or 0.0
    if not 0.0 <= target <= 1.0:
        raise _invalid(path, f'"target_escalation" must be in [0, 1], got {target}')
    version = data.get("version") or hashlib.sha256(raw).hexdigest()
    if not isinstance(version, str):
        raise _invalid(path, f'"version" must be a string, got {version!r}')
    first = stages[0]
    return Thresholds(first.measure, first.threshold, version, path=path, target_escalation=target,
                      edge_level=first.edge_level, checkpoint_fingerprint=tuned_on, loaded_unix_ms=_now_ms(),
                      stages=stages if len(stages) > 1 else (), band=_band(data, path))


def load_thresholds(path: str | Path, *, task: str, fingerprint: str = "", edge_level: int = 0,
                    edge_levels: tuple[int, ...] = ()) -> Thresholds:
    """Read and validate a thresholds file; ThresholdsError (with its gRPC code) when refused."""
    file = Path(path)
    try:
        is_file = file.is_file()
    except OSError as err:  # e.g. a name too long for the file system
        raise ThresholdsError(grpc.StatusCode.NOT_FOUND,
                              f"thresholds file {str(file)[:200]!r}: {err.strerror}") from None
    if not is_file:
        raise ThresholdsError(grpc.StatusCode.NOT_FOUND, f"thresholds file {file} does not exist (or is not a file)")
    try:  # at most MAX_FILE_BYTES + 1 bytes: files such as /proc/* report size 0 whatever they hold
        with file.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise _invalid(str(file), f"cannot be read ({err.strerror or err})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _invalid(str(file), f"over {MAX_FILE_BYTES:,} bytes; a thresholds file is a small JSON object")
    return parse_thresholds(raw, path=str(file.resolve()), task=task, fingerprint=fingerprint,
                            edge_level=edge_level, edge_levels=edge_levels)


def write_thresholds(path: str | Path, thresholds: Thresholds) -> None:
    """Write ``thresholds`` as a thresholds file (what ``python -m router.tune --out`` produces)."""
    Path(path).write_text(json.dumps(thresholds.to_file_dict(), indent=2) + "\n", encoding="utf-8")


class ThresholdStore:
    """The thresholds in force, and reloading them without ever leaving a bad policy in place."""

    def __init__(self, *, task: str, fingerprint: str, edge_level: int = 0, path: str | Path | None = None,
                 edge_levels: tuple[int, ...] = ()) -> None:
        self.task, self.fingerprint = task, fingerprint
        self.edge_levels = edge_levels or ((edge_level,) if edge_level else ())
        self.initial_path = str(path) if path else ""
        self._stamp = self._file_stamp()
        self.current = self._load(self.initial_path) if path else default_thresholds(task, self.edge_levels)

    def _load(self, path: str) -> Thresholds:
        return load_thresholds(path, task=self.task, fingerprint=self.fingerprint, edge_levels=self.edge_levels)

    def reload(self, path: str = "") -> tuple[Thresholds, Thresholds]:
        """Load ``path`` (or the start-up file when empty) and put it in force; returns (new, previous).

        On any ThresholdsError the thresholds in force stay unchanged.
        """
        path = path or self.initial_path
        if not path:
            raise ThresholdsError(grpc.StatusCode.FAILED_PRECONDITION,
                                  "the router was started without --thresholds, so there is no file to re-read; "
                                  "give the path of a thresholds file")
        if path == self.initial_path:
            self._stamp = self._file_stamp()
        previous, loaded = self.current, self._load(path)
        self.current = loaded
        log.info("thresholds now %s %s (version %s, from %s; was %s %s)", loaded.measure, loaded.threshold,
                 loaded.version, loaded.path, previous.measure, previous.threshold)
        return loaded, previous

    def _file_stamp(self) -> tuple[int, int] | None:
        """(mtime in ns, size) of the start-up file, or None when there is none or it is missing."""
        try:
            st = Path(self.initial_path).stat() if self.initial_path else None
        except OSError:
            return None
        return None if st is None else (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> Thresholds | None:
        """Re-read the start-up file when it changed since the last look; returns the new thresholds or None.

        A changed file that does not load is logged and the thresholds in force stay; the same
        file is not tried again until it changes once more.
        """
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return None
        try:
            loaded, _ = self.reload()
        except ThresholdsError as err:
            self._stamp = stamp
            log.error("%s changed but was refused (%s); keeping %s %s", self.initial_path, err.message,
                      self.current.measure, self.current.threshold)
            return None
        return loaded
