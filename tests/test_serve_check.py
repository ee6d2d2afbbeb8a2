"""The optional llama.cpp serving check (benchmarks/serve_check.py): it skips cleanly, naming what is missing.

The check itself needs llama.cpp's converters and llama-cpp-python, which CI does not install; its results are in
benchmarks/results/serve_check.md.
"""

import json
import sys
import types

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.benchmark_scripts import load_script


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
