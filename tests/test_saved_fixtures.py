"""Adapters written by earlier peft-alps code load unchanged and give the same outputs (committed fixtures)."""

import json
from pathlib import Path

import torch
from peft import PeftModel

import peft_alps  # noqa: F401
from peft_alps import HeadScores, WarmupCheckpoint, localize_heads
from tests.support.tiny_models import batch, tiny_llama, tiny_qwen2

FIXTURES = Path(__file__).parent / "fixtures"


def test_bias_heads_adapter_loads_with_its_bias_deltas_and_same_logits():
    folder = FIXTURES / "bias_heads_adapter"
    model = PeftModel.from_pretrained(tiny_qwen2(), folder)
    biases = [n for n, _ in model.named_parameters() if ".alps_bias." in n]
    assert len(biases) == 2 * 3  # q, k, v of the two layers with heads (Qwen2: q/k/v have biases)
    with torch.no_grad():
        torch.testing.assert_close(model(batch()).logits, torch.load(folder / "expected_logits.pt"), rtol=0, atol=1e-6)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(batch()).logits, torch.load(folder / "expected_logits.pt"), rtol=1e-5,
                                   atol=1e-5)


def test_head_scores_file_written_by_earlier_code_loads_with_the_same_selection():
    folder = FIXTURES / "scores_and_warmup"
    expected = json.loads((folder / "expected.json").read_text())
    scores = HeadScores.load(folder / "head_scores.json")
    raw = json.loads((folder / "head_scores.json").read_text())
    assert scores.shape == (3, 8) and scores.metric == raw["metric"] and scores.variant == raw["variant"]
    assert scores.top_k(0.1) == {int(k): v for k, v in expected["top_10_percent"].items()}
    assert HeadScores.from_dict(scores.to_dict()).scores.tolist() == scores.scores.tolist()  # exact round trip


def test_warmup_checkpoint_written_by_earlier_code_loads_and_localizes_to_the_same_scores():
    folder = FIXTURES / "scores_and_warmup"
    expected = json.loads((folder / "expected.json").read_text())
    checkpoint = WarmupCheckpoint.load(folder / "warmup_checkpoint")
    assert checkpoint.metadata["format"] == "peft-alps-warmup" and len(checkpoint.tensors) == 3 * 4
    again = localize_heads(tiny_llama(), checkpoint)
    torch.testing.assert_close(torch.as_tensor(again.scores), torch.tensor(expected["scores_from_warmup_checkpoint"],
                                                                           dtype=torch.float64), rtol=1e-9, atol=0)
