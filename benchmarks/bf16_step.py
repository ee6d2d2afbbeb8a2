"""bf16 autocast against float32: the training step of each arm of ``reproduce_converged``, interleaved.

On SmolLM2-135M-Instruct (the real model of ``reproduce_converged``), with its batches (8 examples of its tune task,
its chat template) and its training step (``reproduce_real.train``: AdamW, clip 1.0), each arm trains a few steps
in float32 and under bf16 autocast (float32 weights and optimizer). Methods and precisions take turns in one
process, the order rotating every round (``benchmarks._common.interleaved``); reported are the median step time
per arm and precision and the median per-round fp32 / bf16 ratio. Whether the *losses* agree is checked inside
``reproduce_converged`` itself (its bf16 check), at the design's budget.

Also the memory each arm needs beyond the frozen base (the paper recipe against full fine-tuning and the heads-only
adapter): the parameters it adds, and the peak of live tensors over two float32 steps.

    python -m benchmarks.bf16_step                # -> results/bf16_step.{json,md}
    python -m benchmarks.bf16_step --quick        # tiny model (tests)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import _common as C
from benchmarks import reproduce_converged as RC
from benchmarks import reproduce_real as R
from peft_alps.demo.resources import trainable_parameters

ARMS = ("h_alps", "h_lora", "p_alps", "p_full")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 1 round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="training steps per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=C.RESULTS / "bf16_step")
    args = p.parse_args(argv)
    C.quiet_transformers()
    torch.set_num_threads(args.threads)
    env = C.environment()
    setup = RC.Setup(**(RC.QUICK if args.quick else {}))
    base, tokenizer, folder = R.load_base(R.Setup(tiny=setup.tiny), R.model_folder("smollm2-135m"))
    R.PAD[0] = tokenizer.pad_token_id
    task = RC.TaskState(setup.tune_task, setup, tokenizer, [])
    from peft_alps import HeadScores

    # timing only: any 10% of the heads (drawn once) stands in for the selection
    shape = (base.config.num_hidden_layers, base.config.num_attention_heads)
    task.pad = HeadScores(scores=np.random.default_rng(0).random(shape), metric="random")
    task.alps = task.pad.top_k(setup.ratio)
    task.ranks = {"h_lora": 32, "p_lora": setup.paper_lora_rank}
    models = {arm: RC.build(arm, base, task, seed=0) for arm in ARMS}
    memory = {arm: _training_memory(model, base, lambda m=model: R.train(m, task.train, setup, 1e-5, 0, steps=2))
              for arm, model in models.items()}
    actions = {f"{arm} {prec}": (lambda m=model, b=(prec == "bf16"): R.train(m, task.train, setup, 1e-5, 0,
                                                                            steps=args.steps, bf16=b))
               for arm, model in models.items() for prec in ("fp32", "bf16")}
    times = C.interleaved(actions, rounds=1 if args.quick else args.rounds)
    rows = {arm: {"fp32_s": C.median(times[f"{arm} fp32"]) / args.steps,
                  "bf16_s": C.median(times[f"{arm} bf16"]) / args.steps,
                  "fp32_over_bf16": C.paired_ratio(times, f"{arm} fp32", f"{arm} bf16"),
                  "trainable_params": trainable_parameters(models[arm]), **memory[arm]} for arm in ARMS}
    result = {"model": "tiny" if setup.tiny else "smollm2-135m", "batch": setup.batch, "steps": args.steps,
              "rounds": 1 if args.quick else args.rounds, "arms": rows, "env": C.finish_environment(env)}
    C.write_outputs(args.out.parent, args.out.name, result, render(result))
    print(render(result))
    return result


def _training_memory(model, base, run) -> dict[str, int]:
    """Memory an arm needs beyond the frozen base, measured: the parameters it adds to the model (adapter deltas,
    ``modules_to_save`` copies; 0 for plain fine-tuning, which trains the base's own tensors), and the peak of live
    tensors during two float32 training steps (activations, gradients, AdamW's moments; PyTorch's allocator
    events, ``benchmarks._common.peak_allocation_during``)."""
    added = C.tensor_bytes(model.parameters()) - C.tensor_bytes(base.parameters())
    return {"added_param_bytes": added, "train_peak_bytes": C.peak_allocation_during(run)}


def render(result: dict[str, Any]) -> str:
    rows = [[RC.METHODS[arm][2] + f" ({RC.READINGS[RC.METHODS[arm][0]].split(' (')[0]})", f"{r['trainable_params']:,}",
             f"{r['fp32_s']:.2f}", f"{r['bf16_s']:.2f}", f"{r['fp32_over_bf16']:.2f}",
             f"{C.mib(r['added_param_bytes']):.0f}", f"{C.mib(r['train_peak_bytes']):.0f}",
             f"{C.mib(r['added_param_bytes'] + r['train_peak_bytes']):.0f}"]
            for arm, r in result["arms"].items()]
    return "\n".join([
        f"# bf16 autocast vs float32 training step ({result['model']}, batch {result['batch']})", "",
        f"Median seconds per step over {result['rounds']} interleaved rounds of {result['steps']} steps; fp32/bf16: the "
        "median per-round ratio. Memory beyond the frozen base: the parameters the arm adds (adapter deltas, "
        "modules_to_save copies), and the peak of live tensors over two float32 steps (activations, gradients, "
        "AdamW moments; PyTorch allocator events).",
        "", C.markdown_table(["arm", "trainable params", "fp32 s/step", "bf16 s/step", "fp32 / bf16",
                              "added params MiB", "step peak MiB", "total extra MiB"], rows), "",
        C.produced_by(result["env"]), ""])


if __name__ == "__main__":
    main(sys.argv[1:])
