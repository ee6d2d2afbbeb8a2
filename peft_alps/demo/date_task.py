"""The real-model demo's skill: find the date in an English sentence and write it as ISO ``YYYY-MM-DD``.

Examples are generated (seeded) from everyday sentences with a date written one of several ways ("March 5,
2021", "5 March 2021", "the 5th of March, 2021", "Mar. 5, 2021"). They are chat-formatted with the model's own
template; the loss and the score cover the answer and the end-of-turn token only.

Exact match is scored with teacher forcing: an example counts when the model's argmax is the right token at
every answer position (and at the end-of-turn token). That is exactly when greedy decoding would write the
answer and stop, at the cost of one forward pass instead of a generation loop.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peft_alps.warmup.data import IGNORE_INDEX, collate

INSTRUCTION = "Write the date in this sentence as YYYY-MM-DD."
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SENTENCES = (
    "The meeting was moved to {date}.", "Her flight to Lisbon leaves on {date}.", "The invoice is due {date}.",
    "We signed the lease on {date}.", "The museum reopens on {date}.", "His contract ends on {date}.",
    "The package was delivered on {date}.", "The concert took place on {date}.",
    "The bakery opened its doors on {date}.", "The report must be filed by {date}.",
    "They got married on {date}.", "On {date}, the bridge was closed for repairs.",
    "The library card expires on {date}.", "Registration closes on {date}, at noon.",
    "My grandmother was born on {date}.", "The first snow fell on {date}.",
)


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


DATE_FORMS = (
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]}. {d.day}, {d.year}",
)


@dataclass(frozen=True)
class DateExample:
    question: str  # the user's message: instruction + sentence
    answer: str  # the ISO date


def make_examples(n: int, seed: int = 0, exclude: Sequence[DateExample] = ()) -> list[DateExample]:
    """``n`` distinct examples, deterministic in ``seed``; none of them equal to one in ``exclude``."""
    rng = random.Random(f"dates:{seed}")
    seen = {ex.question for ex in exclude}
    out = []
    while len(out) < n:
        date = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(90 * 365))
        sentence = rng.choice(SENTENCES).format(date=rng.choice(DATE_FORMS)(date))
        question = f"{INSTRUCTION}\n{sentence[0].upper()}{sentence[1:]}"
        if question not in seen:
            seen.add(question)
            out.append(DateExample(question, date.isoformat()))
    return out


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """The chat-formatted prompt, up to and including the assistant's turn header."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids)


def encode(tokenizer: Any, examples: Sequence[DateExample]) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` per example: prompt + answer + end-of-turn, labels on the last two only."""
    end = tokenizer.eos_token  # <|im_end|> for chat models: what ends the assistant's turn
    out = []
    for ex in examples:
        prompt = prompt_ids(tokenizer, ex.question)
        answer = tokenizer(ex.answer + end, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return out


def batches(examples: Sequence[dict], batch_size: int, pad_id: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, reshuffled every epoch, deterministic in ``seed``."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, max(len(order) - batch_size + 1, 1), batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Sequence[dict], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """``{"exact_match", "loss"}``: greedy-equivalent exact match (see the module docstring) and mean answer NLL."""
    was_training = model.training
    model.eval()
    correct, nll_sum, tokens = 0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
        nll_sum += float((nll * mask).sum())
        tokens += int(mask.sum())
        correct += int(((logits.argmax(-1) == targets) | ~mask).all(dim=1).sum())
    model.train(was_training)
    return {"exact_match": correct / max(len(examples), 1), "loss": nll_sum / max(tokens, 1)}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy reply to ``question``."""
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
