"""The paper's Tables 1, 2, 3 and 5 on a real pretrained LLM (SmolLM2-135M-Instruct, ``peft_alps.demo.builtin_models``).

Three tasks shaped like the paper's (``benchmarks.real_tasks``: general instruction following, math word
problems, Python output prediction), real text, SmolLM2's chat template. Per task:

1. task models from the base: a full SFT (every weight) and the attention warm-up (``peft_alps.warmup``);
2. head scores: PAD (W1) and the ablation metrics (KL, JS, cosine, Euclidean) from the SFT task model, PAD from the
   warm-up, and two selectors beyond the paper that need nothing but the warm-up (``peft_alps.localization.scorers``: the
   Frobenius norm of each head's warm-up change, the gradient norm on the first batches);
3. every method trained from the base at the same budget (steps, batch, AdamW, cosine schedule): full attention,
   w/o attention (everything but attention), Random 10% and LC 10% heads (``--draws`` head sets each), LoRA at
   ALPS-10%'s parameter count (q/k/v/o), LoRA on q/k/v at the paper's r scaled to this width, ALPS 10% and 30%;
4. each method's learning rate is chosen on a held-out dev split of ``--tune-task`` from a grid (the seed-0 run at
   the chosen rate is kept, so tuning costs two extra runs per method); seeds change the data order, LoRA's init
   and (Random/LC) the head draw;
5. exact match and answer loss on a held-out test split; forgetting = the increase over the base of the loss on
   general text (real docstring paragraphs) and on the other tasks' answers (Table 5);
6. transfer (Table 3): heads localized on dataset A of the math task (``math``: add/subtract problems) trained on
   dataset B (``math_mul``: multiply-and-add problems), against B's own heads, random heads and full attention.

Jobs run in priority order and the JSON is rewritten after every run, so a run that is stopped early still leaves
a readable (and honestly labelled) partial report: ``--render`` re-renders it. ``--quick`` runs the whole pipeline on
a tiny random Llama with SmolLM2's tokenizer in about a minute (tests); ``--quick --model smollm2-135m`` on the real
model at toy budgets.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads stall badly on shared cores

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import _common as C
from benchmarks import real_data as D
from benchmarks import real_tasks as T
from benchmarks.reproduce import alps_method, lora_method, lora_rank_for, schedule, weights_method
from peft_alps.demo.resources import trainable_parameters

TUNED = ("alps_10", "random_10", "lc_10", "lora_eq", "full_attn", "wo_attn", "lora_qkv", "alps_30", "alps_10_warmup")
MAIN = ("full_attn", "wo_attn", "random_10", "lc_10", "lora_eq", "lora_qkv", "alps_10", "alps_30", "alps_10_warmup")
ABLATION = {"wasserstein": "alps_10", "kl": "alps_10_kl", "js": "alps_10_js", "cosine": "alps_10_cosine",
            "euclidean": "alps_10_euclidean"}
SELECTORS = {"PAD on the warm-up": "alps_10_warmup", "warm-up weight change (Frobenius)": "sel_weight_change",
             "gradient norm, first batches": "sel_gradient"}
LABELS = {
    "full_attn": "full attention", "wo_attn": "w/o attention (all but attention)",
    "random_10": "Random 10% heads", "lc_10": "LC 10% heads", "lora_eq": "LoRA q/k/v/o, ALPS-10% params",
    "lora_qkv": "LoRA q/k/v, paper r scaled", "alps_10": "ALPS 10% (PAD, SFT task model)",
    "alps_30": "ALPS 30% (PAD, SFT task model)", "alps_10_warmup": "ALPS 10% (PAD, warm-up task model)",
    "alps_10_kl": "ALPS 10% (KL)", "alps_10_js": "ALPS 10% (JS)", "alps_10_cosine": "ALPS 10% (cosine)",
    "alps_10_euclidean": "ALPS 10% (Euclidean)", "sel_weight_change": "10% by warm-up weight change",
    "sel_gradient": "10% by gradient norm", "transfer_a": "ALPS 10%, heads from dataset A",
    "transfer_b": "ALPS 10%, heads from dataset B", "transfer_random": "Random 10% heads",
    "transfer_full_attn": "full attention",
}
FAMILY = {"full_attn": "full", "wo_attn": "full", "lora_eq": "lora", "lora_qkv": "lora"}  # others: "heads"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
PROBE_TASKS = ("instruct", "math", "code")  # forgetting probes: every paper-shaped task but the trained one
CURVE = ("alps_10", "random_10", "lora_eq", "full_attn")


@dataclass(frozen=True)
class Setup:
    model: str = "smollm2-135m"
    tasks: tuple[str, ...] = ("instruct", "math", "code")
    transfer: tuple[str, str] = ("math", "math_mul")
    tune_task: str = "math"
    steps: int = 8  # the reduced runs' dev curves (steps 4/8/12) gained most by step 8 and saturated nowhere
    batch: int = 6  # at 8 the full design projected ~105 min on 2 cores; at 6 it ran in ~90 min
    train_examples: int = 320
    dev_examples: int = 24
    test_examples: int = 48
    probe_examples: int = 8
    probe_tokens: int = 48
    sft_steps: int = 8
    sft_lr: float = 1e-4
    warmup_steps: int = 8
    warmup_lr: float = 1e-3
    grad_batches: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    draws: int = 10
    extra_seeds: int = 1  # Table 2 metrics, the extra selectors and Table 3 transfer: this many seeds (read against
    #                       the Random draws), which keeps the whole design near 90 min on 2 cores
    grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "full": (3e-5, 1e-4, 3e-4), "heads": (1e-4, 3e-4, 1e-3), "lora": (3e-4, 1e-3, 3e-3)})
    tune: bool = True  # False: the fixed rates below for every task (a reduced run)
    fixed_lr: dict[str, float] = field(default_factory=lambda: {"full": 1e-4, "heads": 3e-4, "lora": 1e-3})
    methods: tuple[str, ...] = ()  # only these rows (default: all)
    curve_every: int = 4  # dev EM every this many steps for the seed-0 runs of CURVE (the learning-curve check)
    tiny: bool = False  # a tiny random Llama with the model's tokenizer (--quick)


QUICK = dict(model="tiny", steps=2, batch=4, train_examples=16, dev_examples=8, test_examples=8, probe_examples=4,
             probe_tokens=16, sft_steps=2, warmup_steps=2, grad_batches=1, seeds=(0, 1), draws=2, tiny=True,
             grids={"full": (1e-3, 3e-3), "heads": (1e-3, 3e-3), "lora": (3e-3, 1e-2)})


def log(message: str) -> None:
    print(f"[reproduce_real {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ models


def load_base(setup: Setup, folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if setup.tiny:
        real = LlamaConfig.from_pretrained(folder)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=real.vocab_size, tie_word_embeddings=True,
                          max_position_embeddings=256, bos_token_id=real.bos_token_id, eos_token_id=real.eos_token_id)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(cfg)
        tmp = Path(tempfile.mkdtemp(prefix="reproduce_real_tiny_"))
        base.save_pretrained(tmp)
        folder = tmp
    else:
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base.eval().requires_grad_(False)
    return base, tokenizer, folder


def model_folder(name: str) -> Path:
    if Path(name).is_dir():
        return Path(name)
    from peft_alps.demo import builtin_models as models

    return models.load(name)


# ------------------------------------------------------------------------------------------------ training


def train(model, items, setup: Setup, lr: float, seed: int, steps: int | None = None,
          every: int = 0, probe: Callable[[int], bool | None] | None = None, floor: float = 0.1,
          bf16: bool = False) -> list[float]:
    """AdamW (0.9, 0.999, no weight decay), linear warm-up then cosine to ``floor`` of the peak rate (1.0: constant
    after the warm-up), clip 1.0 (the toy reproduction's); ``bf16``: the forward pass under bf16 autocast (on the
    model's device).

    With ``every`` and ``probe``, ``probe(step)`` runs after every ``every`` steps (the learning curve); training
    stops early when it returns True."""
    steps = steps or setup.steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = schedule(optimizer, steps, floor=floor)
    model.train()
    losses = []
    device = params[0].device.type
    for _, batch in zip(range(steps), D.batches(items, setup.batch, PAD[0], seed)):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = D.answer_logits(model, batch)
        loss = D.loss_of(logits, batch["labels"].to(logits.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if probe is not None and every and len(losses) % every == 0 and len(losses) < steps:
            stop = probe(len(losses))
            model.train()
            if stop is True:
                break
    model.eval()
    return losses


PAD: list[int] = [0]


def hf_batches(items, setup: Setup, seed: int):
    """Standard ``model(**batch).loss`` batches (labels on the answers) for ``peft_alps.localization.scorers.gradient_scores``."""
    for batch in D.batches(items, setup.batch, PAD[0], seed):
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -(batch["keep"] - 1):] = batch["labels"]
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
               "position_ids": batch["position_ids"], "labels": labels}


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(model, data: dict[str, Any], which: tuple[str, ...] = ("dev", "test", "probes")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "dev" in which:
        out["dev"] = D.evaluate(model, data["dev"], PAD[0])
    if "test" in which:
        out["test"] = D.evaluate(model, data["test"], PAD[0])
    if "probes" in which:
        out["probes"] = {name: D.evaluate(model, items, PAD[0])["loss"] for name, items in data["probes"].items()}
    return out


# ------------------------------------------------------------------------------------------------ per-task state


class TaskState:
    """Data, references, task models' head scores and selections of one task (built once, shared by every row)."""

    def __init__(self, name: str, setup: Setup, tokenizer, general: list, probes_of: Callable[[str], list]):
        sp = T.splits(name, {"train": setup.train_examples, "sft": setup.train_examples,
                             "dev": setup.dev_examples, "test": setup.test_examples}, seed=0)
        enc = {k: D.encode(tokenizer, v, T.SYSTEM) for k, v in sp.items()}
        self.name = name
        self.train, self.sft_items = enc["train"], enc["sft"]
        others = {f"task:{t}": probes_of(t) for t in PROBE_TASKS if t != name}
        self.data = {"dev": enc["dev"], "test": enc["test"], "probes": {"general_text": general, **others}}
        self.selections: dict[str, dict[int, list[int]]] = {}
        self.references: dict[str, Any] = {}
        self.scores: dict[str, Any] = {}


def build_task(state: TaskState, base, base_folder: Path, setup: Setup, workdir: Path) -> None:
    from peft_alps import localize_heads, warmup
    from peft_alps.localization.scorers import gradient_scores, weight_change_scores

    t0 = time.perf_counter()
    state.references["base"] = evaluate(base, state.data)
    log(f"{state.name}: base test EM {state.references['base']['test']['accuracy']:.3f}; SFT task model "
        f"({setup.sft_steps} steps, lr {setup.sft_lr})")
    task = copy.deepcopy(base).requires_grad_(True)
    train(task, state.sft_items, setup, setup.sft_lr, seed=1000, steps=setup.sft_steps)
    task.requires_grad_(False)
    state.references["task_model_sft"] = evaluate(task, state.data)
    for metric in ABLATION:
        state.scores[metric] = localize_heads(base_folder, task, metric=metric)
    del task
    raw = [{"input_ids": it["prompt"] + it["answer"], "labels": [-100] * len(it["prompt"]) + it["answer"]}
           for it in state.sft_items]
    log(f"{state.name}: attention warm-up ({setup.warmup_steps} steps, lr {setup.warmup_lr})")
    ckpt = warmup(base, raw, steps=setup.warmup_steps, lr=setup.warmup_lr, batch_size=setup.batch,
                  gradient_checkpointing=False, progress=False, output_dir=workdir / f"warmup_{state.name}")
    state.scores["warmup_pad"] = localize_heads(base_folder, ckpt)
    state.scores["weight_change"] = weight_change_scores(base_folder, ckpt)
    state.scores["gradient"] = gradient_scores(base, hf_batches(state.sft_items, setup, seed=1000),
                                               num_batches=setup.grad_batches)
    pad = state.scores["wasserstein"]
    sel = state.selections
    sel["alps_10"], sel["alps_30"] = pad.top_k(0.1), pad.top_k(0.3)
    for metric, row in ABLATION.items():
        sel[row] = state.scores[metric].top_k(0.1)
    sel["alps_10_warmup"] = state.scores["warmup_pad"].top_k(0.1)
    sel["sel_weight_change"] = state.scores["weight_change"].top_k(0.1)
    sel["sel_gradient"] = state.scores["gradient"].top_k(0.1)
    state.references["build_s"] = time.perf_counter() - t0


def check_same_selections(task: str, recorded: dict[str, Any] | None, built: dict[str, dict[int, list[int]]]) -> None:
    """A resumed run must rebuild exactly the head sets its JSON recorded, or its old and new runs do not compare."""
    if not recorded:
        return
    for name, sel in built.items():
        if name in recorded and {int(l): list(h) for l, h in recorded[name].items()} != {int(l): list(h) for l, h in sel.items()}:
            raise RuntimeError(f"--resume: task {task!r} rebuilt different {name!r} heads than the results JSON records "
                               f"(the task models are not reproducible here: other torch version or threads?); "
                               f"start a fresh run instead of resuming")


def heads_of(selection) -> set[tuple[int, int]]:
    return {(int(l), h) for l, hs in selection.items() for h in hs}


# ------------------------------------------------------------------------------------------------ methods


def make_method(name: str, base, state: TaskState, seed: int, ranks: dict[str, int]):
    pad = state.scores["wasserstein"]
    if name == "full_attn" or name == "transfer_full_attn":
        return weights_method(base, True)
    if name == "wo_attn":
        return weights_method(base, False)
    if name in ("random_10", "transfer_random"):
        return alps_method(base, pad.random(0.1, seed=seed))
    if name == "lc_10":
        return alps_method(base, pad.layer_consistent(0.1, seed=seed))
    if name == "lora_eq":
        return lora_method(base, ranks["lora_eq"], ATTN, seed)
    if name == "lora_qkv":
        return lora_method(base, ranks["lora_qkv"], ATTN[:3], seed)
    return alps_method(base, state.selections[name])


def lora_ranks(base, state: TaskState) -> dict[str, int]:
    model = alps_method(base, state.selections["alps_10"])
    params = trainable_parameters(model)
    width = base.config.hidden_size
    return {"alps_10_params": params, "lora_eq": lora_rank_for(base, params, ATTN),
            "lora_qkv": max(1, round(128 * width / 2048))}


# ------------------------------------------------------------------------------------------------ experiment


class Runner:
    """Runs (task, method, seed) jobs in priority order; every finished run is written to the JSON at once."""

    def __init__(self, setup: Setup, args, base, tokenizer, base_folder: Path, result: dict[str, Any]):
        self.setup, self.args, self.base, self.tok, self.folder, self.result = setup, args, base, tokenizer, base_folder, result
        self.states: dict[str, TaskState] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="reproduce_real_"))
        general = D.encode_text(tokenizer, list(T.general_texts()[:setup.probe_examples]), setup.probe_tokens)
        self.probe_cache: dict[str, list] = {}
        self.general = general
        self.t0 = time.perf_counter() - result.get("elapsed_s", 0.0)  # a resumed run's clock goes on from its JSON

    def probes_of(self, task: str) -> list:
        if task not in self.probe_cache:
            ex = T.examples(task, self.setup.probe_examples, seed=7)  # seed 7: disjoint from seed 0's splits
            self.probe_cache[task] = D.encode(self.tok, ex, T.SYSTEM)
        return self.probe_cache[task]

    def state(self, task: str) -> TaskState:
        if task not in self.states:
            st = TaskState(task, self.setup, self.tok, self.general, self.probes_of)
            build_task(st, self.base, self.folder, self.setup, self.workdir)
            st.ranks = lora_ranks(self.base, st)
            self.states[task] = st
            info = self.result["tasks"].setdefault(task, {})
            check_same_selections(task, info.get("selections"), st.selections)
            info.update(references=st.references, ranks=st.ranks,
                        selections={k: {str(l): h for l, h in v.items()} for k, v in st.selections.items()},
                        scores={k: s.scores.tolist() for k, s in st.scores.items()})
            self.save()
        return self.states[task]

    def save(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.t0
        C.finish_environment(self.result["env"])  # load average so far
        C.write_outputs(self.args.out, self.args.stem, self.result, render(self.result))

    def record(self, task: str, method: str, seed: int, lr: float, res: dict[str, Any]) -> None:
        runs = self.result["tasks"].setdefault(task, {}).setdefault("runs", {}).setdefault(method, [])
        runs.append({"seed": seed, "lr": lr, **res})
        self.save()

    def train_one(self, state: TaskState, train_state: TaskState, method: str, seed: int, lr: float,
                  which=("test", "probes")):
        torch.manual_seed(seed)
        if method == "transfer_a":  # heads of dataset A's task model, trained on dataset B
            model = alps_method(self.base, self.states[self.setup.transfer[0]].selections["alps_10"])
        elif method == "transfer_b":  # dataset B's own heads
            model = alps_method(self.base, train_state.selections["alps_10"])
        else:
            model = make_method(method, self.base, state, seed, state.ranks)
        n = trainable_parameters(model)
        t = time.perf_counter()
        curve: list[dict[str, float]] = []

        def probe(step: int) -> None:
            curve.append({"step": step, **D.evaluate(model, train_state.data["dev"], PAD[0])})

        want_curve = seed == self.setup.seeds[0] and method in CURVE and self.setup.curve_every > 0
        losses = train(model, train_state.train, self.setup, lr, seed, every=self.setup.curve_every,
                       probe=probe if want_curve else None)
        res = evaluate(model, train_state.data, which if not want_curve else tuple({*which, "dev"}))
        if want_curve:
            curve.append({"step": len(losses), **res["dev"]})
        res.update(trainable_params=n, train_s=time.perf_counter() - t, train_losses=losses, curve=curve)
        return model, res

    def tune(self, method: str) -> float:
        """Grid over the method family's rates on the tune task's dev split at seed 0; the best run is recorded.

        Best = lowest dev answer loss (dev EM breaks ties): with 24 dev examples at 0-5% EM, one example is 4 points
        of EM, so EM alone would pick rates by chance."""
        task = self.setup.tune_task
        st = self.state(task)
        grid = self.setup.grids[FAMILY.get(method, "heads")]
        best = None
        trials = []
        for lr in grid:
            model, res = self.train_one(st, st, method, 0, lr, which=("dev",))
            trials.append({"lr": lr, "dev": res["dev"]})
            key = (-res["dev"]["loss"], res["dev"]["accuracy"])  # loss first: near the EM floor one dev example flips EM
            log(f"tune {method:>16} lr {lr:g}: dev EM {res['dev']['accuracy']:.3f}, loss {res['dev']['loss']:.3f}")
            if best is None or key > best[0]:
                best = (key, lr, model, res)
            else:
                del model
        _, lr, model, res = best
        res.update(evaluate(model, st.data, ("test", "probes")))
        self.result["lr"][method] = lr
        self.result["tuning"][method] = trials
        self.record(task, method, 0, lr, res)
        return lr

    def twin(self, task: str, method: str, seed: int, lr: float) -> dict[str, Any] | None:
        """A finished run of another head-set row of ``task`` with the very same heads, seed and lr (reused)."""
        sel = self.states[task].selections
        if method not in sel:
            return None
        for other, runs in self.result["tasks"][task].get("runs", {}).items():
            if other != method and other in sel and sel[other] == sel[method]:
                for r in runs:
                    if r["seed"] == seed and r["lr"] == lr:
                        return {**r, "same_heads_as": other}
        return None

    def run(self, task: str, method: str, seed: int, lr: float, train_task: str | None = None) -> None:
        st = self.state(task)
        tt = self.state(train_task) if train_task else st
        same = None if train_task else self.twin(task, method, seed, lr)
        if same is not None:
            runs = self.result["tasks"][task].setdefault("runs", {}).setdefault(method, [])
            runs.append(same)
            self.save()
            log(f"{task:>9} {method:>18} seed {seed}: same heads as {same['same_heads_as']}, result reused")
            return
        _, res = self.train_one(st, tt, method, seed, lr)
        self.record(train_task or task, method, seed, lr, res)
        log(f"{(train_task or task):>9} {method:>18} seed {seed} lr {lr:g}: EM {res['test']['accuracy']:.3f}, "
            f"loss {res['test']['loss']:.3f} ({res['train_s']:.0f} s; {(time.perf_counter() - self.t0) / 60:.1f} min)")

    def done(self, task: str, method: str, seed: int) -> bool:
        runs = self.result["tasks"].get(task, {}).get("runs", {}).get(method, [])
        return any(r["seed"] == seed for r in runs)

    def jobs(self) -> list[tuple[str, str, int, str | None]]:
        """(task, method, seed, train_task) in priority order: Table 1 at every seed, then Table 2 metrics, the extra
        selectors and transfer, then the remaining Random/LC draws (a deadline cuts draws, never whole tables)."""
        s = self.setup
        seeds, draws = list(s.seeds), list(range(max(s.draws, len(s.seeds))))
        if s.methods:  # a reduced run: the chosen rows, seed by seed, then the remaining Random/LC draws
            out = [(t, m, sd, None) for sd in seeds for t in s.tasks for m in s.methods]
            return out + [(t, m, d, None) for d in draws if d not in seeds for t in s.tasks
                          for m in ("random_10", "lc_10") if m in s.methods]
        out = [(t, m, seeds[0], None) for t in s.tasks for m in TUNED]
        out += [(t, m, sd, None) for sd in seeds[1:] for t in s.tasks for m in TUNED]
        extra = [m for m in (*ABLATION.values(), *SELECTORS.values()) if m not in TUNED]
        few = seeds[:max(1, s.extra_seeds)]
        out += [(t, m, sd, None) for sd in few for t in s.tasks for m in extra]
        a, b = s.transfer
        out += [(a, m, sd, b) for sd in few for m in ("transfer_a", "transfer_b", "transfer_random", "transfer_full_attn")]
        return out + [(t, m, d, None) for d in draws if d not in seeds for t in s.tasks for m in ("random_10", "lc_10")]

    def lr_for(self, method: str) -> float:
        base = {"transfer_full_attn": "full_attn", "transfer_random": "random_10"}.get(method, method)
        if base not in TUNED:
            base = "alps_10"  # other head sets: ALPS 10%'s tuned rate (same parameterization and size)
        if base not in self.result["lr"]:
            if self.setup.tune:
                self.tune(base)
            else:
                self.result["lr"][base] = self.setup.fixed_lr[FAMILY.get(base, "heads")]
        return self.result["lr"][base]

    def execute(self) -> None:
        self.result.pop("stopped_at_deadline", None)
        self.result["finished"] = False
        for task, method, seed, train_task in self.jobs():
            if self.args.deadline and time.time() > self.args.deadline:
                log("deadline reached: stopping (the report says which runs are missing)")
                self.result["stopped_at_deadline"] = True
                break
            if method in TUNED and method not in self.result["lr"]:
                if self.setup.tune:
                    self.tune(method)
                else:
                    self.result["lr"][method] = self.setup.fixed_lr[FAMILY.get(method, "heads")]
            if self.done(train_task or task, method, seed):
                continue
            if method.startswith("transfer_"):
                self.state(task)
            self.run(task, method, seed, self.lr_for(method), train_task)
        self.result["finished"] = not self.result.get("stopped_at_deadline", False)
        self.save()


# ------------------------------------------------------------------------------------------------ report


def _test(runs: list[dict], key: str = "accuracy") -> list[float]:
    return [r["test"][key] for r in runs]


def _forget(runs: list[dict], ref: dict, probe: str) -> list[float]:
    return [r["probes"][probe] - ref["probes"][probe] for r in runs]


def pm(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "–"
    st = C.mean_std(values)
    return f"{scale * st['mean']:.{digits}f} ± {scale * st['std']:.{digits}f}"


def paired(a: list[dict], b: list[dict], key: str = "accuracy", scale: float = 100.0, digits: int = 1) -> str:
    """Mean ± std over shared seeds of (row - reference) test ``key`` (EM in points by default), with the pairs."""
    by_seed = {r["seed"]: r["test"][key] for r in b}
    diffs = [r["test"][key] - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    return f"{pm(diffs, scale, digits)} ({len(diffs)})" if diffs else "–"


def rank_among(value: float, draws: list[float], higher_is_better: bool = True) -> str:
    """How many ``draws`` ``value`` beats (ties count half), as ``k/n``."""
    if not draws:
        return "–"
    worse = sum((d < value) if higher_is_better else (d > value) for d in draws)
    return f"{worse + 0.5 * sum(d == value for d in draws):g}/{len(draws)}"


def ranks(value: dict[str, Any], draws: list[dict]) -> str:
    """``value`` (a row's mean test EM and loss) ranked among head draws' runs, by EM and by answer loss."""
    if not draws:
        return "–"
    em = rank_among(value["accuracy"], [r["test"]["accuracy"] for r in draws])
    loss = rank_among(value["loss"], [r["test"]["loss"] for r in draws], higher_is_better=False)
    return f"{em} EM, {loss} loss"


def overlap(info: dict[str, Any], method: str, reference: str = "alps_10") -> str:
    sel = info.get("selections", {})
    if method not in sel or reference not in sel:
        return "–"
    a = {(l, h) for l, hs in sel[method].items() for h in hs}
    b = {(l, h) for l, hs in sel[reference].items() for h in hs}
    return f"{len(a & b)}/{len(a)}"


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for task, info in result["tasks"].items():
        runs, ref = info.get("runs", {}), info.get("references", {}).get("base")
        if not ref:
            continue
        summ = {}
        for method, rs in runs.items():
            summ[method] = {"test_accuracy": C.mean_std(_test(rs)), "test_loss": C.mean_std(_test(rs, "loss")),
                            "trainable_params": rs[0]["trainable_params"], "lr": rs[0]["lr"],
                            "forgetting": {p: C.mean_std(_forget(rs, ref, p)) for p in ref["probes"]}}
        out[task] = summ
    return out


def render(result: dict[str, Any]) -> str:
    s = result["setup"]
    status = ("complete" if result.get("finished") else
              f"**partial**: stopped at the deadline after {result.get('elapsed_s', 0) / 60:.0f} min; cells with n "
              "below the seed/draw counts are missing runs" if result.get("stopped_at_deadline") else "in progress")
    lines = [f"# The paper's tables on {result['model_name']} ({status})", "",
             f"Tasks {', '.join(s['tasks'])}; every method: {s['steps']} steps x batch {s['batch']} from the base "
             f"(AdamW, no weight decay, warm-up 10% then cosine to 10%); "
             + (f"lr per method: lowest answer loss on the {s['tune_task']} dev split ({s['dev_examples']} examples) from grids "
                f"{s['grids']}." if s.get("tune", True) else
                f"**lr not tuned in this reduced run**: fixed {s['fixed_lr']} per family (sliced heads, LoRA, full "
                "weights).") + f" Test: exact match (greedy answer = "
             f"reference, read off one teacher-forced pass) on {s['test_examples']} held-out examples per task. Seeds "
             f"{s['seeds']}; Random/LC: {s['draws']} head draws (draw i uses seed i, so draws 0-{len(s['seeds']) - 1} "
             f"pair with the other rows' seeds); Table 2 metrics, the extra selectors and transfer: seeds "
             f"{s['seeds'][:s.get('extra_seeds', len(s['seeds']))]}. Task models: full SFT {s['sft_steps']} steps lr {s['sft_lr']}; "
             f"attention warm-up {s['warmup_steps']} steps lr {s['warmup_lr']} (Adafactor).", ""]
    summ = summarize(result)
    lines += render_overview(result, summ)
    for task, info in result["tasks"].items():
        if task not in summ:
            continue
        lines += render_task(task, info, summ[task])
    curves = [(task, m, r["curve"]) for task, info in result["tasks"].items()
              for m, rs in info.get("runs", {}).items() for r in rs if r.get("curve")]
    if curves:
        lines += ["## Learning curves (seed 0, dev split)", "",
                  "Dev exact match % (and answer loss) after each block of steps; step 0 is the base model.", ""]
        steps = sorted({c["step"] for _, _, cs in curves for c in cs})
        rows = []
        for task, m, cs in curves:
            at = {c["step"]: c for c in cs}
            base_dev = result["tasks"][task]["references"]["base"]["dev"]
            rows.append([task, LABELS[m], f"{100 * base_dev['accuracy']:.1f} ({base_dev['loss']:.2f})",
                         *[f"{100 * at[k]['accuracy']:.1f} ({at[k]['loss']:.2f})" if k in at else "–" for k in steps]])
        lines.append(C.markdown_table(["task", "method", "step 0", *[f"step {k}" for k in steps]], rows))
        lines.append("")
    lines += ["Forgetting = held-out loss on that probe minus the base model's (higher = more forgotten). "
              "'beats Random (LC) draws' = how many of the Random (LC) head draws the row's mean test EM (mean "
              "answer loss: lower beats higher) beats, ties counting half; where EM sits at its floor only the loss "
              "ranks. A negative forgetting on another task's answers means training taught the answer-only format, "
              "which those answers share.",
              ""]
    if result.get("env"):
        lines.append(C.produced_by(result["env"], f" in {result.get('elapsed_s', 0) / 60:.1f} min"))
    for r in result.get("resumed", []):
        lines.append(f"Resumed after {r['after_s'] / 60:.1f} min by `{r['command']}` at {r['utc']} UTC (the minutes count "
                     "only the time spent running).")
    return "\n".join(lines)


def render_overview(result: dict[str, Any], summ: dict[str, Any]) -> list[str]:
    """Table 1 across the paper-shaped tasks: test EM and answer loss per row, its rank among the Random draws by
    loss, and the general-text forgetting."""
    tasks = [t for t in result["setup"]["tasks"] if t in summ]
    if not tasks:
        return []
    rows = []
    for m in MAIN:
        if not any(m in summ[t] for t in tasks):
            continue
        row = [LABELS[m]]
        for t in tasks:
            runs = result["tasks"][t]["runs"]
            if m not in runs:
                row += ["–", "–", "–"]
                continue
            mean = {"accuracy": summ[t][m]["test_accuracy"]["mean"], "loss": summ[t][m]["test_loss"]["mean"]}
            rnd = _test(runs.get("random_10", []), "loss")
            row += [pm(_test(runs[m]), 100), pm(_test(runs[m], "loss"), 1, 3),
                    "–" if m == "random_10" else rank_among(mean["loss"], rnd, higher_is_better=False)]
        forget = [v for t in tasks if m in summ[t] for v in summ[t][m]["forgetting"]["general_text"]["values"]]
        rows.append(row + [pm(forget, 1, 3)])
    head = ["method"] + [f"{t}: {c}" for t in tasks for c in ("EM %", "loss", "beats Random (loss)")]
    return ["## Overview (Table 1 and Table 5, every task)", "",
            "Mean ± std over seeds (Random/LC: over the head draws); 'beats Random (loss)': of the Random draws of that "
            "task, how many have a higher mean answer loss than the row; forgetting: general-text loss minus the "
            "base's, over every run of the row on every task.", "",
            C.markdown_table(head + ["forgetting, general text"], rows), ""]


def render_task(task: str, info: dict[str, Any], sm: dict[str, Any]) -> list[str]:
    """Table 1 (+ Table 2 metrics, the selectors, Table 3 rows) and Table 5 (forgetting) for one task."""
    ref, runs = info["references"], info.get("runs", {})
    sft = ref.get("task_model_sft", {}).get("test", {}).get("accuracy", float("nan"))
    lines = [f"## Task `{task}`", "", f"Base model: test EM {100 * ref['base']['test']['accuracy']:.1f}%, answer loss "
             f"{ref['base']['test']['loss']:.3f}; SFT task model: EM {100 * sft:.1f}%. LoRA ranks: equal params "
             f"r={info['ranks']['lora_eq']}, q/k/v r={info['ranks']['lora_qkv']}.", ""]
    alps = runs.get("alps_10") or runs.get("transfer_b", [])  # the transfer task pairs with its own heads
    ref_name = "ALPS 10%" if runs.get("alps_10") else "B's own heads"
    rnd, lc = runs.get("random_10") or runs.get("transfer_random", []), runs.get("lc_10", [])
    order = [m for m in (*MAIN, *[v for v in ABLATION.values() if v != "alps_10"], "sel_weight_change", "sel_gradient",
                         "transfer_a", "transfer_b", "transfer_random", "transfer_full_attn") if m in sm]
    rows = []
    for m in order:
        r = sm[m]
        mean = {"accuracy": r["test_accuracy"]["mean"], "loss": r["test_loss"]["mean"]}
        itself = m in ("alps_10", "transfer_b")
        rows.append([LABELS[m], f"{r['trainable_params']:,}", f"{r['lr']:g}", r["test_accuracy"]["n"],
                     pm(_test(runs[m]), 100), pm(_test(runs[m], "loss"), 1, 3),
                     "–" if itself else paired(runs[m], alps),
                     "–" if itself else paired(runs[m], alps, "loss", 1.0, 3),
                     ranks(mean, rnd), ranks(mean, lc), overlap(info, m)])
    lines.append(C.markdown_table(["method", "params", "lr", "n", "test EM %", "test answer loss",
                                   f"EM minus {ref_name}, paired (pp, pairs)",
                                   f"loss minus {ref_name}, paired (pairs)", "beats Random draws",
                                   "beats LC draws", "heads shared with ALPS 10%"], rows))
    probes = list(ref["base"]["probes"])
    base_probes = ", ".join(f"{p} {ref['base']['probes'][p]:.3f}" for p in probes)
    lines += ["", f"Forgetting on `{task}` runs (Table 5): held-out loss minus the base model's "
              f"(base: {base_probes}).", ""]
    lines.append(C.markdown_table(["method", *probes], [
        [LABELS[m], *[pm(sm[m]["forgetting"][p]["values"], 1, 3) for p in probes]] for m in order]))
    lines.append("")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(result)
    tasks = [t for t in result["setup"]["tasks"] if t in summ]
    if not tasks:
        return
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7.5), squeeze=False)
    for col, task in enumerate(tasks):
        runs = result["tasks"][task].get("runs", {})
        names = [m for m in (*MAIN, *[v for v in ABLATION.values() if v != "alps_10"], "sel_weight_change", "sel_gradient")
                 if m in runs]
        base = result["tasks"][task]["references"]["base"]["test"]
        for ax, key, scale, label in ((axes[0][col], "accuracy", 100, "test EM %"),
                                      (axes[1][col], "loss", 1, "test answer loss (lower: better)")):
            for i, m in enumerate(names):
                vals = [scale * v for v in _test(runs[m], key)]
                color = "tab:red" if m.startswith("alps") else "tab:blue" if m.startswith("sel") else "tab:gray"
                ax.scatter([i] * len(vals), vals, color=color, s=12, alpha=0.7)
                ax.bar(i, sum(vals) / len(vals), color=color, alpha=0.35)
            if key == "accuracy":
                ax.axhline(scale * base[key], color="k", lw=0.8, ls="--", label="base")
            ax.set_xticks(range(len(names)), [LABELS[m] for m in names] if key == "loss" else [""] * len(names),
                          rotation=70, ha="right", fontsize=6)
            ax.set(title=task if key == "accuracy" else None, ylabel=f"{label}, dots: runs")
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


INT_FLAGS = ("steps", "batch", "train_examples", "dev_examples", "test_examples", "probe_examples", "sft_steps",
             "warmup_steps", "draws", "extra_seeds")  # Setup fields settable as --flag N


def setup_record(setup: Setup) -> dict[str, Any]:
    """``setup`` as the results JSON stores it (tuples as lists), so that a stored and a parsed setup compare."""
    return json.loads(json.dumps(asdict(setup)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama with the real tokenizer, toy budgets")
    p.add_argument("--model", help="built-in model name (peft_alps.demo.builtin_models) or a checkpoint folder")
    p.add_argument("--real", action="store_true", help="with --quick: the real model instead of the tiny one")
    for name in INT_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", help=f"only these rows, seed by seed (a reduced run); from {list(LABELS)}")
    p.add_argument("--no-tune", dest="tune", action="store_false", help="fixed learning rates (Setup.fixed_lr)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--deadline", help="stop starting runs after this UTC time (HH:MM); the report is then partial")
    p.add_argument("--out", type=Path, default=C.RESULTS)
    p.add_argument("--stem")
    p.add_argument("--render", type=Path, help="only re-render the Markdown/PNG from this results JSON")
    p.add_argument("--resume", type=Path, help="go on with this results JSON (same settings): finished runs and tuned "
                   "rates are kept, the rest run; the output is rewritten in place")
    args = p.parse_args(argv)
    values = asdict(Setup())
    if args.quick:
        values.update(QUICK)
        if args.real:
            values.update(tiny=False, model="smollm2-135m")
    if args.model:
        values["model"] = args.model
    for name in (*INT_FLAGS, "tasks", "seeds", "methods"):
        if getattr(args, name) is not None:
            values[name] = tuple(getattr(args, name)) if name in ("tasks", "seeds", "methods") else getattr(args, name)
    if not args.tune:
        values["tune"] = False
    for name in ("tasks", "seeds", "transfer", "methods"):
        values[name] = tuple(values[name])
    unknown = [m for m in values["methods"] if m not in LABELS or m.startswith("transfer_")]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {[m for m in LABELS if not m.startswith('transfer_')]}")
    args.setup = Setup(**values)
    args.stem = args.stem or ("reproduce_real_quick" if args.quick else "reproduce_smollm2")
    args.previous = resume_json(p, args)  # with --resume: the results JSON to go on with
    args.deadline = _deadline(args.deadline)
    return args


def resume_json(p: argparse.ArgumentParser, args: argparse.Namespace,
                may_differ: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """With ``--resume``: the stored results, once their settings are checked equal to ``args.setup`` (a parse
    error naming the fields that differ, otherwise; ``may_differ``: fields that are a segment's own, such as its
    precision, which the caller records per run); the outputs are then rewritten in place."""
    if not args.resume:
        return None
    if not args.resume.is_file():
        p.error(f"--resume {args.resume}: no such results JSON")
    previous = json.loads(args.resume.read_text())
    old, new = previous.get("setup", {}), setup_record(args.setup)
    differ = sorted(k for k in new if old.get(k) != new[k] and k not in may_differ)
    if differ:
        p.error(f"--resume {args.resume}: its settings differ in {differ} (JSON {[old.get(k) for k in differ]} vs "
                f"now {[new[k] for k in differ]}); pass the same flags as the run that wrote it")
    args.out, args.stem = args.resume.parent, args.resume.stem
    return previous


def rerender(path: Path, render: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> dict[str, Any]:
    """``--render``: the Markdown and the plot again from a results JSON, nothing run."""
    result = json.loads(path.read_text())
    C.write_outputs(path.parent, path.stem, result, render(result))
    plot(result, path.with_suffix(".png"))
    return result


def _deadline(text: str | None) -> float | None:
    if not text:
        return None
    import datetime as dt

    hh, mm = map(int, text.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if when < now:
        when += dt.timedelta(days=1)
    return when.timestamp()


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        return rerender(args.render, render, plot)
    C.quiet_transformers()
    torch.set_num_threads(args.threads)
    env = C.environment()
    setup = args.setup
    folder = model_folder("smollm2-135m" if setup.tiny else setup.model)
    base, tokenizer, base_folder = load_base(setup, folder)
    PAD[0] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if args.previous is not None:
        result = args.previous
        result.setdefault("resumed", []).append({"utc": env["utc"], "command": env["command"],
                                                 "after_s": result.get("elapsed_s", 0.0)})
        env = result["env"]
    else:
        result = {"model_name": "tiny random Llama (SmolLM2 tokenizer)" if setup.tiny else setup.model,
                  "setup": setup_record(setup), "env": env, "lr": {}, "tuning": {}, "tasks": {},
                  "base_params": sum(p.numel() for p in base.parameters())}
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(setup, args, base, tokenizer, base_folder, result)
    runner.execute()
    result["env"] = C.finish_environment(env)
    runner.save()
    plot(result, args.out / f"{args.stem}.png")
    print(render(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
