"""Tasks shaped like the paper's (general instruction following, math, code), generated from real text.

Every example is a chat turn ``{"prompt": ..., "answer": ...}`` with a short, exactly checkable answer. The
English text is real: sentences and paragraphs of the docstrings of Python's standard library (read at run
time, so nothing is copied into this repository; which sentences exist depends a little on the Python version,
which the result files record). The sentences of one half of the modules feed the instruction task, the
paragraphs of the other half are the "general text" on which forgetting is measured.

- ``instruct``: one of four instructions about a real sentence (the n-th word, the number of words, the last word
  in capitals, the first and the last word).
- ``math`` (dataset A) and ``math_mul`` (dataset B, for the transfer table): two-step word problems
  (GSM8K-shaped), answered with the number only.
- ``code``: what a short Python snippet prints (CRUXEval-O-shaped), the answer found by running the snippet.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import random
import re
from functools import lru_cache
from typing import Callable

TASK_MODULES = (
    "os", "json", "collections", "itertools", "functools", "string", "random", "math", "statistics", "textwrap",
    "shutil", "pathlib", "re", "datetime", "calendar", "heapq", "bisect", "csv", "argparse", "logging",
    "threading", "subprocess", "socket", "email", "zipfile", "tarfile", "gzip", "sqlite3", "unittest", "doctest",
    "pickle", "copy", "enum", "typing", "dataclasses", "decimal", "fractions", "difflib", "pprint", "inspect",
    "tempfile", "glob", "fnmatch", "configparser", "hashlib", "secrets", "uuid", "base64", "struct", "queue",
)
GENERAL_MODULES = (
    "asyncio", "contextlib", "abc", "io", "time", "locale", "gettext", "codecs", "html", "ftplib", "smtplib",
    "mailbox", "wave", "colorsys", "tokenize", "ast", "dis", "traceback", "warnings", "weakref", "operator",
    "numbers", "cmath", "platform", "signal", "selectors", "zlib", "bz2", "lzma", "plistlib", "shelve",
    "optparse", "getopt", "timeit", "trace", "pdb", "array", "sched", "hmac", "urllib.parse", "http.cookies",
)
SYSTEM = "Reply with the answer only."
ORDINALS = {2: "second", 3: "third", 4: "fourth", 5: "fifth"}
NAMES = ("Ava", "Liam", "Noah", "Emma", "Olivia", "Mia", "Lucas", "Sofia", "Ethan", "Chloe", "Mason", "Zoe",
         "Leo", "Nora", "Owen", "Ruby", "Ian", "Maya", "Jack", "Lily")
ITEMS = ("apples", "books", "marbles", "stamps", "pencils", "cookies", "stickers", "coins", "cards", "shells",
         "eggs", "flowers", "candles", "buttons", "tickets")


def _docstrings(modules: tuple[str, ...]) -> list[str]:
    out = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - a module missing on some platform
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
            try:
                doc = inspect.getdoc(obj)
            except Exception:  # pragma: no cover
                doc = None
            if doc:
                out += [" ".join(p.split()) for p in doc.split("\n\n")]
    return out


@lru_cache(maxsize=None)
def sentences() -> tuple[str, ...]:
    """Real sentences of 5-9 plain words (letters and commas), from the task half of the docstrings."""
    found = set()
    for para in _docstrings(TASK_MODULES):
        for s in re.split(r"(?<=[.!?])\s+", para):
            words = s.rstrip(".").split()
            if s.endswith(".") and 5 <= len(words) <= 9 and all(re.fullmatch(r"[A-Za-z]+,?", w) for w in words):
                found.add(s)
    return tuple(sorted(found))


@lru_cache(maxsize=None)
def general_texts() -> tuple[str, ...]:
    """Real paragraphs of 12+ words from the other half of the docstrings (the forgetting probe)."""
    def prose(p: str) -> bool:
        words = p.split()
        plain = sum(bool(re.fullmatch(r"[A-Za-z]+[,.;:]?", w)) for w in words)
        return len(words) >= 12 and p.isascii() and plain >= 0.9 * len(words)

    paras = {p for p in _docstrings(GENERAL_MODULES) if prose(p)}
    return tuple(sorted(paras))


# ------------------------------------------------------------------------------------------------ generators


def _instruct(rng: random.Random) -> tuple[str, str]:
    sentence = rng.choice(sentences())
    words = [w.rstrip(",") for w in sentence.rstrip(".").split()]
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.choice(list(ORDINALS))
        return f"What is the {ORDINALS[n]} word of this sentence?\nSentence: {sentence}", words[n - 1]
    if kind == 1:
        return f"How many words does this sentence have?\nSentence: {sentence}", str(len(words))
    if kind == 2:
        return f"Write the last word of this sentence in capital letters.\nSentence: {sentence}", words[-1].upper()
    return (f"Write the first and the last word of this sentence, separated by a comma.\nSentence: {sentence}",
            f"{words[0]}, {words[-1]}")


def _math_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(12, 60), rng.randint(5, 40)
    c = rng.randint(3, a + b - 1)
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    form = rng.randrange(3)
    if form == 0:
        q = f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {other}. How many {item} does {name} have now?"
    elif form == 1:
        q = f"A box holds {a} {item}. {name} adds {b} {item} and {other} takes out {c}. How many {item} are in the box?"
    else:
        q = f"{name} collected {a} {item} on Monday and {b} on Tuesday, then lost {c}. How many {item} are left?"
    return q, str(a + b - c)


def _math_mul(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(3, 9), rng.randint(4, 12), rng.randint(2, 30)
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    if rng.randrange(2):
        q = f"{name} buys {a} bags with {b} {item} in each bag and already had {c} {item}. How many {item} does {name} have?"
    else:
        q = f"There are {a} shelves with {b} {item} on each shelf and {c} {item} on the floor. How many {item} are there?"
    return q, str(a * b + c)


def _code_snippet(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(3, 7)
        op = rng.choice(["+", "-", "*"])
        return f"x = {a}\ny = x {op} {b}\nprint(y % {c})"
    if kind == 1:
        xs = rng.sample(range(1, 30), 4)
        new, i = rng.randint(1, 30), rng.randrange(5)
        return f"a = {xs}\na.append({new})\nprint(sorted(a)[{i}])"
    if kind == 2:
        word = rng.choice([w.rstrip(",").lower() for s in sentences() for w in s.rstrip(".").split() if len(w) >= 6])
        i = rng.randrange(3)
        return f"s = '{word}'\nprint(s[{i}:{i + 3}].upper())"
    n, k = rng.randint(3, 8), rng.randint(1, 3)
    return f"t = 0\nfor i in range({n}):\n    t += i * {k}\nprint(t)"


def _code(rng: random.Random) -> tuple[str, str]:
    snippet = _code_snippet(rng)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(snippet, {})  # our own generated snippet: arithmetic, a list, a string slice or a loop
    return f"What does this Python code print?\n```python\n{snippet}\n```", buf.getvalue().strip()


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "instruct": _instruct, "math": _math_add, "math_mul": _math_mul, "code": _code,
}


def examples(task: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct examples of ``task`` (distinct prompts), reproducible from ``seed``."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(GENERATORS)}")
    rng, seen, out = random.Random(f"{task}:{seed}"), set(), []
    for _ in range(50 * n):
        prompt, answer = GENERATORS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "answer": answer})
            if len(out) == n:
                return out
    raise ValueError(f"task {task!r} has fewer than {n} distinct examples")


def splits(task: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits (no prompt in two of them) of the given sizes, e.g. ``{"train": 400, "dev": 48, ...}``."""
    pool = examples(task, sum(sizes.values()), seed)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = pool[start:start + size]
        start += size
    return out
