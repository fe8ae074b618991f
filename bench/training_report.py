"""Build docs/RESULTS.md, the Pareto plots and the checkpoints' model cards from docs/results/.

    python -m bench.training_report

docs/results/ holds what `bash bench/gpu_suite.sh lm vision` wrote (eval.json of the joint run
and of each independent baseline, and each run's metrics.json); this script only formats them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matmamba.eval import markdown_table, pareto_plot

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TASKS = {
    "vision": {"checkpoint": "matmamba-vision-fmnist", "metric": "accuracy", "better": "higher",
               "claim": "within 1.0 point of its baseline", "limit": 0.01},
    "lm": {"checkpoint": "matmamba-lm-austen", "metric": "loss", "better": "lower",
           "claim": "held-out loss within 2% of its baseline", "limit": 0.02},
}


def load(task: str, name: str) -> dict[str, Any]:
    return json.loads((RESULTS / task / f"{name}.json").read_text())


def level_rows(task: str) -> list[dict[str, Any]]:
    joint = load(task, "eval-joint")
    rows = []
    for row in sorted((r for r in joint["rows"] if r["kind"] == "level"), key=lambda r: -r["params"]):
        width = row["widths"][0]
        base = load(task, f"eval-baseline-{width}")["rows"][0]
        rows.append({"width": width, "params": row["params"], "joint": row, "baseline": base})
    return rows


def comparison_table(task: str) -> tuple[str, bool]:
    spec = TASKS[task]
    metric = spec["metric"]
    lines = [f"| width | params | nested (joint) {metric} | independent baseline {metric} | difference | ok |",
             "| --- | --- | --- | --- | --- | --- |"]
    all_ok = True
    for r in level_rows(task):
        j, b = r["joint"][metric], r["baseline"][metric]
        if metric == "accuracy":
            diff, ok = f"{100 * (j - b):+.2f} points", b - j <= spec["limit"]
        else:
            diff, ok = f"{100 * (j - b) / b:+.2f}%", (j - b) / b <= spec["limit"]
        all_ok &= ok
        extra = f" ({r['joint']['bits_per_byte']:.4f} bpb)" if metric == "loss" else ""
        extra_b = f" ({r['baseline']['bits_per_byte']:.4f} bpb)" if metric == "loss" else ""
        lines.append(f"| {r['width']} | {r['params']:,} | {j:.4f}{extra} | {b:.4f}{extra_b} | {diff} | "
                     f"{'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n", all_ok


def between_anchors(task: str, kind: str) -> tuple[int, int]:
    """How many specs of `kind` score at least as well as the trained level just below them in parameters."""
    joint = load(task, "eval-joint")
    metric, higher = TASKS[task]["metric"], TASKS[task]["better"] == "higher"
    anchors = sorted((r["params"], r[metric]) for r in joint["rows"] if r["kind"] == "level")
    inside = total = 0
    for row in (r for r in joint["rows"] if r["kind"] == kind):
        below = [a for a in anchors if a[0] <= row["params"]]
        lo = below[-1] if below else anchors[0]
        score = row[metric]
        total += 1
        inside += (score >= lo[1]) if higher else (score <= lo[1])
    return inside, total


def sequential_vision_baseline_rate() -> float:
    """steps/s of the full-width vision baseline from the sequential run's log (its last JSON summary)."""
    log = (RESULTS / "vision" / "sequential-run.log").read_text()
    rates = [float(line.split(":")[1].strip().rstrip(",")) for line in log.splitlines()
             if line.strip().startswith('"steps_per_second"')]
    return rates[-1]


def throughput(task: str) -> dict[str, Any]:
    joint = load(task, "joint-metrics")
    singles = {w: load(task, f"baseline-{w}-metrics") for w in sorted(
        int(p.name.split("-")[1]) for p in (RESULTS / task).glob("baseline-*-metrics.json"))}
    return {"joint": joint, "singles": singles}


def throughput_text() -> str:
    lm = throughput("lm")
    j = lm["joint"]["train_seconds"]
    singles = {w: m["train_seconds"] for w, m in lm["singles"].items()}
    total = sum(singles.values())
    vj = load("vision", "joint-metrics")
    v1_rate = sequential_vision_baseline_rate()
    parts = ", ".join(f"w={w}: {s:.1f} s" for w, s in sorted(singles.items(), reverse=True))
    return (
        f"LM, all five runs sequential in one device run ({lm['joint']['device']}): joint 4-level training took "
        f"{j:.1f} s of training time for {lm['joint']['steps']} steps; the four single-width runs took {parts}, "
        f"{total:.1f} s together. Joint / sum = **{j / total:.2f}** (joint training is {total / j:.2f}x faster "
        "than training the four widths separately). Times exclude evaluation and include Triton's first-call "
        "autotuning in each process.\n\n"
        f"Vision ({vj['device']}): joint 4-level training ran at {vj['steps_per_second']:.2f} steps/s and the "
        f"full-width baseline alone at {v1_rate:.2f} steps/s, sequentially in one device run "
        "(`docs/results/vision/sequential-run.log`; that run's time limit cut the other baselines). "
        f"One joint step costs {v1_rate / vj['steps_per_second']:.2f} full-width single steps. The baselines used "
        "for accuracy ran concurrently on one GPU in a later run, so their timings are not used.\n"
    )


def model_card(task: str) -> str:
    spec = TASKS[task]
    metrics = load(task, "joint-metrics")
    joint = load(task, "eval-joint")
    cfg = metrics["config"]
    unit = metrics["unit"]
    lines = [
        f"# {spec['checkpoint']}", "",
        f"MatMamba-{'Vision' if task == 'vision' else 'LM'} trained jointly at widths "
        f"{', '.join(s.split('=')[1] for s in metrics['specs'])} (levels {metrics['levels']}).", "",
        f"- data: {metrics['data']['train']}; validation: {metrics['data']['val']}",
        f"- steps: {metrics['steps']}, {unit} seen: {metrics['samples_seen']:,}",
        f"- wall time: {metrics['wall_seconds']:.1f} s on {metrics['device']} (torch {metrics['torch']})",
        f"- seed: {metrics['seed']}; command: `bash bench/gpu_suite.sh {task}`",
        f"- fingerprint (sha256): `{metrics['fingerprint']}`",
        f"- config: d_model {cfg['block']['d_model']}, n_layer {cfg['n_layer']}, d_state {cfg['block']['d_state']}, "
        f"headdim {cfg['block']['headdim']}, expand {cfg['block']['expand']}", "",
        "## Held-out evaluation per level", "", markdown_table(
            {**joint, "rows": [r for r in joint["rows"] if r["kind"] == "level"]}),
    ]
    return "\n".join(lines)


def main() -> None:
    sections = ["# Training results", "",
                "Every number below comes from `bash bench/gpu_suite.sh lm vision eval` (training, baselines, "
                "evaluation of the shipped checkpoints) and is formatted by `python -m bench.training_report` from "
                "`docs/results/`.", ""]
    for task, spec in TASKS.items():
        joint = load(task, "eval-joint")
        baselines = {r["params"]: r["baseline"][spec["metric"]] for r in level_rows(task)}
        plot = ROOT / "docs" / f"pareto-{task}.png"
        pareto_plot(joint, plot, baselines)
        table, ok = comparison_table(task)
        inside, total = between_anchors(task, "mixnmatch")
        mid_in, mid_total = between_anchors(task, "interpolated")
        sections += [
            f"## {'MatMamba-Vision, Fashion-MNIST' if task == 'vision' else 'MatMamba-LM, Jane Austen'}", "",
            f"Nested submodels of one jointly trained checkpoint against independently trained baselines of the "
            f"same width (same data, steps and schedule), on {joint['data']}. Claim: every nested level "
            f"{spec['claim']}: **{'holds' if ok else 'does not hold'}**.", "", table,
            f"![Pareto plot]({plot.name})", "",
            f"Mix'n'Match ({total} random per-layer specs over the trained widths): {inside} of {total} are at "
            f"least as good as the trained level just below them in parameters; the rest fall below it. "
            f"Untrained uniform widths midway between trained ones: {mid_in} of {mid_total} at least as good as "
            "the trained level below them. So on these small, briefly trained models the submodels between the "
            "anchors do **not** interpolate as the paper reports for its larger models: random mixes that put a "
            "narrow layer next to a wide one lose more than their parameter count suggests, and untrained "
            "uniform widths land near (mostly just under) the trained level below them. Use the trained levels "
            "(or specs close to them) when choosing an edge width.", "",
            "<details><summary>all evaluated specs</summary>", "", markdown_table(joint), "</details>", "",
        ]
        (ROOT / "checkpoints" / spec["checkpoint"] / "README.md").write_text(model_card(task))
    sections += ["## Training throughput: joint vs separate", "", throughput_text()]
    (ROOT / "docs" / "RESULTS.md").write_text("\n".join(sections))


if __name__ == "__main__":
    main()
