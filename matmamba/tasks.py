"""The two tasks (Fashion-MNIST classification, prose language modelling): data, loss and evaluation.

Training (`matmamba.train`), evaluation (`matmamba.eval`) and threshold tuning share these.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import ImageBatches, load_fashion_mnist, load_prose, normalize_images


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ------------------------------------------------------------------ vision


def distilled_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, alpha: float,
                   temperature: float = 1.0) -> torch.Tensor:
    """(1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student) at temperature T.

    logits and teacher: (..., classes), labels: (...). The teacher's logits are detached: the
    nested width learns to agree with the full width, the full width is not pulled towards it.
    teacher=None or alpha=0 is plain cross-entropy.
    """
    logits = logits.float().flatten(0, -2)
    ce = F.cross_entropy(logits, labels.flatten())
    if teacher is None or alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher.detach().float().flatten(0, -2) / t, -1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * t * t * kl


@torch.no_grad()
def vision_logits(model, images_uint8: torch.Tensor, widths: Sequence[int] | None, device: torch.device,
                  batch_size: int = 1000) -> torch.Tensor:
    """Logits (N, n_classes) in fp32 for uint8 images (N, 28, 28)."""
    model.eval()
    out = []
    for start in range(0, images_uint8.shape[0], batch_size):
        x = normalize_images(images_uint8[start:start + batch_size]).to(device)
        with autocast(device):
            out.append(model(x, widths=widths).float().cpu())
    return torch.cat(out)


def vision_accuracy(model, images_uint8: torch.Tensor, labels: torch.Tensor, widths: Sequence[int] | None,
                    device: torch.device) -> float:
    logits = vision_logits(model, images_uint8, widths, device)
    return (logits.argmax(-1) == labels).float().mean().item()


def vision_train_batches(batch_size: int, seed: int,
                         start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless augmented batches from the 55k training split; `start_step` resumes the same order."""
    images, labels = load_fashion_mnist("train")
    batches = ImageBatches(images, labels, batch_size, shuffle=True, seed=seed, augment=True, drop_last=True)
    batches.set_epoch(start_step // len(batches))
    skip = start_step % len(batches)
    while True:
        for i, batch in enumerate(batches):
            if skip and i < skip:
                continue
            yield batch
        skip = 0


# ------------------------------------------------------------------ language modelling


@dataclass
class TokenStream:
    """A tokenized text split: ids (N,) int64 and the UTF-8 bytes it covers (for bits per byte)."""

    ids: torch.Tensor
    n_bytes: int

    @classmethod
    def from_text(cls, text: str, tokenizer) -> TokenStream:
        return cls(torch.tensor(tokenizer.encode(text), dtype=torch.int64), len(text.encode("utf-8")))


def lm_loss(model, tokens: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """Next-token cross-entropy (nats/token). tokens: (B, L + 1)."""
    logits = model(tokens[:, :-1], widths=widths)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def window_count(stream: TokenStream, seq_len: int, max_windows: int | None) -> int:
    """How many non-overlapping seq_len windows (each with its next token) an evaluation reads."""
    n = (stream.ids.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation split has {stream.ids.numel()} tokens, fewer than seq_len {seq_len}")
    return n


@torch.no_grad()
def lm_agreement(model, stream: TokenStream, specs: dict[str, Sequence[int]], teacher: Sequence[int],
                 device: torch.device, seq_len: int = 256, batch_size: int = 32,
                 max_windows: int | None = None) -> dict[str, float]:
    """Share of positions where each spec's top-1 next token equals the teacher spec's.

    Over the same non-overlapping windows as `lm_eval`. Under greedy speculative decoding this is
    the chance that a drafted token is accepted, on this split's text.
    """
    model.eval()
    n = window_count(stream, seq_len, max_windows)
    same = dict.fromkeys(specs, 0)
    for start in range(0, n, batch_size):
        batch = torch.stack([stream.ids[i * seq_len:i * seq_len + seq_len]
                             for i in range(start, min(n, start + batch_size))]).to(device)
        with autocast(device):
            top = model(batch, widths=teacher).argmax(-1)
            for name, spec in specs.items():
                same[name] += (model(batch, widths=spec).argmax(-1) == top).sum().item()
    return {name: count / (n * seq_len) for name, count in same.items()}


def lm_train_batch(stream: TokenStream, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """Random windows (B, seq_len + 1); the same (seed, step) always gives the same batch (resumable)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.ids.numel() - seq_len - 1, (batch_size,), generator=g)
    return torch.stack([stream.ids[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def lm_eval(model, stream: TokenStream, widths: Sequence[int] | None, device: torch.device, seq_len: int = 256,
            batch_size: int = 32, max_windows: int | None = None) -> dict[str, float]:
    """Mean loss (nats/token) and bits per byte over non-overlapping windows of the split."""
    model.eval()
    n = window_count(stream, seq_len, max_windows)
    windows = torch.stack([stream.ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
    total = 0.0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(device)
        with autocast(device):
            total += lm_loss(model, batch, widths).item() * batch.shape[0]
    loss = total / n
    covered = n * seq_len / stream.ids.numel()
    bpb = loss * n * seq_len / (covered * stream.n_bytes) / math.log(2)
    return {"loss": loss, "bits_per_byte": bpb}


def prose_streams(tokenizer, splits: Sequence[str] = ("train", "val")) -> dict[str, TokenStream]:
    return {split: TokenStream.from_text(load_prose(split), tokenizer) for split in splits}
