"""A seeded mutation fuzzer of the decoder: valid files of many formats, mutated, and a set of named hostile files,
each sent through the one decode path (models.images.load_square, what check, training, the Predictor and the
service all call) and, with --url, through a live service's /classify.

Every case must end in one of two outcomes: a decoded square, or one of our problem codes (ImageError; a 4xx JSON
answer from the service). Anything else is a crash; a decode over --deadline seconds is a hang. The cases run in
worker processes of --chunk cases each, whose peak RSS is the memory figure.

    python -m bench.fuzz [--cases 10000] [--seed 0] [--deadline 10] [--url http://127.0.0.1:3000] [--json FILE]

tests/reliability/test_fuzz.py runs a few hundred of these cases, and every named case, in `make test`.
"""
from __future__ import annotations

import io
import json
import random
import struct
import time
import zlib
from collections import Counter, defaultdict
from typing import Callable

import numpy as np
from PIL import Image

from models.runtime import OneLineParser

# ------------------------------------------------------------------------------------------------------ seeds


def _picture(rng: random.Random, w: int = 48, h: int = 40) -> np.ndarray:
    a = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[h // 4:h // 2, w // 4:w // 2] = (200, 40, 40)
    return a


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def seeds(rng: random.Random) -> dict[str, bytes]:
    """Valid files: the formats and variants users send."""
    a = _picture(rng)
    rgb = Image.fromarray(a)
    gray = rgb.convert("L")
    out = {
        "png-rgb": _save(rgb, "PNG"), "png-gray": _save(gray, "PNG"), "png-palette": _save(rgb.convert("P"), "PNG"),
        "png-rgba": _save(rgb.convert("RGBA"), "PNG"),
        "png-16bit": _save(Image.fromarray((a[..., 0].astype(np.uint16) * 257)), "PNG"),
        "jpeg-baseline": _save(rgb, "JPEG", quality=85), "jpeg-progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg-gray": _save(gray, "JPEG"), "jpeg-cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "tiff-rgb": _save(rgb, "TIFF"), "tiff-lzw": _save(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-16bit": _save(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "TIFF"),
        "tiff-float": _save(Image.fromarray(a[..., 0].astype(np.float32) / 255), "TIFF"),
        "tiff-multipage": _save(rgb, "TIFF", save_all=True, append_images=[gray.convert("RGB")] * 2),
        "webp": _save(rgb, "WEBP"), "webp-lossless": _save(rgb, "WEBP", lossless=True),
        "gif": _save(rgb.convert("P"), "GIF"),
        "gif-animated": _save(rgb.convert("P"), "GIF", save_all=True, append_images=[gray.convert("P")] * 3),
        "bmp": _save(rgb, "BMP"), "ico": _save(rgb, "ICO", sizes=[(32, 32)]),
    }
    return out


# ------------------------------------------------------------------------------------------------------ mutations


def _png_with_size(data: bytes, w: int, h: int) -> bytes:
    """A PNG whose IHDR says w x h (CRC fixed, so the decoder believes it)."""
    ihdr = bytearray(data[8 + 8:8 + 8 + 13])
    ihdr[0:8] = struct.pack(">II", w, h)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


def _bitflip(d: bytes, r: random.Random) -> bytes:
    b = bytearray(d)
    for _ in range(r.randint(1, 8)):
        i = r.randrange(len(b))
        b[i] ^= 1 << r.randrange(8)
    return bytes(b)


def _header_flip(d: bytes, r: random.Random) -> bytes:  # flips within the first 64 bytes: dimensions, tags
    b = bytearray(d)
    for _ in range(r.randint(1, 4)):
        b[r.randrange(min(64, len(b)))] = r.randrange(256)
    return bytes(b)


def _truncate(d: bytes, r: random.Random) -> bytes:
    return d[:r.randrange(1, len(d))]


def _insert(d: bytes, r: random.Random) -> bytes:
    i = r.randrange(len(d))
    return d[:i] + bytes(r.randrange(256) for _ in range(r.randint(1, 64))) + d[i:]


def _duplicate(d: bytes, r: random.Random) -> bytes:  # repeat a slice: chunks, segments, IFD entries twice
    i = r.randrange(len(d))
    j = min(len(d), i + r.randint(4, 256))
    return d[:j] + d[i:j] * r.randint(2, 20) + d[j:]


def _zero_run(d: bytes, r: random.Random) -> bytes:
    i = r.randrange(len(d))
    return d[:i] + b"\0" * r.randint(1, 128) + d[i + 1:]


def _ints(d: bytes, r: random.Random) -> bytes:  # a 16- or 32-bit field set to an extreme value
    b = bytearray(d)
    i = r.randrange(max(1, len(b) - 4))
    b[i:i + 4] = r.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00",
                           b"\xff\xff\x00\x00", b"\x00\x01\x00\x00"])
    return bytes(b)


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "bitflip": _bitflip, "header": _header_flip, "truncate": _truncate, "insert": _insert,
    "duplicate": _duplicate, "zeros": _zero_run, "extreme-int": _ints,
}


# ------------------------------------------------------------------------------------------------------ named cases


def jpeg_scan_flood(n: int = 5000) -> bytes:
    """A progressive JPEG with its last scan repeated n times: libjpeg decodes every one (minutes, unbounded)."""
    d = _save(Image.fromarray(_picture(random.Random(1), 64, 64)), "JPEG", progressive=True)
    sos = d.rfind(b"\xff\xda")
    return d[:sos] + d[sos:-2] * n + b"\xff\xd9"


def tiff_many_ifds(n: int = 60_000) -> bytes:
    """A TIFF whose IFD chain has n entries (each a tiny page): walking them to count pages never ends in time."""
    base = bytearray(_save(Image.new("L", (1, 1)), "TIFF"))
    first = struct.unpack_from("<I", base, 4)[0]
    count = struct.unpack_from("<H", base, first)[0]
    ifd = bytes(base[first:first + 2 + 12 * count])
    out = bytearray(base[:first])
    for i in range(n):
        at = len(out)
        out += ifd
        out += struct.pack("<I", at + len(ifd) + 4 if i < n - 1 else 0)
    struct.pack_into("<I", out, 4, first)
    return bytes(out)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def huge_1bit_png(side: int = 65535) -> bytes:
    """A whole, valid 1-bit PNG of side x side: all zeros, so some 650 KB compressed for 512 MB of pixels."""
    row = b"\0" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))


def ico_huge_png() -> bytes:
    """An ICO whose directory says 256 x 256 and whose embedded PNG is 65535 x 65535, 1 bit: Pillow decodes it
    whole, and converts it to RGBA, before a size check after the decode could say no (+3.8 GB seen)."""
    png = huge_1bit_png()
    head = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return head + png


def png_16bit_big(side: int = 7000) -> bytes:
    """A 16-bit gray PNG of side x side (49 MP, under the limit): small on disk, 98 MB decoded."""
    return _save(Image.fromarray(np.zeros((side, side), np.uint16)), "PNG")


def tiff_float_big(side: int = 7000) -> bytes:
    return _save(Image.fromarray(np.zeros((side, side), np.float32)), "TIFF", compression="tiff_deflate")


def tiff_bad_rational() -> bytes:
    """A TIFF whose resolution tags are rationals where an integer is read (Pillow's IFDRational TypeError)."""
    d = bytearray(_save(Image.fromarray(_picture(random.Random(2))), "TIFF", dpi=(72, 72)))
    first = struct.unpack_from("<I", d, 4)[0]
    for e in range(struct.unpack_from("<H", d, first)[0]):
        at = first + 2 + 12 * e
        tag = struct.unpack_from("<H", d, at)[0]
        if tag in (256, 257, 278):  # width, length, rows per strip as RATIONAL (type 5) pointing at the dpi value
            struct.pack_into("<H", d, at + 2, 5)
    return bytes(d)


def png_wide_strip() -> bytes:
    return _png_with_size(_save(Image.new("L", (1, 1)), "PNG"), 50_000, 1)


NAMED: dict[str, Callable[[], bytes]] = {
    "jpeg-scan-flood": jpeg_scan_flood, "tiff-60000-ifds": tiff_many_ifds, "ico-65535-png": ico_huge_png,
    "png-16bit-7000": png_16bit_big, "tiff-float-7000": tiff_float_big, "tiff-rational-dims": tiff_bad_rational,
    "png-50000x1": png_wide_strip,
}


def cases(n: int, seed: int = 0):
    """n mutated cases (name, mutation, bytes), seeded, every seed format in turn."""
    r = random.Random(seed)
    base = seeds(r)
    names = sorted(base)
    for i in range(n):
        fmt = names[i % len(names)]
        mut = r.choice(sorted(MUTATIONS))
        yield fmt, mut, MUTATIONS[mut](base[fmt], r)


# ------------------------------------------------------------------------------------------------------ running


def outcome(data: bytes, size: int = 256) -> tuple[str, float]:
    """("ok" | a problem code | "crash:<Exception>", seconds) of one decode through the one path."""
    from models.images import ImageError, load_square

    t0 = time.perf_counter()
    try:
        a = load_square(data, size)
        assert a.shape == (size, size, 3), a.shape
        result = "ok"
    except ImageError as e:
        result = e.problem
    except Exception as e:  # noqa: BLE001 - a crash is what this counts
        result = f"crash:{type(e).__name__}"
    return result, time.perf_counter() - t0


def _worker(batch: list[tuple[str, str, bytes]]) -> tuple[list[tuple[str, str, str, float]], float]:
    import resource

    rows = [(fmt, mut, *outcome(data)) for fmt, mut, data in batch]
    return rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_service(url: str, batch: list[tuple[str, str, bytes]], deadline: float) -> Counter:
    import httpx

    statuses: Counter = Counter()
    with httpx.Client(timeout=deadline + 60) as c:
        for fmt, mut, data in batch:
            try:
                r = c.post(f"{url}/classify", files={"image": ("f", data, "application/octet-stream")})
                statuses[f"{r.status_code // 100}xx"] += 1
                if r.status_code >= 500:
                    statuses[f"5xx:{fmt}/{mut}"] += 1
            except httpx.HTTPError as e:
                statuses[f"error:{type(e).__name__}"] += 1
    return statuses


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds after which one decode counts as a hang")
    ap.add_argument("--chunk", type=int, default=250, help="cases per worker process (its peak RSS is reported)")
    ap.add_argument("--url", help="also POST every case to this service's /classify")
    ap.add_argument("--json", help="write the summary here too")
    args = ap.parse_args()
    import multiprocessing as mp

    from bench.common import header

    header("decoder fuzz: every file an image or a problem code, in bounded time and memory")
    all_cases = [(name, "named", make()) for name, make in NAMED.items()] + list(cases(args.cases, args.seed))
    by: dict[str, Counter] = defaultdict(Counter)
    worst: list[tuple[float, str, str, str]] = []
    peaks: list[float] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(2, maxtasksperchild=1) as pool:
        chunks = [all_cases[i:i + args.chunk] for i in range(0, len(all_cases), args.chunk)]
        for rows, peak in pool.imap(_worker, chunks):
            peaks.append(peak)
            for fmt, mut, result, secs in rows:
                kind = "hang" if secs > args.deadline else ("crash" if result.startswith("crash") else "handled")
                by[f"{fmt}"][kind] += 1
                by[f"mutation {mut}"][kind] += 1
                by["all"][kind] += 1
                by["problems"][result] += 1
                worst.append((secs, fmt, mut, result))
    worst.sort(reverse=True)
    print(f"{len(all_cases)} cases ({len(NAMED)} named), seed {args.seed}, deadline {args.deadline:g} s")
    for key in sorted(by):
        print(f"  {key:<28} " + ", ".join(f"{k} {v}" for k, v in sorted(by[key].items())))
    print("slowest: " + "; ".join(f"{f}/{m} {r} {s:.2f}s" for s, f, m, r in worst[:8]))
    print(f"peak RSS of a worker process: {max(peaks):.0f} MB (each worker decodes {args.chunk} cases)")
    summary = {"cases": len(all_cases), "by": {k: dict(v) for k, v in by.items()}, "peak_rss_mb": max(peaks),
               "slowest": worst[:20]}
    if args.url:
        summary["service"] = dict(run_service(args.url, all_cases, args.deadline))
        print(f"service {args.url}: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["service"].items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)


if __name__ == "__main__":
    main()
