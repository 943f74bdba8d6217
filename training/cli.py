"""`pupil`: the command line. Each sub-command is a small function; `train`'s flags are generated from TrainConfig.

Training never imports BentoML: `serve` and `build` start BentoML's own command in a subprocess, after importing the
artifact into the model store through `service.store` (run in that subprocess's interpreter too).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from models.runtime import ALLOCATOR_ENV, ensure_allocator_env


BARE_EMA = 0.999  # the decay a bare --ema means


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    helps = {
        "model": "timm architecture name, or small_cnn for the from-scratch baseline",
        "pretrained": "auto (bundled weights when a package ships them, else the hub) | none | hub | PATH to .safetensors/.pth",
        "img_size": "input size in pixels (0: the model's default)",
        "lr": "peak learning rate, or auto (the LR range test's suggestion, as `pupil lr-find` shows it; 0: 1e-3 "
              "pretrained, backbone at lr/10; 3e-3 from scratch)",
        "lr_find_steps": "steps of the learning-rate range test (lr-find, --lr auto)",
        "ema": "keep an exponential moving average of the weights with this decay and validate/save it "
               "(bare --ema: 0.999; 0: off)",
        "in_chans": "1: a grayscale model, the pretrained stem's RGB filters summed; 3: RGB",
        "out": "run directory (default runs/<model>-<time>)",
        "cache_dir": "decode cache (default $PUPIL_CACHE or ~/.cache/pupil)",
        "limit_per_class": "use at most N training images per class (0: all), for quick trials",
        "val_split": "fraction held out for validation when DATA is not already split into train/ and val/",
        "device": "auto | cpu | cuda | mps",
        "patience": "early stopping after N epochs without a better validation score (0: off)",
        "width": "small_cnn only: channels of the first stage",
        "depth": "small_cnn only: number of conv-conv-maxpool stages",
        "mixup": "mixup alpha (0: off)",
        "cutmix": "cutmix alpha (0: off); with --mixup too, one of the two per batch",
        "stages": "probe (head only, on cached features) | finetune | both",
        "probe_epochs": "full-batch steps of the linear probe",
        "augment": "none | trivial (TrivialAugmentWide) | randaugment, on top of random-resized-crop + flip",
        "balance": "auto (class-balanced sampling when the largest class is over 3x the smallest) | sampler | "
                   "loss (class-weighted) | none",
        "amp": "auto (bf16/fp16 on CUDA, fp32 on CPU) | off | bf16 | fp16",
        "compile": "torch.compile the model (pays on GPU)",
        "freeze_bn": "pretrained models: keep BatchNorm running statistics fixed while fine-tuning",
        "resume": "continue the run in --out from its last.pt (same settings, same result)",
        "batch_size": "images per step per process, or auto (0): on CUDA the largest that fits, halved on "
                      "out-of-memory; 32 on a CPU",
        "workers": "processes decoding images into the cache",
        "abstain_precision": "confidence threshold chosen so accepted validation answers are this precise (0: off)",
        "time_limit": "minutes for the whole run (0: none); the epochs that fit are run, schedule intact",
    }
    special = {
        "lr": {"type": _number_or("auto", float, "auto")},
        "batch_size": {"type": _number_or("auto", int, 0)},
        "ema": {"type": float, "nargs": "?", "const": BARE_EMA},
        "in_chans": {"type": int, "choices": (1, 3)},
    }
    for f in fields(cls):
        if f.name == "data":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helps.get(f.name))
        elif f.name in special:
            p.add_argument(flag, default=None, help=f"{helps.get(f.name, '')} (default: {default})", **special[f.name])
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=None, help=f"{helps.get(f.name, '')} (default: {default})".strip())


def _number_or(word: str, cast, value):
    """An argparse type: a number, or `word` (which becomes `value`)."""
    def parse(text: str):
        if text == word:
            return value
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {word!r}, not {text!r}") from None
    parse.__name__ = f"number or {word}"
    return parse


def cmd_train(args: argparse.Namespace) -> int:
    from models.pretrained import PretrainedError

    from .fit import DataError, TrainConfig, fit

    config_file = args.config
    if not config_file and args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        config_file = str(Path(args.out) / "config.yaml")  # resume with the run's own settings
    base = TrainConfig.from_file(config_file) if config_file else TrainConfig()
    updates = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
               if f.name != "data" and getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**{**base.__dict__, **updates, "data": args.data or base.data})
    if not cfg.data:
        print("pupil train: give a DATA folder (or a --config that names one)", file=sys.stderr)
        return 2
    try:
        result = fit(cfg)
    except (DataError, FileNotFoundError, ValueError, PretrainedError) as e:
        print(f"pupil train: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run": str(result.run_dir), "artifact": str(result.artifact_dir),
                      "val_accuracy": result.metrics["val"].get("accuracy")}))
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from models.pretrained import PretrainedError

    from .fit import DataError, TrainConfig
    from .tuning import run_lr_find

    updates = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
               if f.name != "data" and getattr(args, f.name, None) is not None}
    try:
        print(json.dumps(run_lr_find(TrainConfig(**{**updates, "data": args.data}))))
    except (DataError, FileNotFoundError, ValueError, PretrainedError) as e:
        print(f"pupil lr-find: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from models.predictor import Predictor

    from .data import _hidden, _walk_files

    import csv

    from tqdm import tqdm

    pred = Predictor(_artifact_dir(args.artifact), device=args.device, tta=args.tta)
    paths: list[Path] = []
    for item in args.images:
        p = Path(item)
        paths.extend(sorted(_walk_files(p)) if p.is_dir() else [p])
    paths = [p for p in paths if not _hidden(p.name)]
    status = 0
    writer = None
    if args.csv:
        fh = open(args.csv, "w", newline="", encoding="utf-8")
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "score", "abstained", "error", "detail"] + [f"p_{c}" for c in pred.labels])
    bar = tqdm(total=len(paths), unit="img", disable=writer is None or not sys.stderr.isatty(), file=sys.stderr)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        k = len(pred.labels) if writer else args.top_k
        for p, res in zip(chunk, pred.predict(chunk, top_k=k, batch_size=args.batch_size, threshold=args.threshold)):
            if "error" in res:
                status = 1
            if writer is not None:
                if "error" in res:
                    writer.writerow([str(p), "", "", "", res["error"], res["detail"]] + [""] * len(pred.labels))
                else:
                    by = {q["label"]: q["score"] for q in res["predictions"]}
                    top = res["predictions"][0]
                    writer.writerow([str(p), top["label"], f"{top['score']:.6f}", res.get("abstained", ""), "", ""]
                                    + [f"{by[c]:.6f}" for c in pred.labels])
            else:
                print(json.dumps({"image": str(p), **res}), flush=True)
        bar.update(len(chunk))
    bar.close()
    if writer is not None:
        fh.close()
        print(f"wrote {len(paths)} rows to {args.csv}", file=sys.stderr)
    return status


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_folder

    art = _artifact_dir(args.artifact)
    out = Path(args.out) if args.out else (art.parent / f"eval-{Path(args.data).resolve().name}")
    try:
        r = evaluate_folder(art, args.data, out, device=args.device, tta=args.tta)
    except (ValueError, FileNotFoundError) as e:
        print(f"pupil evaluate: {e}", file=sys.stderr)
        return 2
    m = r["metrics"]
    print(f"{m['n']} images ({r['split']}): accuracy {m['accuracy']:.4f}, balanced accuracy "
          f"{m['balanced_accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f}, "
          f"log loss {m['nll']:.4f}; {len(r['skipped'])} skipped")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from models.artifact import ArtifactError, load_artifact
    from models.export import TORCHSCRIPT, ExportError, ensure_onnx, export_torchscript

    art_dir = _artifact_dir(args.artifact)
    try:
        if args.format == "onnx":
            path = ensure_onnx(art_dir)
            diff = load_artifact(art_dir).info["onnx"]["parity_max_abs"]
            if args.out:
                shutil.copy2(path, args.out)
                path = Path(args.out)
        else:
            path = Path(args.out) if args.out else art_dir / TORCHSCRIPT
            diff = export_torchscript(load_artifact(art_dir), path)
    except (ArtifactError, ExportError) as e:
        print(f"pupil export: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"format": args.format, "path": str(path), "max_abs_diff_vs_torch": diff}))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    rows = []
    for run in args.runs:
        path = Path(run) / "metrics.json"
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"pupil compare: cannot read {path}: {e}", file=sys.stderr)
            return 2
        v = m.get("val", {})
        pre = m.get("pretrained", "")
        rows.append([Path(run).name, m.get("model", "?"), "scratch" if pre.startswith("none") else "ImageNet",
                     v.get("accuracy"), v.get("balanced_accuracy"), v.get("macro_f1"), v.get("ece"),
                     m.get("epochs_run"), m.get("wall_time_s"), m.get("train_images_per_s")])
    header = ["run", "model", "weights", "accuracy", "bal.acc", "macro-F1", "ECE", "epochs", "wall s", "img/s"]
    if args.json:
        print(json.dumps([dict(zip(header, r)) for r in rows], indent=2))
        return 0
    cells = [[f"{c:.3f}" if isinstance(c, float) and i < 7 else f"{c:.0f}" if isinstance(c, float) else str(c)
              for i, c in enumerate(r)] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in cells:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import TOLERANCE, verify

    try:
        ok, report = verify(_artifact_dir(args.artifact), [Path(p) for p in args.images] or None,
                            serve=not args.no_serve, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"pupil verify: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"ok": ok, **report}))
    if ok:
        print(f"pupil verify: torch, ONNX{'' if args.no_serve else ' and the live service'} agree on "
              f"{report['images']} images (top-1 identical, scores within {TOLERANCE:g})", file=sys.stderr)
    return 0 if ok else 1


def _artifact_dir(target: str) -> Path:
    p = Path(target)
    return p / "model" if (p / "model" / "config.json").is_file() else p


def _bentoml_env(tag: str) -> dict[str, str]:
    return {**os.environ, **ALLOCATOR_ENV, "PUPIL_MODEL_TAG": tag, "PUPIL_NO_REEXEC": "1"}


def import_to_store(target: str) -> str:
    """Import an artifact into BentoML's store (in a subprocess: training never imports BentoML); return the tag."""
    import subprocess

    code = "import sys; from service.store import resolve; print(resolve(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise RuntimeError(f"cannot import {target} into the BentoML model store: {last}")
    return r.stdout.strip().splitlines()[-1]


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        tag = import_to_store(args.artifact)
    except RuntimeError as e:
        print(f"pupil serve: {e}", file=sys.stderr)
        return 2
    print(f"pupil serve: model {tag} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:ImageClassifier",
           "--host", args.host, "--port", str(args.port)]
    os.execve(sys.executable, cmd, _bentoml_env(tag))
    return 0  # not reached


def pin_installed(packages: list[str]) -> list[str]:
    """`name==version` for each requirement, with the version installed in this environment where there is one.

    `bentoml` itself is left out: BentoML adds the running version to every Bento.
    """
    import importlib.metadata as md

    pinned = []
    for req in packages:
        name = re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0]
        if name.lower() == "bentoml":
            continue
        try:
            pinned.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            pinned.append(req)
    return pinned


def cmd_build(args: argparse.Namespace) -> int:
    import subprocess

    try:
        tag = import_to_store(args.artifact)
    except RuntimeError as e:
        print(f"pupil build: {e}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    # bentofile.yaml plus the model pinned: `models:` packs it, PUPIL_MODEL_TAG makes the container load it
    # and every package pinned to the version installed here, the one the tests and `pupil verify` ran (a pin in
    # bentofile.yaml that drifted from this environment made uv's lock fail, or shipped an untested version)
    code = (
        "import sys, tempfile, yaml, bentoml\n"
        "from training.cli import pin_installed\n"
        "cfg = yaml.safe_load(open(sys.argv[1]))\n"
        "cfg['python']['packages'] = pin_installed(cfg['python']['packages'])\n"
        "cfg.setdefault('envs', []).append({'name': 'PUPIL_MODEL_TAG', 'value': sys.argv[2]})\n"
        "cfg['models'] = [sys.argv[2]]\n"
        "if sys.argv[4]: cfg.setdefault('docker', {})['base_image'] = sys.argv[4]\n"
        "with tempfile.NamedTemporaryFile('w', suffix='.yaml') as f:\n"
        "    yaml.safe_dump(cfg, f); f.flush()\n"
        "    print(bentoml.bentos.build_bentofile(f.name, build_ctx=sys.argv[3]).tag)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(root / "bentofile.yaml"), tag, str(root), args.base_image or ""],
                       env=_bentoml_env(tag), text=True, capture_output=True)
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        print("pupil build: bentoml build failed", file=sys.stderr)
        return 1
    bento = r.stdout.strip().splitlines()[-1]
    if Path(args.artifact).is_dir() and not args.no_verify:
        from .verify import verify

        try:
            ok, report = verify(_artifact_dir(args.artifact), serve=False, log=lambda m: print(m, file=sys.stderr))
        except ValueError as e:  # e.g. an artifact without its run's split: nothing to verify with
            ok, report = True, {"images": 0}
            print(f"pupil build: parity not verified ({e})", file=sys.stderr)
        if not ok:
            print("pupil build: the Bento was built, but parity verification failed (see above)", file=sys.stderr)
            return 1
        print(f"pupil build: torch and ONNX agree on {report['images']} images", file=sys.stderr)
    print(json.dumps({"bento": bento, "model": tag}))
    print(f"serve it: bentoml serve {bento}   |   container: bentoml containerize {bento}", file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .data import scan, split_manifest, trainability, warnings_for

    try:
        m = split_manifest(scan(args.data, max_pixels=args.max_pixels, verify=True), 0.2, 0)
    except FileNotFoundError as e:
        print(f"pupil check: {e}", file=sys.stderr)
        return 2
    reason = trainability(m)
    counts = m.counts()
    report = {
        "root": m.root,
        "classes": counts,
        "presplit": m.presplit,
        "usable": sum(counts.values()),
        "problems": [{"path": f.path, "class": f.label, "problem": f.problem, "detail": f.detail} for f in m.problems()],
        "warnings": warnings_for(m),
        "trainable": reason is None,
        "reason": reason,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{m.root}: {len(counts)} classes, {report['usable']} usable images, {len(report['problems'])} problems")
        width = max((len(c) for c in counts), default=5)
        for c, n in counts.items():
            print(f"  {c:<{width}}  {n:>6}")
        for p in report["problems"]:
            print(f"  ! {p['path']}: {p['problem']} ({p['detail']})")
        for w in report["warnings"]:
            print(f"  warning: {w}")
        print("trainable" if reason is None else f"not trainable: {reason}")
    return 0 if reason is None else 2


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from .fit import TrainConfig

    p = argparse.ArgumentParser(prog="pupil", description="Fine-tune an ImageNet CNN on a folder of images, "
                                "report honestly, serve it with BentoML.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="scan a data folder: classes, counts, problem files; exit 2 if not trainable")
    c.add_argument("data")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--max-pixels", type=int, default=50_000_000)
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("train", help="fine-tune (or train small_cnn from scratch) and write runs/NAME")
    t.add_argument("data", nargs="?", help="folder with one sub-folder of images per class (or train/ val/ splits)")
    t.add_argument("--config", help="a config.yaml (e.g. from an earlier run); flags override it")
    _add_config_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="learning-rate range test: a plot and a suggested --lr (what --lr auto uses)")
    lf.add_argument("data", help="the folder you will train on")
    _add_config_flags(lf, TrainConfig)
    lf.set_defaults(func=cmd_lr_find)

    ev = sub.add_parser("evaluate", help="metrics and report of an artifact on a folder (e.g. a held-out test set)")
    ev.add_argument("artifact", help="an artifact directory (runs/NAME/model) or a run directory")
    ev.add_argument("data", help="class-per-folder images (a test/ or val/ split inside is used if present)")
    ev.add_argument("--out", help="where to write metrics.json and report.html (default: runs/NAME/eval-<folder>)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--tta", action="store_true", help="test-time augmentation: average with the mirror image")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify images (files or folders); one JSON object per line")
    pr.add_argument("artifact", help="an artifact directory (runs/NAME/model) or a run directory")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--csv", help="write one row per image (top label, score, every class's probability) to this file")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--threshold", type=float, help="abstain below this calibrated score (default: the artifact's)")
    pr.add_argument("--tta", action="store_true", help="test-time augmentation: average with the mirror image")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export the artifact to ONNX or TorchScript, checked against the torch output")
    ex.add_argument("artifact")
    ex.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    ex.add_argument("--out", help="output file (default: inside the artifact directory)")
    ex.set_defaults(func=cmd_export)

    vf = sub.add_parser("verify", help="torch vs ONNX vs the live service on the same images: top-1 and scores agree")
    vf.add_argument("artifact", help="artifact or run directory")
    vf.add_argument("images", nargs="*", help="images (default: the run's validation images plus odd variants)")
    vf.add_argument("--no-serve", action="store_true", help="skip the live-service leg")
    vf.set_defaults(func=cmd_verify)

    cp = sub.add_parser("compare", help="a table of runs (e.g. transfer vs scratch): accuracy, macro-F1, ECE, time")
    cp.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)

    s = sub.add_parser("serve", help="import the artifact into BentoML's model store and serve it over HTTP")
    s.add_argument("artifact", help="artifact or run directory, or a BentoML model tag")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--host", default="0.0.0.0")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="bentoml build of the service with this model (a Bento, ready to containerize)")
    b.add_argument("artifact", help="artifact or run directory, or a BentoML model tag")
    b.add_argument("--no-verify", action="store_true", help="skip the torch/ONNX parity check after the build")
    b.add_argument("--base-image", default=None,
                   help="the container's FROM (default python:3.11-slim); `make container` passes its local "
                        "Debian bookworm image so that nothing is pulled from a registry")
    b.set_defaults(func=cmd_build)

    d = sub.add_parser("demo", help="the whole path on real solar-cell images: check, train, serve, one request")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--per-class", type=int, default=240, help="training images per class (speed on a CPU)")
    d.add_argument("--img-size", type=int, default=160)
    d.add_argument("--port", type=int, default=0, help="0: a free port")
    d.set_defaults(func=cmd_demo)
    return p


def _bare_ema(argv: list[str]) -> list[str]:
    """`--ema` takes an optional decay; a bare `--ema` before DATA would swallow the folder as its value."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--ema":
            try:
                float(out[i + 1])
            except ValueError:
                out[i] = f"--ema={BARE_EMA}"
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        ensure_allocator_env()
    args = build_parser().parse_args(_bare_ema(sys.argv[1:] if argv is None else argv))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
