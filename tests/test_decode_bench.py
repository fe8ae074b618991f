"""bench/decode_bench.py's measurement loop and table on the CPU, with a fake clock (the run itself needs CUDA)."""

from __future__ import annotations

import pytest

import bench.decode_bench as db


def test_rates_are_timed_in_interleaved_rounds_after_one_warm_up_each(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    seconds_per_token = {"a": 0.002, "b": 0.001}

    def generator(name: str):
        def generate(n: int) -> None:
            calls.append((name, n))
        return generate

    def fake_timed(fn) -> float:
        fn()
        name, n = calls[-1]
        return 0.5 + n * seconds_per_token[name]  # a fixed prompt cost cancels in the rate

    monkeypatch.setattr(db, "timed", fake_timed)
    rates = db.interleaved_rates({"a": generator("a"), "b": generator("b")}, batch=2, rounds=3)
    warm_up = [("a", db.N_LONG), ("b", db.N_LONG)]
    one_round = [("a", db.N_SHORT), ("a", db.N_LONG), ("b", db.N_SHORT), ("b", db.N_LONG)]
    assert calls == warm_up + 3 * one_round
    assert rates["a"] == pytest.approx([2 / 0.002] * 3) and rates["b"] == pytest.approx([2 / 0.001] * 3)


def test_the_table_shows_each_rate_with_its_range_and_paired_ratio() -> None:
    def rate(median: float, low: float, high: float) -> dict[str, float]:
        return {"median": median, "min": low, "max": high}

    rows = []
    for level, tok in ((1, 500.0), (8, 1100.0)):
        ratio = rate(tok / 500, tok / 520, tok / 480)
        rows.append({"batch": 1, "level": level, "graph_range": rate(tok, tok - 20, tok + 20),
                     "graph_vs_level1": ratio, "mamba_ssm_cg_range": rate(300, 290, 310),
                     "graph_vs_mamba_ssm": tok / 300, "of_floor": 0.2,
                     "graph_unfused_gemv_range": rate(tok - 50, tok - 60, tok - 40),
                     "graph_unfused_gemv_vs_level1": ratio})
    result = {"environment": {"device": "test", "torch": "t", "mamba_ssm": "m", "causal_conv1d": "absent"},
              "sizes": [{"d_model": 64, "n_layer": 2, "rows": rows, "prefill_shape": (1, 8),
                         "prefill_tokens_per_s": {1: 10.0}}]}
    lines = db.table(result).splitlines()
    level8 = next(line for line in lines if line.startswith("| d64 x 2 | 1 | 8 |"))
    cells = [c.strip() for c in level8.split("|")[1:-1]]
    assert cells[3:6] == ["1100 (1080-1120)", "2.20x (2.12-2.29)", "300 (290-310)"]
    assert cells[9:] == ["1050 (1040-1060), 2.20x (2.12-2.29)", "", ""]  # modes not measured stay empty
