"""models/images.py: every awkward file decodes to upright RGB with the right pixels, every broken one gets its
documented problem, and no image costs more than its pixels and the output."""
from __future__ import annotations

import io
import resource
import time

import numpy as np
import pytest
from PIL import Image

from models.images import ImageError, decode_image, load_square
from tests.corpus import bad_files, good_files, photo

GOOD = good_files()
BAD = bad_files()


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_decode_upright_rgb(name):
    data, size = GOOD[name]
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == size


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_get_their_problem(name):
    data, problem = BAD[name]
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.problem == problem


def test_transparency_is_white_and_16_bit_is_scaled_not_clipped():
    rgba = np.asarray(decode_image(GOOD["rgba.png"][0]))
    assert (rgba == 255).all()
    g16 = np.asarray(decode_image(GOOD["gray16.png"][0]))[..., 0]
    assert g16.min() == 0 and g16.max() == 255 and 100 < g16.mean() < 155  # a full ramp, not saturated


def test_16_bit_is_scaled_by_its_type_range_so_8_and_16_bit_copies_decode_alike():
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    sixteen = eight.astype(np.uint16) * 257  # the same picture at 16 bits
    a = np.asarray(decode_image(_save(Image.fromarray(eight), "PNG")))
    b = np.asarray(decode_image(_save(Image.fromarray(sixteen), "PNG")))
    np.testing.assert_array_equal(a, b)
    # a dark 16-bit image (maximum 256 of 65535) stays dark: not stretched by its own maximum
    dark = np.asarray(decode_image(_save(Image.fromarray(np.full((8, 8), 256, np.uint16)), "PNG")))
    assert dark.max() == 1
    assert np.asarray(decode_image(_save(Image.fromarray(np.full((8, 8), 255, np.uint16)), "PNG"))).max() == 1


def test_exif_orientation_is_applied_in_the_right_direction():
    """Orientation 6 means the stored picture must be turned 90 degrees clockwise to be upright."""
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:8, :8] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    im = np.asarray(decode_image(_save(Image.fromarray(stored), "PNG", exif=exif.tobytes())))
    assert im.shape == (64, 48, 3)
    # turned clockwise, the stored top-left corner is now the top-right corner
    assert im[:8, -8:, 0].mean() > 200 and im[:8, :8, 0].mean() < 50 and im[-8:, -8:, 0].mean() < 50


def test_cmyk_palette_and_gray_pixels_come_out_as_their_rgb():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (200, 40, 30)
    rgb[:, 4:] = (20, 90, 220)
    cmyk = np.asarray(decode_image(_save(Image.fromarray(rgb).convert("CMYK"), "TIFF"))).astype(int)
    np.testing.assert_allclose(cmyk[:, :4].mean((0, 1)), (200, 40, 30), atol=3)
    np.testing.assert_allclose(cmyk[:, 4:].mean((0, 1)), (20, 90, 220), atol=3)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    np.testing.assert_array_equal(np.asarray(decode_image(_save(pal, "PNG"))), rgb)
    gray = np.asarray(decode_image(_save(Image.fromarray(np.full((4, 4), 77, np.uint8)), "PNG")))
    assert (gray == 77).all()


def test_pixel_limit_is_configurable():
    data = GOOD["photo.png"][0]
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=1000)
    assert e.value.problem == "too_many_pixels" and e.value.status == 413


def test_jpeg_draft_decoding_keeps_the_target_size():
    a = load_square(_save(photo(2000, 1500), "JPEG", quality=90), 256)
    assert a.shape == (256, 256, 3)
    ref = np.asarray(photo(2000, 1500).resize((341, 256), Image.BICUBIC).crop((42, 0, 298, 256)))
    assert np.abs(a.astype(int) - ref.astype(int)).mean() < 12  # same picture, small resampling differences


def test_load_square_equals_resizing_the_whole_image_then_cropping():
    im = photo(640, 480, seed=3)
    ref = np.asarray(im.resize((341, 256), Image.BICUBIC).crop((42, 0, 298, 256))).astype(int)
    got = load_square(_save(im, "PNG"), 256).astype(int)
    assert np.abs(got - ref).max() <= 2 and np.abs(got - ref).mean() < 0.3


@pytest.mark.parametrize("w, h", [(50_000, 1), (1, 40_000), (65_000, 2)])
def test_a_tiny_file_of_extreme_shape_costs_only_its_output(w, h):
    """A 129-byte 50,000 x 1 PNG once made the resize allocate over 6 GB (shorter side 1 -> 256)."""
    data = _save(Image.new("RGB", (w, h), (128, 64, 32)), "PNG")
    assert len(data) < 2000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = load_square(data, 256)
    assert out.shape == (256, 256, 3) and (out == (128, 64, 32)).all()
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 50, f"peak memory grew by {grew_mb:.0f} MB"
    assert time.perf_counter() - t0 < 5  # a sanity bound, not a benchmark: it took over 8 s before the fix


@pytest.mark.parametrize("error", [RuntimeError("colour plane damaged"), MemoryError()])
def test_an_error_raised_after_the_decode_is_still_a_problem_code(monkeypatch, error):
    """A plugin that decodes lazily (on the resize, after decode_image returned) raises there: load_square turns it
    into its problem, like every other decoder error (an AVIF with a damaged colour plane escaped as RuntimeError)."""
    def lazy(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image.Image, "resize", lazy)
    with pytest.raises(ImageError) as e:
        load_square(GOOD["rgba.png"][0], 32)
    assert e.value.problem == ("too_many_pixels" if isinstance(error, MemoryError) else "corrupt")


@pytest.mark.parametrize("fmt", ["JPEG", "ICO"])
def test_a_jpeg_or_icon_path_is_read_once(tmp_path, monkeypatch, fmt):
    """The scan count of a JPEG and the sizes inside an icon need every byte: the file is read whole once and
    Pillow decodes those bytes, instead of opening and reading it a second time."""
    import builtins

    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(path, fmt)
    opened = []
    real_open = builtins.open

    def counting(file, *args, **kwargs):
        if str(file) == str(path):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    assert load_square(path, 32).shape == (32, 32, 3)
    assert len(opened) == 1
