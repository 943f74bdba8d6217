"""service/: the real BentoML server in a subprocess, spoken to over HTTP."""
from __future__ import annotations

import io

import httpx
from PIL import Image

from tests.conftest import Server


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_classify_a_png(server, trained_run):
    data = (trained_run.parent / "data" / "red" / "red_003.png").read_bytes()
    r = httpx.post(f"{server.url}/classify", files={"image": ("x.png", data, "image/png")}, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["label"] for p in body["predictions"]][0] == "red"
    assert abs(sum(p["score"] for p in body["predictions"]) - 1) < 1e-5
    assert body["model"]["name"] == "small_cnn" and body["model"]["version"]


def test_text_file_gets_a_4xx_json_error_and_the_server_survives(server):
    r = httpx.post(f"{server.url}/classify", files={"image": ("notes.jpg", b"just some text", "image/jpeg")})
    assert r.status_code == 400
    assert r.json()["error"] == "not_an_image"
    r = httpx.post(f"{server.url}/classify", files={"image": ("e.png", b"", "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "empty"
    r = httpx.post(f"{server.url}/classify", files={"image": ("x.png", _png((200, 30, 30)), "image/png")},
                   data={"top_k": "abc"})
    assert r.status_code == 400 and r.json()["error"] == "bad_top_k"
    r = httpx.post(f"{server.url}/classify", json={"image": "http://127.0.0.1:1/x.png"})
    assert r.status_code == 415
    assert server.alive()
    r = httpx.post(f"{server.url}/classify", files={"image": ("x.png", _png((40, 60, 210)), "image/png")})
    assert r.status_code == 200


def test_batch_keeps_order_and_isolates_bad_files(server, trained_run):
    d = trained_run.parent / "data"
    files = [("images", ("a.png", (d / "blue" / "blue_001.png").read_bytes(), "image/png")),
             ("images", ("bad.jpg", b"<html></html>", "image/jpeg")),
             ("images", ("c.png", (d / "red" / "red_001.png").read_bytes(), "image/png"))]
    r = httpx.post(f"{server.url}/classify_batch", files=files)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o.get("filename") for o in out] == ["a.png", "bad.jpg", "c.png"]
    assert out[0]["predictions"][0]["label"] == "blue"
    assert out[1]["error"] == "not_an_image"
    assert out[2]["predictions"][0]["label"] == "red"


def test_metadata_and_bentoml_client(server, trained_run):
    import bentoml

    meta = httpx.post(f"{server.url}/metadata").json()
    assert meta["classes"] == ["blue", "red"] and meta["architecture"] == "small_cnn"
    assert meta["input_size"] == 32 and meta["temperature"] > 0
    with bentoml.SyncHTTPClient(server.url) as client:
        out = client.classify(image=trained_run.parent / "data" / "blue" / "blue_002.png", top_k=1)
    assert out["predictions"][0]["label"] == "blue" and len(out["predictions"]) == 1


def test_explain_returns_a_png_heat_map(server, trained_run):
    img = (trained_run.parent / "data" / "red" / "red_004.png").read_bytes()
    r = httpx.post(f"{server.url}/explain", files={"image": ("r.png", img, "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-pupil-label"] == "red"
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
        (("x.png", _png((1, 2, 3))), {"top_k": "0"}, 400, "bad_top_k"),
        (("x.png", _png((1, 2, 3))), {"top_k": "99999"}, 400, "bad_top_k"),
    ]
    for (name, data), form, status, error in cases:
        r = httpx.post(f"{server.url}/classify", files={"image": (name, data, "application/octet-stream")}, data=form)
        assert (r.status_code, r.json()["error"]) == (status, error), (name, r.text)
    r = httpx.post(f"{server.url}/classify", files={"image": ("big.jpg", b"\xff" * (21 * 1024 * 1024), "image/jpeg")})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    r = httpx.post(f"{server.url}/classify", data={"image": "http://127.0.0.1:9/evil.png"})
    assert r.status_code == 400 and "file upload" in r.json()["detail"]
    r = httpx.post(f"{server.url}/classify", files={"other": ("x.png", _png((1, 2, 3)), "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = httpx.post(f"{server.url}/classify_batch", data={"top_k": "2"})
    assert r.status_code == 400
    assert server.alive()
    assert httpx.post(f"{server.url}/classify", files={"image": ("x.png", _png((200, 30, 30)), "image/png")}).status_code == 200


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


def test_32_concurrent_requests_are_all_answered_correctly(server, trained_run):
    from concurrent.futures import ThreadPoolExecutor

    d = trained_run.parent / "data"
    jobs = [(c, (d / c / f"{c}_{i:03d}.png").read_bytes()) for i in range(16) for c in ("red", "blue")]

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
    assert meta["backend"] == "onnx"
    assert meta["onnx_parity_max_abs"] is not None and meta["onnx_parity_max_abs"] < 1e-4


def test_web_page_classifies_an_uploaded_image(server, trained_run, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
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


def test_adaptive_batching_answers_concurrent_requests_as_the_per_request_path_does(server, trained_run):
    """PUPIL_BATCHING=on (the GPU default, forced here on the CPU): 32 concurrent /classify requests share forward
    passes, and every answer equals the per-request server's, in the right order of scores."""
    from concurrent.futures import ThreadPoolExecutor

    d = trained_run.parent / "data"
    images = [(d / c / f"{c}_{i:03d}.png").read_bytes() for i in range(16) for c in ("red", "blue")]
    batched = Server(trained_run, env={"PUPIL_BATCHING": "on", "PUPIL_BATCH_WAIT_MS": "20"}).wait_ready()
    try:
        meta = httpx.post(f"{server.url}/metadata").json()
        assert meta["batching"] is None and meta["amp"] == "fp32"  # CPU defaults: per request, fp32

        def ask(url, data):
            r = httpx.post(f"{url}/classify", files={"image": ("x.png", data, "image/png")}, timeout=60)
            return r.status_code, r.json()

        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda b: ask(batched.url, b), images))
        want = [ask(server.url, b) for b in images]
        for (s1, b1), (s2, b2) in zip(got, want):
            assert s1 == s2 == 200
            assert [p["label"] for p in b1["predictions"]] == [p["label"] for p in b2["predictions"]]
            for p, q in zip(b1["predictions"], b2["predictions"]):
                assert abs(p["score"] - q["score"]) < 1e-4
        stats = httpx.post(f"{batched.url}/metadata").json()["batching"]
        assert stats["images"] == 32 and stats["batches"] < 32 and stats["largest_batch"] > 1  # really shared
        r = httpx.post(f"{batched.url}/classify", files={"image": ("x.png", b"not an image", "image/png")})
        assert r.status_code == 400 and batched.alive()  # bad input never reaches the batch
    finally:
        batched.stop()
