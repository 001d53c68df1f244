"""What checking decode caches costs at CelebA scale: a (162,770, 3, 64, 64) uint8 array (≈ 2.0 GB,
the CelebA-64 train split) written as a cache file, then read back plain and with the CRC-32 check
fastdmtg.data.store does, plus the raw hash rates of zlib.crc32 and hashlib.blake2b.

    python benchmarks/cache_checksum.py [--n 162770] [--dir DIR] [--out FILE]

The file is read right after it was written, so reads come from the page cache: the numbers are the
CPU cost of hashing, the part the check adds (a cold read from disk only makes the check's share
smaller).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from fastdmtg.data import store


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s ({seconds:.2f} s)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=162_770)
    ap.add_argument("--dir", default=None, help="where to write the temporary 2 GB file (default: a temp dir)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(dir=a.dir, prefix="fastdmtg-crc-"))
    try:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(a.n, 3, 64, 64), dtype=np.uint8)
        nbytes = x.nbytes
        rows = []
        buf = memoryview(x.reshape(-1))
        t = time.perf_counter()
        c = 0
        for i in range(0, nbytes, 16 << 20):
            c = zlib.crc32(buf[i:i + (16 << 20)], c)
        rows.append(("zlib.crc32, in memory", _rate(nbytes, time.perf_counter() - t)))
        t = time.perf_counter()
        h = hashlib.blake2b(digest_size=16)
        for i in range(0, nbytes, 16 << 20):
            h.update(buf[i:i + (16 << 20)])
        rows.append(("hashlib.blake2b, in memory (for comparison)", _rate(nbytes, time.perf_counter() - t)))
        path = work / "image.npy"
        t = time.perf_counter()
        np.save(path, x)
        rows.append(("np.save (write the cache file)", _rate(nbytes, time.perf_counter() - t)))
        t = time.perf_counter()
        crc = store.crc32_file(path)
        rows.append(("store.crc32_file (checksum at creation / `data verify`)", _rate(nbytes, time.perf_counter() - t)))
        entry = {"file": "image.npy", "dtype": "uint8", "shape": list(x.shape), "bytes": path.stat().st_size,
                 "crc32": crc}
        plain, checked = [], []
        for _ in range(2):               # alternate, best of two each: both read the page cache
            t = time.perf_counter()
            y = np.load(path)
            plain.append(time.perf_counter() - t)
            del y
            t = time.perf_counter()
            p, off = store._check_file(work, entry)
            y = store._load_checked(p, off, entry)
            checked.append(time.perf_counter() - t)
            assert np.array_equal(x, y)
            del y
        rows.append(("np.load (read into memory, no check)", _rate(nbytes, min(plain))))
        rows.append(("store read into memory + CRC check (gpu-cache / memory load)", _rate(nbytes, min(checked))))
        t = time.perf_counter()
        store._check_file(work, entry)
        rows.append(("size + header check (every open)", f"{(time.perf_counter() - t) * 1e3:.2f} ms"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# Cache checksum cost at CelebA scale ({time.strftime('%Y-%m-%d')})", "",
             f"- {a.n:,} × 3×64×64 uint8 = {nbytes / 1e9:.2f} GB; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} logical cores; Python {platform.python_version()}, numpy {np.__version__}, "
             f"zlib {zlib.ZLIB_RUNTIME_VERSION}",
             f"- command: `python benchmarks/cache_checksum.py {' '.join(argv or sys.argv[1:])}`", "",
             "| operation | rate (time) |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows]]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
