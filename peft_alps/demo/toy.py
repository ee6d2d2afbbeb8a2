"""``peft-alps demo``: the whole ALPS pipeline, offline, on a small model and a built-in synthetic task.

1. **base model**: a small Llama-style model, briefly pretrained on :func:`peft_alps.demo.synthetic.corpus` (text-like
   sequences plus copy/arithmetic/bracket skills, but *not* the demo task), so that its heads mean something;
2. **task model**: the base fully fine-tuned for a few steps on the task skill (default ``reverse``);
3. **localize**: :func:`peft_alps.localize_heads` streams the two saved checkpoints and writes ``heads.json``
   and ``heads.png``; then the path for users without a task model: :func:`peft_alps.warmup` trains only the
   attention on ``warmup_fraction`` of the task data, and the heads it finds are compared with the full task
   model's (shared top heads, Jaccard index, Spearman rank correlation);
4. **ALPS**: an adapter on the top ``ratio`` heads, trained from the base on the task; as many random heads as a
   baseline (the same number of heads; their trainable parameters differ, since heads of one KV group share its
   k/v rows);
5. a before/after table (task loss and exact-match accuracy on held-out examples) and the saved adapter.

Everything lands in ``settings.output`` (default ``./alps-demo``)::

    base/ task/            the two small checkpoints (safetensors)
    task-attn/             the warm-up task checkpoint (attention tensors only)
    heads.json heads.png   head scores and heatmap
    alps-adapter/          the ALPS adapter (PeftModel.from_pretrained(base, "alps-adapter"))
    results.json           the table
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from peft_alps.demo import synthetic
from peft_alps.demo.resources import trainable_parameters
from peft_alps.threads import torch_threads

PRETRAIN_SKILLS = ("text", "copy", "arithmetic", "brackets")


@dataclass
class DemoSettings:
    output: str = "alps-demo"
    task: str = "reverse"
    ratio: float = 0.25
    hidden_size: int = 128
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    pretrain_steps: int = 800
    task_steps: int = 300
    adapter_steps: int = 300
    batch_size: int = 32
    train_examples: int = 4000
    eval_examples: int = 300
    lr: float = 3e-3
    adapter_lr: float = 1e-2
    seed: int = 0
    warmup_fraction: float = 0.1  # share of the task data the warm-up sees (0 skips the warm-up comparison)
    threads: int = 1  # torch threads while the demo runs; a model this small gains nothing from more
    progress: bool = True

    @classmethod
    def quick(cls) -> DemoSettings:
        """Tiny sizes and a handful of steps: the whole pipeline in seconds (used by the tests)."""
        return cls(hidden_size=32, layers=2, heads=4, kv_heads=2, pretrain_steps=6, task_steps=4, adapter_steps=4,
                   batch_size=8, train_examples=64, eval_examples=32, ratio=0.25)

    def validate(self) -> None:
        if self.task not in synthetic.SKILLS:
            raise ValueError(f"unknown demo task {self.task!r}; choose one of {', '.join(synthetic.SKILLS)}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        for name in ("layers", "heads", "kv_heads", "batch_size", "train_examples", "eval_examples", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def build_model(settings: DemoSettings) -> torch.nn.Module:
    """A small Llama-style causal LM over the synthetic vocabulary (GQA when ``kv_heads < heads``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=synthetic.VOCAB_SIZE,
        hidden_size=settings.hidden_size,
        intermediate_size=2 * settings.hidden_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        head_dim=settings.hidden_size // settings.heads,
        max_position_embeddings=64,
        pad_token_id=synthetic.PAD,
        bos_token_id=synthetic.BOS,
        eos_token_id=synthetic.EOS,
        tie_word_embeddings=True,
    )
    torch.manual_seed(settings.seed)
    return AutoModelForCausalLM.from_config(config)


def train(model: torch.nn.Module, examples, steps: int, lr: float, batch_size: int, *, seed: int = 0,
          loss_on: str = "answer", desc: str = "training", progress: bool = True) -> float:
    """:func:`fit` on shuffled batches of synthetic ``examples``; returns the final batch loss."""
    batches = synthetic.batches(examples, batch_size, seed=seed, loss_on=loss_on)
    return fit(model, batches, steps, lr, desc=desc, progress=progress)


def fit(model: torch.nn.Module, batches, steps: int, lr: float, *, desc: str = "training",
        progress: bool = True) -> float:
    """AdamW with warmup + cosine decay for ``steps`` batches from the iterator ``batches``; returns the final
    batch loss."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), max(1, steps))
    model.train()
    loss = float("nan")
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        loss_t = model(**next(batches)).loss
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_t.item()
        bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    return loss


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'model':<22} {'heads':>5} {'trained params':>14} {'task loss':>9} {'token acc':>9} "
              f"{'exact':>6} {'train s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        heads = "-" if r.get("heads") is None else str(r["heads"])
        params = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"
        lines.append(f"{r['model']:<22} {heads:>5} {params:>14} {r['loss']:>9.3f} {r['token_accuracy']:>9.1%} "
                     f"{r['accuracy']:>6.1%} {secs:>7}")
    return "\n".join(lines)


def _warmup_comparison(base, task_train, scores, settings: DemoSettings, out: Path) -> dict[str, Any]:
    """No task model? Warm up the attention on a share of the data, localize, compare with the full task model."""
    from peft_alps.localization.pad import localize_heads
    from peft_alps.scores import head_overlap
    from peft_alps.warmup.train import warmup

    print(f"      no task model? warm-up: attention only, one pass over {settings.warmup_fraction:.0%} of the task data")
    t0 = time.perf_counter()
    warm = warmup(base, task_train, fraction=settings.warmup_fraction, batch_size=settings.batch_size,
                  lr=settings.lr, seed=settings.seed, output_dir=out / "task-attn", progress=settings.progress)
    seconds = time.perf_counter() - t0
    warm_scores = localize_heads(out / "base", out / "task-attn")
    warm_scores.save(out / "heads-warmup.json")
    overlap = head_overlap(scores, warm_scores, settings.ratio)
    print(f"      warm-up heads: {warm_scores.top_k(settings.ratio)}; {overlap['shared']} of {overlap['k']} shared with "
          f"the full task model's (Jaccard {overlap['jaccard']:.2f}, Spearman {overlap['spearman']:.2f}); "
          f"{warm.metadata['steps']} steps in {seconds:.1f} s, checkpoint "
          f"{warm.metadata['checkpoint_bytes'] / 1024:.0f} KiB (attention tensors only)")
    return {**overlap, "heads": {str(k): v for k, v in warm_scores.top_k(settings.ratio).items()},
            "steps": warm.metadata["steps"], "seconds": seconds, "checkpoint_bytes": warm.metadata["checkpoint_bytes"]}


def run_demo(settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the demo; returns the results (also written to ``<output>/results.json``)."""
    settings = settings or DemoSettings()
    settings.validate()
    with torch_threads(settings.threads):
        return _run(settings)


def _run(settings: DemoSettings) -> dict[str, Any]:
    from peft import get_peft_model

    from peft_alps.tuner.config import AlpsConfig
    from peft_alps.localization.pad import localize_heads
    from peft_alps.scores import HeadScores

    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    say = print
    torch.manual_seed(settings.seed)

    corpus = synthetic.corpus(settings.train_examples, seed=settings.seed, skills=PRETRAIN_SKILLS)
    task_train = synthetic.make_examples(settings.task, settings.train_examples, seed=settings.seed)
    task_eval = synthetic.make_examples(settings.task, settings.eval_examples, seed=settings.seed + 10_000)

    say(f"[1/5] base model: Llama-style, {settings.layers} layers x {settings.heads} heads "
        f"({settings.kv_heads} KV), hidden {settings.hidden_size}; pretraining on skills {', '.join(PRETRAIN_SKILLS)}")
    base = build_model(settings)
    t0 = time.perf_counter()
    train(base, corpus, settings.pretrain_steps, settings.lr, settings.batch_size, seed=settings.seed, loss_on="all",
          desc="pretrain base", progress=settings.progress)
    base.save_pretrained(out / "base")
    rows = [{"model": "base (before)", "trainable_params": None, "train_seconds": None,
             **synthetic.evaluate(base, task_eval)}]

    say(f"[2/5] task model: full fine-tune of the base on '{settings.task}' ({settings.task_steps} steps)")
    task = copy.deepcopy(base)
    t0 = time.perf_counter()
    train(task, task_train, settings.task_steps, settings.lr, settings.batch_size, seed=settings.seed + 1,
          desc="fine-tune task model", progress=settings.progress)
    rows.append({"model": "task model (full FT)", "heads": "all", "trainable_params": trainable_parameters(task),
                 "train_seconds": time.perf_counter() - t0, **synthetic.evaluate(task, task_eval)})
    task.save_pretrained(out / "task")
    del task

    say("[3/5] localizing task heads (streams the two checkpoints, no data)")
    scores = localize_heads(out / "base", out / "task", progress=settings.progress)
    scores.save(out / "heads.json")
    count = sum(len(h) for h in scores.top_k(settings.ratio).values())
    scores.heatmap(out / "heads.png", ratio=settings.ratio)
    say(f"      wrote {out / 'heads.json'} and {out / 'heads.png'}; top {count} of {scores.total_heads} heads: "
        f"{scores.top_k(settings.ratio)}")
    warm = _warmup_comparison(base, task_train, scores, settings, out) if settings.warmup_fraction else None

    results = {}
    for name, config in (
        ("ALPS (top heads)", AlpsConfig(head_scores=str(out / "heads.json"), ratio=settings.ratio)),
        ("random heads (as many)", AlpsConfig(target_heads=HeadScores.load(out / "heads.json").random(settings.ratio,
                                                                                          seed=settings.seed))),
    ):
        step = "[4/5]" if name.startswith("ALPS") else "[5/5]"
        say(f"{step} {name}: adapter on {config.target_heads}, {settings.adapter_steps} steps from the base")
        model = get_peft_model(copy.deepcopy(base), config)
        t0 = time.perf_counter()
        train(model, task_train, settings.adapter_steps, settings.adapter_lr, settings.batch_size,
              seed=settings.seed + 2, desc=name, progress=settings.progress)
        rows.append({"model": name, "heads": config.num_selected_heads, "trainable_params": trainable_parameters(model),
                     "train_seconds": time.perf_counter() - t0,
                     **synthetic.evaluate(model, task_eval)})
        results[name] = model

    results["ALPS (top heads)"].save_pretrained(out / "alps-adapter")
    table = format_table(rows)
    say("\n" + f"task '{settings.task}', {settings.eval_examples} held-out examples (loss and token accuracy on the answer; "
        "exact = whole answer right):\n" + table)
    say("ALPS and random heads train the same number of heads, not the same number of parameters (column "
        "'trained params'): heads that share a KV group share its k/v rows.")
    say(f"\nsaved: {out / 'alps-adapter'} (load with PeftModel.from_pretrained(base, ...) after `import peft_alps`); "
        f"base model in {out / 'base'}")
    summary = {"settings": asdict(settings), "selected_heads": {str(k): v for k, v in scores.top_k(settings.ratio).items()},
               "results": rows, "warmup": warm}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
