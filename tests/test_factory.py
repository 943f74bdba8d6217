"""models/factory.py and models/pretrained.py: bundled ImageNet weights, local files, the small baseline, 1 channel."""
from __future__ import annotations

import numpy as np
import torch

from models import create_model
from models.images import load_square
from models.preprocess import center, normalize


def _imagenet_top5(model, spec, path) -> list[str]:
    from timm.data import ImageNetInfo

    a = center(load_square(path, spec.resize_size, interpolation=spec.interpolation), spec.input_size)
    with torch.inference_mode():
        p = model.eval()(normalize(torch.from_numpy(np.ascontiguousarray(a))[None], spec.mean, spec.std)).softmax(-1)[0]
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in p.topk(5).indices]


def _grace_hopper() -> str:
    import matplotlib.cbook as cbook

    return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def test_bundled_imagenet_weights_recognise_grace_hopper():
    model, spec = create_model("efficientnet_lite0", 1000, "auto", keep_head=True)
    assert spec.architecture == "tf_efficientnet_lite0"
    assert "bundled" in spec.pretrained_source
    assert (spec.input_size, spec.mean, spec.interpolation) == (224, (0.5, 0.5, 0.5), "bicubic")
    top5 = " | ".join(_imagenet_top5(model, spec, _grace_hopper()))
    assert "military uniform" in top5 or "academic gown" in top5, top5


def test_random_init_does_not_recognise_grace_hopper():
    """The control for the test above: without the weights the same check fails."""
    torch.manual_seed(0)
    model, spec = create_model("tf_efficientnet_lite0", 1000, "none")
    top5 = " | ".join(_imagenet_top5(model, spec, _grace_hopper()))
    assert "military uniform" not in top5 and "academic gown" not in top5


def test_pretrained_from_a_local_file(tmp_path):
    """--pretrained PATH: a safetensors file of timm-named weights loads, the new head is left fresh."""
    from safetensors.torch import save_file

    src, _ = create_model("efficientnet_lite0", 1000, "auto", keep_head=True)
    f = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    model, spec = create_model("tf_efficientnet_lite0", 3, str(f))
    assert str(f) in spec.pretrained_source
    assert torch.equal(model.conv_stem.weight, src.conv_stem.weight)
    assert model.get_classifier().out_features == 3


def test_small_cnn_shapes():
    model, spec = create_model("small_cnn", 5, "none", width=8)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert spec.architecture == "small_cnn" and spec.model_args["width"] == 8


def test_one_channel_model_sums_the_pretrained_stem_and_sees_gray_as_rgb_does():
    rgb, s3 = create_model("efficientnet_lite0", 2, "auto")
    gray, s1 = create_model("efficientnet_lite0", 2, "auto", in_chans=1)
    assert s1.in_chans == 1 and gray.conv_stem.weight.shape[1] == 1
    torch.testing.assert_close(gray.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))
    g = torch.randint(0, 256, (2, 224, 224, 1), dtype=torch.uint8).expand(-1, -1, -1, 3).contiguous()
    rgb.eval(), gray.eval()
    with torch.no_grad():
        f3 = rgb.forward_head(rgb.forward_features(normalize(g, s3.mean, s3.std)), pre_logits=True)
        f1 = gray.forward_head(gray.forward_features(normalize(g, s1.mean, s1.std)), pre_logits=True)
    torch.testing.assert_close(f1, f3, atol=1e-4, rtol=1e-4)


def test_every_preset_and_bundled_backbone_builds_offline(monkeypatch):
    """What --preset offers works on the install the README makes, with the hub unreachable: each bundled backbone's
    ImageNet weights come from its package and recognise the same photograph."""
    import pytest

    from training.config import PRESETS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    archs = {p.get("model", "efficientnet_lite0") for p in PRESETS.values()} | {f"efficientnet_lite{i}" for i in (1, 2)}
    for arch in sorted(archs):
        model, spec = create_model(arch, 1000, "auto", keep_head=True)
        assert "bundled" in spec.pretrained_source, (arch, spec.pretrained_source)
        top5 = " | ".join(_imagenet_top5(model, spec, _grace_hopper()))
        assert "military uniform" in top5 or "academic gown" in top5, (arch, top5)
    with pytest.raises(Exception, match="offline"):
        create_model("efficientnet_b0", 2, "auto")  # no package ships it: the hub, refused offline, one clear error
