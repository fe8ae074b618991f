"""Joint Matryoshka training: several widths, one optimizer step per batch.

    python -m matmamba.train vision --out checkpoints/matmamba-vision-fmnist --steps 3000
    python -m matmamba.train lm --out checkpoints/matmamba-lm-austen --steps 1500
    python -m matmamba.train vision --levels 1 --width 32 --out runs/baseline-32   # independent baseline
    python -m matmamba.train lm --init checkpoints/matmamba-lm-austen --distill 0.5 --out runs/lm-distilled

Each step runs one forward/backward per trained width (loss weights configurable, equal by
default) and one AdamW step; bf16 autocast on CUDA; linear warmup then cosine decay; gradient
clipping. `--resume` continues from `<out>/train_state.pt` bit for bit (same data order).

`--distill A` trains every narrower width on (1 - A) x cross-entropy + A x KL from the full
width's (detached) output at `--distill-temperature`, so the nested submodels learn to agree
with the full model: the drafts of cross-tier speculative decoding get accepted more often.
`--init DIR` starts from a trained checkpoint (its architecture and tokenizer) instead of a
fresh model, e.g. to distill the shipped one.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import tasks
from .config import MatMamba2Config, MatMambaLMConfig, MatMambaVisionConfig
from .data import BPETokenizer, load_fashion_mnist, load_prose, load_tokenizer
from .flops import count_params
from .lm import MatMambaLM
from .vision import MatMambaVision

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
# Parameters that get no weight decay: SSM dynamics, skips, norms, biases, embeddings, class token.
NO_DECAY_SUFFIXES = ("dt_bias", "A_log", ".D", "norm.weight", "norm_f.weight", "bias", "embedding.weight",
                     "cls_token")


@dataclass
class TrainSetup:
    """Everything a run needs besides the loop."""

    model: torch.nn.Module
    specs: dict[str, tuple[int, ...]]  # name (e.g. "w=128") -> per-layer widths
    weights: dict[str, float]
    next_loss: Any  # (step) -> {name: loss tensor}
    evaluate: Any  # () -> {name: {metric: value}}
    samples_per_step: int
    unit: str  # "images" or "tokens"
    tokenizer: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    data_start: Any = lambda step: None  # (step) -> None: position the data stream for a resumed run
    init_fingerprint: str | None = None  # the --init checkpoint's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m matmamba.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["vision", "lm"])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--levels", default="1,2,4,8", help="granularities trained jointly (d_model // k)")
    p.add_argument("--level-weights", default=None, help="loss weight per level (default: equal)")
    p.add_argument("--width", type=int, default=None,
                   help="with --levels 1: train only this width (an independent baseline)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=None, help="default 256 images / 32 sequences")
    p.add_argument("--seq-len", type=int, default=256, help="LM training window")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor as a share of --lr")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate on the first N val images / windows (default: all)")
    p.add_argument("--save-every", type=int, default=500, help="write the resumable training state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step, keeping the resumable state (for jobs with a time limit)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=None, help="default 128 (vision) / 256 (lm)")
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--headdim", type=int, default=16,
                   help="channels per SSM head (fewer, wider heads run faster on CPU)")
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary trained on the train split")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint (architecture, weights, tokenizer); shape options are ignored")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight in [0, 1] of the KL from the full width in each narrower width's loss")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.levels = [int(k) for k in args.levels.split(",")]
    if args.width is not None and args.levels != [1]:
        p.error("--width trains one width only: use it with --levels 1")
    args.level_weights = ([float(w) for w in args.level_weights.split(",")] if args.level_weights
                          else [1.0] * len(args.levels))
    if len(args.level_weights) != len(args.levels):
        p.error("--level-weights needs one weight per level")
    if not 0.0 <= args.distill <= 1.0:
        p.error(f"--distill is a weight in [0, 1], got {args.distill}")
    if args.distill and args.width is not None:
        p.error("--distill teaches the nested widths from the full width; a --width baseline trains one width only")
    if args.distill and 1 not in args.levels:
        p.error("--distill needs level 1 among --levels: the full width is the teacher")
    if args.distill_temperature <= 0:
        p.error(f"--distill-temperature must be positive, got {args.distill_temperature}")
    if args.init is not None and not (args.init / "config.json").is_file():
        p.error(f"--init {args.init}: no checkpoint there (config.json is missing)")
    return args


def block_config(args: argparse.Namespace, d_model: int) -> MatMamba2Config:
    levels = tuple(sorted(set(args.levels) | {1}))
    return MatMamba2Config(d_model=d_model, d_state=args.d_state, headdim=args.headdim, chunk_size=64, levels=levels)


def initial_model(args: argparse.Namespace, cls: type, config: Any, device: torch.device) -> torch.nn.Module:
    """A fresh model from `config`, or the --init checkpoint (which must be of the same task)."""
    if args.init is None:
        return cls(config).to(device)
    try:
        model = cls.from_pretrained(args.init)
    except ValueError as err:
        raise SystemExit(f"--init {args.init}: {err}") from None
    return model.to(device)


def joint_losses(forward, labels: torch.Tensor, specs: dict[str, tuple[int, ...]],
                 args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """One loss per spec; with --distill the widest spec's logits teach the others."""
    teacher_name = max(specs, key=lambda name: sum(specs[name]))
    teacher = forward(specs[teacher_name])
    losses = {teacher_name: tasks.distilled_loss(teacher, labels, None, 0.0)}
    for name, spec in specs.items():
        if name != teacher_name:
            losses[name] = tasks.distilled_loss(forward(spec), labels, teacher if args.distill else None,
                                                args.distill, args.distill_temperature)
    return {name: losses[name] for name in specs}


def width_specs(model: torch.nn.Module, args: argparse.Namespace) -> tuple[dict, dict]:
    n_layer = model.config.n_layer
    if args.width is not None:
        model.config.block.check_width(args.width)
        widths = [args.width]
    else:
        widths = [model.config.block.width_for_level(k) for k in args.levels]
    specs = {f"w={w}": (w,) * n_layer for w in widths}
    return specs, dict(zip(specs, args.level_weights))


def setup_vision(args: argparse.Namespace, device: torch.device) -> TrainSetup:
    cfg = MatMambaVisionConfig(n_layer=args.n_layer, patch_size=args.patch_size,
                               block=block_config(args, args.d_model or 128))
    model = initial_model(args, MatMambaVision, cfg, device)
    specs, weights = width_specs(model, args)
    batch_size = args.batch_size or 256
    stream = {"batches": tasks.vision_train_batches(batch_size, args.seed)}
    val_images, val_labels = (t[:args.eval_samples] for t in load_fashion_mnist("val"))

    def data_start(step: int) -> None:
        stream["batches"] = tasks.vision_train_batches(batch_size, args.seed, start_step=step)

    def next_loss(step: int) -> dict[str, torch.Tensor]:
        images, labels = next(stream["batches"])
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return joint_losses(lambda spec: model(images, widths=spec), labels, specs, args)

    def evaluate() -> dict[str, dict[str, float]]:
        return {name: {"val_accuracy": tasks.vision_accuracy(model, val_images, val_labels, spec, device)}
                for name, spec in specs.items()}

    return TrainSetup(model, specs, weights, next_loss, evaluate, batch_size, "images", data_start=data_start,
                      data={"train": "fashion-mnist train (55,000)", "val": "fashion-mnist val (5,000)"})


def setup_lm(args: argparse.Namespace, device: torch.device) -> TrainSetup:
    tok_dir = args.out / "tokenizer"
    if args.init is not None:
        model = initial_model(args, MatMambaLM, None, device)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise SystemExit(f"--init {args.init}: the checkpoint has no tokenizer (tokenizer_config.json)")
    else:
        if args.resume and (tok_dir / "tokenizer_config.json").exists():
            tokenizer = load_tokenizer(tok_dir)
        else:
            tokenizer = BPETokenizer.train(load_prose("train"), vocab_size=args.vocab_size)
            tokenizer.save(tok_dir)
        cfg = MatMambaLMConfig(n_layer=args.n_layer, vocab_size=tokenizer.vocab_size,
                               block=block_config(args, args.d_model or 256))
        model = initial_model(args, MatMambaLM, cfg, device)
    streams = tasks.prose_streams(tokenizer)
    specs, weights = width_specs(model, args)
    full = (model.config.d_model,) * model.config.n_layer
    batch_size = args.batch_size or 32

    def next_loss(step: int) -> dict[str, torch.Tensor]:
        batch = tasks.lm_train_batch(streams["train"], batch_size, args.seq_len, args.seed, step).to(device)
        return joint_losses(lambda spec: model(batch[:, :-1], widths=spec), batch[:, 1:], specs, args)

    def evaluate() -> dict[str, dict[str, float]]:
        out = {}
        for name, spec in specs.items():
            res = tasks.lm_eval(model, streams["val"], spec, device, args.seq_len, max_windows=args.eval_samples)
            out[name] = {"val_loss": res["loss"], "val_bits_per_byte": res["bits_per_byte"]}
        narrower = {name: spec for name, spec in specs.items() if spec != full}
        if narrower:
            agreement = tasks.lm_agreement(model, streams["val"], narrower, full, device, args.seq_len,
                                           max_windows=args.eval_samples)
            for name, share in agreement.items():
                out[name]["val_top1_agreement"] = share
        return out

    return TrainSetup(model, specs, weights, next_loss, evaluate, batch_size * args.seq_len, "tokens",
                      tokenizer=tokenizer,
                      data={"train": f"Jane Austen novels, train split ({streams['train'].ids.numel()} tokens)",
                            "val": f"val split ({streams['val'].ids.numel()} tokens)"})


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(args.seed)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = (setup_vision if args.task == "vision" else setup_lm)(args, device)
    setup.init_fingerprint = setup.model.fingerprint if args.init is not None else None
    opt, sched = make_optimizer(setup.model, args)
    start, history, elapsed, side = 0, [], 0.0, 0.0  # side: seconds spent evaluating and saving
    if args.resume and (args.out / STATE_FILE).exists():
        state = torch.load(args.out / STATE_FILE, map_location=device, weights_only=True)
        setup.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, history, elapsed, side = (state["step"], json.loads(state["history"]), state["elapsed"],
                                         state["side"])
        setup.data_start(start)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.no_progress,
               desc=f"train {args.task}", unit="step")
    t0 = time.perf_counter()
    for step in bar:
        setup.model.train()
        opt.zero_grad(set_to_none=True)
        with tasks.autocast(device):
            losses = setup.next_loss(step)
        total = sum(setup.weights[name] * loss for name, loss in losses.items())
        total.backward()
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), args.clip)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix({name: f"{loss.item():.3f}" for name, loss in losses.items()})
        done = step + 1
        t_side = time.perf_counter()
        if done % args.eval_every == 0 or done == args.steps:
            history.append({"step": done, "train_loss": {k: v.item() for k, v in losses.items()},
                            "eval": setup.evaluate()})
            tqdm.write(json.dumps(history[-1]))
        side += time.perf_counter() - t_side
        if (done % args.save_every == 0 or done == args.stop_at) and done < args.steps:
            _save_state(args, setup, opt, sched, done, history, elapsed + time.perf_counter() - t0, side)
        if done == args.stop_at and done < args.steps:
            return {"stopped_at": done, "history": history}
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = elapsed + time.perf_counter() - t0
    return finish(args, setup, history, wall, wall - side, start)


def _save_state(args, setup: TrainSetup, opt, sched, step: int, history: list, elapsed: float,
                side: float) -> None:
    tmp = args.out / (STATE_FILE + ".tmp")
    torch.save({"model": setup.model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(), "step": step, "history": json.dumps(history),
                "elapsed": elapsed, "side": side}, tmp)
    tmp.replace(args.out / STATE_FILE)


def finish(args: argparse.Namespace, setup: TrainSetup, history: list, wall: float, train_seconds: float,
           start: int) -> dict[str, Any]:
    model = setup.model
    model.save_pretrained(args.out, tokenizer=setup.tokenizer)
    for leftover in (args.out / STATE_FILE, args.out / "tokenizer"):  # resumable state, no longer needed
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    steps_run = args.steps - start
    metrics = {
        "task": args.task, "steps": args.steps, "levels": args.levels, "width": args.width,
        "specs": {k: list(v) for k, v in setup.specs.items()},
        "params": {k: count_params(model.config, v) for k, v in setup.specs.items()},
        "samples_seen": args.steps * setup.samples_per_step, "unit": setup.unit,
        "wall_seconds": wall, "train_seconds": train_seconds,
        "steps_per_second": steps_run / train_seconds if train_seconds else None,
        "device": device_name, "torch": torch.__version__, "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": setup.data, "history": history, "final_eval": history[-1]["eval"] if history else {},
        "config": model.config.to_dict(), "fingerprint": model.fingerprint,
        "init": ({"checkpoint": str(args.init), "fingerprint": setup.init_fingerprint}
                 if args.init is not None else None),
    }
    (args.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    metrics = train(parse_args(argv))
    if "stopped_at" in metrics:
        print(f"stopped after step {metrics['stopped_at']}; continue with --resume")
        return
    print(json.dumps({"final_eval": metrics["final_eval"], "wall_seconds": round(metrics["wall_seconds"], 1),
                      "steps_per_second": metrics["steps_per_second"]}, indent=2))


if __name__ == "__main__":
    main()
