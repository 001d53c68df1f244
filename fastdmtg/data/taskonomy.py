"""Taskonomy (official release format) → a prepared, memory-mappable folder → batches.

Raw layout (either of the two; detected, never guessed — a root with both or neither is an error)::

    domain/building  ROOT/<domain>/<building>/point_<p>_view_<v>_domain_<suffix>.png   (reference loaders)
    building/domain  ROOT/<building>/<domain>/point_<p>_view_<v>_domain_<suffix>.png   (per-building tars)

Domains (folder name → file suffix, PNG type):

    rgb               rgb              8-bit RGB
    depth_zbuffer     depth_zbuffer    16-bit grayscale, 1/512 m, 65535 = no depth
    normal            normal           8-bit RGB
    segment_semantic  segmentsemantic  8-bit grayscale, class ids 0..17 (0 = ignore)
    keypoints2d       keypoints2d      16-bit grayscale
    edge_texture      edge_texture     16-bit grayscale

Samples are the rgb files of the split's buildings; every other domain must have the matching file
(a missing or unreadable label is an error naming the file — the HOA loader silently reused the
previous sample's labels instead).

Resizing (512 → S, default 256) follows the reference pre-processing, which used PIL's
``resize(BILINEAR)``: an antialiased triangle filter (for 2× down-sampling the separable taps
[1, 3, 3, 1] / 8). We compute it with ``F.interpolate(mode="bilinear", antialias=True)``, which
implements the same filter, in float32, then round to the source bit depth. Segmentation ids are
resized with nearest neighbour (``nearest-exact``: the pixel under the output pixel's centre) —
``seg_resize="bilinear"`` reproduces the reference, which interpolated class ids (a bug: the
average of ids 3 and 17 is id 10).

Prepared folder (``prepare``)::

    OUT/index.json                      format, version, layout, sizes, seg resize, domains, samples
    OUT/<split>/meta.json               the same for one split (written last: marks the split done)
    OUT/<split>/rgb.npy                 (M, 3, S, S) uint8
    OUT/<split>/depth_zbuffer.npy       (M, 1, S, S) uint16   raw units
    OUT/<split>/normal.npy              (M, 3, S, S) uint8
    OUT/<split>/segment_semantic.npy    (M, 1, S, S) uint8
    OUT/<split>/keypoints2d.npy         (M, 1, S, S) uint16
    OUT/<split>/edge_texture.npy        (M, 1, S, S) uint16

Values are stored raw (quantised to the source bit depth after resizing); normalisation happens
per batch on the device, as in the reference:

    image      rgb / 255
    depth      (d - 1500) / 1000,  mask = d < 8192 (2^13), used by the depth and normal losses
    normal     (x / 255 - 0.5) * 2
    keypoints  (x - 50) / 100
    edges      (x - 718) / 1070
    segment    raw class ids, int64

Train augmentation: horizontal flip (p = 0.5) of every map of a sample together, with the normal
x-channel negated after normalisation (a mirrored surface faces the other way along x).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import DataSource, epoch_permutation, num_batches

FORMAT = "fastdmtg-taskonomy"
FORMAT_VERSION = 1

DOMAINS = ("rgb", "depth_zbuffer", "normal", "segment_semantic", "keypoints2d", "edge_texture")
FILE_SUFFIX = {d: d for d in DOMAINS} | {"segment_semantic": "segmentsemantic"}
CHANNELS = {"rgb": 3, "depth_zbuffer": 1, "normal": 3, "segment_semantic": 1, "keypoints2d": 1, "edge_texture": 1}
DTYPE = {"rgb": np.uint8, "depth_zbuffer": np.uint16, "normal": np.uint8, "segment_semantic": np.uint8,
         "keypoints2d": np.uint16, "edge_texture": np.uint16}
# PNG IHDR (bit depth, colour type) each domain must have: 0 = grayscale, 2 = RGB
PNG_TYPE = {"rgb": (8, 2), "depth_zbuffer": (16, 0), "normal": (8, 2), "segment_semantic": (8, 0),
            "keypoints2d": (16, 0), "edge_texture": (16, 0)}
_PNG_COLOUR = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}

NUM_SEG_CLASSES = 18
DEPTH_VALID_BELOW = 8192          # raw depth < 2^13 is a valid pixel (reference mask)

LAYOUT_DOMAIN_FIRST = "domain/building"
LAYOUT_BUILDING_FIRST = "building/domain"
SPLITS = ("train", "val", "test")

TINY_SPLIT = {
    "train": ["hanson", "merom", "klickitat", "onaga", "leonardo", "marstons", "newfields", "pinesdale",
              "lakeville", "cosmos", "benevolence", "pomaria", "tolstoy", "shelbyville", "allensville",
              "wainscott", "beechwood", "coffeen", "stockman", "hiteman", "woodbine", "lindenwood",
              "forkland", "mifflinburg", "ranchester"],
    "val": ["wiconisco", "corozal", "collierville", "markleeville", "darden"],
    "test": ["ihlen", "muleshoe", "uvalda", "noxapater", "mcdade"],
}

#: task name → the domain holding its target
TASK_DOMAIN = {"segment_semantic": "segment_semantic", "depth_zbuffer": "depth_zbuffer", "normal": "normal",
               "keypoints2d": "keypoints2d", "edge_texture": "edge_texture"}
#: (offset, scale) of the affine normalisation (x - offset) / scale of the 16-bit label maps
NORM_16BIT = {"depth_zbuffer": (1500.0, 1000.0), "keypoints2d": (50.0, 100.0), "edge_texture": (718.0, 1070.0)}

_RGB_NAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_rgb\.png$")


class TaskonomyFormatError(ValueError):
    """A Taskonomy file or folder is missing or not in the expected format (the message names it)."""


# ----------------------------------------------------------------------------------------------
# Splits and layout
# ----------------------------------------------------------------------------------------------
def load_split(split_file: str | Path | None) -> dict[str, list[str]]:
    """The tiny split, or a custom JSON {"train": [...], "val": [...], "test": [...]}.

    Train may not share a building with val or test (leakage); val and test may overlap (a
    small subset sometimes has one held-out building for both)."""
    if not split_file:
        return {k: list(v) for k, v in TINY_SPLIT.items()}
    path = Path(split_file)
    if not path.is_file():
        raise TaskonomyFormatError(f"{path}: split file not found (data.taskonomy_split_file)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TaskonomyFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise TaskonomyFormatError(f"{path}: expected an object {{\"train\": [...], \"val\": [...], \"test\": [...]}}")
    out = {}
    for s in SPLITS:
        v = d.get(s)
        if not isinstance(v, list) or not v or not all(isinstance(b, str) and b for b in v):
            raise TaskonomyFormatError(f"{path}: \"{s}\" must be a non-empty list of building names, got {v!r}")
        if len(set(v)) != len(v):
            raise TaskonomyFormatError(f"{path}: \"{s}\" lists a building twice")
        out[s] = list(v)
    unknown = set(d) - set(SPLITS)
    if unknown:
        raise TaskonomyFormatError(f"{path}: unknown keys {sorted(unknown)}; expected train, val, test")
    leak = set(out["train"]) & (set(out["val"]) | set(out["test"]))
    if leak:
        raise TaskonomyFormatError(f"{path}: building(s) {sorted(leak)} are in train and in val/test")
    return out


def detect_layout(root: Path) -> str:
    """Which of the two layouts ``root`` has; an error if neither or both (mixed)."""
    if not root.is_dir():
        raise TaskonomyFormatError(f"{root}: Taskonomy folder not found (data.root / --data-root)")
    domain_dirs = sorted(d for d in DOMAINS if (root / d).is_dir())
    building_dirs = sorted(e.name for e in os.scandir(root)
                           if e.is_dir() and e.name not in DOMAINS
                           and any((Path(e.path) / d).is_dir() for d in DOMAINS))
    if domain_dirs and building_dirs:
        raise TaskonomyFormatError(
            f"{root}: mixed layout: domain folders {domain_dirs} (ROOT/<domain>/<building>/) and building "
            f"folders with domain subfolders, e.g. {building_dirs[:3]} (ROOT/<building>/<domain>/); "
            "keep one layout per root")
    if domain_dirs:
        return LAYOUT_DOMAIN_FIRST
    if building_dirs:
        return LAYOUT_BUILDING_FIRST
    seen = sorted(e.name for e in os.scandir(root))[:8]
    raise TaskonomyFormatError(
        f"{root}: not a Taskonomy root: expected ROOT/rgb/<building>/point_*_domain_rgb.png or "
        f"ROOT/<building>/rgb/point_*_domain_rgb.png; found {seen or 'an empty folder'}")


def domain_dir(root: Path, layout: str, domain: str, building: str) -> Path:
    if layout == LAYOUT_DOMAIN_FIRST:
        return root / domain / building
    return root / building / domain


def file_name(domain: str, point: int, view: int) -> str:
    return f"point_{point}_view_{view}_domain_{FILE_SUFFIX[domain]}.png"


def index_samples(root: Path, layout: str, buildings: list[str], domains: tuple[str, ...]
                  ) -> list[tuple[str, int, int]]:
    """(building, point, view) of every rgb file of ``buildings``, sorted; checks that every other
    domain has the matching file (one directory listing per building and domain)."""
    missing_b = [b for b in buildings if not domain_dir(root, layout, "rgb", b).is_dir()]
    if missing_b:
        where = domain_dir(root, layout, "rgb", missing_b[0])
        raise TaskonomyFormatError(
            f"{root}: building(s) {missing_b} of the split are missing (e.g. no folder {where}); "
            "download them, or list only the buildings you have in a split file (data.taskonomy_split_file)")
    samples = []
    for b in buildings:
        rgb_dir = domain_dir(root, layout, "rgb", b)
        found = []
        for name in os.listdir(rgb_dir):
            if not name.endswith(".png"):
                continue          # e.g. .DS_Store, checksums: not images
            m = _RGB_NAME.match(name)
            if not m:
                raise TaskonomyFormatError(f"{rgb_dir / name}: unexpected file name; expected "
                                           "point_<p>_view_<v>_domain_rgb.png")
            found.append((b, int(m.group(1)), int(m.group(2))))
        if not found:
            raise TaskonomyFormatError(f"{rgb_dir}: no point_*_view_*_domain_rgb.png files")
        found.sort()
        for d in domains:
            if d == "rgb":
                continue
            ddir = domain_dir(root, layout, d, b)
            have = set(os.listdir(ddir)) if ddir.is_dir() else set()
            for _, p, v in found:
                if file_name(d, p, v) not in have:
                    extra = "" if ddir.is_dir() else " (the folder itself is missing)"
                    raise TaskonomyFormatError(
                        f"{ddir / file_name(d, p, v)}: missing {d} label of {b} point {p} view {v}{extra}")
        samples += found
    return samples


# ----------------------------------------------------------------------------------------------
# Decoding and resizing
# ----------------------------------------------------------------------------------------------
def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk — independent of how a
    given Pillow version maps 16-bit PNGs to image modes."""
    try:
        with open(path, "rb") as f:
            head = f.read(29)
    except FileNotFoundError:
        raise TaskonomyFormatError(f"{path}: missing") from None
    except OSError as e:
        raise TaskonomyFormatError(f"{path}: unreadable ({e})") from None
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise TaskonomyFormatError(f"{path}: not a PNG file")
    w, h, depth, colour = struct.unpack(">IIBB", head[16:26])
    return w, h, depth, colour


def load_domain(path: str | Path, domain: str, expected_side: int | None = None) -> np.ndarray:
    """Decode one Taskonomy PNG → (C, H, W) array in the domain's storage dtype, checked."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    w, h, depth, colour = png_header(path)
    want_depth, want_colour = PNG_TYPE[domain]
    if (depth, colour) != (want_depth, want_colour):
        raise TaskonomyFormatError(
            f"{path}: expected a {want_depth}-bit {_PNG_COLOUR[want_colour]} PNG for {domain}, "
            f"found {depth}-bit {_PNG_COLOUR.get(colour, f'colour type {colour}')}")
    if w != h:
        raise TaskonomyFormatError(f"{path}: image is {w}x{h}; Taskonomy images are square")
    if expected_side is not None and w != expected_side:
        raise TaskonomyFormatError(f"{path}: image is {w}x{h}, expected {expected_side}x{expected_side} "
                                   "(the size of this sample's rgb / the rest of the dataset)")
    try:
        with Image.open(path) as im:
            im.load()  # full decode here: a truncated file fails now, naming itself
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise TaskonomyFormatError(f"{path}: unreadable or truncated PNG ({e})") from None
    if want_depth == 16:
        # Pillow gives mode I;16 (uint16), I;16B (big-endian) or, in older versions, I (int32)
        arr = arr.astype(np.uint16)
    elif arr.dtype != np.uint8:
        raise TaskonomyFormatError(f"{path}: decoded as {arr.dtype}, expected 8-bit values")
    if arr.shape[:2] != (h, w):
        raise TaskonomyFormatError(f"{path}: decoded shape {arr.shape} disagrees with the header {w}x{h}")
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)   # (C, H, W)
    if arr.shape[0] != CHANNELS[domain]:
        raise TaskonomyFormatError(f"{path}: {arr.shape[0]} channels, expected {CHANNELS[domain]}")
    if domain == "segment_semantic" and arr.max() >= NUM_SEG_CLASSES:
        raise TaskonomyFormatError(f"{path}: class id {int(arr.max())} out of range 0..{NUM_SEG_CLASSES - 1}")
    return np.ascontiguousarray(arr)


def resize_map(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(C, H, W) uint8/uint16 → (C, size, size), same dtype.

    bilinear: antialiased (PIL-style triangle filter, what the reference's PIL resize did),
    computed in float32 and rounded half-to-even; nearest: the source pixel under the output
    pixel's centre (class ids stay class ids)."""
    if arr.shape[-1] == size and arr.shape[-2] == size:
        return arr
    x = torch.from_numpy(arr.astype(np.float32))[None]              # (1, C, H, W)
    if mode == "bilinear":
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    elif mode == "nearest":
        y = F.interpolate(x, size=(size, size), mode="nearest-exact")
    else:
        raise ValueError(f"resize mode must be bilinear|nearest, got {mode!r}")
    hi = float(np.iinfo(arr.dtype).max)
    return y[0].round().clamp_(0, hi).numpy().astype(arr.dtype)


def resize_mode(domain: str, seg_resize: str) -> str:
    return seg_resize if domain == "segment_semantic" else "bilinear"


# ----------------------------------------------------------------------------------------------
# prepare: raw PNGs → memory-mappable .npy per split
# ----------------------------------------------------------------------------------------------
def _convert_chunk(job) -> int:
    """Worker: decode + resize samples [start, start + len(paths)) into the split's .npy files."""
    tmp, start, paths, side, size, seg_resize, domains = job
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the pool is the parallelism; avoid oversubscribing cores
    try:
        arrays = {d: np.load(Path(tmp) / f"{d}.npy", mmap_mode="r+") for d in domains}
        for j, sample in enumerate(paths):
            for d in domains:
                a = load_domain(sample[d], d, side)
                arrays[d][start + j] = resize_map(a, size, resize_mode(d, seg_resize))
        for a in arrays.values():
            a.flush()
    finally:
        torch.set_num_threads(threads)   # matters when called in the caller's process (workers=1)
    return len(paths)


def _samples_digest(samples) -> str:
    return hashlib.sha1(json.dumps(samples).encode()).hexdigest()


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


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


def prepare(root: str | Path, out: str | Path, image_size: int = 256, *, split_file: str | Path | None = None,
            seg_resize: str = "nearest", domains: tuple[str, ...] | list[str] = DOMAINS,
            splits: tuple[str, ...] = SPLITS, limits: dict[str, int] | None = None, workers: int = 0,
            progress: bool = True) -> Path:
    """Convert a raw Taskonomy root into the prepared format at ``out`` (see the module doc).

    Each split is written into ``OUT/.<split>.tmp-<pid>/`` and renamed to ``OUT/<split>/`` when
    complete, so an interrupted run leaves no half-written split; a re-run skips the splits
    already done (and refuses, naming the setting, to reuse a split prepared differently).
    ``limits[split] = n`` keeps only the first n samples (sorted by building, point, view) — for
    quick runs. Returns ``out``."""
    from tqdm import tqdm
    root, out = Path(root), Path(out)
    if image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 (the networks downsample 16x), got {image_size}")
    if seg_resize not in ("nearest", "bilinear"):
        raise ValueError(f"seg_resize must be nearest|bilinear, got {seg_resize!r}")
    bad = set(domains) - set(DOMAINS)
    if bad:
        raise ValueError(f"unknown domain(s) {sorted(bad)}; known: {', '.join(DOMAINS)}")
    domains = tuple(d for d in DOMAINS if d in set(domains) | {"rgb"})   # canonical order, rgb always
    limits = limits or {}
    split = load_split(split_file)
    layout = detect_layout(root)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"format": FORMAT, "version": FORMAT_VERSION, "layout": layout, "image_size": image_size,
                "seg_resize": seg_resize, "domains": list(domains)}
    index = dict(settings, source_root=str(root.resolve()),
                 split_source=str(Path(split_file).resolve()) if split_file else "tiny", splits={})
    for s in splits:
        samples = index_samples(root, layout, split[s], domains)
        if limits.get(s):
            samples = samples[:limits[s]]
        sample_list = [[b, p, v] for b, p, v in samples]
        digest = _samples_digest(sample_list)
        final = out / s
        meta_path = final / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            for key in ("format", "version", "image_size", "seg_resize", "domains"):
                if meta.get(key) != settings[key]:
                    raise TaskonomyFormatError(
                        f"{meta_path}: split {s!r} was prepared with {key}={meta.get(key)!r}, this run asks for "
                        f"{settings[key]!r}; prepare into another folder (or delete {final})")
            if meta.get("samples_sha1") != digest:
                raise TaskonomyFormatError(
                    f"{meta_path}: split {s!r} was prepared from a different list of samples "
                    f"({meta.get('count')} then, {len(samples)} now: files added/removed, or another "
                    f"split file / limit); prepare into another folder (or delete {final})")
            index["splits"][s] = {"count": meta["count"], "buildings": meta["buildings"],
                                  "source_side": meta["source_side"], "samples": meta["samples"]}
            continue
        if final.exists():
            raise TaskonomyFormatError(f"{final}: exists without meta.json (not written by prepare); "
                                       "remove it or prepare into another folder")
        _remove_stale_tmp(out, s)
        # the first rgb file fixes the source resolution; every other file must match it
        b0, p0, v0 = samples[0]
        w0, h0, _, _ = png_header(domain_dir(root, layout, "rgb", b0) / file_name("rgb", p0, v0))
        if w0 != h0:
            raise TaskonomyFormatError(f"{domain_dir(root, layout, 'rgb', b0) / file_name('rgb', p0, v0)}: "
                                       f"image is {w0}x{h0}; Taskonomy images are square")
        if w0 < image_size:
            raise TaskonomyFormatError(f"{domain_dir(root, layout, 'rgb', b0) / file_name('rgb', p0, v0)}: "
                                       f"source images are {w0}x{h0}, smaller than image_size {image_size}")
        tmp = out / f".{s}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        m = len(samples)
        for d in domains:   # allocate the full arrays up front; workers fill disjoint rows
            np.lib.format.open_memmap(tmp / f"{d}.npy", mode="w+", dtype=DTYPE[d],
                                      shape=(m, CHANNELS[d], image_size, image_size)).flush()
        paths = [{d: str(domain_dir(root, layout, d, b) / file_name(d, p, v)) for d in domains}
                 for b, p, v in samples]
        chunk = 64
        jobs = [(str(tmp), i, paths[i:i + chunk], w0, image_size, seg_resize, domains)
                for i in range(0, m, chunk)]
        n_workers = workers or min(8, os.cpu_count() or 1)
        bar = tqdm(total=m, desc=f"prepare taskonomy/{s} -> {out}", unit="img", disable=not progress)
        try:
            if n_workers <= 1 or len(jobs) <= 1:
                for job in jobs:
                    bar.update(_convert_chunk(job))
            else:
                with ProcessPoolExecutor(n_workers) as ex:
                    for n in ex.map(_convert_chunk, jobs):
                        bar.update(n)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)   # a partial split can be very large: don't leave it
            raise
        finally:
            bar.close()
        meta = dict(settings, split=s, count=m, buildings=sorted({b for b, _, _ in samples}),
                    source_side=w0, samples_sha1=digest, samples=sample_list)
        _atomic_write_json(tmp / "meta.json", meta)
        os.replace(tmp, final)   # the split appears complete or not at all
        index["splits"][s] = {"count": m, "buildings": meta["buildings"], "source_side": w0, "samples": sample_list}
    _atomic_write_json(out / "index.json", index)
    return out


def prepare_main(argv: list[str] | None = None) -> int:
    """``fastdmtg prepare taskonomy ROOT OUT [options]``."""
    ap = argparse.ArgumentParser(prog="fastdmtg prepare taskonomy",
                                 description="Convert a raw Taskonomy root into fastdmtg's memory-mapped format.")
    ap.add_argument("root", help="raw Taskonomy root (ROOT/<domain>/<building>/ or ROOT/<building>/<domain>/)")
    ap.add_argument("out", help="output folder (index.json + <split>/*.npy)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--split-file", default=None, help='JSON {"train": [...], "val": [...], "test": [...]}; default: tiny split')
    ap.add_argument("--seg-resize", choices=("nearest", "bilinear"), default="nearest",
                    help="bilinear reproduces the reference's interpolation of class ids (a bug)")
    ap.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset (rgb is always included)")
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--limit-train", type=int, default=0, help="keep the first n training samples")
    ap.add_argument("--limit-eval", type=int, default=0, help="keep the first n val and test samples")
    ap.add_argument("--workers", type=int, default=0, help="decode processes (default: min(8, cores))")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        prepare(a.root, a.out, a.image_size, split_file=a.split_file, seg_resize=a.seg_resize,
                domains=tuple(x for x in a.domains.split(",") if x), splits=tuple(x for x in a.splits.split(",") if x),
                limits={"train": a.limit_train, "val": a.limit_eval, "test": a.limit_eval},
                workers=a.workers, progress=not a.no_progress)
    except (TaskonomyFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------
# Reading a prepared folder
# ----------------------------------------------------------------------------------------------
def read_index(folder: str | Path) -> dict:
    path = Path(folder) / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise TaskonomyFormatError(f"{path}: missing (not a prepared Taskonomy folder)") from None
    except json.JSONDecodeError as e:
        raise TaskonomyFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if index.get("format") != FORMAT:
        raise TaskonomyFormatError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    if index.get("version") != FORMAT_VERSION:
        raise TaskonomyFormatError(f"{path}: format version {index.get('version')}, this fastdmtg reads "
                                   f"version {FORMAT_VERSION}; re-run prepare")
    return index


def flip_flags(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) bool: whether the sample at epoch position j is flipped. A generator of its own keyed
    by (seed, epoch), so a resumed epoch (skip) sees the same flips as an uninterrupted one."""
    key = int.from_bytes(hashlib.sha256(f"taskonomy-flip:{seed}:{epoch}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(key & ((1 << 63) - 1))
    return torch.rand(n, generator=g) < 0.5


class _SplitArrays:
    """The .npy files of one split, memory-mapped lazily (in each DataLoader worker separately:
    a pickled np.memmap would copy the data)."""

    def __init__(self, folder: Path, domains: tuple[str, ...], count: int):
        self.folder, self.domains, self.count = folder, domains, count
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self):
        return {"folder": self.folder, "domains": self.domains, "count": self.count, "_arrays": None}

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrs = {}
            for d in self.domains:
                p = self.folder / f"{d}.npy"
                try:
                    a = np.load(p, mmap_mode="r")
                except FileNotFoundError:
                    raise TaskonomyFormatError(f"{p}: missing (prepared folder incomplete)") from None
                if a.dtype != DTYPE[d] or a.ndim != 4 or a.shape[1] != CHANNELS[d] or a.shape[0] < self.count:
                    raise TaskonomyFormatError(f"{p}: shape {a.shape} {a.dtype}, expected "
                                               f"({self.count}, {CHANNELS[d]}, S, S) {np.dtype(DTYPE[d])}")
                arrs[d] = a
            self._arrays = arrs
        return self._arrays

    def gather(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of every domain as CPU tensors (16-bit maps bit-cast to int16: torch moves
        and converts int16 everywhere; the device code undoes the sign)."""
        order = np.argsort(idx, kind="stable")
        srt = idx[order]                       # ascending reads: friendlier to the page cache
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        out = {}
        for d, a in self.arrays().items():
            rows = np.ascontiguousarray(a[srt][inv])
            if rows.dtype == np.uint16:
                rows = rows.view(np.int16)
            out[d] = torch.from_numpy(rows)
        return out


class _BatchReader(torch.utils.data.Dataset):
    """Map-style dataset whose item b is the whole batch b (DataLoader with batch_size=None)."""

    def __init__(self, arrays: _SplitArrays, batches: list[np.ndarray]):
        self.arrays, self.batches = arrays, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        return self.arrays.gather(self.batches[b])


def _flip(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    f = flags.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(f, x.flip(-1), x)


def _u16(x: torch.Tensor) -> torch.Tensor:
    """int16 bit-cast of uint16 → the uint16 value as float32."""
    return (x.to(torch.int32) & 0xFFFF).to(torch.float32)


def make_batch(raw: dict[str, torch.Tensor], task_names: list[str], flags: torch.Tensor | None) -> dict:
    """Raw stored maps (on the device) → the normalised batch dict; ``flags`` (B,) bool on the
    same device, which samples to flip (None: no flips — the caller decides on the host, so
    there is no device sync here)."""
    if flags is not None:
        raw = {d: _flip(x, flags) for d, x in raw.items()}           # flips commute with the pointwise maps
    image = raw["rgb"].to(torch.float32).div_(255.0)                     # (B, 3, S, S)
    b, _, s, _ = image.shape
    if "depth_zbuffer" in raw:
        depth_raw = _u16(raw["depth_zbuffer"])                             # (B, 1, S, S)
        mask = depth_raw < DEPTH_VALID_BELOW
    else:
        depth_raw, mask = None, torch.ones(b, 1, s, s, dtype=torch.bool, device=image.device)
    targets = {}
    for t in task_names:
        if t == "depth_zbuffer":
            off, sc = NORM_16BIT[t]
            targets[t] = (depth_raw - off) / sc                            # (B, 1, S, S)
        elif t in ("keypoints2d", "edge_texture"):
            off, sc = NORM_16BIT[t]
            targets[t] = (_u16(raw[t]) - off) / sc                         # (B, 1, S, S)
        elif t == "normal":
            n = (raw[t].to(torch.float32) / 255.0 - 0.5) * 2.0            # (B, 3, S, S)
            if flags is not None:
                sign = torch.ones(b, 3, 1, 1, device=n.device)
                sign[:, 0] = torch.where(flags, -1.0, 1.0).view(b, 1, 1)   # mirrored: x component flips
                n = n * sign
            targets[t] = n
        elif t == "segment_semantic":
            targets[t] = raw[t][:, 0].to(torch.int64)                       # (B, S, S)
        else:
            raise ValueError(f"unknown Taskonomy task {t!r}")
    return {"image": image, "targets": targets, "mask": mask}


class TaskonomySource(DataSource):
    """Batches from a prepared folder: memory-mapped reads (optionally in DataLoader worker
    processes), transfer of the compact raw maps, normalisation + flip on the device."""

    def __init__(self, folder: str | Path, taskset, image_size: int | None = None,
                 limits: dict[str, int] | None = None, num_workers: int = 0, seg_resize: str | None = None):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.taskset = taskset
        self.image_size = int(self.index["image_size"])
        if image_size is not None and image_size != self.image_size:
            raise TaskonomyFormatError(f"{self.folder / 'index.json'}: prepared at image_size {self.image_size}, "
                                       f"the config asks for {image_size} (data.image_size); prepare again at that size")
        if seg_resize is not None and seg_resize != self.index["seg_resize"]:
            raise TaskonomyFormatError(f"{self.folder / 'index.json'}: segmentation resized with "
                                       f"{self.index['seg_resize']!r}, the config asks for {seg_resize!r} "
                                       "(data.taskonomy_seg_resize); prepare again")
        self.task_names = list(taskset.names)
        need = needed_domains(self.task_names)
        missing = [d for d in need if d not in self.index["domains"]]
        if missing:
            raise TaskonomyFormatError(f"{self.folder / 'index.json'}: prepared without domain(s) {missing} "
                                       f"that tasks {self.task_names} need; prepare them too")
        self.domains = need
        limits = limits or {}
        self.num_workers = num_workers
        self._splits: dict[str, _SplitArrays] = {}
        for s in SPLITS:
            if s not in self.index["splits"]:
                raise TaskonomyFormatError(f"{self.folder / 'index.json'}: split {s!r} was not prepared")
            count = int(self.index["splits"][s]["count"])
            if limits.get(s):
                count = min(count, int(limits[s]))
            self._splits[s] = _SplitArrays(self.folder / s, need, count)

    def num_samples(self, split: str) -> int:
        return self._splits[split].count

    def sample_ids(self, split: str) -> list[tuple[str, int, int]]:
        """(building, point, view) of each sample of ``split``, in index order."""
        return [tuple(x) for x in self.index["splits"][split]["samples"][:self.num_samples(split)]]

    def batches(self, split, batch_size, *, shuffle, seed=0, epoch=0, device="cpu", skip=0, train=False
                ) -> Iterator[dict]:
        device = torch.device(device)
        arrays = self._splits[split]
        n = arrays.count
        order = (epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)).numpy()
        flips = flip_flags(n, seed, epoch) if train else None
        nb = num_batches(n, batch_size, train)
        spans = [(b * batch_size, min(n, (b + 1) * batch_size)) for b in range(skip, nb)]
        reader = _BatchReader(arrays, [order[a:z] for a, z in spans])
        if self.num_workers > 0 and len(reader) > 1:
            it = iter(torch.utils.data.DataLoader(reader, batch_size=None, shuffle=False,
                                                  num_workers=self.num_workers,
                                                  pin_memory=device.type == "cuda", prefetch_factor=4))
        else:
            it = (reader[i] for i in range(len(reader)))
        for (a, z), raw in zip(spans, it):
            raw = {d: x.to(device, non_blocking=True) for d, x in raw.items()}
            f = flips[a:z] if flips is not None else None                 # host-side flags: no sync
            flags = f.to(device, non_blocking=True) if f is not None and bool(f.any()) else None
            yield make_batch(raw, self.task_names, flags)


def needed_domains(task_names: list[str]) -> tuple[str, ...]:
    """rgb + each task's domain + depth when a masked loss (depth or normal) needs its mask."""
    need = {"rgb"} | {TASK_DOMAIN[t] for t in task_names}
    if need & {"depth_zbuffer", "normal"}:
        need.add("depth_zbuffer")
    return tuple(d for d in DOMAINS if d in need)


def _cache_folder(cfg, root: Path, domains: tuple[str, ...], limits: dict[str, int]) -> Path:
    key_src = json.dumps({"root": str(root.resolve()), "split": load_split(cfg.taskonomy_split_file),
                          "size": cfg.image_size, "seg": cfg.taskonomy_seg_resize, "domains": domains,
                          "limits": limits}, sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    if cfg.cache_dir:
        base = Path(cfg.cache_dir)
    elif os.access(root, os.W_OK):
        base = root / ".fastdmtg_cache"           # next to the data: a full prepare is large
    else:
        base = Path.home() / ".cache" / "fastdmtg"
    return base / f"taskonomy_{cfg.image_size}_{key}"


def build_source(cfg, progress: bool = True) -> TaskonomySource:
    """DataSource for ``cfg`` (a DataConfig). ``cfg.root`` is either a prepared folder (has
    index.json) or a raw Taskonomy root, which is prepared into a cache folder first (once)."""
    from ..config import TASKONOMY_5
    from ..tasks.taskonomy import TaskonomyTaskSet
    if not cfg.root:
        raise ValueError("data.root: the taskonomy dataset needs its folder (--data-root PATH): a raw "
                         "Taskonomy root or a folder made by `fastdmtg prepare taskonomy`")
    names = cfg.task_names() or list(TASKONOMY_5)
    taskset = TaskonomyTaskSet.from_config(names, cfg)
    limits = {"train": cfg.limit_train, "val": cfg.limit_eval, "test": cfg.limit_eval}
    root = Path(cfg.root)
    if (root / "index.json").is_file():
        folder = root
    else:
        domains = needed_domains(names)
        # a limited quick run prepares only what it uses (its own cache folder)
        folder = _cache_folder(cfg, root, domains, {k: v for k, v in limits.items() if v})
        if not (folder / "index.json").is_file() or any(not (folder / s / "meta.json").is_file() for s in SPLITS):
            prepare(root, folder, cfg.image_size, split_file=cfg.taskonomy_split_file or None,
                    seg_resize=cfg.taskonomy_seg_resize, domains=domains, limits=limits, progress=progress)
    return TaskonomySource(folder, taskset, cfg.image_size, limits,
                           num_workers=int(getattr(cfg, "num_workers", 0)), seg_resize=cfg.taskonomy_seg_resize)


__all__ = ["prepare", "prepare_main", "build_source", "TaskonomySource", "TaskonomyFormatError", "load_domain",
           "resize_map", "detect_layout", "index_samples", "load_split", "flip_flags", "make_batch",
           "needed_domains", "read_index", "TINY_SPLIT", "DOMAINS"]
