"""models/export.py and `pupil export`: ONNX (current exporter, two outputs) and TorchScript, each checked against
torch; the CAM head is recorded only where it is exactly global-average-pool + linear."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import torch

from models import create_model, read_artifact, save_artifact
from models.export import cam_head


def test_pupil_export_onnx_and_torchscript_from_the_command_line(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "model" / "model.onnx").unlink()
    r = subprocess.run([sys.executable, "-m", "pupil", "export", str(run), "--format", "onnx", "--out",
                        str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["max_abs_diff_vs_torch"] < 1e-4 and out["path"] == str(tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)  # a batch of 3: the batch is dynamic
    logits, feats = sess.run(None, {"input": x})
    art = read_artifact(run / "model")
    assert logits.shape == (3, 2) and feats.shape[0] == 3
    assert art.info["onnx"]["exporter"].startswith("pupil-onnx/2") and art.config["cam_head"]["weight"]

    r = subprocess.run([sys.executable, "-m", "pupil", "export", str(run), "--format", "torchscript"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    traced = torch.jit.load(out["path"])
    with torch.inference_mode():
        torch.testing.assert_close(traced(torch.from_numpy(x)), torch.from_numpy(logits), atol=1e-4, rtol=1e-4)

    (run / "model" / "model.safetensors").write_bytes(b"damaged")
    r = subprocess.run([sys.executable, "-m", "pupil", "export", str(run)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "model.safetensors" in r.stderr


def test_cam_head_is_recorded_only_for_a_pool_plus_linear_head():
    model, _ = create_model("small_cnn", 3, "none", width=8)
    assert cam_head(model) == {"weight": "classifier.weight", "bias": "classifier.bias"}

    class MLPHead(torch.nn.Module):  # the same model with a hidden layer in its head: CAM would not be Grad-CAM
        def __init__(self, base):
            super().__init__()
            self.base, self.hidden = base, torch.nn.Linear(base.num_features, base.num_features)
            self.num_features = base.num_features

        def forward_features(self, x):
            return self.base.forward_features(x)

        def forward_head(self, f):
            return self.base.classifier(torch.relu(self.hidden(f.mean((2, 3)))))

        def get_classifier(self):
            return self.base.classifier

    assert cam_head(MLPHead(model)) is None


def test_one_channel_model_exports_and_serves_the_same_answers(shapes_dir, tiny_config):
    from models import Predictor
    from models.export import ensure_onnx
    from training.fit import fit

    run = fit(tiny_config(shapes_dir, model="efficientnet_lite0", epochs=1, in_chans=1))
    cfg = json.loads((run.artifact_dir / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"][0] == 1 and len(cfg["pretrained_cfg"]["mean"]) == 1
    assert run.metrics["val"]["accuracy"] > 0.6
    ensure_onnx(run.artifact_dir)
    a = read_artifact(run.artifact_dir)
    assert a.spec.in_chans == 1 and a.info["onnx"]["parity_max_abs"] < 1e-4
    images = sorted(shapes_dir.rglob("*.png"))[:5]
    torch_p = Predictor(run.artifact_dir, backend="torch", device="cpu").predict(images)
    onnx_p = Predictor(run.artifact_dir, backend="onnx").predict(images)
    for t, o in zip(torch_p, onnx_p):
        assert t["predictions"][0]["label"] == o["predictions"][0]["label"]
        assert abs(t["predictions"][0]["score"] - o["predictions"][0]["score"]) < 1e-4


def test_export_refuses_a_model_whose_onnx_drifts(tmp_path, monkeypatch):
    """The parity check is real: an export whose output differs from torch is not kept."""
    import pytest

    from models import export

    model, spec = create_model("small_cnn", 2, "none", width=8, img_size=32)
    art = save_artifact(tmp_path / "art", model, spec, ["a", "b"])
    monkeypatch.setattr(export, "PARITY_TOL", -1.0)
    with pytest.raises(export.ExportError):
        export.ensure_onnx(art)
    assert not (art / "model.onnx").exists()
