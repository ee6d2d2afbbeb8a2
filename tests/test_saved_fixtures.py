"""Adapters written by earlier peft-alps code load unchanged and give the same outputs (committed fixtures)."""

from pathlib import Path

import torch
from peft import PeftModel

import peft_alps  # noqa: F401
from tests.tiny_models import batch, tiny_qwen2

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
