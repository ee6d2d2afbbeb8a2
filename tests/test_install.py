"""The README's install commands build nothing: pip's resolver finds a wheel for every requirement but peft-alps.

Runs pip's real resolver against the package index (``pip install --dry-run --ignore-installed --report``), so it
needs the index; it skips without one, except where ``PEFT_ALPS_REQUIRE_NETWORK=1`` (CI) makes that a failure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def resolve(*requirements: str, tmp_path: Path) -> list[dict]:
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--disable-pip-version-check", "--report", str(report), *requirements],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        if os.environ.get("PEFT_ALPS_REQUIRE_NETWORK") != "1" and "No matching distribution" in done.stderr + done.stdout:
            pytest.skip(f"the package index is unreachable: {done.stderr.strip().splitlines()[-1:]}")
        raise AssertionError(f"pip could not resolve {requirements}:\n{done.stderr[-3000:]}")
    return json.loads(report.read_text())["install"]


def sdists(items: list[dict]) -> list[str]:
    """Requirements pip would build from source, peft-alps itself (the local project) excepted."""
    out = []
    for item in items:
        info = item["download_info"]
        if "dir_info" in info and Path(info["url"].removeprefix("file://")) == ROOT:
            continue
        if not info["url"].endswith(".whl"):
            out.append(f"{item['metadata']['name']} {item['metadata']['version']} ({info['url']})")
    return out


@pytest.mark.parametrize("extras", ["models", "test"])
def test_readme_extras_install_from_wheels_only(extras, tmp_path):
    items = resolve("torch==2.13.0", f".[{extras}]", tmp_path=tmp_path)
    names = {item["metadata"]["name"].lower() for item in items}
    assert {"peft-alps", "torch", "peft", "transformers", "gguf"} <= names
    assert sdists(items) == [], "these would be compiled on a fresh machine"


def test_the_check_sees_an_sdist(tmp_path):
    """The oracle: llama-cpp-python, which the old [models] extra pulled in, exists on PyPI only as a source."""
    items = resolve("--no-deps", "llama-cpp-python", tmp_path=tmp_path)
    assert [s.split()[0].replace("_", "-") for s in sdists(items)] == ["llama-cpp-python"]
