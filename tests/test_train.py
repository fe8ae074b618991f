"""Training CLI: joint steps run, resume reproduces an uninterrupted run, baselines train one width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matmamba import MatMambaLM, MatMambaVision
from matmamba.data import has_full_fashion_mnist
from matmamba.train import main

needs_fmnist = pytest.mark.skipif(not has_full_fashion_mnist(), reason="needs Debian dataset-fashion-mnist")
TINY = ["--d-model", "32", "--headdim", "4", "--n-layer", "2", "--d-state", "8", "--eval-samples", "64",
        "--no-progress", "--warmup", "2"]


@needs_fmnist
def test_vision_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    common = ["vision", "--steps", "6", "--batch-size", "16", "--eval-every", "3", *TINY]
    main([*common, "--out", str(tmp_path / "straight")])
    main([*common, "--out", str(tmp_path / "resumed"), "--stop-at", "3"])
    assert (tmp_path / "resumed" / "train_state.pt").exists()
    main([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    a = MatMambaVision.from_pretrained(tmp_path / "straight")
    b = MatMambaVision.from_pretrained(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert set(metrics["final_eval"]) == {"w=32", "w=16", "w=8", "w=4"}
    assert not (tmp_path / "resumed" / "train_state.pt").exists()


@needs_fmnist
def test_baseline_trains_only_its_width(tmp_path: Path) -> None:
    main(["vision", "--levels", "1", "--width", "8", "--steps", "2", "--batch-size", "8",
          "--out", str(tmp_path), *TINY])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["final_eval"]) == ["w=8"]
    assert metrics["specs"] == {"w=8": [8, 8]}
    full = MatMambaVision.from_pretrained(tmp_path)
    assert metrics["params"]["w=8"] < sum(p.numel() for p in full.parameters())


def test_lm_trains_and_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    paragraphs = [f"Paragraph {i}: it is a truth universally acknowledged that a model needs data." for i in
                  range(400)]
    text = "\n\n".join(paragraphs)
    prose = tmp_path / "prose"
    prose.mkdir()
    (prose / "austen.txt").write_text(text)
    (prose / "austen.json").write_text(json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest()}))
    monkeypatch.setenv("MATMAMBA_PROSE_DIR", str(prose))
    out = tmp_path / "lm"
    main(["lm", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "300", "--out", str(out),
          *TINY])
    model = MatMambaLM.from_pretrained(out)
    ids = torch.tensor([model.tokenizer.encode("It is a truth")])
    text_out = model.tokenizer.decode(model.generate(ids, 5, temperature=0, mrl_level=8)[0].tolist())
    assert text_out.startswith("It is a truth")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_eval"]["w=32"]["val_bits_per_byte"] > 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["vision", "--out", "x", "--width", "8"])
    with pytest.raises(SystemExit):
        main(["vision", "--out", "x", "--level-weights", "1,2"])
