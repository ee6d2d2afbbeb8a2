"""``peft-alps localize``: writes a valid scores JSON and PNG, prints the top heads, fails cleanly."""

import json

import pytest
import torch

from peft_alps import HeadScores, localize_heads
from peft_alps.cli import build_parser, main
from tests.tiny_models import tiny_llama


@pytest.fixture
def pair(tmp_path):
    base, task = tiny_llama(), tiny_llama()
    with torch.no_grad():
        task.model.layers[2].self_attn.q_proj.weight[6 * 8 : 7 * 8] += 0.5  # head 6 of layer 2
    base.save_pretrained(tmp_path / "base")
    task.save_pretrained(tmp_path / "task")
    return tmp_path / "base", tmp_path / "task"


def test_localize_writes_json_and_png(pair, tmp_path, capsys):
    base, task = pair
    out, png = tmp_path / "out" / "heads.json", tmp_path / "heads.png"
    code = main(["localize", "--base", str(base), "--task", str(task), "--k", "1", "--metric", "kl",
                 "--output", str(out), "--heatmap", str(png), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["metric"] == "kl" and data["shape"] == [3, 8]
    scores = HeadScores.load(out)
    assert scores.scores.tobytes() == localize_heads(base, task, metric="kl").scores.tobytes()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "selected 1 of 24 heads: {2: [6]}" in printed
    assert "ratio" not in printed.split("use them with:")[1] and "k=1" in printed


def test_localize_default_ratio_and_errors(pair, tmp_path, capsys):
    base, task = pair
    assert main(["localize", "--base", str(base), "--task", str(task), "--output", str(tmp_path / "h.json"),
                 "--no-progress"]) == 0
    assert "selected 3 of 24 heads" in capsys.readouterr().out  # ceil(0.1 * 24)
    code = main(["localize", "--base", str(base), "--task", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.json")])
    assert code == 1 and "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert main(["localize", "--base", str(base), "--task", str(task), "--ratio", "1.5",
                 "--output", str(tmp_path / "y.json"), "--no-progress"]) == 1
    assert "ratio 1.5 out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["localize", "--base", "b", "--task", "t", "--output", "o", "--ratio", "0.1", "--k", "2"])


def test_subcommands_are_listed(capsys):
    assert main([]) == 2
    help_text = capsys.readouterr().out
    assert "localize" in help_text and "demo" in help_text
