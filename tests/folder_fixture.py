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


def planted_folder(root: Path, n_train: int = 1200, n_eval: int = 150, size: int = 16, seed: int = 1) -> Path:
    """The demo folder of the README (``fastdmtg.data.folder.write_demo``): 6 tasks of mixed types in
    3 planted groups, some cells empty."""
    from fastdmtg.data.folder import write_demo
    return write_demo(root, n_train=n_train, n_eval=n_eval, size=size, seed=seed)


from fastdmtg.data.folder import DEMO_GROUPS as PLANTED_GROUPS  # noqa: E402,F401
