"""The start-up cost of a data fingerprint and of the content-true decode-cache key at CelebA size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fingerprint_cost.py --work runs/fp [--files 202599] \
        [--hash-files 40000] [--report FILE]

Writes ``--files`` small files (CelebA's 202,599 names; 64 bytes each — a stat does not depend on the
size) and measures, warm (after a first pass), what a resume pays every time:

* the fingerprint's image list (``fastdmtg.fingerprint.listing_digest``: a stat per file, names and
  sizes) and the cache's fast check (``fastdmtg.data.base.files_digest``: a stat per file, size,
  mtime, ctime, inode);
* the annotation files by content (``file_digest`` of a 26 MB file, list_attr_celeba.txt's size).

Then ``--hash-files`` files of 7,000 bytes (CelebA's mean JPEG: 1.4 GB / 202,599) and the CRC-32 of
every one (``fastdmtg.data.store.crc32_file``: what a first build and a changed file cost) — MB/s,
extrapolated to 1.4 GB. Cold-cache (disk) reads are slower; the numbers are this machine's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path


def _write(folder: Path, n: int, size: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(size)
    paths = []
    for i in range(n):
        p = folder / f"{i + 1:06d}.jpg"
        with open(p, "wb") as f:
            f.write(blob[: size - 8] + i.to_bytes(8, "little"))
        paths.append(str(p))
    return paths


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    from fastdmtg.data.base import files_digest
    from fastdmtg.data.store import crc32_file
    from fastdmtg.fingerprint import file_digest, listing_digest
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/fp")
    ap.add_argument("--files", type=int, default=202599)
    ap.add_argument("--hash-files", type=int, default=40000)
    ap.add_argument("--report")
    a = ap.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    paths = _write(work / "list", a.files, 64)
    made = time.perf_counter() - t
    err = lambda p: FileNotFoundError(p)
    listing = _best(lambda: listing_digest(paths, work / "list", err))
    stat_key = _best(lambda: files_digest(paths, err))
    attr = work / "list_attr_celeba.txt"
    attr.write_bytes(os.urandom(26 << 20))
    ann = _best(lambda: file_digest(attr))
    hpaths = _write(work / "hash", a.hash_files, 7000)
    mb = a.hash_files * 7000 / 1e6
    for p in hpaths:                      # warm the page cache: the decode reads the same files
        crc32_file(p)
    crc = _best(lambda: [crc32_file(p) for p in hpaths], 2)
    rate = mb / crc
    rows = [("write the list files (setup)", f"{made:.1f} s", f"{a.files} files"),
            ("fingerprint: image list (stat: names + sizes)", f"{listing:.2f} s", f"{a.files} files"),
            ("cache fast check (stat: size, mtime, ctime, inode)", f"{stat_key:.2f} s", f"{a.files} files"),
            ("fingerprint: one 26 MB annotation file (sha1)", f"{ann:.2f} s", "list_attr_celeba.txt size"),
            (f"CRC-32 of {a.hash_files} files of 7,000 B ({mb:.0f} MB, warm)", f"{crc:.2f} s",
             f"{rate:.0f} MB/s → 1.4 GB (202,599 files): {1400 / rate:.1f} s")]
    text = "\n".join(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows)
    print(text)
    if a.report:
        import platform
        Path(a.report).write_text(
            "# Data fingerprint and content-true cache key: cost at CelebA size\n\n"
            f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fingerprint_cost.py --work runs/fp --files "
            f"{a.files} --hash-files {a.hash_files} --report FILE`\n\n"
            f"Machine: {os.cpu_count()}-core CPU shared with other jobs, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}; files on the local disk, page cache warm (best of 3).\n\n"
            "| what | time | note |\n|---|---|---|\n" + text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
