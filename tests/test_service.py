"""service/: the real BentoML server in a subprocess, spoken to over HTTP. Most tests share one server (they only
read from it); `configured` is a second one with every limit lowered, batching on and the field log on."""
from __future__ import annotations

import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from pupil.server import Server

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


def _png(colour=(1, 2, 3), size=(40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(size: tuple[int, int], seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def _data(trained_run, c: str, i: int) -> bytes:
    return (trained_run.parent / "data" / c / f"{c}_{i:03d}.png").read_bytes()


def test_classify_a_png(server, trained_run):
    r = httpx.post(f"{server.url}/classify", files={"image": ("x.png", _data(trained_run, "red", 3), "image/png")},
                   data={"top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["label"] for p in body["predictions"]][0] == "red"
    assert abs(sum(p["score"] for p in body["predictions"]) - 1) < 1e-5
    assert body["model"]["name"] == "small_cnn" and body["model"]["version"]
    assert body["model"]["tag"] == f"pupil:{body['model']['version']}"


def test_text_file_gets_a_4xx_json_error_and_the_server_survives(server):
    r = httpx.post(f"{server.url}/classify", files={"image": ("notes.jpg", b"just some text", "image/jpeg")})
    assert r.status_code == 400 and r.json()["error"] == "not_an_image"
    r = httpx.post(f"{server.url}/classify", files={"image": ("e.png", b"", "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "empty"
    r = httpx.post(f"{server.url}/classify", files={"image": ("x.png", _png((200, 30, 30)), "image/png")},
                   data={"top_k": "abc"})
    assert r.status_code == 400 and r.json()["error"] == "bad_top_k"
    r = httpx.post(f"{server.url}/classify", json={"image": "http://127.0.0.1:1/x.png"})
    assert r.status_code == 415
    assert server.alive()
    assert httpx.post(f"{server.url}/classify", files={"image": ("x.png", _png((40, 60, 210)))}).status_code == 200


def test_batch_keeps_order_and_isolates_bad_files(server, trained_run):
    files = [("images", ("a.png", _data(trained_run, "blue", 1), "image/png")),
             ("images", ("bad.jpg", b"<html></html>", "image/jpeg")),
             ("images", ("c.png", _data(trained_run, "red", 1), "image/png"))]
    r = httpx.post(f"{server.url}/classify_batch", files=files)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o.get("filename") for o in out] == ["a.png", "bad.jpg", "c.png"]
    assert out[0]["predictions"][0]["label"] == "blue"
    assert (out[1]["error"], out[1]["status"]) == ("not_an_image", 400)
    assert out[2]["predictions"][0]["label"] == "red"


def test_metadata_and_bentoml_client(server, trained_run):
    import bentoml

    meta = httpx.post(f"{server.url}/metadata").json()
    assert meta["classes"] == ["blue", "red"] and meta["architecture"] == "small_cnn"
    assert meta["input_size"] == 32 and meta["temperature"] > 0
    assert meta["limits"] == {"max_bytes": 20 * 2**20, "max_request_bytes": 64 * 2**20, "max_pixels": 50_000_000,
                              "max_files": 64}
    with bentoml.SyncHTTPClient(server.url) as client:
        out = client.classify(image=trained_run.parent / "data" / "blue" / "blue_002.png", top_k=1)
    assert out["predictions"][0]["label"] == "blue" and len(out["predictions"]) == 1


def test_explain_returns_a_png_heat_map(server, trained_run):
    img = _data(trained_run, "red", 4)
    r = httpx.post(f"{server.url}/explain", files={"image": ("r.png", img, "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-pupil-label"] == "red" and r.headers["x-pupil-explain-method"] == "cam"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.size == (32, 32)
    r = httpx.post(f"{server.url}/explain", files={"image": ("r.png", img, "image/png")}, data={"label": "blue"})
    assert r.status_code == 200 and r.headers["x-pupil-label"] == "blue"
    r = httpx.post(f"{server.url}/explain", files={"image": ("r.png", img, "image/png")}, data={"label": "purple"})
    assert r.status_code == 400 and r.json()["error"] == "unknown_label"


def test_every_error_status_and_the_server_stays_up(server):
    from tests.corpus import bad_files

    bad = bad_files()
    cases = [
        (("half.jpg", bad["half.jpg"][0]), {}, 400, "truncated"),
        (("crc.png", bad["bad_crc.png"][0]), {}, 400, "corrupt"),
        (("d.svg", bad["drawing.svg"][0]), {}, 415, "unsupported_format"),
        (("bomb.png", bad["bomb_60mp.png"][0]), {}, 413, "too_many_pixels"),
        (("bomb.png", bad["bomb_400mp.png"][0]), {}, 413, "too_many_pixels"),
        (("x.png", _png()), {"top_k": "0"}, 400, "bad_top_k"),
        (("x.png", _png()), {"top_k": "99999"}, 400, "bad_top_k"),
        (("x.png", _png()), {"threshold": "2"}, 400, "bad_threshold"),
    ]
    for (name, data), form, status, error in cases:
        r = httpx.post(f"{server.url}/classify", files={"image": (name, data, "application/octet-stream")}, data=form)
        assert (r.status_code, r.json()["error"]) == (status, error), (name, r.text)
    r = httpx.post(f"{server.url}/classify", files={"image": ("big.jpg", b"\xff" * (21 * 1024 * 1024), "image/jpeg")})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    r = httpx.post(f"{server.url}/classify", data={"image": "http://127.0.0.1:9/evil.png"})
    assert r.status_code == 400 and "file upload" in r.json()["detail"]
    r = httpx.post(f"{server.url}/classify", files={"other": ("x.png", _png(), "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = httpx.post(f"{server.url}/classify_batch", data={"top_k": "2"})
    assert r.status_code == 400
    assert server.alive()
    assert httpx.post(f"{server.url}/classify", files={"image": ("x.png", _png((200, 30, 30)))}).status_code == 200


@pytest.mark.parametrize("count, status", [(64, 200), (65, 413), (66, 413), (200, 413)])
def test_any_number_of_files_over_the_limit_gets_its_413(server, count, status):
    r = httpx.post(f"{server.url}/classify_batch", files=[("images", (f"{i}.png", _png()))for i in range(count)],
                   timeout=120)
    assert r.status_code == status, r.text[:200]
    if status == 413:
        assert r.json()["error"] == "too_many_files"
    else:
        assert len(r.json()) == 64


def test_raw_body_upload(server):
    r = httpx.post(f"{server.url}/classify?top_k=1", content=_png((40, 60, 210)), headers={"content-type": "image/png"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


def test_options_in_the_query_string_work_with_multipart_too(server):
    png = ("x.png", _png((40, 60, 210)), "image/png")
    r = httpx.post(f"{server.url}/classify?top_k=1", files={"image": png})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    r = httpx.post(f"{server.url}/classify?top_k=1", files={"image": png}, data={"top_k": "2"})  # the form wins
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    r = httpx.post(f"{server.url}/classify_batch?top_k=1&threshold=0.25", files=[("images", png), ("images", png)])
    assert r.status_code == 200 and [(len(a["predictions"]), a["threshold"]) for a in r.json()] == [(1, 0.25)] * 2
    r = httpx.post(f"{server.url}/classify?top_k=abc", files={"image": png})
    assert r.status_code == 400 and r.json()["error"] == "bad_top_k"


def test_service_reports_abstention_and_accepts_a_threshold(server):
    gray = _png((128, 128, 128))
    r = httpx.post(f"{server.url}/classify", files={"image": ("g.png", gray)}, data={"threshold": "1.0"})
    assert r.status_code == 200 and r.json()["abstained"] is True and r.json()["threshold"] == 1.0
    r = httpx.post(f"{server.url}/classify", files={"image": ("g.png", gray)}, data={"threshold": "0"})
    assert r.json()["abstained"] is False


def test_32_concurrent_requests_are_all_answered_correctly(server, trained_run):
    jobs = [(c, _data(trained_run, c, i)) for i in range(16) for c in ("red", "blue")]

    def one(job):
        label, data = job
        r = httpx.post(f"{server.url}/classify", files={"image": ("x.png", data, "image/png")}, timeout=60)
        return label, r.status_code, r.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, jobs))
    assert all(status == 200 for _, status, _ in results)
    right = sum(body["predictions"][0]["label"] == label for label, _, body in results)
    assert right >= 30  # the model's own training images: it knows them


def test_cpu_serving_runs_onnx_with_recorded_parity(server):
    meta = httpx.post(f"{server.url}/metadata").json()
    assert meta["backend"] == "onnx" and meta["explain"] == "cam" and meta["batching"] is None
    assert meta["amp"] == "fp32"
    assert meta["onnx_parity_max_abs"] is not None and meta["onnx_parity_max_abs"] < 1e-4


def test_web_page_classifies_an_uploaded_image(server, trained_run, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.url}/ui")
        page.wait_for_function("document.getElementById('model').textContent.includes('small_cnn')")
        page.set_input_files("#file", str(trained_run.parent / "data" / "blue" / "blue_005.png"))
        page.wait_for_selector("#bars .bar")
        page.wait_for_selector("#cam:not([hidden])")
        top = page.eval_on_selector("#bars .bar", "e => e.dataset.label")
        page.screenshot(path=str(tmp_path / "ui.png"))
        browser.close()
    assert errors == [] and top == "blue"
    assert (tmp_path / "ui.png").stat().st_size > 5000


# -------------------------------------------------------------------------------------- a server with its settings


FIELD_IMAGES = [("red", 0), ("red", 1), ("blue", 0), ("blue", 1)]
LIMITS = {"PUPIL_MAX_FILES": "3", "PUPIL_MAX_BYTES": "50000", "PUPIL_MAX_PIXELS": "10000",
          "PUPIL_MAX_REQUEST_MB": "0.25", "PUPIL_MAX_INFLIGHT_MB": "0.3"}


@pytest.fixture(scope="module")
def configured(trained_run, tmp_path_factory):
    """Batching forced on (the GPU default), every limit lowered, and the field log keeping the answers under a
    confidence that splits a set of known images in two (some logged, some not)."""
    from models import Predictor

    pred = Predictor(trained_run, backend="onnx")
    gray = [_png((g, g, g)) for g in (90, 128, 170)]
    sources = [_data(trained_run, c, i) for c, i in FIELD_IMAGES] + gray
    scores = sorted(a["predictions"][0]["score"] for a in pred.predict(sources))
    below = next((a + b) / 2 for a, b in zip(scores, scores[1:]) if b - a > 1e-4)
    field = tmp_path_factory.mktemp("field")
    env = {"PUPIL_BATCHING": "on", "PUPIL_BATCH_WAIT_MS": "20", "PUPIL_FIELD_LOG": str(field),
           "PUPIL_FIELD_LOG_IMAGES": "1", "PUPIL_FIELD_LOG_BELOW": str(below), **LIMITS}
    with Server.for_artifact(trained_run, env=env) as s:
        yield s, field, below, sources, pred


def test_adaptive_batching_answers_concurrent_requests_as_the_per_request_path_does(configured, server, trained_run):
    """PUPIL_BATCHING=on (the GPU default, forced here on the CPU): 32 concurrent /classify requests share forward
    passes, and every answer equals the per-request server's, in the right order of scores."""
    batched = configured[0]
    images = [_data(trained_run, c, i) for i in range(16) for c in ("red", "blue")]

    def ask(url, data):
        r = httpx.post(f"{url}/classify", files={"image": ("x.png", data, "image/png")}, timeout=60)
        return r.status_code, r.json()

    before = httpx.post(f"{batched.url}/metadata").json()["batching"]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda b: ask(batched.url, b), images))
    want = [ask(server.url, b) for b in images]
    for (s1, b1), (s2, b2) in zip(got, want):
        assert s1 == s2 == 200
        assert [p["label"] for p in b1["predictions"]] == [p["label"] for p in b2["predictions"]]
        for p, q in zip(b1["predictions"], b2["predictions"]):
            assert abs(p["score"] - q["score"]) < 1e-4
    stats = httpx.post(f"{batched.url}/metadata").json()["batching"]
    assert stats["images"] - before["images"] == 32 and stats["batches"] - before["batches"] < 32
    assert stats["largest_batch"] > 1  # really shared
    r = httpx.post(f"{batched.url}/classify", files={"image": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 400 and batched.alive()  # bad input never reaches the batch


def test_pupil_max_settings_are_obeyed(configured):
    s = configured[0]
    assert httpx.post(f"{s.url}/metadata").json()["limits"] == {
        "max_bytes": 50000, "max_request_bytes": int(0.25 * 2**20), "max_pixels": 10000, "max_files": 3}
    three = [("images", (f"{i}.png", _png())) for i in range(3)]
    assert httpx.post(f"{s.url}/classify_batch", files=three).status_code == 200
    r = httpx.post(f"{s.url}/classify_batch", files=three + [("images", ("4.png", _png()))])
    assert (r.status_code, r.json()["error"]) == (413, "too_many_files")
    r = httpx.post(f"{s.url}/classify", files={"image": ("big.png", _noise_png((150, 150)))})  # 67 kB > 50,000 bytes
    assert (r.status_code, r.json()["error"]) == (413, "too_large")
    r = httpx.post(f"{s.url}/classify", files={"image": ("wide.png", _png(size=(200, 100)))})  # 20,000 px
    assert (r.status_code, r.json()["error"]) == (413, "too_many_pixels")
    files = [("images", (f"{i}.png", _noise_png((100, 100), seed=i))) for i in range(3)]  # 3 x 30 kB: 90 kB
    assert httpx.post(f"{s.url}/classify_batch", files=files).status_code == 200
    over = [("images", (f"{i}.bin", b"\0" * 140_000)) for i in range(2)]  # 280 kB: over the 0.25 MB request cap
    r = httpx.post(f"{s.url}/classify_batch", files=over)
    assert (r.status_code, r.json()["error"]) == (413, "too_large") and "request" in r.json()["detail"]


def test_request_bodies_held_at_once_are_bounded(configured):
    """Over PUPIL_MAX_INFLIGHT_MB (0.3 MB here) of request bodies in memory at once, a further request gets 503: a
    slow client holding 200 kB of an unfinished upload, and a second sending 150 kB."""
    s = configured[0]
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + b"\0" * (250_000 - len(head) - 20)
    body += f"\r\n--{boundary}--\r\n".encode().ljust(250_000 - len(body), b" ")
    slow = socket.create_connection(("127.0.0.1", s.port))
    slow.sendall((f"POST /classify_batch HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                  f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:200_000])
    t0, tries = time.time(), 0
    while True:  # until the server has read (and holds) those 200 kB; before that the second request just passes
        r = httpx.post(f"{s.url}/classify_batch", files=[("images", ("b.bin", b"\0" * 150_000))])
        tries += 1
        # a fresh-clone CI run once saw no 503 within 20 s (cause unknown): 60 s, and the failure says what it got
        if r.status_code == 503 or time.time() > t0 + 60:
            break
        time.sleep(0.2)
    assert r.status_code == 503, (r.status_code, r.text[:300], tries, round(time.time() - t0, 1))
    assert r.json()["error"] == "busy"
    slow.sendall(body[200_000:])
    reply = slow.recv(65536).decode(errors="replace")
    slow.close()
    assert reply.startswith("HTTP/1.1 200"), reply[:200]  # the slow client is answered (its file: an error entry)
    r = httpx.post(f"{s.url}/classify_batch", files=[("images", ("b.png", _png()))])
    assert r.status_code == 200  # the budget was given back


def test_field_log_keeps_exactly_the_unsure_answers_as_a_folder_pupil_check_reads(configured):
    import subprocess
    import sys

    s, field, below, sources, pred = configured
    expected = set()
    for i, data in enumerate(sources):
        r = httpx.post(f"{s.url}/classify", files={"image": (f"img{i}.png", data, "image/png")})
        assert r.status_code == 200
        if r.json()["predictions"][0]["score"] < below or r.json()["abstained"]:
            expected.add(f"img{i}.png")
    assert 0 < len(expected) < len(sources)  # the threshold splits the answers
    lines = [json.loads(x) for x in (field / "requests.jsonl").read_text().splitlines()]
    logged = {x["filename"] for x in lines if x["filename"].startswith("img")}
    assert logged == expected
    assert all(x["image"] and x["predictions"] for x in lines)
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(field / "images"), "--json"],
                       capture_output=True, text=True, timeout=120)
    report = json.loads(r.stdout)
    assert sum(report["classes"].values()) == len({x["sha256"] for x in lines})
