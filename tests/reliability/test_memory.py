"""Memory under hostile input: a stream of tiny files of extreme shape (a 129-byte 50,000 x 1 PNG once cost the
worker over 6 GB and dropped the connection) is answered while the server's resident memory stays within a fixed
bound."""
from __future__ import annotations

import io

import httpx
from PIL import Image

from tests.reliability.test_soak import _rss_of_tree

BOUND_MB = 150  # growth allowed over the warm server: far below what one such image cost before the fix (6 GB)


def _strip(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 200).save(buf, format="PNG")
    return buf.getvalue()


def test_a_stream_of_extreme_strips_keeps_the_server_within_a_bound(server):
    files = [_strip(50_000, 1), _strip(1, 40_000, "RGB"), _strip(49_999, 1000 // 1000), _strip(2, 25_000_000 // 2000)]
    assert all(len(f) < 20_000 for f in files)
    with httpx.Client(timeout=60) as c:
        c.post(f"{server.url}/classify", files={"image": ("warm.png", _strip(64, 64))})
        base = _rss_of_tree(server.proc.pid)
        peak = base
        for i in range(60):
            for route in ("classify", "explain"):
                r = c.post(f"{server.url}/{route}", files={"image": (f"{i}.png", files[i % len(files)])})
                assert r.status_code == 200, (route, r.status_code, r.text[:200])
            peak = max(peak, _rss_of_tree(server.proc.pid))
    grew = (peak - base) / 2**20
    print(f"strips: RSS {base / 2**20:.0f} MiB warm, {peak / 2**20:.0f} MiB peak over 120 requests")
    assert grew < BOUND_MB, f"resident memory grew by {grew:.0f} MiB"
    assert server.alive()
