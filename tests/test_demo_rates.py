"""benchmarks.demo_rates: the grid-extension rule and the family choice, against hand-worked cases."""

import pytest

from benchmarks import demo_rates as DR


def test_next_rate_extends_past_the_edge_that_holds_the_best_until_it_is_inside():
    grid = list(DR.GRID)
    inside = {1e-4: 2.0, 3e-4: 1.0, 1e-3: 1.5, 3e-3: 3.0}
    assert DR.next_rate(grid, inside) is None
    top = {1e-4: 4.0, 3e-4: 3.0, 1e-3: 2.0, 3e-3: 1.0}
    assert DR.next_rate(grid, top) == pytest.approx(9e-3)
    bottom = {1e-4: 1.0, 3e-4: 2.0, 1e-3: 3.0, 3e-3: 4.0}
    assert DR.next_rate(grid, bottom) == pytest.approx(1e-4 / 3)
    extended = grid + [9e-3, 2.7e-2, 8.1e-2]  # three extensions: stop even at an edge
    assert DR.next_rate(extended, {lr: -lr for lr in extended}) is None


def test_heads_family_loss_is_the_mean_of_both_head_arms_and_missing_runs_give_none():
    result = {"runs": {"ALPS, top heads@0.001": {"dev_loss": 1.0}, "ALPS, random heads@0.001": {"dev_loss": 2.0},
                       "LoRA@0.001": {"dev_loss": 0.5}}}
    assert DR.family_loss(result, "heads", 1e-3) == pytest.approx(1.5)
    assert DR.family_loss(result, "lora", 1e-3) == pytest.approx(0.5)
    assert DR.family_loss(result, "heads", 3e-3) is None


def test_render_says_partial_until_every_family_is_chosen():
    env = {"command": "python -m benchmarks.demo_rates", "utc": "t", "git_commit": "c", "loadavg_start": [0],
           "loadavg_end": [0]}
    result = {"settings": {"model": "m", "adapter_steps": 2, "batch_size": 4, "seed": 0}, "dev_examples": 16,
              "grid": [1e-3], "runs": {}, "env": env}
    assert "partial" in DR.render(result)
    result["chosen"] = {"heads": {"lr": 1e-3, "tried": [3e-4, 1e-3, 3e-3], "inside": True},
                        "lora": {"lr": 3e-3, "tried": [1e-3, 3e-3, 9e-3], "inside": True}}
    text = DR.render(result)
    assert "partial" not in text and "**heads**: lr **0.001**" in text and "**lora**: lr **0.003**" in text


def test_the_demo_trains_at_the_committed_tuned_rates_and_cites_the_committed_verdict():
    import json
    from pathlib import Path

    from benchmarks import reproduce_converged as RC
    from peft_alps.demo import real

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    rates = json.loads((results / "demo_rates.json").read_text())
    assert set(rates["chosen"]) == set(DR.FAMILIES) and all(c["inside"] for c in rates["chosen"].values())
    settings = real.RealDemoSettings()
    assert settings.adapter_lr == rates["chosen"]["heads"]["lr"] and settings.lora_lr == rates["chosen"]["lora"]["lr"]
    assert rates["settings"] == DR._settings_record(settings)  # tuned at the demo's own budget
    assert (results.parent.parent / real.RATES_SOURCE).is_file()
    committed = json.loads((results / "reproduce_converged_smollm2.json").read_text())
    verdict = RC.verdict_summary(committed, "heads")
    assert verdict is not None and verdict in real.REPRODUCTION_VERDICT
    paper = RC.verdict_summary(committed, "paper")  # the paper's reading, complete in the committed run
    assert paper is not None and paper in real.REPRODUCTION_VERDICT

    def instruct_em(method):  # the rows the line's last clause quotes, as committed
        runs = RC.runs_of(committed, "instruct", method)
        return f"{100 * sum(r['test']['accuracy'] for r in runs) / len(runs):.1f}%"

    assert f"{instruct_em('p_wo_attn')} EM against its {instruct_em('p_alps')}" in real.REPRODUCTION_VERDICT
