"""Decoding: bytes or a path in, an RGB PIL image out, or an ImageError that says what is wrong.

Training, `pupil predict` and the service all decode through `decode_image`, so an image means the same thing
everywhere. The rules for odd files, in one place:

- Content decides, not the extension: a PNG named .jpg is a PNG; HTML named .jpg is `not_an_image`.
- EXIF orientation is applied; animations and multi-page files give their first frame.
- Transparency (RGBA, LA, P with a transparent index) is composited over white.
- High bit depth is scaled into 0..255, never clipped: 16-bit by its type's range (/257, so 8-bit and 16-bit copies of
  a picture decode alike), floats in 0..1 times 255, other ranges (32-bit integers) by their own min..max.
- CMYK, YCbCr, LAB, HSV, 1-bit and palettes go through Pillow's own conversion to RGB.
- The pixel count is checked from the header before anything is decoded (default 50 MP).
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000

# Pillow's own bomb guard is a warning at 89 MP and an error at 179 MP; ours is a clear, configurable limit checked
# from the header, so Pillow's is switched off and cannot turn a large-but-allowed image into an exception.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Problems, each with the HTTP status the service answers with.
PROBLEM_STATUS = {
    "empty": 400,
    "not_an_image": 400,
    "corrupt": 400,
    "truncated": 400,
    "too_many_pixels": 413,
    "unsupported_format": 415,
    "unreadable": 400,  # a file we may not read (permissions), in a folder scan
}


class ImageError(ValueError):
    """An input that is not a usable image. `problem` is one of PROBLEM_STATUS's keys."""

    def __init__(self, problem: str, detail: str):
        super().__init__(f"{problem}: {detail}")
        self.problem = problem
        self.detail = detail

    @property
    def status(self) -> int:
        return PROBLEM_STATUS[self.problem]


# Formats we recognise but Pillow cannot decode here: these are 415, not "not an image".
_UNSUPPORTED_SIGNATURES = (
    (b"<svg", "SVG"),
    (b"ftypheic", "HEIC"),
    (b"ftypheix", "HEIC"),
    (b"ftypmif1", "HEIF"),
    (b"%PDF", "PDF"),
)


def sniff_unsupported(head: bytes) -> str | None:
    """Name a known non-decodable image format from the first bytes, else None."""
    lowered = head[:512].lower()
    for sig, name in _UNSUPPORTED_SIGNATURES:
        if sig.lower() in lowered:
            if name == "SVG" and b"<html" in lowered:
                return None
            return name
    return None


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    mode: str
    frames: int


def _open(src: bytes | str | Path) -> Image.Image:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError("empty", "the file has zero bytes")
        fp = io.BytesIO(data)
        head = data[:512]
    else:
        path = Path(src)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise ImageError("unreadable", f"cannot read {path.name}: {e.strerror or e}") from None
        if size == 0:
            raise ImageError("empty", "the file has zero bytes")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(fp)
        if im.format in _NEEDS_EXTERNAL:
            im.close()
            raise ImageError("unsupported_format", f"{im.format} is not supported ({_NEEDS_EXTERNAL[im.format]})")
        return im
    except UnidentifiedImageError:
        fmt = sniff_unsupported(head)
        if fmt:
            raise ImageError("unsupported_format", f"{fmt} images are not supported") from None
        raise ImageError("not_an_image", "the content is not an image format we can read") from None
    except Image.DecompressionBombError as e:  # only if someone re-enabled Pillow's guard
        raise ImageError("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        if "truncat" in str(e).lower():
            raise ImageError("truncated", f"the file ends inside its header ({e})") from None
        raise ImageError("corrupt", f"cannot parse the header: {e}") from None


# Formats Pillow identifies but cannot decode without tools we do not ship (Ghostscript, Windows GDI).
_NEEDS_EXTERNAL = {"EPS": "EPS needs Ghostscript", "WMF": "WMF/EMF vector images", "MPEG": "video"}


def probe_image(src: bytes | str | Path) -> ImageInfo:
    """Read the header only: format, size, mode, frame count. Raises ImageError."""
    im = _open(src)
    try:
        return ImageInfo(im.format or "", im.width, im.height, im.mode, getattr(im, "n_frames", 1))
    finally:
        im.close()


def decode_image(
    src: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode to an upright RGB image, or raise ImageError.

    draft_size: the shorter side the caller will resize to; large JPEGs are then decoded at a reduced scale in the
    DCT domain (Pillow's draft mode, ~3x faster), never below that size.
    """
    im = _open(src)
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError("corrupt", f"the header says {w}x{h} pixels")
        if max_pixels and w * h > max_pixels:
            raise ImageError("too_many_pixels", f"{w}x{h} = {w * h / 1e6:.1f} MP is over the {max_pixels / 1e6:g} MP limit")
        if draft_size and im.format == "JPEG" and min(w, h) >= 2 * draft_size:
            # draft keeps both sides >= the request, so ask for the size that keeps the shorter side >= draft_size
            scale = draft_size / min(w, h)
            im.draft("RGB" if im.mode != "CMYK" else None, (max(1, round(w * scale)), max(1, round(h * scale))))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()
        except OSError as e:
            msg = str(e)
            if "truncat" in msg.lower() or "premature end" in msg.lower():
                raise ImageError("truncated", f"the file ends early ({msg})") from None
            raise ImageError("corrupt", msg) from None
        except (SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF must not lose the picture; keep it as stored
            pass
        return to_rgb(im)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """High bit depth -> 0..255 by a rule that never looks at one image's own maximum for 16-bit data:
    16-bit (I;16*) by the type's range, /257, so the same picture stored at 8 and at 16 bits gives the same pixels;
    float in 0..1 times 255; anything else (32-bit integers, floats outside 0..1) by its own min..max."""
    a = a.astype(np.float64)
    if a.size == 0:
        return a.astype(np.uint8)
    if mode.startswith("I;16"):
        out = a / 257.0
    else:
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if mode == "F" and lo >= 0 and hi <= 1.0:
            out = a * 255.0
        else:
            out = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.nan_to_num(np.rint(out), nan=0.0).clip(0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB by the rules in this module's docstring."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        gray = Image.fromarray(_scale_to_uint8(np.asarray(im), mode), mode="L")
        return gray.convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    return im.convert("RGB")


INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_square(
    src: bytes | str | Path,
    size: int,
    *,
    interpolation: str = "bicubic",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode, resize the shorter side to `size`, centre-crop a square: uint8 size x size x 3. The one geometric path.

    Only the square is computed: Pillow resamples the source box that maps onto it (`resize(box=...)`), with the
    same sampling positions and filter as resizing the whole image and cropping. So the work and memory are bounded
    by the output and the decoded pixels, whatever the aspect ratio: a 129-byte 50,000 x 1 PNG would otherwise be
    resized to 12,800,000 x 256 (more than 6 GB) before the crop."""
    im = decode_image(src, max_pixels=max_pixels, draft_size=size)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))  # the whole image's size after the resize
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = w / nw, h / nh  # source pixels per output pixel
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    out = im.resize((size, size), INTERPOLATION.get(interpolation, Image.BICUBIC), box=box,
                    reducing_gap=3.0 if scale < 0.5 else None)
    return np.asarray(out, dtype=np.uint8)
