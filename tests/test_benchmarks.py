"""The benchmark scripts' quick modes, shrunk to tiny sizes, so that they cannot rot.

These tests check what the scripts produce (files, fields, parameter counts that follow from the method
definitions), never how fast anything ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import math

import pytest
import torch

from benchmarks import checkpoint_pairs, localize_bench, reproduce, train_efficiency


def _load(path):
    assert path.exists(), f"{path} was not written"
    return json.loads(path.read_text())


def test_train_efficiency_tiny(tmp_path):
    argv = ["--quick", "--width", "64", "--layers", "2", "--head-dim", "16", "--vocab", "128", "--batch", "1",
            "--seq", "8", "--rounds", "1", "--forward-rounds", "1", "--sweep-rounds", "1", "--seqs", "8",
            "--widths", "32", "--sweep-layers", "1", "--lowest-layers", "1", "--out", str(tmp_path), "--stem", "te"]
    train_efficiency.main(argv)
    data = _load(tmp_path / "te.json")
    assert (tmp_path / "te.md").read_text().startswith("# Training efficiency")
    assert (tmp_path / "te_seq.png").stat().st_size > 0 and (tmp_path / "te_width.png").stat().st_size > 0
    main = data["main"]
    tr = main["training"]
    assert set(tr) == set(train_efficiency.METHODS)
    # 2 layers x 4 heads: 10% -> ceil(0.8) = 1 head; 1 KV group of 16 rows in k and v.
    assert main["selected_heads"] == 1 and main["total_heads"] == 8
    d, dh = 64, 16
    assert tr["alps"]["trainable_params"] == dh * d * 4  # q rows, k rows, v rows, o columns of one head
    assert tr["masked"]["effective_trainable_params"] == tr["alps"]["trainable_params"]
    assert tr["full"]["trainable_params"] == main["base_params"]
    for name, r in tr.items():
        # AdamW keeps exp_avg and exp_avg_sq (fp32) per trainable entry, plus a scalar step per tensor
        assert 0 <= r["optimizer_state_bytes"] - 8 * r["trainable_params"] < 4096, name
        assert r["peak_bytes"] >= r["resident_bytes"] > 0
        assert r["saved_bytes"] > 0
    assert tr["alps"]["saved_bytes"] < tr["masked"]["saved_bytes"] < tr["full"]["saved_bytes"]
    assert {"base", "alps/unmerged", "alps/merged", "lora_eq/merged"} <= set(main["forward"])
    assert set(data["targets"]["met"]) and all(isinstance(v, bool) for v in data["targets"]["met"].values())
    assert len(data["seq_sweep"]) == 1 and len(data["width_sweep"]) == 1
    assert data["depth_sweep"][0]["lowest_trained_layer"] == 1


def test_train_efficiency_masked_recipe_keeps_other_heads_frozen():
    """The paper-recipe baseline must really update only the selected slices (else its timing is not the recipe)."""
    import torch

    shape = train_efficiency.Shape(width=32, layers=2, head_dim=8, vocab=64)
    base = train_efficiency.build_base(shape)
    heads = {1: [2]}
    model = train_efficiency.make_masked(base, heads)
    trainer = train_efficiency.Trainer(model, torch.randint(0, 64, (1, 6)), lr=1e-2)
    trainer.step()
    trainer.step()
    changed = {n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    assert changed == {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}
    q = dict(model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    q0 = dict(base.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    rows_changed = sorted({int(i) for i in (q != q0).any(dim=1).nonzero().flatten()})
    assert rows_changed == list(range(16, 24))  # head 2 of head_dim 8


@pytest.mark.slow  # three worker processes
def test_localize_bench_tiny(tmp_path):
    argv = ["--shapes", "2x4x64:2", "--reps", "1", "--baseline-reps", "1", "--variants", "qkv_concat",
            "--out", str(tmp_path), "--stem", "lb", "--workdir", str(tmp_path / "ckpt")]
    localize_bench.main(argv)
    data = _load(tmp_path / "lb.json")
    assert (tmp_path / "lb.png").stat().st_size > 0
    point = data["points"][0]
    assert point["shape"]["attention_params"] == 2 * (2 * 64 * 64 + 2 * 64 * 32)
    assert point["methods"]["baseline"]["seconds"]["n"] == 1
    assert data["ours_available"]
    # bf16 checkpoint: both sides see the same weights; the baseline's float32 softmax costs some digits
    assert point["agreement"]["max_rel_diff"] < 1e-3 and point["agreement"]["same_top10pct"]
    assert "speedup_vs_baseline" in point["methods"]["ours:qkv_concat"]


@pytest.mark.slow  # three worker processes
def test_localize_remote_row_tiny(tmp_path):
    from benchmarks import localize_remote

    localize_remote.main(["--shape", "2x4x64:2", "--ffn", "1024", "--vocab", "2048", "--bandwidth", "0",
                          "--out", str(tmp_path), "--stem", "lr", "--workdir", str(tmp_path / "work")])
    point = _load(tmp_path / "lr.json")["point"]
    ranged, again, whole = (point["methods"][k] for k in ("ranged", "ranged, second run", "whole shards"))
    assert all(m["same_scores_as_folders"] for m in (ranged, again, whole))
    assert point["qkv_bytes"] < ranged["bytes"] < 1.25 * point["qkv_bytes"] + 20_000  # + config, index, headers
    assert whole["bytes"] >= point["checkpoint_bytes"]
    assert again["bytes"] < 5_000  # the revision resolution only
    assert "| ranged, second run |" in (tmp_path / "lr.md").read_text()


def test_localize_bench_baseline_matches_scipy_definition(tmp_path):
    """The baseline's per-head score is W1 of the two softmaxed q/k/v vectors on the unit support."""
    import numpy as np
    import torch
    from scipy.stats import wasserstein_distance
    from safetensors.torch import load_file

    shape = checkpoint_pairs.PairShape("t", 1, 4, 32, 2, dtype="float32", ffn=16, vocab=32)
    base, task = checkpoint_pairs.build_pair(shape, tmp_path)
    scores = localize_bench.authors_algorithm(str(base), str(task))
    wb, wt = load_file(str(base / "model.safetensors")), load_file(str(task / "model.safetensors"))

    def vec(w, h):
        p = "model.layers.0.self_attn."
        g = h // 2  # 4 heads, 2 KV groups
        parts = [w[p + "q_proj.weight"][8 * h : 8 * h + 8], w[p + "k_proj.weight"][8 * g : 8 * g + 8],
                 w[p + "v_proj.weight"][8 * g : 8 * g + 8]]
        x = torch.cat([t.flatten() for t in parts]).to(torch.bfloat16).double()
        return torch.softmax(x, 0).numpy()

    for h in range(4):
        pb, pt = vec(wb, h), vec(wt, h)
        support = np.linspace(0, 1, len(pb))
        assert scores[0][h] == pytest.approx(wasserstein_distance(support, support, pb, pt), rel=1e-4)


def test_reproduce_tiny(tmp_path):
    argv = ["--quick", "--width", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "32",
            "--pretrain-steps", "4", "--pretrain-examples", "64", "--sft-steps", "2", "--train-steps", "2",
            "--train-examples", "32", "--eval-examples", "16", "--batch", "8", "--seeds", "0", "1", "--jobs", "2",
            "--methods", "full_attn", "alps_10", "alps_10_kl", "random_10", "lora_eq",
            "--out", str(tmp_path), "--stem", "rp"]
    reproduce.main(argv)
    data = _load(tmp_path / "rp.json")
    assert (tmp_path / "rp.png").stat().st_size > 0 and (tmp_path / "rp_heads.png").stat().st_size > 0
    summ = data["summary"]
    assert set(summ) == {"full_attn", "alps_10", "alps_10_kl", "random_10", "lora_eq", "transfer"}
    assert data["total_heads"] == 8
    chosen = sum(len(h) for h in data["selections"]["wasserstein"].values())
    assert chosen == math.ceil(0.1 * 8)
    for name in ("alps_10", "random_10"):
        assert summ[name]["trainable_params"] == 4 * 8 * 32  # one head: q, k, v rows + o columns, head_dim 8
    assert summ["full_attn"]["trainable_params"] == 2 * (2 * 32 * 32 + 2 * 32 * 16)
    for name, r in summ.items():
        if name == "transfer":
            continue
        assert r["task_accuracy"]["n"] == 2 and 0.0 <= r["task_accuracy"]["mean"] <= 1.0
        assert math.isfinite(r["forgetting"]["mean"])
    assert set(summ["transfer"]) == {"transfer_alps_10", "transfer_indomain_alps_10", "transfer_random_10",
                                     "transfer_full_attn"}
    md = (tmp_path / "rp.md").read_text()
    assert "Table 1 / 5 analogue" in md and "Transfer" in md


def test_summary_replaces_only_its_readme_section(tmp_path):
    from benchmarks import summary

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n")
    summary.write_readme(readme, "## Benchmarks\n\nfirst")
    summary.write_readme(readme, "## Benchmarks\n\nsecond")
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n") and "second" in text and "first" not in text
    assert text.count(summary.START) == 1 and text.count(summary.END) == 1
    assert summary.section(tmp_path).startswith("## Benchmarks")  # no results yet: just the pointer


# ------------------------------------------------------------------------------------------------ real model


def test_real_tasks_answers_match_an_independent_oracle():
    import re

    from benchmarks import real_tasks as T

    for ex in T.examples("math", 40, seed=3):
        a, b, c = map(int, re.findall(r"\d+", ex["prompt"]))
        assert ex["answer"] == str(a + b - c)
    for ex in T.examples("math_mul", 40, seed=3):
        a, b, c = map(int, re.findall(r"\d+", ex["prompt"]))
        assert ex["answer"] == str(a * b + c)
    for ex in T.examples("instruct", 60, seed=3):
        words = [w.strip(",.") for w in ex["prompt"].split("Sentence: ", 1)[1].split()]
        if ex["prompt"].startswith("How many"):
            assert ex["answer"] == str(len(words))
        elif "capital letters" in ex["prompt"]:
            assert ex["answer"] == words[-1].upper()
    for ex in T.examples("code", 30, seed=3):
        snippet = ex["prompt"].split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
        assert run.stdout.strip() == ex["answer"]
    parts = T.splits("code", {"train": 50, "dev": 10, "test": 10})
    prompts = [e["prompt"] for split in parts.values() for e in split]
    assert len(prompts) == len(set(prompts)) == 70
    assert len(T.sentences()) > 100 and len(T.general_texts()) > 50
    with pytest.raises(ValueError, match="unknown task"):
        T.examples("poetry", 3, 0)


def test_teacher_forced_exact_match_equals_greedy_generation():
    """Oracle: answers are the model's own greedy continuations (one example at a time, unpadded); batched,
    left-padded teacher forcing must then call every one exact, and none once its last token is changed."""
    from benchmarks import real_data as D
    from tests.support.tiny_models import VOCAB, tiny_llama

    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    items = []
    for length in (3, 7, 5, 9):
        prompt = torch.randint(1, VOCAB, (1, length), generator=g)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        items.append({"prompt": prompt[0].tolist(), "answer": out[0, length:].tolist()})
    assert D.evaluate(model, items, pad_id=0, batch_size=4)["accuracy"] == 1.0
    wrong = [{"prompt": it["prompt"], "answer": it["answer"][:-1] + [(it["answer"][-1] + 1) % VOCAB]} for it in items]
    assert D.evaluate(model, wrong, pad_id=0, batch_size=4)["accuracy"] == 0.0


def test_reproduce_real_quick(tmp_path, smollm2_folder):
    from benchmarks import reproduce_real as R

    argv = ["--quick", "--tasks", "math", "--seeds", "0", "--draws", "2", "--out", str(tmp_path), "--stem", "rr"]
    R.main(argv)
    data = _load(tmp_path / "rr.json")
    assert data["finished"] and (tmp_path / "rr.png").stat().st_size > 0
    math_runs = data["tasks"]["math"]["runs"]
    assert set(R.TUNED) <= set(math_runs)
    assert len(math_runs["random_10"]) == len(math_runs["lc_10"]) == 2  # draws 0 and 1
    for method, lr in data["lr"].items():
        assert lr in data["setup"]["grids"][R.FAMILY.get(method, "heads")]
        assert len(data["tuning"][method]) == 2
    sel = data["tasks"]["math"]["selections"]
    assert sum(map(len, sel["alps_10"].values())) == math.ceil(0.1 * 8)  # tiny model: 2 layers x 4 heads
    assert sum(map(len, sel["alps_30"].values())) == math.ceil(0.3 * 8)
    one_head = 4 * 16 * 64  # q, k, v rows + o columns of one head (head_dim 16, width 64)
    assert math_runs["alps_10"][0]["trainable_params"] == one_head
    assert set(data["tasks"]["math_mul"]["runs"]) == {"transfer_a", "transfer_b", "transfer_random", "transfer_full_attn"}
    assert math_runs["alps_10"][0]["curve"]  # the learning-curve probe ran
    sel_of = data["tasks"]["math"]["selections"]
    for method, runs in math_runs.items():  # a head set equal to one already trained is reused, never retrained
        for r in runs:
            if "same_heads_as" in r:
                assert sel_of[method] == sel_of[r["same_heads_as"]]
                twin = [t for t in math_runs[r["same_heads_as"]] if t["seed"] == r["seed"]][0]
                assert twin["test"] == r["test"]
    for r in math_runs["full_attn"]:
        assert 0.0 <= r["test"]["accuracy"] <= 1.0 and math.isfinite(r["probes"]["general_text"])
    md = (tmp_path / "rr.md").read_text()
    assert "(complete)" in md and "Learning curves" in md and "beats Random draws" in md
    (tmp_path / "rr.md").unlink()
    R.main(["--render", str(tmp_path / "rr.json")])
    assert (tmp_path / "rr.md").read_text() == md


def test_reproduce_real_resume_reruns_only_the_missing_runs(tmp_path, smollm2_folder):
    from benchmarks import reproduce_real as R

    argv = ["--quick", "--tasks", "math", "--seeds", "0", "--draws", "2", "--out", str(tmp_path), "--stem", "rr"]
    R.main(argv)
    path = tmp_path / "rr.json"
    full = _load(path)
    cut = json.loads(json.dumps(full))  # as if stopped at a deadline: the last draw and the transfer rows missing
    runs = cut["tasks"]["math"]["runs"]
    runs["random_10"] = [r for r in runs["random_10"] if r["seed"] == 0]
    del cut["tasks"]["math_mul"]
    cut.update(finished=False, stopped_at_deadline=True)
    kept = json.loads(json.dumps(runs["alps_10"]))
    path.write_text(json.dumps(cut))

    with pytest.raises(SystemExit):  # other settings than the JSON's: refused at parse time
        R.parse_args([*argv[:-4], "--steps", "3", "--resume", str(path)])
    R.main([*argv, "--resume", str(path)])
    again = _load(path)
    assert again["finished"] and not again.get("stopped_at_deadline") and len(again["resumed"]) == 1
    assert again["tasks"]["math"]["runs"]["alps_10"] == kept  # finished runs are kept, not rerun
    redone = {r["seed"]: r for r in again["tasks"]["math"]["runs"]["random_10"]}
    original = {r["seed"]: r for r in full["tasks"]["math"]["runs"]["random_10"]}
    assert set(redone) == {0, 1}  # the same rebuilt task model and seeded draw give the same result
    assert redone[1]["test"] == pytest.approx(original[1]["test"], rel=1e-5)
    assert set(again["tasks"]["math_mul"]["runs"]) == set(full["tasks"]["math_mul"]["runs"])
    assert "Resumed after" in (tmp_path / "rr.md").read_text()

    tampered = json.loads(path.read_text())  # head sets that the rebuild does not reproduce: refused, nothing mixed
    tampered["tasks"]["math"]["selections"]["alps_10"] = {"0": [3], "1": []}
    del tampered["tasks"]["math"]["runs"]["lc_10"]
    path.write_text(json.dumps(tampered))
    with pytest.raises(RuntimeError, match="rebuilt different 'alps_10' heads"):
        R.main([*argv, "--resume", str(path)])
