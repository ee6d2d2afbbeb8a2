"""Built-in synthetic tasks and corpus: offline data for the demo, the benchmarks and the warm-up.

Tokenizer-free: every token is a small integer of one fixed vocabulary (:data:`VOCAB_SIZE` = 128), so any
transformers config with ``vocab_size >= VOCAB_SIZE`` can be trained on it. Each example is a *skill*:

``arithmetic``  ``a + b`` with ``digits``-digit operands; the answer is the sum, least significant digit
                first (the order a small model can learn with carries).
``copy``        a random symbol string; the answer repeats it.
``reverse``     a random symbol string; the answer is the string reversed.
``brackets``    a string of ``( ) [ ]``; the answer is ``YES`` if it is balanced and properly nested, else ``NO``
                (half of the examples are balanced).
``text``        "sentences" of a fixed random Markov language over :data:`NUM_WORDS` word tokens; the answer
                is the continuation of a prefix. It plays the role of general text in the pretraining corpus.

A full sequence is ``[BOS, <skill marker>, *prompt, SEP, *answer, EOS]``. ``collate`` pads on the right and
masks the labels either to the answer (``loss_on="answer"``: task fine-tuning and evaluation) or to every real
token after BOS (``loss_on="all"``: pretraining on :func:`corpus`). ``evaluate`` reports the answer loss and
the exact-match accuracy (greedy, computed in one teacher-forced pass: all answer tokens and EOS argmax-correct).

Everything is a pure function of its ``seed``: the same call gives the same examples on every machine.

Example::

    from peft_alps.demo import synthetic
    train = synthetic.make_examples("arithmetic", 2000, seed=0)
    batch = synthetic.collate(train[:32])              # input_ids / attention_mask / labels tensors
    synthetic.evaluate(model, synthetic.make_examples("arithmetic", 200, seed=1))  # {"loss": .., "accuracy": ..}
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

# ----------------------------------------------------------------------------------------------- vocabulary

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4  # digits 0..9 are tokens 4..13
PLUS, YES, NO = 14, 15, 16
BRACKETS = {"(": 17, ")": 18, "[": 19, "]": 20}
MARKERS = {"arithmetic": 21, "copy": 22, "reverse": 23, "brackets": 24, "text": 25}
SYMBOL0, NUM_SYMBOLS = 32, 32  # copy / reverse alphabet: tokens 32..63
WORD0, NUM_WORDS = 64, 64  # text-like words: tokens 64..127
VOCAB_SIZE = 128

SKILLS: tuple[str, ...] = ("arithmetic", "copy", "reverse", "brackets", "text")
IGNORE_INDEX = -100

_NAMES = {PAD: "<pad>", BOS: "<s>", SEP: "|", EOS: "</s>", PLUS: "+", YES: "YES", NO: "NO"}
_NAMES.update({DIGIT0 + i: str(i) for i in range(10)})
_NAMES.update({tok: ch for ch, tok in BRACKETS.items()})
_NAMES.update({tok: f"<{name}>" for name, tok in MARKERS.items()})
_NAMES.update({SYMBOL0 + i: chr(ord("a") + i) if i < 26 else f"s{i}" for i in range(NUM_SYMBOLS)})
_NAMES.update({WORD0 + i: f"w{i}" for i in range(NUM_WORDS)})


def decode(tokens: Sequence[int]) -> str:
    """Human-readable rendering of a token list, e.g. ``<s> <arithmetic> 1 2 + 3 4 | 6 4 </s>``."""
    return " ".join(_NAMES.get(int(t), f"?{int(t)}") for t in tokens)


# ----------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One synthetic example: ``prompt`` and ``answer`` token lists (without BOS/marker/SEP/EOS)."""

    skill: str
    prompt: tuple[int, ...]
    answer: tuple[int, ...]

    @property
    def prompt_tokens(self) -> list[int]:
        """What the model sees before it must answer: ``[BOS, marker, *prompt, SEP]``."""
        return [BOS, MARKERS[self.skill], *self.prompt, SEP]

    @property
    def tokens(self) -> list[int]:
        """The full training sequence ``[BOS, marker, *prompt, SEP, *answer, EOS]``."""
        return [*self.prompt_tokens, *self.answer, EOS]

    def __str__(self) -> str:
        return decode(self.tokens)


def _digits(value: int, width: int) -> list[int]:
    return [DIGIT0 + int(c) for c in str(value).zfill(width)]


def _arithmetic(rng: random.Random, digits: int = 2) -> tuple[list[int], list[int]]:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    answer = [DIGIT0 + int(c) for c in reversed(str(a + b).zfill(digits + 1))]
    return [*_digits(a, digits), PLUS, *_digits(b, digits)], answer


def _symbols(rng: random.Random, min_len: int, max_len: int) -> list[int]:
    return [SYMBOL0 + rng.randrange(NUM_SYMBOLS) for _ in range(rng.randint(min_len, max_len))]


def _copy(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[list[int], list[int]]:
    s = _symbols(rng, min_len, max_len)
    return s, list(s)


def _reverse(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[list[int], list[int]]:
    s = _symbols(rng, min_len, max_len)
    return s, s[::-1]


def _balanced(rng: random.Random, pairs: int) -> list[str]:
    out, stack = [], []
    opened = 0
    while opened < pairs or stack:
        if opened < pairs and (not stack or rng.random() < 0.5):
            ch = rng.choice("([")
            out.append(ch)
            stack.append(ch)
            opened += 1
        else:
            out.append(")" if stack.pop() == "(" else "]")
    return out


def is_balanced(chars: Sequence[str]) -> bool:
    """True if a string of ``( ) [ ]`` is balanced and properly nested."""
    stack = []
    for ch in chars:
        if ch in "([":
            stack.append(ch)
        elif not stack or stack.pop() != {")": "(", "]": "["}[ch]:
            return False
    return not stack


def _brackets(rng: random.Random, max_pairs: int = 4) -> tuple[list[int], list[int]]:
    chars = _balanced(rng, rng.randint(1, max_pairs))
    if rng.random() < 0.5:  # corrupt: swap a bracket for another one (may, rarely, stay balanced)
        i = rng.randrange(len(chars))
        chars[i] = rng.choice([c for c in "()[]" if c != chars[i]])
    return [BRACKETS[c] for c in chars], [YES if is_balanced(chars) else NO]


_LANGUAGE_SEED = 20250524  # fixes the text-like "language" (not the samples) once for everyone


def _language() -> list[tuple[list[int], list[float]]]:
    """Sparse Markov chain over words: each word has 4 likely successors with Zipf-like weights."""
    rng = random.Random(_LANGUAGE_SEED)
    table = []
    for _ in range(NUM_WORDS):
        successors = rng.sample(range(NUM_WORDS), 4)
        table.append(([WORD0 + s for s in successors], [8.0, 4.0, 2.0, 1.0]))
    return table


_CHAIN = _language()


def _text(rng: random.Random, prefix: int = 4, length: int = 8) -> tuple[list[int], list[int]]:
    word = WORD0 + rng.randrange(NUM_WORDS)
    words = [word]
    for _ in range(prefix + length - 1):
        successors, weights = _CHAIN[words[-1] - WORD0]
        words.append(rng.choices(successors, weights)[0])
    return words[:prefix], words[prefix:]


_GENERATORS = {
    "arithmetic": _arithmetic,
    "copy": _copy,
    "reverse": _reverse,
    "brackets": _brackets,
    "text": _text,
}


def _check_skill(skill: str) -> None:
    if skill not in _GENERATORS:
        raise ValueError(f"unknown synthetic skill {skill!r}; choose one of {', '.join(SKILLS)}")


def sample(skill: str, rng: random.Random, **options) -> Example:
    """One example of ``skill`` drawn from ``rng``. ``options`` go to the generator (e.g. ``digits=3``)."""
    _check_skill(skill)
    prompt, answer = _GENERATORS[skill](rng, **options)
    return Example(skill, tuple(prompt), tuple(answer))


def make_examples(skill: str, n: int, seed: int = 0, **options) -> list[Example]:
    """``n`` examples of one skill; a pure function of ``(skill, n, seed, options)``."""
    _check_skill(skill)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{skill}:{seed}")
    return [sample(skill, rng, **options) for _ in range(n)]


def corpus(n: int, seed: int = 0, skills: Sequence[str] = SKILLS, weights: Sequence[float] | None = None) -> list[Example]:
    """A mixed pretraining corpus: ``n`` examples whose skills are drawn with ``weights`` (default: text 40%,
    the other skills sharing the rest equally). Train on it with ``collate(..., loss_on="all")``."""
    skills = list(skills)
    for skill in skills:
        _check_skill(skill)
    if weights is None:
        others = [s for s in skills if s != "text"]
        weights = [0.4 if s == "text" else (0.6 / len(others) if others else 1.0) for s in skills]
        if "text" not in skills:
            weights = [1.0] * len(skills)
    if len(weights) != len(skills):
        raise ValueError(f"weights has {len(weights)} entries for {len(skills)} skills")
    rng = random.Random(f"corpus:{seed}")
    return [sample(rng.choices(skills, weights)[0], rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- batching


def collate(examples: Sequence[Example], loss_on: Literal["answer", "all"] = "answer") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (``IGNORE_INDEX`` where no loss is taken).

    ``loss_on="answer"`` keeps labels on the answer and EOS only; ``"all"`` on every real token (the model
    shifts labels itself, so the BOS position never counts as a target).
    """
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    seqs = [ex.tokens for ex in examples]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ex, seq) in enumerate(zip(examples, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        start = len(ex.prompt_tokens) if loss_on == "answer" else 0
        labels[i, start : len(seq)] = input_ids[i, start : len(seq)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    examples: Sequence[Example], batch_size: int, seed: int = 0, loss_on: Literal["answer", "all"] = "answer"
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (reshuffled each epoch, deterministic in ``seed``)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size) or [0]:
            yield collate([examples[i] for i in order[start : start + batch_size]], loss_on)


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Sequence[Example], batch_size: int = 64) -> dict[str, float]:
    """``{"loss": mean answer-token NLL, "accuracy": exact-match rate, "token_accuracy": share of answer tokens
    (and EOS) predicted right}`` of a causal LM on ``examples``."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens, correct, right_tokens = 0.0, 0, 0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits, targets = logits[:, :-1], batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.clamp_min(0).reshape(-1), reduction="none"
        ).view_as(targets)
        total_nll += float((nll * mask).sum())
        total_tokens += int(mask.sum())
        hits = (logits.argmax(-1) == targets) | ~mask
        correct += int(hits.all(dim=1).sum())
        right_tokens += int((hits & mask).sum())
    model.train(was_training)
    n = max(len(examples), 1)
    return {"loss": total_nll / max(total_tokens, 1), "accuracy": correct / n,
            "token_accuracy": right_tokens / max(total_tokens, 1)}
