"""Caches of decoded data that cannot serve wrong data.

Decode caches (gpu-cache, memory, ffcv over a dataset that has files to decode)
    A prepared folder (``fastdmtg.data.store``) per dataset and settings:

        CACHE/<dataset>_<S>_<key>/     key = sha1 of {cache format version, resolved absolute root,
                                       decode parameters + the format's decode version, limits}
            index.json, <split>/meta.json, <split>/<field>.npy

    Each split's manifest records what it was decoded from — every source file's name, size and
    mtime — and a CRC-32 per .npy file. Before use: the key is recomputed from the files on disk
    (stale → decoded again), every file's size and header are checked (damaged → decoded again), and
    reading a split into memory checks its CRC (damaged → decoded again); each time a log line
    names the folder and the reason. The same dataset at another path, another size, or changed
    files therefore never shares a cache entry, and a garbled, truncated or empty cache file is
    never used.

FFCV .beton files
    ``CACHE/ffcv/<dataset>_<split>_<S>_<mode>_<key>.beton`` + ``<name>.beton.json`` (written last:
    the same key, the file's size and CRC-32). A .beton is written from checked data (the decode
    cache's or prepared folder's CRCs verified first); opening one checks its manifest, size, CRC
    (a CelebA-64 train .beton is ~2 GB: about 1.5 s at zlib's ~1.3 GB/s) and allocation table
    (``ffcv_source.check_beton``); a missing manifest or any mismatch → written again.

``fastdmtg data verify PATH`` (``verify_path``) checks every CRC of a prepared folder, a cache
folder, a .beton, or everything under a cache directory.

Where: ``data.cache_dir``; by default ``ROOT/.fastdmtg_cache`` for datasets whose caches are large
(Taskonomy) when the root is writable, else ``~/.cache/fastdmtg``.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from fastdmtg.data import store

from .source import PipelineError, log

CACHE_VERSION = 1


def default_cache_dir(cache_dir: str, dataset) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    root = getattr(dataset, "root", None)
    if dataset.cache_beside_data and root is not None and os.access(root, os.W_OK):
        return Path(root) / ".fastdmtg_cache"
    return Path.home() / ".cache" / "fastdmtg"


def _make_cache_dir(base: Path) -> None:
    """Create the cache directory, or one line naming the setting and the path (not errno text)."""
    try:
        base.mkdir(parents=True, exist_ok=True)
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        why = {errno.EACCES: "permission denied", errno.EROFS: "read-only file system", errno.ENOSPC:
               "no space left", errno.ENOTDIR: "a file is in the way", errno.EEXIST: "a file is in the way"}.get(
            e.errno, e.strerror or type(e).__name__)
        raise PipelineError(f"data.cache_dir: cannot create or write the decode cache folder {base} ({why}); "
                            "set a writable folder with --set data.cache_dir=PATH") from None


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DecodeCache:
    """The decoded fields of one dataset (see the module doc)."""

    def __init__(self, dataset, base: Path, *, workers: int = 0, progress: bool = True):
        self.dataset, self.workers, self.progress = dataset, workers, progress
        self.folder = Path(base) / f"{dataset.name}_{dataset.image_size}_{_digest([CACHE_VERSION, dataset.cache_id()])}"
        self._ready: set[str] = set()

    def ensure(self, split: str) -> None:
        """Decode ``split`` into the cache unless a sound, up-to-date copy is there."""
        if split in self._ready:
            return
        ds = self.dataset
        _make_cache_dir(self.folder.parent)
        store.materialize(ds, self.folder, splits=(split,), params=ds.params(), info=ds.info(), workers=self.workers,
                          progress=self.progress, refuse_other_params=False)
        self._ready.add(split)

    def content_digests(self) -> dict[str, str]:
        """{split: digest of its source files' CRCs} for the splits checked so far (the content part of
        a run's data fingerprint, ``fastdmtg.fingerprint``)."""
        out = {}
        for s in sorted(self._ready):
            meta = store.split_meta(self.folder, s)
            if meta is not None and meta.get("content"):
                out[s] = meta["content"]
        return out

    def check(self, split: str) -> None:
        """Check every CRC of the split's cache files (before a .beton is written from them); a
        damaged split is decoded again (one log line)."""
        self.ensure(split)
        try:
            store.verify_split(self.folder, split, store.split_meta(self.folder, split))
        except store.Damaged as e:
            self._redo(split, e)

    def _redo(self, split: str, err: Exception) -> None:
        log.warning("%s: damaged (%s); decoding it again", self.folder / split, err)
        shutil.rmtree(self.folder / split, ignore_errors=True)
        self._ready.discard(split)
        self.ensure(split)

    def arrays(self, split: str, load: bool) -> dict[str, np.ndarray]:
        """{decoded field: (M, …) array}: memory-mapped (size + header checked) or, with ``load``,
        read into memory with the CRC checked. A damaged file is decoded again (one log line)."""
        self.ensure(split)
        for attempt in (0, 1):
            try:
                meta = store.split_meta(self.folder, split)
                if meta is None:
                    raise store.Damaged(f"{self.folder / split / store.META}: missing")
                return store.open_split(self.folder, split, meta, load=load)
            except store.Damaged as e:
                if attempt:
                    raise
                self._redo(split, e)
        raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------
# single files with a manifest next to them (.beton)
# ------------------------------------------------------------------------------------------------
def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_manifest(path: Path, key: dict) -> None:
    """Record ``path``'s key, size and CRC-32 (call after the file is complete)."""
    m = {"format": "fastdmtg-file", "version": 1, "key": key, "bytes": path.stat().st_size,
         "crc32": store.crc32_file(path)}
    tmp = manifest_path(path).with_name(f".{path.name}.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(m, indent=1) + "\n")
    os.replace(tmp, manifest_path(path))


def file_problem(path: Path, key: dict | None = None, crc: bool = False) -> str | None:
    """Why ``path`` may not be used (None: fine): missing, no/other manifest, another key, another
    size, or (``crc``) another checksum."""
    mp = manifest_path(path)
    if not path.exists():
        return f"{path}: missing"
    try:
        m = json.loads(mp.read_text())
    except FileNotFoundError:
        return f"{path}: no manifest {mp.name} (written by an older fastdmtg, or the write did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{mp}: not valid JSON"
    if not isinstance(m, dict) or m.get("format") != "fastdmtg-file":
        return f"{mp}: not a fastdmtg file manifest"
    if key is not None and m.get("key") != key:
        return f"{path}: made from other data or settings (stale)"
    size = path.stat().st_size
    if size != m.get("bytes"):
        return f"{path}: {size} bytes, the manifest says {m.get('bytes')} (truncated or overwritten)"
    if crc:
        c = store.crc32_file(path)
        if c != m.get("crc32"):
            return f"{path}: checksum {c}, the manifest says {m.get('crc32')} (damaged)"
    return None


# ------------------------------------------------------------------------------------------------
# fastdmtg data verify
# ------------------------------------------------------------------------------------------------
def verify_path(path: str | Path) -> tuple[int, list[str]]:
    """(items checked, problems) for a prepared/cache folder, a .beton, or a directory holding them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".json" and path.name.endswith(".beton.json"):
            path = path.with_name(path.name[:-5])
        p = file_problem(path, crc=True)
        return 1, [p] if p else []
    if (path / store.INDEX).exists() or store.is_partial(path):
        return 1, store.verify(path)
    checked, problems = 0, []
    for sub in sorted(path.rglob(store.INDEX)):
        if sub.parent.parent.joinpath(store.INDEX).exists():
            continue                                   # a split folder inside a prepared folder
        n, p = verify_path(sub.parent)
        checked, problems = checked + n, problems + p
    for sub in sorted(path.rglob("*.beton")):
        n, p = verify_path(sub)
        checked, problems = checked + n, problems + p
    if checked == 0:
        problems.append(f"{path}: no prepared folder, cache folder or .beton file found")
    return checked, problems


def verify_main(argv: list[str]) -> int:
    """``fastdmtg data verify PATH...``: exit 0 when everything checks out, 1 when something is damaged."""
    ap = argparse.ArgumentParser(prog="fastdmtg data verify",
                                 description="Check the checksums of prepared folders, decode caches and .beton files.")
    ap.add_argument("paths", nargs="+", metavar="PATH")
    a = ap.parse_args(argv)
    bad = 0
    for p in a.paths:
        try:
            n, problems = verify_path(p)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for msg in problems:
            print(f"damaged: {msg}")
        bad += len(problems)
        if not problems:
            print(f"ok: {p} ({n} checked)")
    return 1 if bad else 0


__all__ = ["DecodeCache", "default_cache_dir", "write_manifest", "file_problem", "verify_path", "verify_main",
           "CACHE_VERSION"]
