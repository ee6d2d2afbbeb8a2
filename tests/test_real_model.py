"""The real-model tier (``pytest -m real``): SmolLM2-135M-Instruct materialized by peft_alps.demo.builtin_models."""

import json
import zipfile

import pytest
import torch

pytestmark = pytest.mark.real


def test_materialized_folder_is_an_ordinary_checkpoint(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_alps.demo import builtin_models as models

    names = {p.name for p in smollm2_folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", models.MARKER} <= names
    assert not any(p.name.startswith(".") for p in smollm2_folder.parent.iterdir() if p.is_dir())  # no staging left
    provenance = json.loads((smollm2_folder / models.MARKER).read_text())
    entry = models.MODELS["smollm2-135m"]
    assert provenance["wheel_sha256"] == entry.sha256 and provenance["licence"] == "Apache-2.0"
    with zipfile.ZipFile(models.wheel_path("smollm2-135m")) as wheel:  # the cached, verified wheel file
        assert provenance["source_bytes"] == wheel.getinfo(entry.member).file_size
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (30, 9, 3, 64)
    assert models.load("smollm2-135m") == smollm2_folder  # cached

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


# ----------------------------------------------------------------------------------------------- helpers

HEADS = {2: [0, 4], 17: [8], 29: [3]}  # query heads; SmolLM2 groups 3 query heads per KV head
D, GROUP = 64, 3


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="module")
def _base(smollm2_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()


@pytest.fixture
def base(_base):
    """A fresh copy of the real model for each test (loading it once per module)."""
    import copy

    return copy.deepcopy(_base)


@pytest.fixture(scope="module")
def date_batch(tokenizer):
    from peft_alps.demo import date_task

    examples = date_task.encode(tokenizer, date_task.make_examples(4, seed=7))
    return date_task.collate(examples, tokenizer.pad_token_id)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def selected_rows(proj, heads):
    """Independently written: rows (q/k/v, [out, in]) or columns (o) that the selected heads of one layer own."""
    own = heads if proj in ("q_proj", "o_proj") else sorted({h // GROUP for h in heads})
    return sorted(i for h in own for i in range(h * D, (h + 1) * D))


def run_python(script, *args, env_drop=()):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# ----------------------------------------------------------------------------------------------- adapter


def test_identity_at_init_and_training_lowers_the_loss(base, date_batch):
    from peft import get_peft_model

    from peft_alps import AlpsConfig

    reference = logits(base, date_batch)
    model = get_peft_model(base, AlpsConfig(target_heads=HEADS))
    assert torch.equal(logits(model, date_batch), reference)  # zero deltas: exactly the base model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**date_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(**date_batch).loss.item()
    assert final < losses[0] - 0.05, (losses, final)


def test_merge_equals_unmerged_and_changes_only_the_selected_slices(base, date_batch):
    from peft import get_peft_model

    from peft_alps import AlpsConfig

    before = {n: p.detach().clone() for n, p in base.named_parameters() if "self_attn" in n}
    model = get_peft_model(base, AlpsConfig(target_heads=HEADS, init_weights=False))
    adapted = logits(model, date_batch)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, date_batch), adapted, rtol=1e-4, atol=1e-4)
    for name, p in merged.named_parameters():
        if "self_attn" not in name:
            continue
        layer, proj = int(name.split(".")[2]), name.split(".")[4]
        changed = (p != before[name])
        changed = changed.any(dim=0) if proj == "o_proj" else changed.any(dim=1)
        expected = torch.zeros_like(changed)
        if layer in HEADS:
            expected[selected_rows(proj, HEADS[layer])] = True
        assert torch.equal(changed, expected), name


def test_exact_lora_export_reloads_in_plain_peft(base, date_batch, smollm2_folder, tmp_path):
    from peft import get_peft_model

    from peft_alps import AlpsConfig, export_to_lora

    model = get_peft_model(base, AlpsConfig(target_heads=HEADS, init_weights=False))
    export_to_lora(model, tmp_path / "lora")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:  # every layer, not only HEADS'
        assert len(f.keys()) == 30 * 4 * 2
    torch.save(date_batch["input_ids"], tmp_path / "ids.pt")
    script = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
folder, lora, ids, out = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), lora).eval()
with torch.no_grad():
    torch.save(model(torch.load(ids)).logits, out)
assert not any(name.split(".")[0] == "peft_alps" for name in sys.modules), "peft_alps was imported"
print(type(model.peft_config["default"]).__name__)
"""
    printed = run_python(script, smollm2_folder, tmp_path / "lora", tmp_path / "ids.pt", tmp_path / "out.pt")
    assert printed.strip() == "LoraConfig"
    expected = logits(model, {"input_ids": date_batch["input_ids"], "attention_mask": None})
    with model.disable_adapter():
        assert not torch.allclose(logits(model, {"input_ids": date_batch["input_ids"], "attention_mask": None}),
                                  expected, atol=1e-3)  # the adapter matters, so matching it means something
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- localization


def test_localization_ranks_planted_heads_first_on_the_real_checkpoint(smollm2_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from peft_alps import localize_heads

    tensors = load_file(smollm2_folder / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    planted = [(3, 2), (17, 5), (28, 7)]
    for name, w in tensors.items():  # every attention weight moves a little ...
        if "self_attn" in name:
            w += 1e-3 * w.std() * torch.randn(w.shape, generator=generator)
    for layer, head in planted:  # ... and three heads a lot
        w = tensors[f"model.layers.{layer}.self_attn.q_proj.weight"]
        w[head * D : (head + 1) * D] += 0.5 * w.std() * torch.randn(D, w.shape[1], generator=generator)
    task = tmp_path / "task"
    task.mkdir()
    save_file(tensors, str(task / "model.safetensors"), {"format": "pt"})
    shutil.copy(smollm2_folder / "config.json", task / "config.json")
    del tensors
    scores = localize_heads(smollm2_folder, task, progress=False)
    assert scores.shape == (30, 9)
    assert set(scores.ranking()[:3]) == set(planted)


# ----------------------------------------------------------------------------------------------- QLoRA


def test_qlora_on_a_4bit_load_of_the_real_model(smollm2_folder, date_batch):
    import warnings

    bnb = pytest.importorskip("bitsandbytes")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_alps import AlpsConfig, AlpsLayer

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder, quantization_config=quant)
        model = get_peft_model(model, AlpsConfig(target_heads=HEADS))
        q = model.get_base_model().model.layers[2].self_attn.q_proj
        assert isinstance(q, AlpsLayer) and isinstance(q.base_layer, bnb.nn.Linear4bit)
        with model.disable_adapter():
            reference = logits(model, date_batch)
        assert torch.equal(logits(model, date_batch), reference)  # identity at init on the 4-bit base
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=3e-4)
        model.train()
        first = model(**date_batch).loss
        first.backward()
        optimizer.step()
        optimizer.zero_grad()
        for _ in range(2):
            model(**date_batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            final = model(**date_batch).loss.item()
    assert final < first.item() - 0.05
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), f"{name} changed"  # the 4-bit base bytes stay as they were


# ----------------------------------------------------------------------------------------------- demo


def test_quick_demo_adapter_loads_offline_with_autopeftmodel(tmp_path, smollm2_folder, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_alps.demo import date_task
    from peft_alps.cli import main

    out = tmp_path / "alps-demo"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in summary["results"]]
    assert names[:4] == ["base model (before)", "warm-up task model (all attention)", "ALPS, top heads",
                         "ALPS, random heads"] and names[4].startswith("LoRA r=")
    alps, lora = summary["results"][2], summary["results"][4]
    assert abs(lora["trainable_params"] / alps["trainable_params"] - 1) < 0.05  # equal parameters, nearest rank
    assert sum(map(len, summary["selected_heads"].values())) == 27  # 10% of 270
    config = json.loads((out / "alps-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_folder.resolve())

    batch = date_task.collate(date_task.encode(tokenizer, date_task.make_examples(2, seed=3)), tokenizer.pad_token_id)
    torch.save(batch["input_ids"], tmp_path / "ids.pt")
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_folder),
                                                out / "alps-adapter"), {"input_ids": batch["input_ids"],
                                                                        "attention_mask": None})
    script = """
import sys, torch
import peft_alps
from peft import AutoPeftModelForCausalLM
ids, out = sys.argv[1:]
model = AutoPeftModelForCausalLM.from_pretrained("alps-demo/alps-adapter").eval()
with torch.no_grad():
    torch.save(model(torch.load(ids)).logits, out)
"""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the relative path of the issue: "alps-demo/alps-adapter"
    try:
        run_python(script, tmp_path / "ids.pt", tmp_path / "out.pt")
    finally:
        os.chdir(cwd)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-5)
