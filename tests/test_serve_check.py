"""The optional llama.cpp serving check (benchmarks/serve_check.py): it skips cleanly, naming what is missing.

The check itself needs llama.cpp's converters and llama-cpp-python, which CI does not install; its results are in
benchmarks/results/serve_check.md.
"""

import json
import sys
import types

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.support.benchmark_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("serve_check")


def test_without_converters_the_script_skips_and_says_how_to_get_them(bench, tmp_path):
    out = tmp_path / "r"
    assert bench.main(["--out", str(out), "--models", "tiny"]) == 0
    skipped = json.loads(out.with_suffix(".json").read_text())["skipped"]
    assert "--fetch" in skipped or "pip install llama-cpp-python" in skipped
    assert "Skipped:" in out.with_suffix(".md").read_text()


def test_missing_pieces_are_named(bench, tmp_path, monkeypatch):
    args = types.SimpleNamespace(llama_cpp=str(tmp_path), fetch=False)
    with pytest.raises(bench.Skip, match=r"has no convert_hf_to_gguf\.py, convert_lora_to_gguf\.py.*--fetch"):
        bench.converter_dir(args, types.SimpleNamespace(__version__="0"))
    monkeypatch.setattr(bench, "CONVERTER_NEEDS", ("json", "no_such_module_for_serve_check"))
    with pytest.raises(bench.Skip, match=r"need no_such_module_for_serve_check in .*requirements-convert_lora_to_gguf"):
        bench.check_converter_python(sys.executable, tmp_path)
    with pytest.raises(SystemExit):
        bench.main(["--models", "nope"])


def test_tiny_base_has_a_tokenizer_as_large_as_its_vocabulary(bench, tmp_path):
    """llama.cpp takes the vocabulary size from the token list, so it must match the embedding rows."""
    tokens = bench.save_tiny_llama(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == AutoConfig.from_pretrained(tmp_path).vocab_size == bench.TINY_VOCAB
    assert tokenizer.decode(tokenizer("héllo ALPS").input_ids, skip_special_tokens=True) == "héllo ALPS"
    assert tokens[0] == tokenizer.bos_token_id and all(3 <= t < bench.TINY_VOCAB for t in tokens[1:])


# ----------------------------------------------------------------------------- SGLang's loader functions


def fake_sglang_wheel(folder, normalize_source):
    """A wheel-shaped zip with the three functions, written here to mirror SGLang's contract (not its code)."""
    import zipfile

    path = folder / "sglang-0.0.0-py3-none-any.whl"
    utils = (
        "def get_normalized_target_modules(target_modules):\n"
        "    names = [m.rsplit('.', 1)[-1] for m in target_modules]\n"
        "    return {'qkv_proj' if m in ('q_proj', 'k_proj', 'v_proj') else m for m in names}\n"
        "def get_target_module_name(full_module_name, target_modules):\n"
        "    for t in target_modules:\n"
        "        if t in full_module_name:\n"
        "            return t\n"
        "    raise ValueError(f'Cannot find target module name for {full_module_name}')\n"
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sglang/srt/lora/lora.py", f"class LoRAAdapter:\n{normalize_source}")
        z.writestr("sglang/srt/lora/utils.py", utils)
    return path


NORMALIZE = (
    "    def normalize_qkv_proj(self, weight_names, weights):\n"
    "        for name in weight_names:\n"
    "            if 'q_proj' in name:\n"
    "                weights[name.replace('q_proj', 'qkv_proj')] = torch.cat([weights.pop(name),\n"
    "                    weights.pop(name.replace('q_proj', 'k_proj')), weights.pop(name.replace('q_proj', 'v_proj'))])\n"
)


def test_sglang_check_runs_the_wheel_functions_on_both_forms(tmp_path):
    engines = load_script("serve_check_engines")
    fns = engines.sglang_functions(fake_sglang_wheel(tmp_path, NORMALIZE))
    results = {name: engines.sglang_load(fns, folder, n) for name, (folder, n) in engines.exports(tmp_path).items()}
    assert results["default (layers='all')"] == {"layers": {"loaded": 4, "zero-filled": 0}, "problems": [],
                                                 "verdict": "served as trained"}
    assert results["layers='owned'"]["layers"] == {"loaded": 2, "zero-filled": 2}
    refused = results["layers='owned', q/k only"]
    assert refused["verdict"] == "refused" and all("KeyError" in p and "v_proj" in p for p in refused["problems"])


def test_sglang_check_skips_without_the_wheel_and_names_a_changed_sglang(tmp_path, monkeypatch):
    engines = load_script("serve_check_engines")
    monkeypatch.setenv("PEFT_ALPS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r"
    assert engines.main(["--out", str(out)]) == 0
    assert "--fetch" in json.loads(out.with_suffix(".json").read_text())["skipped"]
    with pytest.raises(engines.Skip, match="has no function 'normalize_qkv_proj': SGLang changed"):
        engines.sglang_functions(fake_sglang_wheel(tmp_path, "    def other(self):\n        pass\n"))
