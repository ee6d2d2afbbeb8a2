"""Scale-out: 2-process DDP (Trainer under accelerate) and FSDP2 (torch ``fully_shard``) on the CPU with gloo give
the adapter a single process gives for the same global batch; the DeepSpeed / FSDP / DDP launch configs are valid."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_alps import AlpsConfig
from peft_alps.demo import synthetic
from tests.support.tiny_models import llama_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "accelerate"
HEADS = {"1": [0, 5], "2": [3]}
sys.path.insert(0, str(CONFIGS))
import train_alps  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = llama_config(layers=3)
    config.vocab_size = synthetic.VOCAB_SIZE
    path = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_processes(base_dir, tmp_path_factory):
    """One torchrun launch (2 CPU processes, gloo) runs both the DDP and the FSDP2 part of distributed_worker.py."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "support" / "distributed_worker.py"), str(base_dir), json.dumps(HEADS), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def alps_tensors(path):
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def assert_same_adapter(got, want, atol=1e-6):
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow
def test_ddp_ranks_hold_identical_deltas(two_processes):
    rank0 = load_file(str(two_processes / "ddp" / "rank0_deltas.safetensors"))
    rank1 = load_file(str(two_processes / "ddp" / "rank1_deltas.safetensors"))
    assert sorted(rank0) == sorted(rank1) and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # all-reduced grads: bitwise the same update
    assert all(v.abs().max() > 0 for v in rank0.values())  # they did train


@pytest.mark.slow
def test_ddp_adapter_equals_single_process(two_processes, tmp_path, base_dir):
    # Same script, same global batch of 4, one process (here, in the test process).
    train_alps.main(["--base", str(base_dir), "--heads", json.dumps(HEADS), "--output", str(tmp_path), "--max-steps",
                     "4", "--batch-size", "4", "--lr", "1e-2", "--examples", "32", "--cpu"])
    saved = sorted(os.listdir(two_processes / "ddp"))
    assert "adapter_model.safetensors" in saved and not any(f.startswith("model") for f in saved)
    assert_same_adapter(alps_tensors(two_processes / "ddp"), alps_tensors(tmp_path))


@pytest.mark.slow
def test_fsdp2_saves_the_single_process_adapter(two_processes, tmp_path, base_dir):
    # Reference: the same 3 AdamW steps on the whole global batch of 4 in one process, saved the usual way.
    torch.manual_seed(0)
    heads = {int(k): v for k, v in HEADS.items()}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), AlpsConfig(target_heads=heads))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    examples = synthetic.make_examples("arithmetic", 12, seed=0)
    for step in range(3):
        model(**synthetic.collate(examples[4 * step : 4 * step + 4])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)
    fsdp = alps_tensors(two_processes / "fsdp2")
    assert all(re.search(r"\.alps_(delta|bias)$", k) for k in fsdp)  # gathered full tensors, adapter only
    assert_same_adapter(fsdp, alps_tensors(tmp_path))


def test_zero3_style_state_dict_saves_the_adapter(tmp_path):
    # Under ZeRO-3 Trainer.save_model hands PEFT the gathered trainable parameters only
    # (_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)); that must give the normal adapter file.
    base = AutoModelForCausalLM.from_config(llama_config(layers=3))
    model = get_peft_model(base, AlpsConfig(target_heads={1: [2], 2: [0, 7]}, init_weights=False))
    model.save_pretrained(tmp_path / "plain")
    gathered = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path / "zero3", state_dict=gathered)
    assert_same_adapter(alps_tensors(tmp_path / "zero3"), alps_tensors(tmp_path / "plain"), atol=0)


def readme_config_files():
    section = (ROOT / "docs" / "training.md").read_text().split("## Multi-GPU training", 1)[1].split("\n## ", 1)[0]
    return sorted(set(re.findall(r"--config_file (\S+)", section)))


def test_readme_launch_commands_use_valid_accelerate_configs():
    files = readme_config_files()
    assert {Path(f).name for f in files} >= {"ddp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}
    kinds = {}
    for f in files:
        config = load_config_from_file(str(ROOT / f))  # accelerate rejects unknown keys
        kinds[Path(f).name] = config
    assert kinds["ddp.yaml"].distributed_type == "MULTI_GPU"
    fsdp = kinds["fsdp2.yaml"]
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model gathers the shards
    zero2, zero3 = kinds["deepspeed_zero2.yaml"].deepspeed_config, kinds["deepspeed_zero3.yaml"].deepspeed_config
    assert zero2["zero_stage"] == 2
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True  # gather delta shards on save


def test_training_script_takes_heads_from_localization_scores(base_dir, tmp_path):
    import numpy as np

    from peft_alps import HeadScores

    scores = np.zeros((3, 8))
    scores[2, 6], scores[0, 1], scores[1, 3] = 3.0, 2.0, 1.0  # top 3 of 24 heads = ratio 0.125
    HeadScores(scores=scores, model_type="llama",
               head_dims={"num_layers": 3, "num_heads": 8, "num_kv_heads": 2, "head_dim": 8}).save(tmp_path / "heads.json")
    train_alps.main(["--base", str(base_dir), "--scores", str(tmp_path / "heads.json"), "--ratio", "0.125",
                     "--output", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--examples", "4",
                     "--cpu"])
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["target_heads"] == {"0": [1], "1": [3], "2": [6]}
