"""`make demo` today: the nested model library on the shipped checkpoints, on this machine's CPU.

The end-to-end demo through cloud service and router is the deployment issue's work; this runs
the library alone:
1. Fashion-MNIST: each nested level of `checkpoints/matmamba-vision-fmnist`, loaded with partial
   loading (only the slices that width needs), classifies the 2,000 held-out test images shipped
   in `data/fashion-mnist-sample/`; one table shows accuracy, parameters, bytes read, latency.
2. Language: `checkpoints/matmamba-lm-austen` continues a prompt at each level.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from .data import load_fashion_mnist
from .flops import count_flops, count_params, vision_tokens
from .pretrained import load_model
from .tasks import vision_logits

ROOT = Path(__file__).resolve().parents[1]
VISION = ROOT / "checkpoints" / "matmamba-vision-fmnist"
LM = ROOT / "checkpoints" / "matmamba-lm-austen"
PROMPT = "It is a truth universally acknowledged"


def vision_table(levels: list[int], limit: int) -> Table:
    images, labels = load_fashion_mnist("test-sample")
    images, labels = images[:limit], labels[:limit]
    table = Table(title=f"MatMamba-Vision on {labels.numel()} held-out Fashion-MNIST test images (CPU)")
    for col in ("level", "width", "params", "MFLOPs/image", "bytes read", "accuracy", "ms/image"):
        table.add_column(col, justify="right")
    for level in tqdm(levels, desc="vision levels", unit="level"):
        model = load_model(VISION, mrl_level=level)
        cfg, width = model.config, model.load_report.width
        spec = [width] * cfg.n_layer
        start = time.perf_counter()
        logits = vision_logits(model, images, spec, torch.device("cpu"), batch_size=250)
        ms = (time.perf_counter() - start) * 1000 / labels.numel()
        acc = (logits.argmax(-1) == labels).float().mean().item()
        table.add_row(str(level), str(width), f"{count_params(cfg, spec):,}",
                      f"{count_flops(cfg, spec, vision_tokens(cfg)) / 1e6:.1f}",
                      f"{model.load_report.bytes_read:,}", f"{acc:.4f}", f"{ms:.2f}")
    return table


def lm_samples(levels: list[int], tokens: int, console: Console) -> None:
    model = load_model(LM)
    tok = model.tokenizer
    prompt = torch.tensor([tok.encode(PROMPT)])
    for level in levels:
        out = model.generate(prompt, tokens, mrl_level=level, temperature=0.7, top_k=40,
                             generator=torch.Generator().manual_seed(0))
        console.rule(f"MatMamba-LM level {level} (width {model.config.d_model // level})")
        console.print(tok.decode(out[0].tolist()), highlight=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m matmamba.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="how many shipped test images to classify")
    p.add_argument("--tokens", type=int, default=60, help="tokens to generate per level")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    console = Console()
    console.print("[bold]MatMamba library demo[/bold]: one checkpoint, four nested widths. "
                  "(This runs the library alone; serving through cloud and router: README, Serving.)")
    console.print(vision_table([1, 2, 4, 8], args.images))
    lm_samples([1, 8], args.tokens, console)


if __name__ == "__main__":
    main()
