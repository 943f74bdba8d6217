"""Security promises: no route reads a path or URL from the request, limits hold, the container runs unprivileged,
the service binds where the README says."""
from __future__ import annotations

import re
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def test_no_route_reads_a_path_or_fetches_a_url(server, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not really")
    for body in ({"image": str(secret)}, {"image": "file:///etc/passwd"}, {"image": "http://127.0.0.1:1/x.png"}):
        r = httpx.post(f"{server.url}/classify", json=body)
        assert r.status_code == 415, r.text  # JSON is not an upload: nothing is opened, nothing fetched
        r = httpx.post(f"{server.url}/classify", data=body)
        assert r.status_code == 400 and "file upload" in r.json()["detail"]
        r = httpx.post(f"{server.url}/classify_batch", data={"images": body["image"]})
        assert r.status_code == 200 and r.json()[0]["status"] == 400
    assert server.alive()


def test_no_pickle_and_no_unsafe_torch_load_in_the_code():
    for path in list((ROOT / "models").glob("*.py")) + list((ROOT / "service").glob("*.py")) + \
            list((ROOT / "training").glob("*.py")):
        text = path.read_text()
        assert "import pickle" not in text and "cloudpickle" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_service_binds_all_interfaces_on_3000_by_default():
    from training.cli import build_parser

    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port) == ("0.0.0.0", 3000)
    assert 'http={"port": 3000}' in (ROOT / "service" / "service.py").read_text()
