"""Safe loading: adapters and scores come only from safetensors and JSON; no pickle ever runs (issue 8)."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import load_peft_weights

from peft_alps import AlpsConfig
from tests.support.tiny_models import tiny_llama

PACKAGE = Path(__file__).resolve().parents[1] / "peft_alps"

# ----------------------------------------------------------------------------- static check of the package source

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that could unpickle: imports of pickle-like modules, ``torch.load`` (however it is
    reached) without a literal ``weights_only=True``, and ``numpy.load(allow_pickle=True)``."""
    tree = ast.parse(source, filename)
    problems = []
    torch_names = {"torch"}  # names bound to the torch module
    load_names = set()  # names bound to torch.load itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    problems.append(f"{filename}:{node.lineno} imports {alias.name}")
                if alias.name == "torch":
                    torch_names.add(alias.asname or "torch")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNSAFE_MODULES:
                problems.append(f"{filename}:{node.lineno} imports from {node.module}")
            if node.module in ("torch", "torch.serialization"):
                load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        dotted = _dotted(func)
        is_torch_load = (
            dotted is not None
            and dotted.split(".")[0] in torch_names
            and dotted.split(".")[1:] in (["load"], ["serialization", "load"])
        ) or (isinstance(func, ast.Name) and func.id in load_names)
        if is_torch_load:
            safe = any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in node.keywords
            )
            if not safe:
                problems.append(f"{filename}:{node.lineno} calls torch.load without weights_only=True")
        if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id in ("np", "numpy"):
            if any(kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False) for kw in node.keywords):
                problems.append(f"{filename}:{node.lineno} calls numpy.load with allow_pickle")
        if isinstance(func, ast.Attribute) and func.attr in ("loads", "load", "Unpickler") and isinstance(func.value, ast.Name) and func.value.id in UNSAFE_MODULES:
            problems.append(f"{filename}:{node.lineno} calls {func.value.id}.{func.attr}")
    return problems


def _dotted(node) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else ``None``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


@pytest.mark.parametrize(
    "source,flagged",
    [
        ("import torch\ntorch.load('x')", True),
        ("import torch\ntorch.load('x', weights_only=False)", True),
        ("import torch as T\nT.load('x', map_location='cpu')", True),
        ("from torch import load as L\nL('x')", True),
        ("import torch\ntorch.serialization.load('x')", True),
        ("from torch.serialization import load\nload('x')", True),
        ("import pickle\n", True),
        ("from pickle import loads\n", True),
        ("import dill.settings\n", True),
        ("import numpy as np\nnp.load('x', allow_pickle=True)", True),
        ("import torch\nflag = True\ntorch.load('x', weights_only=flag)", True),  # must be a literal
        ("import torch\ntorch.load('x', weights_only=True)", False),
        ("import json\njson.load(open('x'))", False),
        ("from safetensors.torch import load_file\nload_file('x')", False),
    ],
)
def test_scanner_flags_what_it_should(source, flagged):
    """The scanner below is only worth something if it catches the bad forms (and lets the good ones through)."""
    assert bool(unsafe_calls(source)) is flagged, unsafe_calls(source)


def test_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 6, files  # the package really is where we think it is
    problems = [p for f in files for p in unsafe_calls(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- a malicious adapter_model.bin


class _Planted:
    """Unpickling this object creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def malicious_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1]}))
    model.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    os.remove(adapter / "adapter_model.safetensors")
    marker = tmp_path / "code-ran"
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.model.layers.0.self_attn.q_proj.alps_delta": _Planted(str(marker))}, f)
    return adapter, marker


def test_the_planted_pickle_really_runs_code_when_unpickled(malicious_adapter):
    """Control: the file is truly malicious (so the next tests could fail)."""
    adapter, marker = malicious_adapter
    code = f"import pickle; pickle.load(open({str(adapter / 'adapter_model.bin')!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert marker.exists()


def test_alps_refuses_pickle_adapter_without_opening_it(malicious_adapter):
    adapter, marker = malicious_adapter
    base = tiny_llama()
    with pytest.raises(OSError, match=r"loaded only from safetensors.*adapter_model\.bin is never read"):
        PeftModel.from_pretrained(base, adapter)
    assert not marker.exists()


def test_alps_refuses_pickle_adapter_through_load_adapter_too(malicious_adapter, tmp_path):
    adapter, marker = malicious_adapter
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads={1: [0]}))
    with pytest.raises(OSError, match=r"loaded only from safetensors"):
        model.load_adapter(adapter, adapter_name="evil")
    assert not marker.exists()
    assert list(model.peft_config) == ["default"]


def test_peft_itself_would_not_run_it_either(malicious_adapter):
    """What PEFT 0.21 does on its own with a pickle adapter: torch.load(weights_only=True) refuses the global."""
    adapter, marker = malicious_adapter
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_peft_weights(str(adapter), device="cpu")
    assert not marker.exists()


def test_safetensors_wins_and_the_pickle_next_to_it_is_ignored(malicious_adapter, tmp_path):
    """A folder with both files: the safetensors is loaded, the pickle is never touched."""
    adapter, marker = malicious_adapter
    good = get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1]}, init_weights=False))
    good.save_pretrained(tmp_path / "good")
    shutil.copy(tmp_path / "good" / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(tiny_llama(), adapter)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.alps_delta["default"], good.base_model.model.model.layers[0].self_attn.q_proj.alps_delta["default"])
    assert not marker.exists()


def test_saved_adapter_is_safetensors_and_json_only(tmp_path):
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1]}))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    json.loads((tmp_path / "adapter_config.json").read_text())
