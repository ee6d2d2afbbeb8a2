"""Run under ``torchrun --nproc_per_node 2`` by tests/test_distributed.py (CPU, gloo). Not a test module itself.

1. DDP: the user-facing script benchmarks/accelerate/train_alps.py, i.e. transformers' Trainer under accelerate;
   every rank dumps its deltas, rank 0 saves the adapter.
2. FSDP2: torch's ``fully_shard`` on every decoder layer and the root, a few AdamW steps on this rank's half of
   each global batch, then the full state dict gathered with ``get_model_state_dict`` (what accelerate does for
   FSDP2 in ``Trainer.save_model``) and written by PEFT's ``save_pretrained``.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "accelerate"))

import train_alps  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from peft_alps import AlpsConfig  # noqa: E402
from peft_alps.demo import synthetic


def fsdp2_train(base: str, heads: dict, out: str, steps: int, global_batch: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), AlpsConfig(target_heads=heads))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(type(p).__name__ == "DTensor" for p in trainable), "fully_shard did not shard the deltas"
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    examples = synthetic.make_examples("arithmetic", steps * global_batch, seed=0)
    per_rank = global_batch // world
    for step in range(steps):
        batch = examples[step * global_batch : (step + 1) * global_batch][rank * per_rank : (rank + 1) * per_rank]
        model(**synthetic.collate(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
    dist.barrier()


def main() -> None:
    base, heads, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    train_alps.main(
        ["--base", base, "--heads", heads, "--output", str(out / "ddp"), "--max-steps", "4", "--batch-size", "4",
         "--lr", "1e-2", "--examples", "32", "--cpu", "--dump-deltas"]
    )
    fsdp2_train(base, json.loads(heads), str(out / "fsdp2"), steps=3, global_batch=4)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
