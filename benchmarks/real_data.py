"""Tokenized chat examples, batches, and the cheap exact-match evaluation used by ``reproduce_real``.

Prompts are left-padded, so every example's answer (plus ``<|im_end|>``) sits at the end of its row. Training and
evaluation then need the LM head only on the last few positions (``logits_to_keep``), which on a 135M model with a
49k vocabulary saves a fifth of the forward pass.

Exact match is read off one teacher-forced forward pass: greedy decoding reproduces the answer and then stops
exactly when the argmax at every answer position (and at ``<|im_end|>``) is the reference token, so "all answer
tokens are argmax-correct" is the same test as "the greedy generation equals the answer".
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch
import torch.nn.functional as F

END = "<|im_end|>"


def encode(tokenizer, examples: list[dict[str, str]], system: str) -> list[dict[str, list[int]]]:
    """Chat-template the prompts (with the system line) and append the answer and the end-of-turn token."""
    out = []
    for ex in examples:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": ex["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        answer = tokenizer(ex["answer"] + END, add_special_tokens=False)["input_ids"]
        out.append({"prompt": list(prompt), "answer": list(answer)})
    return out


def encode_text(tokenizer, texts: list[str], max_tokens: int) -> list[dict[str, list[int]]]:
    """Plain text scored on every token after the first (the general-text forgetting probe)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        out.append({"prompt": ids[:1], "answer": ids[1:]})
    return out


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    rows = [it["prompt"] + it["answer"] for it in items]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    keep = max(len(it["answer"]) for it in items) + 1
    labels = torch.full((len(rows), keep - 1), -100, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["answer"])
        labels[i, keep - 1 - n:] = torch.tensor(it["answer"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels, "keep": keep}


def answer_logits(model, batch: dict[str, Any]) -> torch.Tensor:
    """Logits predicting the last ``keep - 1`` tokens of every row (float32, ``[batch, keep - 1, vocab]``), on the
    model's device."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), logits_to_keep=batch["keep"], use_cache=False)
    return out.logits[:, :-1].float()


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def batches(items: list[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches (a new permutation every epoch), reproducible from ``seed``."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([items[j] for j in order[i:i + batch_size]], pad_id)


@torch.no_grad()
def evaluate_examples(model, items: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16) -> dict[str, list]:
    """Per example: the summed answer-token loss, the number of answer tokens, and exact match (0/1)."""
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"loss_sum": [], "tokens": [], "hit": []}
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size], pad_id)
        logits = answer_logits(model, batch)
        labels = batch["labels"].to(logits.device)
        valid = labels != -100
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        out["loss_sum"] += (nll * valid).sum(-1).tolist()
        out["tokens"] += valid.sum(-1).tolist()
        out["hit"] += ((logits.argmax(-1) == labels) | ~valid).all(-1).int().tolist()
    model.train(was_training)
    return out


def evaluate(model, items: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Mean answer-token loss and exact match (every answer token argmax-correct) over ``items``."""
    ex = evaluate_examples(model, items, pad_id, batch_size)
    return {"loss": sum(ex["loss_sum"]) / max(1.0, float(sum(ex["tokens"]))),
            "accuracy": sum(ex["hit"]) / max(1, len(items))}
