"""Your own tasks: a folder of images and one CSV table (``data.dataset=folder``).

    DIR/labels.csv     header + one row per image (UTF-8, a byte-order mark ignored; RFC 4180 quoting):
                         image   path of the image file, relative to DIR (any format Pillow reads, any size);
                                 it stays inside DIR as written (no absolute path, no ``..``); symlinks
                                 inside DIR are followed wherever they point
                         split   train | val | test
                         <task>  every other column is a task named by its header; an empty cell = the
                                 label is missing (the sample counts in neither the loss nor the metrics
                                 of that task)
    DIR/tasks.json     optional: {"<task>": {"type": "binary" | "multiclass" | "regression",
                                             "classes": C (multiclass), "labels": [names of the class ids],
                                             "weight": w (loss weight, default 1),
                                             "normalize": "standard" | "none" | {"mean": m, "std": s}}}
                       (regression; "standard" = the training split's mean and std, the default)

Task types not declared are inferred from the non-empty cells of the training split:
    2 distinct values                                           → binary (class ids in sorted order:
                                                                  numeric when both are numbers)
    non-negative integers < 20 (more than 2 distinct)           → multiclass, classes = max + 1
    other numbers                                               → regression (a column of integers
                                                                  made regression by one negative or
                                                                  large value: the printed types name
                                                                  that value and its cell)
    1 distinct value, or > 2 distinct values that are not all numbers → an error naming the column
The resolved declarations (inferred or declared, with the regression mean/std) are printed when some
are inferred, and always stored in the run's config (``data.folder_tasks``): a rerun, ``--resume``,
``eval`` and ``load_grouped`` use exactly them, whatever tasks.json or the data say later.

Each image is in one split: the same file (or the same bytes under another path) in two splits is an
error naming both rows; the same image twice in one split a warning with counts.

Images: decoded by ``images.read_rgb`` (16-bit reduced to the top 8 bits; 32-bit and images above
Pillow's decompression-bomb limit refused), converted to RGB and bilinearly resized (half-pixel
centres, no antialias — the CelebA decoder) to S×S (``data.image_size``, default 64) ignoring the
aspect ratio, stored as uint8; the model sees x / 255. Targets: (N,) float32 per sample — the class id, or the regression value in
the data's units — NaN where the cell is empty (``fastdmtg/tasks/generic.py`` masks them).

Every problem raises ``FolderFormatError`` naming the file, the line and the column: a malformed CSV
(an unterminated quote: where it opened; wrong number of cells, empty or duplicate header names,
no image/split column), an unknown split value, an image path outside DIR, an image in two splits,
a missing, unreadable, 32-bit or too large image, a regression value beyond float32, a task column
with a single value, values that contradict the declared (or inferred) type, a tasks.json that is
not valid JSON or names an unknown column or key, a split without rows, a task without any label in
a split.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..methods.dmtg import DMTGConfig
from ..log import get_logger
from ..tasks.generic import TYPES, GenericTaskSet, TaskDecl
from .base import SPLITS, DataFormatError, Dataset, DatasetFormat, Field, Recipe, flip_rows, recipe_fn
from .celeba import resize_like_reference

if TYPE_CHECKING:
    from ..config import Config

log = get_logger("fastdmtg.data.folder")

LABELS_FILE = "labels.csv"
TASKS_FILE = "tasks.json"
RESERVED = ("image", "split")
#: inference: non-negative integers below this (and more than two distinct) make a multiclass task
MAX_INFERRED_CLASSES = 20
#: the largest float32: a target beyond it would be stored as inf
F32_MAX = float(np.finfo(np.float32).max)
#: tasks.json keys of one task
TASKS_JSON_KEYS = {"type", "classes", "labels", "weight", "normalize"}
#: bump when ``load_image`` changes what it computes: decoded caches made before are then rebuilt
DECODE_VERSION = 2          # 2: 16-bit images reduced to their top 8 bits (were clipped to white)


class FolderFormatError(DataFormatError):
    """labels.csv, tasks.json or an image of a folder dataset is missing or malformed."""


def is_folder_dataset(root: str | Path) -> bool:
    """Whether ``root`` holds a folder dataset (what ``--data-root`` detects)."""
    return bool(root) and (Path(root) / LABELS_FILE).is_file()


# ------------------------------------------------------------------------------------------------
# labels.csv
# ------------------------------------------------------------------------------------------------
class LabelTable:
    """The parsed labels.csv: header, and per row its line number and cells (strings, stripped)."""

    def __init__(self, path: Path):
        self.path = path
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise FolderFormatError(f"{path}:{line}:{col}: byte 0x{data[e.start]:02x} is not UTF-8 text") from None
        lines = text.splitlines(keepends=True)
        reader = csv.reader(lines, strict=True)
        rows: list[tuple[int, list[str]]] = []
        start = 1                                  # the first line of the record being read
        try:
            while True:
                start = reader.line_num + 1
                cells = next(reader, None)
                if cells is None:
                    break
                if cells and any(c.strip() for c in cells):
                    rows.append((reader.line_num, [c.strip() for c in cells]))
        except csv.Error as e:
            # a quote that opens a field and is not closed on its line swallows the lines after it: csv
            # then fails at the end of the file or lines later; name where that field opened
            spans, open_at_end = _open_quote(lines, start, reader.line_num)
            if spans is not None and open_at_end and reader.line_num >= len(lines):
                raise FolderFormatError(f"{path}:{spans[0]}:{spans[1]}: malformed CSV (a quoted field opens here "
                                        "and never closes)") from None
            if spans is not None and reader.line_num > spans[0]:
                raise FolderFormatError(f"{path}:{spans[0]}:{spans[1]}: malformed CSV (a quoted field opens here and "
                                        f"runs on to line {reader.line_num}: {e})") from None
            raise FolderFormatError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        if not rows:
            raise FolderFormatError(f"{path}: empty; expected a header line `image,split,<task>,...` and one row "
                                    "per image")
        hline, header = rows[0]
        for j, h in enumerate(header):
            if not h:
                raise FolderFormatError(f"{path}:{hline}:{j + 1}: empty column name in the header")
            if h in header[:j]:
                raise FolderFormatError(f"{path}:{hline}:{j + 1}: duplicate column name {h!r}")
        for need in RESERVED:
            if need not in header:
                raise FolderFormatError(f"{path}:{hline}: no {need!r} column in the header {header}; expected "
                                        "`image,split,<task>,...`")
        self.header = header
        self.tasks = [h for h in header if h not in RESERVED]
        if not self.tasks:
            raise FolderFormatError(f"{path}:{hline}: no task column (every column other than image and split "
                                    "is a task)")
        self.col = {h: j for j, h in enumerate(header)}
        for line, cells in rows[1:]:
            if len(cells) != len(header):
                raise FolderFormatError(f"{path}:{line}: {len(cells)} cells, the header has {len(header)} columns")
        self.rows = rows[1:]
        if not self.rows:
            raise FolderFormatError(f"{path}: no rows after the header")

    def where(self, line: int, column: str) -> str:
        """``file:line:col (column NAME)`` of a cell."""
        return f"{self.path}:{line}:{self.col[column] + 1} (column {column!r})"


def _open_quote(lines: list[str], first: int, last: int) -> tuple[tuple[int, int] | None, bool]:
    """Scan lines ``first``..``last`` (one record's, 1-based) with the csv module's rules (a quote opens
    a field only at its start; ``""`` inside is a literal quote). Returns ((line, column) of the first
    quoted field still open at the end of its line — where a field that runs on opened — or None,
    whether a quoted field is open at the end of ``last``)."""
    spans, inq, prev, opened = None, False, ",", (0, 0)
    for ln in range(first, min(last, len(lines)) + 1):
        line, c = lines[ln - 1], 0
        while c < len(line):
            ch = line[c]
            if inq:
                if ch == '"':
                    if line[c + 1:c + 2] == '"':
                        c += 1                     # an escaped quote
                    else:
                        inq = False
            elif ch == '"' and prev in ",\r\n":
                inq, opened = True, (ln, c + 1)
            prev = ch
            c += 1
        if inq and spans is None:
            spans = opened
        prev = "\n" if not inq else prev
    return spans, inq


def _number(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _is_class_id(v: float | None) -> bool:
    return v is not None and v >= 0 and float(v).is_integer()


# ------------------------------------------------------------------------------------------------
# task declarations: tasks.json, inference, the stored config
# ------------------------------------------------------------------------------------------------
def read_tasks_json(path: Path, columns: list[str]) -> dict:
    """tasks.json → {task: entry}, checked against the task columns of labels.csv."""
    try:
        d = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise FolderFormatError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise FolderFormatError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise FolderFormatError(f"{path}: expected a JSON object {{\"<task>\": {{\"type\": ...}}}}")
    for name, entry in d.items():
        if name not in columns:
            raise FolderFormatError(f"{path}: task {name!r} is not a column of {LABELS_FILE} "
                                    f"(its task columns: {', '.join(columns)})")
        problem = _entry_problem(entry)
        if problem:
            raise FolderFormatError(f"{path}: task {name!r}: {problem}")
    return d


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _entry_problem(entry) -> str | None:
    """What is wrong with one tasks.json entry (the message after "task NAME: "), or None. The checks
    run in order; the first that fails is reported."""
    if not isinstance(entry, dict):
        return f"expected an object like {{\"type\": \"binary\"}}, got {json.dumps(entry)}"
    for check in _ENTRY_CHECKS:
        problem = check(entry)
        if problem:
            return problem
    return None


def _check_keys(entry: dict) -> str | None:
    unknown = set(entry) - TASKS_JSON_KEYS
    return f"unknown key(s) {sorted(unknown)}; expected {sorted(TASKS_JSON_KEYS)}" if unknown else None


def _check_type(entry: dict) -> str | None:
    if entry.get("type") not in TYPES:
        return f"\"type\" must be one of {'|'.join(TYPES)}, got {json.dumps(entry.get('type'))}"
    return None


def _check_classes(entry: dict) -> str | None:
    c = entry.get("classes", 2)
    if not isinstance(c, int) or isinstance(c, bool) or c < 2:
        return f"\"classes\" must be an integer >= 2, got {json.dumps(c)}"
    return None


def _check_labels(entry: dict) -> str | None:
    labels = entry.get("labels", [])
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        return "\"labels\" must be a list of strings"
    return None


def _check_weight(entry: dict) -> str | None:
    w = entry.get("weight", 1.0)
    return None if _is_number(w) and w >= 0 else f"\"weight\" must be a number >= 0, got {json.dumps(w)}"


def _check_normalize(entry: dict) -> str | None:
    norm = entry.get("normalize", "standard")
    ok = norm in ("standard", "none") or (isinstance(norm, dict) and set(norm) == {"mean", "std"}
                                          and all(_is_number(norm[k]) for k in norm) and norm["std"] > 0)
    if not ok:
        return f"\"normalize\" must be \"standard\", \"none\" or {{\"mean\": m, \"std\": s > 0}}, got {json.dumps(norm)}"
    if "normalize" in entry and entry["type"] != "regression":
        return "\"normalize\" applies to regression tasks only"
    return None


_ENTRY_CHECKS = (_check_keys, _check_type, _check_classes, _check_labels, _check_weight, _check_normalize)


def _train_values(table: LabelTable, task: str) -> list[tuple[int, str]]:
    j, s = table.col[task], table.col["split"]
    return [(line, cells[j]) for line, cells in table.rows if cells[s] == "train" and cells[j] != ""]


class _Column:
    """The training-split values of one task column, as inference reads them: ``vals`` [(line, cell)],
    ``distinct`` cells (sorted), ``nums`` {cell: number | None}, ``numeric``, ``by_value`` {number: its
    first cell} ("1" and "1.0" are one value), ``n`` distinct values."""

    def __init__(self, table: LabelTable, task: str):
        self.table, self.task = table, task
        self.vals = _train_values(table, task)
        self.where = f"{table.path}: column {task!r} (column {table.col[task] + 1})"
        if not self.vals:
            raise FolderFormatError(f"{self.where}: no label in the training split (every cell is empty)")
        self.distinct = sorted({v for _, v in self.vals})
        self.nums = {v: _number(v) for v in self.distinct}
        self.numeric = all(x is not None for x in self.nums.values())
        self.by_value: dict[float, str] = {}
        if self.numeric:
            for v in self.distinct:
                self.by_value.setdefault(self.nums[v], v)
        self.n = len(self.by_value) if self.numeric else len(self.distinct)

    def line_of(self, cell: str) -> int:
        return next(ln for ln, v in self.vals if v == cell)

    def at(self, cell: str) -> str:
        """file:line:column of the first training cell ``cell``."""
        return self.table.where(self.line_of(cell), self.task)

    def first_non_number(self) -> str:
        return next(v for v in self.distinct if self.nums[v] is None)


def _inferred_type(col: _Column, notes: dict[str, str] | None) -> str:
    """binary (2 values), multiclass (class ids 0..C-1 below MAX_INFERRED_CLASSES), regression (other
    numbers; ``notes`` says which value made integers a regression), else a FolderFormatError."""
    if col.n == 2:
        return "binary"
    if col.numeric and all(_is_class_id(x) for x in col.nums.values()) and max(col.nums.values()) < MAX_INFERRED_CLASSES:
        return "multiclass"
    if col.numeric:
        if notes is not None and all(float(x).is_integer() for x in col.nums.values()):
            # integers, yet not class ids: one negative or large value decides; say which, where
            bad = min((v for v in col.distinct if col.nums[v] < 0), key=lambda v: col.nums[v], default=None)
            if bad is None:
                bad = max(col.distinct, key=lambda v: col.nums[v])
            notes[col.task] = (f"{bad!r} at {col.table.path}:{col.line_of(bad)}:{col.table.col[col.task] + 1} is not "
                               f"a class id 0..{MAX_INFERRED_CLASSES - 1}; declare {{\"type\": \"multiclass\"}} in "
                               f"{TASKS_FILE} if it is a class column")
        return "regression"
    bad = col.first_non_number()
    raise FolderFormatError(f"{col.at(bad)}: {bad!r} is not a number and the column has "
                            f"{col.n} distinct values: a task is binary (2 values), multiclass "
                            f"(class ids 0..C-1, or names listed in {TASKS_FILE}) or regression (numbers)")


def _binary_decl(col: _Column, entry: dict, weight: float) -> TaskDecl:
    labels = entry.get("labels")
    if labels is None:
        if col.n != 2:
            raise FolderFormatError(f"{col.where}: declared binary but the training split has {col.n} "
                                    f"distinct values {col.distinct[:6]}")
        labels = [col.by_value[x] for x in sorted(col.by_value)] if col.numeric else col.distinct
    if len(labels) != 2:
        raise FolderFormatError(f"{col.table.path.parent / TASKS_FILE}: task {col.task!r}: a binary task has 2 labels, "
                                f"got {labels}")
    return TaskDecl(col.task, "binary", 2, tuple(labels), weight)


def _multiclass_decl(col: _Column, entry: dict, weight: float) -> TaskDecl:
    labels = tuple(entry.get("labels", ()))
    classes = entry.get("classes")
    if classes is None and labels:
        classes = len(labels)
    elif classes is None:
        bad = next((v for v in col.distinct if not _is_class_id(col.nums[v])), None)
        if bad is not None:
            raise FolderFormatError(f"{col.at(bad)}: multiclass values are class ids 0..C-1, got {bad!r}")
        classes = int(max(col.nums.values())) + 1
    if labels and len(labels) != classes:
        raise FolderFormatError(f"{col.table.path.parent / TASKS_FILE}: task {col.task!r}: {len(labels)} labels for "
                                f"{classes} classes")
    return TaskDecl(col.task, "multiclass", int(classes), labels, weight)


def _regression_decl(col: _Column, entry: dict, weight: float) -> TaskDecl:
    if not col.numeric:
        bad = col.first_non_number()
        raise FolderFormatError(f"{col.at(bad)}: regression values are finite numbers, got {bad!r}")
    norm = entry.get("normalize", "standard")
    if norm == "standard":
        y = np.array([col.nums[v] for _, v in col.vals], dtype=np.float64)
        mean, std = float(y.mean()), float(y.std())
    elif norm == "none":
        mean, std = 0.0, 1.0
    else:
        mean, std = float(norm["mean"]), float(norm["std"])
    return TaskDecl(col.task, "regression", 0, (), weight, mean, std)


_DECLS = {"binary": _binary_decl, "multiclass": _multiclass_decl, "regression": _regression_decl}


def infer_decl(table: LabelTable, task: str, entry: dict | None = None,
               notes: dict[str, str] | None = None) -> tuple[TaskDecl, bool]:
    """The declaration of ``task``: the tasks.json ``entry`` completed from the training split, or
    inferred from it (module doc). Returns (declaration, inferred?). ``notes[task]``: why a column
    of integers was inferred as regression (the value and cell that decided it)."""
    col = _Column(table, task)
    if col.n == 1:
        raise FolderFormatError(f"{col.where}: a single value ({col.distinct[0]!r}) in the training split — a task "
                                "needs at least two (drop the column, or label more samples)")
    typ = entry.get("type") if entry else None
    if typ is None:
        typ = _inferred_type(col, notes)
    weight = float(entry.get("weight", 1.0)) if entry else 1.0
    return _DECLS[typ](col, entry or {}, weight), entry is None


def encode_cell(decl: TaskDecl, cell: str, where: str) -> float:
    """One cell → its stored target (class id, or value); NaN when empty. Raises on a value that
    contradicts the declaration."""
    if cell == "":
        return math.nan
    if decl.type == "regression":
        v = _number(cell)
        if v is None:
            raise FolderFormatError(f"{where}: task {decl.name!r} is regression: expected a finite number, "
                                    f"got {cell!r}")
        if abs(v) > F32_MAX:                # targets are stored as float32: inf, then NaN losses
            raise FolderFormatError(f"{where}: task {decl.name!r} is regression: {cell!r} overflows float32 "
                                    f"(largest magnitude {F32_MAX:.4g}); rescale the column")
        return v
    if decl.type == "binary":
        a, b = decl.labels
        if cell in (a, b):
            return float(decl.labels.index(cell))
        v, na, nb = _number(cell), _number(a), _number(b)
        if v is not None and na is not None and nb is not None and v in (na, nb):
            return 0.0 if v == na else 1.0
        raise FolderFormatError(f"{where}: task {decl.name!r} is binary with values {a!r} and {b!r}, "
                                f"got {cell!r}")
    if decl.labels and cell in decl.labels:
        return float(decl.labels.index(cell))
    v = _number(cell)
    if not (_is_class_id(v) and v < decl.classes):
        named = f" or one of {list(decl.labels)}" if decl.labels else ""
        raise FolderFormatError(f"{where}: task {decl.name!r} is multiclass with {decl.classes} classes: expected "
                                f"a class id 0..{decl.classes - 1}{named}, got {cell!r}")
    return float(v)


def resolve_decls(table: LabelTable, tasks: list[str], stored: dict, tasks_json: Path,
                  notes: dict[str, str] | None = None) -> tuple[list[TaskDecl], list[str]]:
    """The declarations of ``tasks``: from the run's config (``stored``, when it has them), else from
    tasks.json and inference. Returns (declarations, names of the inferred ones); ``notes``: as
    ``infer_decl``'s."""
    if stored:
        from ..tasks.generic import decls_from_config
        try:
            return decls_from_config(stored, tasks), []
        except ValueError as e:
            raise FolderFormatError(str(e)) from None
    declared = read_tasks_json(tasks_json, table.tasks) if tasks_json.exists() else {}
    decls, inferred = [], []
    for t in tasks:
        d, was_inferred = infer_decl(table, t, declared.get(t), notes)
        decls.append(d)
        if was_inferred:
            inferred.append(t)
    return decls, inferred


def describe_decl(d: TaskDecl) -> str:
    if d.type == "binary":
        text = f"binary {list(d.labels)}"
    elif d.type == "multiclass":
        text = f"multiclass, {d.classes} classes"
    else:
        text = f"regression, standardised with mean {d.mean:.6g}, std {d.std:.6g}"
    return text + (f", loss weight {d.weight:g}" if d.weight != 1.0 else "")


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def _line_of(csv_path: str, image: str) -> str:
    """Where labels.csv lists ``image`` (an absolute path): ``labels.csv:LINE:COL: `` — looked up only
    when an error is reported."""
    try:
        table = LabelTable(Path(csv_path))
        root = Path(csv_path).parent.resolve()
        j = table.col["image"]
        for line, cells in table.rows:
            if str(root / cells[j]) == image:
                return f"{csv_path}:{line}:{j + 1}: "
    except (DataFormatError, OSError):
        pass
    return ""


def load_image(path: str, size: int, csv_path: str = "") -> np.ndarray:
    """Decode one image (``images.read_rgb``: 16-bit reduced to 8, 32-bit and bombs refused) →
    (3, size, size) uint8, bilinear (half-pixel, no antialias)."""
    from .images import ImageReadError, read_rgb
    try:
        arr = read_rgb(path)                                                    # (H, W, 3) uint8
    except ImageReadError as e:
        if e.missing:
            raise FolderFormatError(f"{_line_of(csv_path, path)}image {path} is missing") from None
        raise FolderFormatError(f"{_line_of(csv_path, path)}image {e}") from None
    return resize_like_reference(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None], size)[0].numpy()


def decode_item(item: dict, size: int, csv_path: str = "") -> dict[str, np.ndarray]:
    """The reference decoder of one sample: {"image": (3, size, size) uint8}."""
    return {"image": load_image(item["image"], size, csv_path)}


# ------------------------------------------------------------------------------------------------
# image paths: confined to the folder; no image in two splits
# ------------------------------------------------------------------------------------------------
def _outside(rel: str) -> str:
    """Why the image path ``rel`` (a labels.csv cell) may not be read, or "": paths are relative to
    the dataset folder and stay inside it as written (no absolute path, no ``..``). Symlinks inside
    the folder are followed wherever they point: whoever made the folder made them."""
    import ntpath
    import posixpath
    if posixpath.isabs(rel) or ntpath.isabs(rel) or ntpath.splitdrive(rel)[0]:
        return "is outside the dataset folder: an absolute path (image paths are relative to the folder)"
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        if posixpath.normpath(rel.replace("\\", "/")).startswith(".."):
            return "is outside the dataset folder: it climbs out with `..` (image paths stay inside the folder)"
        return "has a `..` component: write the path without it (image paths stay inside the folder)"
    return ""


#: read this many bytes at a time when hashing images
_HASH_CHUNK = 1 << 20


def _digest(path: str) -> bytes:
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.digest()


def check_overlap(table: LabelTable, root: Path, rows: dict[str, list]) -> None:
    """An image in two splits is an error naming both rows: the same file (the same path, or another
    path, link or hard link to it: the same device and inode) or the same bytes under another path.
    Only files whose size occurs in two splits are hashed (blake2b): one stat per row, plus one read
    of each such file (most files of a large JPEG folder, whose sizes collide: ~0.1 ms each). The same
    image twice in one split is a warning with counts (each row stays a sample)."""
    import os
    ii = table.col["image"]
    first: dict[tuple, tuple[str, int, str]] = {}               # (device, inode) → (split, line, cell)
    repeats: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS}
    by_size: dict[int, list[tuple[str, int, str, str]]] = {}    # size → [(split, line, cell, path)]
    for s in SPLITS:
        for line, cells in rows[s]:
            rel = cells[ii]
            path = os.path.join(root, rel)
            st = os.stat(path)                     # follows links: (device, inode) names the file itself
            real = (st.st_dev, st.st_ino)
            if real in first:
                s0, line0, rel0 = first[real]
                if s0 != s:
                    same = "is also listed" if rel == rel0 else f"is the same file as {rel0!r}"
                    raise FolderFormatError(f"{table.where(line, 'image')}: {rel!r} ({s}) {same} at line {line0} "
                                            f"({s0}): an image in two splits is measured on what it trained on; "
                                            "keep it in one split")
                repeats[s].setdefault(rel0, [line0]).append(line)
                continue
            first[real] = (s, line, rel)
            by_size.setdefault(st.st_size, []).append((s, line, rel, path))
    for group in by_size.values():
        if len({g[0] for g in group}) < 2:
            continue
        seen: dict[bytes, tuple[str, int, str]] = {}
        for s, line, rel, path in sorted(group, key=lambda g: g[1]):
            d = _digest(path)
            if d in seen and seen[d][0] != s:
                s0, line0, rel0 = seen[d]
                raise FolderFormatError(f"{table.where(line, 'image')}: {rel!r} ({s}) has the same bytes as {rel0!r} "
                                        f"at line {line0} ({s0}): an image in two splits is measured on what it "
                                        "trained on; keep it in one split")
            seen.setdefault(d, (s, line, rel))
    for s in SPLITS:
        if repeats[s]:
            extra = sum(len(v) - 1 for v in repeats[s].values())
            rel0, lines = next(iter(repeats[s].items()))
            n = len(repeats[s])
            log.warning(f"{table.path}: {extra} duplicate row{'s' if extra > 1 else ''} in the {s} split ({n} image"
                        f"{'s' if n > 1 else ''} listed more than once, e.g. {rel0!r} at lines "
                        f"{', '.join(map(str, lines))}); each row counts as a sample")


# ------------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------------
class FolderDataset(Dataset):
    """A parsed folder: targets in memory, images decoded on demand (or from a decode cache)."""

    name = "folder"
    decode_version = DECODE_VERSION
    table_fields = ("targets",)
    default_flip = False

    def __init__(self, root: str | Path, tasks: list[str] | None, image_size: int, stored: dict | None = None,
                 limits: dict[str, int] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FolderFormatError(f"{root}: dataset folder not found (data.root / --data-root)")
        csv_path = root / LABELS_FILE
        if not csv_path.is_file():
            raise FolderFormatError(f"{csv_path}: missing; a folder dataset has {LABELS_FILE} with columns "
                                    "image, split and one per task")
        self.root = root.resolve()
        self.csv_path = self.root / LABELS_FILE
        table = LabelTable(self.csv_path)
        if tasks is None:
            tasks = table.tasks
        for t in tasks:
            if t not in table.tasks:
                raise FolderFormatError(f"data.tasks: {t!r} is not a task column of {self.csv_path} (its tasks: "
                                        f"{', '.join(table.tasks)})")
        if len(set(tasks)) != len(tasks):
            raise FolderFormatError(f"data.tasks: duplicate task names in {tasks}")
        # splits and image files
        si, ii = table.col["split"], table.col["image"]
        rows: dict[str, list] = {s: [] for s in SPLITS}
        for line, cells in table.rows:
            s = cells[si]
            if s not in rows:
                raise FolderFormatError(f"{table.where(line, 'split')}: unknown split {s!r}; expected train, val "
                                        "or test")
            if not cells[ii]:
                raise FolderFormatError(f"{table.where(line, 'image')}: empty image path")
            outside = _outside(cells[ii])
            if outside:                            # refused before anything opens or stats it
                raise FolderFormatError(f"{table.where(line, 'image')}: image {cells[ii]!r} {outside}")
            p = self.root / cells[ii]
            if not p.is_file():
                raise FolderFormatError(f"{table.where(line, 'image')}: image {cells[ii]!r} not found ({p})")
            rows[s].append((line, cells))
        check_overlap(table, self.root, rows)
        self.limits = {s: int((limits or {}).get(s, 0)) for s in SPLITS}
        for s in SPLITS:
            if not rows[s]:
                raise FolderFormatError(f"{self.csv_path}: no row of split {s!r} (every split needs at least one "
                                        "image)")
            if self.limits[s]:
                rows[s] = rows[s][:self.limits[s]]
        self.notes: dict[str, str] = {}
        self.decls, inferred = resolve_decls(table, tasks, stored or {}, self.root / TASKS_FILE, self.notes)
        self.inferred = inferred
        self.taskset = GenericTaskSet(self.decls)
        self.task_names = list(tasks)
        # targets, every cell checked against its declaration
        self._files: dict[str, list[str]] = {}
        self._targets: dict[str, np.ndarray] = {}
        cols = [table.col[t] for t in tasks]
        for s in SPLITS:
            y = np.empty((len(rows[s]), len(tasks)), dtype=np.float32)
            for r, (line, cells) in enumerate(rows[s]):
                for c, (d, j) in enumerate(zip(self.decls, cols)):
                    y[r, c] = encode_cell(d, cells[j], f"{self.csv_path}:{line}:{j + 1}")
            for c, t in enumerate(tasks):
                if s != "train" and np.isnan(y[:, c]).all():
                    raise FolderFormatError(f"{self.csv_path}: column {t!r} (column {cols[c] + 1}) has no label in "
                                            f"the {s} split: its metrics would be undefined")
            self._targets[s] = y
            self._files[s] = [str(self.root / cells[ii]) for _, cells in rows[s]]
        self.image_size = image_size
        self.fields = {"image": Field(np.uint8, (3, image_size, image_size), "image", None),
                       "targets": Field(np.float32, (len(tasks),), "value")}
        self.decode_one = functools.partial(decode_item, size=image_size, csv_path=str(self.csv_path))

    def resolved(self) -> dict:
        """The declarations as stored in the run's config (``data.folder_tasks``)."""
        return {d.name: d.to_dict() for d in self.decls}

    def num_samples(self, split):
        return len(self._files[split])

    def items(self, split):
        return [{"image": p} for p in self._files[split]]

    def table(self, split):
        return {"targets": self._targets[split]}

    def missing_error(self, path: str) -> FolderFormatError:
        return FolderFormatError(f"{_line_of(str(self.csv_path), path)}image {path} is missing")

    def check_encoded(self, field, buf, path):
        from .images import high_bit_depth
        why = high_bit_depth(buf)
        if why:             # DALI would reduce it to 8 bits otherwise than load_image: other pixels
            raise FolderFormatError(f"{_line_of(str(self.csv_path), path)}image {path}: a {why}; data.backend=dali "
                                    "decodes it otherwise than the reference decoder: use another data.backend "
                                    "(gpu-cache, memory, torch) or save the image with 8 bits")

    def fingerprint(self) -> dict[str, str]:
        """labels.csv and tasks.json by content, the image list by names and sizes (fastdmtg.fingerprint)."""
        from .base import file_digest
        return {LABELS_FILE: file_digest(self.csv_path), TASKS_FILE: file_digest(self.root / TASKS_FILE),
                **super().fingerprint()}

    def resize(self, field, x):
            return resize_like_reference(x, self.image_size)

    def to_batch(self, raw, flags):
        return targets_batch(raw, flags)


def targets_batch(raw, flags) -> dict:
    """Stored {"image": (B, 3, S, S) uint8, "targets": (B, N) float32} on the device → {"image":
    (B, 3, S, S) float32 in [0, 1], "targets": (B, N) float32 (NaN = missing)}; new tensors."""
    image = raw["image"].contiguous().to(torch.float32).div_(255.0)
    if flags is not None:
        image = flip_rows(image, flags)
    return {"image": image, "targets": raw["targets"].to(torch.float32, copy=True)}


def open_folder(cfg, progress: bool = True) -> FolderDataset:
    """Open ``data.root`` as a folder dataset; store the resolved task declarations in ``cfg``
    (``data.folder_tasks``) so the run's config.json makes a rerun exact."""
    if not cfg.root:
        raise FolderFormatError("data.root: the folder dataset needs its folder (--data-root DIR)")
    ds = FolderDataset(cfg.root, cfg.task_names(), cfg.image_size, cfg.folder_tasks,
                       {"train": cfg.limit_train, "val": cfg.limit_eval, "test": cfg.limit_eval})
    if ds.inferred:         # always said (also with --quiet): it decides the heads and the losses
        print(f"{ds.csv_path}: task types inferred from the training split (declare them in {TASKS_FILE} to "
              "change them; the run's config.json records them as data.folder_tasks):", file=sys.stderr)
        for d in ds.decls:
            mark = "inferred" if d.name in ds.inferred else "declared"
            note = f": {ds.notes[d.name]}" if d.name in ds.notes else ""
            print(f"  {d.name}: {describe_decl(d)} ({mark}{note})", file=sys.stderr)
    if not cfg.folder_tasks:
        cfg.folder_tasks = ds.resolved()
    return ds


def folder_taskset(cfg, names: list[str]) -> GenericTaskSet:
    """The task set of a saved run, from its config's ``data.folder_tasks`` (no data needed)."""
    if not cfg.data.folder_tasks:
        raise ValueError("data.folder_tasks is empty: the run's config does not record its task declarations")
    return GenericTaskSet.from_config(cfg.data.folder_tasks, names)


def header_tasks(root: str | Path) -> list[str] | None:
    """The task columns of DIR/labels.csv, before the data is opened (K = min(3, N)); None when DIR
    is not a folder dataset or its header does not parse (opening it reports that, naming the line)."""
    if not is_folder_dataset(root):
        return None
    try:
        return list(LabelTable(Path(root) / LABELS_FILE).tasks)
    except (OSError, ValueError):
        return None


def folder_known_tasks(cfg) -> list[str] | None:
    """data.tasks, else the labels.csv header (None when the folder is not there or its header does not
    parse: opening it reports that, naming the line)."""
    names = cfg.task_names()
    if names is not None:
        return names
    return header_tasks(cfg.root) if cfg.root else None


def folder_k3(c) -> Config:
    """Ours — your own tasks (DIR/labels.csv, fastdmtg/data/folder.py): DMTG with the CelebA ResNet variant
    (width 64) at data.image_size 64, per-task heads of each task's size, K = min(3, N) (model.branches=0,
    auto), from scratch. Optimiser as the CelebA paper recipe (Adam 8e-4,
    plateau ×0.5 on the validation loss); 30 epochs."""
    return c.Config(
        name="folder_k3",
        data=c.DataConfig(dataset="folder", tasks="all", image_size=64),
        model=c.ModelConfig(arch="resnet_celeba", branches=0, width=64),
        dmtg=DMTGConfig(tau=2.5),
        optim=c.OptimConfig(name="adam", lr=8e-4, schedule="plateau", gamma=0.5, plateau_patience=3,
                            plateau_threshold=0.1, min_lr=3e-5, plateau_on="val"),
        train=c.TrainConfig(epochs=30, batch_size=256, init="scratch"),
    )


def folder_naive(c) -> Config:
    """Ours — naive MTL (K = 1) on your own tasks: the NormGain reference of folder_k3."""
    return c.naive_twin(folder_k3(c), "folder_naive")


def folder_recipes(c) -> list[Recipe]:
    return [Recipe("folder_k3", recipe_fn(folder_k3, c), "ours", naive="folder_naive"),
            Recipe("folder_naive", recipe_fn(folder_naive, c), "ours")]


FORMAT = DatasetFormat("folder", open_folder, folder_taskset,
                       "your own tasks: DIR/labels.csv (image, split, one column per task) + optional tasks.json",
                       detect=is_folder_dataset, looks_for=f"{LABELS_FILE} (your own tasks)", recipe="folder_k3",
                       known_tasks=folder_known_tasks, resize=resize_like_reference, recipes=folder_recipes, order=3)


#: the planted groups of ``write_demo``'s tasks
DEMO_GROUPS = [{"g0_bin", "g0_cls"}, {"g1_bin", "g1_reg"}, {"g2_reg", "g2_bin"}]


def write_demo(root: str | Path, n_train: int = 1200, n_eval: int = 150, size: int = 16, seed: int = 1) -> Path:
    """Write a demo folder (README "Your own tasks"): PNG images and labels.csv with 6 tasks of mixed
    types in 3 planted groups, 5 % of the cells empty. As the embedded synthetic set
    (``fastdmtg/data/synthetic.py``), latent a_g ~ N(0, 1) shifts colour channel g; group 0 = binary
    g0_bin (a_0 > 0) + multiclass g0_cls (a_0 cut at ±0.5 into 3 classes), group 1 = binary g1_bin
    (a_1 > 0.2) + regression g1_reg (2·a_1 + 5), group 2 = regression g2_reg (a_2) + binary g2_bin
    (low/high at a_2 = −0.2). Splits: n_train / n_eval / n_eval images."""
    import csv as _csv

    from PIL import Image

    from .synthetic import ALPHA, SIGMA, envelope
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    n = n_train + 2 * n_eval
    a = torch.randn(n, 3, generator=gen)                                              # (n, 3) latents
    x = 0.5 + ALPHA * a[:, :, None, None] * envelope(size) + SIGMA * torch.randn(n, 3, size, size, generator=gen)
    imgs = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()   # (n, S, S, 3)
    a = a.numpy()
    miss = np.random.default_rng(seed).random((n, 6)) < 0.05
    (root / "im").mkdir(parents=True, exist_ok=True)
    with open(root / LABELS_FILE, "w", newline="") as f:
        w = _csv.writer(f)
        w.writerow(["image", "split", "g0_bin", "g1_bin", "g2_reg", "g0_cls", "g1_reg", "g2_bin"])
        for i in range(n):
            split = "train" if i < n_train else ("val" if i < n_train + n_eval else "test")
            cells = [int(a[i, 0] > 0), int(a[i, 1] > 0.2), f"{a[i, 2]:.4f}", int(np.digitize(a[i, 0], [-0.5, 0.5])),
                     f"{2 * a[i, 1] + 5:.4f}", ["low", "high"][int(a[i, 2] > -0.2)]]
            name = f"im/{i:05d}.png"
            Image.fromarray(imgs[i]).save(root / name)
            w.writerow([name, split] + ["" if miss[i, j] else c for j, c in enumerate(cells)])
    return root
