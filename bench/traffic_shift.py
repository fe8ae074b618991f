"""Traffic shift end to end: calibrate from the traffic log, shift the traffic, see DRIFT, re-tune, back in band.

    python -m bench.traffic_shift --out docs/results/traffic_shift.json --plot docs/traffic-shift.png \\
        --retune-plot docs/traffic-shift-retune.png                        # ~1.5 min on a 2-core CPU
    python -m bench.traffic_shift --task lm --out docs/results/traffic_shift_lm.json \\
        --plot docs/traffic-shift-lm.png                                    # Generate traffic

1. ``python -m cloud`` and ``python -m router`` start on 127.0.0.1 (the router with its own Ray
   cluster, ``--traffic-log``, ``--shadow-rate``, and a thresholds file it polls, first holding
   the documented default max_softmax >= 0.8);
2. **calibration**: clean Fashion-MNIST test-sample images; then
   ``python -m router.tune --from-log DIR --since T --target-escalation 0.2 --apply --out FILE``
   and the router reloads FILE;
3. **clean**: more clean images; **shift**: other images with Gaussian pixel noise
   (``--noise`` sigma on the 0-255 scale): the edge gets less confident;
4. re-tuning from the log on the traffic since the shift, applied the same way; **after**: fresh
   noisy images.

With ``--task lm`` the traffic is Generate requests to the LM checkpoint (items: 8-token segments):
prompts are 12-word windows of the held-out Austen text (``data/austen-heldout.txt``), sampled at
``--temperature`` (clean) and ``--shift-temperature`` (shift: clients sampling hotter, so the
edge's segments are less likely), the thresholds start at the LM default mean_token_logprob >= -4,
and re-tuning reads the log's Generate segments (``--method Generate``). Generate is not shadowed.

Every ``--reading`` items the router's /metrics is read (as ``python -m router.monitor`` does);
each reading's escalation rate, its 95 % Wilson interval and the monitor's DRIFT test against
the band of the thresholds file in force are recorded, and the estimated edge/cloud agreement on
kept items from shadow escalations per phase. JSON to ``--out``, the figure to ``--plot``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.router_overhead import DEFAULT_CHECKPOINT, REPO_ROOT, START_TIMEOUT_S, free_port, machine
from edge.client import EdgeClient
from router.monitor import Snapshot, drifted, expected_band, parse, wilson
from router.retune import main as retune_main

log = logging.getLogger("bench.traffic_shift")
TARGET = 0.2
PHASES = (("calibration", 0, 640, False), ("clean", 640, 1024, False), ("shift", 1024, 1536, True),
          ("after re-tuning", 1536, 2000, True))
# LM: the same phases in generations (2 segments each: LM_TOKENS new tokens, 8-token segments).
LM_PHASES = (("calibration", 0, 320, False), ("clean", 320, 512, False), ("shift", 512, 768, True),
             ("after re-tuning", 768, 1000, True))
LM_CHECKPOINT = REPO_ROOT / "checkpoints" / "matmamba-lm-austen"
LM_TEXT = REPO_ROOT / "data" / "austen-heldout.txt"
LM_TOKENS, PROMPT_WORDS = 16, 12
DEFAULT_POLICY = {"vision": {"measure": "max_softmax", "threshold": 0.8, "version": "default-0.8"},
                  "lm": {"measure": "mean_token_logprob", "threshold": -4.0, "version": "default--4"}}


def _serve(cmd: list[str], log_file: Path, port: int) -> subprocess.Popen:
    with open(log_file, "a") as out:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[1]} exited with {proc.returncode}; see {log_file}")
        try:
            with EdgeClient(f"127.0.0.1:{port}", timeout_s=1.0) as client:
                if client.health() == "SERVING":
                    return proc
        except Exception:  # not listening yet
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"{cmd[1]} did not serve within {START_TIMEOUT_S} s; see {log_file}")


def _scrape(port: int) -> Snapshot:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return parse(reply.read().decode())


def _delta(now: Snapshot, before: Snapshot) -> Snapshot:
    items = {"all": now.total - before.total}
    shadow = {k: now.shadow.get(k, 0.0) - before.shadow.get(k, 0.0) for k in ("compared", "agreed")}
    return Snapshot(items, now.escalations - before.escalations, now.degraded - before.degraded, 0.0, {},
                    shadow=shadow)


def _send(address: str, images: np.ndarray) -> None:
    with EdgeClient(address) as client, ThreadPoolExecutor(4) as pool:
        answers = pool.map(client.classify, [images[i:i + 16] for i in range(0, len(images), 16)])
        assert sum(len(a) for a in answers) == len(images)


class Prompts:
    """Generate requests for --task lm: (prompt, temperature, seed) per item of a phase's range."""

    def __init__(self, temperature: float, shift_temperature: float, seed: int) -> None:
        words = re.findall(r"\S+", LM_TEXT.read_text())
        starts = np.random.default_rng(seed).integers(0, len(words) - PROMPT_WORDS, LM_PHASES[-1][2])
        self.prompts = [" ".join(words[i:i + PROMPT_WORDS]) for i in starts]
        self.temperature, self.shift_temperature = temperature, shift_temperature

    def __getitem__(self, key: tuple[slice, bool]) -> list[tuple[str, float, int]]:
        window, shifted = key
        t = self.shift_temperature if shifted else self.temperature
        return [(p, t, i) for i, p in zip(range(window.start, window.stop), self.prompts[window])]


def _send_prompts(address: str, requests: list[tuple[str, float, int]]) -> None:
    def one(request: tuple[str, float, int]) -> int:
        prompt, temperature, seed = request
        return sum(len(c.token_ids) for c in client.generate(prompt, max_tokens=LM_TOKENS, temperature=temperature,
                                                            seed=seed))

    with EdgeClient(address) as client, ThreadPoolExecutor(4) as pool:
        assert all(n == LM_TOKENS for n in pool.map(one, requests)), "a generation ended early"


def _retune(args: argparse.Namespace, log_dir: Path, thresholds: Path, since: float, address: str,
            plot: str | None) -> str:
    """Re-tune from the log since ``since``, apply, wait until the router serves the new file; the report."""
    with EdgeClient(address) as client:
        before = client.thresholds().version
        time.sleep(0.5)  # the router's log writer takes the last records off its queue
        argv = ["--from-log", str(log_dir), "--since", str(since), "--target-escalation", str(TARGET), "--apply",
                "--out", str(thresholds)] + (["--plot", plot] if plot else [])
        if args.task == "lm":
            argv += ["--method", "Generate"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert retune_main(argv) == 0
        deadline = time.monotonic() + 30
        while client.thresholds().version == before and time.monotonic() < deadline:
            time.sleep(0.1)
    print(out.getvalue())
    return out.getvalue()


def run(args: argparse.Namespace, tmp: Path) -> dict:
    cloud_port, port, metrics = free_port(), free_port(), free_port()
    log_dir, thresholds = tmp / "traffic-log", tmp / "thresholds.json"
    thresholds.write_text(json.dumps(DEFAULT_POLICY[args.task]))
    cloud = _serve(["-m", "cloud", "--checkpoint", str(args.checkpoint), "--port", str(cloud_port), "--metrics-port",
                    "-1", "--host", "127.0.0.1"], tmp / "cloud.log", cloud_port)
    router = None
    try:
        router = _serve(["-m", "router", "--checkpoint", str(args.checkpoint), "--edge-level", str(args.level),
                         "--cloud", f"127.0.0.1:{cloud_port}", "--port", str(port), "--metrics-port", str(metrics),
                         "--thresholds", str(thresholds), "--thresholds-poll-ms", "200", "--max-wait-ms", "0",
                         "--deadline-ms", "5000", "--traffic-log", str(log_dir), "--shadow-rate",
                         str(args.shadow_rate)], tmp / "router.log", port)
        address = f"127.0.0.1:{port}"
        if args.task == "lm":
            prompts = Prompts(args.temperature, args.shift_temperature, args.seed)
            return _phases(args, LM_PHASES, lambda window, shifted: _send_prompts(address, prompts[window, shifted]),
                           metrics, log_dir, thresholds, address)
        from matmamba.data import load_fashion_mnist

        images = load_fashion_mnist("test-sample")[0].numpy()[:, None]  # (2000, 1, 28, 28) uint8
        noise = np.random.default_rng(args.seed).normal(0, args.noise, images.shape)
        noisy = np.clip(images + noise, 0, 255).astype(np.uint8)
        return _phases(args, PHASES, lambda window, shifted: _send(address, (noisy if shifted else images)[window]),
                       metrics, log_dir, thresholds, address)
    finally:
        for proc in (router, cloud):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)


def _phases(args, plan, send, metrics, log_dir, thresholds, address) -> dict:
    """Run ``plan``'s phases; ``send(slice, shifted)`` sends the requests of a reading."""
    readings, phases, reports, band = [], [], {}, None
    for name, lo, hi, shifted in plan:
        start_t, start_snap = time.time(), _scrape(metrics)
        for i in range(lo, hi, args.reading):
            before = _scrape(metrics)
            send(slice(i, min(i + args.reading, hi)), shifted)
            d = _delta(_scrape(metrics), before)
            low, high = wilson(d.escalations, d.total)
            readings.append({"phase": name, "items": d.total, "rate": d.rate, "ci95": [low, high],
                             "band": None if band is None else [band[1], band[2]], "drift": drifted(d, band)})
        d = _delta(_scrape(metrics), start_snap)
        agree = (d.shadow["agreed"], d.shadow["compared"])
        phases.append({"phase": name, "items": d.total, "rate": d.rate, "ci95": list(wilson(d.escalations, d.total)),
                       "band": None if band is None else [band[1], band[2]], "drift": drifted(d, band),
                       "shadow_agreement": agree[0] / agree[1] if agree[1] else None,
                       "shadow_agreement_ci95": list(wilson(*agree)) if agree[1] else None, "shadow_samples": agree[1]})
        log.info("%s: escalation %.1f%% over %d items", name, 100 * d.rate, d.total)
        if name in ("calibration", "shift"):
            reports[name] = _retune(args, log_dir, thresholds, start_t, address,
                                    args.retune_plot if name == "shift" else None)
            reports[name + "_file"] = json.loads(thresholds.read_text())
            band = expected_band(thresholds)
    return {"readings": readings, "phases": phases, "retune": reports}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readings = result["readings"]
    x = np.cumsum([r["items"] for r in readings])
    rate = np.array([r["rate"] for r in readings])
    err = np.array([[r["rate"] - r["ci95"][0], r["ci95"][1] - r["rate"]] for r in readings]).T
    fig, ax = plt.subplots(figsize=(9, 4.4))
    colors = ["tab:red" if r["drift"] else "tab:blue" for r in readings]
    ax.errorbar(x, rate, yerr=err, fmt="none", ecolor="gray", lw=1)
    ax.scatter(x, rate, c=colors, zorder=3, s=22)
    for i, r in enumerate(readings):
        if r["band"] is not None:
            ax.fill_between([x[i] - r["items"], x[i]], *r["band"], color="tab:green", alpha=0.18, lw=0)
    ends = {p["phase"]: e for p, e in zip(result["phases"], np.cumsum([p["items"] for p in result["phases"]]))}
    shift = result.get("shift_label", "shift: pixel noise")
    for name, label, y in (("calibration", "re-tuned from the log (clean)", 0.97), ("clean", shift, 0.9),
                           ("shift", "re-tuned from the log (shifted)", 0.97)):
        ax.axvline(ends[name], color="k", ls="--", lw=0.8)
        ax.text(ends[name], y, f" {label}", fontsize=8, va="top", transform=ax.get_xaxis_transform())
    ax.axhline(TARGET, color="tab:green", lw=0.8)
    ax.set_xlabel(result.get("items_label", "items answered"))
    ax.set_ylabel("escalation rate per reading (95% Wilson)")
    ax.set_title("escalation rate per reading; green: calibrated band in force; red: DRIFT", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.traffic_shift", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("vision", "lm"), default="vision",
                   help="vision: Classify images (default); lm: Generate requests to the LM checkpoint")
    p.add_argument("--checkpoint", type=Path, help="default: the shipped checkpoint of --task")
    p.add_argument("--level", type=int, default=4, help="edge nesting level (default %(default)s)")
    p.add_argument("--noise", type=float, default=40.0,
                   help="vision: pixel noise sigma of the shift (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="lm: sampling temperature before the shift")
    p.add_argument("--shift-temperature", type=float, default=1.2, help="lm: sampling temperature of the shift")
    p.add_argument("--shadow-rate", type=float, default=0.2, help="router --shadow-rate (default %(default)s)")
    p.add_argument("--reading", type=int, help="requests per monitor reading (default 64 images, 16 generations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON results")
    p.add_argument("--plot", help="PNG: escalation rate per reading with the bands")
    p.add_argument("--retune-plot", help="PNG: the trade-off curve re-estimated after the shift")
    args = p.parse_args(argv)
    lm = args.task == "lm"
    args.checkpoint = args.checkpoint or (LM_CHECKPOINT if lm else DEFAULT_CHECKPOINT)
    args.reading = args.reading or (16 if lm else 64)
    if args.reading <= 0:
        p.error(f"--reading must be positive, got {args.reading}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="traffic-shift-") as tmp:
        result = run(args, Path(tmp))
    result.update(machine=machine(), settings={k: str(v) for k, v in vars(args).items()},
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if lm:
        result.update(shift_label=f"shift: temperature {args.temperature} -> {args.shift_temperature}",
                      items_label=f"generation segments answered ({LM_TOKENS // 8} per request)")
    print(f"{'phase':<18}{'items':>7}{'escalation':>12}{'95% interval':>18}{'band in force':>18}{'status':>8}"
          f"{'shadow agreement':>20}")
    for ph in result["phases"]:
        band = f"{ph['band'][0]:.1%}-{ph['band'][1]:.1%}" if ph["band"] else "-"
        agree = f"{ph['shadow_agreement']:.1%} (n={ph['shadow_samples']:.0f})" if ph["shadow_agreement"] else "-"
        print(f"{ph['phase']:<18}{ph['items']:>7.0f}{ph['rate']:>12.1%}{ph['ci95'][0]:>11.1%}-{ph['ci95'][1]:.1%}"
              f"{band:>18}{'DRIFT' if ph['drift'] else 'ok':>8}{agree:>20}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
