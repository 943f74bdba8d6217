"""`pupil train --ensemble N`: members on one split, one artifact whose answer averages theirs, the same from every
reader (torch, ONNX, the CAM head, the HTTP service), and --resume keeping finished members."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models.ensemble import Averaged
from models.explain import cam_weight, class_activation_map
from models.small_cnn import SmallCNN
from tests.conftest import TINY, TINY_FLAGS, make_shapes_folder
from training.config import TrainConfig
from training.fit import fit

CPU = {"device": "cpu"}


def test_averaged_answers_the_mean_of_its_members_and_its_head_splits_the_features():
    torch.manual_seed(0)
    members = [SmallCNN(num_classes=3, width=8, depth=2).eval() for _ in range(3)]
    model = Averaged(members).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = torch.stack([m(x) for m in members]).mean(0)
        assert torch.allclose(model(x), want, atol=1e-6)
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features == 3 * members[0].num_features
        assert torch.allclose(model.forward_head(feats), want, atol=1e-6)
    # the one linear head over the concatenated features gives the members' mean CAM
    f = feats[0].numpy()
    heads = [m.get_classifier().weight.detach().numpy() for m in members]
    c = members[0].num_features
    mean_cam = np.mean([np.tensordot(heads[i][1], f[i * c:(i + 1) * c], axes=(0, 0)) for i in range(3)], 0)
    assert np.allclose(class_activation_map(f, cam_weight(heads), 1), np.maximum(mean_cam, 0), atol=1e-5)
    with pytest.raises(ValueError, match="2 to 16"):
        Averaged(members[:1])


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ensemble")
    root = base / "data"
    make_shapes_folder(root / "train", n=24, seed=1)
    make_shapes_folder(root / "test", n=6, seed=3)
    result = fit(TrainConfig(data=str(root), epochs=3, out=str(base / "run"), ensemble=2, **TINY, **CPU))
    return root, result


def _weights(artifact_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(artifact_dir / "model.safetensors"))


def test_members_share_one_split_start_apart_and_leave_the_test_split_to_the_ensemble(ensemble_run):
    root, result = ensemble_run
    members = [result.run_dir / "members" / str(i) for i in (0, 1)]
    splits = [json.loads((m / "split.json").read_text()) for m in members]
    assert splits[0]["train"] == splits[1]["train"] and splits[0]["val"] == splits[1]["val"]
    assert json.loads((result.run_dir / "split.json").read_text())["val"] == splits[0]["val"]
    w0, w1 = (_weights(m / "model") for m in members)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # two initialisations, not one model twice
    for m in members:
        assert json.loads((m / "metrics.json").read_text())["test"] == {}
    assert result.metrics["test"]["n"] == 12 and [r["seed"] for r in result.metrics["kept"]["members"]] == [0, 1]
    ens = _weights(result.artifact_dir)
    assert all(torch.equal(ens[f"members.0.{k}"], w0[k]) for k in w0) and len(ens) == 2 * len(w0)
    assert json.loads((result.artifact_dir / "config.json").read_text())["ensemble_members"] == 2
    again = TrainConfig.from_file(result.run_dir / "config.yaml")  # `pupil train --config` repeats the ensemble
    assert again.ensemble == 2 and again.seed == 0 and again.epochs == 3
    report = (result.run_dir / "report.html").read_text()
    assert "<h2>Ensemble</h2>" in report and "members/1/report.html" in report


def test_every_reader_of_the_artifact_gives_the_members_mean(ensemble_run):
    from models.export import ensure_onnx
    from models.predictor import Predictor

    root, result = ensemble_run
    images = sorted((root / "test").rglob("*.png"))[:5]
    p = Predictor(result.run_dir, device="cpu")
    x = np.stack([p.load(i) for i in images])
    members = [Predictor(result.run_dir / "members" / str(i), device="cpu") for i in (0, 1)]
    want = (members[0]._logits(x) + members[1]._logits(x)) / 2  # raw logits: each member's own bias left out
    assert np.allclose(p._logits(x), want, atol=1e-5)
    ensure_onnx(result.artifact_dir)
    q = Predictor(result.run_dir, backend="onnx")
    assert np.allclose(q._logits(x), want, atol=1e-4)
    assert len(q.artifact.cam_head["weight"]) == 2
    cam, grad = q.explain(images[0]), p.explain(images[0])
    assert cam.method == "cam" and grad.method == "grad-cam" and cam.label == grad.label
    assert q.predict(images[0])[0]["predictions"][0]["label"] == p.predict(images[0])[0]["predictions"][0]["label"]


def test_the_service_serves_an_ensemble(ensemble_run, tmp_path):
    from pupil.server import Server

    root, result = ensemble_run
    image = sorted((root / "test" / "red").glob("*.png"))[0]
    with Server.for_artifact(result.run_dir, host=None) as s:
        r = httpx.post(f"{s.url}/classify", files={"image": ("x.png", image.read_bytes(), "image/png")}, timeout=60)
        meta = httpx.post(f"{s.url}/metadata", timeout=60).json()
    assert meta["ensemble_members"] == 2 and meta["architecture"] == "small_cnn"
    assert r.status_code == 200, r.text
    answer = r.json()
    from models.predictor import Predictor

    local = Predictor(result.run_dir, device="cpu").predict(image)[0]
    assert answer["predictions"][0]["label"] == local["predictions"][0]["label"]
    assert answer["predictions"][0]["score"] == pytest.approx(local["predictions"][0]["score"], abs=1e-4)


def test_resume_keeps_a_finished_member_and_retrains_one_with_other_settings(tmp_path, capfd):
    root = make_shapes_folder(tmp_path / "data", n=20)
    cfg = dict(data=str(root), epochs=2, out=str(tmp_path / "run"), ensemble=2, **TINY, **CPU)
    fit(TrainConfig(**cfg))
    m0, m1 = (tmp_path / "run" / "members" / str(i) / "metrics.json" for i in (0, 1))
    before = m0.stat().st_mtime_ns, m1.stat().st_mtime_ns
    m1.unlink()  # member 1 never finished
    capfd.readouterr()
    again = fit(TrainConfig(**cfg, resume=True))
    err = capfd.readouterr().err
    assert "member 1/2 (seed 0): kept" in err and m0.stat().st_mtime_ns == before[0] and m1.is_file()
    assert again.metrics["kept"]["kept"] == "ensemble"
    fit(TrainConfig(**{**cfg, "epochs": 3}, resume=True))  # other settings: neither member is this run's
    assert m0.stat().st_mtime_ns != before[0]
    assert "trained with other settings (epochs)" in capfd.readouterr().err


def test_split_seed_moves_the_initialisation_and_keeps_the_split(shapes_dir, tmp_path):
    a = fit(TrainConfig(data=str(shapes_dir), epochs=2, out=str(tmp_path / "a"), **TINY, **CPU))
    b = fit(TrainConfig(data=str(shapes_dir), epochs=2, out=str(tmp_path / "b"), seed=5, split_seed=0, **TINY, **CPU))
    c = fit(TrainConfig(data=str(shapes_dir), epochs=2, out=str(tmp_path / "c"), seed=5, **TINY, **CPU))
    va, vb, vc = (json.loads((r.run_dir / "split.json").read_text())["val"] for r in (a, b, c))
    assert va == vb != vc
    wa, wb = _weights(a.artifact_dir), _weights(b.artifact_dir)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("flags, says", [(["--ensemble", "0"], "--ensemble is a number of models"),
                                         (["--ensemble", "2", "--epochs", "0"], "--ensemble averages fine-tunes")])
def test_a_bad_ensemble_request_is_one_line_and_status_2(shapes_dir, tmp_path, flags, says):
    r = subprocess.run([sys.executable, "-m", "pupil", "train", str(shapes_dir), *TINY_FLAGS, "--out",
                        str(tmp_path / "run"), *flags], capture_output=True, text=True)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("value", [0, 17, "2", True])
def test_a_damaged_member_count_is_an_artifact_error_naming_it(ensemble_run, tmp_path, value):
    import shutil

    from models.artifact import ArtifactError, read_artifact

    art = tmp_path / "model"
    shutil.copytree(ensemble_run[1].artifact_dir, art)
    cfg = json.loads((art / "config.json").read_text())
    (art / "config.json").write_text(json.dumps({**cfg, "ensemble_members": value}))
    with pytest.raises(ArtifactError, match="ensemble_members"):
        read_artifact(art)
