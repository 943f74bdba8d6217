"""The demo's and the quality benchmark's ELPV trees: links into the installed package that survive a moved install."""
from __future__ import annotations

import shutil

from PIL import Image

from pupil.demo import elpv_labels, linked_tree, materialise_elpv


def _source(root, names):
    root.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.new("L", (8, 8), i * 40).save(root / name)
    return root


def test_a_tree_linked_into_a_deleted_install_is_relinked_to_the_current_one(tmp_path):
    names = ["a.png", "b.png", "c.png"]
    pairs = [(n, f"cls/{n}") for n in names]
    old = _source(tmp_path / "old-venv" / "data", names)
    dest = linked_tree(tmp_path / "tree", old, pairs, "test data")
    assert all((dest / "cls" / n).resolve().parent == old.resolve() for n in names)

    # the virtual environment it pointed into is gone (CI deletes its clone); a new one installs the same files
    shutil.rmtree(tmp_path / "old-venv")
    assert not (dest / "cls" / "a.png").exists()
    new = _source(tmp_path / "new-venv" / "data", names)
    linked_tree(tmp_path / "tree", new, pairs, "test data")
    for i, n in enumerate(names):
        assert (dest / "cls" / n).resolve().parent == new.resolve()
        assert Image.open(dest / "cls" / n).getpixel((0, 0)) == i * 40
    assert str(new.resolve()) in (dest / ".complete").read_text()


def test_a_copied_file_is_kept_and_an_unchanged_tree_is_not_touched(tmp_path):
    src = _source(tmp_path / "data", ["a.png", "b.png"])
    (tmp_path / "tree" / "cls").mkdir(parents=True)
    shutil.copy(src / "a.png", tmp_path / "tree" / "cls" / "a.png")  # a filesystem without symlinks copied it
    pairs = [("a.png", "cls/a.png"), ("b.png", "cls/b.png")]
    dest = linked_tree(tmp_path / "tree", src, pairs, "test data")
    assert not (dest / "cls" / "a.png").is_symlink() and (dest / "cls" / "b.png").is_symlink()
    (dest / "cls" / "b.png").unlink()
    linked_tree(tmp_path / "tree", src, pairs, "test data")  # same source, marker intact: trusted, not relinked
    assert not (dest / "cls" / "b.png").exists()


def test_the_demo_tree_links_every_elpv_image(tmp_path):
    dest = materialise_elpv(tmp_path / "elpv")
    files = [p for c in ("defective", "functional") for p in (dest / c).iterdir()]
    assert len(files) == len(elpv_labels()) == 2624
    assert all(p.is_file() for p in files)
