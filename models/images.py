"""Decoding: bytes or a path in, an RGB PIL image out, or an ImageError that says what is wrong.

Training, `pupil predict` and the service all decode through `decode_image`, so an image means the same thing
everywhere. The rules for odd files, in one place:

- Content decides, not the extension: a PNG named .jpg is a PNG; HTML named .jpg is `not_an_image`.
- EXIF orientation is applied; animations and multi-page files give their first frame.
- Transparency (RGBA, LA, P with a transparent index) is composited over white.
- High bit depth is scaled into 0..255, never clipped: 16-bit by its type's range (/257, so 8-bit and 16-bit copies of
  a picture decode alike), floats in 0..1 times 255, other ranges (32-bit integers) by their own min..max.
- CMYK, YCbCr, LAB, HSV, 1-bit and palettes go through Pillow's own conversion to RGB.
- The pixel count is checked from the header before anything is decoded (default 50 MP), and so are the sizes a
  header hides behind another: each image inside an ICO/CUR (an embedded PNG may say 65535 x 65535 where the
  directory says 256) and the number of scans of a JPEG (a progressive JPEG of thousands of scans decodes for
  minutes). Only the first frame or page is ever read (a TIFF's 60,000 IFDs are never walked).
- 16-bit and float images are scaled to 8 bits in row strips: a 49 MP 16-bit PNG costs its decoded 98 MB and a
  strip, not the 1.8 GB of a float64 copy.
- Whatever else a decoder raises on a hostile file (TypeError from a bad TIFF tag, RuntimeError, MemoryError...) is
  `corrupt` (or `too_many_pixels` for MemoryError): every file is an image or one of PROBLEM_STATUS's problems.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
# A progressive JPEG has some 10 scans (libjpeg's default script: 10; mozjpeg's: up to 60ish with its search); more
# than this is a scan flood, which libjpeg decodes for minutes without a limit of its own.
MAX_JPEG_SCANS = 200
STRIP_PIXELS = 4_000_000  # 16-bit/float to 8-bit conversion works on strips of this many pixels

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
    "timeout": 422,  # decoding took longer than the deadline (models/decoder.py): sending it again will not help
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


def _open(src: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, bytes | None]:
    """The opened image, and the file's bytes where they were read whole (bytes given; a JPEG or an icon, whose
    hidden sizes need every byte). A path's bytes are read whole once: here for a JPEG or an icon (Pillow then
    decodes those bytes), else by Pillow after a look at the first 512."""
    data: bytes | None = None
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError("empty", "the file has zero bytes")
        fp = io.BytesIO(data)
        head = data[:512]
    else:
        path = Path(src)
        try:
            with open(path, "rb") as f:
                head = f.read(512)
                whole = head[:2] == b"\xff\xd8" or head[:4] in _ICON_SIGNATURES
                data = head + f.read() if whole else None  # JPEG, ICO: the scan count, the sizes inside
                size = len(data) if whole else os.fstat(f.fileno()).st_size
        except OSError as e:
            raise ImageError("unreadable", f"cannot read {path.name}: {e.strerror or e}") from None
        if size == 0:
            raise ImageError("empty", "the file has zero bytes")
        fp = io.BytesIO(data) if data is not None else path
    if head[:4] in _ICON_SIGNATURES:  # ICO / CUR: Pillow decodes the largest image inside at open
        check_icon_sizes(data or b"", max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(fp)
        if im.format in _NEEDS_EXTERNAL:
            im.close()
            raise ImageError("unsupported_format", f"{im.format} is not supported ({_NEEDS_EXTERNAL[im.format]})")
        return im, data
    except UnidentifiedImageError:
        fmt = sniff_unsupported(head)
        if fmt:
            raise ImageError("unsupported_format", f"{fmt} images are not supported") from None
        raise ImageError("not_an_image", "the content is not an image format we can read") from None
    except Image.DecompressionBombError as e:  # only if someone re-enabled Pillow's guard
        raise ImageError("too_many_pixels", str(e)) from None
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("too_many_pixels", "the header asks for more memory than there is") from None
    except Exception as e:  # a hostile header can raise anything in a plugin: TypeError, KeyError, RuntimeError...
        if "truncat" in str(e).lower():
            raise ImageError("truncated", f"the file ends inside its header ({e})") from None
        raise ImageError("corrupt", f"cannot parse the header: {type(e).__name__}: {e}") from None


_ICON_SIGNATURES = (b"\0\0\1\0", b"\0\0\2\0")


def check_icon_sizes(data: bytes, max_pixels: int) -> None:
    """The real size of every image inside an ICO/CUR, read from its own header (an embedded PNG's IHDR, a DIB's
    BITMAPINFOHEADER) before Pillow opens the file: its directory may say 256 x 256 over a 65535 x 65535 PNG, which
    Pillow's open decodes whole (+3.8 GB seen). Raises ImageError."""
    count = struct.unpack_from("<H", data, 4)[0] if len(data) >= 6 else 0
    for i in range(min(count, 512)):
        entry = 6 + 16 * i
        if entry + 16 > len(data):
            break
        offset = struct.unpack_from("<I", data, entry + 12)[0]
        head = data[offset:offset + 26]
        if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
            w, h = struct.unpack(">II", head[16:24])
        elif len(head) >= 12:
            w, h = (abs(v) for v in struct.unpack("<ii", head[4:12]))
            h //= 2  # a DIB inside an icon stores the AND mask's rows too
        else:
            continue
        if max_pixels and w * h > max_pixels:
            raise ImageError("too_many_pixels", f"image {i} inside the icon file is {w}x{h} = {w * h / 1e6:.1f} MP, "
                             f"over the {max_pixels / 1e6:g} MP limit")


def check_hidden_sizes(im: Image.Image, data: bytes | None, max_pixels: int) -> None:
    """Limits a header does not show, checked before the pixels are decoded: a JPEG's number of scans, from the
    file's bytes (read whole by _open; the sizes inside an icon are checked before it is even opened:
    check_icon_sizes). Raises ImageError."""
    if im.format in ("JPEG", "MPO") and data is not None:
        scans = data.count(b"\xff\xda")  # SOS markers: 0xFF in the entropy-coded data is always stuffed
        if scans > MAX_JPEG_SCANS:
            raise ImageError("corrupt", f"a JPEG of {scans} scans (a real one has about 10; over {MAX_JPEG_SCANS} "
                             "is a decoder flood)")


# Formats Pillow identifies but cannot decode without tools we do not ship (Ghostscript, Windows GDI).
_NEEDS_EXTERNAL = {"EPS": "EPS needs Ghostscript", "WMF": "WMF/EMF vector images", "MPEG": "video"}


def probe_image(src: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read the header only: format, size, mode, and frames (1, or 2 for "more than one": counting a TIFF's pages
    walks every IFD, 60,000 of them in a hostile file). Raises ImageError."""
    im, _ = _open(src, max_pixels)
    try:
        try:
            frames = 2 if getattr(im, "is_animated", False) else 1
        except Exception:  # a damaged second frame: the first is what is read
            frames = 1
        return ImageInfo(im.format or "", im.width, im.height, im.mode, frames)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError("corrupt", f"cannot parse the header: {type(e).__name__}: {e}") from None
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
    DCT domain (Pillow's draft mode: BENCHMARKS.md, Data pipeline), never below that size.
    """
    im = decode_8bit(src, max_pixels=max_pixels, draft_size=draft_size)
    return im.convert("RGB") if im.mode == "L" else im


def decode_8bit(src: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                draft_size: int | None = None) -> Image.Image:
    """decode_image, except that a gray source stays gray ("L"; RGB otherwise): its three equal channels are made
    only when needed, after a resize (a third of the memory and work for a gray picture; the same pixels)."""
    im, data = _open(src, max_pixels)
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError("corrupt", f"the header says {w}x{h} pixels")
        if max_pixels and w * h > max_pixels:
            raise ImageError("too_many_pixels", f"{w}x{h} = {w * h / 1e6:.1f} MP is over the {max_pixels / 1e6:g} MP limit")
        check_hidden_sizes(im, data, max_pixels)
        if draft_size and im.format == "JPEG" and min(w, h) >= 2 * draft_size:
            # draft keeps both sides >= the request, so ask for the size that keeps the shorter side >= draft_size
            scale = draft_size / min(w, h)
            im.draft("RGB" if im.mode != "CMYK" else None, (max(1, round(w * scale)), max(1, round(h * scale))))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.load()  # the first frame: an image opens on it (n_frames would walk every page)
        except OSError as e:
            msg = str(e)
            if "truncat" in msg.lower() or "premature end" in msg.lower():
                raise ImageError("truncated", f"the file ends early ({msg})") from None
            raise ImageError("corrupt", msg) from None
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF must not lose the picture; keep it as stored
            pass
        return to_8bit(im)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("too_many_pixels", f"decoding {im.size[0]}x{im.size[1]} needs more memory than there is") from None
    except Exception as e:  # whatever a plugin raises on a hostile file: TypeError, RuntimeError, KeyError...
        raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """High bit depth -> 0..255 by a rule that never looks at one image's own maximum for 16-bit data:
    16-bit (I;16*) by the type's range, /257, so the same picture stored at 8 and at 16 bits gives the same pixels;
    float in 0..1 times 255; anything else (32-bit integers, floats outside 0..1) by its own min..max.
    In strips of rows (STRIP_PIXELS), in float32 where float64 adds nothing: memory is the input plus one strip."""
    out = np.empty(a.shape, dtype=np.uint8)
    if a.size == 0:
        return out
    rows = max(1, STRIP_PIXELS // max(1, int(np.prod(a.shape[1:]))))
    if mode.startswith("I;16"):
        for r in range(0, len(a), rows):
            out[r:r + rows] = (a[r:r + rows].astype(np.uint32) + 128) // 257  # = rint(a / 257), exactly
        return out
    finite = np.isfinite(a) if a.dtype.kind == "f" else None
    if finite is not None and not finite.any():
        out[:] = 0
        return out
    lo = float(np.min(a, where=finite, initial=np.inf) if finite is not None else a.min())
    hi = float(np.max(a, where=finite, initial=-np.inf) if finite is not None else a.max())
    del finite
    unit = mode == "F" and lo >= 0 and hi <= 1.0
    wide = a.dtype.kind in "iu" and a.dtype.itemsize >= 4  # 32-bit integers: float64 keeps their differences
    scale = 255.0 / (hi - lo) if hi > lo and np.isfinite(hi - lo) else 0.0  # in float64: hi - lo may overflow float32
    with np.errstate(all="ignore"):  # hostile values (3e38, -3e38) are clipped below, not warned about per strip
        for r in range(0, len(a), rows):
            s = a[r:r + rows].astype(np.float64 if wide else np.float32)
            if unit:
                s *= 255.0
            else:
                s = (s - np.float64(lo)) * scale
            out[r:r + rows] = np.nan_to_num(np.rint(s), nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255)
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB by the rules in this module's docstring."""
    im = to_8bit(im)
    return im.convert("RGB") if im.mode == "L" else im


def to_8bit(im: Image.Image) -> Image.Image:
    """to_rgb, except that gray modes (L, 1, 16-bit, 32-bit, float) end as L: the rules of this module's docstring."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # pasted over white through the alpha channel: the same pixels as Image.alpha_composite over opaque white
        # (checked on random RGBA), in some 2.7 bytes a pixel less (a 49 MP RGBA PNG fits a 1 GB decode worker)
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode), mode="L")
    if mode == "1":
        return im.convert("L")
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
    im = decode_8bit(src, max_pixels=max_pixels, draft_size=size)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))  # the whole image's size after the resize
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = w / nw, h / nh  # source pixels per output pixel
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    try:  # a plugin may decode lazily, here: whatever it raises is still one of our problems, never an exception
        out = im.resize((size, size), INTERPOLATION.get(interpolation, Image.BICUBIC), box=box,
                        reducing_gap=3.0 if scale < 0.5 else None)
        return np.asarray(out.convert("RGB") if out.mode == "L" else out, dtype=np.uint8)  # gray: resized, then RGB
    except MemoryError:
        raise ImageError("too_many_pixels", f"resizing {w}x{h} needs more memory than there is") from None
    except Exception as e:
        raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None
