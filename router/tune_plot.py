"""The trade-off plot of ``python -m router.tune``: accuracy vs cloud rate and vs cloud FLOPs, per measure."""

from __future__ import annotations

import numpy as np

from .tune_data import Records
from .tune_policy import chain_points, oracle_curve, pareto


def plot_tradeoff(path: str, rec: Records, chosen: tuple[str, dict], flops: tuple[list[int], int], title: str,
                  kind: str) -> None:
    """Per measure the best accuracy at each cloud rate (a chain: over all threshold combinations),
    the oracle router (escalates exactly the items no edge tier answers right) and random escalation
    (between the widest edge tier and the cloud); the chosen point as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, cloud_flops = flops
    last_acc, cloud_acc = float(rec.correct[-1].mean()), float(rec.cloud_correct.mean())
    o_rate, o_acc = oracle_curve(np.logical_or.reduce(rec.correct), rec.cloud_correct)
    fronts = {}
    for m in rec.measures:
        points = chain_points(rec, m)
        fronts[m] = pareto(points, points.cloud_rate)
    measure, summary = chosen
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, scale, xlabel in ((axes[0], 1.0, "cloud escalation rate"),
                              (axes[1], cloud_flops / 1e6, "cloud MFLOPs per item (cloud rate x full model)")):
        for name, (rate, acc) in fronts.items():
            ax.step(rate * scale, acc, where="post", label=name, lw=1.4)
        ax.plot(o_rate * scale, o_acc, "k--", lw=1, label="oracle router")
        ax.plot([0, scale], [last_acc, cloud_acc], ":", color="gray", lw=1.2, label="random escalation")
        ax.plot([summary["cloud_rate"] * scale], [summary["accuracy"]], "r*", ms=14, label=f"chosen ({measure})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"cascade {kind}" + (" with the cloud" if kind == "agreement" else ""))
        ax.grid(alpha=0.3)
        lo = min(float(rec.correct[0].mean()), cloud_acc, min(a.min() for _, a in fronts.values()))
        ax.set_ylim(lo - 0.01, max(float(o_acc.max()), cloud_acc) + 0.01)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
