"""training/config.py and the command line generated from it: each option documented once, parsed as documented."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
import torch
import yaml

from pupil.cli import bare_flags, build_parser
from training.config import TrainConfig


def test_every_training_option_has_its_help_once_and_is_a_flag():
    r = subprocess.run([sys.executable, "-m", "pupil", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for f in fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        if f.name != "data":
            assert "--" + f.name.replace("_", "-") in text, f.name
        first = " ".join(f.metadata["help"].split()[:6])
        assert first in text, (f.name, first)


@pytest.mark.parametrize("argv, ema, data", [
    (["train", "--ema", "photos"], 0.999, "photos"),   # bare --ema before DATA must not swallow the folder
    (["train", "photos", "--ema"], 0.999, "photos"),
    (["train", "--ema", "0.9", "photos"], 0.9, "photos"),
    (["train", "--ema", "--epochs", "2", "photos"], 0.999, "photos"),
    (["train", "photos"], None, "photos"),
])
def test_ema_flag_takes_an_optional_decay_anywhere_on_the_line(argv, ema, data):
    args = build_parser().parse_args(bare_flags(argv))
    assert (args.ema, args.data) == (ema, data)


def test_number_or_word_flags_and_choices():
    p = build_parser()
    assert p.parse_args(["train", "d", "--lr", "auto"]).lr == "auto"
    assert p.parse_args(["train", "d", "--lr", "0.01"]).lr == 0.01
    assert p.parse_args(["train", "d", "--batch-size", "auto"]).batch_size == 0
    with pytest.raises(SystemExit):
        p.parse_args(["train", "d", "--flips", "sideways"])
    with pytest.raises(ValueError, match="--crop-scale"):
        TrainConfig(data="d", crop_scale=0).resolved()
    with pytest.raises(ValueError, match="--balance"):
        TrainConfig(data="d", balance="magic").resolved()


def test_a_preset_fills_only_what_was_not_given(tmp_path):
    import yaml

    from pupil.commands import config_from_args

    parse = build_parser().parse_args
    fast = config_from_args(parse(["train", "d", "--preset", "fast"]))
    assert fast.stages == "probe" and fast.preset == "fast"
    best = config_from_args(parse(["train", "d", "--preset", "best", "--epochs", "3"]))
    assert best.model == "efficientnet_lite2" and best.time_limit == 60.0 and best.epochs == 3  # the flag wins
    plain = config_from_args(parse(["train", "d"]))
    assert plain.model == TrainConfig().model and plain.stages == TrainConfig().stages
    # a saved config.yaml holds every value, so reading it back under its preset changes nothing
    best.save(tmp_path / "c.yaml")
    again = TrainConfig.from_file(tmp_path / "c.yaml")
    assert again.epochs == 3 and again.model == "efficientnet_lite2"
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["preset"] == "best"
    with pytest.raises(SystemExit):
        parse(["train", "d", "--preset", "slow"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["small_cnn", "backbone", "balance"])
def test_a_run_told_its_auto_choices_by_config_is_the_same_run(tmp_path, case):
    """`pupil train --config RUN/config.yaml` repeats a run whose options said "auto" bit for bit: the LR range
    test, the flips probes and the balance choice leave the random streams and the model as they found them."""
    from safetensors.torch import load_file

    from pupil.cli import main
    from tests.conftest import make_shapes_folder

    data = tmp_path / "data"
    if case == "balance":  # 24 against 6: --balance auto has something to decide
        make_shapes_folder(data, classes=("red",), n=24)
        make_shapes_folder(data, classes=("blue",), n=6, seed=1)
    else:
        make_shapes_folder(data, n=12)
    common = ["--device", "cpu", "--seed", "3", "--no-progress", "--no-label-issues"]
    if case == "backbone":
        flags = ["--epochs", "1", "--img-size", "64", "--batch-size", "8", "--lr", "auto", "--flips", "auto",
                 "--lr-find-steps", "20"]
    else:
        flags = ["--model", "small_cnn", "--epochs", "2", "--img-size", "32", "--batch-size", "4", "--lr", "auto",
                 "--flips", "auto", "--lr-find-steps", "20"] + (["--balance", "auto"] if case == "balance" else [])
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(data), *flags, *common, "--out", str(a)]) == 0
    told = yaml.safe_load((a / "config.yaml").read_text())
    assert told["lr"] != "auto" and told["flips"] != "auto" and told["balance"] != "auto"  # the choices made
    assert told["asked"]["lr"] == "auto"
    assert main(["train", "--config", str(a / "config.yaml"), "--out", str(b)]) == 0
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
