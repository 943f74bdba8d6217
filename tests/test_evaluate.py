"""training/evaluate.py, report.py and models/gradcam.py: numbers checked by hand, calibration, Grad-CAM, the page."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from training.evaluate import classification_metrics, evaluate_logits, expected_calibration_error, fit_temperature


def test_metrics_match_hand_computed_values():
    # 3 classes, 6 images. Predictions: a a b | b b c  for truths a a a | b c c
    probs = np.array([[.9, .05, .05], [.6, .3, .1], [.2, .7, .1], [.1, .8, .1], [.2, .5, .3], [.1, .2, .7]])
    labels = np.array([0, 0, 0, 1, 2, 2])
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recall a 2/3, b 1/1, c 1/2 -> balanced 13/18; precision a 2/2, b 1/3, c 1/1
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * (1 / 3) * 1 / (1 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["weighted_f1"] == pytest.approx((3 * f1[0] + f1[1] + 2 * f1[2]) / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [0, 1, 1]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(1 / 3), "recall": 1.0, "f1": pytest.approx(0.5), "support": 1}
    assert m["nll"] == pytest.approx(-np.mean(np.log([.9, .6, .2, .8, .3, .7])))
    # ECE with 15 bins: each prediction alone in its bin except .6 and .7 ... computed directly
    conf, correct = probs.max(1), (probs.argmax(1) == labels)
    edges = np.linspace(0, 1, 16)
    ece = sum(abs(correct[(conf > lo) & (conf <= hi)].mean() - conf[(conf > lo) & (conf <= hi)].mean())
              * ((conf > lo) & (conf <= hi)).mean() for lo, hi in zip(edges[:-1], edges[1:]) if ((conf > lo) & (conf <= hi)).any())
    assert expected_calibration_error(probs, labels) == pytest.approx(ece)


def test_metrics_agree_with_scikit_learn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) + np.eye(4)[rng.integers(0, 4, 200)] * 1.5
    labels = rng.integers(0, 4, 200)
    probs = torch.softmax(torch.tensor(logits), -1).numpy()
    m = classification_metrics(probs, labels, list("abcd"))
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(labels, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(sk.f1_score(labels, pred, average="weighted"))
    assert m["nll"] == pytest.approx(sk.log_loss(labels, probs), rel=1e-6)
    assert m["confusion_matrix"] == sk.confusion_matrix(labels, pred).tolist()
    full = evaluate_logits(torch.tensor(logits), torch.tensor(labels), list("abcd"), 1.0)
    assert full["top_k_accuracy"]["top3"] == pytest.approx(sk.top_k_accuracy_score(labels, probs, k=3))


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(1)
    labels = torch.tensor(rng.integers(0, 3, 500))
    logits = torch.tensor(rng.normal(size=(500, 3))) + 1.2 * torch.nn.functional.one_hot(labels, 3)
    overconfident = logits * 6  # right about 60% of the time, sure about it nearly always
    nll = lambda lg: float(torch.nn.functional.cross_entropy(lg.float(), labels))  # noqa: E731
    t = fit_temperature(overconfident, labels)
    assert t > 2
    assert nll(overconfident / t) < nll(overconfident) * 0.6
    before = evaluate_logits(overconfident, labels, list("abc"), 1.0)
    after = evaluate_logits(overconfident, labels, list("abc"), t)
    assert after["ece"] < before["ece"] / 2 and after["accuracy"] == before["accuracy"]


def _corner_patch_folder(root, n=40, size=48, seed=0):
    """Class 'patch': a bright square in the top-left corner over noise; class 'plain': noise only."""
    rng = np.random.default_rng(seed)
    for c in ("patch", "plain"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(60, 140, (size, size, 3)).astype(np.uint8)
            if c == "patch":
                a[2:16, 2:16] = (250, 220, 30)
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def test_gradcam_peaks_on_the_deciding_corner(tmp_path):
    from models import load_artifact
    from models.gradcam import gradcam
    from models.predictor import Predictor
    from training.fit import TrainConfig, fit

    data = _corner_patch_folder(tmp_path / "d")
    r = fit(TrainConfig(data=str(data), model="small_cnn", width=16, img_size=48, epochs=10, batch_size=8,
                        out=str(tmp_path / "run"), progress=False, workers=1))
    assert r.metrics["val"]["accuracy"] >= 0.9
    pred = Predictor(r.artifact_dir)
    img = pred.load(data / "patch" / "0.png")
    heat, c, _ = gradcam(load_artifact(r.artifact_dir).model, img, pred.spec.mean, pred.spec.std,
                         pred.labels.index("patch"))
    assert heat.shape == img.shape[:2] and heat.max() == pytest.approx(1.0)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 24 and x < 24, (y, x)  # the peak is in the top-left quadrant, where the patch is
    h = heat.shape[0] // 2
    assert heat[:h, :h].mean() > 2 * heat[h:, h:].mean()


def test_report_is_self_contained_and_renders_in_chromium(trained_run, tmp_path):
    report = trained_run / "report.html"
    text = report.read_text()
    assert "src=\"data:image/png;base64," in text and not re.search(r'src="(?!data:)', text)
    for png in ("curves.png", "confusion.png", "reliability.png"):
        assert (trained_run / png).stat().st_size > 1000
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "nll", "ece",
            "ece_uncalibrated", "nll_uncalibrated", "top_k_accuracy", "reliability", "temperature"} <= set(metrics["val"])

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(report.as_uri())
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(widths) >= 3 and all(w > 0 for w in widths)  # every embedded image decoded
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_evaluate_cli_on_a_held_out_folder(trained_run, tmp_path):
    from tests.conftest import make_shapes_folder

    test_dir = make_shapes_folder(tmp_path / "test", n=10, seed=42)
    (test_dir / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "training", "evaluate", str(trained_run), str(test_dir), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "20 images (all): accuracy" in r.stdout and "1 skipped" in r.stdout
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"]["n"] == 20 and result["metrics"]["accuracy"] >= 0.8
    assert (out / "report.html").is_file() and (out / "confusion.png").is_file()
    make_shapes_folder(tmp_path / "other", classes=("red", "green"), n=2)
    r = subprocess.run([sys.executable, "-m", "training", "evaluate", str(trained_run), str(tmp_path / "other")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "green" in r.stderr
