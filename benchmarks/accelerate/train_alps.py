"""Train an ALPS adapter with transformers' Trainer on one process or many (DDP, FSDP, DeepSpeed via accelerate).

The same script runs everywhere; how it scales out is decided by the launcher:

    python benchmarks/accelerate/train_alps.py --base BASE --heads '{"2": [0, 5]}' --output out          # 1 process
    torchrun --nproc_per_node 2 benchmarks/accelerate/train_alps.py --cpu ...                          # 2-process DDP on CPU (gloo)
    accelerate launch --config_file benchmarks/accelerate/ddp.yaml benchmarks/accelerate/train_alps.py ...   # DDP on GPUs
    accelerate launch --config_file benchmarks/accelerate/fsdp2.yaml benchmarks/accelerate/train_alps.py ...
    accelerate launch --config_file benchmarks/accelerate/deepspeed_zero3.yaml benchmarks/accelerate/train_alps.py ...

Data: the built-in synthetic arithmetic task (peft_alps.demo.synthetic), so the script needs no download. BASE is a
transformers causal LM directory (or hub id) with vocab_size >= peft_alps.demo.synthetic.VOCAB_SIZE; heads come from
``--heads`` (``{layer: [heads]}`` as JSON, inline or a file) or from head scores (``--scores heads.json --ratio 0.1``,
as written by ``peft-alps localize``). ``--batch-size`` is the *global* batch: it is split
over the processes, so a 2-process run and a 1-process run see the same samples per step.

Saving goes through ``Trainer.save_model``, which gathers sharded parameters (FSDP full state dict, DeepSpeed
ZeRO-3 ``stage3_gather_16bit_weights_on_model_save``) before PEFT writes the adapter: the output directory holds
``adapter_config.json`` and ``adapter_model.safetensors`` (plus Trainer's ``training_args.bin`` and a model card),
no base weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from peft_alps import AlpsConfig
from peft_alps.demo import synthetic


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="transformers causal-LM directory or hub id")
    heads = p.add_mutually_exclusive_group(required=True)
    heads.add_argument("--heads", help='heads to train as JSON {"layer": [heads]}, inline or a file')
    heads.add_argument("--scores", help="head scores JSON from `peft-alps localize`; with --ratio")
    p.add_argument("--ratio", type=float, default=0.1, help="with --scores: fraction of all heads to train")
    p.add_argument("--output", required=True, help="where the adapter is saved")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=2000, help="number of synthetic training examples")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (gloo when distributed)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dump-deltas", action="store_true", help="also save each rank's deltas (for the DDP test)")
    return p.parse_args(argv)


def load_heads(spec: str) -> dict:
    return json.loads(Path(spec).read_text() if os.path.isfile(spec) else spec)


def main(argv=None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.heads is not None:
        config = AlpsConfig(target_heads=load_heads(args.heads))
    else:
        config = AlpsConfig(head_scores=args.scores, ratio=args.ratio)
    model = get_peft_model(model, config)

    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size // world,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        weight_decay=0.1,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        use_cpu=args.cpu,
        seed=args.seed,
        save_strategy="no",
        logging_steps=max(1, args.max_steps // 10),
        report_to=[],
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    train = synthetic.make_examples("arithmetic", args.examples, seed=args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=synthetic.collate)
    trainer.train()
    trainer.save_model(args.output)  # gathers shards; writes only the adapter

    if args.dump_deltas:
        from safetensors.torch import save_file

        deltas = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(deltas, os.path.join(args.output, f"rank{trainer.args.process_index}_deltas.safetensors"))


if __name__ == "__main__":
    main()
