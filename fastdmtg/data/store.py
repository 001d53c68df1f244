"""Prepared folders: a dataset's decoded per-sample arrays on disk, checksummed, written so that a
partial, stale or damaged folder is never read as a good one. Used by ``fastdmtg prepare
taskonomy`` and by the loaders' decode caches (``fastdmtg.pipelines.cache``).

    OUT/index.json           written LAST: {"format": "fastdmtg-arrays", "version": 2, "dataset",
                             "params" (decode parameters), "info" (format-specific), "splits": {split: meta}}
    OUT/<split>/meta.json    the split's manifest: {"split", "count", "params", "key", "info",
                             "fields": {name: {"file", "dtype", "shape", "bytes", "crc32"}}}
    OUT/<split>/<field>.npy  (M, …) array, readable with np.load(path, mmap_mode="r")

``key`` is what the split's arrays were decoded from (``Dataset.split_key``: the source files' names
and ``stat_key``s — size, mtime, ctime, inode); ``crc32`` is zlib's CRC-32 of the whole .npy file
(header + payload). A split decoded from files also has ``OUT/<split>/sources.json``: per source
file its name, ``stat_key`` and CRC-32, and meta.json's ``content`` digests those CRCs.

Content-true: mtime alone can be set back (``cp -p``, ``rsync -a``, ``tar x`` of new bytes keep size
and mtime), ctime cannot, so new bytes always change the key. A key that changed without new bytes
(chmod, the folder copied elsewhere, ``touch``) costs a CRC of the files whose ``stat_key`` changed,
not a decode: when every such file's CRC is the recorded one the split is kept and its record
updated. A file whose ctime is within ``RACY_NS`` of the moment it was recorded is recorded as
unsettled (a change in the same clock tick would not move ctime): its CRC is compared at the next use.

Writing: a split is decoded into ``OUT/.<split>.tmp-<pid>/``, its checksums computed, its
meta.json written, and the folder renamed to ``OUT/<split>/`` — a split appears complete or not at
all; index.json follows when every split is done. Reading: ``open_split`` checks every file's size
and .npy header against the manifest (cheap, always); ``load=True`` reads the arrays into memory and
checks the CRC on the way (one pass: the read dominates); ``verify`` checks every CRC
(``fastdmtg data verify PATH``).

A split whose key no longer matches its sources (a file changed, added or removed) is *stale*, one
whose files fail the checks is *damaged*: ``materialize`` decodes either again, with a log line
naming the folder and why. Different decode parameters are refused (prepare into another folder).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from .base import SPLITS, DataFormatError, Field

STORE_FORMAT = "fastdmtg-arrays"       # the index's format tag (a module's FORMAT is a dataset-format plugin)
VERSION = 2
INDEX = "index.json"
META = "meta.json"
SOURCES = "sources.json"
#: a file changed less than this before its record was taken may change again within the same ctime
#: tick: recorded as unsettled (its CRC is compared at the next use)
RACY_NS = 2 * 10**9
_CHUNK = 16 << 20

log = logging.getLogger("fastdmtg.data")


class StoreError(DataFormatError):
    """A prepared folder is incomplete, damaged or was made differently; the message names the file."""


class Damaged(StoreError):
    """A prepared file fails its size, header or checksum check."""


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def crc32_file(path: str | Path) -> str:
    """zlib CRC-32 of a whole file, as 8 hex digits."""
    c = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            c = zlib.crc32(b, c)
    return f"{c:08x}"


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(f"{path}: not valid JSON ({e})") from None


def _npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, payload offset) of a .npy file, checked."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version}")
            offset = f.tell()
    except FileNotFoundError:
        raise Damaged(f"{path}: missing") from None
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise Damaged(f"{path}: not a readable .npy file ({e})") from None
    if fortran:
        raise Damaged(f"{path}: Fortran-ordered array (not written by fastdmtg)")
    return tuple(shape), np.dtype(dtype), offset


def _check_file(folder: Path, entry: dict) -> tuple[Path, int]:
    """Size and .npy header of one manifest entry; returns (path, payload offset)."""
    path = folder / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise Damaged(f"{path}: missing") from None
    if size != entry["bytes"]:
        raise Damaged(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)")
    shape, dtype, offset = _npy_header(path)
    if shape != tuple(entry["shape"]) or dtype != np.dtype(entry["dtype"]):
        raise Damaged(f"{path}: header says {shape} {dtype}, the manifest {tuple(entry['shape'])} {entry['dtype']}")
    if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != size:
        raise Damaged(f"{path}: payload size disagrees with its header {shape} {dtype}")
    return path, offset


def _load_checked(path: Path, offset: int, entry: dict) -> np.ndarray:
    """Read a whole .npy into memory, checking its CRC-32 on the way."""
    out = np.empty(tuple(entry["shape"]), dtype=np.dtype(entry["dtype"]))
    buf = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    with open(path, "rb") as f:
        head = f.read(offset)
        c = zlib.crc32(head)
        pos = 0
        while pos < len(buf):
            n = f.readinto(buf[pos:pos + _CHUNK])
            if not n:
                raise Damaged(f"{path}: ended after {offset + pos} bytes (truncated)")
            c = zlib.crc32(buf[pos:pos + n], c)
            pos += n
    if f"{c:08x}" != entry["crc32"]:
        raise Damaged(f"{path}: checksum {c:08x}, the manifest says {entry['crc32']} (the file is damaged)")
    return out


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def read_index(folder: str | Path, what: str = "prepared folder", rerun: str = "fastdmtg prepare") -> dict:
    """The index of a complete prepared folder; a clear error for a partial or foreign one."""
    folder = Path(folder)
    path = folder / INDEX
    index = _read_json(path)
    if index is None:
        if is_partial(folder):
            raise StoreError(f"{folder}: prepare did not finish (no {INDEX}): re-run `{rerun}`")
        raise StoreError(f"{path}: missing (not a {what})")
    if not isinstance(index, dict):
        raise Damaged(f"{path}: expected a JSON object")
    fmt, ver = index.get("format"), index.get("version")
    if fmt == "fastdmtg-taskonomy" and ver == 1:
        raise StoreError(f"{path}: prepared by an older fastdmtg (format version 1, no checksums): re-run `{rerun}`")
    if fmt != STORE_FORMAT:
        raise StoreError(f"{path}: format {fmt!r}, expected {STORE_FORMAT!r}")
    if ver != VERSION:
        raise StoreError(f"{path}: format version {ver}, this fastdmtg reads version {VERSION}: re-run `{rerun}`")
    return index


def is_partial(folder: Path) -> bool:
    """Whether ``folder`` holds the remains of an unfinished prepare (split folders or temporary
    split folders but no index.json)."""
    if not folder.is_dir() or (folder / INDEX).exists():
        return False
    return any((folder / s / META).exists() for s in SPLITS) or any(folder.glob(".*.tmp-*"))


def split_meta(folder: Path, split: str) -> dict | None:
    meta = _read_json(folder / split / META)
    if meta is not None and not (isinstance(meta, dict) and isinstance(meta.get("fields"), dict)):
        raise Damaged(f"{folder / split / META}: not a split manifest")
    return meta


def check_split(folder: Path, split: str, meta: dict) -> None:
    """Size + header of every file of a split (raises ``Damaged`` naming the file)."""
    for entry in meta["fields"].values():
        _check_file(folder, entry)


def open_split(folder: str | Path, split: str, meta: dict, fields: tuple[str, ...] | None = None,
               load: bool = False) -> dict[str, np.ndarray]:
    """{field: (M, …) array} of a split: memory-mapped after the size + header checks, or with
    ``load`` read into memory with the CRC checked. Raises ``Damaged`` naming the file."""
    folder = Path(folder)
    out = {}
    for name, entry in meta["fields"].items():
        if fields is not None and name not in fields:
            continue
        path, offset = _check_file(folder, entry)
        if load:
            out[name] = _load_checked(path, offset, entry)
        else:
            out[name] = np.load(path, mmap_mode="r")
    return out


def verify_split(folder: str | Path, split: str, meta: dict) -> None:
    """Every file of a split against its manifest, CRC included (raises ``Damaged`` naming the file)."""
    folder = Path(folder)
    for entry in meta["fields"].values():
        path, _ = _check_file(folder, entry)
        c = crc32_file(path)
        if c != entry["crc32"]:
            raise Damaged(f"{path}: checksum {c}, the manifest says {entry['crc32']} (the file is damaged)")


def verify(folder: str | Path, progress: bool = False) -> list[str]:
    """Check every file of a prepared folder against its manifest, CRC included. Returns the
    problems (empty: all good)."""
    folder = Path(folder)
    try:
        index = read_index(folder)
    except StoreError as e:
        return [str(e)]
    problems = []
    for split, meta in index["splits"].items():
        on_disk = split_meta(folder, split)
        if on_disk is None:
            problems.append(f"{folder / split / META}: missing: prepare did not finish")
            continue
        if on_disk != meta:
            problems.append(f"{folder / split / META}: disagrees with {folder / INDEX}")
        for entry in meta["fields"].values():
            try:
                path, _ = _check_file(folder, entry)
                c = crc32_file(path)
                if c != entry["crc32"]:
                    problems.append(f"{path}: checksum {c}, the manifest says {entry['crc32']} (damaged)")
                elif progress:
                    print(f"ok  {path}")
            except Damaged as e:
                problems.append(str(e))
    return problems


# ------------------------------------------------------------------------------------------------
# source files: content-true records
# ------------------------------------------------------------------------------------------------
def _source_paths(dataset, split: str) -> list[str] | None:
    items = dataset.items(split)
    return None if items is None else [str(p) for it in items for p in it.values()]


def _record(path: str, crc: str | None, missing_error) -> list:
    """[name, size, mtime_ns, ctime_ns (-1: unsettled), inode, CRC-32] of one source file."""
    from .base import stat_key
    try:
        st = os.stat(path)
        if crc is None:
            crc = crc32_file(path)
    except FileNotFoundError:
        raise missing_error(path) from None
    size, mtime, ctime, ino = stat_key(st)
    if time.time_ns() - ctime < RACY_NS:
        ctime = -1
    return [path, size, mtime, ctime, ino, crc]


def source_records(dataset, split: str) -> list[list] | None:
    """Every source file of ``split`` recorded (stat + CRC-32: one read of each file); None when the
    split has no files."""
    paths = _source_paths(dataset, split)
    if paths is None:
        return None
    return [_record(p, None, dataset.missing_error) for p in paths]


def content_digest(records: list[list]) -> str:
    """sha1 over the sources' sizes and CRCs in order (not their names or folder): what the decoded
    arrays were made from."""
    h = hashlib.sha1()
    for r in records:
        h.update(f"{r[1]}:{r[5]}\n".encode())
    return h.hexdigest()


def _key_of(key: dict, records: list[list] | None) -> dict:
    """The key to record: an unsettled file makes it one that the next ``split_key`` never equals."""
    if records and any(r[3] == -1 for r in records):
        return dict(key, unsettled=True)
    return key


def _same_content(out: Path, split: str, meta: dict, dataset, key: dict) -> str | None:
    """The split's key changed: compare the CRC of every source file whose stat changed with the one
    recorded. Same bytes everywhere → the record is updated (meta.json, sources.json) and None is
    returned; else why the split is stale (naming the first changed file)."""
    from .base import stat_key
    paths = _source_paths(dataset, split)
    try:
        rec = _read_json(out / split / SOURCES)
    except Damaged:
        rec = None
    if paths is None or not isinstance(rec, dict) or not isinstance(rec.get("files"), list):
        return "stale: its source files changed since it was prepared"
    old = rec["files"]
    if [r[0] for r in old] != paths:
        return "stale: its source files changed since it was prepared (files added, removed or renamed)"
    new = []
    for r in old:
        try:
            st = os.stat(r[0])
        except FileNotFoundError:
            raise dataset.missing_error(r[0]) from None
        if r[3] != -1 and list(stat_key(st)) == r[1:5]:
            new.append(r)
            continue
        fresh = _record(r[0], None, dataset.missing_error)
        if fresh[5] != r[5] or fresh[1] != r[1]:
            return f"stale: its source files changed since it was prepared ({r[0]}: other bytes)"
        new.append(fresh)
    (out / INDEX).unlink(missing_ok=True)   # until materialize writes it again the folder is partial
    _atomic_write_json(out / split / SOURCES, {"version": 1, "files": new})
    meta["key"] = _key_of(key, new)
    _atomic_write_json(out / split / META, meta)
    log.info("%s: source files touched but not changed (same checksums); kept", out / split)
    return None


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(out: Path, split: str) -> None:
    """Delete ``.<split>.tmp-<pid>`` folders left by interrupted runs (never a live process's)."""
    for p in out.glob(f".{split}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def build_split(out: Path, split: str, count: int, fields: dict[str, Field], fill, params: dict, key: dict,
                info: dict, sources: list[list] | None = None) -> dict:
    """Allocate the split's .npy files in a temporary folder, ``fill({field: path})`` them, checksum
    them, write meta.json (and ``sources``' records, sources.json) and rename the folder into place.
    Returns the split's manifest."""
    _remove_stale_tmp(out, split)
    tmp = out / f".{split}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        files = {}
        for name, f in fields.items():
            p = tmp / f"{name}.npy"
            np.lib.format.open_memmap(p, mode="w+", dtype=f.dtype, shape=(count, *f.shape)).flush()
            files[name] = p
        fill(files)
        entries = {}
        for name, p in files.items():
            entries[name] = {"file": f"{split}/{name}.npy", "dtype": fields[name].dtype.name,
                             "shape": [count, *fields[name].shape], "bytes": p.stat().st_size, "crc32": crc32_file(p)}
        meta = {"split": split, "count": count, "params": params, "key": _key_of(key, sources), "info": info,
                "fields": entries}
        if sources is not None:
            meta["content"] = content_digest(sources)
            _atomic_write_json(tmp / SOURCES, {"version": 1, "files": sources})
        _atomic_write_json(tmp / META, meta)
        final = out / split
        try:
            os.replace(tmp, final)   # the split appears complete or not at all
        except OSError:
            # another process finished the same split first: keep theirs when it is sound
            other = split_meta(out, split)
            if other is None or other.get("key") != meta["key"] or other.get("params") != params:
                raise
            check_split(out, split, other)
            shutil.rmtree(tmp, ignore_errors=True)
            return other
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # a partial split can be very large: don't leave it
        raise


def materialize(dataset, out: str | Path, *, splits: tuple[str, ...] = SPLITS, params: dict, info: dict | None = None,
                workers: int = 0, progress: bool = True, refuse_other_params: bool = True) -> dict:
    """Make ``out`` a complete prepared folder of ``dataset``'s decoded fields: reuse every sound,
    up-to-date split; decode missing, stale or damaged ones again (a log line says which and why).
    Returns the index (also written to ``out/index.json``, last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = {k: dataset.fields[k] for k in dataset.decoded_fields}
    try:
        old = _read_json(out / INDEX)
    except Damaged as e:            # rewritten below; the splits are checked one by one
        log.warning("%s; writing it again", e)
        old = None
    index = {"format": STORE_FORMAT, "version": VERSION, "dataset": dataset.name, "params": params,
             "info": info or {}, "splits": {}}
    if isinstance(old, dict) and old.get("format") == STORE_FORMAT and isinstance(old.get("splits"), dict):
        # splits prepared earlier and not asked for now stay listed
        index["splits"] = {s: m for s, m in old["splits"].items() if s not in splits and (out / s / META).exists()}
    for s in splits:
        key = dataset.split_key(s)
        final = out / s
        why = None
        try:
            meta = split_meta(out, s)
        except Damaged as e:
            meta, why = None, f"damaged ({e})"
        if meta is not None:
            if meta.get("params") != params:
                if refuse_other_params:
                    diff = {k: (meta.get("params", {}).get(k), v) for k, v in params.items()
                            if meta.get("params", {}).get(k) != v}
                    raise StoreError(f"{final / META}: split {s!r} was prepared with other settings "
                                     + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
                                     + f"; prepare into another folder (or delete {final})")
                why = "prepared with other settings"
            elif meta.get("key") != key:
                # new bytes, or only a new ctime/inode/mtime (chmod, a copy, touch): the CRCs tell
                why = _same_content(out, s, meta, dataset, key)
            if why is None:
                try:
                    check_split(out, s, meta)
                except Damaged as e:
                    why = f"damaged: {e}"
            if why is None:
                index["splits"][s] = meta
                continue
        elif final.exists() and why is None:
            why = f"incomplete (no {META})"
        if why is not None:
            log.warning("%s: %s; decoding it again", final, why)
            shutil.rmtree(final, ignore_errors=True)
        (out / INDEX).unlink(missing_ok=True)   # from here until the end the folder is partial
        n = dataset.num_samples(s)

        def fill(files, s=s):
            dataset.decode_into(s, files, workers=workers, progress=progress, desc=f"decode {dataset.name}/{s} -> {out}")
        # recorded before the decode: a file changed during it fails its CRC at the next use
        sources = source_records(dataset, s)
        index["splits"][s] = build_split(out, s, n, fields, fill, params, key, dataset.split_info(s), sources)
    _atomic_write_json(out / INDEX, index)
    return index


__all__ = ["STORE_FORMAT", "VERSION", "StoreError", "Damaged", "crc32_file", "read_index", "is_partial", "split_meta",
           "check_split", "open_split", "verify_split", "verify", "build_split", "materialize"]
