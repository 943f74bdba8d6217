"""training/config.py and the command line generated from it: each option documented once, parsed as documented."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

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
