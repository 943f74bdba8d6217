"""training/data.py and `pupil check`: a messy real-world folder is scanned problem by problem, never crashing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_shapes_folder
from tests.corpus import bad_files, good_files
from training.manifest import scan, split_manifest, trainability


@pytest.fixture
def messy_dir(tmp_path):
    """Good images in two classes (one of them grayscale), next to every kind of problem file."""
    root = make_shapes_folder(tmp_path / "messy", classes=("red", "blue"), n=12)
    for f in (root / "blue").iterdir():  # a grayscale class
        from PIL import Image

        Image.open(f).convert("L").save(f)
    for name, (data, _) in good_files().items():
        (root / "red" / f"good_{name}").write_bytes(data)
    for name, (data, _) in bad_files().items():
        (root / "blue" / f"bad_{name}").write_bytes(data)
    (root / "red" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "red" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / ".hidden_class").mkdir()
    (root / "red" / "copy_in_red.png").write_bytes((root / "red" / "red_000.png").read_bytes())
    (root / "blue" / "red_001_mislabelled.png").write_bytes((root / "red" / "red_001.png").read_bytes())
    os.symlink(root, root / "red" / "loop")  # a symlink loop must not hang the scan
    return root


def test_manifest_reports_each_problem(messy_dir):
    m = scan(messy_dir, verify=True, workers=1)
    problems = {f.path: f.problem for f in m.problems()}
    expected = {f"blue/bad_{n}": p for n, (_, p) in bad_files().items()}
    expected.update({
        "red/red_000.png": "duplicate",  # of red/copy_in_red.png: one copy is kept, the first by path
        "blue/red_001_mislabelled.png": "duplicate_in_other_class",
        "red/red_001.png": "duplicate_in_other_class",
    })
    assert problems == expected
    assert m.classes == ["blue", "red"]
    assert not any(".DS_Store" in f.path or "Thumbs" in f.path for f in m.files)
    good = {f.path for f in m.usable()}
    assert all(f"red/good_{n}" in good for n in good_files())
    assert m.counts() == {"blue": 12, "red": 11 + len(good_files())}


def test_header_scan_alone_leaves_truncation_to_the_decoder(messy_dir):
    m = scan(messy_dir, verify=False)
    half = next(f for f in m.files if f.path == "blue/bad_half.jpg")
    assert half.problem is None  # found later, while the decode cache is built (see test_training)


def test_check_cli_reports_and_exits_right(messy_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(messy_dir), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["trainable"] and report["classes"]["blue"] == 12
    assert {p["problem"] for p in report["problems"]} >= {"truncated", "not_an_image", "empty", "too_many_pixels",
                                                          "unsupported_format", "corrupt", "duplicate_in_other_class"}
    assert any("label noise" in w for w in report["warnings"])
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(messy_dir)], capture_output=True, text=True)
    assert "bad_half.jpg: truncated" in r.stdout and r.stdout.strip().endswith("trainable")

    empty_class = make_shapes_folder(tmp_path / "e", classes=("a", "b"), n=2)
    for f in (empty_class / "b").iterdir():
        f.write_text("not an image")
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(empty_class)], capture_output=True, text=True)
    assert r.returncode == 2 and "class 'b' has no usable image" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_split_is_stratified_seeded_and_duplicate_free(tmp_path):
    root = make_shapes_folder(tmp_path / "d", classes=("a", "b", "c"), n=20)
    m1 = split_manifest(scan(root), 0.25, seed=3)
    m2 = split_manifest(scan(root), 0.25, seed=3)
    assert [(f.path, f.split) for f in m1.files] == [(f.path, f.split) for f in m2.files]
    assert m1.counts("val") == {"a": 5, "b": 5, "c": 5}
    m3 = split_manifest(scan(root), 0.25, seed=4)
    assert [f.split for f in m3.files] != [f.split for f in m1.files]


def test_presplit_layout_is_respected_and_leakage_dropped(tmp_path):
    root = tmp_path / "pre"
    make_shapes_folder(root / "train", n=10, seed=1)
    make_shapes_folder(root / "val", n=4, seed=2)
    leaked = (root / "train" / "red" / "red_000.png").read_bytes()
    (root / "val" / "red" / "leaked.png").write_bytes(leaked)
    m = split_manifest(scan(root), 0.2, 0)
    assert m.presplit and m.classes == ["blue", "red"]
    assert m.counts("train") == {"blue": 10, "red": 10} and m.counts("val") == {"blue": 4, "red": 4}
    leak = next(f for f in m.files if f.path == "val/red/leaked.png")
    assert leak.problem == "duplicate" and "leakage" in leak.detail


def test_trainability_reasons(tmp_path):
    one = make_shapes_folder(tmp_path / "one", classes=("a",), n=2)
    assert "need at least 2" in trainability(scan(one))
    (tmp_path / "none").mkdir()
    assert "no files" in trainability(scan(tmp_path / "none"))


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Validation"])
def test_every_usual_name_of_the_validation_folder_is_a_split(tmp_path, val_name):
    root = tmp_path / "pre"
    make_shapes_folder(root / "train", n=6, seed=1)
    make_shapes_folder(root / val_name, n=3, seed=2)
    m = split_manifest(scan(root), 0.2, 0)
    assert m.presplit and m.classes == ["blue", "red"]
    assert m.counts("train") == {"blue": 6, "red": 6} and m.counts("val") == {"blue": 3, "red": 3}


def test_train_and_test_without_val_splits_validation_off_train_and_keeps_test(tmp_path):
    root = tmp_path / "pre"
    make_shapes_folder(root / "train", n=10, seed=1)
    make_shapes_folder(root / "test", n=4, seed=2)
    m = split_manifest(scan(root), 0.2, 0)
    assert m.presplit
    assert m.counts("test") == {"blue": 4, "red": 4}
    assert m.counts("val") == {"blue": 2, "red": 2} and m.counts("train") == {"blue": 8, "red": 8}
    assert all(f.path.startswith("train/") for f in m.usable("val"))  # validation comes from train, never from test


def test_check_shows_the_counts_of_all_three_splits(tmp_path):
    root = tmp_path / "pre"
    make_shapes_folder(root / "train", n=10, seed=1)
    make_shapes_folder(root / "valid", n=3, seed=2)
    make_shapes_folder(root / "test", n=4, seed=3)
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(root), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["splits"] == {"train": {"blue": 10, "red": 10}, "val": {"blue": 3, "red": 3},
                                              "test": {"blue": 4, "red": 4}}
    r = subprocess.run([sys.executable, "-m", "pupil", "check", str(root)], capture_output=True, text=True, timeout=120)
    header = r.stdout.splitlines()[1].split()
    assert header == ["class", "total", "train", "validation", "test"]
    assert r.stdout.splitlines()[2].split() == ["blue", "17", "10", "3", "4"]


def test_decode_cache_is_reused(shapes_dir, tmp_path):
    from training.cache import DecodeCache

    m = split_manifest(scan(shapes_dir), 0.2, 0)
    first = DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path, workers=1)
    second = DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path, workers=1)
    assert first.decoded == 48 and second.decoded == 0
    assert (second.images[: len(first.index)] == first.images[: len(first.index)]).all()


def test_the_decode_cache_keeps_under_its_limit_and_drops_the_least_recently_used_first(shapes_dir, tmp_path):
    import time

    from training.cache import DecodeCache

    m = split_manifest(scan(shapes_dir), 0.2, 0)
    one = 48 * 36 * 36 * 3 / 2**30  # GB of one data set at 36 px
    a = DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path, workers=1, limit_gb=2 * one)
    time.sleep(0.05)
    b = DecodeCache.build(shapes_dir, m.usable()[:40], 36, cache_dir=tmp_path, workers=1, limit_gb=2 * one)
    time.sleep(0.05)
    assert DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path, workers=1, limit_gb=2 * one).decoded == 0
    time.sleep(0.05)  # `a` was used last: a third data set that needs room takes `b`'s place, not `a`'s
    c = DecodeCache.build(shapes_dir, m.usable()[:30], 36, cache_dir=tmp_path, workers=1, limit_gb=2 * one)
    assert a.path.is_file() and c.path.is_file() and not b.path.exists()
    assert not b.path.with_suffix(".json").exists()
    assert sum(p.stat().st_size for p in (tmp_path / "decoded").glob("*.u8")) <= 2 * one * 2**30


def test_a_full_disk_keeps_the_decoded_images_in_memory_and_leaves_no_file(shapes_dir, tmp_path, monkeypatch):
    import errno

    from training.cache import DecodeCache

    m = split_manifest(scan(shapes_dir), 0.2, 0)
    good = DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path / "ok", workers=1)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    mem = DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path / "full", workers=1)
    assert mem.path is None and "No space left on device" in mem.note and mem.decoded == 48
    assert mem.index == good.index and (mem.images[:48] == good.images[:48]).all()
    assert not list((tmp_path / "full" / "decoded").iterdir())
