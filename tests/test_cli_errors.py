"""pupil/cli.py's one error path: every command, given a missing or damaged artifact, a missing folder, an unreadable
file or a bad option, prints one line on stderr that names the problem and exits 2; never a traceback."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pupil.cli import main

# every command that takes an artifact, with the rest of a valid command line ({a}: the artifact, {d}: a folder)
ARTIFACT_COMMANDS = [
    ["predict", "{a}", "{img}"],
    ["evaluate", "{a}", "{d}"],
    ["verify", "{a}", "--no-serve"],
    ["export", "{a}"],
    ["serve", "{a}", "--port", "1"],
    ["build", "{a}", "--no-verify"],
]
FOLDER_COMMANDS = [["check", "{d}"], ["train", "{d}", "--epochs", "1"], ["lr-find", "{d}"]]


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def fill(cmd, **values):
    return [part.format(**values) for part in cmd]


def one_line_error(err: str, *names: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("pupil ")]
    assert "Traceback" not in err, err
    assert lines and all(n in lines[-1] for n in names), err


@pytest.fixture
def damaged(trained_run, tmp_path):
    """Copies of a trained run with one file damaged by hand each."""
    out = {}
    for kind in ("config", "weights", "other_model"):
        run = tmp_path / kind
        shutil.copytree(trained_run, run)
        model = run / "model"
        if kind == "config":
            text = (model / "config.json").read_text()
            (model / "config.json").write_text(text[: len(text) // 2])  # truncated
        elif kind == "weights":
            (model / "model.safetensors").write_bytes(b"\x00" * 100)
        else:  # the weights of another model: a tiny safetensors file whose tensors do not fit
            from safetensors.torch import save_file
            import torch

            save_file({"w": torch.zeros(3)}, str(model / "model.safetensors"))
        out[kind] = run
    return out


@pytest.mark.parametrize("cmd", ARTIFACT_COMMANDS, ids=lambda c: c[0])
def test_a_missing_artifact_is_one_line_and_exit_2(cmd, tmp_path, capsys, shapes_dir):
    img = next((shapes_dir / "red").iterdir())
    code, err = run(fill(cmd, a=str(tmp_path / "no-such-run"), d=str(shapes_dir), img=str(img)), capsys)
    assert code == 2
    one_line_error(err, "no-such-run")


def test_serve_token_auto_on_a_missing_artifact_leaves_no_token_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PUPIL_CACHE", str(tmp_path / "cache"))
    code, err = run(["serve", str(tmp_path / "no-such-run"), "--token", "auto"], capsys)
    assert code == 2
    one_line_error(err, "no-such-run")  # and no token printed for it
    assert not list((tmp_path / "cache").rglob("*.token")) and not (tmp_path / "no-such-run").exists()


@pytest.mark.parametrize("kind", ["config", "weights", "other_model"])
@pytest.mark.parametrize("cmd", [c for c in ARTIFACT_COMMANDS if c[0] in ("predict", "evaluate", "export", "serve")],
                         ids=lambda c: c[0])
def test_a_damaged_artifact_names_the_file_and_exits_2(cmd, kind, damaged, capsys, shapes_dir):
    img = next((shapes_dir / "red").iterdir())
    code, err = run(fill(cmd, a=str(damaged[kind]), d=str(shapes_dir), img=str(img)), capsys)
    assert code == 2, err
    one_line_error(err, {"config": "config.json"}.get(kind, "model.safetensors"))


@pytest.mark.parametrize("cmd", FOLDER_COMMANDS, ids=lambda c: c[0])
def test_a_missing_folder_is_one_line_and_exit_2(cmd, tmp_path, capsys):
    code, err = run(fill(cmd, d=str(tmp_path / "no-such-folder")), capsys)
    assert code == 2
    one_line_error(err, "no-such-folder")


def test_an_unreadable_config_file_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "config.yaml"
    bad.write_text("epochs: [1, 2\n  oops: {")
    code, err = run(["train", "--config", str(bad)], capsys)
    assert code == 2
    one_line_error(err)
    code, err = run(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    one_line_error(err, "missing.yaml")


@pytest.mark.parametrize("argv", [["train", "d", "--epochs", "x"], ["predict"], ["nonsense"],
                                  ["train", "d", "--flips", "sideways"], ["check", "d", "--max-pixels", "lots"],
                                  ["serve", "d", "--token", "auto", "--no-auth"], ["serve", "d", "--token", "mine"]])
def test_a_bad_option_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pupil") and "--help" in err


def test_a_bad_value_caught_after_parsing_is_one_line_and_exit_2(shapes_dir, capsys):
    code, err = run(["train", str(shapes_dir), "--ema", "1.5"], capsys)
    assert code == 2
    one_line_error(err, "--ema")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no-such-run"):
        main(["--debug", "predict", str(tmp_path / "no-such-run"), "x.png"])


def test_every_command_line_here_answers_a_bad_flag_in_one_line():
    """pupil, service.bento, deploy.container and the benchmarks parse with models.runtime.OneLineParser: a bad flag
    is one line on stderr naming the command as it was typed, and exit status 2 (argparse's own parser printed its
    usage first). Read from the code too, so that a new command line that forgets it is caught."""
    root = Path(__file__).resolve().parents[1]
    plain = [str(p.relative_to(root)) for room in ("pupil", "models", "training", "service", "deploy", "bench")
             for p in (root / room).glob("*.py") if "argparse.ArgumentParser(" in p.read_text()]
    assert plain == []
    for module, name in [("pupil", "pupil"), ("service.bento", "python -m service.bento"),
                         ("deploy.container", "python -m deploy.container"), ("bench.recipe", "python -m bench.recipe")]:
        r = subprocess.run([sys.executable, "-m", module, "build", "--no-such-flag"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (module, r.stderr)
        assert r.stderr.startswith(name) and f"(see {name}" in r.stderr, r.stderr
