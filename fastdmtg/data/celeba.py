"""CelebA in its official release format.

    ROOT/img_align_celeba/000001.jpg ...       aligned 178×218 JPEGs
    ROOT/list_attr_celeba.txt                  line 1: image count; line 2: the 40 attribute names;
                                               then one row per image: `file v_1 ... v_40`, v ∈ {-1, 1},
                                               fields separated by irregular runs of spaces
    ROOT/list_eval_partition.txt               `file p` per line, p = 0 train / 1 val / 2 test

Images are decoded, converted to RGB and bilinearly resized (half-pixel centres, no antialias —
the TF `tf.image.resize` default the reference pipeline used) to S×S ignoring the aspect ratio, then
stored as uint8; the model sees x / 255 in [0, 1] with no mean/std normalisation. Labels: +1 → 1,
-1 → 0.

Every malformed input raises ``CelebAFormatError`` naming the file, the line and what was expected.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class CelebAFormatError(ValueError):
    """A CelebA file is missing or not in the official format."""


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CelebAFormatError(f"{path}: missing ({what}); expected the official CelebA layout "
                                f"ROOT/{IMAGE_DIR}/, ROOT/{ATTR_FILE}, ROOT/{PARTITION_FILE}")
    return path


def parse_attributes(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse list_attr_celeba.txt → (attribute names, file names, labels (M, A) int8 in {0, 1})."""
    path = _require(Path(path), "attribute annotations")
    with open(path, "r", encoding="utf-8", errors="strict") as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise CelebAFormatError(f"{path}: expected a count line and a names line, file has {len(lines)} line(s)")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise CelebAFormatError(f"{path}:1: expected the image count (an integer), got {lines[0]!r}") from None
    names = lines[1].split()
    if not names:
        raise CelebAFormatError(f"{path}:2: expected attribute names, got an empty line")
    if len(set(names)) != len(names):
        raise CelebAFormatError(f"{path}:2: duplicate attribute names")
    rows = [(i + 3, ln) for i, ln in enumerate(lines[2:]) if ln.strip()]
    if len(rows) != count:
        raise CelebAFormatError(f"{path}: line 1 says {count} images but the file has {len(rows)} rows")
    files, labels = [], np.empty((count, len(names)), dtype=np.int8)
    seen = set()
    for r, (lineno, ln) in enumerate(rows):
        parts = ln.split()
        if len(parts) != len(names) + 1:
            raise CelebAFormatError(f"{path}:{lineno}: expected a file name and {len(names)} values, "
                                    f"got {len(parts)} fields")
        fname = parts[0]
        if fname in seen:
            raise CelebAFormatError(f"{path}:{lineno}: duplicate image {fname!r}")
        seen.add(fname)
        for j, v in enumerate(parts[1:]):
            if v == "1":
                labels[r, j] = 1
            elif v == "-1":
                labels[r, j] = 0
            else:
                raise CelebAFormatError(f"{path}:{lineno}: attribute {names[j]!r} of {fname}: "
                                        f"expected 1 or -1, got {v!r}")
        files.append(fname)
    return names, files, labels


def parse_partition(path: str | Path) -> dict[str, int]:
    """Parse list_eval_partition.txt → {file name: 0 | 1 | 2}."""
    path = _require(Path(path), "train/val/test partition")
    out: dict[str, int] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, ln in enumerate(f, 1):
            if not ln.strip():
                continue
            parts = ln.split()
            if len(parts) != 2:
                raise CelebAFormatError(f"{path}:{lineno}: expected `file partition`, got {ln.rstrip()!r}")
            if parts[1] not in ("0", "1", "2"):
                raise CelebAFormatError(f"{path}:{lineno}: partition of {parts[0]} must be 0, 1 or 2, "
                                        f"got {parts[1]!r}")
            if parts[0] in out:
                raise CelebAFormatError(f"{path}:{lineno}: duplicate image {parts[0]!r}")
            out[parts[0]] = int(parts[1])
    return out


def select_tasks(all_names: list[str], wanted: list[str] | None, path: str = ATTR_FILE) -> list[int]:
    if wanted is None:
        return list(range(len(all_names)))
    idx = []
    for w in wanted:
        if w not in all_names:
            raise CelebAFormatError(f"{path}: unknown attribute {w!r}; the file has: {', '.join(all_names)}")
        idx.append(all_names.index(w))
    if len(set(idx)) != len(idx):
        raise CelebAFormatError(f"data.tasks: duplicate attribute names in {wanted}")
    return idx


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image → (3, size, size) uint8, bilinear (half-pixel, no antialias)."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.exists():
        raise CelebAFormatError(f"{path}: image listed in the annotations is missing")
    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode: truncated files fail here, not later
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CelebAFormatError(f"{path}: unreadable or truncated image ({e})") from None
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return y[0].round().clamp(0, 255).to(torch.uint8).numpy()


def _load_many(args):
    paths, size = args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one decode process per core: no nested intra-op thread pools
    try:
        return np.stack([load_image(p, size) for p in paths])
    finally:
        torch.set_num_threads(threads)   # matters when called in the caller's process (one chunk)


class CelebAIndex:
    """Parsed annotations: which files, which labels, which split."""

    def __init__(self, root: str | Path, tasks: list[str] | None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CelebAFormatError(f"{self.root}: CelebA folder not found (data.root / --data-root)")
        all_names, files, labels = parse_attributes(self.root / ATTR_FILE)
        part = parse_partition(self.root / PARTITION_FILE)
        cols = select_tasks(all_names, tasks, str(self.root / ATTR_FILE))
        self.task_names = [all_names[c] for c in cols]
        missing = [f for f in files if f not in part]
        if missing:
            raise CelebAFormatError(f"{self.root / PARTITION_FILE}: no partition for {len(missing)} annotated "
                                    f"image(s), e.g. {missing[0]}")
        _require(self.root / IMAGE_DIR, "image folder")
        self.splits: dict[str, tuple[list[str], np.ndarray]] = {}
        split_of = np.array([part[f] for f in files])
        for name, sid in SPLIT_IDS.items():
            sel = np.nonzero(split_of == sid)[0]
            self.splits[name] = ([files[i] for i in sel], labels[sel][:, cols].astype(np.int64))

    def image_paths(self, split: str) -> list[Path]:
        return [self.root / IMAGE_DIR / f for f in self.splits[split][0]]

    def labels(self, split: str) -> np.ndarray:
        return self.splits[split][1]


def decode_split(paths: list[Path], size: int, workers: int = 0, progress: bool = True,
                 desc: str = "decode") -> np.ndarray:
    """Decode a list of images to (M, 3, size, size) uint8, in parallel processes, with a progress bar."""
    from tqdm import tqdm
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    chunk = 256
    jobs = [(paths[i:i + chunk], size) for i in range(0, len(paths), chunk)]
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    pos = 0
    if workers <= 1 or len(jobs) <= 1:
        results = map(_load_many, jobs)
        for arr in results:
            out[pos:pos + len(arr)] = arr
            pos += len(arr)
            bar.update(len(arr))
    else:
        with ProcessPoolExecutor(workers) as ex:
            for arr in ex.map(_load_many, jobs):
                out[pos:pos + len(arr)] = arr
                pos += len(arr)
                bar.update(len(arr))
    bar.close()
    return out


def cached_split(index: CelebAIndex, split: str, size: int, cache_dir: Path, workers: int = 0,
                 progress: bool = True) -> np.ndarray:
    """Decoded uint8 images of a split, cached as .npy keyed by the file list and size (atomic write)."""
    paths = index.image_paths(split)
    key = hashlib.sha1(("\n".join(str(p) for p in paths) + f"|{size}").encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"celeba_{split}_{size}_{key}.npy"
    if cache.exists():
        arr = np.load(cache, mmap_mode="r")
        if arr.shape == (len(paths), 3, size, size) and arr.dtype == np.uint8:
            return np.array(arr)  # a writable in-memory copy
    arr = decode_split(paths, size, workers, progress, desc=f"decode celeba/{split}")
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    return arr


class CelebAFiles(torch.utils.data.Dataset):
    """Map-style dataset over the raw JPEGs (the `torch` backend: reference-style DataLoader)."""

    def __init__(self, index: CelebAIndex, split: str, size: int, limit: int = 0):
        self.paths = index.image_paths(split)
        self.labels = index.labels(split)
        if limit:
            self.paths, self.labels = self.paths[:limit], self.labels[:limit]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(load_image(self.paths[i], self.size)),
                "labels": torch.from_numpy(self.labels[i])}
