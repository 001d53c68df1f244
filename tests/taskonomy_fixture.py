"""Writes tiny Taskonomy-format folders for the tests: the real file names, the real PNG bit depths
(rgb 8-bit RGB, depth/keypoints/edges 16-bit grayscale, normal 8-bit RGB, segmentation 8-bit
grayscale), in either layout, plus a split file naming the fixture's buildings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIX = {"rgb": "rgb", "depth_zbuffer": "depth_zbuffer", "normal": "normal",
          "segment_semantic": "segmentsemantic", "keypoints2d": "keypoints2d", "edge_texture": "edge_texture"}
DOMAINS = tuple(SUFFIX)
SPLIT = {"train": ["alpha", "bravo"], "val": ["charlie"], "test": ["delta"]}


def sample_arrays(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One sample's maps as (H, W) or (H, W, 3) arrays in their file dtype."""
    depth = rng.integers(0, 12000, (size, size)).astype(np.uint16)
    depth[rng.random((size, size)) < 0.1] = 65535          # "no depth" pixels, masked out
    return {
        "rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "depth_zbuffer": depth,
        "normal": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "segment_semantic": rng.integers(0, 18, (size, size)).astype(np.uint8),
        "keypoints2d": rng.integers(0, 300, (size, size)).astype(np.uint16),
        "edge_texture": rng.integers(0, 4000, (size, size)).astype(np.uint16),
    }


def path_of(root: Path, layout: str, domain: str, building: str, point: int, view: int) -> Path:
    name = f"point_{point}_view_{view}_domain_{SUFFIX[domain]}.png"
    if layout == "domain":
        return root / domain / building / name
    return root / building / domain / name


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)   # uint16 2-D → 16-bit gray, uint8 2-D → 8-bit gray, (H, W, 3) → RGB


def write_fixture(root: str | Path, layout: str = "domain", size: int = 32, samples_per_building: int = 3,
                  seed: int = 0, split: dict[str, list[str]] | None = None) -> dict:
    """Write the fixture; returns {"root", "split_file", "arrays": {(building, point, view): {domain: array}}}.

    Sample ids are (point p, view v) = (2j + 1, j % 2), so a lexicographic file sort would differ
    from the numeric one for j >= 5."""
    root = Path(root)
    split = split or SPLIT
    rng = np.random.default_rng(seed)
    arrays = {}
    for building in [b for s in ("train", "val", "test") for b in split[s]]:
        for j in range(samples_per_building):
            p, v = 2 * j + 1, j % 2
            maps = sample_arrays(rng, size)
            for d, a in maps.items():
                write_png(path_of(root, layout, d, building, p, v), a)
            arrays[(building, p, v)] = maps
    split_file = root.parent / f"{root.name}_split.json"
    split_file.write_text(json.dumps(split))
    return {"root": root, "split_file": split_file, "arrays": arrays}
