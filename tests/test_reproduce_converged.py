"""benchmarks.reproduce_converged (the design that decides ALPS vs random heads) and benchmarks.stats."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from benchmarks import stats as S


# ----------------------------------------------------------------------------- statistics, against oracles


def test_rank_p_is_the_exact_rank_permutation_p_value():
    draws = [0.5, 0.6, 0.7, 0.8, 0.9]
    assert S.rank_p(0.4, draws, lower_is_better=True) == {"beats": 5, "n": 5, "p": 1 / 6}
    assert S.rank_p(0.75, draws, lower_is_better=True) == {"beats": 2, "n": 5, "p": 4 / 6}
    assert S.rank_p(0.75, draws, lower_is_better=False) == {"beats": 3, "n": 5, "p": 3 / 6}
    assert S.rank_p(0.5, draws, lower_is_better=True)["beats"] == 4  # a tie is not beaten


def test_paired_permutation_p_matches_full_enumeration():
    """Oracle: all 2^n sign flips of the paired differences, counted by hand (n small enough to enumerate)."""
    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 1.0, 10)
    b = a + rng.normal(0.3, 0.5, 10)  # a is better (lower) on average
    d = a - b
    flips = np.array(list(itertools.product([1, -1], repeat=len(d))))
    exact = float(np.mean((flips * d).mean(1) <= d.mean()))
    assert S.paired_permutation_p(a, b, lower_is_better=True) == pytest.approx(exact)
    assert S.paired_permutation_p(a, b, lower_is_better=False) == pytest.approx(
        float(np.mean((flips * d).mean(1) >= d.mean())))
    assert S.paired_permutation_p(a, a, lower_is_better=True) == 1.0


def test_hierarchical_bootstrap_covers_the_truth_and_widens_with_head_spread():
    rng = np.random.default_rng(0)
    n = 200
    examples = rng.normal(0, 1, n)
    a = examples + rng.normal(-0.2, 0.05, (3, n))  # ALPS: 0.2 better, three seeds
    tight = examples + rng.normal(0.0, 0.05, (10, n))  # draws that agree with each other
    spread = examples + rng.normal(0.0, 0.05, (10, n)) + rng.normal(0, 0.3, (10, 1))  # draws that differ
    ci_tight, ci_spread = S.hierarchical_bootstrap(a, tight), S.hierarchical_bootstrap(a, spread, seed=1)
    assert ci_tight["lo"] < ci_tight["diff"] < ci_tight["hi"] < 0  # clearly better
    assert ci_tight["diff"] == pytest.approx((a.mean(0) - tight.mean(0)).mean())
    assert (ci_spread["hi"] - ci_spread["lo"]) > 2 * (ci_tight["hi"] - ci_tight["lo"])  # the draws' spread counts
    with pytest.raises(ValueError, match=r"same examples"):
        S.hierarchical_bootstrap(a, tight[:, :10])


def test_verdict_rule():
    ci_better, ci_worse, ci_zero = {"diff": -1, "lo": -2, "hi": -0.5}, {"diff": 1, "lo": 0.5, "hi": 2}, \
        {"diff": 0, "lo": -1, "hi": 1}
    assert S.verdict(0.01, 0.99, ci_better, lower_is_better=True) == "better"
    assert S.verdict(0.99, 0.01, ci_worse, lower_is_better=True) == "worse"
    assert S.verdict(0.01, 0.99, ci_zero, lower_is_better=True) == "not distinguishable at this power"
    assert S.verdict(0.01, 0.99, ci_worse, lower_is_better=False) == "better"  # EM: higher is better


# ----------------------------------------------------------------------------- the design


def test_flat_step_rule():
    from benchmarks.reproduce_converged import flat_step

    curve = [{"step": s, "loss": v} for s, v in [(0, 2.0), (25, 1.2), (50, 1.04), (75, 1.01), (100, 1.0)]]
    assert flat_step(curve, 0.05) == 50  # 1.04 is within 5% of the whole 1.0 drop from the minimum
    assert flat_step(curve, 0.005) == 100
    rising = [{"step": s, "loss": v} for s, v in [(0, 2.0), (25, 1.0), (50, 1.3)]]
    assert flat_step(rising, 0.05) == 25  # overfitting: the minimum comes first


def test_quick_design_runs_every_stage_and_renders_from_its_json(tmp_path, smollm2_folder):
    from benchmarks import reproduce_converged as RC

    result = RC.main(["--quick", "--out", str(tmp_path), "--stem", "rc"])
    data = json.loads((tmp_path / "rc.json").read_text())
    assert data["finished"] and (tmp_path / "rc.png").stat().st_size > 0
    assert set(data["curves"]) == set(RC.CURVES) and data["steps"] >= 1
    for task in data["setup"]["tasks"]:
        info = data["tasks"][task]
        assert info["task_model"]["curve"][0]["step"] == 0 and "test" in info["task_model"]
        runs = info["runs"]
        assert len(runs["h_random"]) == len(runs["p_random"]) == data["setup"]["draws"]
        assert {r["seed"] for r in runs["h_alps"]} == set(data["setup"]["seeds"])
        assert {m for m in RC.METHODS if m != "full_attn"} <= set(runs)
        for m, rs in runs.items():
            assert all(len(r["test"]["example_loss"]) == data["setup"]["test_examples"] for r in rs)
            assert all(r["steps"] == data["steps"] for r in rs)  # the same budget for every arm
        alps, wo = runs["p_alps"][0]["trainable_params"], runs["p_wo_attn"][0]["trainable_params"]
        one_head_qkv = 3 * 16 * 64  # tiny model: q, k, v rows of one head (head_dim 16, width 64)
        assert alps == wo + one_head_qkv
        assert runs["h_alps"][0]["trainable_params"] == 4 * 16 * 64  # heads only: q/k/v rows + o columns
    for method, trials in data["tuning"].items():
        assert data["lr"][method] in [t["lr"] for t in trials]
        assert len(trials) >= len(data["setup"]["grids"][RC.METHODS[method][1]])
    assert len(data["tasks"][data["setup"]["tune_task"]]["fp32"]["h_alps"]) == len(data["setup"]["seeds"])
    md = (tmp_path / "rc.md").read_text()
    assert "## Verdict" in md and "permutation p" in md and "## When each part ran" in md
    RC.main(["--render", str(tmp_path / "rc.json")])
    assert (tmp_path / "rc.md").read_text() == md  # the Markdown re-renders byte-identically from the JSON
    assert result["finished"]


def test_resume_reruns_only_the_missing_runs(tmp_path, smollm2_folder):
    from benchmarks import reproduce_converged as RC

    argv = ["--quick", "--tasks", "instruct", "--out", str(tmp_path), "--stem", "rc"]
    RC.main(argv)
    path = tmp_path / "rc.json"
    full = json.loads(path.read_text())
    cut = json.loads(json.dumps(full))
    runs = cut["tasks"]["instruct"]["runs"]
    runs["h_random"] = [r for r in runs["h_random"] if r["seed"] == 0]
    del runs["p_lc"]
    cut.update(finished=False, stopped_at_deadline=True)
    path.write_text(json.dumps(cut))
    with pytest.raises(SystemExit):  # other settings than the JSON's: refused at parse time
        RC.parse_args([*argv, "--draws", "5", "--resume", str(path)])
    RC.main([*argv, "--resume", str(path)])
    again = json.loads(path.read_text())
    assert again["finished"] and len(again["resumed"]) == 1
    assert again["tasks"]["instruct"]["runs"]["h_alps"] == full["tasks"]["instruct"]["runs"]["h_alps"]  # kept
    redone = {r["seed"]: r for r in again["tasks"]["instruct"]["runs"]["h_random"]}
    original = {r["seed"]: r for r in full["tasks"]["instruct"]["runs"]["h_random"]}
    assert set(redone) == set(original)
    assert redone[1]["test"]["loss"] == pytest.approx(original[1]["test"]["loss"], rel=1e-4)  # same seed, same run
    assert len(again["tasks"]["instruct"]["runs"]["p_lc"]) == len(again["setup"]["seeds"])
    assert "Resumed after" in (tmp_path / "rc.md").read_text()


def test_a_cut_table_is_left_out_and_the_design_still_finishes(tmp_path, smollm2_folder):
    from benchmarks import reproduce_converged as RC

    RC.main(["--quick", "--tasks", "instruct", "--seeds", "0", "--draws", "2", "--cut-other-rows", "instruct",
             "--out", str(tmp_path), "--stem", "rc"])
    data = json.loads((tmp_path / "rc.json").read_text())
    runs = data["tasks"]["instruct"]["runs"]
    assert data["finished"] and data["cut_other_rows"]["tasks"] == ["instruct"]
    assert not set(runs) & set(RC.OTHERS) and len(runs["p_random"]) == 2  # the central draws all ran
    md = (tmp_path / "rc.md").read_text()
    assert "(complete; the other rows' `instruct` table cut" in md and "were not run on `instruct`" in md


def test_bf16_step_benchmark_measures_every_arm(tmp_path, smollm2_folder):
    from benchmarks import bf16_step

    result = bf16_step.main(["--quick", "--out", str(tmp_path / "b")])
    assert set(result["arms"]) == set(bf16_step.ARMS)
    for arm, r in result["arms"].items():
        assert r["fp32_s"] > 0 and r["bf16_s"] > 0 and r["train_peak_bytes"] > 0, arm
    assert result["arms"]["p_full"]["added_param_bytes"] == 0  # trains the base's own tensors
    assert result["arms"]["p_alps"]["added_param_bytes"] > result["arms"]["h_alps"]["added_param_bytes"] > 0
    assert (tmp_path / "b.md").read_text().startswith("# bf16 autocast vs float32")


# ----------------------------------------------------------------------------- precision across segments


def _runner(result, bf16: bool):
    from benchmarks import reproduce_converged as RC

    runner = object.__new__(RC.Runner)  # only the bookkeeping that precision_for reads
    runner.result, runner.setup = result, RC.Setup(bf16=bf16)
    return runner


def test_a_method_keeps_the_precision_of_its_first_run_and_its_compared_arms_follow_it():
    run = lambda bf16: {"seed": 0, "bf16": bf16}  # noqa: E731
    result = {"setup": {"bf16": True}, "tuning": {"h_alps": [{"lr": 1e-3}], "p_alps": [{"lr": 1e-4, "bf16": False}]},
              "tasks": {"instruct": {"runs": {"h_random": [run(True)], "p_lora": [run(True)]}}, "code": {}}}
    fp32_segment = _runner(result, bf16=False)
    assert fp32_segment.precision_for("h_alps") is True  # a trial from before trials recorded it: the design's
    assert fp32_segment.precision_for("h_random") is True  # its own runs
    assert fp32_segment.precision_for("p_lora") is True
    assert fp32_segment.precision_for("p_alps") is False  # its own trial
    assert fp32_segment.precision_for("p_random") is False  # follows + ALPS, the arm it is compared with
    assert fp32_segment.precision_for("p_lc") is False
    assert fp32_segment.precision_for("p_full") is False  # nothing run yet: this segment's choice
    assert _runner(result, bf16=True).precision_for("p_random") is False  # a bf16 machine does not flip it back
    assert _runner(result, bf16=True).precision_for("p_full") is True


def test_resume_may_change_precision_only_and_bf16_without_native_support_is_refused(tmp_path, monkeypatch):
    from benchmarks import _common as C
    from benchmarks import reproduce_converged as RC
    from benchmarks import reproduce_real as R

    stored = tmp_path / "rc.json"
    stored.write_text(json.dumps({"setup": R.setup_record(RC.Setup()), "tasks": {}}))
    monkeypatch.setattr(C, "bf16_matmul_speedup", lambda device="cpu": 0.02)
    with pytest.raises(SystemExit):  # the design's bf16 on a CPU that emulates it: refused before any work
        RC.parse_args(["--resume", str(stored)])
    args = RC.parse_args(["--resume", str(stored), "--fp32"])  # the one setting a segment may change
    assert args.setup.bf16 is False and args.previous["setup"]["bf16"] is True
    with pytest.raises(SystemExit):
        RC.parse_args(["--resume", str(stored), "--fp32", "--draws", "3"])
    monkeypatch.setattr(C, "bf16_matmul_speedup", lambda device="cpu": 2.0)
    assert RC.parse_args(["--resume", str(stored)]).setup.bf16 is True


def test_bf16_matmul_speedup_is_a_positive_ratio():
    from benchmarks import _common as C

    assert C.bf16_matmul_speedup(size=32, repeats=1) > 0


def test_jobs_run_the_central_comparisons_first_and_the_other_rows_task_by_task():
    from benchmarks import reproduce_converged as RC

    runner = object.__new__(RC.Runner)
    runner.setup = RC.Setup(tasks=("code", "instruct"), tune_task="instruct", seeds=(0, 1), draws=2)
    runner.result = {}
    jobs = runner.jobs()
    central = [j for j in jobs if j[3].startswith("central")]
    assert jobs[:len(central)] == central and len(central) == 2 * 2 * (2 + 2)
    assert [j[0] for j in central[:4]] == ["code"] * 4 and central[8][1] == "p_alps"  # heads-only reading first
    others = jobs[len(central):]
    assert [j[0] for j in others] == ["instruct"] * 10 + ["code"] * 10  # the tune task's table first, whole
    assert [j[1] for j in others[:10:2]] == list(RC.OTHERS)
    runner.result = {"cut_other_rows": {"tasks": ["code"]}}  # the budget cut: the other task's table goes
    assert runner.jobs() == jobs[:-10]


def test_cutting_an_other_rows_table_is_recorded_and_refused_once_it_has_runs(tmp_path):
    from benchmarks import reproduce_converged as RC

    env = {"utc": "2026-12-07 16:00:00", "command": "python -m benchmarks.reproduce_converged ..."}
    result = {"setup": {"tasks": ["instruct", "code"]}, "tasks": {"instruct": {"runs": {"p_full": [{"seed": 0}]}}},
              "resumed": [{}, {}], "finished": True}
    RC.cut_other_rows(result, ["code"], env)
    assert result["cut_other_rows"] == {"tasks": ["code"], "segment": 2, "utc": env["utc"], "command": env["command"]}
    assert RC.status_of(result).startswith("complete; the other rows' `code` table cut for the compute budget")
    with pytest.raises(ValueError, match=r"already have runs on \['instruct'\]"):
        RC.cut_other_rows(result, ["instruct"], env)
    with pytest.raises(SystemExit):  # not a task of the design
        RC.parse_args(["--quick", "--tasks", "instruct", "--cut-other-rows", "code", "--out", str(tmp_path)])


def test_cutting_a_table_that_has_runs_is_refused_when_the_flags_are_read(tmp_path, capsys):
    from benchmarks import reproduce_converged as RC
    from benchmarks import reproduce_real as R

    stored = tmp_path / "rc.json"
    runs = {"instruct": {"runs": {"p_full": [{"seed": 0}]}}, "code": {"runs": {"p_alps": [{"seed": 0}]}}}
    stored.write_text(json.dumps({"setup": R.setup_record(RC.Setup(bf16=False)), "tasks": runs}))
    with pytest.raises(SystemExit):  # before any model is loaded
        RC.parse_args(["--resume", str(stored), "--fp32", "--cut-other-rows", "instruct"])
    assert "--cut-other-rows instruct: the other rows already have runs on 'instruct'" in capsys.readouterr().err
    args = RC.parse_args(["--resume", str(stored), "--fp32", "--cut-other-rows", "code"])  # central runs only: cuttable
    assert args.cut_other_rows == ["code"]


def test_the_committed_report_re_renders_byte_identically_from_its_json():
    from benchmarks import reproduce_converged as RC

    path = RC.C.RESULTS / "reproduce_converged_smollm2.json"
    assert RC.render(json.loads(path.read_text())) == path.with_suffix(".md").read_text()


def test_p_values_below_the_permutation_floor_do_not_print_as_zero():
    from benchmarks import reproduce_converged as RC

    assert RC._fmt_p(1e-4) == "< 0.001" and RC._fmt_p(0.31) == "0.310" and RC._fmt_p(0.001) == "0.001"
