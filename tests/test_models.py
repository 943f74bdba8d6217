"""models/: bundled ImageNet weights, the small baseline, and the artifact round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import ArtifactError, create_model, load_artifact, save_artifact
from models.predictor import Predictor


def _imagenet_top5(model, spec, path) -> list[str]:
    from timm.data import ImageNetInfo

    from models.images import load_square
    from models.predictor import center, normalize, resize_size

    a = center(load_square(path, resize_size(spec), interpolation=spec.interpolation), spec.input_size)
    with torch.inference_mode():
        p = model.eval()(normalize(torch.from_numpy(np.ascontiguousarray(a))[None], spec.mean, spec.std)).softmax(-1)[0]
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in p.topk(5).indices]


def test_bundled_imagenet_weights_recognise_grace_hopper():
    import matplotlib.cbook as cbook

    model, spec = create_model("efficientnet_lite0", 1000, "auto", keep_head=True)
    assert spec.architecture == "tf_efficientnet_lite0"
    assert "bundled" in spec.pretrained_source
    assert (spec.input_size, spec.mean, spec.interpolation) == (224, (0.5, 0.5, 0.5), "bicubic")
    top5 = " | ".join(_imagenet_top5(model, spec, cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    assert "military uniform" in top5 or "academic gown" in top5, top5


def test_random_init_does_not_recognise_grace_hopper():
    """The control for the test above: without the weights the same check fails."""
    import matplotlib.cbook as cbook

    torch.manual_seed(0)
    model, spec = create_model("tf_efficientnet_lite0", 1000, "none")
    top5 = " | ".join(_imagenet_top5(model, spec, cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
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
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    assert spec.architecture == "small_cnn" and spec.model_args["width"] == 8


@pytest.mark.parametrize("arch", ["small_cnn", "tf_efficientnet_lite0"])
def test_artifact_round_trip_gives_identical_predictions(tmp_path, arch):
    torch.manual_seed(0)
    model, spec = create_model(arch, 3, "none", img_size=64)
    model.eval()
    save_artifact(tmp_path / "art", model, spec, ["a", "b", "c"], temperature=1.5)
    art = load_artifact(tmp_path / "art")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), art.model(x))
    assert art.labels == ["a", "b", "c"] and art.temperature == 1.5
    cfg = json.loads((tmp_path / "art" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert len(cfg["weights_sha256"]) == 64


def test_timm_loads_our_artifact_offline(tmp_path):
    """Our config.json is timm's layout: timm.create_model('local-dir:...') reads it with identical logits."""
    import timm

    torch.manual_seed(0)
    model, spec = create_model("tf_efficientnet_lite0", 2, "none")
    save_artifact(tmp_path / "art", model.eval(), spec, ["x", "y"])
    other = timm.create_model(f"local-dir:{tmp_path / 'art'}", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(other(x), model(x))


def test_tampered_or_truncated_artifact_is_refused_by_name(tmp_path):
    model, spec = create_model("small_cnn", 2, "none", width=8)
    art = save_artifact(tmp_path / "art", model, spec, ["a", "b"])
    weights = art / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_artifact(art)
    weights.write_bytes(data)
    (art / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json"):
        load_artifact(art)
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nowhere")


def test_predictor_scores_are_calibrated_and_sorted(trained_run):
    pred = Predictor(trained_run / "model")
    data_dir = trained_run.parent / "data"
    out = pred.predict([data_dir / "red" / "red_000.png", data_dir / "blue" / "blue_000.png", b"not an image"], top_k=2)
    for o in out[:2]:
        scores = [p["score"] for p in o["predictions"]]
        assert scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1) < 1e-5
    assert out[0]["predictions"][0]["label"] == "red"
    assert out[1]["predictions"][0]["label"] == "blue"
    assert out[2]["error"] == "not_an_image"
