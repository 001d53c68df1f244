"""torch: a plain ``torch.utils.data.DataLoader`` over the raw files — the reference-style
baseline (every epoch decodes and resizes every image again, on the CPU, in worker processes).

Stages:

    CelebA      worker: celeba.load_image(path) → (3, S, S) uint8; labels (N,) int64
                collate → (B, 3, S, S) uint8, (B, N) int64 [pinned host] → device → float/255
    Taskonomy   raw root: worker: taskonomy.load_domain + resize_map per domain (what ``prepare``
                computes, so the values equal the prepared rows) → {domain: (C, S, S) uint8 |
                int16 (uint16 bit-cast)}; collate → (B, C, S, S)
                prepared folder (or gpu-cache's fallback): worker gathers rows of the memory-mapped
                arrays, one whole batch per item → {domain: (B, C, S, S)}
                → device → make_batch (normalise, flip, normal-x negation)

The order comes from the plan (``common.plan_epoch``) through ``batch_sampler``, so it equals
every other backend's.
"""
from __future__ import annotations

import numpy as np
import torch

from .common import ShardedSource, celeba_batch, taskonomy_batch
from .datasets import as_int16


class _CelebAFiles(torch.utils.data.Dataset):
    def __init__(self, paths, labels, size):
        self.paths, self.labels, self.size = [str(p) for p in paths], labels, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from fastdmtg.data.celeba import load_image
        return torch.from_numpy(load_image(self.paths[i], self.size)), torch.from_numpy(self.labels[i])


class _TaskonomyFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[dict[str, str]], side: int, size: int, seg_resize: str):
        self.paths, self.side, self.size, self.seg_resize = paths, side, size, seg_resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from fastdmtg.data import taskonomy as tx
        torch.set_num_threads(1)   # the workers are the parallelism
        out = {}
        for d, p in self.paths[i].items():
            a = tx.resize_map(tx.load_domain(p, d, self.side), self.size, tx.resize_mode(d, self.seg_resize))
            out[d] = torch.from_numpy(as_int16(np.ascontiguousarray(a)))
        return out


class _PreparedBatches(torch.utils.data.Dataset):
    """Item = a whole batch (an index array) of the memory-mapped prepared arrays. The maps are
    opened lazily in each worker: a pickled np.memmap would be copied into the worker."""

    def __init__(self, spec, split: str):
        self.spec, self.split, self._arrays = spec, split, None

    def __getstate__(self):
        return {"spec": self.spec, "split": self.split, "_arrays": None}

    def __len__(self):
        return self.spec.num_samples(self.split)

    def __getitem__(self, idx):
        if self._arrays is None:
            self._arrays = self.spec.arrays(self.split)
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")       # ascending reads suit the page cache
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        srt = idx[order]
        return {d: torch.from_numpy(as_int16(np.ascontiguousarray(a[srt][inv]))) for d, a in self._arrays.items()}


def _loader(ds, plan, num_workers, device, whole_batches: bool):
    idx = [p.index.tolist() for p in plan]
    kw = dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=False)
    if num_workers > 0:
        kw["prefetch_factor"] = 4
    if whole_batches:
        return torch.utils.data.DataLoader(ds, sampler=[np.asarray(i) for i in idx], batch_size=None, **kw)
    return torch.utils.data.DataLoader(ds, batch_sampler=idx, **kw)


class TorchCeleba(ShardedSource):
    backend = "torch"
    kind = "celeba"

    def __init__(self, spec, *, num_workers: int = 2, rank=None, world_size=None, flip: bool = False):
        super().__init__(rank=rank, world_size=world_size, flip=flip)
        self.spec, self.taskset, self.image_size, self.num_workers = spec, spec.taskset, spec.image_size, num_workers

    def num_samples(self, split):
        return self.spec.num_samples(split)

    def _produce(self, split, plan, device, batch_size):
        ds = _CelebAFiles(self.spec.paths(split), self.spec.labels(split), self.image_size)
        for pb, (x, y) in zip(plan, _loader(ds, plan, self.num_workers, device, False)):
            yield celeba_batch(x.to(device, non_blocking=True), y.to(device, non_blocking=True), pb.flip)


class TorchTaskonomy(ShardedSource):
    """``prepared=False`` decodes the raw PNGs (needs a raw root); ``prepared=True`` reads the
    prepared arrays (the default when data.root is a prepared folder)."""
    backend = "torch"
    kind = "taskonomy"

    def __init__(self, spec, *, prepared: bool | None = None, num_workers: int = 2, rank=None, world_size=None,
                 flip: bool = True):
        super().__init__(rank=rank, world_size=world_size, flip=flip)
        self.spec, self.taskset, self.image_size, self.num_workers = spec, spec.taskset, spec.image_size, num_workers
        self.prepared = spec.is_prepared_root if prepared is None else prepared

    def num_samples(self, split):
        return self.spec.num_samples(split)

    def _produce(self, split, plan, device, batch_size):
        if self.prepared:
            loader = _loader(_PreparedBatches(self.spec, split), plan, self.num_workers, device, True)
        else:
            raw = self.spec.raw()
            ds = _TaskonomyFiles(self.spec.raw_paths(split), raw["side"], self.image_size, self.spec.seg_resize)
            loader = _loader(ds, plan, self.num_workers, device, False)
        for pb, raw_batch in zip(plan, loader):
            raw_batch = {d: x.to(device, non_blocking=True) for d, x in raw_batch.items()}
            yield taskonomy_batch(raw_batch, self.spec.task_names, pb.flip)
