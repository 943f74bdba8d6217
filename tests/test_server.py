"""pupil/server.py: a server is stopped with every process it started, and its output is kept, never piped."""
from __future__ import annotations

import sys
import textwrap

import psutil
import pytest

from pupil.server import Server, free_port


def test_stop_ends_children_in_their_own_process_groups(tmp_path):
    """A stand-in for BentoML: a parent that serves /readyz and starts two workers in new sessions (as BentoML's
    workers run in process groups of their own), and prints far more than a pipe holds."""
    port = free_port()
    script = tmp_path / "fake.py"
    script.write_text(textwrap.dedent(f"""
        import http.server, subprocess, sys
        for _ in range(2):
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        print("x" * 200_000, flush=True)  # more than a 64 kB pipe: would block if nobody read it
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
            def log_message(self, *a): pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """))
    with Server([sys.executable, str(script)], port=port, log=tmp_path / "out.log", timeout=60) as s:
        pids = s.pids()
        assert len(pids) == 3 and s.alive()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert len((tmp_path / "out.log").read_text()) >= 200_000


def test_a_server_that_dies_says_why(tmp_path):
    s = Server([sys.executable, "-c", "import sys; print('cannot load the model'); sys.exit(3)"], port=free_port(),
               timeout=30)
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*cannot load the model"):
        s.start()
