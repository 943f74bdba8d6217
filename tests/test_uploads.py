"""service/uploads.py's read_form, on real starlette requests: the route says whether it takes one file or several
(and so which size limit applies), not the name of its form field."""
from __future__ import annotations

import asyncio

from starlette.requests import Request

from service.settings import Settings
from service.uploads import read_form


def _multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    b = "pupilboundary"
    body = b"".join(f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="f{i}.jpg"\r\n'
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n"
                    for i, (name, data) in enumerate(parts)) + f"--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def _read(parts, field, settings, many):
    body, ctype = _multipart(parts)
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]}
    return asyncio.run(read_form(Request(scope, receive), field, settings, many=many))


def test_the_route_decides_one_file_or_several_and_its_limit():
    s = Settings(max_bytes=1000, max_request_bytes=10_000, max_files=8)
    two = [("image", b"x" * 600), ("image", b"y" * 600)]
    one_route = _read(two, "image", s, many=False)
    assert one_route.problem.status == 400 and "exactly one" in one_route.problem.detail
    # a route of several files takes them under its own, larger request limit, whatever its field is called
    batch = _read(two, "image", s, many=True)
    assert batch.problem is None and [len(u.data) for u in batch.files] == [600, 600]
    # the request is over the one-file limit (1000 + 64 KiB of form) only for a one-file route
    big = [("files", b"z" * 900)] * 8
    assert _read(big, "files", Settings(max_bytes=1000, max_request_bytes=100_000, max_files=8),
                 many=True).problem is None
    assert _read(big[:1] * 80, "files", Settings(max_bytes=1000, max_request_bytes=100_000, max_files=100),
                 many=False).problem.status == 413
