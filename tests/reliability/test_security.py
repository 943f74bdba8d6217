"""Security promises: no route reads a path or URL from the request, no code can unpickle, the service listens where
the README says."""
from __future__ import annotations

import ast
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CODE = ("pupil", "models", "training", "service", "deploy", "bench")


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


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """Every import of an unpickling module, and every torch.load / torch.serialization.load call (however it was
    imported or aliased) that does not pass weights_only=True."""
    tree = ast.parse(source)
    found, loaders = [], {"torch.load", "torch.serialization.load"}
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UNPICKLERS:
                    found.append(f"import {a.name}")
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLERS:
                found.append(f"from {node.module} import ...")
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr) -> str:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            return f"{dotted(expr.value)}.{expr.attr}"
        return ""

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and dotted(node.func) in loaders:
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"line {node.lineno}: {dotted(node.func)} without weights_only=True")
    return found


def test_the_scanner_finds_what_the_regex_missed():
    bad = ["from pickle import loads", "import cloudpickle as cp", "import torch.serialization as ts\nts.load('x')",
           "from torch import load\nload('x')", "import torch as T\nT.load('x', weights_only=False)",
           "from torch.serialization import load as L\nL('x')", "import dill"]
    for src in bad:
        assert unsafe_calls(src), src
    assert unsafe_calls("import torch\ntorch.load('x', map_location='cpu', weights_only=True)") == []


def test_no_code_can_unpickle():
    found = {str(p.relative_to(ROOT)): unsafe_calls(p.read_text())
             for d in CODE for p in (ROOT / d).rglob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_service_listens_on_loopback_only_by_default(server):
    """`pupil serve` binds 127.0.0.1 unless told otherwise (beyond it, a token: tests/test_auth.py): read from the
    running server's own sockets."""
    listening = server.listening()
    assert ("127.0.0.1", server.port) in listening and ("0.0.0.0", server.port) not in listening, listening
    from pupil.cli import build_parser

    assert build_parser().parse_args(["serve", "x"]).port == 3000
