"""A bounded soak: 5,000 mixed requests at concurrency 16 against the real server; zero 5xx, zero connection
errors, every valid image answered correctly, resident memory steady."""
from __future__ import annotations

import io
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.corpus import bad_files

TOTAL = 5000
CONCURRENCY = 16


def _rss_of_tree(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the BentoML arbiter and its workers)."""
    from deploy.check import rss_mb
    from pupil.server import process_tree

    return int(rss_mb(process_tree(pid)) * 2**20)


def _jpeg(colour, size) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, (128, 128, 128))
    im.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 8, size[1] // 8))
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_soak_mixed_load(server):
    red, blue = (210, 40, 40), (40, 60, 210)
    valid = [(lbl, _jpeg(col, size)) for lbl, col in (("red", red), ("blue", blue))
             for size in ((40, 36), (640, 480), (2000, 1500))]
    bad = [(name, data, problem) for name, (data, problem) in bad_files().items() if problem != "too_many_pixels"]
    oversized = b"\xff\xd8" + os.urandom(21 * 1024 * 1024)
    rng = random.Random(0)
    plan = []
    for _ in range(TOTAL):
        r = rng.random()
        plan.append(("valid", rng.choice(valid)) if r < 0.85 else ("bad", rng.choice(bad)) if r < 0.99
                    else ("oversized", None))
    local = threading.local()
    counts = {"5xx": 0, "conn": 0, "wrong": 0, "ok": 0, "4xx": 0}
    lock = threading.Lock()

    def one(job):
        kind, payload = job
        client = getattr(local, "client", None) or httpx.Client(timeout=60)
        local.client = client
        data = payload[1] if kind != "oversized" else oversized
        try:
            resp = client.post(f"{server.url}/classify", files={"image": ("f", data, "application/octet-stream")})
        except httpx.HTTPError:
            with lock:
                counts["conn"] += 1
            return
        with lock:
            if resp.status_code >= 500:
                counts["5xx"] += 1
            elif kind == "valid":
                good = resp.status_code == 200 and resp.json()["predictions"][0]["label"] == payload[0]
                counts["ok" if good else "wrong"] += 1
            elif kind == "bad":
                counts["4xx" if resp.status_code == {"too_many_pixels": 413, "unsupported_format": 415}.get(
                    payload[2], 400) else "wrong"] += 1
            else:
                counts["4xx" if resp.status_code == 413 else "wrong"] += 1

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, plan[:300]))  # warm-up
    time.sleep(1)
    rss_warm = _rss_of_tree(server.proc.pid)
    counts.update({k: 0 for k in counts})
    t0 = time.time()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, plan))
    seconds = time.time() - t0
    time.sleep(1)
    rss_after = _rss_of_tree(server.proc.pid)
    print(f"soak: {TOTAL} requests in {seconds:.1f}s ({TOTAL / seconds:.0f}/s), {counts}, "
          f"RSS {rss_warm / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert counts["5xx"] == 0 and counts["conn"] == 0 and counts["wrong"] == 0, counts
    assert counts["ok"] + counts["4xx"] == TOTAL
    assert rss_after <= rss_warm * 1.15, (rss_warm, rss_after)
    assert server.alive()


@pytest.mark.slow
def test_a_short_run_of_the_soak_bench(server):
    """bench/soak.py's traffic for 20 s against the real server (the bench itself runs 30 minutes against the
    container image under a 1 GB cgroup): good, broken and fuzzed files and /classify_batch mixes at 8 in flight;
    no 5xx, no dropped connection, every good image answered, every batch one entry per file."""
    from bench.soak import traffic

    rss = []
    summary = traffic(server.url, 20, concurrency=8, seed=1, sample=lambda: rss.append(1) or 0.0)
    assert summary["requests"] > 20 and summary["minutes"][0]["requests"] == summary["requests"]
    assert summary["5xx"] == 0 and summary["connection_errors"] == 0 and summary["broken_contracts"] == 0, summary
    statuses = {int(s) for s in summary["by_status"]}
    assert 200 in statuses and statuses & {400, 413, 415, 422} and statuses <= {200, 400, 413, 415, 422}
    assert len(rss) >= 3 and server.alive()  # sampled every 5 s
