"""notebooks/quickstart.ipynb runs top to bottom (localize, SFTTrainer, save, reload, merge, export to LoRA).

The notebook asserts its own invariants (reloaded / merged / exported model give the trained model's logits);
this test executes it with nbclient in a fresh kernel and checks that every code cell ran, that the steps
produced what they announce, that nothing was written to stderr (no warnings, no stray progress bars), and that
its table shows ALPS learning the task."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def stderr_text(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stderr")


def output_text(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this environment: offline, this checkout importable, few threads.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    text = "\n".join(output_text(c) for c in code)
    for announced in ("heads to train", "trainable params", "adapter_model.safetensors",
                      "reloaded vs trained", "merged vs trained", "LORA rank", "LoRA export vs trained"):
        assert announced in text, announced
    noise = [f"cell {i}: {stderr_text(c)}" for i, c in enumerate(code) if stderr_text(c)]
    assert not noise, "the notebook wrote to stderr:\n" + "\n".join(noise)
    assert "Warning" not in text
    table = {line[:22].strip(): line[22:].split() for line in text.splitlines()
             if line.startswith(("base ", "task model (full FT)", "ALPS (4 heads)"))}
    exact = {name: float(cols[-1].rstrip("%")) for name, cols in table.items()}
    assert exact["ALPS (4 heads)"] >= exact["base"] + 20, table  # a visible gain, in exact-match points
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the head-score heatmap was not displayed"
