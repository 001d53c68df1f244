"""Writes a tiny CelebA folder in the official release format (used by the tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastdmtg.data.celeba import CELEBA_40


def write_celeba(root: Path, n: int = 24, seed: int = 0, names: list[str] = CELEBA_40,
                 splits: list[int] | None = None) -> tuple[list[str], np.ndarray]:
    """n aligned 178×218 JPEGs, the attribute file with the official irregular spacing, and the
    partition file. Returns (file names, labels in {-1, 1} of shape (n, 40))."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "img_align_celeba").mkdir(exist_ok=True)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    labels = rng.choice([-1, 1], size=(n, len(names)))
    for f in files:
        arr = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "img_align_celeba" / f, quality=90)
    lines = [str(n), " ".join(names) + " "]
    for f, row in zip(files, labels):
        # official file: values right-aligned in 3-wide fields → "1" has two spaces before it, "-1" one
        lines.append(f + "".join(f"{v:>3d}" for v in row))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    if splits is None:
        splits = [0] * (n // 2) + [1] * (n // 4) + [2] * (n - n // 2 - n // 4)
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {s}\n" for f, s in zip(files, splits)))
    return files, labels
