"""The report: one self-contained HTML page (every image embedded) plus each plot as a PNG beside it.

It answers a user's first questions without them writing a line: how good is it really (metrics on the validation
split, and on an untouched test split when the data has one), where does it fail (per-class table, confusion
matrix, the most confidently wrong images), can I trust its confidence (reliability before/after temperature
scaling), and what is it looking at (Grad-CAM overlays).
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


@dataclass
class Mistake:
    path: str
    true: str
    predicted: str
    score: float
    image_png: bytes
    cam_png: bytes


def confident_mistakes(model, spec, probs: np.ndarray, labels: np.ndarray, classes: list[str], paths: Sequence[str],
                       image_of: Callable[[int], np.ndarray], n: int = 12) -> list[Mistake]:
    """The n wrong predictions with the highest calibrated confidence, each with a Grad-CAM of the predicted class."""
    from models.explain import overlay, png_bytes
    from models.gradcam import gradcam

    if len(labels) == 0:
        return []
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:n]
    model = model.cpu().eval()
    out = []
    for i in wrong:
        img = image_of(int(i))
        heat, _, _ = gradcam(model, img, spec.mean, spec.std, int(pred[i]))
        out.append(Mistake(paths[i], classes[labels[i]], classes[pred[i]], float(probs[i].max()),
                           png_bytes(img), png_bytes(overlay(img, heat))))
    return out


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_curves(history: list[dict[str, Any]], probe: dict[str, Any] | None = None) -> bytes | None:
    """Loss, accuracy and learning rate per epoch; the probe (head only, before the fine-tune) is epoch 0."""
    if not history and not (probe and "val_loss" in probe):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    val_rows = ([(0, probe)] if probe and "val_loss" in probe else []) + [(h["epoch"], h) for h in history
                                                                          if "val_loss" in h]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        if history:
            ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        if val_rows:
            ax.plot([e for e, _ in val_rows], [r[f"val_{key}"] for _, r in val_rows], "o-", label="validation")
        if probe and "val_loss" in probe:
            ax.plot([0], [probe[f"val_{key}"]], "s", color="#d62728", label="probe (epoch 0)")
        ax.set_title(title)
        ax.legend()
    axes[2].plot(ep, [h["lr"] for h in history], "o-")
    axes[2].set_title("learning rate (start of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _fig_png(fig)


def plot_confusion(cm: list[list[int]], classes: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.asarray(cm, dtype=float)
    rows = a.sum(1, keepdims=True)
    norm = np.divide(a, rows, out=np.zeros_like(a), where=rows > 0)
    k = len(classes)
    size = min(4 + 0.45 * k, 14)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, data, title, fmt in ((axes[0], a, "counts", "{:.0f}"), (axes[1], norm, "row-normalised (recall)", "{:.2f}")):
        ax.imshow(data, cmap="Blues")
        ax.set_title(title)
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 30:
            hi = data.max() if data.size else 1
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if data[i, j] > hi / 2 else "black")
    return _fig_png(fig)


def plot_reliability(rel: dict[str, list[dict[str, float]]], ece_before: float, ece_after: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, ece in ((axes[0], "uncalibrated", ece_before), (axes[1], "calibrated", ece_after)):
        bins = rel[key]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        width = bins[0]["hi"] - bins[0]["lo"]
        ax.bar(centres, [b["accuracy"] if b["count"] else 0 for b in bins], width=width * 0.95, alpha=0.8,
               label="accuracy in bin", edgecolor="k")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set_title(f"{key}: ECE {ece:.3f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
    return _fig_png(fig)


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(rows: list[list[Any]], header: list[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}h1{margin-bottom:0}.sub{color:#666;margin-top:.3em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ddd;padding:.3em .7em;text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;border-radius:6px;padding:.8em 1.2em}
.card b{display:block;font-size:1.6em}.gallery{display:flex;flex-wrap:wrap;gap:1em}.g{border:1px solid #ddd;
padding:.5em;font-size:.85em;max-width:280px}.g img{image-rendering:pixelated}img{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow:auto}.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.6em 1em}
"""


def _metric_cards(metrics: dict[str, Any]) -> str:
    cards = [("accuracy", metrics.get("accuracy")), ("balanced accuracy", metrics.get("balanced_accuracy")),
             ("macro F1", metrics.get("macro_f1")), ("ECE (calibrated)", metrics.get("ece")),
             ("ECE (raw)", metrics.get("ece_uncalibrated")), ("log loss", metrics.get("nll"))]
    cards += [(f"{k} accuracy", v) for k, v in metrics.get("top_k_accuracy", {}).items() if k != "top1"]
    ci = metrics.get("accuracy_ci95")
    note = {"accuracy": f"<small>95 % interval {ci[0]:.3f}-{ci[1]:.3f} (Wilson, {metrics.get('n', '?')} images)</small>"
            if ci else ""}
    return "<div class=cards>" + "".join(f"<div class=card>{html.escape(k)}<b>{_fmt(v)}</b>{note.get(k, '')}</div>"
                                          for k, v in cards if v is not None) + "</div>"


def _test_section(test: dict[str, Any] | None, classes: list[str], evaluated: bool) -> str:
    if not evaluated:
        return ""
    if not test:
        return ("<h2>Test</h2><p class=warn><b>No untouched test set was given.</b> Every number on this page was "
                "measured on the validation split, which also chose the epoch, the probe's head, the temperature "
                "and the threshold, so it is optimistic. For an honest figure, put images that training must never "
                "see in <code>DATA/test/&lt;class&gt;/</code> (beside <code>DATA/train/</code>, with or without "
                "<code>DATA/val/</code>) and train again, or keep a folder aside and run <code>pupil evaluate "
                "runs/NAME FOLDER</code>.</p>")
    per = test["per_class"]
    return ("<h2>Test: the honest number</h2><p>The test split was never used for any choice (not the epoch, not the "
            "probe's head, not the temperature, not the threshold): it was evaluated once, after training ended."
            f"</p><p class=sub>{test['n']} test images</p>" + _metric_cards(test)
            + _table([[c, per[c]["precision"], per[c]["recall"], per[c]["f1"], per[c]["support"]] for c in classes],
                     ["class", "precision", "recall", "F1", "support"]))


def _probe_note(history: list[dict[str, Any]], probe: dict[str, Any] | None, best_epoch: int | None) -> str:
    """What happened between the probe and the fine-tune, in words."""
    if not history or not probe or "val_acc" not in probe or best_epoch is None:
        return ""
    best_ft = max(history, key=lambda h: h.get("val_acc", 0.0))
    if best_epoch > 0:
        return (f"<p>The fine-tune beat the linear probe: epoch {best_epoch} was kept (probe: validation accuracy "
                f"{probe['val_acc']:.3f}).</p>")
    train_gap = max(h["train_acc"] for h in history) - best_ft.get("val_acc", 0.0)
    cause = ("the training accuracy rose well above the validation accuracy: it over-fitted the few training images"
             if train_gap > 0.1 else
             "the training accuracy stayed low too: the augmentation or the learning rate kept it from fitting")
    return ("<p class=warn><b>The fine-tune did not beat the linear probe</b> (probe: validation accuracy "
            f"{probe['val_acc']:.3f}; best fine-tuned epoch {best_ft['epoch']}: {best_ft.get('val_acc', 0):.3f}), so "
            f"the probed model was kept. Likely cause: {cause}. Try: <code>--lr auto</code> or a lower "
            "<code>--lr</code>; <code>--crop-scale 0.7</code> when the class depends on a small detail that a "
            "zoomed-in crop can cut out; <code>--flips d8</code> for data with no up or down; more epochs with "
            "<code>--ema</code>; or more images.</p>")


def _label_issues_section(out_dir: Path, found: dict[str, Any]) -> str:
    """Likely label errors: how many, what was done with them, and the first of them as thumbnails."""
    dropped = found.get("dropped", 0)
    parts = [f"<h2>Likely label errors</h2><p>The {found['flagged']} of {found['images']} training and validation "
             f"images most likely mislabelled: another class reached its usual confidence on them while their given "
             f"label did not, by a probe that never saw them ({found['folds']}-fold, on the backbone's features, its "
             "regularisation chosen by the folds so that its probabilities are calibrated; confident learning, "
             "Northcutt et al. 2021). A flag is a suspicion, not a verdict: check them by eye; all are listed, most "
             "likely first, in <code>label_issues.csv</code>. "
             + (f"<b>{dropped} flagged training images were left out of training</b> (--drop-label-issues; "
                "validation images never are)." if dropped else
                "Nothing was dropped: <code>--drop-label-issues</code> leaves the flagged training images out.")
             + "</p><div class=gallery>"]
    for rank, r in enumerate(found.get("top", []), 1):
        png = out_dir / "label_issues" / f"{rank:03d}.png"
        thumb = _img(png.read_bytes(), r["path"], 128) if png.is_file() else ""
        parts.append(f"<div class=g>{thumb}<br>{html.escape(r['path'])} ({r['split']})<br>given <b>"
                     f"{html.escape(r['given'])}</b>, suggested <b>{html.escape(r['suggested'])}</b><br>score "
                     f"{r['score']:.2f}</div>")
    return "".join(parts) + "</div>"


def _ensemble_section(ensemble: dict[str, Any], out_dir: Path) -> str:
    """An --ensemble run: its members, each alone, beside what the page above says of them together."""
    rows = []
    for r in ensemble.get("members", []):
        link = Path(r["dir"]) / "report.html"
        try:
            link = link.relative_to(out_dir)
        except ValueError:
            pass
        rows.append([r["seed"], r.get("best_epoch"), r.get("val_accuracy"), r.get("val_balanced_accuracy"), str(link)])
    return ("<h2>Ensemble</h2><p>This model answers with the mean of its members' logits; the logit adjustment, "
            "temperature and threshold above were chosen on those averaged answers. Each member alone, on the same "
            "validation split (its own choices made on it too, so optimistic like the figures above):</p>"
            + _table(rows, ["seed", "epoch kept", "validation accuracy", "balanced accuracy", "its report"]))


def write_report(out_dir: Path, *, title: str, metrics: dict[str, Any], classes: list[str],
                 history: list[dict[str, Any]] | None = None, config: dict[str, Any] | None = None,
                 data_summary: dict[str, Any] | None = None, mistakes: Sequence[Mistake] = (),
                 probe: dict[str, Any] | None = None, test: dict[str, Any] | None = None,
                 best_epoch: int | None = None, split: str = "validation",
                 label_issues: dict[str, Any] | None = None, ensemble: dict[str, Any] | None = None) -> Path:
    """Write report.html and the plots (curves.png, confusion.png, reliability.png) into out_dir.

    metrics: those of `split` (a training run's validation split; the folder `pupil evaluate` was given). test: a
    training run's test split, or {} when it had none (the page then says so); None for `pupil evaluate`.
    ensemble: an --ensemble run's kept record (training.ensemble: its members, each with its own figures)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, bytes] = {}
    curves = plot_curves(history or [], probe)
    if curves:
        plots["curves.png"] = curves
    if metrics.get("n"):
        plots["confusion.png"] = plot_confusion(metrics["confusion_matrix"], classes)
        plots["reliability.png"] = plot_reliability(metrics["reliability"], metrics["ece_uncalibrated"], metrics["ece"])
    for name, png in plots.items():
        (out_dir / name).write_bytes(png)

    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    n = metrics.get("n", 0)
    chose = " (it also chose the epoch, the temperature and the threshold, so these figures are optimistic)" \
        if split == "validation" else ""
    parts.append(f'<p class=sub>{n} {html.escape(split)} images{chose}, {len(classes)} classes; scores calibrated '
                 f'with temperature {metrics.get("temperature", 1.0):.3f}</p>')
    parts.append(_metric_cards(metrics))
    ab = metrics.get("abstention") or {}
    if ab.get("threshold") is not None:
        parts.append(f"<p><b>Abstention:</b> answers with a calibrated score under {ab['threshold']:.3f} are flagged "
                     f"<code>abstained</code> (\"not sure\"). On this split the accepted {100 * ab['coverage']:.1f}% "
                     f"are {100 * ab['precision']:.1f}% right (target {100 * ab['target_precision']:.0f}%"
                     f"{'' if ab['met'] else ', not reached: the model is not that precise at any threshold'}).</p>")
    parts.append(_test_section(test, classes, evaluated=test is not None))
    if ensemble:
        parts.append(_ensemble_section(ensemble, out_dir))
    if data_summary:
        parts.append("<h2>Data</h2>")
        counts = data_summary.get("counts", {})
        splits = list(counts)
        rows = [[c] + [counts[s].get(c, 0) for s in splits] for c in classes]
        parts.append(_table(rows, ["class"] + ["validation" if s == "val" else s for s in splits]))
        skipped = data_summary.get("skipped", [])
        parts.append(f"<p>{len(skipped)} file(s) skipped.</p>")
        if skipped:
            parts.append(_table([[s["path"], s["problem"], s.get("detail") or ""] for s in skipped],
                                ["file", "problem", "detail"]))
    if curves:
        parts.append("<h2>Training curves</h2><p>Epoch 0 is the linear probe (the new head alone, on frozen "
                     "features); the fine-tune follows.</p>" + _img(curves, "training curves"))
        parts.append(_probe_note(history or [], probe, best_epoch))
    lr_plot = out_dir / "lr_find.png"
    if lr_plot.is_file() and config and config.get("lr_find"):
        parts.append(f"<h2>Learning rate</h2><p><code>--lr auto</code> chose {config['lr']:.3g}: a tenth of the rate "
                     f"where the range test's smoothed loss was lowest.</p>" + _img(lr_plot.read_bytes(), "LR range test"))
    if n:
        per = metrics["per_class"]
        parts.append(f"<h2>Per class ({html.escape(split)})</h2>")
        parts.append(_table([[c, per[c]["precision"], per[c]["recall"], per[c]["f1"], per[c]["support"]] for c in classes],
                            ["class", "precision", "recall", "F1", "support"]))
        parts.append(f"<p>macro F1 {metrics['macro_f1']:.4f}, weighted F1 {metrics['weighted_f1']:.4f}</p>")
        parts.append("<h2>Confusion matrix</h2>" + _img(plots["confusion.png"], "confusion matrix"))
        parts.append("<h2>Calibration</h2><p>A score of 0.9 should be right about 90% of the time: bars on the "
                     "diagonal. Temperature scaling is fitted on the validation split.</p>"
                     + _img(plots["reliability.png"], "reliability diagram"))
    parts.append("<h2>Most confidently wrong</h2>")
    if mistakes:
        parts.append("<p>Each with Grad-CAM for the predicted class: what the model looked at.</p><div class=gallery>")
        for m in mistakes:
            parts.append(f"<div class=g>{_img(m.image_png, m.path, 128)} {_img(m.cam_png, 'Grad-CAM ' + m.path, 128)}"
                         f"<br>{html.escape(m.path)}<br>true <b>{html.escape(m.true)}</b>, predicted "
                         f"<b>{html.escape(m.predicted)}</b> ({m.score:.2f})</div>")
        parts.append("</div>")
    else:
        parts.append("<p>No mistakes on this split.</p>")
    if label_issues:
        parts.append(_label_issues_section(out_dir, label_issues))
    if config:
        parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
