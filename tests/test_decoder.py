"""models/decoder.py: every decode under a deadline and a memory cap, in worker processes that can be stopped; used
by `pupil check`, training's decode cache, `pupil predict` and the service (its HTTP test: tests/test_service.py)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from models.decoder import DecodePool
from models.images import ImageError, load_square
from pupil.cli import main


def png(mode: str, size: tuple[int, int], colour=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


# 49 MP of gray in 48 kB: under the 50 MP header limit, so only its decode shows the cost (about 0.2 s and 50 MB
# here: 4 times the deadline these tests give it, and a sixth of their memory cap)
SLOW = png("L", (7000, 7000))
# 49 MP of RGBA: some 600 MB of decode memory (it decodes under the default 1024 MB cap)
HUNGRY = png("RGBA", (7000, 7000))
GOOD = png("RGB", (120, 90), (200, 30, 30))


def _workers(other: frozenset = frozenset()) -> list[psutil.Process]:
    """This process's live decode workers, but those in `other` (other tests' shared pools, in the same process). A
    worker that has just exited (retired, killed) and is not yet reaped is a zombie whose command line cannot be read:
    it is no worker any more, and left out rather than raising."""

    def is_worker(p: psutil.Process) -> bool:
        try:
            return "worker_main" in " ".join(p.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            return False

    return [p for p in psutil.Process().children() if p.pid not in other and is_worker(p)]


def _others() -> frozenset:
    return frozenset(p.pid for p in _workers())


def test_a_decode_past_the_deadline_is_a_timeout_and_the_next_file_decodes():
    other = _others()
    with DecodePool(1, timeout=0.05) as pool:
        assert pool.square(GOOD, 32).shape == (32, 32, 3)
        first = _workers(other)
        t0 = time.monotonic()
        with pytest.raises(ImageError) as e:
            pool.square(SLOW, 224)
        assert e.value.problem == "timeout" and e.value.status == 422 and "0.05 s" in e.value.detail
        assert time.monotonic() - t0 < 3  # the deadline, plus starting the replacement worker
        a = pool.square(GOOD, 32)
        np.testing.assert_array_equal(a, load_square(GOOD, 32))  # the same pixels as decoding here
        assert a.flags.writeable  # as load_square's: torch.from_numpy warns on a read-only array
        now = _workers(other)  # the stuck worker is gone, one took its place
        assert pool.stats["timeouts"] == 1 and len(now) == 1 and now[0].pid != first[0].pid


def test_a_decode_over_the_memory_cap_is_too_many_pixels_and_the_caller_keeps_its_memory():
    me = psutil.Process()
    with DecodePool(1, timeout=30, memory_mb=300) as small:
        small.square(GOOD, 32)
        before = me.memory_info().rss
        with pytest.raises(ImageError) as e:
            small.square(HUNGRY, 224)
        assert e.value.problem == "too_many_pixels" and e.value.status == 413
        assert me.memory_info().rss - before < 50 * 2**20  # the 600 MB were the worker's to fail, not ours
        assert small.square(GOOD, 32).shape == (32, 32, 3)  # and that worker goes on
        # a 48 MP JPEG is decoded at 1/8 scale (draft): it fits the same cap, and the header check knows it
        buf = io.BytesIO()
        Image.new("RGB", (8000, 6000), (10, 20, 30)).save(buf, "JPEG")
        assert small.square(buf.getvalue(), 224).shape == (224, 224, 3)
    other = _others()
    with DecodePool(1, timeout=30) as default:  # the same file under the default cap: it was the cap
        assert default.square(HUNGRY, 224).shape == (224, 224, 3)
        # and the 600 MB went back: freed by the worker, or the worker replaced (polled, not a fixed sleep: on a busy
        # machine the old worker may take a while to exit)
        from deploy.check import rss_mb  # 0 for a worker that exited meanwhile

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(rss_mb([w.pid]) >= 300 for w in _workers(other)):
            time.sleep(0.1)
        assert all(rss_mb([w.pid]) < 300 for w in _workers(other))


def test_a_worker_that_dies_is_a_problem_for_its_file_only():
    other = _others()
    with DecodePool(1, timeout=30) as pool:
        pool.square(GOOD, 32)
        _workers(other)[0].kill()  # killed while idle: the next file gets a fresh worker, not an error
        time.sleep(0.2)
        assert pool.square(GOOD, 32).shape == (32, 32, 3)
        errors = []

        slower = png("RGB", (7000, 7000))  # 0.8 s here

        def slow():
            try:
                pool.square(slower, 224)
            except ImageError as e:
                errors.append(e)

        worker = _workers(other)[0]
        busy = sum(worker.cpu_times()[:2])
        t = threading.Thread(target=slow)
        t.start()
        deadline = time.monotonic() + 10
        # killed inside the decode: once the worker has spent 50 ms of CPU on it (a fixed sleep raced a fast decode)
        while sum(worker.cpu_times()[:2]) < busy + 0.05 and time.monotonic() < deadline:
            time.sleep(0.005)
        worker.kill()
        t.join(10)
        assert errors and errors[0].problem == "corrupt" and "SIGKILL" in errors[0].detail
        assert pool.square(GOOD, 32).shape == (32, 32, 3) and pool.stats["deaths"] == 1


def test_a_retired_worker_is_replaced_before_the_next_file_asks():
    """A worker retired after its decodes (max_tasks) is replaced on a thread of the pool's own, so the next caller
    finds a worker waiting instead of paying a process start."""
    other = _others()
    with DecodePool(1, timeout=30, max_tasks=2) as pool:
        pool.square(GOOD, 32)
        first = {p.pid for p in _workers(other)}  # before it retires (a snapshot after could hold the replacement)
        pool.square(GOOD, 32)  # its second decode: retired
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not ({p.pid for p in _workers(other)} - first):
            time.sleep(0.05)
        fresh = {p.pid for p in _workers(other)} - first
        assert len(fresh) == 1 and pool.stats["replaced"] == 1  # no second call was made
        assert pool.square(GOOD, 32).shape == (32, 32, 3)


def test_workers_end_with_the_process_that_started_them(tmp_path):
    code = ("import os, sys; from models.decoder import DecodePool; from tests.test_decoder import GOOD, _workers; "
            "p = DecodePool(2, timeout=5); p.map([(GOOD, 32, 'bicubic', 10**8)] * 4); "
            "print(' '.join(str(w.pid) for w in _workers()), flush=True); os._exit(0)")  # no close, no atexit
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "decode workers outlived their parent"
        time.sleep(0.2)


def test_check_and_training_report_a_slow_file_and_go_on(tmp_path, capsys):
    from tests.conftest import make_shapes_folder
    from training.config import TrainConfig
    from training.fit import fit

    data = make_shapes_folder(tmp_path / "data", n=10)
    (data / "red" / "slow.png").write_bytes(SLOW)
    assert main(["check", str(data), "--json", "--decode-timeout", "0.05"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(p["path"], p["problem"]) for p in report["problems"]] == [("red/slow.png", "timeout")]
    r = fit(TrainConfig(data=str(data), model="small_cnn", img_size=32, epochs=1, batch_size=8, progress=False,
                        label_issues=False, device="cpu", decode_timeout=0.05, cache_dir=str(tmp_path / "cache"),
                        out=str(tmp_path / "run")))
    assert r.metrics["val"]["accuracy"] is not None
    skipped = json.dumps(r.metrics)
    assert "slow.png" in skipped and "timeout" in skipped
    # the decode cache does not remember a timeout: with a longer deadline the same file trains
    again = fit(TrainConfig(data=str(data), model="small_cnn", img_size=32, epochs=1, batch_size=8, progress=False,
                            label_issues=False, device="cpu", decode_timeout=30, cache_dir=str(tmp_path / "cache"),
                            out=str(tmp_path / "run2")))
    assert "slow.png" not in json.dumps(again.metrics)
    with pytest.raises(SystemExit) as e:  # a bad value: argparse's error line, exit 2
        main(["check", str(data), "--decode-timeout", "-1"])
    assert e.value.code == 2 and "not a number of seconds" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
def test_the_service_answers_a_slow_and_a_hungry_upload_with_4xx_and_goes_on(trained_run):
    """The real server with a 0.05 s deadline and a 300 MB decode cap: each bad upload gets its own 4xx JSON error in
    bounded time, the good ones around it are answered, and no server process grows by the hungry file's size."""
    import httpx

    from pupil.server import Server, process_tree

    env = {"PUPIL_DECODE_TIMEOUT": "0.05", "PUPIL_DECODE_MEMORY_MB": "300"}
    with Server.for_artifact(trained_run, env=env) as s:
        def classify(data: bytes) -> httpx.Response:
            return httpx.post(f"{s.url}/classify", files={"image": ("x.png", data, "image/png")}, timeout=60)

        def rss() -> dict[int, int]:
            return {p: psutil.Process(p).memory_info().rss for p in process_tree(s.proc.pid) if psutil.pid_exists(p)}

        assert classify(GOOD).status_code == 200
        before = rss()
        t0 = time.monotonic()
        r = classify(SLOW)
        assert (r.status_code, r.json()["error"]) == (422, "timeout") and time.monotonic() - t0 < 5
        r = classify(HUNGRY)
        assert (r.status_code, r.json()["error"]) == (413, "too_many_pixels")
        r = httpx.post(f"{s.url}/classify_batch", timeout=60,
                       files=[("images", (f"{i}.png", d, "image/png")) for i, d in enumerate([GOOD, SLOW, HUNGRY, GOOD])])
        assert r.status_code == 200
        answers = r.json()
        assert [a.get("error") for a in answers] == [None, "timeout", "too_many_pixels", None]
        assert answers[0]["predictions"] == answers[3]["predictions"]
        assert classify(GOOD).status_code == 200 and s.alive()
        grew = {p: m - before.get(p, 0) for p, m in rss().items()}  # a new process (a decode worker) counts whole
        assert max(grew.values()) < 100 * 2**20, grew  # the 49 MP RGBA (600 MB to decode) entered no server process


def test_the_console_shows_pupils_lines_only(tmp_path):
    """`pupil check` on damaged TIFFs: libtiff's C-level warnings ("LZWDecode: Not enough data...") stay in the
    decode workers (stderr closed), and the Grad-CAM path of the demo raises no torch UserWarning (a read-only crop)."""
    import random
    import warnings

    from bench.fuzz import MUTATIONS, seeds

    r = random.Random(3)
    base = seeds(r)
    tiffs = [k for k in base if k.startswith("tiff")]
    for i in range(60):
        (tmp_path / "data" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        m = r.choice(sorted(MUTATIONS))
        (tmp_path / "data" / "ab"[i % 2] / f"{i:03d}-{m}.tif").write_bytes(MUTATIONS[m](base[tiffs[i % len(tiffs)]], r))
    out = subprocess.run([sys.executable, "-m", "pupil", "check", str(tmp_path / "data")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode in (0, 2) and "problems" in out.stdout
    assert out.stderr == "", out.stderr[:500]  # in-process (--decode-timeout 0) libtiff printed 6 lines here

    from models import create_model
    from models.gradcam import gradcam

    model, spec = create_model("efficientnet_lite0", 2, "auto", img_size=64)
    crop = load_square(GOOD, 64)
    crop.flags.writeable = False  # what the report's gallery passes: a crop of the read-only decode cache
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        heat, _, _ = gradcam(model, crop, spec.mean, spec.std)
    assert heat.ndim == 2 and 0 <= heat.min() <= heat.max() <= 1
    assert [str(w.message)[:120] for w in seen] == []


def test_a_caller_waiting_for_a_worker_is_not_stranded_when_the_busy_one_is_killed():
    """One worker, two callers: the first's file runs past the deadline and its worker is killed; the second, waiting
    for a worker meanwhile, gets a fresh one and its answer (it waited forever when the slot was not given back)."""
    with DecodePool(1, timeout=0.05) as pool:
        pool.square(GOOD, 32)
        results = {}

        def call(name, data):
            try:
                results[name] = pool.square(data, 32).shape
            except ImageError as e:
                results[name] = e.problem

        slow = threading.Thread(target=call, args=("slow", SLOW), daemon=True)
        slow.start()
        time.sleep(0.01)
        good = threading.Thread(target=call, args=("good", GOOD), daemon=True)
        good.start()
        slow.join(10)
        good.join(10)
        assert results == {"slow": "timeout", "good": (32, 32, 3)}
