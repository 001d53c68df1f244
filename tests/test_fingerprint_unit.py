"""fastdmtg.fingerprint by hand: the digests (hashlib on the same bytes), the comparison of two
fingerprints and the stop it makes (fast; the resume/eval paths that use them: tests/test_resume_data.py).
Written for the mutation target ``fingerprint`` (benchmarks/mutation.py)."""
from __future__ import annotations

import hashlib
import os
import typing
from pathlib import Path

import pytest

from fastdmtg import fingerprint as F
from fastdmtg.config import ConfigError


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ----------------------------------------------------------------------------- file_digest

def test_file_digest_is_the_sha1_of_the_bytes_over_several_chunks(tmp_path):
    """Every byte counts, also past the first 1 MiB read; an empty file is the sha1 of nothing."""
    data = bytes(range(256)) * 8192 + b"tail"                       # 2 MiB + 4 bytes: three reads
    f = tmp_path / "a.bin"
    f.write_bytes(data)
    assert F.file_digest(f) == f"sha1 {_sha1(data)}"
    assert F.file_digest(str(f)) == f"sha1 {_sha1(data)}"           # a str path too
    (tmp_path / "empty").write_bytes(b"")
    assert F.file_digest(tmp_path / "empty") == f"sha1 {_sha1(b'')}"
    small = tmp_path / "labels.csv"
    small.write_text("image,a\nx.png,1\n")
    assert F.file_digest(small) == f"sha1 {_sha1(b'image,a' + bytes([10]) + b'x.png,1' + bytes([10]))}"


def test_file_digest_of_a_missing_file_is_absent(tmp_path):
    assert F.file_digest(tmp_path / "nope.json") == "absent"
    with pytest.raises(IsADirectoryError):                           # only "not found" means absent
        F.file_digest(tmp_path)


# ----------------------------------------------------------------------------- listing_digest

def _files(root: Path, sizes: dict[str, int]) -> list[str]:
    out = []
    for name, n in sizes.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * n)
        out.append(str(p))
    return out


def _expect(entries: list[tuple[str, int]]) -> str:
    h = hashlib.sha1()
    for name, size in entries:
        h.update(f"{name}\0{size}\n".encode())
    return f"{len(entries)} files, sha1 {h.hexdigest()}"


def _no_missing(p):                                  # a listing of existing files never calls it
    raise AssertionError(f"missing_error called for {p}")


def test_listing_digest_names_relative_to_the_root_and_sizes_in_order(tmp_path):
    root = tmp_path / "data"
    paths = _files(root, {"img/a.png": 5, "img/b.png": 0, "c.jpg": 12})
    d = F.listing_digest(paths, root, _no_missing)
    assert d == _expect([("img/a.png", 5), ("img/b.png", 0), ("c.jpg", 12)])
    assert F.listing_digest(paths, str(root), _no_missing) == d     # a str root too
    # the order is part of the listing; a moved folder (same names and sizes) is the same data
    assert F.listing_digest(paths[::-1], root, _no_missing) == _expect([("c.jpg", 12), ("img/b.png", 0),
                                                                        ("img/a.png", 5)])
    moved = tmp_path / "elsewhere"
    assert F.listing_digest(_files(moved, {"img/a.png": 5, "img/b.png": 0, "c.jpg": 12}), moved, _no_missing) == d
    # one size changed: another digest
    Path(paths[2]).write_bytes(b"y" * 13)
    assert F.listing_digest(paths, root, _no_missing) == _expect([("img/a.png", 5), ("img/b.png", 0), ("c.jpg", 13)])
    assert F.listing_digest([], root, _no_missing) == f"0 files, sha1 {_sha1(b'')}"


def test_listing_digest_without_a_root_or_outside_it_keeps_the_whole_path(tmp_path):
    root = tmp_path / "data"
    inside = _files(root, {"a.png": 3})
    outside = _files(tmp_path / "other", {"b.png": 4})
    # a path outside the root, and a sibling folder whose name starts like the root's ("data2")
    sibling = _files(tmp_path / "data2", {"c.png": 1})
    assert F.listing_digest(inside + outside + sibling, root, _no_missing) == _expect(
        [("a.png", 3), (outside[0], 4), (sibling[0], 1)])
    assert F.listing_digest(inside + outside, None, _no_missing) == _expect([(inside[0], 3), (outside[0], 4)])
    # relative paths without a root: as given (a folder literally called "None" included)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        _files(Path("None"), {"d.png": 2})
        assert F.listing_digest([os.path.join("None", "d.png")], None, _no_missing) == _expect(
            [(os.path.join("None", "d.png"), 2)])
    finally:
        os.chdir(cwd)


def test_listing_digest_of_a_missing_file_raises_the_datasets_error(tmp_path):
    class Missing(ValueError):
        pass

    paths = _files(tmp_path, {"a.png": 1}) + [str(tmp_path / "gone.png")]
    with pytest.raises(Missing) as e:
        F.listing_digest(paths, tmp_path, Missing)
    assert e.value.args == (str(tmp_path / "gone.png"),)
    assert e.value.__cause__ is None and e.value.__suppress_context__         # `from None`: one line


# ----------------------------------------------------------------------------- data_fingerprint

class _Dataset:
    def __init__(self, parts):
        self.parts = parts

    def fingerprint(self):
        return self.parts


class _Cache:
    def content_digests(self):
        return {"train": "crc32 1 2", "val": "crc32 3"}


class _Source:
    def __init__(self, parts, cache=None):
        self.dataset = _Dataset(parts)
        if cache is not None:
            self.cache = cache


def test_data_fingerprint_adds_the_checked_caches_content_digests():
    parts = {"labels.csv": "sha1 aa", "train images": "2 files, sha1 bb"}
    assert F.data_fingerprint(_Source(parts)) == parts                       # no cache attribute
    src = _Source(parts, cache=None)
    src.cache = None
    assert F.data_fingerprint(src) == parts                                   # a source without a cache
    fp = F.data_fingerprint(_Source(parts, cache=_Cache()))
    assert fp == {**parts, "train images (content)": "crc32 1 2", "val images (content)": "crc32 3"}
    assert parts == {"labels.csv": "sha1 aa", "train images": "2 files, sha1 bb"}   # the dataset's dict untouched


# ----------------------------------------------------------------------------- changes, describe, check

def test_changes_lists_the_parts_both_sides_have_that_differ_in_the_new_order():
    old = {"labels.csv": "sha1 b", "tasks.json": "absent", "train images": "3 files, sha1 x", "gone": "1"}
    new = {"train images": "3 files, sha1 y", "tasks.json": "absent", "labels.csv": "sha1 a", "added": "2"}
    # "sha1 a" < "sha1 b" and "… x" < "… y": a change in either direction is one
    assert F.changes(old, new) == [("train images", "3 files, sha1 x", "3 files, sha1 y"),
                                   ("labels.csv", "sha1 b", "sha1 a")]
    assert F.changes(old, dict(old)) == []
    assert F.changes({"n": 1}, {"n": 2}) == [("n", "1", "2")]                 # values as text
    # a run recorded before fingerprints existed: nothing to compare
    assert F.changes(None, new) == [] and F.changes([("labels.csv", "x")], new) == []


def test_describe_and_check():
    diff = [("labels.csv", "sha1 a", "sha1 b"), ("train images", "1 files, sha1 c", "2 files, sha1 d")]
    text = "labels.csv: sha1 a → sha1 b; train images: 1 files, sha1 c → 2 files, sha1 d"
    assert F.describe(diff) == text and F.describe([]) == ""
    old = {"labels.csv": "sha1 a", "train images": "1 files, sha1 c"}
    new = {"labels.csv": "sha1 b", "train images": "2 files, sha1 d"}
    # no difference: nothing, accepted or not
    assert F.check(old, dict(old), "runs/a", False, "fastdmtg train --resume runs/a") == []
    assert F.check(None, new, "runs/a", False, "fastdmtg train --resume runs/a") == []
    assert F.check(old, dict(old), "runs/a", True, "x") == []
    # accepted: the changes, no stop
    assert F.check(old, new, "runs/a", True, "x") == diff
    with pytest.raises(F.DataChanged) as e:
        F.check(old, new, "runs/a", False, "fastdmtg train --resume runs/a")
    assert str(e.value) == (f"runs/a: the data changed since the run recorded it ({text}); restore it, or go on "
                            "with the new data: fastdmtg train --resume runs/a --accept-data-change "
                            "(recorded in the results)")
    assert isinstance(e.value, ConfigError)                                   # the CLI's one line, exit 2


def test_annotations_resolve():
    """The ``X | None`` annotations evaluate (a mutant of ``|`` raises once something reads them)."""
    for fn in (F.file_digest, F.listing_digest, F.changes, F.check):
        typing.get_type_hints(fn)
