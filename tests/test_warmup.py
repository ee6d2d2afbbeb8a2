"""Attention warm-up: only attention tensors train and are saved, the base stays untouched, bad data is named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from peft_alps.demo import synthetic
from peft_alps.warmup.data import ALPACA_PROMPT, DataError, alpaca_prompt, load_jsonl_dataset
from peft_alps.warmup.train import WarmupCheckpoint, warmup
from transformers import AutoModelForCausalLM

from tests.support.tiny_models import VOCAB, llama_config, tiny_llama, tiny_qwen2

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def token_data(n=12, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def expected_attention_names(model, projections=ATTN, params=("weight",)):
    """Written independently of the registry: every layer's self_attn projections."""
    n = model.config.num_hidden_layers
    return {f"model.layers.{i}.self_attn.{p}.{w}" for i in range(n) for p in projections for w in params}


def test_only_attention_tensors_change_and_are_saved(tmp_path):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}

    result = warmup(model, token_data(), steps=3, lr=1e-2, batch_size=4, progress=False, output_dir=tmp_path)

    # the checkpoint holds exactly the attention weights, and every one of them moved
    assert set(result.tensors) == expected_attention_names(model)
    for name, tensor in result.tensors.items():
        assert tensor.shape == before[name].shape
        assert not torch.equal(tensor, before[name]), name
    # the model handed in is bitwise what it was, flags and mode included
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not model.training
    assert not any(hasattr(m, "parametrizations") for m in model.modules())

    # on disk: config.json + safetensors with only those names + metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "warmup.json"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_attention_names(model)
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), result.tensors[name])
    meta = json.loads((tmp_path / "warmup.json").read_text())
    assert meta["steps"] == 3 and meta["checkpoint_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    loaded = WarmupCheckpoint.load(tmp_path)
    assert set(loaded.tensors) == set(result.tensors)


def test_rest_of_the_network_is_frozen_during_training():
    """Apply the warm-up tensors to a copy of the base: non-attention outputs of the copy's weights are the base's,
    and a forward pass of the patched model differs from the base (the attention change is real)."""
    model = tiny_llama(layers=2)
    result = warmup(model, token_data(), steps=2, lr=1e-2, batch_size=4, progress=False)
    patched = copy.deepcopy(model)
    missing, unexpected = patched.load_state_dict(result.tensors, strict=False)
    assert not unexpected
    assert set(missing) == set(model.state_dict()) - set(result.tensors)
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(patched(x).logits, model(x).logits)


@pytest.mark.parametrize("checkpointing, in_place, optimizer",
                         [(False, False, "adamw"), (True, True, "adamw"), (False, False, "adafactor"),
                          (True, True, "adafactor")])
def test_fused_step_matches_a_plain_loop(checkpointing, in_place, optimizer):
    """Oracle: a textbook loop (attention weights trainable, torch AdamW or transformers' Adafactor with a fixed
    lr and no first moment, constant lr, same batch)."""
    from transformers.optimization import Adafactor

    data = token_data(n=4)
    model = tiny_llama(layers=2)
    result = warmup(
        model, data, steps=2, lr=5e-3, batch_size=4, warmup_ratio=0.0, min_lr_ratio=1.0, optimizer=optimizer,
        gradient_checkpointing=checkpointing, in_place=in_place, progress=False,
    )
    if in_place:  # the model itself now holds the warmed-up weights
        state = model.state_dict()
        assert all(torch.equal(state[name], tensor) for name, tensor in result.tensors.items())

    reference = tiny_llama(layers=2)
    reference.requires_grad_(False)
    params = [p for n, p in reference.named_parameters() if any(a in n for a in ATTN)]
    for p in params:
        p.requires_grad_(True)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    else:
        opt = Adafactor(params, lr=5e-3, beta1=None, scale_parameter=False, relative_step=False, warmup_init=False)
    x = torch.tensor(data)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0))  # any order: one full batch per step
    reference.train()
    for _ in range(2):
        reference(input_ids=x[order], labels=x[order]).loss.backward()
        opt.step()
        opt.zero_grad()
    ref = reference.state_dict()
    for name, tensor in result.tensors.items():
        torch.testing.assert_close(tensor, ref[name], rtol=1e-5, atol=1e-6)


def test_qwen2_biases_and_projection_subset():
    model = tiny_qwen2()
    result = warmup(model, token_data(), steps=2, lr=1e-2, projections=("q", "k", "v"), progress=False)
    names = expected_attention_names(model, ("q_proj", "k_proj", "v_proj"), ("weight", "bias"))
    assert set(result.tensors) == names


def test_bf16_base_keeps_small_updates_in_float32():
    model = tiny_llama(layers=1).to(torch.bfloat16)
    result = warmup(model, token_data(), steps=2, lr=1e-4, batch_size=4, progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert result.tensors[name].dtype == torch.float32
    delta = result.tensors[name] - model.state_dict()[name].float()
    assert delta.abs().max() > 0  # an lr-1e-4 step is below bf16 resolution; the float32 delta keeps it
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_budget_fraction_and_steps():
    data = token_data(n=40)
    model = tiny_llama(layers=1)
    r = warmup(model, data, fraction=0.1, batch_size=3, progress=False)
    assert r.metadata["examples_seen"] == 4 and r.metadata["steps"] == 2  # ceil(0.1 * 40) = 4 -> batches 3 + 1
    r = warmup(model, data, steps=5, batch_size=3, progress=False)
    assert r.metadata["steps"] == 5 and r.metadata["examples_seen"] == 15
    assert len(r.metadata["losses"]) == 5


def test_synthetic_examples_train_on_the_answer():
    config = llama_config(layers=1)
    config.vocab_size = synthetic.VOCAB_SIZE
    model = AutoModelForCausalLM.from_config(config)
    examples = synthetic.make_examples("reverse", 16, seed=0)
    r = warmup(model, examples, steps=2, batch_size=8, lr=1e-2, progress=False)
    assert r.metadata["num_examples"] == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 2, "fraction": 0.5}, "either steps or fraction"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\], got 1.5"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"projections": ("q", "x")}, "subset of"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        warmup(tiny_llama(layers=1), token_data(n=2), progress=False, **kwargs)


def test_too_long_sequence_needs_truncate():
    model = tiny_llama(layers=1)  # max_position_embeddings = 128
    data = token_data(n=2, length=10) + [list(range(4, 4 + 90)) * 2]
    with pytest.raises(DataError, match=r"train_dataset\[2\]: sequence of 180 tokens .* limit of 128 .*truncate"):
        warmup(model, data, steps=1, progress=False)
    r = warmup(model, data, steps=1, truncate=True, progress=False)
    assert r.metadata["steps"] == 1


# ----------------------------------------------------------------------------------------------- JSONL data


class CharTokenizer:
    """Minimal stand-in with the tokenizer call signature: one token per character."""

    eos_token_id = 3

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [4 + ord(c) % 90 for c in text]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_alpaca_records_use_the_template_and_learn_only_the_response(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Add", "input": "2 3", "output": "5"}),
        json.dumps({"instruction": "Say hi", "output": "hi"}),
        "",
        json.dumps({"text": "plain"}),
    ])
    tok = CharTokenizer()
    data = load_jsonl_dataset(f, tok)
    assert len(data) == 3
    prompt = ALPACA_PROMPT.format(instruction="Add", input="2 3")
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert "### Input:\n2 3" in prompt and "### Input" not in alpaca_prompt("Say hi")
    n_prompt = 1 + len(prompt)
    assert data[0]["input_ids"] == tok(prompt)["input_ids"] + tok("5", add_special_tokens=False)["input_ids"] + [3]
    assert data[0]["labels"][:n_prompt] == [-100] * n_prompt
    assert data[0]["labels"][n_prompt:] == data[0]["input_ids"][n_prompt:]
    assert data[2]["labels"] == data[2]["input_ids"]  # plain text: loss on everything


@pytest.mark.parametrize(
    "lines, match",
    [
        ([json.dumps({"text": "ok"}), json.dumps({"instruction": "x", "input": ""})], r"d.jsonl:2: missing field 'output'"),
        ([json.dumps({"prompt": "x"})], r"d.jsonl:1: no usable field; expected \{\"text\""),
        ([json.dumps({"text": "ok"}), "", '{"text": "unterminated'], r"d.jsonl:3: invalid JSON"),
        (["[1, 2]"], r"d.jsonl:1: expected a JSON object, got list"),
        ([json.dumps({"text": 5})], r"d.jsonl:1: field 'text' must be a string, got int"),
        ([], r"d.jsonl: the file contains no records"),
        (["", "  "], r"d.jsonl: the file contains no records"),
        ([json.dumps({"text": "x" * 50})], r"d.jsonl:1: sequence of 52 tokens is longer than the model's limit of 20"),
    ],
)
def test_bad_jsonl_names_the_line_and_the_fields(tmp_path, lines, match):
    f = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=match):
        load_jsonl_dataset(f, CharTokenizer(), max_length=20)


def test_truncate_and_missing_tokenizer(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "x" * 50})])
    assert len(load_jsonl_dataset(f, CharTokenizer(), max_length=20, truncate=True)[0]["input_ids"]) == 20
    with pytest.raises(DataError, match=r"d.jsonl:1: this record holds text, but no tokenizer"):
        load_jsonl_dataset(f, None)
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl_dataset(tmp_path / "nope.jsonl", None)
    g = write_lines(tmp_path / "ids.jsonl", [json.dumps({"input_ids": [1, 5, 6, 3]})])
    assert load_jsonl_dataset(g, None) == [{"input_ids": [1, 5, 6, 3], "labels": [1, 5, 6, 3]}]


# ----------------------------------------------------------------------------------------------- command line


def word_tokenizer():
    """A tiny offline WordLevel tokenizer (vocabulary fits the tiny models' 97 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "below is an instruction that describes a task write response appropriately completes the request".split()
    words += "paired with input provides further context . , : # Instruction Input Response add two numbers".split()
    words += [str(i) for i in range(20)] + "say hello hi world reverse this text".split()
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "<s>", "</s>", *dict.fromkeys(words)])}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def base_with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(layers=2).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_cli_warmup_then_localize(base_with_tokenizer, tmp_path, capsys, monkeypatch):
    from peft_alps.cli import main
    from peft_alps.scores import HeadScores
    from peft_alps.warmup.train import WarmupCheckpoint

    saves = []
    real_save = WarmupCheckpoint.save
    monkeypatch.setattr(WarmupCheckpoint, "save", lambda self, d: saves.append(d) or real_save(self, d))

    records = [{"instruction": "add two numbers", "input": f"{i} {i + 1}", "output": str(2 * i + 1)} for i in range(9)]
    records += [{"text": "say hello world"}]
    data = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "task-attn"
    assert main(["warmup", "--base", str(base_with_tokenizer), "--data", str(data), "--steps", "2",
                 "--batch-size", "4", "--lr", "1e-2", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "saved 8 attention tensors" in printed and f"--task {out}" in printed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 8 and all(".self_attn." in k for k in f.keys())
    metadata = json.loads((out / "warmup.json").read_text())
    assert metadata["optimizer"] == "adafactor" and metadata["in_place"] is True  # the low-memory defaults
    assert saves == [str(out)] and metadata["base_model"] == str(base_with_tokenizer)  # written once, base named

    heads = tmp_path / "heads.json"
    assert main(["localize", "--base", str(base_with_tokenizer), "--task", str(out), "--output", str(heads),
                 "--no-progress"]) == 0
    scores = HeadScores.load(heads)
    assert scores.scores.shape == (2, 8) and (scores.scores > 0).all()


def test_cli_bad_data_is_one_clear_error(base_with_tokenizer, tmp_path, capsys):
    from peft_alps.cli import main

    data = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "hi"}), json.dumps({"instruction": "x"})])
    code = main(["warmup", "--base", str(base_with_tokenizer), "--data", str(data), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "bad.jsonl:2: missing field 'output'" in err and '{"text": ...}' in err
    assert not (tmp_path / "o").exists()

    long = write_lines(tmp_path / "long.jsonl", [json.dumps({"text": " ".join(["hi"] * 200)})])
    args = ["warmup", "--base", str(base_with_tokenizer), "--data", str(long), "--output", str(tmp_path / "o")]
    assert main(args) == 1
    assert "long.jsonl:1: sequence of 201 tokens is longer than the model's limit of 128" in capsys.readouterr().err
    assert main([*args, "--truncate", "--steps", "1", "--no-progress"]) == 0


def test_cli_text_needs_a_tokenizer(tmp_path, capsys):
    from peft_alps.cli import main

    base = tmp_path / "base"
    tiny_llama(layers=1).save_pretrained(base)
    data = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "hi"})])
    assert main(["warmup", "--base", str(base), "--data", str(data), "--output", str(tmp_path / "o")]) == 1
    assert "d.jsonl:1: this record holds text, but no tokenizer is available" in capsys.readouterr().err
    ids = write_lines(tmp_path / "ids.jsonl", [json.dumps({"input_ids": [1, 5, 9, 3]})] * 4)
    assert main(["warmup", "--base", str(base), "--data", str(ids), "--steps", "1", "--output",
                 str(tmp_path / "o"), "--no-progress"]) == 0


def test_head_overlap_against_scipy_and_sets():
    from scipy.stats import spearmanr

    from peft_alps.scores import HeadScores
    from peft_alps.scores import head_overlap

    rng = torch.Generator().manual_seed(3)
    a = torch.rand(3, 8, generator=rng, dtype=torch.float64).numpy()
    b = a.copy()
    b[0, :4] = [0.0, 0.0, 2.0, 2.0]  # ties, and two heads pushed to the top
    dims = {"num_layers": 3, "num_heads": 8, "num_kv_heads": 2, "head_dim": 8}
    sa = HeadScores(scores=a, metric="wasserstein", variant="qkv_product", tau=1.0, base="b", task="t",
                    model_type="llama", head_dims=dims)
    sb = HeadScores(scores=b, metric="wasserstein", variant="qkv_product", tau=1.0, base="b", task="t",
                    model_type="llama", head_dims=dims)
    got = head_overlap(sa, sb, ratio=0.25)
    assert got["spearman"] == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    order_a = sorted(((a[i, j], (i, j)) for i in range(3) for j in range(8)), reverse=True)
    order_b = sorted(((b[i, j], (i, j)) for i in range(3) for j in range(8)), reverse=True)
    top_a, top_b = {p for _, p in order_a[:6]}, {p for _, p in order_b[:6]}  # ceil(0.25 * 24) = 6
    assert (got["k"], got["shared"]) == (6, len(top_a & top_b))
    assert got["jaccard"] == pytest.approx(len(top_a & top_b) / len(top_a | top_b))
    assert head_overlap(sa, sa)["jaccard"] == 1.0 and head_overlap(sa, sa)["spearman"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- benchmarks


def test_benchmark_scripts_run_in_tiny_mode(tmp_path, monkeypatch):
    """The committed benchmark scripts cannot rot: the overlap script end to end (tiny), one memory worker."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    overlap = load("warmup_overlap")
    result = overlap.main(["--tiny", "--output", str(tmp_path / "overlap")])
    summary = result["summary"]
    assert set(summary["warmup_vs_full"]) == {"warmup_adamw", "warmup_adafactor", "attn_sft"}
    for agreement in summary["warmup_vs_full"].values():
        assert set(agreement) == {"spearman", "jaccard@0.1", "jaccard@0.25", "jaccard@0.5"}
        assert all(0.0 <= agreement[f"jaccard@{r}"]["mean"] <= 1.0 for r in overlap.RATIOS)
    assert set(summary["alps"]) == {"full", "warmup_adamw", "warmup_adafactor", "attn_sft", "random"}
    assert summary["warmup_checkpoint_bytes"] < summary["full_checkpoint_bytes"]
    assert "| Spearman rank correlation of scores |" in (tmp_path / "overlap.md").read_text()
    assert overlap.chance_jaccard(1, 4) == pytest.approx(1 / 4) and overlap.chance_jaccard(4, 4) == 1.0
    setup = overlap.Setup()
    assert overlap.parse_overrides(setup, ["width=256", "seeds=0,1", "lr=0.01", "skill=copy"]) == {
        "width": 256, "seeds": (0, 1), "lr": 0.01, "skill": "copy"}
    with pytest.raises(SystemExit, match="expected FIELD=VALUE with FIELD one of width"):
        overlap.parse_overrides(setup, ["depth=3"])

    memory = load("warmup_memory")
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64, batch=2, seq=8, steps=1)
    row = memory.worker("warmup_inplace_8bit", shape, "cpu")
    assert row["trainable_params"] == 2 * (32 * 32 * 2 + 32 * 16 * 2)  # 2 layers: q, o 32x32; k, v 16x32
    assert row["optimizer_state_mib"] * 2**20 == 2 * row["trainable_params"]  # two 8-bit moments
