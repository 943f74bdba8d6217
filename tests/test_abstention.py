"""Abstention: a threshold chosen on validation keeps accepted answers precise; unseen things are 'not sure'."""
from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from training.evaluate import choose_threshold


def test_threshold_is_the_lowest_that_meets_the_precision_target():
    # confidences 0.99..0.5; the two least confident are wrong
    probs = np.array([[p, 1 - p] for p in (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5)])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    t = choose_threshold(probs, labels, 0.95)
    assert t["threshold"] == pytest.approx(0.6) and t["coverage"] == 0.75 and t["precision"] == 1.0 and t["met"]
    t = choose_threshold(probs, labels, 0.7)
    assert t["threshold"] == pytest.approx(0.5) and t["coverage"] == 1.0
    bad = choose_threshold(probs, 1 - labels, 0.95)
    assert bad["met"] is False and bad["threshold"] is not None


def test_an_unseen_class_mostly_abstains_and_accepted_answers_meet_the_target(tmp_path):
    from models.predictor import Predictor
    from tests.conftest import make_shapes_folder
    from training.fit import TrainConfig, fit

    data = make_shapes_folder(tmp_path / "two", classes=("red", "blue"), n=60)
    r = fit(TrainConfig(data=str(data), model="small_cnn", width=8, img_size=32, epochs=10, batch_size=8,
                        out=str(tmp_path / "run"), progress=False, workers=1))
    cfg = json.loads((r.artifact_dir / "config.json").read_text())
    assert cfg["threshold"] is not None and cfg["abstention"]["met"]
    pred = Predictor(r.artifact_dir)
    fresh = make_shapes_folder(tmp_path / "new", classes=("red", "blue", "green"), n=40, seed=99)
    answers = {c: pred.predict(sorted((fresh / c).iterdir())) for c in ("red", "blue", "green")}
    green_abstained = np.mean([a["abstained"] for a in answers["green"]])
    accepted = [(c, a) for c in ("red", "blue") for a in answers[c] if not a["abstained"]]
    precision = np.mean([a["predictions"][0]["label"] == c for c, a in accepted])
    assert green_abstained >= 0.6, green_abstained
    assert precision >= 0.95 and len(accepted) >= 40
    forced = pred.predict(sorted((fresh / "green").iterdir())[:5], threshold=0.0)
    assert not any(a["abstained"] for a in forced)


def test_service_reports_abstention_and_accepts_a_threshold(server):
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (128, 128, 128)).save(buf, format="PNG")
    r = httpx.post(f"{server.url}/classify", files={"image": ("g.png", buf.getvalue(), "image/png")},
                   data={"threshold": "1.0"})
    assert r.status_code == 200 and r.json()["abstained"] is True and r.json()["threshold"] == 1.0
    r = httpx.post(f"{server.url}/classify", files={"image": ("g.png", buf.getvalue(), "image/png")},
                   data={"threshold": "0"})
    assert r.json()["abstained"] is False
    r = httpx.post(f"{server.url}/classify", files={"image": ("g.png", buf.getvalue(), "image/png")},
                   data={"threshold": "2"})
    assert r.status_code == 400 and r.json()["error"] == "bad_threshold"


def test_field_log_keeps_unsure_requests_as_a_folder_pupil_check_reads(trained_run, tmp_path):
    import subprocess
    import sys

    from tests.conftest import Server

    field = tmp_path / "field"
    # log answers under 1.5: every answer, whatever the model's confidence
    s = Server(trained_run, env={"PUPIL_FIELD_LOG": str(field), "PUPIL_FIELD_LOG_IMAGES": "1",
                                 "PUPIL_FIELD_LOG_BELOW": "1.5"}).wait_ready()
    try:
        d = trained_run.parent / "data"
        for c in ("red", "blue"):
            for i in range(3):
                img = (d / c / f"{c}_{i:03d}.png").read_bytes()
                r = httpx.post(f"{s.url}/classify", files={"image": (f"{c}{i}.png", img, "image/png")})
                assert r.status_code == 200
    finally:
        s.stop()
    lines = [json.loads(x) for x in (field / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(x["image"] and x["predictions"] for x in lines)
    assert {x["filename"] for x in lines} == {"red0.png", "red1.png", "red2.png", "blue0.png", "blue1.png", "blue2.png"}
    r = subprocess.run([sys.executable, "-m", "training", "check", str(field / "images"), "--json"],
                       capture_output=True, text=True, timeout=120)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["classes"] == {"blue": 3, "red": 3}
