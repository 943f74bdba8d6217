"""bench/ensemble.py: averaging fine-tunes of one validation split, cross-fitted, against its members alone."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bench import ensemble


def _members(noise, seed=0, n=400):
    """Runs of one split: the true class's logit lifted by 1.5 under each run's own noise (class 3 rare)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n // 4, int), np.full(n // 5, 2), np.full(n - n // 2 - n // 4 - n // 5, 3)]
    prior = np.log(np.bincount(y) / len(y))
    out = []
    for s in noise:
        logits = 1.5 * np.eye(4)[y] + prior + rng.normal(0, s, (len(y), 4))
        out.append({"run": f"/runs/r{len(out)}", "logits": logits, "y": y, "log_prior": prior, "split": "A"})
    return out


def test_two_runs_with_their_own_noise_answer_better_together_and_a_copy_adds_nothing():
    m = _members([1.2, 1.2, 1.2])
    g = ensemble.judge_group(m, repeats=4)
    pairs = [e for e in g["ensembles"] if e["size"] == 2]
    assert len(pairs) == 3 and [e["size"] for e in g["ensembles"]].count(3) == 1
    for e in pairs:  # independent errors average out: accuracy and balanced accuracy up
        assert e["gain"]["accuracy"] > 2 and e["gain"]["unadjusted_accuracy"] > 2
        assert e["gain"]["balanced_accuracy"] > 2
    trio = next(e for e in g["ensembles"] if e["size"] == 3)
    assert trio["gain"]["accuracy"] > np.mean([e["gain"]["accuracy"] for e in pairs])
    # the same model twice is the model: no gain on any figure, to the digit
    same = ensemble.judge_group([m[0], {**m[0], "run": "/runs/copy"}], repeats=4)
    assert all(abs(v) < 1e-9 for v in same["ensembles"][0]["gain"].values())


def test_against_the_first_run_alone_a_weak_first_run_gains_more_than_against_the_members_mean():
    m = _members([2.0, 0.8, 0.8])  # the first run is the noisy one
    g = ensemble.judge_group(m, repeats=4)
    first = {tuple(e["members"]): e for e in g["ensembles"]}
    assert "gain_vs_first" not in first[(1, 2)] and "gain_vs_first" in first[(0, 1, 2)]
    e = first[(0, 1)]
    for k in ("accuracy", "balanced_accuracy"):
        assert e["gain_vs_first"][k] == pytest.approx(100 * (e["figures"][k] - g["alone"][0][k]))
        assert e["gain_vs_first"][k] > e["gain"][k] + 1
    text = ensemble.summary([g], repeats=4)
    line = next(x for x in text.splitlines() if x.startswith("pairs vs first"))
    want = np.mean([first[p]["gain_vs_first"]["accuracy"] for p in ((0, 1), (0, 2))])
    assert f"accuracy {want:+.1f}" in line


def test_runs_that_disagree_on_their_labels_are_not_one_split():
    m = _members([1.0, 1.0])
    m[1] = {**m[1], "y": np.roll(m[1]["y"], 1)}
    with pytest.raises(ValueError, match="disagree"):
        ensemble.judge_group(m, repeats=2)


def test_the_summary_averages_within_each_split_first():
    """Split A's two pairs gain +2 and +4 (mean +3), split B's one pair +1: over the splits +2.0 ± 1.0."""
    def group(gains):
        return {"ensembles": [{"size": 2, "gain": {k: g for k in ensemble.METRICS} |
                               {f"unadjusted_{k}": g for k in ensemble.METRICS}} for g in gains]}

    out = ensemble.summary([group([2.0, 4.0]), group([1.0])], repeats=1)
    assert "pairs    (2 splits)  accuracy +2.0 ± 1.0" in out


def _run_dir(path, member, classes=("a", "b", "c", "d")):
    """A finished run's folder as bench.ensemble reads it, its validation logits already cached beside it."""
    path.mkdir(parents=True)
    y = member["y"]
    val = [f"{classes[c]}/{i}.png" for i, c in enumerate(y)]
    (path / "split.json").write_text(json.dumps({"classes": list(classes), "val": val}))
    counts = np.bincount(y, minlength=len(classes))
    (path / "metrics.json").write_text(json.dumps({"counts": {"train": dict(zip(classes, counts.tolist()))}}))
    np.savez(path / ensemble.CACHE, logits=member["logits"], y=y)
    return path


def test_the_command_groups_runs_by_their_split_and_writes_its_figures(tmp_path, monkeypatch, capsys):
    m = _members([1.2, 1.2], n=200)
    a, b = _run_dir(tmp_path / "a", m[0]), _run_dir(tmp_path / "b", m[1])
    lone = _run_dir(tmp_path / "c", _members([1.0], seed=3, n=120)[0])  # another split: its only run
    out = tmp_path / "ens.json"
    monkeypatch.setattr(sys, "argv", ["ensemble", str(a), str(b), str(lone), "--repeats", "2", "--json", str(out)])
    ensemble.main()
    text = capsys.readouterr().out
    assert "c: the only run of its validation split, left out" in text and "pairs    (1 splits)" in text
    groups = json.loads(out.read_text())
    assert len(groups) == 1 and groups[0]["n"] == 200 and len(groups[0]["ensembles"]) == 1
    # runs that share no split: one line on stderr, status 2
    monkeypatch.setattr(sys, "argv", ["ensemble", str(a), str(lone)])
    with pytest.raises(SystemExit) as e:
        ensemble.main()
    assert e.value.code == 2 and "no two runs share a validation split" in capsys.readouterr().err


def test_every_combination_of_each_size_asked_and_the_figures_per_size(tmp_path, monkeypatch, capsys):
    m = _members([1.4, 1.4, 1.4, 1.4], seed=5)
    g = ensemble.judge_group(m, repeats=3, sizes=[3, 2, 9])  # 9: more runs than the split has, left out
    got = [tuple(e["members"]) for e in g["ensembles"]]
    assert [len(t) for t in got] == [2] * 6 + [3] * 4 and len(set(got)) == 10
    mean = {k: np.mean([e["figures"]["accuracy"] for e in g["ensembles"] if e["size"] == k]) for k in (2, 3)}
    alone = np.mean([a["accuracy"] for a in g["alone"]])
    assert alone + 0.02 < mean[2] < mean[3]  # independent noise: each run more averages more of it out
    text = ensemble.summary([g, g], repeats=3)
    assert f"size 1 (2 splits)  accuracy {alone:.3f} ± 0.000" in text
    assert f"size 3 (2 splits)  accuracy {mean[3]:.3f} ± 0.000" in text and "3 runs   (2 splits)" in text
    assert f"3 minus 2 (2 splits)  accuracy {100 * (mean[3] - mean[2]):+.1f} ± 0.0" in text
    runs = [_run_dir(tmp_path / f"r{i}", x) for i, x in enumerate(m)]
    for bad, why in (("1,2", "two runs or more"), ("2,x", "whole numbers")):
        monkeypatch.setattr(sys, "argv", ["ensemble", *map(str, runs), "--sizes", bad])
        with pytest.raises(SystemExit) as e:
            ensemble.main()
        assert e.value.code == 2 and why in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["ensemble", *map(str, runs), "--sizes", "4", "--repeats", "2"])
    ensemble.main()
    out = capsys.readouterr().out
    assert "  0+1+2+3: accuracy" in out and "  0+1: " not in out
