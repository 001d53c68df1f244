"""gpu-cache: the decoded dataset lives in device memory; shuffling, augmentation and conversion
happen there, so the host does no per-batch work beyond launching a few kernels.

Stages (CelebA; Taskonomy the same per domain):

    decode once      celeba.cached_split → (M, 3, S, S) uint8 .npy       [host, once, cached on disk]
                     Taskonomy: the prepared folder's {domain}.npy         (M, C, S, S) uint8 | uint16
    place            torch.uint8 / int16 (uint16 bit-cast) tensor on the device    [once per split]
                     when it does not fit (``fits_on_device``: more than ``fraction`` of the free
                     device memory) it stays in pinned host memory (CelebA) or is streamed from
                     the memory-mapped arrays by the torch backend's DataLoader (Taskonomy), with
                     a log line saying why
    per batch        index_select(order[batch]) on the device → (B, 3, S, S) uint8
                     → float32 / 255 (+ flips) → the batch dict                [device]
"""
from __future__ import annotations

import numpy as np
import torch

from .common import ShardedSource, celeba_batch, fits_on_device, log, taskonomy_batch
from .datasets import as_int16


def _plan_index(plan, device):
    """All of the epoch's row indices in one host → device copy; batch b is a slice of it."""
    flat = torch.from_numpy(np.concatenate([p.index for p in plan]))
    bounds = np.cumsum([0] + [len(p.index) for p in plan])
    return flat.to(device, non_blocking=True), bounds


class GpuCacheCeleba(ShardedSource):
    backend = "gpu-cache"
    kind = "celeba"

    def __init__(self, spec, *, fraction: float = 0.5, rank=None, world_size=None, flip: bool = False):
        super().__init__(rank=rank, world_size=world_size, flip=flip)
        self.spec, self.taskset, self.image_size, self.fraction = spec, spec.taskset, spec.image_size, fraction
        self._placed: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def num_samples(self, split):
        return self.spec.num_samples(split)

    def placed(self, split: str, device: torch.device):
        """(images, labels, on_device) for ``split`` — decoded and placed on first use."""
        key = (split, str(device))
        if key not in self._placed:
            x = torch.from_numpy(np.ascontiguousarray(self.spec.decoded(split)))        # (M, 3, S, S) uint8
            y = torch.from_numpy(self.spec.labels(split)).to(torch.int64)              # (M, N) int64
            on = fits_on_device(x.numel() + y.numel() * 8, device, self.fraction, f"celeba/{split}")
            if on:
                x, y = x.to(device), y.to(device)
            elif device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            self._placed[key] = (x, y, on)
        return self._placed[key]

    def _produce(self, split, plan, device, batch_size):
        x, y, on = self.placed(split, device)
        if on:
            idx, bounds = _plan_index(plan, device)
        else:
            idx, bounds = torch.from_numpy(np.concatenate([p.index for p in plan])), np.cumsum([0] + [len(p.index) for p in plan])
        for b, pb in enumerate(plan):
            i = idx[bounds[b]:bounds[b + 1]]
            xb, yb = x.index_select(0, i), y.index_select(0, i)
            if not on:   # host gather into pinned memory, then an asynchronous copy
                pin = device.type == "cuda"
                xb = (xb.pin_memory() if pin else xb).to(device, non_blocking=True)
                yb = (yb.pin_memory() if pin else yb).to(device, non_blocking=True)
            yield celeba_batch(xb, yb, pb.flip)


class GpuCacheTaskonomy(ShardedSource):
    backend = "gpu-cache"
    kind = "taskonomy"

    def __init__(self, spec, *, fraction: float = 0.5, rank=None, world_size=None, flip: bool = True,
                 num_workers: int = 2):
        super().__init__(rank=rank, world_size=world_size, flip=flip)
        self.spec, self.taskset, self.fraction, self.num_workers = spec, spec.taskset, fraction, num_workers
        self.image_size = spec.image_size
        self._placed: dict[tuple[str, str], dict[str, torch.Tensor] | None] = {}
        self._stream = None

    def num_samples(self, split):
        return self.spec.num_samples(split)

    def placed(self, split: str, device: torch.device):
        """{domain: (M, C, S, S) uint8 | int16 tensor on the device}, or None when it does not fit."""
        key = (split, str(device))
        if key not in self._placed:
            arrays = self.spec.arrays(split)
            nbytes = sum(a.nbytes for a in arrays.values())
            if fits_on_device(nbytes, device, self.fraction, f"taskonomy/{split} ({', '.join(arrays)})"):
                # np.array reads the memory map into RAM once; torch then copies it to the device
                self._placed[key] = {d: torch.from_numpy(as_int16(np.array(a))).to(device) for d, a in arrays.items()}
            else:
                log.warning("gpu-cache: taskonomy/%s streams from %s with the torch backend's loader",
                            split, self.spec.folder / split)
                self._placed[key] = None
        return self._placed[key]

    def _produce(self, split, plan, device, batch_size):
        data = self.placed(split, device)
        if data is None:
            from .torch_files import TorchTaskonomy
            if self._stream is None:
                self._stream = TorchTaskonomy(self.spec, prepared=True, num_workers=self.num_workers,
                                              rank=self._rank, world_size=self._world, flip=self.flip)
            yield from self._stream._produce(split, plan, device, batch_size)
            return
        idx, bounds = _plan_index(plan, device)
        for b, pb in enumerate(plan):
            i = idx[bounds[b]:bounds[b + 1]]
            yield taskonomy_batch({d: x.index_select(0, i) for d, x in data.items()}, self.spec.task_names, pb.flip)
