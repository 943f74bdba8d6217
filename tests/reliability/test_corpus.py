"""Every awkward and broken file through `pupil check`, training and every HTTP route: accepted or refused with its
documented problem/status; no crash, no 500, no hang."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.conftest import make_shapes_folder
from tests.corpus import bad_files, big_jpeg, good_files
from training.fit import fit

GOOD = good_files()
GOOD["dslr_24mp.jpg"] = (big_jpeg(), (6000, 4000))
BAD = bad_files()
STATUS = {"empty": 400, "not_an_image": 400, "corrupt": 400, "truncated": 400, "too_many_pixels": 413,
          "unsupported_format": 415}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = make_shapes_folder(tmp_path_factory.mktemp("corpus") / "data", n=12)
    for name, (data, _) in GOOD.items():
        (root / "red" / f"odd {name}").write_bytes(data)
    for name, (data, _) in BAD.items():
        (root / "blue" / f"bad {name}").write_bytes(data)
    return root


def test_check_reports_every_broken_file_and_accepts_every_good_one(corpus_dir):
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(corpus_dir), "--json"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    found = {p["path"]: p["problem"] for p in report["problems"]}
    assert found == {f"blue/bad {n}": problem for n, (_, problem) in BAD.items()}
    assert report["classes"] == {"blue": 12, "red": 12 + len(GOOD)}


def test_training_skips_exactly_the_broken_files(corpus_dir, tiny_config):
    r = fit(tiny_config(corpus_dir, epochs=2, workers=2))
    skipped = {s["path"]: s["problem"] for s in r.metrics["skipped"]}
    assert skipped == {f"blue/bad {n}": problem for n, (_, problem) in BAD.items()}
    assert sum(r.metrics["counts"]["train"].values()) + sum(r.metrics["counts"]["val"].values()) == 24 + len(GOOD)


@pytest.mark.parametrize("route", ["classify", "classify_batch", "explain"])
def test_every_route_answers_every_file_with_its_documented_status(server, route):
    field = "images" if route == "classify_batch" else "image"
    for name, (data, _) in list(GOOD.items()) + list(BAD.items()):
        expected = STATUS[BAD[name][1]] if name in BAD else 200
        r = httpx.post(f"{server.url}/{route}", files={field: (name, data, "application/octet-stream")}, timeout=60)
        assert r.status_code < 500, (name, r.status_code, r.text[:300])
        if route == "classify_batch":
            assert r.status_code == 200
            entry = r.json()[0]
            if name in BAD:
                assert (entry["status"], entry["error"]) == (expected, BAD[name][1]), name
            else:
                assert "predictions" in entry, name
        else:
            assert r.status_code == expected, (name, r.text[:300])
            if name in BAD:
                assert r.json()["error"] == BAD[name][1]
    assert server.alive()
