"""The report: one self-contained HTML page (every image embedded) plus each plot as a PNG beside it.

It answers a user's first questions without them writing a line: how good is it really (metrics on held-out
data), where does it fail (per-class table, confusion matrix, the most confidently wrong images), can I trust its
confidence (reliability before/after temperature scaling), and what is it looking at (Grad-CAM overlays).
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
    from models.gradcam import gradcam, overlay, png_bytes

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


def plot_curves(history: list[dict[str, Any]]) -> bytes | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if "val_loss" in history[0]:
        axes[0].plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    axes[0].set_title("loss")
    axes[1].plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    if "val_acc" in history[0]:
        axes[1].plot(ep, [h["val_acc"] for h in history], "o-", label="validation")
    axes[1].set_title("accuracy")
    axes[2].plot(ep, [h["lr"] for h in history], "o-")
    axes[2].set_title("learning rate (start of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
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
pre{background:#f7f7f7;padding:1em;overflow:auto}
"""


def write_report(out_dir: Path, *, title: str, metrics: dict[str, Any], classes: list[str],
                 history: list[dict[str, Any]] | None = None, config: dict[str, Any] | None = None,
                 data_summary: dict[str, Any] | None = None, mistakes: Sequence[Mistake] = ()) -> Path:
    """Write report.html and the plots (curves.png, confusion.png, reliability.png) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, bytes] = {}
    curves = plot_curves(history or [])
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
    parts.append(f'<p class=sub>{n} held-out images, {len(classes)} classes; scores calibrated with temperature '
                 f'{metrics.get("temperature", 1.0):.3f}</p>')
    cards = [("accuracy", metrics.get("accuracy")), ("balanced accuracy", metrics.get("balanced_accuracy")),
             ("macro F1", metrics.get("macro_f1")), ("ECE (calibrated)", metrics.get("ece")),
             ("ECE (raw)", metrics.get("ece_uncalibrated")), ("log loss", metrics.get("nll"))]
    cards += [(f"{k} accuracy", v) for k, v in metrics.get("top_k_accuracy", {}).items() if k != "top1"]
    parts.append("<div class=cards>" + "".join(f"<div class=card>{html.escape(k)}<b>{_fmt(v)}</b></div>"
                                                for k, v in cards if v is not None) + "</div>")
    ab = metrics.get("abstention") or {}
    if ab.get("threshold") is not None:
        parts.append(f"<p><b>Abstention:</b> answers with a calibrated score under {ab['threshold']:.3f} are flagged "
                     f"<code>abstained</code> (\"not sure\"). On this split the accepted {100 * ab['coverage']:.1f}% "
                     f"are {100 * ab['precision']:.1f}% right (target {100 * ab['target_precision']:.0f}%"
                     f"{'' if ab['met'] else ', not reached: the model is not that precise at any threshold'}).</p>")
    if data_summary:
        parts.append("<h2>Data</h2>")
        counts = data_summary.get("counts", {})
        splits = list(counts)
        rows = [[c] + [counts[s].get(c, 0) for s in splits] for c in classes]
        parts.append(_table(rows, ["class"] + splits))
        skipped = data_summary.get("skipped", [])
        parts.append(f"<p>{len(skipped)} file(s) skipped.</p>")
        if skipped:
            parts.append(_table([[s["path"], s["problem"], s.get("detail") or ""] for s in skipped],
                                ["file", "problem", "detail"]))
    if curves:
        parts.append("<h2>Training curves</h2>" + _img(curves, "training curves"))
    lr_plot = out_dir / "lr_find.png"
    if lr_plot.is_file() and config and config.get("lr_find"):
        parts.append(f"<h2>Learning rate</h2><p><code>--lr auto</code> chose {config['lr']:.3g}: a tenth of the rate "
                     f"where the range test's smoothed loss was lowest.</p>" + _img(lr_plot.read_bytes(), "LR range test"))
    if n:
        per = metrics["per_class"]
        parts.append("<h2>Per class</h2>")
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
    if config:
        parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
