"""Synthetic data for tests and benchmarks: random arrays in a dataset's exact shapes and dtypes, and
raw folders in the official formats (CelebA JPEGs, Taskonomy PNGs) for the file-decoding sources.
Importable from an installed package (``fastdmtg bench step`` and tests/ use it); nothing here is
used by training.

    synthetic_celeba(cfg, n)        ArrayDataset of n random CelebA-shaped samples (every split)
    synthetic_taskonomy(cfg, n)     TaskonomyDataset of n random raw maps (every split)
    write_celeba_raw(root, n)       an official-format CelebA folder of n random 178×218 JPEGs
    write_taskonomy_raw(root, n, s) an official-format Taskonomy root + split file
    bench_data(cfg)                 how the benchmarks run cfg's dataset format (its ``BenchData``)
    train_images(cfg, given)        the training-set size the benchmarks project hours from
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config


def _synthetic_celeba(n: int, n_tasks: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n, n_tasks), generator=g)
    return images, labels


def write_celeba_raw(root: str | Path, n: int) -> None:
    """A CelebA folder in the official format with n random 178×218 JPEGs (for the DataLoader row)."""
    import numpy as np
    from PIL import Image

    from .data.celeba import CELEBA_40
    root = Path(root)
    rng = np.random.default_rng(0)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    base = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        Image.fromarray(np.roll(base, i, axis=1)).save(root / "img_align_celeba" / f, quality=90)
    lab = rng.choice([-1, 1], size=(n, 40))
    (root / "list_attr_celeba.txt").write_text(
        f"{n}\n{' '.join(CELEBA_40)}\n" + "".join(f + "".join(f"{v:>3d}" for v in r) + "\n" for f, r in zip(files, lab)))
    # all training but the last two (one val, one test: a dataset's splits may not be empty)
    parts = [0] * max(n - 2, 0) + [1, 2][:min(n, 2)]
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, parts)))


# ------------------------------------------------------------------------------------- Taskonomy
#: plausible raw value ranges [lo, hi] of the stored maps (see fastdmtg/data/taskonomy.py); depth
#: also gets "no depth" pixels (65535, left out by the mask) — the values do not change a step's speed
_TX_RANGE = {"rgb": (0, 255), "depth_zbuffer": (0, 12000), "normal": (0, 255), "segment_semantic": (0, 17),
             "keypoints2d": (0, 300), "edge_texture": (0, 4000)}
_NO_DEPTH = 65535
_TX_TRAIN_BUILDING, _TX_HELDOUT_BUILDING = "benchtrain", "benchheldout"
TASKONOMY_SPLIT_FILE = "split.json"      # written inside the raw root by write_taskonomy_raw


def _taskonomy_maps(rng, domain: str, n: int, size: int):
    """(n, C, size, size) random raw maps of one domain, in its stored dtype and plausible range."""
    import numpy as np

    from .data import taskonomy as tx
    lo, hi = _TX_RANGE[domain]
    a = rng.integers(lo, hi + 1, size=(n, tx.CHANNELS[domain], size, size), dtype=tx.DTYPE[domain])
    if domain == "depth_zbuffer":
        a[rng.random(a.shape, dtype=np.float32) < 0.1] = _NO_DEPTH
    return a


def synthetic_taskonomy(cfg: Config, n: int, seed: int = 0):
    """A ``TaskonomyDataset`` of ``n`` random samples in memory (the same arrays for every split):
    {domain: (n, C, S, S) uint8 | uint16} in the prepared format's dtypes — served by the trainer's
    sources exactly like a prepared folder (values aside)."""
    import numpy as np

    from .data import taskonomy as tx
    d = cfg.data
    names = d.task_names() or list(tx.TASKONOMY_5)
    rng = np.random.default_rng(seed)
    arrays = {dom: _taskonomy_maps(rng, dom, n, d.image_size) for dom in tx.needed_domains(names)}
    return tx.TaskonomyDataset.from_arrays({s: arrays for s in ("train", "val", "test")}, names, d.image_size,
                                           rotate_loss=d.taskonomy_rotate_loss, miou=d.taskonomy_miou)


def synthetic_celeba(cfg: Config, n: int, seed: int = 0):
    """An ``ArrayDataset`` of ``n`` random CelebA-shaped samples (uint8 S×S images, 0/1 labels of the
    recipe's tasks), the same arrays for every split."""
    from .data import ArrayDataset, image_label_fields, task_specs, taskset_for
    names = [s.name for s in task_specs(cfg)]
    x, y = _synthetic_celeba(n, len(names), cfg.data.image_size, seed)
    arrays = {"image": x.numpy(), "labels": y.to(torch.uint8).numpy()}
    return ArrayDataset("celeba-shaped", {s: arrays for s in ("train", "val", "test")},
                        image_label_fields(cfg.data.image_size, len(names)), taskset_for(cfg, names), cfg.data.image_size)


def _smooth_map(rng, domain: str, side: int):
    """One photo-like raw map (C, side, side): a smooth random field plus 2 % noise (so the PNGs
    compress and decode like real images, not like white noise); depth with "no depth" holes."""
    import numpy as np
    import torch.nn.functional as F

    from .data import taskonomy as tx
    lo, hi = _TX_RANGE[domain]
    c = tx.CHANNELS[domain]

    def field(ch):
        low = torch.from_numpy(rng.random((1, ch, 16, 16), dtype=np.float32))
        return F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)[0].numpy()
    v = lo + (hi - lo) * field(c) + rng.normal(0.0, 0.02 * (hi - lo), (c, side, side))
    a = np.clip(np.rint(v), lo, hi).astype(tx.DTYPE[domain])
    if domain == "depth_zbuffer":
        a[field(1) < 0.1] = _NO_DEPTH
    return a


def write_taskonomy_raw(root: str | Path, n: int, side: int, *, variants: int = 8, seed: int = 0) -> Path:
    """A Taskonomy root in the official format (``ROOT/<domain>/<building>/point_<p>_view_0_domain_
    <suffix>.png``, every domain of ``data.taskonomy.DOMAINS`` at its real PNG bit depth: rgb/normal
    8-bit RGB, segmentation 8-bit grayscale ids 0..17, depth/keypoints/edges 16-bit grayscale), with
    ``n`` training samples in one building and one held-out sample (val = test) in another, all
    side×side, plus ``ROOT/split.json`` naming the two buildings (``data.taskonomy_split_file``).
    Returns the split file. ``variants`` distinct maps per domain are encoded and reused cyclically
    (decode cost does not depend on which file it is; encoding thousands of 512² PNGs would dominate
    the benchmark)."""
    import io

    import numpy as np
    from PIL import Image

    from .data import taskonomy as tx
    root = Path(root)
    rng = np.random.default_rng(seed)
    count = {_TX_TRAIN_BUILDING: n, _TX_HELDOUT_BUILDING: 1}
    for domain in tx.DOMAINS:
        blobs = []
        for _ in range(min(variants, n + 1)):
            a = _smooth_map(rng, domain, side)
            a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)     # (H, W) gray or (H, W, 3) RGB
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")  # uint16 2-D -> 16-bit gray
            blobs.append(buf.getvalue())
        j = 0
        for building, m in count.items():
            folder = tx.domain_dir(root, tx.LAYOUT_DOMAIN_FIRST, domain, building)
            folder.mkdir(parents=True, exist_ok=True)
            for p in range(m):
                (folder / tx.file_name(domain, p, 0)).write_bytes(blobs[j % len(blobs)])
                j += 1
    split = root / TASKONOMY_SPLIT_FILE
    split.write_text(json.dumps({"train": [_TX_TRAIN_BUILDING], "val": [_TX_HELDOUT_BUILDING],
                                 "test": [_TX_HELDOUT_BUILDING]}))
    return split


# ------------------------------------------------------------------------------------- benchmarks
def bench_data(cfg: Config):
    """The ``BenchData`` of ``cfg``'s dataset format (``DatasetFormat.bench``, handed this module and the
    config module); a format without one is a ValueError naming it."""
    import sys

    from . import config
    from .data import get_format
    fmt = get_format(cfg.data.dataset)
    if fmt.bench is None:
        raise ValueError(f"data.dataset={cfg.data.dataset}: the benchmarks have no synthetic data for this format")
    return fmt.bench(sys.modules[__name__], config)


def train_images(cfg: Config, given: int) -> tuple[int | None, str]:
    """(training-set size, how the header states it) for the projected hours; None: unknown (the text
    says why). ``given``: --train-images (0: the format's figure)."""
    epochs = cfg.train.epochs
    if given:
        return given, f"{epochs} epochs × {given:,} train images (--train-images) / throughput (training steps only)"
    n, what = bench_data(cfg).train_images(cfg)
    if n is None:
        return None, what
    return n, f"{epochs} epochs × {n:,} {what} train images / throughput (training steps only)"
