"""`pupil evaluate`: an artifact's metrics and report on a folder it was not trained on (class-per-folder, or its
test/ or val/ split). Images go through the Predictor, the same decode and crop as `pupil predict` and the service."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.images import ImageError
from models.predictor import Predictor

from .manifest import scan
from .metrics import evaluate_logits
from .report import confident_mistakes, write_report


def evaluate_folder(artifact_dir: str | Path, data: str | Path, out_dir: str | Path, *, device: str = "auto",
                    batch_size: int = 32, tta: bool = False) -> dict[str, Any]:
    pred = Predictor(artifact_dir, device=device, tta=tta, decode_threads=2)
    m = scan(data)
    split = next((s for s in ("test", "val") if m.presplit and m.usable(s)), None)
    records = m.usable(split) if split else m.usable()
    unknown = sorted({r.label for r in records} - set(pred.labels))
    if unknown:
        raise ValueError(f"{data} has classes the model does not know: {', '.join(unknown)} "
                         f"(the model knows {', '.join(pred.labels)})")
    root = Path(data)
    skipped = m.problems()
    kept, rows = [], []
    for r, out in zip(records, pred.outputs([root / r.path for r in records], batch_size)):
        if isinstance(out, ImageError):
            r.problem, r.detail = out.problem, out.detail
            skipped.append(r)
        else:
            kept.append(r)
            rows.append(out)
    if not kept:
        raise ValueError(f"no usable image in {data}")
    logits = torch.from_numpy(np.stack(rows))
    y = torch.tensor([pred.labels.index(r.label) for r in kept])
    metrics = evaluate_logits(logits, y, pred.labels, pred.temperature)
    probs = torch.softmax(logits / pred.temperature, -1).numpy()
    out_dir = Path(out_dir)
    model = pred.model if pred.model is not None else Predictor(pred.artifact, device="cpu").model
    mistakes = confident_mistakes(model, pred.spec, probs, y.numpy(), pred.labels, [r.path for r in kept],
                                  lambda i: pred.load(root / kept[i].path))
    counts = {split or "all": {c: int((y == i).sum()) for i, c in enumerate(pred.labels)}}
    skipped_rows = [{"path": s.path, "problem": s.problem, "detail": s.detail} for s in skipped]
    write_report(out_dir, title=f"pupil evaluation: {Path(artifact_dir)} on {data}", metrics=metrics,
                 classes=pred.labels, data_summary={"counts": counts, "skipped": skipped_rows}, mistakes=mistakes,
                 split=f"{split or 'all'} ({Path(data).name})")
    result = {"artifact": str(artifact_dir), "data": str(data), "split": split or "all", "tta": tta, "metrics": metrics,
              "skipped": skipped_rows}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
