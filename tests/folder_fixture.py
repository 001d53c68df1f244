"""Writes small folder datasets (DIR/labels.csv + images) for the tests of your-own-tasks."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def write_folder(root: Path, header: list[str], rows: list[list], images: dict[str, np.ndarray] | None = None,
                 tasks_json: dict | None = None, size: int = 8, seed: int = 0) -> Path:
    """labels.csv with ``header`` and ``rows`` (cells as given; None → empty); every file named in the
    image column is written as a PNG (``images[name]`` (H, W, 3) uint8, else random)."""
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    col = header.index("image") if "image" in header else None
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if c is None else c for c in r])
    if col is not None:
        for r in rows:
            name = r[col]
            p = root / name
            if p.exists() or not name:
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            arr = images.get(name) if images else None
            if arr is None:
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(p)
    if tasks_json is not None:
        (root / "tasks.json").write_text(json.dumps(tasks_json))
    return root


def mixed_folder(root: Path, n: int = 12, size: int = 8, seed: int = 0, tasks_json: dict | None = None) -> Path:
    """One task of each type plus missing cells: ``smile`` binary (no/yes), ``hair`` multiclass
    (0..2), ``age`` regression; splits train/val/test = n/2, n/4, rest."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        split = "train" if i < n // 2 else ("val" if i < n // 2 + n // 4 else "test")
        smile = ["no", "yes"][i % 2]
        hair = str(i % 3)
        age = f"{20 + 3.5 * i + rng.normal():.3f}"
        if i % 5 == 4:
            smile = None                    # missing cells
        if i % 7 == 6:
            age = None
        rows.append([f"img/{i:03d}.png", split, smile, hair, age])
    return write_folder(root, ["image", "split", "smile", "hair", "age"], rows, size=size, seed=seed,
                        tasks_json=tasks_json)


def planted_folder(root: Path, n_train: int = 1200, n_eval: int = 200, size: int = 16, seed: int = 0) -> Path:
    """A folder whose 6 tasks form 3 planted groups (as the embedded synthetic set: latent a_g lives in
    colour channel g): group 0 = binary g0_bin + multiclass g0_cls, group 1 = binary g1_bin + regression
    g1_reg, group 2 = regression g2_reg + binary g2_bin. Some cells empty. Images as PNG (lossless)."""
    import torch

    from fastdmtg.data.synthetic import ALPHA, SIGMA, envelope
    gen = torch.Generator().manual_seed(seed)
    n = n_train + 2 * n_eval
    a = torch.randn(n, 3, generator=gen)
    x = (0.5 + ALPHA * a[:, :, None, None] * envelope(size) + SIGMA * torch.randn(n, 3, size, size, generator=gen))
    imgs = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    a = a.numpy()
    header = ["image", "split", "g0_bin", "g1_bin", "g2_reg", "g0_cls", "g1_reg", "g2_bin"]
    rows, images = [], {}
    miss = np.random.default_rng(seed).random((n, 6)) < 0.05
    for i in range(n):
        split = "train" if i < n_train else ("val" if i < n_train + n_eval else "test")
        cls = int(np.digitize(a[i, 0], [-0.5, 0.5]))
        cells = [int(a[i, 0] > 0), int(a[i, 1] > 0.2), f"{a[i, 2]:.4f}", cls, f"{2 * a[i, 1] + 5:.4f}",
                 ["low", "high"][int(a[i, 2] > -0.2)]]
        cells = [None if miss[i, j] else c for j, c in enumerate(cells)]
        name = f"im/{i:05d}.png"
        images[name] = imgs[i]
        rows.append([name, split] + cells)
    return write_folder(root, header, rows, images=images)


PLANTED_GROUPS = [{"g0_bin", "g0_cls"}, {"g1_bin", "g1_reg"}, {"g2_reg", "g2_bin"}]
