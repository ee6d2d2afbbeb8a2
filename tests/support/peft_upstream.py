"""PEFT's own generic adapter tests (``PeftCommonTester``), taken from the sdist of the installed PEFT release.

Nothing of PEFT's test code lives in this repository. :func:`load_testing_common` downloads the sdist of exactly
the installed version from the package registry (``pip download --no-binary :all:``), keeps it in a cache
(``$PEFT_ALPS_PEFT_SDIST_CACHE``, default ``~/.cache/peft-alps/peft-sdist``), extracts ``tests/testing_common.py``
and the sibling modules it imports into a temporary package, and imports it from there.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

CACHE_ENV = "PEFT_ALPS_PEFT_SDIST_CACHE"
REQUIRE_ENV = "PEFT_ALPS_REQUIRE_PEFT_TESTS"  # CI sets it: an unavailable sdist is then an error, not a skip
PACKAGE = "peft_upstream_tests"


class SdistUnavailable(RuntimeError):
    """The PEFT sdist could not be fetched (no registry access, or a PEFT build that is not on the registry)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft-alps" / "peft-sdist")


def fetch_sdist(version: str) -> Path:
    """Path of ``peft-<version>.tar.gz`` in the cache, downloading it first if needed."""
    target = cache_dir() / f"peft-{version}.tar.gz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"peft=={version}", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SdistUnavailable(f"`{' '.join(cmd[2:])}` did not run: {exc}") from exc
        found = list(Path(tmp).glob("peft-*.tar.gz"))
        if done.returncode != 0 or len(found) != 1:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SdistUnavailable(f"`pip download peft=={version}` (sdist) failed: {' | '.join(tail)}")
        os.replace(found[0], target)  # atomic: parallel test processes never see half a file
    return target


def _sibling_imports(source: str) -> set[str]:
    """Modules of PEFT's tests package that ``source`` imports relatively (``from .testing_utils import ...``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module.split(".")[0])
    return names


def extract_tests(sdist: Path, dest: Path, entry: str = "testing_common") -> Path:
    """Extract ``tests/<entry>.py`` and, transitively, the test modules it imports into ``dest/peft_upstream_tests``."""
    package = dest / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).parts[-1][:-3]: m for m in tar.getmembers()
                   if len(Path(m.name).parts) == 3 and Path(m.name).parts[1] == "tests" and m.name.endswith(".py")}
        todo, done = [entry], set()
        while todo:
            name = todo.pop()
            if name in done:
                continue
            if name not in members:
                raise SdistUnavailable(f"{sdist.name} has no tests/{name}.py")
            source = tar.extractfile(members[name]).read().decode()
            (package / f"{name}.py").write_text(source)
            done.add(name)
            todo.extend(_sibling_imports(source) - done)
    return package


def _placeholder_module(name: str, attrs: list[str]) -> types.ModuleType:
    """Stands in, during the import only, for an optional library that the tests we run never use (diffusers)."""
    module = types.ModuleType(name)
    for attr in attrs:
        def refuse(*args, _attr=attr, **kwargs):
            raise RuntimeError(f"{name}.{_attr} is not installed; no test run by peft-alps uses it")
        setattr(module, attr, type(attr, (), {"__init__": refuse, "from_pretrained": staticmethod(refuse)}))
    return module


def load_testing_common(dest: Path) -> types.ModuleType:
    """Import PEFT's ``tests/testing_common.py`` for the installed PEFT. Raises :class:`SdistUnavailable`."""
    import peft

    package = extract_tests(fetch_sdist(peft.__version__), dest)
    placeholders = {}
    if importlib.util.find_spec("diffusers") is None:
        placeholders["diffusers"] = _placeholder_module("diffusers", ["StableDiffusionPipeline"])
    sys.path.insert(0, str(package.parent))
    sys.modules.update(placeholders)
    try:
        return importlib.import_module(f"{PACKAGE}.testing_common")
    finally:
        for name in placeholders:
            sys.modules.pop(name, None)  # nothing else may mistake it for the real library
