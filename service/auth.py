"""Who may call the service: a bearer token on every route that touches the model, checked before the body is read.

    PUPIL_API_TOKEN        one token                                                 (or)
    PUPIL_API_TOKEN_FILE   a file of tokens, one a line ('#' comments); re-read when it changes (a Kubernetes Secret
                           mounted as a file is rotated without a restart: old and new can both be listed meanwhile)
    PUPIL_AUTH=off         serve without a token, beyond loopback too (an explicit choice, never a default)
    PUPIL_BIND             the address the server binds, as `pupil serve` passes it; else `bentoml serve`'s own
                           --host or $BENTOML_HOST, else BentoML's default, 0.0.0.0 (the container); in a worker, the
                           socket it was handed. Beyond loopback, the service refuses to start without a token.

Only the probes (/livez, /readyz, /healthz) and /metrics stay open, for the orchestrator, with BentoML's API docs
(/, /docs.json and their static files), which show the routes but no model: everything else, today's routes and any
later one, needs `Authorization: Bearer TOKEN`. A refused request gets 401, a JSON error and
`WWW-Authenticate: Bearer`, before its body is read: no decode and no model call. The /ui page, asked for by a
browser, gets its page with the 401 (it asks for the token and keeps it in the page's memory only). Tokens are kept
as SHA-256 digests and compared in constant time; no token, and no part of one, is logged or answered.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import sys
from ipaddress import ip_address
from pathlib import Path
from typing import Mapping

logger = logging.getLogger("pupil.service")
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json")
OPEN_PREFIXES = ("/static_content/",)


def loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tokens_in(text: str) -> list[str]:
    """A token file's tokens: one a line, blank lines and '#' comments skipped (the one reader of that format)."""
    return [t for line in text.splitlines() if (t := line.strip()) and not t.startswith("#")]


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class Tokens:
    """The accepted tokens, from the environment; the file's are re-read when its size, mtime or inode changes (one
    stat per request). A file that cannot be read, or holds no token, accepts nothing (fail closed)."""

    def __init__(self, env: Mapping[str, str] = os.environ):
        self.single = env.get("PUPIL_API_TOKEN", "").strip()
        self.file = Path(env["PUPIL_API_TOKEN_FILE"]) if env.get("PUPIL_API_TOKEN_FILE") else None
        self.off = env.get("PUPIL_AUTH", "").lower() == "off"
        self._stamp: tuple | None = None
        self._file_digests: list[bytes] = []

    @property
    def configured(self) -> bool:
        return bool(self.single or self.file)

    def read_file(self) -> list[str]:
        """The file's tokens (raises OSError when it cannot be read)."""
        return tokens_in(self.file.read_text(encoding="utf-8", errors="replace"))  # type: ignore[union-attr]

    def digests(self) -> list[bytes]:
        out = [_digest(self.single.encode())] if self.single else []
        if self.file is not None:
            try:
                st = self.file.stat()
                stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
                if stamp != self._stamp:
                    self._file_digests = [_digest(t.encode()) for t in self.read_file()]
                    self._stamp = stamp
                    logger.info("pupil: %d token(s) from PUPIL_API_TOKEN_FILE", len(self._file_digests))
            except OSError as e:
                if self._stamp != "unreadable":
                    logger.error("pupil: cannot read PUPIL_API_TOKEN_FILE (%s): every request is refused",
                                 e.strerror or type(e).__name__)
                self._stamp, self._file_digests = "unreadable", []
            out += self._file_digests
        return out

    def accepts(self, header: bytes) -> bool:
        """Whether an Authorization header's value carries an accepted token; the same work for every token tried
        (digests of equal length, every one compared)."""
        scheme, _, given = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return False
        d = _digest(given.strip())
        ok = False
        for known in self.digests():
            ok |= hmac.compare_digest(d, known)
        return ok


def bound_host(env: Mapping[str, str] = os.environ, argv: list[str] | None = None) -> str:
    """The address this service listens on, as well as it can be known where the service module is imported."""
    argv = sys.argv if argv is None else argv
    if "--fd" in argv:  # a BentoML worker: the socket it was handed says where it listens
        try:
            with socket.socket(fileno=os.dup(int(argv[argv.index("--fd") + 1]))) as sock:
                addr = sock.getsockname()
            if isinstance(addr, tuple):
                return addr[0]
        except (ValueError, IndexError, OSError):
            pass
    if env.get("PUPIL_BIND"):
        return env["PUPIL_BIND"]
    for i, a in enumerate(argv):  # `bentoml serve ... --host H` in the process that loads the service first
        if a == "--host" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--host="):
            return a.split("=", 1)[1]
    return env.get("BENTOML_HOST") or "0.0.0.0"


def serving(env: Mapping[str, str] = os.environ, argv: list[str] | None = None) -> bool:
    """Whether this process serves (`pupil serve`, `bentoml serve` or one of its workers), not merely imports the
    service (`bentoml build`, the tests)."""
    argv = sys.argv if argv is None else argv
    return bool(env.get("PUPIL_BIND")) or "--fd" in argv or argv[1:2] in (["serve"], ["serve-http"])


def startup_problem(env: Mapping[str, str] = os.environ, argv: list[str] | None = None) -> str | None:
    """Why the service must not start with these settings, in one line, or None."""
    tokens = Tokens(env)
    if tokens.file is not None:
        try:
            if not tokens.read_file():
                return f"PUPIL_API_TOKEN_FILE {tokens.file} holds no token (one a line)"
        except OSError as e:
            return f"cannot read PUPIL_API_TOKEN_FILE {tokens.file}: {e.strerror or e}"
    if tokens.configured or tokens.off or loopback(bound_host(env, argv)):
        return None
    return ("the service listens beyond loopback with no token: set PUPIL_API_TOKEN or PUPIL_API_TOKEN_FILE (a "
            "file of tokens, one a line), or PUPIL_AUTH=off to serve without one")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class BearerAuth:
    """ASGI middleware: 401 for a protected path without an accepted token, before the app (or the body) is read.
    Each refusal waits `delay` seconds first (PUPIL_AUTH_DELAY_MS, default 100; an event-loop sleep, no CPU): a client
    that guesses, or floods, gets at most one answer per connection in that time, and good requests keep the cores
    (bench/auth_flood.py)."""

    def __init__(self, app, tokens: Tokens | None = None, delay: float | None = None):
        self.app, self.tokens = app, tokens or Tokens()
        self.delay = delay if delay is not None else max(0.0, float(os.environ.get("PUPIL_AUTH_DELAY_MS", "100"))) / 1000

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.tokens.configured or is_open(scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.tokens.accepts(headers.get(b"authorization", b"")):
            return await self.app(scope, receive, send)
        detail = ("send the service's token as 'Authorization: Bearer TOKEN'" if b"authorization" not in headers
                  else "the token is not accepted")
        body, kind = json.dumps({"error": "unauthorized", "detail": detail}).encode(), b"application/json"
        if scope["path"].rstrip("/") == "/ui" and b"text/html" in headers.get(b"accept", b""):
            body, kind = (Path(__file__).parent / "ui.html").read_bytes(), b"text/html; charset=utf-8"
        if self.delay:
            await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="pupil"'), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})


def token_file(path: Path) -> tuple[str, bool]:
    """The token in `path`, made (32 random bytes, URL-safe) and written with mode 0600 if the file does not exist;
    (token, whether it was made now)."""
    import secrets

    try:
        old = tokens_in(path.read_text())
        if old:
            return old[0], False
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, True
