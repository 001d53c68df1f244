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
import functools
import json
import os
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..methods.dmtg import DMTGConfig
from ..tasks.taskonomy import TaskonomyTaskSet
from . import store
from .base import (SPLITS, BenchData, DataFormatError, Dataset, DatasetFormat, Field, Recipe, files_digest, flip_rows, recipe_fn,
                   u16)

if TYPE_CHECKING:
    from ..config import Config

# the paper's Taskonomy-5 task set (data.tasks=taskonomy5, and "all")
TASKONOMY_5 = ["segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture"]

#: bump when decoding/resizing changes what it computes: prepared folders made before are refused
#: (user folders: re-run prepare) or decoded again (caches)
DECODE_VERSION = 1

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


class TaskonomyFormatError(DataFormatError):
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


def _resample(x: torch.Tensor, size: int, mode: str, bits: int) -> torch.Tensor:
    """(B, C, H, W) float32 → (B, C, size, size) float32, rounded half-to-even and clamped to the
    source bit depth. bilinear: antialiased (PIL-style triangle filter, what the reference's PIL
    resize did); nearest: the source pixel under the output pixel's centre (class ids stay ids)."""
    if mode == "bilinear":
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    elif mode == "nearest":
        y = F.interpolate(x, size=(size, size), mode="nearest-exact")
    else:
        raise ValueError(f"resize mode must be bilinear|nearest, got {mode!r}")
    return y.round_().clamp_(0, (1 << bits) - 1)


def resize_map(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    """One map: (C, H, W) uint8/uint16 → (C, size, size), same dtype (``_resample`` in float32)."""
    if arr.shape[-1] == size and arr.shape[-2] == size:
        return arr
    bits = 8 * arr.dtype.itemsize
    y = _resample(torch.from_numpy(arr.astype(np.float32))[None], size, mode, bits)
    return y[0].numpy().astype(arr.dtype)


def resize_batch(x: torch.Tensor, size: int, mode: str, bits: int) -> torch.Tensor:
    """``resize_map`` batched, on any device: (B, C, H, W) integer (uint8; 16-bit maps as their int16
    bit-cast or int32) → (B, C, size, size) uint8 | int16 bit-cast."""
    if x.shape[-2:] != (size, size):
        xf = u16(x) if bits == 16 else x.to(torch.float32)
        y = _resample(xf, size, mode, bits)
    elif bits == 16 and x.dtype == torch.int16:
        return x
    else:
        y = u16(x) if bits == 16 else x
    if bits == 16:   # back to the int16 bit-cast of the uint16 value (explicit: no reliance on wrap-around)
        v = y.to(torch.int32)
        return torch.where(v >= 32768, v - 65536, v).to(torch.int16)
    return y.to(torch.uint8)


def resize_mode(domain: str, seg_resize: str) -> str:
    return seg_resize if domain == "segment_semantic" else "bilinear"


def check_png_bytes(buf, path: str, domain: str, side: int | None) -> None:
    """The IHDR checks of ``load_domain`` on encoded bytes (for decoders that read files themselves)."""
    head = bytes(buf[:29])
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise TaskonomyFormatError(f"{path}: not a PNG file")
    w, h, depth, colour = struct.unpack(">IIBB", head[16:26])
    want = PNG_TYPE[domain]
    if (depth, colour) != want:
        raise TaskonomyFormatError(f"{path}: expected a {want[0]}-bit {_PNG_COLOUR[want[1]]} PNG for {domain}, "
                                   f"found {depth}-bit {_PNG_COLOUR.get(colour, f'colour type {colour}')}")
    if side is not None and (w != side or h != side):
        raise TaskonomyFormatError(f"{path}: image is {w}x{h}, expected {side}x{side}")


def decode_sample(item: dict[str, str], side: int, size: int, seg_resize: str) -> dict[str, np.ndarray]:
    """The reference decoder of one sample: {domain: (C, size, size) stored dtype}."""
    return {d: resize_map(load_domain(p, d, side), size, resize_mode(d, seg_resize)) for d, p in item.items()}


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def make_batch(raw: dict[str, torch.Tensor], task_names: list[str], flags: torch.Tensor | None) -> dict:
    """Raw stored maps (on the device) → the normalised batch dict; ``flags`` (B,) bool on the
    same device, which samples to flip (None: no flips — the caller decides on the host, so
    there is no device sync here)."""
    raw = {d: x.contiguous() for d, x in raw.items()}                   # NCHW, whatever the loader gave
    if flags is not None:
        raw = {d: flip_rows(x, flags) for d, x in raw.items()}        # flips commute with the pointwise maps
    image = raw["rgb"].to(torch.float32).div_(255.0)                     # (B, 3, S, S)
    b, _, s, _ = image.shape
    if "depth_zbuffer" in raw:
        depth_raw = u16(raw["depth_zbuffer"])                              # (B, 1, S, S)
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
            targets[t] = (u16(raw[t]) - off) / sc                          # (B, 1, S, S)
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


def needed_domains(task_names: list[str]) -> tuple[str, ...]:
    """rgb + each task's domain + depth when a masked loss (depth or normal) needs its mask."""
    need = {"rgb"} | {TASK_DOMAIN[t] for t in task_names}
    if need & {"depth_zbuffer", "normal"}:
        need.add("depth_zbuffer")
    return tuple(d for d in DOMAINS if d in need)


def domain_fields(domains: tuple[str, ...], size: int) -> dict[str, Field]:
    return {d: Field(DTYPE[d], (CHANNELS[d], size, size), "image" if d == "rgb" else "map", "png") for d in domains}


# ----------------------------------------------------------------------------------------------
# The dataset: a raw root, a prepared folder, or arrays in memory
# ----------------------------------------------------------------------------------------------
class TaskonomyDataset(Dataset):
    """Fields: one per domain (``domain_fields``); batch: ``make_batch`` for ``task_names``.

    Made by ``from_raw`` (the PNGs, decoded by ``decode_sample``), ``from_prepared`` (a folder
    written by ``prepare``: memory-mapped arrays) or ``from_arrays`` (in memory, e.g. benchmarks)."""

    name = "taskonomy"
    cache_beside_data = True          # a full decode is large: next to the data by default
    default_flip = True           # the reference flips Taskonomy samples in training

    def __init__(self, task_names: list[str], image_size: int, domains: tuple[str, ...], *, rotate_loss: bool = False,
                 miou: str = "reference", seg_resize: str = "nearest"):
        self.task_names = list(task_names)
        unknown = [t for t in self.task_names if t not in TASK_DOMAIN]
        if unknown:
            raise ValueError(f"data.tasks: unknown Taskonomy task(s) {unknown}; known: {', '.join(TASK_DOMAIN)}")
        self.taskset = TaskonomyTaskSet(self.task_names, rotate_loss=rotate_loss, miou=miou)
        self.image_size, self.seg_resize = image_size, seg_resize
        self.domains = tuple(d for d in DOMAINS if d in set(domains) | set(needed_domains(self.task_names)))
        self.fields = domain_fields(self.domains, image_size)
        self.mode = "?"
        self._arrays: dict[str, dict[str, np.ndarray]] | None = None
        self._samples: dict[str, list[tuple[str, int, int]]] = {}
        self._mapped: dict[str, dict[str, np.ndarray]] = {}
        self._counts: dict[str, int] = {}
        self.folder: Path | None = None
        self.root: Path | None = None

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_raw(cls, root: str | Path, task_names: list[str], image_size: int, *, split_file=None,
                 seg_resize: str = "nearest", domains: tuple[str, ...] = (), limits: dict[str, int] | None = None,
                 rotate_loss: bool = False, miou: str = "reference",
                 splits: tuple[str, ...] = SPLITS) -> "TaskonomyDataset":
        if image_size < 16 or image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (the networks downsample 16x), got {image_size}")
        if seg_resize not in ("nearest", "bilinear"):
            raise ValueError(f"seg_resize must be nearest|bilinear, got {seg_resize!r}")
        bad = set(domains) - set(DOMAINS)
        if bad:
            raise ValueError(f"unknown domain(s) {sorted(bad)}; known: {', '.join(DOMAINS)}")
        ds = cls(task_names, image_size, tuple(domains), rotate_loss=rotate_loss, miou=miou, seg_resize=seg_resize)
        ds.mode, ds.root = "raw", Path(root).resolve()
        root = Path(root)
        if store.is_partial(root):
            raise TaskonomyFormatError(f"{root}: prepare did not finish (no index.json): re-run `{RERUN}`")
        ds.layout = detect_layout(root)
        ds.split = load_split(split_file)
        ds.split_source = str(Path(split_file).resolve()) if split_file else "tiny"
        limits = limits or {}
        for s in splits:
            samples = index_samples(root, ds.layout, ds.split[s], ds.domains)
            if limits.get(s):
                samples = samples[:limits[s]]
            ds._samples[s] = samples
            ds._counts[s] = len(samples)
        first = next(iter(ds._samples.values()))[0]
        rgb0 = domain_dir(root, ds.layout, "rgb", first[0]) / file_name("rgb", first[1], first[2])
        w0, h0, _, _ = png_header(rgb0)
        if w0 != h0:
            raise TaskonomyFormatError(f"{rgb0}: image is {w0}x{h0}; Taskonomy images are square")
        if w0 < image_size:
            raise TaskonomyFormatError(f"{rgb0}: source images are {w0}x{h0}, smaller than image_size {image_size}")
        ds.side = w0
        ds.limits = {s: int(v) for s, v in limits.items() if v}
        ds.decode_one = functools.partial(decode_sample, side=w0, size=image_size, seg_resize=seg_resize)
        return ds

    @classmethod
    def from_prepared(cls, folder: str | Path, task_names: list[str], image_size: int | None = None, *,
                      seg_resize: str | None = None, limits: dict[str, int] | None = None,
                      rotate_loss: bool = False, miou: str = "reference") -> "TaskonomyDataset":
        folder = Path(folder)
        rerun = RERUN
        index = read_index(folder)
        ipath = folder / store.INDEX
        p = index["params"]
        if p.get("decode_version") != DECODE_VERSION:
            raise TaskonomyFormatError(f"{ipath}: decoded by an older fastdmtg (decode version "
                                       f"{p.get('decode_version')}): re-run `{rerun}`")
        if image_size is not None and image_size != p["image_size"]:
            raise TaskonomyFormatError(f"{ipath}: prepared at image_size {p['image_size']}, the config asks for "
                                       f"{image_size} (data.image_size); prepare again at that size")
        if seg_resize is not None and seg_resize != p["seg_resize"]:
            raise TaskonomyFormatError(f"{ipath}: segmentation resized with {p['seg_resize']!r}, the config asks "
                                       f"for {seg_resize!r} (data.taskonomy_seg_resize); prepare again")
        need = needed_domains(task_names)
        missing = [d for d in need if d not in p["domains"]]
        if missing:
            raise TaskonomyFormatError(f"{ipath}: prepared without domain(s) {missing} that tasks {list(task_names)} "
                                       "need; prepare them too")
        ds = cls(task_names, int(p["image_size"]), need, rotate_loss=rotate_loss, miou=miou,
                 seg_resize=p["seg_resize"])
        ds.mode, ds.folder, ds.index = "prepared", folder, index
        ds.limits = {s: int(v) for s, v in (limits or {}).items() if v}
        ds._meta = {}
        for s in SPLITS:
            if s not in index["splits"]:
                raise TaskonomyFormatError(f"{ipath}: split {s!r} was not prepared")
            try:
                meta = store.split_meta(folder, s)
                if meta is None:
                    raise store.Damaged(f"{folder / s / store.META}: missing: prepare did not finish: re-run `{rerun}`")
                if meta != index["splits"][s]:
                    raise store.Damaged(f"{folder / s / store.META}: disagrees with {ipath}: re-run `{rerun}`")
                store.check_split(folder, s, meta)
            except store.StoreError as e:
                raise TaskonomyFormatError(f"{e}; re-run `{rerun}`" if "re-run" not in str(e) else str(e)) from None
            ds._meta[s] = meta
            n = int(meta["count"])
            ds._counts[s] = min(n, ds.limits[s]) if ds.limits.get(s) else n
            ds._samples[s] = [tuple(x) for x in meta["info"].get("samples", [])][:ds._counts[s]]
        return ds

    @classmethod
    def from_arrays(cls, arrays: dict[str, dict[str, np.ndarray]], task_names: list[str], image_size: int, *,
                    rotate_loss: bool = False, miou: str = "reference") -> "TaskonomyDataset":
        """In-memory arrays {split: {domain: (M, C, S, S) stored dtype}} (benchmarks, tests)."""
        ds = cls(task_names, image_size, tuple(next(iter(arrays.values()))), rotate_loss=rotate_loss, miou=miou)
        ds.mode, ds.limits = "arrays", {}
        ds._arrays = {s: {d: arrays[s][d] for d in ds.domains} for s in SPLITS}
        ds._counts = {s: len(arrays[s]["rgb"]) for s in SPLITS}
        return ds

    # -- the Dataset interface ----------------------------------------------------------------
    def num_samples(self, split):
        return self._counts[split]

    def sample_ids(self, split: str) -> list[tuple[str, int, int]]:
        """(building, point, view) of each sample of ``split``, in order (raw roots and prepared folders)."""
        return list(self._samples.get(split, []))

    def arrays(self, split):
        if self.mode == "arrays":
            return self._arrays[split]
        if self.mode == "prepared":
            if split not in self._mapped:
                try:
                    a = store.open_split(self.folder, split, self._meta[split], self.domains)
                except store.StoreError as e:
                    raise TaskonomyFormatError(f"{e}; re-run `{RERUN}`") from None
                n = self._counts[split]
                self._mapped[split] = {d: a[d][:n] for d in self.domains}
            return self._mapped[split]
        return None

    def load_arrays(self, split: str) -> dict[str, np.ndarray]:
        """The arrays read into memory, checksums checked (prepared folders)."""
        if self.mode != "prepared":
            return {k: np.asarray(v) for k, v in self.arrays(split).items()}
        try:
            a = store.open_split(self.folder, split, self._meta[split], self.domains, load=True)
        except store.StoreError as e:
            raise TaskonomyFormatError(f"{e}; re-run `{RERUN}`") from None
        n = self._counts[split]
        return {d: a[d][:n] for d in self.domains}

    def check(self, split: str) -> None:
        if self.mode == "prepared":
            try:
                store.verify_split(self.folder, split, self._meta[split])
            except store.StoreError as e:
                raise TaskonomyFormatError(f"{e}; re-run `{RERUN}`") from None

    def items(self, split):
        if self.mode != "raw":
            return None
        return [{d: str(domain_dir(self.root, self.layout, d, b) / file_name(d, p, v)) for d in self.domains}
                for b, p, v in self._samples[split]]

    def params(self) -> dict:
        return {"image_size": self.image_size, "seg_resize": self.seg_resize, "domains": list(self.domains),
                "decode_version": DECODE_VERSION}

    def cache_id(self) -> dict:
        if self.mode == "raw":
            return {"dataset": self.name, "root": str(self.root), "split": self.split, "params": self.params(),
                    "limits": self.limits}
        if self.mode == "prepared":
            return {"dataset": self.name, "folder": str(self.folder.resolve()), "params": self.params()}
        return {"dataset": self.name, "params": self.params(), "content": {s: self.split_key(s) for s in SPLITS}}

    def split_key(self, split) -> dict:
        n = self._counts[split]
        if self.mode == "raw":
            return {"files": files_digest([p for it in self.items(split) for p in it.values()], self.missing_error),
                    "samples": len(self._samples[split])}
        if self.mode == "prepared":       # the prepared files' checksums identify their content
            return {"crc32": {d: self._meta[split]["fields"][d]["crc32"] for d in self.domains}, "count": n}
        c = 0
        for d in self.domains:
            c = zlib.crc32(np.ascontiguousarray(self._arrays[split][d]).reshape(-1).view(np.uint8), c)
        return {"crc32": f"{c:08x}", "count": n}

    def split_info(self, split) -> dict:
        samples = self._samples.get(split, [])
        return {"buildings": sorted({b for b, _, _ in samples}), "source_side": getattr(self, "side", None),
                "samples": [list(x) for x in samples]}

    def info(self) -> dict:
        return {"layout": getattr(self, "layout", None), "source_root": str(self.root),
                "split_source": getattr(self, "split_source", None)}

    def missing_error(self, path: str) -> TaskonomyFormatError:
        return TaskonomyFormatError(f"{path}: missing")

    def fingerprint(self) -> dict[str, str]:
        """Raw: the split file by content and the file list (names, sizes); prepared: its manifests'
        checksums per split (``split_key``); arrays: their checksums."""
        from .base import file_digest
        out = super().fingerprint()
        if self.mode == "raw":
            src = getattr(self, "split_source", "tiny")
            out = {"split file": "tiny (built in)" if src == "tiny" else file_digest(src), **out}
        return out

    def check_encoded(self, field, buf, path):
        check_png_bytes(buf, path, field, getattr(self, "side", None))

    def resize(self, field, x):
        bits = 16 if DTYPE[field] == np.uint16 else 8
        return resize_batch(x, self.image_size, resize_mode(field, self.seg_resize), bits)

    def to_batch(self, raw, flags):
        return make_batch(raw, self.task_names, flags)


# ----------------------------------------------------------------------------------------------
# prepare: raw PNGs → a prepared folder (fastdmtg.data.store)
# ----------------------------------------------------------------------------------------------
def prepare(root: str | Path, out: str | Path, image_size: int = 256, *, split_file: str | Path | None = None,
            seg_resize: str = "nearest", domains: tuple[str, ...] | list[str] = DOMAINS,
            splits: tuple[str, ...] = SPLITS, limits: dict[str, int] | None = None, workers: int = 0,
            progress: bool = True) -> Path:
    """Convert a raw Taskonomy root into a prepared folder at ``out`` (``fastdmtg.data.store``):
    per split ``<domain>.npy`` (M, C, S, S) arrays + checksummed manifests, index.json last.

    An interrupted run leaves no half-written split; a re-run keeps the splits already done and
    sound, decodes stale (source files changed) or damaged ones again, and refuses, naming the
    setting, to mix in a split prepared with other settings. ``limits[split] = n`` keeps only the
    first n samples (sorted by building, point, view) — for quick runs. Returns ``out``."""
    domains = tuple(domains) or DOMAINS
    ds = TaskonomyDataset.from_raw(root, [], image_size, split_file=split_file, seg_resize=seg_resize,
                                   domains=tuple(set(domains) | {"rgb"}), limits=limits, splits=tuple(splits))
    try:
        store.materialize(ds, out, splits=tuple(splits), params=ds.params(), info=ds.info(), workers=workers,
                          progress=progress)
    except store.StoreError as e:
        raise TaskonomyFormatError(str(e)) from None
    return Path(out)


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


RERUN = "fastdmtg prepare taskonomy ROOT OUT"


def read_index(folder: str | Path) -> dict:
    """The index.json of a complete prepared Taskonomy folder (``fastdmtg.data.store``)."""
    folder = Path(folder)
    try:
        index = store.read_index(folder, "prepared Taskonomy folder", RERUN)
    except store.StoreError as e:
        raise TaskonomyFormatError(str(e)) from None
    if index.get("dataset") != "taskonomy":
        raise TaskonomyFormatError(f"{folder / store.INDEX}: a prepared {index.get('dataset')!r} folder, not Taskonomy")
    return index


def open_taskonomy(cfg, progress: bool = True) -> TaskonomyDataset:
    """``cfg.root``: a prepared folder (has index.json) or a raw Taskonomy root."""
    if not cfg.root:
        raise TaskonomyFormatError("data.root: the taskonomy dataset needs its folder (--data-root PATH): a raw "
                                   "Taskonomy root or a folder made by `fastdmtg prepare taskonomy`")
    names = cfg.task_names() or list(TASKONOMY_5)
    limits = {"train": cfg.limit_train, "val": cfg.limit_eval, "test": cfg.limit_eval}
    root = Path(cfg.root)
    if (root / store.INDEX).is_file():
        return TaskonomyDataset.from_prepared(root, names, cfg.image_size, seg_resize=cfg.taskonomy_seg_resize,
                                              limits=limits, rotate_loss=cfg.taskonomy_rotate_loss,
                                              miou=cfg.taskonomy_miou)
    return TaskonomyDataset.from_raw(root, names, cfg.image_size, split_file=cfg.taskonomy_split_file or None,
                                     seg_resize=cfg.taskonomy_seg_resize, limits=limits,
                                     rotate_loss=cfg.taskonomy_rotate_loss, miou=cfg.taskonomy_miou)


def taskonomy_taskset(cfg, names: list[str]) -> TaskonomyTaskSet:
    return TaskonomyTaskSet.from_config(names, cfg.data)


def is_taskonomy_root(root: Path) -> bool:
    """Whether ``root`` is a prepared folder (index.json) or a raw root in either layout."""
    if (root / store.INDEX).is_file() or store.is_partial(root):
        return True
    try:
        detect_layout(root)
    except TaskonomyFormatError as e:
        return "mixed layout" in str(e)        # it is Taskonomy: opening it reports the mix
    return True


def taskonomy_known_tasks(cfg) -> list[str]:
    """data.tasks, or Taskonomy-5 for "all"."""
    names = cfg.task_names()
    return list(TASKONOMY_5) if names is None else names


def check_taskonomy(cfg) -> None:
    if cfg.image_size % 16:
        raise ValueError(f"data.image_size: Taskonomy models need a multiple of 16, got {cfg.image_size}")


def resize_like_decoder(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) uint8 → (B, 3, S, S) uint8 as the RGB domain is decoded (bilinear, 8 bits)."""
    return resize_batch(x, size, "bilinear", 8)


def _reference(c, cfg: Config) -> Config:
    """The release's switches (reference_common), its bilinear resize of segmentation ids (a bug, kept
    for reproduction) and its evaluation loss as a mean of per-batch means (the release's Averager) over
    batches of the training batch size (the release's validation batch per process)."""
    c.reference_common(cfg)
    cfg.data.taskonomy_seg_resize = "bilinear"
    cfg.data.taskonomy_eval_loss = "batch_mean"
    cfg.train.eval_batch_size = cfg.train.batch_size     # its validation batch = the training batch per process
    return cfg


def _taskonomy(c, k: int, batch: int, name: str, arch: str = "xception", follows: str = "paper") -> Config:
    """Taskonomy-5 DMTG. Paper §4.1: Adam lr 1e-4, plateau decay ×0.5 on the validation loss, 100
    epochs, τ 4, initialised from the trained naive-MTL model (train.init=naive: pass --init-from).
    Where the paper is silent, the release: plateau patience 3, relative threshold 0.1, floor 3e-5;
    batch 24 per process at K=3 (16 at K=4, 12 at K=5; ViT 20), launched on 2 processes (global batch
    2×, SyncBatchNorm, one shared Gumbel draw per step — the same as one process with the doubled
    batch); validation every 2 epochs and after epoch 1; rotate loss on (every shipped Taskonomy
    config); split after Xception block 4 (ViT: 6 shared layers); 1/√K gradient scaling.
    Reference: Adam lr 1e-3, plateau on the training loss, from scratch."""
    cfg = c.Config(
        name=name,
        data=c.DataConfig(dataset="taskonomy", tasks="taskonomy5", image_size=256, num_workers=8,
                          taskonomy_rotate_loss=True),
        model=c.ModelConfig(arch=arch, branches=k, shared_blocks=6 if arch == "vit_base" else 4,
                            grad_scale="reference"),
        dmtg=DMTGConfig(tau=4.0),
        optim=c.OptimConfig(name="adam", lr=1e-4, schedule="plateau", gamma=0.5, plateau_patience=3,
                            plateau_threshold=0.1, min_lr=3e-5, plateau_on="val"),
        train=c.TrainConfig(epochs=100, batch_size=batch, eval_batch_size=2 * batch, val_every=2, init="naive",
                            amp="off"),          # fp32, as _celeba_cfg
    )
    if follows == "reference":
        cfg.optim.lr = 1e-3
        _reference(c, cfg)
    return cfg


def _taskonomy_naive(c, name: str, arch: str = "xception", follows: str = "paper") -> Config:
    """Taskonomy-5 naive MTL (the NormGain reference and the source of train.init=naive). The paper does
    not describe its training: the release's naive config — SGD lr 0.1 momentum 0.9 weight decay 1e-4,
    ReduceLROnPlateau with PyTorch's defaults (×0.1, patience 10, relative threshold 1e-4) and floor
    3e-5 on the training loss, validation every 10 epochs and after epoch 1, batch 24 per process; the
    same encoder split as the DMTG recipes (so --init-from maps it onto every branch)."""
    cfg = _taskonomy(c, 1, 24, name, arch=arch)
    cfg.grouping.method = "naive-mtl"
    cfg.optim = c.OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="plateau",
                              gamma=0.1, plateau_patience=10, plateau_threshold=1e-4, min_lr=3e-5,
                              plateau_on="train")
    cfg.train.val_every = 10
    cfg.train.init = "scratch"
    return _reference(c, cfg) if follows == "reference" else cfg


#: Table 6 (shared blocks "0/3/6/9" of the paper's "12-block" Xception, K = 3) → model.shared_blocks: the
#: release's ablation configs split at entry p = 0/3/6/9 of its width list (conv1, conv2, blocks…), which is
#: s = p − 2 of our blocks for p ≥ 3 (docs/taskonomy.md §4); p = 0 shares nothing
TABLE6_SHARED_BLOCKS = {0: 0, 3: 1, 6: 4, 9: 7}


def _taskonomy_share(c, label: int, follows: str = "paper") -> Config:
    """Taskonomy-5 DMTG, Xception, K = 3, Table 6's "{label} shared blocks" as the release's
    ``…_3_groups_5_tasks_share_{label}.yaml`` runs it: batch 16 per process (not 24), split at its width-list
    entry {label} (model.shared_blocks = TABLE6_SHARED_BLOCKS[label]); everything else as taskonomy5_k3."""
    cfg = _taskonomy(c, 3, 16, f"taskonomy5_k3_share{label}", follows=follows)
    cfg.model.shared_blocks = TABLE6_SHARED_BLOCKS[label]
    return cfg


def _taskonomy_naive_share(c, label: int, follows: str = "paper") -> Config:
    """The naive-MTL model a Table 6 recipe starts from (train.init=naive) and is measured against:
    taskonomy5_naive with the same encoder split (K = 1 computes the same network whatever the split;
    the split only lays out its parameters so that --init-from maps them onto every branch)."""
    cfg = _taskonomy_naive(c, f"taskonomy5_naive_share{label}")
    cfg.model.shared_blocks = TABLE6_SHARED_BLOCKS[label]
    return _reference(c, cfg) if follows == "reference" else cfg


def _table6_recipes(c, paper: str, naive_ref: str) -> list[Recipe]:
    """Table 6 ablation: taskonomy5_k3_share{0,3,6,9} and their naive twins (+ _reference)."""
    out = []
    for label in TABLE6_SHARED_BLOCKS:
        naive = f"taskonomy5_naive_share{label}"
        out.append(Recipe(naive, recipe_fn(_taskonomy_naive_share, c, label, doc=paper.format(
            f"Taskonomy-5 naive MTL, Xception, split as taskonomy5_k3_share{label}", "_taskonomy_naive_share")),
            "paper"))
        out.append(Recipe(naive + "_reference", recipe_fn(_taskonomy_naive_share, c, label, "reference",
                                                          doc=naive_ref.format(naive)), "reference"))
        what = (f"Taskonomy-5 DMTG, Xception, K=3, Table 6 \"{label} shared blocks\" (batch 16, "
                f"model.shared_blocks={TABLE6_SHARED_BLOCKS[label]})")
        for follows, suffix, doc in (("paper", "", paper.format(what, "_taskonomy_share")),
                                     ("reference", "_reference", f"Reference code as released: {what} (the "
                                                                 "release's schedule and lr; reference_common).")):
            out.append(Recipe(f"taskonomy5_k3_share{label}{suffix}", recipe_fn(_taskonomy_share, c, label, follows,
                                                                                doc=doc),
                              follows, naive=naive + suffix))
    return out


def taskonomy_recipes(c) -> list[Recipe]:
    """Taskonomy-5 with Xception at K = 3, 4, 5 and ViT-Base at K = 3 (paper Tables 1, 2, 5), their
    naive-MTL twins, and each as the release has it (``*_reference``)."""
    paper = "Paper (where explicit; else the release): {}. See {} for the values."
    ref = "Reference code as released: {} (the release's schedule and lr; reference_common)."
    naive_ref = "Reference code as released: {} with the release's values (reference_common)."
    dmtg = {"taskonomy5_k3": (3, 24, "xception", "Taskonomy-5 DMTG, Xception, K=3 (Tables 1, 2)"),
            "taskonomy5_k4": (4, 16, "xception", "Taskonomy-5 DMTG, Xception, K=4"),
            "taskonomy5_k5": (5, 12, "xception", "Taskonomy-5 DMTG, Xception, K=5"),
            "taskonomy5_vit_k3": (3, 20, "vit_base", "Taskonomy-5 DMTG, ViT-Base, K=3 (Table 5; 6 shared layers, "
                                                     "batch 20 as the release's ViT config)")}
    out = []
    for name, (k, batch, arch, text) in dmtg.items():
        naive = "taskonomy5_vit_naive" if arch == "vit_base" else "taskonomy5_naive"
        out.append(Recipe(name, recipe_fn(_taskonomy, c, k, batch, name, arch, doc=paper.format(text, "_taskonomy")),
                          "paper", naive=naive))
        out.append(Recipe(name + "_reference", recipe_fn(_taskonomy, c, k, batch, name, arch, "reference",
                                                         doc=ref.format(name)), "reference",
                          naive=naive + "_reference"))
    for name, arch, pretty in (("taskonomy5_naive", "xception", "Xception"),
                               ("taskonomy5_vit_naive", "vit_base", "ViT-Base")):
        text = f"Taskonomy-5 naive MTL, {pretty} (the paper is silent: the release's values)"
        out.append(Recipe(name, recipe_fn(_taskonomy_naive, c, name, arch, doc=paper.format(text, "_taskonomy_naive")),
                          "paper"))
        out.append(Recipe(name + "_reference", recipe_fn(_taskonomy_naive, c, name, arch, "reference",
                                                         doc=naive_ref.format(name)), "reference"))
    return out + _table6_recipes(c, paper, naive_ref)


#: the reference per-GPU batch of Taskonomy-5 at K (``bench step --scaling`` runs a recipe at these)
SCALING = {3: "taskonomy5_k3", 4: "taskonomy5_k4", 5: "taskonomy5_k5"}


def taskonomy_bench(t, c) -> BenchData:
    """Taskonomy benchmark data (``DatasetFormat.bench``; ``t`` = fastdmtg.testing, ``c`` = the config
    module): random raw maps in the prepared dtypes; the DataLoader row decodes PNGs of twice the
    training side (as the official 512² → 256²)."""
    def scaling(recipe, names):          # the recipe at K = 3/4/5 with the reference batch of each K
        return [(f"{recipe} K={k} (batch {{batch}})",
                 c.evolve(c.get_recipe(recipe), model={"branches": k}, train={"batch_size": c.get_recipe(ref).train.batch_size}))
                for k, ref in SCALING.items()]

    def describe(cfg, names):
        d = cfg.data
        return (f"synthetic Taskonomy {d.image_size}×{d.image_size} raw maps, tasks {', '.join(names)}; resident on the "
                f"device (gpu-cache source: gather, normalise, flip per batch), rotate loss "
                f"{'on' if d.taskonomy_rotate_loss else 'off'}")
    why = ("not computed: the Taskonomy tiny split's training-set size is not recorded in this repository (the DMTG "
           "paper says ≈300k images for train+val+test, the BMTN paper 275k train + 52k val + 54k test); give it "
           "with --train-images N (a prepared folder's index.json has the count)")
    return BenchData(synthetic=t.synthetic_taskonomy, batches=16, raw_per_step=True,
                     write_raw=lambda root, n, size: t.write_taskonomy_raw(root, n, 2 * size),
                     raw_data=lambda root: {"taskonomy_split_file": str(Path(root) / t.TASKONOMY_SPLIT_FILE)},
                     decode="PNG decode + resize", cache="uint8/uint16", train_images=lambda cfg: (None, why),
                     scaling=scaling, describe=describe, paper_line=True)


FORMAT = DatasetFormat("taskonomy", open_taskonomy, taskonomy_taskset,
                       "Taskonomy: a raw root (ROOT/<domain>/<building>/*.png or ROOT/<building>/<domain>/) "
                       "or a folder made by `fastdmtg prepare taskonomy`",
                       detect=is_taskonomy_root, recipe="taskonomy5_k3",
                       looks_for="rgb/<building>/, <building>/rgb/ or a prepared index.json (Taskonomy)",
                       presets={"taskonomy5": TASKONOMY_5}, known_tasks=taskonomy_known_tasks,
                       check=check_taskonomy, resize=resize_like_decoder, recipes=taskonomy_recipes,
                       prepare=prepare_main, bench=taskonomy_bench, image_size=256, order=2)


__all__ = ["TASKONOMY_5", "prepare", "prepare_main", "open_taskonomy", "TaskonomyDataset", "TaskonomyFormatError", "load_domain",
           "resize_map", "resize_batch", "detect_layout", "index_samples", "load_split", "make_batch",
           "needed_domains", "read_index", "TINY_SPLIT", "DOMAINS", "SPLITS"]
