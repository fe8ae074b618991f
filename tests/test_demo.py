"""`make demo`'s program runs end to end on the shipped checkpoints (small settings)."""

from __future__ import annotations

import pytest

from matmamba.demo import main


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--images", "40", "--tokens", "5"])
    out = capsys.readouterr().out
    assert "MatMamba-Vision on 40 held-out" in out
    assert out.count("It is a truth universally acknowledged") == 2
