"""bench/study.py: successive halving keeps the better half, always keeps the reference, and plans only what is
missing, from the results file alone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import study


def _row(task, cand, seed, rung, bal):
    return {"task": task, "candidate": cand, "seed": seed, "rung": rung, "val_accuracy": bal,
            "val_balanced_accuracy": bal, "finetune_val_macro_f1": bal, "wall_s": 1.0}


def test_rungs_rank_the_fine_tune_and_the_final_the_kept_model(tmp_path, monkeypatch):
    """At 3 epochs a run mostly keeps the linear probe, the same for every candidate: the rungs rank the fine-tune's
    own last epoch (read back from the run's metrics.json for rows written before the field existed)."""
    import json

    from bench import recipe

    row = {**_row("faces", "new", 0, "0", 0.9), "finetune_val_macro_f1": 0.6}
    assert study.score(row) == 0.6
    assert study.score({**row, "rung": "final"}) == 0.9
    monkeypatch.setattr(recipe, "WORK", tmp_path)
    old = {k: v for k, v in row.items() if k != "finetune_val_macro_f1"}
    run = recipe.run_dir("faces", "study-new", 0, "study-r0")
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"history": [{"val_acc": 0.5, "val_macro_f1": 0.4},
                                                              {"val_acc": 0.7, "val_macro_f1": 0.65}]}))
    assert study.score(old) == 0.65


def test_each_rung_keeps_the_better_half_and_the_reference():
    task = "elpv-binary"
    cands = study.candidates_for(task)
    assert "ordinal" not in cands and "ordinal" in study.candidates_for("elpv-fourclass")
    assert not set(study.LONGER) & set(cands)  # the epochs are a rung's budget, not a candidate of the halving
    # rung 0 planned: every candidate, seed 0, on the cached path at the first rung's epochs
    todo = study.plan([], task, "0")
    assert sorted(c for c, _, _ in todo) == sorted(cands) and {s for _, s, _ in todo} == {0}
    assert "--cached-views" in todo[0][2] and str(study.EPOCHS[0]) in todo[0][2]
    assert study.plan([], task, "1") == [] and study.survivors([], task, 0) is None  # rung 0 unfinished
    # scores: the candidates' order in the list, worst first; "new" among the worst
    rows = [_row(task, c, 0, "0", 0.5 + 0.01 * i) for i, c in enumerate(cands)]
    keep = study.survivors(rows, task, 0)
    half = -(-len(cands) // 2)
    assert keep[:half] == sorted(cands, key=lambda c: -cands.index(c))[:half]
    assert keep[-1] == "new" and len(keep) == half + 1
    # rung 1 planned: the survivors, seeds 0 and 1; what is done is not planned again
    todo = study.plan(rows, task, "1")
    assert {(c, s) for c, s, _ in todo} == {(c, s) for c in keep for s in (0, 1)}
    rows.append(_row(task, keep[0], 0, "1", 0.9))
    assert (keep[0], 0) not in {(c, s) for c, s, _ in study.plan(rows, task, "1")}
    # another task's rows change nothing here
    assert study.plan(rows, "digits", "1") == []


def test_the_final_rung_confirms_on_the_full_path_with_three_seeds():
    task = "faces"
    rows = [_row(task, c, 0, "0", 0.5 + 0.01 * i) for i, c in enumerate(study.candidates_for(task))]
    keep0 = study.survivors(rows, task, 0)
    rows += [_row(task, c, s, "1", 0.6 + 0.01 * i) for i, c in enumerate(keep0) for s in (0, 1)]
    keep1 = study.survivors(rows, task, 1)
    assert "new" in keep1 and len(keep1) < len(keep0)
    final = study.plan(rows, task, "final")
    best = [c for c in keep1 if c != "new"][:study.FINALISTS]
    assert {(c, s) for c, s, _ in final} == {(c, s) for c in best + ["new"] for s in range(3)}
    assert final[0][2] == ["--cached-views", "0"]
    assert "| new |" in study.table(rows, [task])


def test_longer_training_joins_the_final_rung_on_the_elpv_targets():
    task = "elpv-binary"
    rows = [_row(task, c, 0, "0", 0.5 + 0.01 * i) for i, c in enumerate(study.candidates_for(task))]
    rows += [_row(task, c, s, "1", 0.6) for c in study.survivors(rows, task, 0) for s in (0, 1)]
    final = {c for c, _, _ in study.plan(rows, task, "final")}
    assert {"new", "e20", "e30"} <= final and len(final) == study.FINALISTS + 3
    runs = {c: flags for c, _, flags in study.plan(rows, task, "final")}
    assert study.CANDIDATES["e30"] == ["--epochs", "30"] and runs["e30"] == ["--cached-views", "0"]


def test_confirm_runs_the_named_candidates_and_new_on_the_full_path_where_missing():
    """--rungs confirm: the candidates a GPU study found, against "new", full path, 3 seeds, only the runs not yet
    in the file; scored by the kept model as the final rung."""
    rows = [_row("faces", "new", 0, "confirm", 0.8), _row("faces", "e20", 0, "confirm", 0.9)]
    todo = study.plan(rows, "faces", "confirm", ("e20",))
    assert sorted((c, s) for c, s, _ in todo) == [("e20", 1), ("e20", 2), ("new", 1), ("new", 2)]
    assert all(extra == ["--cached-views", "0"] for _, _, extra in todo)
    assert study.score(rows[1]) == 0.9


def test_posthoc_cross_fitting_chooses_on_one_half_and_scores_the_other():
    """bench/posthoc.py: halves are stratified, and a rare class the raw logits under-predict is found by the
    adjustment chosen on one half, scored on the other (balanced accuracy up, as the trade it measures)."""
    import numpy as np

    from bench import posthoc

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300, int), np.ones(30, int)]
    mask = posthoc.halves(y, rng)
    assert mask[y == 0].sum() == 150 and mask[y == 1].sum() == 15
    # class 1's logit is 1.5 lower than it should be: at tau 0 most of class 1 is called 0
    logits = np.stack([np.zeros(len(y)), np.where(y == 1, 0.8, -1.2) + rng.normal(0, 0.5, len(y)) - 1.5], 1)
    log_prior = np.log(np.bincount(y) / len(y))
    assert posthoc.choose(logits, y, log_prior, "balanced_accuracy", posthoc.WIDE) > 0
    out = posthoc.cross_fitted(logits, y, log_prior, repeats=3)
    assert out["none (tau 0)"]["tau"] == 0
    assert out["balanced_accuracy, 0-3"]["balanced_accuracy"] > out["none (tau 0)"]["balanced_accuracy"] + 0.1


def test_posthoc_fixed_and_bagged_rules():
    """bench/posthoc.py: a fixed tau is never chosen (every half gets it); the bagged rule (macro-F1 averaged over
    bootstrap resamples of the choosing half) finds the under-predicted rare class as plain macro-F1 does, and both
    beat no adjustment on balanced accuracy out of the half they chose on."""
    import numpy as np

    from bench import posthoc

    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(400, int), np.ones(40, int)]
    logits = np.stack([np.zeros(len(y)), np.where(y == 1, 0.8, -1.2) + rng.normal(0, 0.5, len(y)) - 1.5], 1)
    log_prior = np.log(np.bincount(y) / len(y))
    bagged = posthoc.choose(logits, y, log_prior, "bagged_macro_f1", posthoc.TODAY, np.random.default_rng(0))
    plain = posthoc.choose(logits, y, log_prior, "macro_f1", posthoc.TODAY)
    assert bagged > 0 and abs(bagged - plain) <= 0.25
    out = posthoc.cross_fitted(logits, y, log_prior, repeats=3)
    assert out["fixed tau 1 (Menon et al.)"]["tau"] == 1.0 and out["fixed tau 0.5"]["tau"] == 0.5
    bag = next(r for r in out if r.startswith("macro_f1 bagged"))
    for rule in (bag, "fixed tau 1 (Menon et al.)"):
        assert out[rule]["balanced_accuracy"] > out["none (tau 0)"]["balanced_accuracy"] + 0.1


def test_posthoc_summary_pairs_runs_within_their_validation_split_first():
    """bench/posthoc.py: runs of one seed share their validation images, so a rule's paired difference is averaged
    within each split before the mean ± se over splits (two runs on split A, one on B: A counts once)."""
    from bench import posthoc

    def row(split, today, none):
        rules = {r: {m: today for m in posthoc.METRICS} | {"tau": 0.5} for r in posthoc.RULES}
        rules["none (tau 0)"] = {m: none for m in posthoc.METRICS} | {"tau": 0.0}
        return {"run": f"/runs/{split}-{today}", "val_split": split, "rules": rules}

    # differences (points): split A -10 and -20 (mean -15), split B +5: over splits -5.0 ± 10.0
    rows = [row("A", 0.80, 0.70), row("A", 0.80, 0.60), row("B", 0.70, 0.75)]
    out = posthoc.summary(rows, repeats=1)
    assert "3 runs" in out and "2 validation splits" in out
    none = next(line for line in out.splitlines() if line.startswith("none (tau 0)"))
    assert "accuracy 0.683 (-5.0 ± 10.0)" in none


def test_posthoc_ordinal_rule_cuts_the_expected_level_and_finds_a_rare_middle_class():
    """bench/posthoc.py --ordered: the expected level cut at thresholds chosen on one half finds a middle class whose
    logit never wins the argmax, where no logit adjustment of today's grid does; its macro-F1 is training.metrics'."""
    import numpy as np

    from bench import posthoc
    from training.metrics import classification_metrics

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], [200, 60, 30, 100])
    # the middle class 2's images put their mass on its neighbours 1 and 3, never on 2 itself (a gap no logit
    # adjustment of today's grid closes: at most 1.5 x log(200 / 30) = 2.8): the argmax never answers 2, but their
    # expected level, about (1/3 + 1) / 2, sits between class 1's and class 3's
    base = np.array([[4.0, 0, 0, 0], [0, 4, 0, 0], [0, 3, -4, 3], [0, 0, 0, 4]])
    logits = base[y] + rng.normal(0, 0.5, (len(y), 4))
    log_prior = np.log(np.bincount(y) / len(y))
    level = posthoc.expected_level(logits)
    assert level.shape == y.shape and 0 <= level.min() and level.max() <= 1
    cuts = posthoc.choose_cuts(level, y, 4)
    assert list(cuts) == sorted(cuts) and len(cuts) == 3
    pred = posthoc.ordinal_answers(level, cuts)
    assert np.mean(pred[y == 2] == 2) > 0.5
    for p in (pred, rng.integers(0, 4, len(y))):
        assert posthoc.macro_f1_of(p, y, 4) == pytest.approx(
            classification_metrics(np.eye(4)[p], y, list("0123"))["macro_f1"])
    out = posthoc.cross_fitted(logits, y, log_prior, repeats=2, level=level)
    best_tau = max(out[r]["balanced_accuracy"] for r in posthoc.RULES)
    assert out[posthoc.ORDINAL]["balanced_accuracy"] > best_tau + 0.05
    assert posthoc.ORDINAL not in posthoc.cross_fitted(logits, y, log_prior, repeats=1)


def test_quality_reuse_takes_a_seed_from_the_json_file_when_its_folder_is_gone(tmp_path, monkeypatch):
    """bench.quality --reuse: a seed recorded in the --json file is not run again once the run folders are gone (a new
    machine), and only rows of the same task, side and flags count."""
    import json

    from bench import quality

    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    ran = []
    monkeypatch.setattr(quality, "task_folder", lambda task: ran.append(task) or tmp_path)
    kept = {"accuracy": 0.88, "wall_s": 1922.0, "seed_asked": 0}
    rows = [{"task": "elpv-binary", "side": "default-best", "extra": "--preset best", "runs": [kept]},
            {"task": "elpv-binary", "side": "default-best", "extra": "--other", "runs": [{**kept, "seed_asked": 1}]}]
    recorded = quality.recorded_runs(json.loads(json.dumps(rows)), "elpv-binary", "default-best", "--preset best")
    assert list(recorded) == [0]
    row = quality.run("elpv-binary", "default", 0, "cpu", [], True, "default-best", recorded.get(0))
    assert row == kept and ran == []
    # seed 1 is recorded for other flags only: it runs (here: fails at once, the data folder being empty)
    monkeypatch.setattr(quality, "subprocess", type("S", (), {"run": staticmethod(
        lambda *a, **k: type("R", (), {"returncode": 2, "stderr": "no images"})())}))
    row = quality.run("elpv-binary", "default", 1, "cpu", [], True, "default-best", recorded.get(1))
    assert row == {"error": "no images"} and ran == ["elpv-binary"]


def test_quality_reuse_keeps_every_task_of_the_json_file_while_it_rewrites_it(tmp_path, monkeypatch, capsys):
    """Two tasks recorded in the --json file: the first task's row rewrites the file before the second task is
    reached, and the second's seeds are still taken from the file as it was, not run again."""
    import json
    import sys

    from bench import quality

    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    monkeypatch.setattr(quality, "task_folder", lambda task: pytest.fail(f"{task} was run again"))
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"task": t, "side": "probe", "extra": "", "runs": [
        {"accuracy": acc, "balanced_accuracy": acc, "macro_f1": acc, "ece": 0.01, "wall_s": 40.0, "best_epoch": 0,
         "seed_asked": 0}]} for t, acc in (("faces", 1.0), ("digits", 0.88))]))
    monkeypatch.setattr(sys, "argv", ["quality", "--tasks", "faces,digits", "--seeds", "0", "--sides", "probe",
                                      "--reuse", "--json", str(path)])
    quality.main()
    assert [(r["task"], r["runs"][0]["accuracy"]) for r in json.loads(path.read_text())] == [("faces", 1.0),
                                                                                              ("digits", 0.88)]
    assert "accuracies [0.88]" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["quality", "--tasks", "digits", "--seeds", "0", "--sides", "probe", "--reuse",
                                      "--json", str(path)])
    quality.main()  # one task again: the other task's row stays in the file
    assert [r["task"] for r in json.loads(path.read_text())] == ["faces", "digits"]


def test_the_table_pairs_with_the_reference_its_rows_hold():
    """Round 3 on a GPU pairs every candidate with "r3-default" (bench/gpu_study.py), not round 1's "new"."""
    rows = [_row("elpv-fourclass", c, s, "gpu", base + 0.01 * s)
            for s in range(3) for c, base in (("r3-default", 0.5), ("r3-drop-issues", 0.53), ("r3-e30", 0.49))]
    out = study.table(rows, ["elpv-fourclass"])
    assert "minus r3-default" in out
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in out.splitlines() if ln.startswith("| r3-")}
    assert "+3.0 ± 0.0 pts" in lines["r3-drop-issues"] and "-1.0 ± 0.0 pts" in lines["r3-e30"]
    assert out.index("| r3-default") < out.index("| r3-drop-issues")  # the reference first


def test_pair_gives_each_seed_and_the_paired_difference(tmp_path, capsys):
    """bench.pair: two bench.quality files' sides, matched by task and seed; a seed only one side ran is left out;
    a bad argument is one line on stderr and status 2."""
    import json

    from bench import pair

    def side(name, accs):
        return [{"task": "elpv-binary", "side": name, "runs": [
            {"seed": s, "accuracy": a, "balanced_accuracy": a - 0.1, "macro_f1": a - 0.05, "wall_s": 10.0}
            for s, a in accs]}]

    (tmp_path / "a.json").write_text(json.dumps(side("new", [(0, 0.90), (1, 0.92), (2, 0.94)])))
    (tmp_path / "b.json").write_text(json.dumps(side("old", [(0, 0.89), (1, 0.89), (3, 0.5)])))
    assert pair.main([f"{tmp_path}/a.json:new", f"{tmp_path}/b.json:old"]) == 0
    out = capsys.readouterr().out
    assert "seeds [0, 1]" in out and "+2.0 ± 1.0 pts" in out  # (+1, +3): mean 2, se 1
    assert pair.main([f"{tmp_path}/a.json", f"{tmp_path}/b.json:old"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FILE:SIDE" in err


def test_study_table_of_another_tools_rows_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    """bench.recipe's rows (no rung) given to bench.study: a clear line, not a KeyError traceback."""
    path = tmp_path / "recipe.jsonl"
    path.write_text(json.dumps({"task": "elpv-binary", "candidate": "default", "seed": 0, "val_accuracy": 0.9}) + "\n")
    monkeypatch.setattr(sys, "argv", ["study", "--table", "--results", str(path)])
    with pytest.raises(SystemExit) as stop:
        study.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "not a study row" in err


def test_a_stopped_recipe_run_is_resumed_from_its_checkpoint_not_started_over(tmp_path, monkeypatch):
    """bench.recipe.run_one on a folder whose run stopped (last.pt, no metrics.json) passes --resume: the epochs
    already trained are kept as they ran (their timestamps), and the row says where it resumed. A finished folder
    (metrics.json there) is trained afresh, as before."""
    from bench import recipe
    from tests.conftest import TINY_FLAGS, make_shapes_folder

    make_shapes_folder(tmp_path / "task" / "train", n=16)
    monkeypatch.setattr(recipe, "WORK", tmp_path / "work")
    monkeypatch.setattr(recipe, "task_folder", lambda task: tmp_path / "task")
    monkeypatch.setitem(recipe.CANDIDATES, "tiny", [*TINY_FLAGS, "--epochs", "2", "--patience", "0"])
    first = recipe.run_one("shapes", "tiny", 0)
    assert "error" not in first and "resumed_at_epoch" not in first, first
    assert first["ran_on"] == recipe.ran_on()  # the code and machine it ran on, for the table's pairing
    out = recipe.run_dir("shapes", "tiny", 0)
    ran = json.loads((out / "metrics.json").read_text())["history"]
    assert recipe.interrupted_at(out) is None  # finished: nothing to resume
    (out / "metrics.json").unlink()  # what a run stopped after its last epoch's checkpoint leaves
    assert recipe.interrupted_at(out) == 2
    again = recipe.run_one("shapes", "tiny", 0)
    assert "error" not in again and again["resumed_at_epoch"] == 2, again
    assert json.loads((out / "metrics.json").read_text())["history"] == ran  # not one epoch trained again
    fresh = recipe.run_one("shapes", "tiny", 0)  # metrics.json is back: a new run, its own epochs
    assert "resumed_at_epoch" not in fresh
    assert json.loads((out / "metrics.json").read_text())["history"][0]["t_start"] != ran[0]["t_start"]


def test_the_recipe_table_leaves_a_resumed_runs_partial_wall_time_out_of_the_mean():
    from bench import recipe

    def row(cand, seed, acc, wall, **extra):
        return {"task": "elpv-fourclass", "candidate": cand, "seed": seed, "val_accuracy": acc, "wall_s": wall,
                **extra}

    rows = [row("default", 0, 0.80, 1000.0), row("default", 1, 0.78, 2000.0),
            row("r3-res224", 0, 0.81, 900.0), row("r3-res224", 1, 0.80, 100.0, resumed_at_epoch=9)]
    out = recipe.table({(r["task"], r["candidate"], r["seed"]): r for r in rows})
    default_line = next(line for line in out.splitlines() if "| default |" in line)
    res224_line = next(line for line in out.splitlines() if "| r3-res224 |" in line)
    assert default_line.endswith("| 1500 |")
    assert res224_line.endswith("| 900 (1 resumed, not counted) |")
    assert "+1.5 ± 0.5" in res224_line and "vs default (2 pairs: +1.0, +2.0)" in res224_line


def test_the_recipe_table_marks_pairs_whose_runs_ran_other_code_or_machines():
    """A pair is one computation only where both rows record the same code and machine (ran_on); the table says
    how many of a candidate's pairs are not, a row without the record counting as not."""
    from bench import recipe

    here = recipe.ran_on()
    assert here["cores"] >= 1 and here["torch"] and here["commit"]
    other = {**here, "commit": "0" * 40}

    def row(cand, seed, acc, on):
        return {"task": "elpv-fourclass", "candidate": cand, "seed": seed, "val_accuracy": acc, "wall_s": 1.0,
                **({"ran_on": on} if on else {})}

    def line(rows):
        out = recipe.table({(r["task"], r["candidate"], r["seed"]): r for r in rows})
        return next(x for x in out.splitlines() if "| r3-train-bn |" in x)

    same = [row("default", 0, 0.80, here), row("r3-train-bn", 0, 0.81, here),
            row("default", 1, 0.78, here), row("r3-train-bn", 1, 0.80, here)]
    assert "vs default (2 pairs: +1.0, +2.0)" in line(same) and "across" not in line(same)
    mixed = same[:3] + [row("r3-train-bn", 1, 0.80, other)]
    assert "(2 pairs: +1.0, +2.0); 1 of them across code or machines" in line(mixed)
    unrecorded = [row("default", 0, 0.80, None), *same[1:]]
    assert "; 1 of them across code or machines" in line(unrecorded)


def test_two_commits_are_one_computation_only_where_the_code_that_trains_is_the_same(tmp_path):
    """A commit that changes only the docs or bench/ trains as its parent did, so rows from the two pair as one
    computation; a commit that changes training/, uncommitted changes, a commit unknown here or another machine do
    not."""
    from bench import recipe

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    def commit(path, text):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", "-A")
        git("commit", "-qm", path)
        return git("rev-parse", "HEAD")

    git("init", "-q")
    for d in recipe.CODE:
        commit(f"{d}/a.py", "x = 1\n")
    first = commit("BENCHMARKS.md", "one\n")
    docs_only = commit("BENCHMARKS.md", "two\n")
    bench_only = commit("bench/recipe.py", "y = 2\n")
    trains_other = commit("training/a.py", "x = 2\n")
    machine = {"cpu": "AMD EPYC", "isa": ["avx2"], "cores": 2, "torch": "2.14.1"}

    def same(c1, c2, **other):
        return recipe.same_computation({"ran_on": {**machine, "commit": c1}},
                                       {"ran_on": {**machine, "commit": c2, **other}}, root=tmp_path)

    assert same(first, docs_only) and same(first, bench_only) and same(docs_only, first)
    assert not same(first, trains_other) and not same(bench_only, trains_other)
    assert not same(first, docs_only + "+changes") and not same(first, "f" * 40)
    assert not same(first, docs_only, cores=16) and not same(first, first, cpu="Intel Xeon")


def test_the_recipe_resolution_pools_the_paired_spread_of_every_candidate(tmp_path, monkeypatch, capsys):
    """`--resolution FILE ...`: the sd of a paired difference pooled over the candidates (each around its own mean,
    so a real effect is not noise), a pair held by two files counted once, a candidate with fewer than 3 pairs left
    out, and the seeds a 2- or 3-point difference needs; another option beside it is refused with status 2."""
    from bench import recipe

    def rows(cand, diffs, base=0.70):
        return [{"task": "elpv-fourclass", "candidate": "default", "seed": s, "val_accuracy": base,
                 "val_balanced_accuracy": base, "val_macro_f1": base} for s in range(len(diffs))] + [
            {"task": "elpv-fourclass", "candidate": cand, "seed": s, "val_accuracy": base + d / 100,
             "val_balanced_accuracy": base + d / 100, "val_macro_f1": base + d / 100} for s, d in enumerate(diffs)]

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    # r3-e30: +1, +3, +5 around 3 (sum of squares 8, 2 df); r3-mixup: -1, +1, -1, +1 around 0 (4, 3 df);
    # r3-freeze0 has 2 pairs only. Pooled: sqrt(12 / 5) = 1.55 points
    a.write_text("".join(json.dumps(r) + "\n" for r in rows("r3-e30", [1, 3, 5]) + rows("r3-freeze0", [9, -9])))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows("r3-mixup", [-1, 1, -1, 1]) + rows("r3-e30", [1, 3, 5])))
    out = recipe.resolution([a, b])
    line = next(x for x in out.splitlines() if "balanced_accuracy" in x)
    assert "paired sd 1.5 pts over 2 candidates (5 degrees of freedom)" in line
    assert "one se at 3 seeds 0.9 pts" in line and "2 pts: 5 seeds, 3 pts: 3 seeds" in line
    assert recipe.resolution([a]).count("over 1 candidates (2 degrees of freedom)") == 3
    monkeypatch.setattr(sys, "argv", ["recipe", "--resolution", str(a), str(b), "--tasks", "elpv-binary"])
    recipe.main()
    assert "no candidate has 3 pairs" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["recipe", "--resolution", str(a), "--table"])
    with pytest.raises(SystemExit) as stop:
        recipe.main()
    assert stop.value.code == 2 and "--resolution takes only --tasks" in capsys.readouterr().err


def test_the_recipe_table_shows_only_the_tasks_seeds_and_candidates_asked_for(tmp_path, monkeypatch, capsys):
    """`--table --seeds/--tasks/--candidates` choose the rows (a candidate brings the baseline it pairs with); a bad
    --seeds exits with status 2, one line on stderr saying why."""
    from bench import recipe

    path = tmp_path / "rows.jsonl"
    rows = [{"task": t, "candidate": c, "seed": s, "val_accuracy": 0.7 + 0.01 * s + (0.05 if c == "r3-e30" else 0),
             "wall_s": 100.0} for t in ("elpv-fourclass", "elpv-binary") for c in ("default", "r3-e30", "r3-mixup")
            for s in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sys, "argv", ["recipe", "--table", "--results", str(path), "--tasks", "elpv-fourclass",
                                      "--seeds", "1,3", "--candidates", "r3-e30"])
    recipe.main()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| elpv")]
    assert [ln.split(" | ")[1] for ln in lines] == ["default", "r3-e30"]
    assert all(ln.split(" | ")[2] == "2" for ln in lines)
    assert "0.720 ± 0.014" in lines[0] and "(2 pairs: +5.0, +5.0)" in lines[1]
    monkeypatch.setattr(sys, "argv", ["recipe", "--table", "--results", str(path), "--seeds", "1-3"])
    with pytest.raises(SystemExit) as stop:
        recipe.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("recipe: --seeds '1-3'")


def test_the_recipe_pool_pairs_each_file_its_own_way_and_pools_the_pairs(tmp_path, monkeypatch, capsys):
    """`--pool FILE:CANDIDATE:BASELINE ...`: each file's pairs are that file's candidate minus its baseline on the
    seeds both ran (a seed with one side only is no pair), and all pairs together give one mean ± se per metric."""
    from bench import recipe

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"task": "elpv-fourclass", "candidate": c, "seed": s, "wall_s": 1.0,
                                            "val_accuracy": a, "val_balanced_accuracy": a / 2,
                                            "val_macro_f1": a / 4}) + "\n" for c, s, a in rows))
        return path

    # file "a": big minus default is +0.02 and +0.04; file "b" names its sides the other way round: +0.06; seed 9
    # of "b" has no baseline row and pairs with nothing
    a = write("a.jsonl", [("default", 0, 0.70), ("big", 0, 0.72), ("default", 1, 0.60), ("big", 1, 0.64)])
    b = write("b.jsonl", [("small", 5, 0.50), ("default", 5, 0.56), ("default", 9, 0.9)])
    monkeypatch.setattr(sys, "argv", ["recipe", "--pool", f"{a}:big:default", f"{b}:default:small"])
    recipe.main()
    out = capsys.readouterr().out
    assert "elpv-fourclass: 3 pairs, a.jsonl s0, a.jsonl s1, b.jsonl s5" in out
    assert "accuracy           +4.0 ± 1.2 pts  (+2.0, +4.0, +6.0)" in out  # sd 2.0 / sqrt(3)
    assert "balanced_accuracy  +2.0 ± 0.6 pts" in out
    monkeypatch.setattr(sys, "argv", ["recipe", "--pool", f"{tmp_path / 'none.jsonl'}:big:default"])
    with pytest.raises(SystemExit) as stop:
        recipe.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "none.jsonl" in err
    # an option --pool would not apply is refused, not silently dropped
    monkeypatch.setattr(sys, "argv", ["recipe", "--pool", f"{a}:big:default", "--table"])
    with pytest.raises(SystemExit) as stop:
        recipe.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--table" in err


def test_a_recipe_row_scores_the_kept_model_with_and_without_its_logit_adjustment(tmp_path, monkeypatch):
    """A real run with --balance posthoc: its row's unadjusted_val_* are the kept model's own answers on its
    validation images (read back through the served Predictor, no bias added), and its val_* those answers with the
    adjustment it chose. A run with no adjustment scores the same both ways; a metrics.json from before the per-tau
    record gives the macro-F1 it kept and None for the rest, which the table leaves out."""
    from bench import recipe
    from bench.posthoc import scores
    from bench.tta import val_logits
    from tests.conftest import TINY_FLAGS
    from tests.test_fit import make_rare_class

    make_rare_class(tmp_path / "task" / "train")  # 10:1 and ambiguous: the adjustment has answers to move
    monkeypatch.setattr(recipe, "WORK", tmp_path / "work")
    monkeypatch.setattr(recipe, "task_folder", lambda task: tmp_path / "task")
    monkeypatch.setitem(recipe.CANDIDATES, "tiny", [*TINY_FLAGS, "--epochs", "4", "--patience", "0", "--img-size",
                                                    "24", "--stages", "finetune", "--crop", "rrc"])
    row = recipe.run_one("shapes", "tiny", 0, extra=["--balance", "posthoc"])
    assert "error" not in row, row
    out = recipe.run_dir("shapes", "tiny", 0)
    logits, y, classes, pred = val_logits(out)
    own, adjusted = scores(logits, y, len(classes)), scores(logits + pred.bias, y, len(classes))
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert row[f"unadjusted_val_{k}"] == pytest.approx(own[k], abs=1e-9), k
        assert row[f"val_{k}"] == pytest.approx(adjusted[k], abs=1e-9), k
    m = json.loads((out / "metrics.json").read_text())
    assert own != adjusted  # the adjustment this split chose changed answers: the two sides can tell them apart
    assert m["logit_adjustment"]["val_accuracy"][str(float(m["logit_adjustment"]["tau"]))] == row["val_accuracy"]
    plain = recipe.run_one("shapes", "tiny", 1, extra=["--balance", "none"])
    assert all(plain[f"unadjusted_val_{k}"] == plain[f"val_{k}"] for k in ("accuracy", "macro_f1"))
    old = {"val": m["val"], "logit_adjustment": {"tau": 0.5, "val_macro_f1": {"0.0": 0.5, "0.5": 0.6}}}
    assert recipe.unadjusted_figures(old) == {"unadjusted_val_accuracy": None, "unadjusted_val_balanced_accuracy": None,
                                              "unadjusted_val_macro_f1": 0.5}
    rows = {("t", "default", 0): {**row, "candidate": "default"}, ("t", "r3-e30", 0): {**row, "wall_s": 1.0},
            ("t", "r3-e30", 1): {**row, "wall_s": 1.0, "unadjusted_val_accuracy": None}}
    lines = recipe.table(rows, "unadjusted_val_accuracy").splitlines()
    assert "validation unadjusted_accuracy" in lines[0]
    assert [ln.split(" | ")[1:3] for ln in lines[2:]] == [["default", "1"], ["r3-e30", "1"]]


def test_the_recipe_table_reports_what_the_logit_adjustment_changed_within_each_run():
    """--metric adjustment_val_*: each run's kept figure minus its own unadjusted one, mean ± sd over the runs, and
    the candidate's change paired against its baseline's on the same seed; a run without an unadjusted figure is
    left out rather than counted as no change."""
    from bench import recipe

    def row(cand, kept, own):
        return {"candidate": cand, "wall_s": 1.0, "val_accuracy": kept, "unadjusted_val_accuracy": own}

    rows = {("t", "default", 0): row("default", 0.80, 0.78), ("t", "default", 1): row("default", 0.70, 0.74),
            ("t", "r3-e30", 0): row("r3-e30", 0.75, 0.80), ("t", "r3-e30", 1): row("r3-e30", 0.90, 0.90),
            ("t", "r3-e30", 2): row("r3-e30", 0.90, None)}
    lines = recipe.table(rows, "adjustment_val_accuracy").splitlines()
    assert "validation adjustment_accuracy" in lines[0]
    cells = [ln.split(" | ") for ln in lines[2:]]
    assert [c[1:4] for c in cells] == [["default", "2", "-0.010 ± 0.042"], ["r3-e30", "2", "-0.025 ± 0.035"]]
    assert "(2 pairs: -7.0, +4.0)" in cells[1][4]  # (-0.05 - 0.02) and (0.00 - -0.04), in points


def test_quality_figures_of_an_ensemble_run_give_the_size_that_ran_and_its_members_epochs(tmp_path):
    """An --ensemble run's config.yaml says what was asked (img_size 0: auto); its artifact says what ran."""
    from bench import quality

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({
        "architecture": "tf_efficientnet_lite0", "num_classes": 2, "label_names": ["a", "b"],
        "pretrained_cfg": {"input_size": [3, 288, 288], "mean": [0.5] * 3, "std": [0.5] * 3}}))
    (tmp_path / "config.yaml").write_text("img_size: 0\n")
    test = {"accuracy": 0.8, "balanced_accuracy": 0.6, "macro_f1": 0.6, "ece": 0.05}
    (tmp_path / "metrics.json").write_text(json.dumps({
        "test": test, "best_epoch": None, "val": {"accuracy": 0.79}, "reproducibility": {"seed": 3},
        "kept": {"kept": "ensemble", "members": [{"best_epoch": 16}, {"best_epoch": 20}]}}))
    row = quality.figures(tmp_path, 10.0)
    assert row["img_size"] == 288 and row["best_epoch"] == [16, 20] and row["accuracy"] == 0.8


def test_the_fidelity_table_pairs_each_figure_by_seed_and_ranks_the_candidates_means():
    """bench.cached_views' fidelity table: per candidate and figure, cached minus ordinary paired by seed; the
    Spearman correlation of the candidates' means; a row without the figure leaves its pair out; a loss is printed
    as it is, not in points."""
    from bench import cached_views

    rows = {}
    figures = {"a": (0.80, 0.81), "b": (0.70, 0.72), "c": (0.60, 0.58), "d": (0.50, 0.49)}
    for cand, (ordinary, cached) in figures.items():
        for seed, jitter in enumerate((0.0, 0.01, -0.01)):
            for views, v in ((0, ordinary), (4, cached)):
                rows[("t", cand, seed, views)] = {"val_accuracy": v + jitter, "finetune_val_loss": 1 - v,
                                                  "wall_s": 1.0}
    del rows[("t", "d", 2, 4)]["finetune_val_loss"]
    table = cached_views.fidelity_table(rows, "t", list(figures), [0, 1, 2], 4)
    assert "| a | 3 | 0.800 ± 0.010 | 0.810 ± 0.010 | +1.0 ± 0.0 pts |" in table
    assert "| c | 3 | 0.600 ± 0.010 | 0.580 ± 0.010 | -2.0 ± 0.0 pts |" in table
    assert "mean val_accuracy: +1.00" in table and "cached:   a > b > c > d" in table
    loss = cached_views.fidelity_table(rows, "t", list(figures), [0, 1, 2], 4, "finetune_val_loss")
    assert "| d | 2 | 0.500 ± 0.000 | 0.510 ± 0.000 | +0.010 ± 0.000 |" in loss
    rows[("t", "a", 0, 4)]["val_accuracy"] = rows[("t", "a", 1, 4)]["val_accuracy"] = 0.40
    rows[("t", "a", 2, 4)]["val_accuracy"] = 0.40
    moved = cached_views.fidelity_table(rows, "t", list(figures), [0, 1, 2], 4)
    assert "mean val_accuracy: -0.20" in moved and "cached:   b > c > d > a" in moved


def test_a_subsampled_recipe_trains_on_a_fraction_of_the_defaults_training_images_and_the_same_validation(
        tmp_path, monkeypatch):
    """bench.recipe's r3-data80 kind: the seed's `default` run's validation images unchanged, a stratified 80 % of its
    training images, through `pupil train DATA --labels` (the split a run records is what it trained on). The task
    folder is symlinks to files elsewhere, as bench.quality's ELPV folders are."""
    import os

    from bench import recipe
    from tests.conftest import TINY_FLAGS, make_shapes_folder

    real = make_shapes_folder(tmp_path / "real", classes=("red", "blue", "green"), n=20)
    for f in real.rglob("*.png"):
        (tmp_path / "task" / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(f, tmp_path / "task" / "train" / f.parent.name / f.name)
    monkeypatch.setattr(recipe, "WORK", tmp_path / "work")
    monkeypatch.setattr(recipe, "task_folder", lambda task: tmp_path / "task")
    tiny = [*TINY_FLAGS, "--epochs", "1", "--patience", "0", "--stages", "finetune"]
    monkeypatch.setitem(recipe.CANDIDATES, "default", tiny)
    monkeypatch.setitem(recipe.CANDIDATES, "less", tiny)
    monkeypatch.setitem(recipe.SUBSAMPLE, "less", 0.5)
    missing = recipe.run_one("shapes", "less", 3)
    assert "run the `default` candidate of this seed first" in missing["error"]
    assert "error" not in recipe.run_one("shapes", "default", 3)
    row = recipe.run_one("shapes", "less", 3)
    assert "error" not in row, row
    full = json.loads((recipe.run_dir("shapes", "default", 3) / "split.json").read_text())
    half = json.loads((recipe.run_dir("shapes", "less", 3) / "split.json").read_text())
    assert sorted(half["val"]) == sorted(full["val"]) and half["classes"] == full["classes"]
    assert set(half["train"]) < set(full["train"])
    for c in full["classes"]:
        n = sum(p.startswith(c + "/") for p in full["train"])
        assert sum(p.startswith(c + "/") for p in half["train"]) == round(0.5 * n)
    assert "--labels" in row["flags"]
    # seeded: the same rows again; another seed draws another half
    assert recipe.subsample_labels(full, 0.5, 3) == recipe.subsample_labels(full, 0.5, 3)
    assert recipe.subsample_labels(full, 0.5, 3) != recipe.subsample_labels(full, 0.5, 4)
