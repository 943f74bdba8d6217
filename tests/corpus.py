"""A corpus of awkward and broken image files, made in code (no downloads), with what each should become.

`good_files()` -> {name: (bytes, (width, height) expected after EXIF orientation)}
`bad_files()`  -> {name: (bytes, problem)}
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colourful picture (compresses like a photo, not like flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)), ((x + y) * 127 / max(w + h, 1))], -1)
    a = a + rng.normal(0, 8, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB")


def exif_rotated_jpeg(w: int = 64, h: int = 48, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(photo(w, h), "JPEG", exif=exif.tobytes())


def good_files() -> dict[str, tuple[bytes, tuple[int, int]]]:
    p = photo()
    rgba = p.convert("RGBA")
    rgba.putalpha(Image.new("L", p.size, 0))  # fully transparent: must come out white, not black
    pal = p.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    frames = [photo(seed=i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    tiff = io.BytesIO()
    frames[0].save(tiff, format="TIFF", save_all=True, append_images=frames[1:])
    g16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    i32 = Image.fromarray((np.linspace(-5e6, 5e6, 64 * 48).reshape(48, 64)).astype(np.int32), "I")
    f32 = Image.fromarray((np.linspace(0, 1, 64 * 48).reshape(48, 64)).astype(np.float32), "F")
    return {
        "photo.jpg": (_save(p, "JPEG", quality=90), (64, 48)),
        "photo.png": (_save(p, "PNG"), (64, 48)),
        "png_named.jpg": (_save(photo(seed=7), "PNG"), (64, 48)),
        "exif_rotated.jpg": (exif_rotated_jpeg(), (48, 64)),
        "cmyk.jpg": (_save(p.convert("CMYK"), "JPEG"), (64, 48)),
        "gray.png": (_save(p.convert("L"), "PNG"), (64, 48)),
        "one_bit.png": (_save(p.convert("1"), "PNG"), (64, 48)),
        "la.png": (_save(p.convert("LA"), "PNG"), (64, 48)),
        "rgba.png": (_save(rgba, "PNG"), (64, 48)),
        "palette_transparent.png": (_save(pal, "PNG"), (64, 48)),
        "gray16.png": (_save(g16, "PNG"), (64, 48)),
        "int32.tif": (_save(i32, "TIFF"), (64, 48)),
        "float32.tif": (_save(f32, "TIFF"), (64, 48)),
        "animated.gif": (gif.getvalue(), (64, 48)),
        "multipage.tif": (tiff.getvalue(), (64, 48)),
        "photo.webp": (_save(p, "WEBP"), (64, 48)),
        "photo.bmp": (_save(p, "BMP"), (64, 48)),
        "tiny_1x1.png": (_save(photo(1, 1), "PNG"), (1, 1)),
        "strip_4000x3.png": (_save(photo(4000, 3), "PNG"), (4000, 3)),
        "unicode name é 猫.png": (_save(photo(seed=8), "PNG"), (64, 48)),
    }


def big_jpeg(w: int = 6000, h: int = 4000) -> bytes:
    """A 24-megapixel JPEG, as from a phone or a DSLR."""
    return _save(photo(w, h), "JPEG", quality=85)


def png_with_bad_crc() -> bytes:
    data = bytearray(_save(photo(), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 8] ^= 0xFF  # flip a byte inside the compressed data, CRC now wrong
    return bytes(data)


def png_header_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's calling card)."""
    raw = b"".join(b"\x00" + b"\x00" * w for _ in range(1))  # one row only; the decoder never gets that far
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def bad_files() -> dict[str, tuple[bytes, str]]:
    jpeg = _save(photo(256, 192), "JPEG", quality=95)
    return {
        "zero.jpg": (b"", "empty"),
        "text.jpg": (b"just some notes, not a picture\n", "not_an_image"),
        "error_page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not_an_image"),
        "half.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "header_only.jpg": (jpeg[:200], "truncated"),
        "bad_crc.png": (png_with_bad_crc(), "corrupt"),
        "drawing.svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
                        "unsupported_format"),
        "bomb_60mp.png": (png_header_claiming(10_000, 6_000), "too_many_pixels"),
        "bomb_400mp.png": (png_header_claiming(20_000, 20_000), "too_many_pixels"),
    }
