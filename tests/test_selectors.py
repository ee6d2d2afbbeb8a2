"""The warm-up-only head selectors (peft_alps.localization.scorers) against a plain per-head oracle."""

import copy

import numpy as np
import pytest
import torch

from peft_alps.localization.scorers import gradient_scores, weight_change_scores
from tests.support.tiny_models import batch, tiny_llama, train_steps


def _oracle(model_a, model_b_or_grads, num_heads=8, num_kv=2, head_dim=8):
    """||theta_h||_F per head by explicit slicing: q rows of head h, k/v rows of group h // (n/g)."""
    group = num_heads // num_kv
    out = np.zeros((len(model_a.model.layers), num_heads))
    for layer, block in enumerate(model_a.model.layers):
        for h in range(num_heads):
            g = h // group
            total = 0.0
            for proj, idx in (("q_proj", h), ("k_proj", g), ("v_proj", g)):
                rows = slice(idx * head_dim, (idx + 1) * head_dim)
                value = model_b_or_grads(layer, proj)[rows]
                total += float(value.double().square().sum())
            out[layer, h] = total ** 0.5
    return out


def test_weight_change_matches_oracle_and_ranks_the_moved_head_first(tmp_path):
    base = tiny_llama()
    task = copy.deepcopy(base)
    with torch.no_grad():
        task.model.layers[1].self_attn.q_proj.weight[5 * 8:6 * 8] += 0.5  # head 5 of layer 1 moves most
        task.model.layers[2].self_attn.k_proj.weight += 0.01 * torch.randn_like(task.model.layers[2].self_attn.k_proj.weight)
    scores = weight_change_scores(base, task)
    expected = _oracle(base, lambda l, p: getattr(task.model.layers[l].self_attn, p).weight
                       - getattr(base.model.layers[l].self_attn, p).weight)
    np.testing.assert_allclose(scores.scores, expected, rtol=1e-6, atol=1e-9)
    assert scores.ranking()[0] == (1, 5)
    assert scores.scores[0].max() == 0.0  # layer 0 unchanged
    # the same from checkpoint folders
    base.save_pretrained(tmp_path / "base")
    task.save_pretrained(tmp_path / "task")
    from_disk = weight_change_scores(tmp_path / "base", tmp_path / "task")
    np.testing.assert_allclose(from_disk.scores, expected, rtol=1e-6, atol=1e-9)


def test_gradient_scores_match_autograd_oracle_and_leave_model_untouched():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # an arbitrary flag pattern that must survive
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [{"input_ids": batch(seed=s), "labels": batch(seed=s)} for s in (1, 2, 3)]
    scores = gradient_scores(model, inputs, num_batches=2)

    oracle_model = copy.deepcopy(model).eval()
    oracle_model.requires_grad_(True)
    for b in inputs[:2]:
        oracle_model(**b).loss.backward()
    expected = _oracle(oracle_model, lambda l, p: getattr(oracle_model.model.layers[l].self_attn, p).weight.grad)
    np.testing.assert_allclose(scores.scores, expected, rtol=1e-5)
    assert scores.metric == "gradient_norm" and scores.shape == (3, 8)
    assert model.training and model.lm_head.weight.requires_grad
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_gradient_scores_failure_paths():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no batches"):
        gradient_scores(model, [])
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        gradient_scores(model, [{"input_ids": batch(), "labels": batch()}], num_batches=0)


def test_weight_change_rejects_other_geometry():
    with pytest.raises(ValueError):
        weight_change_scores(tiny_llama(), tiny_llama(num_heads=4, num_kv_heads=2, head_dim=16))


def test_selector_scores_drive_an_adapter():
    from peft import get_peft_model

    from peft_alps import AlpsConfig

    base = tiny_llama()
    task = train_steps(copy.deepcopy(base).requires_grad_(True), steps=2)
    scores = weight_change_scores(base, task)
    model = get_peft_model(copy.deepcopy(base), AlpsConfig(head_scores=scores, ratio=0.25))
    assert model.peft_config["default"].target_heads == {int(l): h for l, h in scores.top_k(0.25).items()}
