"""Supervised fine-tuning data from JSONL files: plain text or Alpaca-style instruction records.

Each line of the file is one JSON object in one of three forms:

``{"text": "..."}``
    Plain text; the loss covers every token.
``{"instruction": "...", "input": "...", "output": "..."}``
    An instruction record, formatted with the Alpaca prompt template (``input`` may be empty or absent);
    the loss covers only the response tokens.
``{"input_ids": [...], "labels": [...]}``
    Already tokenized (``labels`` optional, ``-100`` marks ignored positions). Needs no tokenizer: this is
    how integer-vocabulary synthetic tasks are fed in.

Every problem is reported as a :class:`DataError` that names the file, the 1-based line number and the
fields that were expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

EXPECTED_FIELDS = (
    '{"text": ...} or {"instruction": ..., "input": ..., "output": ...} ("input" may be empty) '
    'or {"input_ids": [...], "labels": [...]} ("labels" optional)'
)


class DataError(ValueError):
    """A training-data file that cannot be used as it is; the message names the line and the fix."""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (everything before the response) for one instruction record."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line; invalid JSON or a non-object is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data file {str(path)!r} does not exist (expected a JSONL file, one record a line)")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON "
                    f"object: {EXPECTED_FIELDS}"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}; each line must be "
                    f"{EXPECTED_FIELDS}"
                )
            yield number, record


def _string_field(record: dict, name: str, where: str, required: bool = True) -> str:
    if name not in record:
        if required:
            raise DataError(f"{where}: missing field {name!r}; expected {EXPECTED_FIELDS}; got fields {sorted(record)}")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _int_list(record: dict, name: str, where: str) -> list[int]:
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: field {name!r} must be a list of integers")
    return value


def encode_record(record: dict, tokenizer: Any, where: str) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one record (see the module docstring for the accepted forms)."""
    if "input_ids" in record:
        ids = _int_list(record, "input_ids", where)
        labels = _int_list(record, "labels", where) if "labels" in record else list(ids)
        if len(labels) != len(ids):
            raise DataError(f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
        if not ids:
            raise DataError(f"{where}: 'input_ids' is empty")
        return {"input_ids": ids, "labels": labels}
    if "text" in record:
        text = _string_field(record, "text", where)
        prompt_ids, answer = [], text
    elif "instruction" in record or "output" in record:
        instruction = _string_field(record, "instruction", where)
        output = _string_field(record, "output", where)
        prompt = alpaca_prompt(instruction, _string_field(record, "input", where, required=False))
        prompt_ids = _tokenize(tokenizer, prompt, where, special=True)
        answer = output
    else:
        raise DataError(f"{where}: no usable field; expected {EXPECTED_FIELDS}; got fields {sorted(record)}")
    answer_ids = _tokenize(tokenizer, answer, where, special=not prompt_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        answer_ids = answer_ids + [eos]
    ids = prompt_ids + answer_ids
    if not ids:
        raise DataError(f"{where}: the record tokenizes to no tokens (empty text?)")
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def _tokenize(tokenizer: Any, text: str, where: str, special: bool) -> list[int]:
    if tokenizer is None:
        raise DataError(
            f"{where}: this record holds text, but no tokenizer is available. Save the base model's tokenizer "
            "next to it (tokenizer.save_pretrained(base_dir)) or pass pre-tokenized {\"input_ids\": [...]} records"
        )
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def fit_length(example: dict[str, list[int]], limit: int | None, truncate: bool, where: str,
               fix: str) -> dict[str, list[int]]:
    """``example`` if it fits in ``limit`` tokens (None: no limit); else cut to ``limit`` when ``truncate``, or a
    :class:`DataError` naming ``where``, both lengths and ``fix``."""
    if limit is None or len(example["input_ids"]) <= limit:
        return example
    if not truncate:
        raise DataError(f"{where}: sequence of {len(example['input_ids'])} tokens is longer than the model's limit "
                        f"of {limit} tokens; {fix}")
    return {key: value[:limit] for key, value in example.items()}


def load_jsonl_dataset(
    path: str | Path, tokenizer: Any = None, *, max_length: int | None = None, truncate: bool = False
) -> list[dict[str, list[int]]]:
    """Read and tokenize a JSONL training file into ``[{"input_ids": [...], "labels": [...]}, ...]``.

    ``max_length`` is the longest sequence the model accepts. A longer record is an error naming its line,
    unless ``truncate=True``, which cuts it to ``max_length`` tokens.
    """
    examples = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        example = encode_record(record, tokenizer, where)
        examples.append(fit_length(example, max_length, truncate, where,
                                   "shorten the record, or pass --truncate (truncate=True) to cut it"))
    if not examples:
        raise DataError(f"{path}: the file contains no records; expected one JSON object a line: {EXPECTED_FIELDS}")
    return examples


def collate(examples: list[dict[str, list[int]]], pad_id: int):
    """Right-padded ``input_ids`` / ``labels`` / ``attention_mask`` tensors for ``{"input_ids", "labels"}`` records
    (labels ``IGNORE_INDEX`` on the padding)."""
    import torch

    length = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
