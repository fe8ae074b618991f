"""Training CLI: joint steps run, resume reproduces an uninterrupted run, baselines train one width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matmamba import MatMambaLM, MatMambaVision
from matmamba.data import has_full_fashion_mnist
from matmamba.train import main

from .conftest import use_prose

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


@pytest.fixture
def tiny_prose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small synthetic corpus in place of the Austen novels."""
    use_prose(tmp_path / "prose", [f"Paragraph {i}: it is a truth universally acknowledged that a model needs data."
                                   for i in range(400)], monkeypatch)


@pytest.mark.usefixtures("tiny_prose")
def test_lm_trains_and_generates(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    main(["lm", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "300", "--out", str(out),
          *TINY])
    model = MatMambaLM.from_pretrained(out)
    ids = torch.tensor([model.tokenizer.encode("It is a truth")])
    text_out = model.tokenizer.decode(model.generate(ids, 5, temperature=0, mrl_level=8)[0].tolist())
    assert text_out.startswith("It is a truth")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_eval"]["w=32"]["val_bits_per_byte"] > 0
    assert "val_top1_agreement" not in metrics["final_eval"]["w=32"]
    assert 0 <= metrics["final_eval"]["w=8"]["val_top1_agreement"] <= 1
    assert metrics["init"] is None


def test_distilled_loss() -> None:
    from matmamba.tasks import distilled_loss

    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    ce = torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten())
    assert torch.equal(distilled_loss(student, labels, teacher, 0.0), ce)
    assert torch.equal(distilled_loss(student, labels, None, 0.7), ce)
    assert distilled_loss(teacher, labels, teacher, 1.0).abs().item() < 1e-6  # no KL from itself
    t = 2.0
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1).flatten(0, 1),
                                    torch.softmax(teacher / t, -1).flatten(0, 1), reduction="batchmean")
    mixed = distilled_loss(student, labels, teacher, 0.25, temperature=t)
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * t * t * kl)
    mixed.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


@pytest.mark.usefixtures("tiny_prose")
def test_distilling_a_checkpoint_raises_the_nested_widths_agreement(tmp_path: Path) -> None:
    from matmamba import tasks

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    main(["lm", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "300", "--out", str(base),
          *TINY])
    main(["lm", "--init", str(base), "--distill", "1.0", "--steps", "12", "--batch-size", "4", "--seq-len", "32",
          "--lr", "1e-2", "--out", str(tuned), *TINY])
    metrics = json.loads((tuned / "metrics.json").read_text())
    before = MatMambaLM.from_pretrained(base)
    assert metrics["init"] == {"checkpoint": str(base), "fingerprint": before.fingerprint}
    after = MatMambaLM.from_pretrained(tuned)
    assert after.tokenizer.encode("a model needs data") == before.tokenizer.encode("a model needs data")
    val = tasks.prose_streams(before.tokenizer, ("val",))["val"]
    narrow = {"w=4": (4, 4)}
    share = [tasks.lm_agreement(m, val, narrow, (32, 32), torch.device("cpu"), 32, max_windows=64)["w=4"]
             for m in (before, after)]
    assert share[1] == pytest.approx(metrics["final_eval"]["w=4"]["val_top1_agreement"])
    assert share[1] > share[0]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["vision", "--out", "x", "--width", "8"])
    with pytest.raises(SystemExit):
        main(["vision", "--out", "x", "--level-weights", "1,2"])
    for bad in (["--distill", "1.5"], ["--distill", "0.5", "--levels", "2,4"],
                ["--distill", "0.5", "--levels", "1", "--width", "8"], ["--distill-temperature", "0"],
                ["--init", "no/such/checkpoint"]):
        with pytest.raises(SystemExit):
            main(["lm", "--out", "x", *bad])


@needs_fmnist
def test_init_refuses_a_checkpoint_of_the_other_task(tmp_path: Path) -> None:
    main(["vision", "--levels", "1", "--width", "8", "--steps", "1", "--batch-size", "8",
          "--out", str(tmp_path / "vision"), *TINY])
    with pytest.raises(SystemExit, match="not matmamba-lm"):
        main(["lm", "--init", str(tmp_path / "vision"), "--steps", "1", "--out", str(tmp_path / "lm"), *TINY])
