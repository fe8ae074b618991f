"""bench/spec_levels.py end to end on the CPU: the shipped LM, a synthetic corpus, a short plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.spec_levels as sl

from .conftest import use_prose

REPO_ROOT = Path(__file__).resolve().parents[1]
LM = REPO_ROOT / "checkpoints" / "matmamba-lm-austen"


@pytest.fixture
def synthetic_prose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Enough paragraphs that the test split holds a few 256-token windows."""
    words = ["morning", "letter", "sister", "ball", "carriage", "estate", "cousin", "walk", "garden", "visit"]
    use_prose(tmp_path / "prose", [f"On the {words[i % 10]} of the {words[(i * 7) % 10]}, she wrote to her "
                                   f"{words[(i * 3) % 10]}." for i in range(4000)], monkeypatch)


@pytest.mark.usefixtures("synthetic_prose")
def test_levels_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "levels.json"
    assert sl.main(["--checkpoints", str(LM), "--levels", "1", "4", "--windows", "2", "--prompts", "2",
                    "--tokens", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["level"]: r for r in result["checkpoints"][0]["levels"]}
    assert set(rows) == {1, 4}
    assert all(r["identical"] for r in rows.values())  # greedy speculative = cloud-only, token for token
    assert all(r["tokens"] == 2 * 12 for r in rows.values())
    assert rows[1]["agreement"] == 1.0 and rows[1]["drafts_accepted"] == 1.0  # the full width drafts for itself
    assert 0.0 <= rows[4]["agreement"] <= 1.0 and rows[4]["loss"] > rows[1]["loss"]
    assert rows[1]["passes_per_token"] < rows[4]["passes_per_token"] <= 1.0
    assert rows[1]["passes_per_token"] == pytest.approx(rows[1]["rounds"] / rows[1]["tokens"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| matmamba-lm-austen | 4 |" in capsys.readouterr().out


def test_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        sl.main(["--checkpoints", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json")])
