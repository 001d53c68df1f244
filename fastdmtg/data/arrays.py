"""Datasets whose samples are already arrays in memory: the synthetic set, the benchmarks' random
data, and data handed over from Python.

``ArrayDataset(name, splits, fields, taskset, image_size)``: ``splits`` = {split: {field: (M, …)
array}}, one entry per ``fields`` key, every split with the same fields. There is nothing to decode;
a loader that needs files of its own (FFCV's .beton) keys them by a CRC-32 of the arrays.
"""
from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

from .base import SPLITS, Dataset, Field, image_labels_batch


class ArrayDataset(Dataset):
    def __init__(self, name: str, splits: dict[str, dict[str, np.ndarray]], fields: dict[str, Field], taskset,
                 image_size: int, *, to_batch: Callable = image_labels_batch, default_flip: bool = False,
                 limits: dict[str, int] | None = None):
        self.name, self.fields, self.taskset, self.image_size = name, dict(fields), taskset, image_size
        self.default_flip = default_flip
        self._to_batch = to_batch
        self._splits = {}
        for s in SPLITS:
            if s not in splits:
                raise ValueError(f"{name}: split {s!r} missing (need {', '.join(SPLITS)})")
            arrs = {}
            for k, f in self.fields.items():
                if k not in splits[s]:
                    raise ValueError(f"{name}/{s}: field {k!r} missing")
                a = np.asarray(splits[s][k])
                if a.dtype != f.dtype or a.shape[1:] != f.shape:
                    raise ValueError(f"{name}/{s}/{k}: expected (M, {', '.join(map(str, f.shape))}) {f.dtype}, "
                                     f"got {a.shape} {a.dtype}")
                arrs[k] = a
            counts = {len(a) for a in arrs.values()}
            if len(counts) != 1:
                raise ValueError(f"{name}/{s}: fields have different sample counts {sorted(counts)}")
            lim = int((limits or {}).get(s, 0))
            if lim:
                arrs = {k: a[:lim] for k, a in arrs.items()}
            self._splits[s] = arrs
        self._crc: dict[str, str] = {}

    def num_samples(self, split):
        return len(next(iter(self._splits[split].values())))

    def arrays(self, split):
        return self._splits[split]

    def cache_id(self) -> dict:
        return {"dataset": self.name, "content": {s: self.split_key(s)["crc32"] for s in SPLITS}}

    def split_key(self, split) -> dict:
        if split not in self._crc:
            c = 0
            for k, a in self._splits[split].items():
                c = zlib.crc32(f"{k}{a.shape}{a.dtype}".encode(), c)
                c = zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8), c)
            self._crc[split] = f"{c:08x}"
        return {"crc32": self._crc[split], "count": self.num_samples(split)}

    def params(self) -> dict:
        return {"image_size": self.image_size}

    def to_batch(self, raw, flags):
        return self._to_batch(raw, flags)


def image_label_fields(image_size: int, num_tasks: int) -> dict[str, Field]:
    """The fields of an image + per-task binary labels dataset."""
    return {"image": Field(np.uint8, (3, image_size, image_size), "image"),
            "labels": Field(np.uint8, (num_tasks,), "value")}


__all__ = ["ArrayDataset", "image_label_fields"]
