"""The built-in synthetic skills: answers are right (checked by independent re-derivation), data is seeded."""

import math
from types import SimpleNamespace

import pytest
import torch

from peft_alps.demo import synthetic as syn


def _number(tokens):
    return int("".join(str(t - syn.DIGIT0) for t in tokens))


def test_answers_are_correct_for_every_skill():
    for ex in syn.make_examples("arithmetic", 200, seed=3):
        plus = ex.prompt.index(syn.PLUS)
        a, b = _number(ex.prompt[:plus]), _number(ex.prompt[plus + 1 :])
        assert _number(ex.answer[::-1]) == a + b
    for ex in syn.make_examples("copy", 50, seed=3):
        assert ex.answer == ex.prompt
    for ex in syn.make_examples("reverse", 50, seed=3):
        assert list(ex.answer) == list(reversed(ex.prompt))
    inverse = {v: k for k, v in syn.BRACKETS.items()}
    answers = []
    for ex in syn.make_examples("brackets", 300, seed=3):
        text = "".join(inverse[t] for t in ex.prompt)
        # independent check: repeatedly delete adjacent matched pairs
        while "()" in text or "[]" in text:
            text = text.replace("()", "").replace("[]", "")
        answers.append(ex.answer == (syn.YES,) if text == "" else ex.answer == (syn.NO,))
        assert answers[-1]
    yes = sum(ex.answer == (syn.YES,) for ex in syn.make_examples("brackets", 300, seed=3))
    assert 100 < yes < 220
    for ex in syn.make_examples("text", 50, seed=3):
        words = ex.prompt + ex.answer
        assert all(syn.WORD0 <= w < syn.VOCAB_SIZE for w in words)
        for prev, nxt in zip(words, words[1:]):
            assert nxt in syn._CHAIN[prev - syn.WORD0][0]


def test_seeded_and_in_vocab():
    assert syn.make_examples("copy", 20, seed=1) == syn.make_examples("copy", 20, seed=1)
    assert syn.make_examples("copy", 20, seed=1) != syn.make_examples("copy", 20, seed=2)
    mix = syn.corpus(400, seed=0)
    assert mix == syn.corpus(400, seed=0)
    assert {ex.skill for ex in mix} == set(syn.SKILLS)
    assert all(0 <= t < syn.VOCAB_SIZE for ex in mix for t in ex.tokens)


def test_collate_masks_prompt_and_padding():
    exs = [syn.Example("copy", (40, 41), (40, 41)), syn.Example("copy", (40,), (40,))]
    b = syn.collate(exs)
    assert b["input_ids"].tolist() == [
        [syn.BOS, syn.MARKERS["copy"], 40, 41, syn.SEP, 40, 41, syn.EOS],
        [syn.BOS, syn.MARKERS["copy"], 40, syn.SEP, 40, syn.EOS, syn.PAD, syn.PAD],
    ]
    assert b["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    I = syn.IGNORE_INDEX
    assert b["labels"].tolist() == [[I] * 5 + [40, 41, syn.EOS], [I] * 4 + [40, syn.EOS, I, I]]
    assert syn.collate(exs, loss_on="all")["labels"][1].tolist()[:6] == b["input_ids"][1].tolist()[:6]


class _Oracle(torch.nn.Module):
    """Predicts the next token of its own input (perfect) or nothing (uniform)."""

    def __init__(self, perfect):
        super().__init__()
        self.perfect = perfect
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, syn.VOCAB_SIZE)
        if self.perfect:
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 50.0)
        return SimpleNamespace(logits=logits)


def test_evaluate_against_perfect_and_uniform_predictors():
    exs = syn.make_examples("arithmetic", 10, seed=0)
    good = syn.evaluate(_Oracle(True), exs, batch_size=4)
    assert good["accuracy"] == 1.0 and good["token_accuracy"] == 1.0 and good["loss"] < 1e-6
    bad = syn.evaluate(_Oracle(False), exs, batch_size=4)
    assert bad["accuracy"] == 0.0 and bad["token_accuracy"] == 0.0 and bad["loss"] == pytest.approx(math.log(syn.VOCAB_SIZE))


def test_unknown_skill_is_named():
    with pytest.raises(ValueError, match="'sorting'.*arithmetic"):
        syn.make_examples("sorting", 3)
