"""models/artifact.py: the round trip, timm's own loader, refusal of damaged files, and a version that changes with
anything that changes an answer."""
from __future__ import annotations

import json

import pytest
import torch

from models import ArtifactError, create_model, load_artifact, locate, read_artifact, save_artifact


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


@pytest.mark.parametrize("change", [{"temperature": "hot"}, {"temperature": 0}, {"threshold": 1.5},
                                    {"logit_bias": [0.1]}, {"logit_bias": [0.1, "x"]}, {"cam_head": "fc"}])
def test_a_setting_of_the_wrong_type_is_refused_by_name(tmp_path, change):
    """config.json's settings that change an answer are read typed, once: a damaged or hand-edited value is an
    ArtifactError naming the key and the file, never a wrong answer or a TypeError inside a request."""
    from models.artifact import update_config

    model, spec = create_model("small_cnn", 2, "none", width=8)
    art = save_artifact(tmp_path / "art", model, spec, ["a", "b"], extra={"logit_bias": [0.5, -0.5]})
    assert read_artifact(art).logit_bias == [0.5, -0.5] and read_artifact(art).temperature == 1.0
    update_config(art, **change)
    assert not list(art.glob(".*tmp")), "the writer left its temporary file"
    key = next(iter(change))
    with pytest.raises(ArtifactError, match=rf"config.json: {key} is"):
        read_artifact(art)


def test_version_changes_with_anything_that_changes_an_answer(tmp_path):
    from models.artifact import update_config

    model, spec = create_model("small_cnn", 2, "none", width=8)
    art = save_artifact(tmp_path / "run" / "model", model, spec, ["a", "b"], threshold=0.6)
    v0 = read_artifact(art).version
    update_config(art, onnx_sha256="0" * 64, onnx_parity_max_abs=1e-6)  # derived by the export: same answers
    assert read_artifact(art).version == v0
    seen = {v0}
    for change in ({"threshold": 0.7}, {"temperature": 2.0}, {"label_names": ["b", "a"]}):
        update_config(art, **change)
        v = read_artifact(art).version
        assert v not in seen, change
        seen.add(v)
    assert locate(tmp_path / "run") == art and locate(art) == art


def test_reading_an_artifact_needs_no_torch(tmp_path):
    """The CPU service reads config.json and checks the weights' hash without importing torch."""
    import subprocess
    import sys

    model, spec = create_model("small_cnn", 2, "none", width=8)
    art = save_artifact(tmp_path / "art", model, spec, ["a", "b"])
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "from models.artifact import read_artifact; a = read_artifact(sys.argv[1]); print(a.labels, a.version)")
    r = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "['a', 'b']" in r.stdout
