"""`pupil`: the command line. Each sub-command is a small function; the flags of `train` and `lr-find` are generated
from TrainConfig's fields, where each one's help is written (training/config.py)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from models.decoder import DEFAULT_DECODE_TIMEOUT
from models.images import DEFAULT_MAX_PIXELS
from models.runtime import OneLineParser, ensure_allocator_env

from .commands import (cmd_build, cmd_check, cmd_compare, cmd_demo, cmd_evaluate, cmd_export, cmd_lr_find, cmd_predict,
                       cmd_serve, cmd_train, cmd_verify)


DECODE_TIMEOUT_HELP = (f"seconds one image may take to decode, in a worker process under a memory cap of "
                       f"$PUPIL_DECODE_MEMORY_MB (default 1024); a slower file is reported as timeout (default "
                       f"{DEFAULT_DECODE_TIMEOUT:g}; 0: decode in this process, no deadline, no cap)")


def seconds(text: str) -> float:
    """argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls` (a dataclass), with the field's metadata: help, choices, or_word, bare."""
    for f in fields(cls):
        if f.name == "data":
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        help_text = f"{meta.get('help', '')} (default: {default})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta.get("help"))
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        kw: dict = {"type": kind}
        if "or_word" in meta:
            word, value = meta["or_word"]
            kw["type"] = _number_or(word, float if "float" in str(f.type) else int, value)
        if "bare" in meta:
            kw.update(nargs="?", const=meta["bare"])
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        p.add_argument(flag, default=None, help=help_text, **kw)


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


def bare_flags(argv: list[str]) -> list[str]:
    """A flag whose value is optional (`--ema`) before DATA would swallow the folder as its value: a flag given
    bare, followed by something that is not a number, is rewritten to `--flag=<its bare value>`."""
    from training.config import TrainConfig

    bare = {"--" + f.name.replace("_", "-"): f.metadata["bare"] for f in fields(TrainConfig) if "bare" in f.metadata}
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a in bare:
            try:
                float(out[i + 1])
            except ValueError:
                out[i] = f"{a}={bare[a]}"
    return out


def build_parser() -> argparse.ArgumentParser:
    from training.config import TrainConfig

    p = OneLineParser(prog="pupil", description="Fine-tune an ImageNet CNN on a folder of images, "
                                                "report honestly, serve it with BentoML.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="scan a data folder: classes, split counts, problem files; exit 2 if not "
                                     "trainable")
    c.add_argument("data")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images over this many pixels are reported as too_many_pixels")
    c.add_argument("--val-split", type=float, default=0.2, help="the validation fraction training would split off")
    c.add_argument("--label-issues", action="store_true",
                   help="also find likely label errors (the default backbone's features, out-of-fold probes, confident "
                        "learning): a ranked list, and label_issues.csv")
    c.add_argument("--label-issues-csv", help="where --label-issues writes its CSV (default: ./label_issues.csv)")
    c.add_argument("--decode-timeout", type=seconds, default=DEFAULT_DECODE_TIMEOUT, help=DECODE_TIMEOUT_HELP)
    for name in ("labels", "path_col", "label_col", "split_col"):
        c.add_argument("--" + name.replace("_", "-"), help=TrainConfig.__dataclass_fields__[name].metadata["help"])
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("train", help="fine-tune (or train small_cnn from scratch) and write runs/NAME")
    t.add_argument("data", nargs="?", help=TrainConfig.__dataclass_fields__["data"].metadata["help"])
    t.add_argument("--config", help="a config.yaml (e.g. from an earlier run); flags override it")
    add_config_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="learning-rate range test: a plot and a suggested --lr (what --lr auto uses)")
    lf.add_argument("data", nargs="?", help="the folder you will train on")
    lf.add_argument("--config", help="a config.yaml (e.g. from an earlier run); flags override it")
    add_config_flags(lf, TrainConfig)
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
    pr.add_argument("--decode-timeout", type=seconds, default=DEFAULT_DECODE_TIMEOUT, help=DECODE_TIMEOUT_HELP)
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export the artifact to ONNX or TorchScript, checked against the torch output")
    ex.add_argument("artifact")
    ex.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    ex.add_argument("--out", help="output file (default: inside the artifact directory)")
    ex.set_defaults(func=cmd_export)

    vf = sub.add_parser("verify", help="torch vs ONNX vs a live service on the same images: top-1 and scores agree")
    vf.add_argument("artifact", help="artifact or run directory")
    vf.add_argument("images", nargs="*", help="images (default: the run's validation images plus odd variants)")
    vf.add_argument("--no-serve", action="store_true", help="skip the live-service leg")
    vf.add_argument("--url", help="check this running service (e.g. a container) instead of starting one; a token "
                                  "it asks for is sent from $PUPIL_API_TOKEN or $PUPIL_API_TOKEN_FILE")
    vf.set_defaults(func=cmd_verify)

    cp = sub.add_parser("compare", help="a table of runs (e.g. transfer vs scratch): accuracy, macro-F1, ECE, time")
    cp.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)

    s = sub.add_parser("serve", help="import the artifact into BentoML's model store and serve it over HTTP")
    s.add_argument("artifact", help="artifact or run directory, or a BentoML model tag")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only). Any other, such as "
                        "0.0.0.0, needs a token (--token auto, $PUPIL_API_TOKEN or $PUPIL_API_TOKEN_FILE) or --no-auth")
    who = s.add_mutually_exclusive_group()
    who.add_argument("--token", choices=["auto"], default=None,
                   help="auto: make a token (printed once, kept in the run folder's api-token, mode 0600) and "
                        "require it as 'Authorization: Bearer TOKEN' on every route but the probes (/livez, /readyz), "
                        "/metrics and the API docs. "
                        "A token of your own: $PUPIL_API_TOKEN, or $PUPIL_API_TOKEN_FILE (one a line, re-read when "
                        "it changes), never on the command line")
    who.add_argument("--no-auth", action="store_true",
                   help="serve beyond loopback without a token (anyone who can reach the port can call the model)")
    s.add_argument("--decode-timeout", type=seconds, default=None,
                   help="seconds one upload may take to decode before it is answered 422 timeout (default "
                        f"$PUPIL_DECODE_TIMEOUT or {DEFAULT_DECODE_TIMEOUT:g}; 0: no deadline). Memory per decode: "
                        "$PUPIL_DECODE_MEMORY_MB (1024)")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="bentoml build of the service with this model (a Bento, ready to containerize)")
    b.add_argument("artifact", help="artifact or run directory, or a BentoML model tag")
    b.add_argument("--gpu", action="store_true",
                   help="the torch/CUDA Bento (GPU serving, adaptive batching, Grad-CAM); default: the CPU Bento, "
                        "ONNX Runtime and no torch")
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


def user_error(e: BaseException) -> bool:
    """An error in what the user gave (a folder, a file, an artifact, an option), not in pupil: exit 2."""
    from models.artifact import ArtifactError

    known = (ArtifactError, OSError, ValueError, LookupError)
    # training's DataError, the weights' PretrainedError and export's ExportError (looked up only where their modules
    # are loaded already: no torch import for a command that never needed it), yaml's and safetensors' errors on a
    # damaged file
    extra = tuple(getattr(sys.modules[m], n) for m, n in (("training.prepare", "DataError"),
                                                         ("models.pretrained", "PretrainedError"),
                                                         ("models.export", "ExportError")) if m in sys.modules)
    return isinstance(e, known + extra) or type(e).__module__.split(".")[0] in ("yaml", "safetensors") or \
        type(e).__name__ in ("SafetensorError", "HeaderTooLarge")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command, and be the one place errors become messages: a bad option, folder, file or artifact
    is one line on stderr that names it, and exit status 2; anything else is a bug, one line and status 1. Never a
    traceback, unless --debug asks for one."""
    if argv is None:
        ensure_allocator_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(bare_flags(argv))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"pupil {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if hasattr(e, "exit_code"):  # training.interrupt.Interrupted: stopped by a signal, checkpoint written
            print(f"pupil {args.command}: {e}", file=sys.stderr)
            return int(e.exit_code)
        if user_error(e):
            print(f"pupil {args.command}: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"pupil {args.command}: internal error, {type(e).__name__}: {one_line(e)} (run again with --debug for "
              "the traceback, and please report it)", file=sys.stderr)
        return 1
