"""Determinism (issue 8): localization is bitwise identical across runs and thread counts, and CPU training
with a fixed seed gives bitwise identical deltas across runs.

Each run is a fresh Python process, so nothing (caches, RNG state, thread pools) carries over from this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.support.tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent(
    """
    import hashlib, json, sys, torch
    threads, base, task, seed = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(threads)
    import peft_alps
    from peft import get_peft_model
    from tests.test_determinism import localization_digests, training_digest
    out = {"threads": torch.get_num_threads(), "localization": localization_digests(base, task)}
    if seed >= 0:
        out["training"] = training_digest(seed)
    print("RESULT " + json.dumps(out))
    """
)


def localization_digests(base, task) -> dict[str, str]:
    """sha256 of the float64 score bytes, per (metric, variant, tau), from checkpoint folders."""
    from peft_alps import localize_heads

    out = {}
    for metric, variant, tau in [("wasserstein", "qkv_product", 1.0), ("wasserstein", "qkv_concat", 0.5),
                                 ("kl", "qkv_product", 1.0), ("js", "qkv_concat", 2.0)]:
        scores = localize_heads(base, task, metric=metric, variant=variant, tau=tau).scores
        out[f"{metric}/{variant}/{tau}"] = hashlib.sha256(scores.tobytes()).hexdigest()
    return out


def training_digest(seed: int) -> str:
    """sha256 of every trained delta after a few AdamW steps from ``seed`` (model init and data included)."""
    from peft import get_peft_model

    from peft_alps import AlpsConfig
    from tests.support.tiny_models import batch, tiny_llama, train_steps

    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(seed=seed), AlpsConfig(target_heads={0: [1, 6], 2: [3]}))
    train_steps(model, steps=3, seed=seed)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if "alps_" in name:
            digest.update(name.encode())
            digest.update(param.detach().numpy().tobytes())
    return digest.hexdigest()


def _start(threads: int, base: Path, task: Path, seed: int = -1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(threads), str(base), str(task), str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )


def _result(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, task = tiny_llama(seed=0), tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in task.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    base.save_pretrained(root / "base")
    task.save_pretrained(root / "task")
    return root / "base", root / "task"


def test_localization_and_training_are_bitwise_reproducible(pair):
    """One fresh process on 1 thread against this one: localization on 2 threads here (another run *and* another
    thread count), training on 1 thread in both (another run; matmul sums legitimately depend on the thread count,
    so training is compared at equal counts)."""
    base, task = pair
    run = _start(1, base, task, seed=3)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        here_loc = localization_digests(base, task)
        loc_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        here_train = training_digest(seed=3)
    finally:
        torch.set_num_threads(previous)
    other = _result(run)
    assert other["threads"] == 1
    assert loc_threads == 2 or os.cpu_count() == 1
    assert other["localization"] == here_loc, "head scores differ between runs with 1 and 2 threads"
    assert other["training"] == here_train, "training from the same seed gave different deltas in another run"


def test_digests_are_sensitive(pair):
    """The digests above would notice a difference: another seed trains other deltas, another task other scores."""
    base, task = pair
    assert training_digest(seed=3) != training_digest(seed=4)
    here, identical = localization_digests(base, task), localization_digests(base, base)
    assert all(here[key] != identical[key] for key in here)
