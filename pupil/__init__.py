"""pupil: a folder of images in; a fine-tuned ImageNet CNN, an honest report and a BentoML HTTP service out.

The Python API, for a notebook (the `pupil` command does the same from a shell):

    import pupil

    run = pupil.train("photos/", seed=1, out="runs/mine")   # any TrainConfig field as a keyword
    run.metrics["val"]["accuracy"], run.metrics["test"]        # test: only when photos/ has a test/ split
    model = pupil.load(run)                                     # a Predictor
    model.predict(["a.jpg", "b.png"])                           # [{"predictions": [...], "abstained": ...}, ...]
    model.explain("a.jpg").png()                                # the heat map over the image, as PNG bytes
    pupil.evaluate(run, "other_photos/")                        # metrics and report on another folder
    with pupil.serve(run) as server:                            # the HTTP service on a free port
        print(server.url)

Layers (each imports only those below it): pupil (this front door) -> training, service -> models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "train", "evaluate", "load", "serve"]


@dataclass
class Run:
    """A finished training run: its folder, the artifact in it, and what it measured."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact(self) -> Path:
        return self.path / "model"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        return cls(path, json.loads((path / "metrics.json").read_text()))

    def __fspath__(self) -> str:
        return str(self.path)


def train(data: str | Path, **options: Any) -> Run:
    """Fine-tune on `data` (one sub-folder per class, or train/ val/ test/ splits); options are TrainConfig's
    fields (`pupil train --help` lists them), e.g. model="small_cnn", epochs=5, out="runs/x", preset="fast"
    (a preset's values go under the options given); labels: a CSV/TSV path or a pandas DataFrame of path,
    label[,split] rows (paths relative to data)."""
    from training.config import TrainConfig, with_preset
    from training.fit import fit

    labels = options.get("labels")
    if labels is not None and not isinstance(labels, (str, Path)):  # a pandas DataFrame: kept in the run as a CSV
        import time

        from training.table import dataframe_to_csv

        model = options.get("model", "efficientnet_lite0")
        options["out"] = options.get("out") or str(Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}")
        options["labels"] = str(dataframe_to_csv(labels, Path(options["out"]) / "labels.csv"))
    elif labels is not None:
        options["labels"] = str(labels)
    result = fit(TrainConfig(**with_preset({**options, "data": str(data)})))
    return Run(result.run_dir, result.metrics)


def evaluate(artifact: str | Path | Run, data: str | Path, *, out: str | Path | None = None,
             tta: bool = False, device: str = "auto") -> dict[str, Any]:
    """Metrics (and report.html in `out`, default runs/NAME/eval-<folder>) of an artifact on a folder."""
    from models.artifact import locate
    from training.evaluate import evaluate_folder

    art = locate(artifact)
    out = Path(out) if out else art.parent / f"eval-{Path(data).resolve().name}"
    return evaluate_folder(art, data, out, device=device, tta=tta)


def load(artifact: str | Path | Run, **options: Any):
    """The Predictor of a run or artifact: .predict(images), .explain(image), .probabilities(crops)...
    options: device, backend ("torch" | "onnx" | "auto"), tta, threads (see models.predictor.Predictor)."""
    from models.artifact import locate
    from models.predictor import Predictor

    return Predictor(locate(artifact), **options)


def serve(artifact: str | Path | Run, *, port: int = 0, env: dict[str, str] | None = None):
    """The BentoML service on loopback (a free port unless `port`), started and ready: a `Server` with .url;
    use it in a `with` block, or call .stop()."""
    from .server import Server

    return Server.for_artifact(artifact, port=port, env=env).start()
