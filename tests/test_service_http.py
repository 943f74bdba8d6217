"""service/: the real BentoML server in a subprocess, spoken to over HTTP."""
from __future__ import annotations

import io

import httpx
from PIL import Image


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
