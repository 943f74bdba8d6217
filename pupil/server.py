"""One way to run a server for a while: start it on a free port, wait until /readyz says yes, stop it and every
process it started, and keep what it printed.

    with Server.for_artifact("runs/demo") as s:       # `pupil serve` on a free loopback port
        httpx.post(f"{s.url}/classify", files=...)

Everything that starts a server uses this: the tests, the benchmarks, the demo, `pupil verify`, the container test.
Its output goes to a log file, never to an unread pipe (a chatty server would block on a full pipe). Stopping sends
SIGTERM to the whole process tree, found before the first signal: BentoML runs its workers in process groups of
their own, so stopping the server's group alone left them running, re-parented to PID 1, 580 MB each.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def auth_headers(env=os.environ) -> dict[str, str]:
    """The header a client of a pupil service sends: the token in $PUPIL_API_TOKEN, else the first in
    $PUPIL_API_TOKEN_FILE (service/auth.py), else none (a service on loopback with no token asks for none)."""
    from service.auth import tokens_in

    token = env.get("PUPIL_API_TOKEN", "").strip()
    if not token and env.get("PUPIL_API_TOKEN_FILE"):
        try:
            token = next(iter(tokens_in(Path(env["PUPIL_API_TOKEN_FILE"]).read_text())), "")
        except OSError:
            pass
    return {"Authorization": f"Bearer {token}"} if token else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the server at {url} was not ready within {timeout:.0f}s")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, timeout: float = 20) -> None:
    """SIGTERM to pid and every descendant (each in whatever process group it made), then SIGKILL what is left."""
    import psutil

    procs = []
    for p in process_tree(pid):
        try:
            procs.append(psutil.Process(p))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


class Server:
    """A server process on a free port (or `port`), its output in `log`. A context manager: started and ready on
    entry, stopped (the whole tree) on exit."""

    def __init__(self, cmd: list[str], *, port: int, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 host: str = "127.0.0.1", log: str | Path | None = None, timeout: float = 180):
        self.cmd, self.port, self.cwd, self.timeout = cmd, port, cwd, timeout
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://{host}:{port}"
        self.own_log = log is None  # a temporary file of ours: removed when the server stops
        self.log = Path(log) if log else Path(tempfile.mkstemp(prefix=f"pupil-server-{port}-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.ready_seconds = 0.0

    @classmethod
    def for_artifact(cls, artifact: str | Path, *, env: dict[str, str] | None = None, port: int = 0,
                     host: str | None = "127.0.0.1", log: str | Path | None = None, timeout: float = 180) -> "Server":
        """`pupil serve ARTIFACT` on loopback (host None: pupil serve's own default, loopback too)."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "pupil", "serve", os.fspath(artifact), "--port", str(port)]
        cmd += ["--host", host] if host else []
        return cls(cmd, port=port, env=env, log=log, timeout=timeout)

    def start(self) -> "Server":
        t0 = time.perf_counter()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_ready(self.url, self.proc, self.timeout)
        except (RuntimeError, TimeoutError) as e:
            tail = self.output()[-3000:]
            self.stop()
            raise type(e)(f"{e}; its output ends:\n{tail}") from None
        self.ready_seconds = time.perf_counter() - t0
        return self

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every socket the server's processes listen on, read from the processes themselves."""
        import psutil

        out = set()
        for pid in self.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except psutil.Error:
                continue
            out |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
        return out

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/livez", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.own_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> "Server":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
