"""The `pupil` sub-commands, one small function each: they take the parsed arguments and return an exit code
(0 fine, 1 a check failed, 2 the input cannot be used). The parser is in pupil/cli.py."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from models.runtime import ALLOCATOR_ENV


def config_from_args(args: argparse.Namespace):
    """TrainConfig from --config (or, with --resume, the run's own config.yaml), then the flags given."""
    from training.config import TrainConfig, with_preset

    config_file = args.config
    if not config_file and getattr(args, "resume", None) and args.out and (Path(args.out) / "config.yaml").is_file():
        config_file = str(Path(args.out) / "config.yaml")  # resume with the run's own settings
    given = TrainConfig.read_file(config_file) if config_file else {}
    given.update({f.name: getattr(args, f.name) for f in fields(TrainConfig)
                  if f.name != "data" and getattr(args, f.name, None) is not None})
    return TrainConfig(**{**with_preset(given), "data": args.data or given.get("data", "")})


class UsageError(ValueError):
    """The command line cannot be carried out as given; the message says what to give instead (exit 2)."""


def _with_config(args: argparse.Namespace, command: str, job):
    """(0, result): `job` run on the TrainConfig of the arguments. Errors go to the CLI's one handler (cli.main)."""
    cfg = config_from_args(args)
    if not cfg.data:
        raise UsageError("give a DATA folder (or a --config that names one)")
    return 0, job(cfg)


def cmd_train(args: argparse.Namespace) -> int:
    from training.fit import fit

    code, result = _with_config(args, "train", fit)
    if code:
        return code
    line = {"run": str(result.run_dir), "artifact": str(result.artifact_dir),
            "val_accuracy": result.metrics["val"].get("accuracy")}
    if result.metrics.get("test"):
        line["test_accuracy"] = result.metrics["test"]["accuracy"]
    print(json.dumps(line))
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from training.tuning import lr_find

    code, summary = _with_config(args, "lr-find", lr_find)
    if not code:
        print(json.dumps(summary))
    return code


def image_paths(items: list[str]) -> list[Path]:
    from training.manifest import hidden, walk_files

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        paths.extend(sorted(walk_files(p)) if p.is_dir() else [p])
    return [p for p in paths if not hidden(p.name)]


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from tqdm import tqdm

    from models.predictor import Predictor

    pred = Predictor(args.artifact, device=args.device, tta=args.tta, decode_threads=2,
                     decode_timeout=args.decode_timeout)
    paths = image_paths(args.images)
    status = 0
    writer, fh = None, None
    if args.csv:
        fh = open(args.csv, "w", newline="", encoding="utf-8")
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "score", "abstained", "error", "detail"] + [f"p_{c}" for c in pred.labels])
    bar = tqdm(total=len(paths), unit="img", disable=writer is None or not sys.stderr.isatty(), file=sys.stderr)
    k = len(pred.labels) if writer else args.top_k
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        for p, res in zip(chunk, pred.predict(chunk, top_k=k, batch_size=args.batch_size, threshold=args.threshold)):
            status = max(status, int("error" in res))
            if writer is None:
                print(json.dumps({"image": str(p), **res}), flush=True)
            elif "error" in res:
                writer.writerow([str(p), "", "", "", res["error"], res["detail"]] + [""] * len(pred.labels))
            else:
                by = {q["label"]: q["score"] for q in res["predictions"]}
                top = res["predictions"][0]
                writer.writerow([str(p), top["label"], f"{top['score']:.6f}", res.get("abstained", ""), "", ""]
                                + [f"{by[c]:.6f}" for c in pred.labels])
        bar.update(len(chunk))
    bar.close()
    if fh is not None:
        fh.close()
        print(f"wrote {len(paths)} rows to {args.csv}", file=sys.stderr)
    return status


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.artifact import locate
    from training.evaluate import evaluate_folder

    art = locate(args.artifact)
    out = Path(args.out) if args.out else (art.parent / f"eval-{Path(args.data).resolve().name}")
    r = evaluate_folder(art, args.data, out, device=args.device, tta=args.tta)
    m = r["metrics"]
    print(f"{m['n']} images ({r['split']}): accuracy {m['accuracy']:.4f}, balanced accuracy "
          f"{m['balanced_accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f}, "
          f"log loss {m['nll']:.4f}; {len(r['skipped'])} skipped")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from models.artifact import load_artifact, locate, read_artifact

    art_dir = locate(args.artifact)
    read_artifact(art_dir)  # a damaged artifact is refused, by name, before torch is even imported
    from models.export import TORCHSCRIPT, ensure_onnx, export_torchscript

    if args.format == "onnx":
        path = ensure_onnx(art_dir)
        diff = read_artifact(art_dir).info["onnx"]["parity_max_abs"]
        if args.out:
            shutil.copy2(path, args.out)
            path = Path(args.out)
    else:
        path = Path(args.out) if args.out else art_dir / TORCHSCRIPT
        diff = export_torchscript(load_artifact(art_dir), path)
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
        v, t = m.get("val", {}), m.get("test") or {}
        pre = m.get("pretrained", "")
        rows.append([Path(run).name, m.get("model", "?"), "scratch" if pre.startswith("none") else "ImageNet",
                     v.get("accuracy"), v.get("balanced_accuracy"), v.get("macro_f1"), v.get("ece"),
                     t.get("accuracy"), t.get("balanced_accuracy"),
                     m.get("epochs_run"), m.get("wall_time_s"), m.get("train_images_per_s")])
    header = ["run", "model", "weights", "val acc", "val bal.acc", "val macro-F1", "val ECE", "test acc",
              "test bal.acc", "epochs", "wall s", "img/s"]
    if args.json:
        print(json.dumps([dict(zip(header, r)) for r in rows], indent=2))
        return 0
    cells = [["-" if c is None else f"{c:.3f}" if isinstance(c, float) and 3 <= i < 9 else
              f"{c:.0f}" if isinstance(c, float) else str(c) for i, c in enumerate(r)] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in cells:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from models.artifact import locate

    from .verify import TOLERANCE, verify

    ok, report = verify(locate(args.artifact), [Path(p) for p in args.images] or None, serve=not args.no_serve,
                        url=args.url, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"ok": ok, **report}))
    if ok:
        legs = "" if args.no_serve and not args.url else f" and {'the service at ' + args.url if args.url else 'a live service'}"
        print(f"pupil verify: torch, ONNX{legs} agree on {report['images']} images (top-1 identical, scores "
              f"within {TOLERANCE:g})", file=sys.stderr)
    return 0 if ok else 1


def store_tag(command: str, target: str) -> str | None:
    """The BentoML store tag of an artifact (imported if needed) or of a tag; None, with the reason printed, when
    the artifact cannot be imported."""
    from models.artifact import ArtifactError
    from service.store import resolve

    try:
        return resolve(target)
    except (ArtifactError, FileNotFoundError, RuntimeError) as e:
        print(f"pupil {command}: cannot import {target} into the BentoML model store: {e}", file=sys.stderr)
        return None


def serve_env(tag: str, decode_timeout: float | None = None) -> dict[str, str]:
    env = {**os.environ, **ALLOCATOR_ENV, "PUPIL_MODEL_TAG": tag, "PUPIL_NO_REEXEC": "1"}
    if decode_timeout is not None:
        env["PUPIL_DECODE_TIMEOUT"] = f"{decode_timeout:g}"
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    from service.auth import token_file

    env = {"PUPIL_BIND": args.host, **({"PUPIL_AUTH": "off"} if args.no_auth else {})}
    if args.token != "auto" and _serve_refused(args, {**os.environ, **env}):  # before importing anything
        return 2
    tag = store_tag("serve", args.artifact)
    if tag is None:
        return 2
    if args.token == "auto":  # made once, kept beside the run (mode 0600), printed only when made; only for a model
        path = token_home(args.artifact)  # that imported, so a mistyped path leaves no token behind
        token, made = token_file(path)
        env["PUPIL_API_TOKEN_FILE"] = str(path.resolve())
        print(f"pupil serve: token {token}  (send it as 'Authorization: Bearer TOKEN'; kept in {path}, mode 0600)"
              if made else f"pupil serve: the token in {path} is required (Authorization: Bearer TOKEN)",
              file=sys.stderr)
        if _serve_refused(args, {**os.environ, **env}):
            return 2
    print(f"pupil serve: model {tag} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:ImageClassifier",
           "--host", args.host, "--port", str(args.port)]
    os.execve(sys.executable, cmd, {**serve_env(tag, args.decode_timeout), **env})
    return 0  # not reached


def _serve_refused(args: argparse.Namespace, env: dict[str, str]) -> bool:
    """Says (one line) why the service would refuse to start with this environment: True when it would."""
    from service.auth import Tokens, loopback, startup_problem

    if (problem := startup_problem(env)) is None:
        return False
    if not Tokens(env).configured and not loopback(args.host):
        problem = (f"--host {args.host} listens beyond this machine, and no token is set: add --token auto (or "
                   "set PUPIL_API_TOKEN or PUPIL_API_TOKEN_FILE), or --no-auth to serve without one")
    print(f"pupil serve: {problem}", file=sys.stderr)  # that, or an unreadable or empty token file
    return True


def token_home(target: str) -> Path:
    """Where `--token auto` keeps the token: the run folder of a run or artifact directory, else pupil's cache."""
    from models.artifact import locate
    from training.cache import default_cache_dir

    art = locate(target)
    if art.is_dir():
        return (art.parent if art.name == "model" else art) / "api-token"
    return default_cache_dir() / "tokens" / (target.replace(":", "-").replace("/", "-") + ".token")


def cmd_build(args: argparse.Namespace) -> int:
    from models.artifact import locate

    tag = store_tag("build", args.artifact)
    if tag is None:
        return 2
    cmd = [sys.executable, "-m", "service.bento", tag] + (["--gpu"] if args.gpu else []) + \
        (["--base-image", args.base_image] if args.base_image else [])
    r = subprocess.run(cmd, env=serve_env(tag), text=True, stdout=subprocess.PIPE,
                       cwd=Path(__file__).resolve().parent.parent)
    if r.returncode != 0:
        print("pupil build: bentoml build failed (see above)", file=sys.stderr)
        return 1
    bento = r.stdout.strip().splitlines()[-1]
    if Path(args.artifact).is_dir() and not args.no_verify:
        from .verify import verify

        try:
            ok, report = verify(locate(args.artifact), serve=False, log=lambda m: print(m, file=sys.stderr))
        except ValueError as e:  # e.g. an artifact without its run's split: nothing to verify with
            ok, report = True, {"images": 0}
            print(f"pupil build: parity not verified ({e})", file=sys.stderr)
        if not ok:
            print("pupil build: the Bento was built, but parity verification failed (see above)", file=sys.stderr)
            return 1
        print(f"pupil build: torch and ONNX agree on {report['images']} images", file=sys.stderr)
    print(json.dumps({"bento": bento, "model": tag, "flavour": "gpu" if args.gpu else "cpu"}))
    print(f"serve it: bentoml serve {bento}   |   container: bentoml containerize {bento}", file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from training.manifest import SPLITS, split_manifest, trainability, warnings_for
    from training.table import TableSpec, scan_data

    spec = TableSpec(args.labels or "", args.path_col or "", args.label_col or "", args.split_col or "")
    m = split_manifest(scan_data(args.data, spec, max_pixels=args.max_pixels, verify=True,
                                 decode_timeout=args.decode_timeout), args.val_split, 0)
    reason = trainability(m)
    counts = m.counts()
    splits = {s: m.counts(s) for s in SPLITS if m.usable(s)}
    report = {
        "root": m.root,
        "classes": counts,
        "presplit": m.presplit,
        "table": m.table or None,
        "unlisted": m.unlisted,
        "splits": splits,
        "usable": sum(counts.values()),
        "problems": [{"path": f.path, "class": f.label, "problem": f.problem, "detail": f.detail} for f in m.problems()],
        "warnings": warnings_for(m),
        "trainable": reason is None,
        "reason": reason,
    }
    if args.label_issues and reason is None:
        report["label_issues"] = check_label_issues(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if reason is None else 2
    print(f"{m.root}: {len(counts)} classes, {report['usable']} usable images, {len(report['problems'])} problems"
          + (f"; labels from {m.table}" + (f", {m.unlisted} files under the folder named by no row" if m.unlisted
                                            else "") if m.table else ""))
    names = {"train": "train", "val": "validation", "test": "test"}
    width = max((len(c) for c in counts), default=5)
    head = f"  {'class':<{width}}  {'total':>6}" + "".join(f"  {names[s]:>10}" for s in splits)
    print(head)
    for c, n in counts.items():
        print(f"  {c:<{width}}  {n:>6}" + "".join(f"  {splits[s][c]:>10}" for s in splits))
    if not m.presplit:
        where = " by the table" if m.table else " into folders"
        print(f"  (not split{where}: training splits off {args.val_split:.0%} for validation; no test split "
              "- put untouched images in DATA/test/<class>/ for an honest test figure)")
    elif "test" not in splits:
        print("  (no test/ split: the report will say that no untouched test set was given)")
    for p in report["problems"]:
        print(f"  ! {p['path']}: {p['problem']} ({p['detail']})")
    for w in report["warnings"]:
        print(f"  warning: {w}")
    found = report.get("label_issues")
    if found:
        print(f"likely label errors: the {found['flagged']} of {found['images']} images most likely mislabelled, "
              f"ranked; check them by eye (all in {found['csv']})")
        for r in found["issues"][:20]:
            print(f"  {r['score']:.2f}  {r['path']}: given {r['given']}, looks like {r['suggested']}")
    print("trainable" if reason is None else f"not trainable: {reason}")
    return 0 if reason is None else 2


def check_label_issues(args: argparse.Namespace) -> dict:
    """`pupil check --label-issues`: the default backbone's features of every training and validation image (the
    split training would make), out-of-fold probes on them, confident learning; the ranked list also as a CSV."""
    import tempfile

    from training.config import TrainConfig
    from training.label_issues import issues_of_run, write_csv
    from training.prepare import start
    from training.probe import probe_features

    with tempfile.TemporaryDirectory(prefix="pupil-check-") as scratch:  # a run folder that nothing keeps
        cfg = TrainConfig(data=args.data, labels=args.labels or "", path_col=args.path_col or "",
                          label_col=args.label_col or "", split_col=args.split_col or "", stages="probe",
                          val_split=args.val_split, max_pixels=args.max_pixels, progress=False, out=scratch,
                          decode_timeout=args.decode_timeout)
        setup, prep = start(cfg)
        found = issues_of_run(prep, probe_features(prep.model, prep.train, prep.val, setup), cfg.seed)
    csv_path = Path(args.label_issues_csv or "label_issues.csv")
    write_csv(csv_path, found)
    return {**found, "csv": str(csv_path)}


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)
