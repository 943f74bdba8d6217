"""Faults: SIGKILL while a checkpoint is being written, tampered artifacts refused by name, no pickle anywhere."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from models import ArtifactError, create_model, load_artifact, save_artifact
from training.state import load_checkpoint

WRITER = """
import sys, torch
from training.state import save_checkpoint
path, i = sys.argv[1], 0
while True:  # ~40 MB checkpoints, each tagged with its number, as fast as the disk takes them
    i += 1
    save_checkpoint(__import__("pathlib").Path(path), {"n": i, "w": torch.full((10_000_000,), float(i))})
    print(i, flush=True)
"""


def test_sigkill_during_checkpoint_writing_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint is complete
        time.sleep(rng.uniform(0.0, 0.4))  # then kill at a random point, most likely mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)
        assert torch.all(state["w"] == float(state["n"]))  # complete and self-consistent
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.") for name in leftovers)  # only temporaries of killed writers


@pytest.fixture
def artifact(tmp_path):
    model, spec = create_model("small_cnn", 2, "none", width=8, img_size=32)
    return save_artifact(tmp_path / "run" / "model", model, spec, ["a", "b"])


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weight_byte", "bad_json", "drop_config", "drop_weights"])
def test_damaged_artifacts_are_refused_by_name_by_load_and_serve(artifact, damage):
    weights, config = artifact / "model.safetensors", artifact / "config.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip_weight_byte":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "bad_json":
        config.write_text(config.read_text()[:50])
    elif damage == "drop_config":
        config.unlink()
    else:
        weights.unlink()
    culprit = "config.json" if "config" in damage or damage == "bad_json" else "model.safetensors"
    with pytest.raises(ArtifactError, match=culprit):
        load_artifact(artifact)
    r = subprocess.run([sys.executable, "-m", "pupil", "serve", str(artifact), "--port", "1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and culprit in r.stderr, r.stderr


def test_artifacts_load_without_unpickling(artifact, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    art = load_artifact(artifact)
    assert art.labels == ["a", "b"]
    assert json.loads((artifact / "config.json").read_text())["format"] == "pupil-artifact/1"


def test_pth_weights_are_loaded_with_weights_only(tmp_path):
    """A .pth that smuggles a Python object is refused, not executed."""
    from models.pretrained import PretrainedError, read_state_dict

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedError):
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
