"""The README's main job, ``peft-alps demo``, end to end in reduced size."""

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_alps import HeadScores
from peft_alps.cli import main


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "toy", "--quick", "--output", str(out), "--no-progress", "--task", "copy"]) == 0
    printed = capsys.readouterr().out
    for row in ("base (before)", "task model (full FT)", "ALPS (top heads)", "random heads (as many)"):
        assert row in printed
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["task"] == "copy" and summary["settings"]["layers"] == 2
    assert [r["model"] for r in summary["results"]][2:] == ["ALPS (top heads)", "random heads (as many)"]
    scores = HeadScores.load(out / "heads.json")
    assert scores.shape == (2, 4)
    assert (out / "heads.png").read_bytes()[:4] == b"\x89PNG"
    selected = {int(k): v for k, v in summary["selected_heads"].items()}
    assert selected == scores.top_k(0.25) and sum(map(len, selected.values())) == 2
    # the no-task-model path: a warm-up checkpoint with attention tensors only, its heads compared
    warm = summary["warmup"]
    assert warm["k"] == 2 and 0 <= warm["shared"] <= 2 and warm["jaccard"] == warm["shared"] / (4 - warm["shared"])
    assert "shared with the full task model's" in printed
    assert sorted(p.name for p in (out / "task-attn").iterdir()) == ["config.json", "model.safetensors", "warmup.json"]

    # the saved adapter reloads onto the saved base without the scores file and changes its outputs
    (out / "heads.json").unlink()
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out / "alps-adapter")
    assert model.peft_config["default"].target_heads == selected
    x = torch.tensor([[1, 22, 40, 41, 2]])
    with torch.no_grad():
        adapted = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    assert not torch.equal(adapted, plain)
