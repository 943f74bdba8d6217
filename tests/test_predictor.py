"""models/predictor.py: the one inference path. Calibrated sorted answers, the same answers from torch and ONNX
Runtime, test-time augmentation, the heat map from ONNX equal to torch's Grad-CAM, and a torch-free ONNX path."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import Predictor, create_model, save_artifact
from models.export import ensure_onnx
from models.runtime import bucket, in_batches


def test_predictor_scores_are_calibrated_and_sorted(trained_run):
    pred = Predictor(trained_run)
    data_dir = trained_run.parent / "data"
    out = pred.predict([data_dir / "red" / "red_000.png", data_dir / "blue" / "blue_000.png", b"not an image"], top_k=2)
    for o in out[:2]:
        scores = [p["score"] for p in o["predictions"]]
        assert scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1) < 1e-5
    assert out[0]["predictions"][0]["label"] == "red"
    assert out[1]["predictions"][0]["label"] == "blue"
    assert out[2]["error"] == "not_an_image"
    logits = pred.logits(np.stack([pred.load(data_dir / "red" / "red_000.png")]))
    z = logits / pred.temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(pred.probabilities(np.stack([pred.load(data_dir / "red" / "red_000.png")])), expected,
                               rtol=1e-5)


def test_outputs_keep_order_and_errors_with_threaded_decoding(trained_run):
    files = sorted((trained_run.parent / "data").rglob("*.png"))[:21]
    sources = files[:10] + [b"", b"<html>"] + files[10:]
    serial = Predictor(trained_run).outputs(sources, batch_size=4)
    threaded = Predictor(trained_run, decode_threads=4).outputs(sources, batch_size=4)
    assert [type(o).__name__ for o in serial] == [type(o).__name__ for o in threaded]
    assert serial[10].problem == "empty" and serial[11].problem == "not_an_image"
    for a, b in zip(serial, threaded):
        if isinstance(a, np.ndarray):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_torch_and_onnx_give_the_same_answers(trained_run):
    images = sorted((trained_run.parent / "data").rglob("*.png"))[:8]
    torch_p = Predictor(trained_run, backend="torch", device="cpu").predict(images, top_k=2)  # fp32, as ONNX
    onnx_p = Predictor(trained_run, backend="onnx").predict(images, top_k=2)
    for t, o in zip(torch_p, onnx_p):
        assert [p["label"] for p in t["predictions"]] == [p["label"] for p in o["predictions"]]
        assert abs(t["predictions"][0]["score"] - o["predictions"][0]["score"]) < 1e-4
    assert Predictor(trained_run, backend="auto", device="cpu").backend == "onnx"  # CPU serving's default


def test_tta_averages_the_image_and_its_mirror(trained_run, tmp_path):
    plain, tta = Predictor(trained_run, device="cpu"), Predictor(trained_run, device="cpu", tta=True)
    assert plain.amp is None  # autocast is for CUDA only
    with pytest.raises(ValueError):
        Predictor(trained_run, device="cpu", amp="fp8")
    shapes = trained_run.parent / "data"
    arrays = np.stack([plain.load(p) for p in sorted(shapes.rglob("*.png"))[:6]])
    expected = (plain.logits(arrays) + plain.logits(arrays[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(tta.logits(arrays), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(tta.logits(arrays), plain.logits(arrays))  # the blobs are not mirror-symmetric
    r = subprocess.run([sys.executable, "-m", "pupil", "evaluate", str(trained_run), str(shapes), "--tta",
                        "--out", str(tmp_path / "ev")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["tta"] is True
    r = subprocess.run([sys.executable, "-m", "pupil", "predict", str(trained_run), str(shapes / "red"), "--tta"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == len(list((shapes / "red").iterdir()))


def _lite0_artifact(tmp_path):
    torch.manual_seed(0)
    model, spec = create_model("efficientnet_lite0", 3, "auto", img_size=96)
    torch.nn.init.normal_(model.get_classifier().weight, std=0.05)  # a head with an opinion
    art = save_artifact(tmp_path / "lite0", model.eval(), spec, ["a", "b", "c"])
    ensure_onnx(art)
    return art


@pytest.mark.parametrize("which", ["small_cnn", "efficientnet_lite0"])
def test_cam_from_the_onnx_features_equals_torch_grad_cam(trained_run, tmp_path, which):
    """For a global-average-pool + linear head, CAM (ONNX features x head weights) and Grad-CAM are the same map up to
    scale; after the shared [0, 1] scaling they agree to float precision (here: 1e-4)."""
    art = trained_run / "model" if which == "small_cnn" else _lite0_artifact(tmp_path)
    from tests.corpus import photo

    sources = sorted((trained_run.parent / "data").rglob("*.png"))[:4] + [photo(120, 90, seed=5).tobytes()]
    sources[-1] = _png(photo(120, 90, seed=5))
    t, o = Predictor(art, backend="torch", device="cpu"), Predictor(art, backend="onnx")
    for src in sources:
        for label in (None, t.labels[-1]):
            a, b = t.explain(src, label), o.explain(src, label)
            assert (a.method, b.method) == ("grad-cam", "cam")
            assert a.label == b.label and a.heat.shape == b.heat.shape == a.image.shape[:2]
            np.testing.assert_allclose(a.heat, b.heat, atol=1e-4)
            assert a.png()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError):
        t.explain(sources[0], "no-such-label")


def _png(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_the_onnx_path_runs_without_torch(trained_run):
    """What the CPU container does: predict and explain with torch unimportable."""
    image = sorted((trained_run.parent / "data" / "red").iterdir())[0]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from models.predictor import Predictor\n"
            "p = Predictor(sys.argv[1], backend='auto')\n"
            "ans = p.predict([sys.argv[2]])[0]\n"
            "ex = p.explain(sys.argv[2])\n"
            "print(p.backend, ans['predictions'][0]['label'], ex.method, ex.label, len(ex.png()) > 100)")
    r = subprocess.run([sys.executable, "-c", code, str(trained_run), str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["onnx", "red", "cam", "red", "True"]


def test_evaluation_batches_halve_on_out_of_memory():
    seen: list[tuple[int, int]] = []

    def run(start: int, stop: int) -> None:
        if stop - start > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append((start, stop))

    assert in_batches(23, 32, run) == 4
    covered = [i for a, b in seen for i in range(a, b)]
    assert covered == list(range(23))  # every item once, in order


def test_bucket_is_the_power_of_two_at_or_above():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 31, 32, 33)] == [1, 1, 2, 4, 4, 8, 32, 32, 64]


def test_device_thread_runs_every_model_call_on_one_thread_in_padded_batches(trained_run):
    """What a CUDA server does (forced here on the CPU): whichever thread asks, the model runs on the predictor's
    own thread, at a power-of-two batch size, and the answers are those of the plain path."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    plain = Predictor(trained_run, backend="torch", device="cpu")
    pred = Predictor(trained_run, backend="torch", device="cpu", device_thread=True)
    seen: list[tuple[str, int]] = []
    pred.model.register_forward_pre_hook(lambda m, a: seen.append((threading.current_thread().name, len(a[0]))))
    pred.warm_up(5)
    assert seen == [("pupil-device_0", 1), ("pupil-device_0", 2), ("pupil-device_0", 4), ("pupil-device_0", 8)]
    rng = np.random.default_rng(0)
    size = pred.spec.input_size
    batch = rng.integers(0, 255, (7, size, size, 3), dtype=np.uint8)
    for n in (1, 3, 5, 7):
        np.testing.assert_allclose(pred.logits(batch[:n]), plain.logits(batch[:n]), atol=1e-5)
    with ThreadPoolExecutor(4) as pool:
        rows = list(pool.map(lambda i: pred.probabilities(batch[i:i + 1])[0], range(7)))
    np.testing.assert_allclose(np.stack(rows), plain.probabilities(batch), atol=1e-5)
    image = sorted((trained_run.parent / "data" / "red").iterdir())[0]
    assert pred.explain(image).method == "grad-cam"
    assert {name for name, _ in seen} == {"pupil-device_0"}
    assert {b for _, b in seen} <= {1, 2, 4, 8}
    assert plain._device_thread is None  # the CPU default: no thread, no padding
