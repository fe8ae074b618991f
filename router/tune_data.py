"""Calibration data for ``python -m router.tune``: what each tier answers on every item (:class:`Records`).

``--data`` takes one of:

- ``fashion-mnist`` (the "val" split when the full set is installed, else the shipped
  "test-sample"; ``--split`` forces one) or ``fashion-mnist:SPLIT`` (train, val, test, test-sample);
- a directory of labelled images, one subfolder per class::

      calib/
        ankle-boot/   0001.png 0002.jpg ...
        t-shirt-top/  ...
        3/            ...            # a class index works too

  A folder names a class of the checkpoint by its name, compared case-insensitively with runs
  of characters other than letters and digits read as one "-" ("T-shirt/top" = ``t-shirt-top``),
  or by its index. Files: PNG/JPEG (made grey and resized to the model's image size, as
  ``python -m edge classify`` does) and .npy uint8 arrays (edge/images.py);
- a UTF-8 text file, for an LM checkpoint (see :func:`lm_records`).

Vision items are images; an item is *correct* at a tier when its top class is the label.
LM items are generation segments, as the router judges them (router/generation.py): for a
context of ``--context-tokens`` tokens of the text, each tier greedily generates
``--segment-tokens`` tokens; the edge tier's confidence is the LM measure of its own
log-probabilities of those tokens, and the edge segment is *correct* when it is identical to
the cloud's greedy segment from the same context (the cloud's is correct by definition). The
cascade's "accuracy" is then its agreement with the cloud: the share of segments the reader
gets exactly as the full model would have written them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .confidence import LM, MEASURES, VISION, confidence

BATCH = 250  # images per forward pass
LM_BATCH = 64  # contexts per forward pass
TASK_MEASURES = {task: [m.name for m in MEASURES.values() if m.task == task] for task in (VISION, LM)}


@dataclass
class Records:
    """Per calibration item and per edge stage (a chain's levels, in order): confidences and correctness."""

    task: str  # VISION or LM
    levels: tuple[int, ...]  # edge nesting levels, first stage first
    conf: list[dict[str, np.ndarray]]  # per stage: measure -> (N,) float64
    correct: list[np.ndarray]  # per stage: (N,) bool
    cloud_correct: np.ndarray  # (N,) bool (LM: all True, the cloud is the reference)
    extra: dict[str, float] = field(default_factory=dict)  # report-only numbers (e.g. token agreement)

    @property
    def n(self) -> int:
        return int(self.cloud_correct.shape[0])

    @property
    def measures(self) -> list[str]:
        return TASK_MEASURES[self.task]

    def subset(self, idx: np.ndarray) -> Records:
        return Records(self.task, self.levels, [{k: v[idx] for k, v in c.items()} for c in self.conf],
                       [c[idx] for c in self.correct], self.cloud_correct[idx], dict(self.extra))


def cached(cache: Path | None, key: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``compute()``, or its arrays saved under ``cache`` by an earlier run with the same ``key`` (--cache)."""
    if cache is None:
        return compute()
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache / f"{name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}
    arrays = compute()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


# ------------------------------------------------------------------ vision


@torch.inference_mode()
def predict_probs(model, images: torch.Tensor, device: torch.device, mrl_level: int | None,
                  desc: str) -> np.ndarray:
    """Softmax probabilities (N, C) float32, in batches of 250 (as the edge worker computes them)."""
    from tqdm import tqdm

    from matmamba.data import normalize_images

    out = []
    for start in tqdm(range(0, images.shape[0], BATCH), desc=desc, unit="batch", file=sys.stderr):
        x = normalize_images(images[start:start + BATCH]).to(device)
        logits = model(x, mrl_level=mrl_level) if mrl_level else model(x)
        out.append(logits.float().softmax(-1).cpu().numpy())
    return np.concatenate(out)


def vision_records(model, levels: tuple[int, ...], images: torch.Tensor, labels: np.ndarray,
                   device: torch.device, cache: Path | None = None, key: dict | None = None) -> Records:
    """Every edge level and the full width over ``images`` (N, H, W) uint8; ``model``: the full checkpoint.

    ``cache``/``key``: reuse the probabilities of an earlier run on the same data (see :func:`cached`).
    """

    def probs_at(level: int, desc: str) -> np.ndarray:
        run = {**(key or {}), "level": level, "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
        return cached(cache, run, lambda: {"probs": predict_probs(model, images, device, level, desc)})["probs"]

    cloud_pred = probs_at(1, "cloud (full width)").argmax(-1)
    conf, correct, extra = [], [], {}
    for level in levels:
        probs = probs_at(level, f"edge (level {level})")
        conf.append({name: confidence(name, probs) for name in TASK_MEASURES[VISION]})
        correct.append(probs.argmax(-1) == labels)
        extra[f"level{level}_agreement_with_cloud"] = float((probs.argmax(-1) == cloud_pred).mean())
    return Records(VISION, levels, conf, correct, cloud_pred == labels, extra)


def folder_slug(name: str) -> str:
    """A class name as a folder name: lower case, runs of other characters than letters/digits -> "-"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_image_dir(root: Path, class_names: tuple[str, ...], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from one subfolder per class (module docstring)."""
    from edge.images import expand_paths, load_image_file

    by_slug = {folder_slug(name): i for i, name in enumerate(class_names)}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} holds no class subfolders; expected one folder per class, e.g. "
                         f"{root}/{folder_slug(class_names[0]) if class_names else '0'}/image.png")
    images, labels = [], []
    for folder in folders:
        slug = folder_slug(folder.name)
        label = int(slug) if slug.isdigit() else by_slug.get(slug)
        if label is None or not 0 <= label < max(len(class_names), 1):
            raise ValueError(f"{folder}: no class of this checkpoint is called {folder.name!r}; name folders "
                             f"{sorted(by_slug)} or by class index 0..{len(class_names) - 1}")
        for path in expand_paths([folder]):
            batch = load_image_file(path, image_size)
            if batch.shape[1:] != (1, image_size, image_size) or batch.dtype != np.uint8:
                raise ValueError(f"{path}: expected grey uint8 images of {image_size}x{image_size}, "
                                 f"got {batch.dtype} {batch.shape[1:]}")
            images.append(batch)
            labels.extend([label] * batch.shape[0])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


# ------------------------------------------------------------------ language model


def text_contexts(ids: list[int], context: int, segment: int, stride: int) -> np.ndarray:
    """(N, context) windows of ``ids`` starting every ``stride`` tokens, each followed by room for a segment."""
    starts = range(0, len(ids) - context - segment + 1, stride)
    if not starts:
        raise ValueError(f"the text has {len(ids)} tokens; it needs at least --context-tokens + --segment-tokens "
                         f"= {context + segment}")
    array = np.asarray(ids, dtype=np.int64)
    return np.stack([array[s:s + context] for s in starts])


@torch.inference_mode()
def greedy_segments(model, contexts: np.ndarray, level: int, segment: int, device: torch.device,
                    desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Greedy ``segment`` tokens after each context at ``level``: tokens (N, k) and their log-probs (N, k)."""
    from tqdm import tqdm

    tokens, logprobs = [], []
    for start in tqdm(range(0, contexts.shape[0], LM_BATCH), desc=desc, unit="batch", file=sys.stderr):
        ids = torch.from_numpy(contexts[start:start + LM_BATCH]).to(device)
        steps = list(model.generate_stream(ids, segment, mrl_level=level, temperature=0.0))
        tokens.append(torch.stack([t for t, _ in steps], 1).cpu().numpy())
        logprobs.append(torch.stack([lp for _, lp in steps], 1).float().cpu().numpy())
    return np.concatenate(tokens), np.concatenate(logprobs)


def lm_records(model, levels: tuple[int, ...], contexts: np.ndarray, segment: int, device: torch.device,
               cache: Path | None = None, key: dict | None = None) -> Records:
    """Segments of every edge level vs the full width's (module docstring); ``model``: the full checkpoint."""

    def run(level: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
        k = {**(key or {}), "level": level, "segment": segment,
             "data_sha256": hashlib.sha256(contexts.tobytes()).hexdigest()}
        out = cached(cache, k, lambda: dict(zip(("tokens", "logprobs"),
                                                greedy_segments(model, contexts, level, segment, device, desc))))
        return out["tokens"], out["logprobs"]

    cloud_tokens, _ = run(1, "cloud (full width)")
    conf, correct, extra = [], [], {}
    for level in levels:
        tokens, logprobs = run(level, f"edge (level {level})")
        conf.append({name: confidence(name, logprobs) for name in TASK_MEASURES[LM]})
        same = tokens == cloud_tokens  # (N, k)
        correct.append(same.all(-1))
        extra[f"level{level}_token_agreement"] = float(same.mean())
        extra[f"level{level}_first_token_agreement"] = float(same[:, 0].mean())
    return Records(LM, levels, conf, correct, np.ones(contexts.shape[0], dtype=bool), extra)
