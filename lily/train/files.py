"""Reading examples from local files: .csv/.tsv/.jsonl/.json records, folders of split files, image folders,
and VTAB-1k list folders. Each reader names the file, row and column at fault."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lily.errors import DataError

SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
"""Other names of the validation split, in file names and in `datasets` splits."""


def read_records(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a .csv, .tsv, .jsonl or .json (a list of objects) file. A .csv/.tsv file has a header row unless
    `columns` names its columns. A .tsv is read without quote handling, as GLUE's files need."""
    try:
        if path.suffix in (".csv", ".tsv"):
            return _delimited(path, columns)
        if path.suffix == ".jsonl":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [json.loads(line) for line in lines]
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, list):
                return data
            raise DataError(f"{path} must hold a JSON list of objects.")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} cannot be parsed: {exc}") from exc
    raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .csv, .tsv, .jsonl, .json or .txt.")


def _delimited(path: Path, columns: list[str] | None) -> list[dict[str, Any]]:
    """Rows of a .csv/.tsv file as dicts; a row whose field count differs from the header's (or from `columns`)
    is an error, since its values would land in the wrong columns."""
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: GLUE's MRPC files start with a BOM
        rows = [r for r in csv.reader(f, **dialect) if r]
    if columns is None:
        names, rows, source = (rows[0] if rows else []), rows[1:], "the header"
    elif rows and set(rows[0]) & set(columns):
        raise DataError(f"{path} has a header row ({rows[0]}) but --columns {columns} was given for a header-less "
                        "file; drop --columns.")  # fmt: skip
    else:
        names, source = columns, "--columns"
    for number, row in enumerate(rows, 1):
        if len(row) != len(names):
            raise DataError(f"{path}, row {number}: {len(row)} fields where {source} names {len(names)} ({names}).")
    return [dict(zip(names, r, strict=True)) for r in rows]


def require_columns(rows: list[dict[str, Any]], columns: list[str], where: str) -> list[str]:
    """The columns of `rows` that `columns` name; an entry 'a|b' names the first of its alternatives present."""
    if not rows:
        raise DataError(f"{where} has no rows.")
    available = list(rows[0].keys())
    found = []
    for column in columns:
        present = [c for c in column.split("|") if c in available]
        if not present:
            raise DataError(
                f"{where} has no column '{column}' (columns: {available}); name the right one with --text-column, "
                "--text-pair-column, --label-column, --prompt-column, --response-column or --image-column."
            )
        found.append(present[0])
    return found


def split_files(path: Path) -> dict[str, Path]:
    """For a directory: its train/validation(val, dev)/test files of one supported type."""
    found = {}
    for file in sorted(path.iterdir()):
        stem = SPLIT_ALIASES.get(file.stem, file.stem)
        if stem in SPLITS and file.suffix in (".csv", ".tsv", ".jsonl", ".json", ".txt"):
            found[stem] = file
    return found


def image_folder(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """(image path, class) per split of `root/<class>/<image>` or `root/<split>/<class>/<image>` ("all" when
    the folder has no split sub-folders)."""

    def scan(folder: Path) -> list[tuple[Path, str]]:
        return [
            (f, cls.name)
            for cls in sorted(p for p in folder.iterdir() if p.is_dir())
            for f in sorted(cls.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]

    subdirs = {p.name: p for p in root.iterdir() if p.is_dir()}
    named = {"val": "validation", "valid": "validation"}
    if "train" in subdirs:
        out = {named.get(n, n): scan(p) for n, p in subdirs.items() if named.get(n, n) in SPLITS}
    else:
        out = {"all": scan(root)}
    if not any(out.values()):
        raise DataError(f"image folder {root} holds no images in class sub-folders (root/<class>/<image>).")
    return out


VTAB_LISTS = ("train800val200.txt", "train800.txt", "val200.txt", "test.txt")


def vtab_lists(root: Path, select_on_test: bool) -> dict[str, list[tuple[Path, str]]]:
    """A VTAB-1k task folder: `<image path relative to root> <label>` lines in train800val200.txt / train800.txt /
    val200.txt / test.txt. Train on all 1,000 images when selecting on test (the FacT/NOAH protocol), else
    on train800 with val200 for validation."""

    def read(name: str) -> list[tuple[Path, str]]:
        file = root / name
        if not file.is_file():
            raise DataError(f"VTAB-1k folder {root} lacks {name} (expected {', '.join(VTAB_LISTS)}).")
        rows = []
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not (root / parts[0]).is_file():
                raise DataError(f"{file}, line {number}: expected '<image path> <label>' of an existing image, "
                                f"got {line!r}.")  # fmt: skip
            rows.append((root / parts[0], parts[1]))
        return rows

    if select_on_test:
        return {"train": read("train800val200.txt"), "test": read("test.txt")}
    return {"train": read("train800.txt"), "validation": read("val200.txt"), "test": read("test.txt")}
