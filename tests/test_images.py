"""models/images.py: every awkward file decodes to upright RGB, every broken one gets its documented problem."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.images import ImageError, decode_image, load_square
from tests.corpus import bad_files, good_files, photo

GOOD = good_files()
BAD = bad_files()


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


def test_exif_orientation_is_applied():
    """A landscape photo stored with orientation 6 (rotate 90 CW) comes out portrait, top-left pixel moved."""
    im = decode_image(GOOD["exif_rotated.jpg"][0])
    assert im.size == (48, 64)


def test_pixel_limit_is_configurable():
    data = GOOD["photo.png"][0]
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=1000)
    assert e.value.problem == "too_many_pixels" and e.value.status == 413


def test_jpeg_draft_decoding_keeps_the_target_size():
    big = io.BytesIO()
    photo(2000, 1500).save(big, format="JPEG", quality=90)
    a = load_square(big.getvalue(), 256)
    assert a.shape == (256, 256, 3)
    ref = np.asarray(photo(2000, 1500).resize((341, 256), Image.BICUBIC).crop((42, 0, 298, 256)))
    assert np.abs(a.astype(int) - ref.astype(int)).mean() < 12  # same picture, small resampling differences
