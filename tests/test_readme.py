"""The README's first two commands are what a new user runs; CI must run exactly the test one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_starts_with_install_and_test_commands():
    install, test = readme_commands()[:2]
    assert "pip install" in install and "peft-alps demo" in install
    assert test.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    test_cmd = readme_commands()[1].split("&&")[-1].strip()
    ci_lines = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines
    assert any(line.startswith("python -m pip install -q torch==2.13.0") for line in ci_lines)
