"""Stream a generation through the router as text, marking which tier wrote each token (no torch).

On a terminal, cloud tokens are cyan and degraded edge tokens (the cloud was wanted but did not
answer) yellow; otherwise they are wrapped in ``[[ ]]`` and ``{{ }}``. Edge tokens are plain.

    with EdgeClient("127.0.0.1:50052") as client:
        done = stream_generation(client, "It is a truth", sys.stdout, color=True, max_tokens=40)
    print(done.summary())   # "40 tokens: 29 edge, 11 cloud, 0 degraded; finish length; 812 ms"
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from .client import EdgeClient

# ANSI styles on a terminal.
CLOUD_STYLE, DEGRADED_STYLE, RESET = "\x1b[36m", "\x1b[33m", "\x1b[0m"
STYLES = {"cloud": CLOUD_STYLE, "degraded": DEGRADED_STYLE}
# Plain-text markers when the output is not a terminal (or color is off).
PLAIN_MARKS = {"cloud": ("[[", "]]"), "degraded": ("{{", "}}"), "edge": ("", "")}


class TierWriter:
    """Writes generated text, marking the cloud's (and degraded) tokens with color or brackets."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out, self.color, self.kind = out, color, "edge"

    def write(self, text: str, kind: str) -> None:
        """Write ``text`` produced by ``kind`` (edge, cloud or degraded)."""
        if kind != self.kind:
            self._close()
            self.kind = kind
            self.out.write(STYLES.get(kind, "") if self.color else PLAIN_MARKS[kind][0])
        self.out.write(text)
        self.out.flush()

    def _close(self) -> None:
        if self.kind != "edge":
            self.out.write(RESET if self.color else PLAIN_MARKS[self.kind][1])

    def finish(self) -> None:
        """Close an open mark and end the line."""
        self._close()
        self.kind = "edge"
        self.out.write("\n")
        self.out.flush()


def legend(color: bool) -> str:
    """One line saying how the tiers are marked."""
    marked = {kind: (f"{STYLES[kind]}{kind}{RESET}" if color else f"{PLAIN_MARKS[kind][0]}{kind}{PLAIN_MARKS[kind][1]}")
              for kind in STYLES}
    return f"tokens: edge (plain), {marked['cloud']} (escalated), {marked['degraded']} (cloud wanted, edge answered)"


@dataclass
class StreamResult:
    """What a streamed generation produced: tokens per tier, how it ended, how long it took."""

    counts: Counter = field(default_factory=Counter)  # "edge" / "cloud" / "degraded" -> tokens
    finish: str | None = None
    ms: float = 0.0

    def summary(self) -> str:
        return (f"{sum(self.counts.values())} tokens: {self.counts['edge']} edge, {self.counts['cloud']} cloud, "
                f"{self.counts['degraded']} degraded; finish {self.finish}; {self.ms:.0f} ms")


def stream_generation(client: EdgeClient, prompt: str, out: TextIO, color: bool, **sampling: Any) -> StreamResult:
    """Write the generation's text to ``out`` as it arrives (``sampling``: EdgeClient.generate's keywords)."""
    writer, result, start = TierWriter(out, color), StreamResult(), time.perf_counter()
    for chunk in client.generate(prompt, **sampling):
        kind = "degraded" if chunk.degraded else (chunk.tier or "edge")
        writer.write(chunk.text, kind)
        result.counts[kind] += len(chunk.token_ids)
        result.finish = chunk.finish_reason or result.finish
    writer.finish()
    result.ms = (time.perf_counter() - start) * 1e3
    return result
