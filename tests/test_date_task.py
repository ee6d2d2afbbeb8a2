"""peft_alps.demo.date_task (the real demo's skill) and the demo's option checks; fast, no real model."""

import datetime
import re

import pytest
import torch

from peft_alps.demo import date_task
from peft_alps.cli import main
from peft_alps.demo.real import lora_rank_matching
from tests.support.tiny_models import tiny_llama


def parse_date(sentence):
    """Independent oracle: the date in one of the four written forms, with datetime.strptime."""
    text = re.sub(r"(\d+)(st|nd|rd|th) of (\w+),", r"\1 \3", sentence)  # "the 5th of March, 2021" -> "5 March 2021"
    for pattern, fmt in ((r"[A-Z][a-z]+ \d{1,2}, \d{4}", "%B %d, %Y"), (r"\d{1,2} [A-Z][a-z]+ \d{4}", "%d %B %Y"),
                         (r"[A-Z][a-z]{2}\. \d{1,2}, \d{4}", "%b. %d, %Y")):
        for match in re.findall(pattern, text):
            try:
                return datetime.datetime.strptime(match, fmt).date()
            except ValueError:
                continue
    raise AssertionError(f"no date in {sentence!r}")


def test_examples_are_deterministic_distinct_and_right():
    train = date_task.make_examples(300, seed=0)
    assert train == date_task.make_examples(300, seed=0) and train != date_task.make_examples(300, seed=1)
    assert len({ex.question for ex in train}) == 300
    held_out = date_task.make_examples(200, seed=1, exclude=train)
    assert not {ex.question for ex in train} & {ex.question for ex in held_out}
    forms = set()
    for ex in train + held_out:
        instruction, sentence = ex.question.split("\n")
        assert instruction == date_task.INSTRUCTION
        assert parse_date(sentence).isoformat() == ex.answer
        forms.add("of" if " of " in sentence else "abbr" if "." in sentence.split(",")[0][-8:] else "plain")
    assert len(forms) == 3


class Oracle(torch.nn.Module):
    """Predicts the true next token everywhere, except at the last answer position of rows starting with a token in
    ``wrong``."""

    def __init__(self, wrong):
        super().__init__()
        self.wrong = wrong
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 50)
        logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 1.0)
        for row in range(len(input_ids)):
            if int(input_ids[row, 0]) not in self.wrong:
                continue
            last = int(attention_mask[row].sum()) - 2  # predicts the final (end-of-turn) token
            logits[row, last] = 0
            logits[row, last, (input_ids[row, last + 1] + 1) % 50] = 1.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_is_all_answer_tokens_right():
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
                {"input_ids": [4, 6, 8, 9], "labels": [-100, -100, 8, 9]},
                {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, -100, 5, 6]}]
    assert date_task.evaluate(Oracle(wrong=[]), examples, pad_id=0)["exact_match"] == 1.0
    assert date_task.evaluate(Oracle(wrong={4}), examples, pad_id=0, batch_size=2)["exact_match"] == pytest.approx(2 / 3)


def test_lora_rank_matching_counts_every_target_module():
    model = tiny_llama()  # hidden 64, 8 heads of 8, 4 KV heads: q/o 64x64, k/v 64->32, 3 layers
    per_rank = 3 * ((64 + 64) * 2 + (64 + 32) * 2)
    assert lora_rank_matching(model, 5 * per_rank) == 5
    assert lora_rank_matching(model, 1) == 1
    with pytest.raises(ValueError, match="no Linear modules"):
        lora_rank_matching(model, 100, targets=("c_attn",))


@pytest.mark.parametrize("argv, message", [
    (["demo", "--layers", "3"], "--layers applies only to --model toy"),
    (["demo", "--model", "toy", "--warmup-steps", "3"], "--warmup-steps applies only to a real model"),
])
def test_demo_options_are_checked_before_any_work(argv, message, capsys, tmp_path):
    assert main(argv + ["--output", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["demo", "--ratio", "1.5"], ["demo", "--ratio", "0"], ["demo", "--model", "gpt"],
                                  ["demo", "--adapter-steps", "0"]])
def test_demo_parse_errors(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "error: argument" in capsys.readouterr().err
