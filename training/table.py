"""Labels from a table: a CSV or TSV (sniffed by content) naming each image's path under DATA, its label and,
optionally, its split; or DATA/metadata.csv found by itself, as Hugging Face's `imagefolder` finds it.

    path,label[,split]          columns found by common names (PATH_NAMES, LABEL_NAMES, SPLIT_NAMES), any case,
    cells/0001.png,defective    or named with --path-col / --label-col / --split-col
    cells/0002.png,functional,test

Every row becomes a FileRecord, with every check a folder's files get (header, pixel limit, duplicates, the decode in
`pupil check`), and the table's own problems, each reported and never fatal: a file that is missing, a path that
leaves DATA (`../`, an absolute path elsewhere, a symlink out of it: refused, so a table cannot make pupil read a
file it was not pointed at), an empty label, an unknown split, and one file named twice with two labels (label
noise: every row of it left out). Files under DATA that no row names are counted. A table with no rows is one clear
error. Torch-free; the table is read as a stream (100,000 rows in about a second, memory bounded by the rows).
"""
from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from models.decoder import DEFAULT_DECODE_TIMEOUT
from models.images import DEFAULT_MAX_PIXELS

from .manifest import SPLIT_FOLDERS, FileRecord, Manifest, hidden, mark_duplicates, record, scan, verify_files, walk_files

PATH_NAMES = ("path", "file", "file_name", "filename", "image", "image_path", "filepath")
LABEL_NAMES = ("label", "class", "target", "category")
SPLIT_NAMES = ("split", "subset", "fold_name")
METADATA = "metadata.csv"  # Hugging Face imagefolder's name for the table beside the images


class TableError(ValueError):
    """The table cannot be used at all (no rows, no path or label column): the message says which and how."""


@dataclass
class TableSpec:
    """Where the labels are: a file (or a pandas DataFrame, written to one first) and its column names."""

    labels: str = ""
    path_col: str = ""
    label_col: str = ""
    split_col: str = ""


def find_table(root: Path, spec: TableSpec) -> Path | None:
    """The table to read: the one given, or DATA/metadata.csv when there is one; None for a class-per-folder set."""
    if spec.labels:
        p = Path(spec.labels)
        if not p.is_file():
            raise FileNotFoundError(f"labels table not found: {p} (give a CSV or TSV file with a path and a label "
                                    "column)")
        return p
    meta = root / METADATA
    return meta if meta.is_file() else None


def scan_data(root: str | Path, spec: TableSpec | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
              verify: bool = False, workers: int | None = None,
              decode_timeout: float = DEFAULT_DECODE_TIMEOUT) -> Manifest:
    """The manifest of DATA: from its labels table where it has one (or one is given), else from its folders."""
    root = Path(root)
    if not root.is_dir():
        return scan(root, max_pixels=max_pixels, verify=verify, workers=workers, decode_timeout=decode_timeout)  # the folder's own error
    table = find_table(root, spec or TableSpec())
    if table is None:
        return scan(root, max_pixels=max_pixels, verify=verify, workers=workers, decode_timeout=decode_timeout)
    return scan_table(root, table, spec or TableSpec(), max_pixels=max_pixels, verify=verify, workers=workers,
                      decode_timeout=decode_timeout)


def _dialect(sample: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|")
    except csv.Error:
        return csv.excel_tab if sample.count("\t") > sample.count(",") else csv.excel


def _column(header: list[str], asked: str, names: tuple[str, ...], what: str, flag: str, table: Path) -> int | None:
    lowered = [h.strip().lower() for h in header]
    if asked:
        if asked.strip().lower() not in lowered:
            raise TableError(f"{table}: no column {asked!r} ({flag}); the columns are {header}")
        return lowered.index(asked.strip().lower())
    for n in names:
        if n in lowered:
            return lowered.index(n)
    if what == "split":
        return None
    raise TableError(f"{table}: no {what} column among {header}: name it {' or '.join(names[:4])}, or say which it "
                     f"is with {flag}")


def read_rows(table: Path, spec: TableSpec) -> tuple[list[tuple[str, str, str]], int]:
    """(path, label, split) of every row, and the number of the header's line; streamed, any delimiter."""
    with open(table, newline="", encoding="utf-8-sig", errors="replace") as f:
        sample = f.read(65536)
        f.seek(0)
        reader = csv.reader(f, _dialect(sample))
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise TableError(f"labels table {table} is empty: expected a header line (path,label[,split]) and one "
                             "row per image")
        pi = _column(header, spec.path_col, PATH_NAMES, "path", "--path-col", table)
        li = _column(header, spec.label_col, LABEL_NAMES, "label", "--label-col", table)
        si = _column(header, spec.split_col, SPLIT_NAMES, "split", "--split-col", table)
        rows = []
        for cells in reader:
            if not cells or not any(c.strip() for c in cells):
                continue
            rows.append(tuple(cells[i].strip() if i is not None and i < len(cells) else "" for i in (pi, li, si)))
    if not rows:
        raise TableError(f"labels table {table} has a header and no rows: expected one row per image")
    return rows, 1


def _inside(root_real: Path, root: Path, raw: str) -> tuple[Path | None, str]:
    """(the path under root, "") or (None, why it is refused)."""
    p = Path(raw.replace("\\", "/"))
    full = p if p.is_absolute() else root / p
    try:
        real = full.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        return None, f"cannot resolve the path: {e}"
    if not real.is_relative_to(root_real):
        return None, "the path leads outside the data folder (refused: a table names files inside DATA only)"
    if p.is_absolute():  # an absolute path inside DATA: taken as the path relative to it
        try:
            full = root / p.relative_to(root)
        except ValueError:
            full = root / real.relative_to(root_real)
    return full, ""


def scan_table(root: Path, table: Path, spec: TableSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               verify: bool = False, workers: int | None = None,
               decode_timeout: float = DEFAULT_DECODE_TIMEOUT) -> Manifest:
    rows, _ = read_rows(table, spec)
    root_real = root.resolve()
    files: list[FileRecord] = []
    by_path: dict[str, list[FileRecord]] = defaultdict(list)
    splits_seen = False
    mentioned: set[str] = set()  # every relative path a row names, usable or not (for the unlisted count)
    for raw_path, label, raw_split in rows:
        if raw_path and not Path(raw_path).is_absolute():
            mentioned.add(Path(os.path.normpath(raw_path.replace("\\", "/"))).as_posix())
        split = SPLIT_FOLDERS.get(raw_split.lower(), None) if raw_split else ""
        full, why = _inside(root_real, root, raw_path) if raw_path else (None, "the row has no path")
        if full is None:
            files.append(FileRecord(path=raw_path or "(empty)", label=label, problem="outside_data" if raw_path else
                                    "missing", detail=why))
            continue
        rel = full.relative_to(root).as_posix() if full.is_relative_to(root) else raw_path
        if not label:
            files.append(FileRecord(path=rel, label="", problem="empty_label", detail="the row gives no label"))
            continue
        if split is None:
            files.append(FileRecord(path=rel, label=label, problem="unknown_split",
                                    detail=f"split {raw_split!r} is not train, val/valid/validation or test"))
            continue
        if not os.path.lexists(full) or not full.is_file():
            files.append(FileRecord(path=rel, label=label, problem="missing", detail="no such file under DATA"))
            continue
        rec = record(root, full, label, max_pixels)
        rec.split = split
        splits_seen = splits_seen or bool(split)
        by_path[rec.path].append(rec)
        files.append(rec)
    for path, recs in by_path.items():
        if len(recs) < 2:
            continue
        labels = sorted({r.label for r in recs})
        if len(labels) > 1:
            for r in recs:
                r.problem, r.detail = "conflicting_labels", f"the table gives this file {len(recs)} rows with labels " \
                                                            f"{labels}: label noise, left out"
        else:
            for r in recs[1:]:
                r.problem, r.detail = "duplicate_row", "the same file and label in another row"
    mark_duplicates(files)
    if verify:
        verify_files(root, files, max_pixels, workers, decode_timeout)
    named = set(by_path) | mentioned
    table_real = table.resolve()
    unlisted = 0
    for p in walk_files(root):
        if hidden(p.name) or p.resolve() == table_real or p.suffix.lower() in (".csv", ".tsv"):  # tables, not images
            continue
        if p.relative_to(root).as_posix() not in named:
            unlisted += 1
    if any(f.split == "val" for f in files if f.problem is None):  # the table says which are validation: the rest train
        for f in files:
            if f.problem is None and not f.split:
                f.split = "train"
    classes = sorted({f.label for f in files if f.problem is None})
    return Manifest(root=str(root), classes=classes, files=files, presplit=splits_seen, unlisted=unlisted,
                    table=str(table))


def dataframe_to_csv(frame, dest: Path) -> Path:
    """A pandas DataFrame written as the CSV the rest reads (pupil.train(data, labels=frame))."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    dest.write_text(buf.getvalue())
    return dest
