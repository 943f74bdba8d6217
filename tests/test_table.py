"""training/table.py: labels from a CSV/TSV (or DATA/metadata.csv, or a DataFrame), every row checked, and problems
reported rather than fatal; training from a table of the ELPV package's own labels."""
from __future__ import annotations

import json
import os

import pytest

from pupil.cli import main
from tests.conftest import TINY_FLAGS, make_shapes_folder
from training.table import TableError, TableSpec, scan_data


def _flat(tmp_path, n=12):
    """Images in one flat folder (no class folders), as a spreadsheet user keeps them, and their labels."""
    src = make_shapes_folder(tmp_path / "src", n=n)
    data = tmp_path / "flat"
    data.mkdir()
    rows = []
    for label in ("red", "blue"):
        for p in sorted((src / label).iterdir()):
            os.replace(p, data / p.name)
            rows.append((p.name, label))
    return data, rows


def _write(path, rows, header=("path", "label"), sep=","):
    path.write_text(sep.join(header) + "\n" + "".join(sep.join(r) + "\n" for r in rows))
    return path


def test_a_table_gives_the_labels_and_every_row_problem_is_reported_not_fatal(tmp_path):
    data, rows = _flat(tmp_path)
    (tmp_path / "secret.png").write_bytes((data / rows[0][0]).read_bytes())
    os.symlink(tmp_path / "secret.png", data / "link-out.png")
    (data / "stray.png").write_bytes((data / rows[1][0]).read_bytes() + b"x")
    table = _write(tmp_path / "labels.csv", rows + [
        ("gone.png", "red"),  # missing
        (rows[2][0], "blue"),  # the same file with a second label: label noise
        (rows[3][0], ""),  # an empty label
        ("../secret.png", "red"),  # outside DATA
        (str(tmp_path / "secret.png"), "red"),  # absolute, outside DATA
        ("link-out.png", "red"),  # a symlink out of DATA
    ])
    m = scan_data(data, TableSpec(str(table)))
    problems = {(f.path, f.problem) for f in m.problems()}
    assert ("gone.png", "missing") in problems
    assert sum(f.path == rows[2][0] and f.problem == "conflicting_labels" for f in m.problems()) == 2
    assert (rows[3][0], "empty_label") in problems
    assert ("../secret.png", "outside_data") in problems and ("link-out.png", "outside_data") in problems
    assert (str(tmp_path / "secret.png"), "outside_data") in problems
    assert m.classes == ["blue", "red"] and len(m.usable()) == len(rows) - 1  # the conflicting file left out
    assert m.unlisted == 1  # stray.png (link-out.png is named by a row, and refused)


def test_header_only_and_empty_tables_are_one_clear_error(tmp_path):
    data, _ = _flat(tmp_path, n=2)
    for text in ("", "path,label\n", "\n\n"):
        (tmp_path / "t.csv").write_text(text)
        with pytest.raises(TableError, match="t.csv"):
            scan_data(data, TableSpec(str(tmp_path / "t.csv")))
    (tmp_path / "t.csv").write_text("name,kind\na.png,red\n")
    with pytest.raises(TableError, match="--path-col"):
        scan_data(data, TableSpec(str(tmp_path / "t.csv")))


def test_tsv_named_columns_split_column_and_metadata_csv_found_by_itself(tmp_path):
    data, rows = _flat(tmp_path)
    splits = [("test" if i % 4 == 0 else "validation" if i % 4 == 1 else "train") for i in range(len(rows))]
    _write(tmp_path / "t.tsv", [(p, lab, s) for (p, lab), s in zip(rows, splits)], header=("img", "kind", "part"),
           sep="\t")
    m = scan_data(data, TableSpec(str(tmp_path / "t.tsv"), path_col="img", label_col="KIND", split_col="part"))
    assert m.presplit and {f.split for f in m.usable()} == {"train", "val", "test"}
    assert len(m.usable("test")) == splits.count("test")
    _write(data / "metadata.csv", rows, header=("file_name", "label"))  # Hugging Face imagefolder's layout
    m = scan_data(data)
    assert m.table.endswith("metadata.csv") and len(m.usable()) == len(rows) and m.unlisted == 0


def test_check_and_train_from_a_table_of_the_elpv_packages_own_labels(tmp_path, capsys):
    """ELPV's labels.csv holds path, defect probability and module type: a derived table thresholds the probability
    into two classes, and pupil trains from it (small), writing split.json, the class names and a model that
    predicts."""
    from pupil.demo import elpv_root

    root = elpv_root()
    lines = (root / "labels.csv").read_text().split("\n")
    rows = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            rows.append((parts[0], "defective" if float(parts[1]) >= 0.5 else "functional"))
    picked = [r for r in rows if r[1] == "defective"][:16] + [r for r in rows if r[1] == "functional"][:16]
    table = _write(tmp_path / "binary.csv", picked)
    assert main(["check", str(root), "--labels", str(table), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == {"defective": 16, "functional": 16} and report["unlisted"] == len(rows) - 32
    run = tmp_path / "run"
    assert main(["train", str(root), "--labels", str(table), *TINY_FLAGS, "--epochs", "2", "--device", "cpu",
                 "--out", str(run)]) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["classes"] == ["defective", "functional"] and len(split["train"]) + len(split["val"]) == 32
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg.get("label_names") == ["defective", "functional"]
    capsys.readouterr()
    assert main(["predict", str(run), str(root / picked[0][0])]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["predictions"][0]["label"] in ("defective",
                                                                                              "functional")


def test_the_python_api_takes_a_dataframe(tmp_path):
    pd = pytest.importorskip("pandas")
    import pupil

    data, rows = _flat(tmp_path)
    frame = pd.DataFrame(rows, columns=["filename", "class"])
    run = pupil.train(data, labels=frame, out=str(tmp_path / "df-run"), epochs=1, model="small_cnn", width=8,
                      img_size=32, batch_size=8, progress=False, workers=1, device="cpu")
    assert (tmp_path / "df-run" / "labels.csv").is_file() and run.metrics["classes"] == ["blue", "red"]
