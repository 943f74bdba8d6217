"""service/auth.py and `pupil serve`'s access rules, against the real server: loopback unless asked, a token on every
route that touches the model (checked before the body is read), the probes and /metrics open, a token file rotated
without a restart, and the token never in the server's log."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import httpx
import pytest

from pupil.server import Server, free_port
from tests.test_service import BROWSER_ARGS, _data

MODEL_ROUTES = ("/classify", "/classify_batch", "/explain", "/metadata")


@pytest.fixture(scope="module")
def guarded(trained_run, tmp_path_factory):
    """`pupil serve RUN --token auto` on a copy of the trained run (the token file is written beside it)."""
    run = tmp_path_factory.mktemp("guarded") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("api-token"))
    port = free_port()
    cmd = [sys.executable, "-m", "pupil", "serve", str(run), "--port", str(port), "--token", "auto"]
    with Server(cmd, port=port) as s:
        s.run = run
        yield s


def _token(run) -> str:
    return (run / "api-token").read_text().strip()


def test_token_auto_is_made_once_kept_0600_and_printed_once(guarded):
    token = _token(guarded.run)
    assert len(token) >= 40 and stat.S_IMODE((guarded.run / "api-token").stat().st_mode) == 0o600
    assert guarded.output().count(token) == 1  # `pupil serve`'s one line; never in BentoML's logs after it


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer " + "x" * 500, "Basic dXNlcjpwYXNz", "Bearer  x"])
def test_every_model_route_refuses_a_missing_or_wrong_token(guarded, trained_run, header):
    headers = {"Authorization": header} if header else {}
    for route in MODEL_ROUTES:
        files = {"images" if route == "/classify_batch" else "image": ("x.png", _data(trained_run, "red", 1))}
        r = httpx.post(f"{guarded.url}{route}", files=files, headers=headers, timeout=30)
        assert r.status_code == 401, (route, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"] == "unauthorized"
    r = httpx.get(f"{guarded.url}/ui/", headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == "unauthorized"  # a browser (Accept: text/html) gets the page that asks for it


def test_the_right_token_is_answered_and_the_probes_stay_open(guarded, trained_run):
    auth = {"Authorization": f"Bearer {_token(guarded.run)}"}
    r = httpx.post(f"{guarded.url}/classify", files={"image": ("x.png", _data(trained_run, "blue", 2))},
                   headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "blue"
    assert httpx.post(f"{guarded.url}/metadata", headers=auth).json()["classes"] == ["blue", "red"]
    for probe in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{guarded.url}{probe}").status_code == 200, probe


def test_a_refused_request_costs_no_decode_and_no_body(guarded):
    """Headers that promise 100 MB and send 3 bytes: the 401 comes at once, without waiting for the body; a corrupt
    image without a token is a 401, not the decoder's 400."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as s:
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000000\r\n\r\nabc")
        t0 = time.perf_counter()
        head = s.recv(100)
        assert head.startswith(b"HTTP/1.1 401") and time.perf_counter() - t0 < 5
    r = httpx.post(f"{guarded.url}/classify", files={"image": ("x.jpg", b"not a jpeg")})
    assert r.status_code == 401


def test_a_token_file_is_rotated_without_a_restart(guarded):
    path = guarded.run / "api-token"
    old = _token(guarded.run)
    try:
        path.write_text(f"# rotated\nnew-token-{old[:4]}\n")
        time.sleep(0.05)
        assert httpx.post(f"{guarded.url}/metadata", headers={"Authorization": f"Bearer {old}"}).status_code == 401
        assert httpx.post(f"{guarded.url}/metadata",
                          headers={"Authorization": f"Bearer new-token-{old[:4]}"}).status_code == 200
    finally:
        path.write_text(old + "\n")
    assert httpx.post(f"{guarded.url}/metadata", headers={"Authorization": f"Bearer {old}"}).status_code == 200
    assert "new-token" not in guarded.output()


def test_the_web_page_asks_for_the_token_and_keeps_it_in_memory(guarded, trained_run, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{guarded.url}/ui/")
        page.wait_for_selector("#auth:not([hidden])")
        page.fill("#token", _token(guarded.run))
        page.click("#auth button")
        page.wait_for_function("document.getElementById('model').textContent.includes('small_cnn')")
        page.set_input_files("#file", str(trained_run.parent / "data" / "red" / "red_004.png"))
        page.wait_for_selector("#bars .bar")
        top = page.eval_on_selector("#bars .bar", "e => e.dataset.label")
        stored = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
        browser.close()
    assert errors == [] and top == "red" and stored == [0, 0, ""]


def test_serving_beyond_loopback_needs_a_token_or_no_auth(trained_run):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUPIL_API_TOKEN") and k != "PUPIL_AUTH"}
    r = subprocess.run([sys.executable, "-m", "pupil", "serve", str(trained_run), "--host", "0.0.0.0",
                        "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--token auto" in r.stderr and "--no-auth" in r.stderr and "Traceback" not in r.stderr
    empty = trained_run.parent / "empty-tokens"
    empty.write_text("# nothing yet\n")
    r = subprocess.run([sys.executable, "-m", "pupil", "serve", str(trained_run), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env={**env, "PUPIL_API_TOKEN_FILE": str(empty)}, timeout=60)
    assert r.returncode == 2 and "holds no token" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_service_itself_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    """What the container runs (`bentoml serve`, every interface by BentoML's default): no token and no
    PUPIL_AUTH=off, one line, exit 2, before any model is loaded; `bentoml build` imports the service all the same."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PUPIL_API_TOKEN") and k not in ("PUPIL_AUTH", "PUPIL_BIND")}
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:ImageClassifier", "--port",
                        str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "pupil: the service listens beyond loopback with no token: set PUPIL_API_TOKEN or PUPIL_API_TOKEN_FILE (a "
        "file of tokens, one a line), or PUPIL_AUTH=off to serve without one"]
    r = subprocess.run([sys.executable, "-c", "import service.service"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bentomls_own_client_passes_with_its_token_argument(guarded):
    """The README's client example: BentoML's SyncHTTPClient(url, token=...) reads the open API docs, then calls the
    routes with the token."""
    import bentoml

    with bentoml.SyncHTTPClient(guarded.url, token=_token(guarded.run)) as client:
        assert client.metadata()["classes"] == ["blue", "red"]


def test_no_auth_serves_beyond_loopback_without_a_token_on_purpose(trained_run):
    port = free_port()
    cmd = [sys.executable, "-m", "pupil", "serve", str(trained_run), "--port", str(port), "--host", "0.0.0.0",
           "--no-auth"]
    with Server(cmd, port=port) as s:
        assert httpx.post(f"{s.url}/metadata").status_code == 200
        assert ("0.0.0.0", port) in s.listening()
