"""training/report.py: the page renders in a real browser, names validation as validation, shows the test split or
says there was none, and says so when the fine-tune did not beat the probe."""
from __future__ import annotations

import json
import re

from training.report import write_report

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


def test_report_is_self_contained_and_renders_in_chromium(trained_run, tmp_path):
    report = trained_run / "report.html"
    text = report.read_text()
    assert "src=\"data:image/png;base64," in text and not re.search(r'src="(?!data:)', text)
    for png in ("curves.png", "confusion.png", "reliability.png"):
        assert (trained_run / png).stat().st_size > 1000
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "nll", "ece",
            "ece_uncalibrated", "nll_uncalibrated", "top_k_accuracy", "reliability", "temperature"} <= set(metrics["val"])
    assert "validation images" in text and "held-out" not in text
    lo, hi = metrics["val"]["accuracy_ci95"]
    assert lo <= metrics["val"]["accuracy"] <= hi and f"95 % interval {lo:.3f}-{hi:.3f}" in text

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
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


def _history(val_accs):
    return [{"epoch": i + 1, "lr": 1e-3, "train_loss": 0.5, "train_acc": 0.95, "val_loss": 0.6, "val_acc": a,
             "val_macro_f1": a} for i, a in enumerate(val_accs)]


def test_report_says_when_the_fine_tune_did_not_beat_the_probe(tmp_path):
    probe = {"val_loss": 0.4, "val_acc": 0.8}
    page = write_report(tmp_path / "lost", title="t", metrics={}, classes=["a", "b"], history=_history([0.7, 0.75]),
                        probe=probe, best_epoch=0, test={}).read_text()
    assert "did not beat the linear probe" in page and "over-fitted" in page
    page = write_report(tmp_path / "won", title="t", metrics={}, classes=["a", "b"], history=_history([0.7, 0.9]),
                        probe=probe, best_epoch=2, test={}).read_text()
    assert "did not beat" not in page and "epoch 2 was kept" in page
    assert (tmp_path / "won" / "curves.png").stat().st_size > 1000  # the probe plotted as epoch 0
