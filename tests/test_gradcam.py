"""models/gradcam.py: Grad-CAM looks where the class is decided."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _corner_patch_folder(root, n=40, size=48, seed=0):
    """Class 'patch': a bright square in the top-left corner over noise; class 'plain': noise only."""
    rng = np.random.default_rng(seed)
    for c in ("patch", "plain"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(60, 140, (size, size, 3)).astype(np.uint8)
            if c == "patch":
                a[2:16, 2:16] = (250, 220, 30)
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def test_gradcam_peaks_on_the_deciding_corner(tmp_path, tiny_config):
    from models import Predictor
    from training.fit import fit

    data = _corner_patch_folder(tmp_path / "d")
    r = fit(tiny_config(data, width=16, img_size=48, epochs=10))
    assert r.metrics["val"]["accuracy"] >= 0.9
    ex = Predictor(r.artifact_dir).explain(data / "patch" / "0.png", "patch")
    heat = ex.heat
    assert heat.shape == ex.image.shape[:2] and heat.max() == pytest.approx(1.0)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 24 and x < 24, (y, x)  # the peak is in the top-left quadrant, where the patch is
    h = heat.shape[0] // 2
    assert heat[:h, :h].mean() > 2 * heat[h:, h:].mean()
