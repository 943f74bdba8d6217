"""The recipe study's levers: layer-wise learning-rate decay, the average of the last epochs' weights, soft targets
for ordered classes (training/loop.py, training/state.py, training/fit.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_shapes_folder
from training.config import TrainConfig
from training.fit import fit
from training.loop import param_groups, smoothed_targets

LITE = dict(model="efficientnet_lite0", img_size=32, batch_size=8, progress=False, workers=1, device="cpu",
            label_issues=False, stages="finetune")


def test_layer_decay_gives_each_stage_a_fraction_of_the_rate_above_it():
    from models import create_model
    from training.prepare import freeze_early

    model, _ = create_model("efficientnet_lite0", 2, "auto", img_size=32)
    freeze_early(model, 2)
    groups = param_groups(model, 1e-3, 0.05, True, backbone_lr=0.3, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["conv_head.weight"])] == pytest.approx(3e-4)  # the top backbone group, with blocks.6
    assert lr_of[id(named["blocks.6.0.conv_pw.weight"])] == pytest.approx(3e-4)
    assert lr_of[id(named["blocks.5.0.conv_pw.weight"])] == pytest.approx(1.5e-4)
    assert lr_of[id(named["blocks.2.0.conv_pw.weight"])] == pytest.approx(3e-4 * 0.5 ** 4)
    assert id(named["blocks.1.0.conv_pw.weight"]) not in lr_of  # frozen: not optimised at all
    # without decay every backbone stage learns at the same fraction
    flat = {g["lr"] for g in param_groups(model, 1e-3, 0.05, True, backbone_lr=0.3) for p in g["params"]}
    assert sorted(flat) == pytest.approx([3e-4, 1e-3])


def test_ordinal_targets_smooth_onto_the_neighbouring_classes():
    t = smoothed_targets(4, 0.2, ordinal=True)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert t[1].tolist() == pytest.approx([0.1, 0.8, 0.1, 0.0])
    assert t[0].tolist() == pytest.approx([0.8, 0.2, 0.0, 0.0])  # an end class: all to its one neighbour
    assert t[3, 0] == 0 and t[0, 3] == 0
    assert smoothed_targets(4, 0.2, ordinal=False) is None


def test_ordinal_runs_train_with_the_soft_targets(tmp_path):
    data = make_shapes_folder(tmp_path / "data", classes=("red", "green", "blue"), n=20)
    lite = {**LITE, "img_size": 64, "stages": "both"}
    plain = fit(TrainConfig(data=str(data), epochs=2, out=str(tmp_path / "plain"), **lite))
    soft = fit(TrainConfig(data=str(data), epochs=2, out=str(tmp_path / "soft"), ordinal=True, label_smoothing=0.3,
                           **lite))
    assert soft.history[0]["train_loss"] != plain.history[0]["train_loss"]
    assert soft.metrics["val"]["accuracy"] > 0.5  # it learns (chance is a third)


def test_average_last_keeps_the_mean_of_the_last_epochs_weights(tmp_path, monkeypatch):
    from training.state import TrainState

    seen: list[dict[str, torch.Tensor]] = []
    original = TrainState.add_to_average

    def spy(self, n):
        seen.append({k: v.detach().clone() for k, v in self.judged.state_dict().items()})
        original(self, n)

    monkeypatch.setattr(TrainState, "add_to_average", spy)
    data = make_shapes_folder(tmp_path / "data", n=12)
    r = fit(TrainConfig(data=str(data), epochs=4, average_last=3, patience=0, out=str(tmp_path / "r"), **LITE))
    assert r.metrics["kept"]["averaged"]["epochs"] == [2, 3, 4] and len(seen) == 4
    if r.metrics["kept"]["kept"] == "last":
        saved = load_file(str(tmp_path / "r" / "model" / "model.safetensors"))
        w = "blocks.6.0.conv_pw.weight"
        mean = sum(s[w].double() for s in seen[1:]) / 3
        torch.testing.assert_close(saved[w].double(), mean, rtol=1e-6, atol=1e-7)
        assert not torch.equal(saved[w], seen[-1][w])  # not simply the last epoch's


def test_the_average_is_of_the_last_epochs_run_and_survives_a_checkpoint(tmp_path):
    """The window holds the last N epochs run, whenever the run ends (early stopping ended ELPV 4-class runs at
    epoch 17 of 20, where an average of the schedule's last 3 never began), and --resume gets it back."""
    from training.distributed import Dist
    from training.prepare import start
    from training.fit import new_state

    data = make_shapes_folder(tmp_path / "data", n=8)
    setup, prep = start(TrainConfig(data=str(data), epochs=20, out=str(tmp_path / "r"), **LITE))
    state = new_state(prep.model, prep.train, setup, {}, {})
    w = "blocks.6.0.conv_pw.weight"
    for epoch in range(1, 6):  # epoch e's weights all equal to e
        state.epoch = epoch
        with torch.no_grad():
            state.judged.state_dict()[w].fill_(epoch)
        state.add_to_average(3)
    assert state.avg_epochs == [3, 4, 5] and len(state.avg_window) == 3
    assert torch.all(state.averaged()[w] == 4.0)
    snap = state.snapshot(Dist())
    other = new_state(prep.model, prep.train, setup, {}, {})
    other.restore(snap, Dist())
    assert other.avg_epochs == [3, 4, 5] and torch.all(other.averaged()[w] == 4.0)
    # a checkpoint written before the window (a running sum) starts the average afresh instead of failing at the end
    snap["avg_sum"] = snap.pop("avg_window")[0]
    other.restore(snap, Dist())
    assert other.avg_window == [] and other.avg_epochs == []


def test_auto_input_size_is_288_only_for_large_images_on_the_default_model(tmp_path):
    """--img-size auto (0): 288 px where the training images' median shorter side is 288 px or more, recorded in the
    config a --config rerun reads; the model's 224 px for smaller images, under a --time-limit, for the probe alone
    (--preset fast), and when told."""
    from training.prepare import start

    big = make_shapes_folder(tmp_path / "big", n=6, size=(320, 300))
    small = make_shapes_folder(tmp_path / "small", n=6, size=(320, 200))
    base = dict(LITE, img_size=0)
    setup, prep = start(TrainConfig(data=str(big), out=str(tmp_path / "a"), **base))
    assert prep.spec.input_size == 288 and setup.cfg.img_size == 288
    assert prep.train.cache.images.shape[1] >= 288  # decoded for 288 px, not 224
    _, prep = start(TrainConfig(data=str(big), out=str(tmp_path / "c"), resume=True, **base))  # nothing to resume
    assert prep.spec.input_size == 288
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "last.pt").write_bytes(b"")  # a checkpoint from before auto: its config said 0, i.e. 224
    _, prep = start(TrainConfig(data=str(big), out=str(tmp_path / "c"), resume=True, **base))
    assert prep.spec.input_size == 224
    for data, extra in ((small, {}), (big, {"time_limit": 10.0}), (big, {"img_size": 256}), (big, {"stages": "probe"})):
        setup, prep = start(TrainConfig(data=str(data), out=str(tmp_path / "b"), **{**base, **extra}))
        assert prep.spec.input_size == (extra.get("img_size") or 224), (data.name, extra)
        assert setup.cfg.img_size == prep.spec.input_size  # the size that ran, not 0, goes into config.yaml
