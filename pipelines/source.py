"""The source base class every backend derives from.

``Source(dataset, ...)`` wraps a ``fastdmtg.data.Dataset``; the trainer only sees

    source.taskset, source.image_size, source.num_samples(split)
    source.num_batches(split, batch_size, train=False)       this rank's count (see plan.py)
    source.batches(split, batch_size, *, shuffle, seed=0, epoch=0, device="cpu", skip=0, train=False)
    source.validate(progress)                                 every split decoded / its cache checked

``batches`` plans the epoch (``plan.plan_epoch``) and hands the planned batches to the backend's
``_produce``, which yields ``dataset.to_batch(raw, flags)`` per batch: the same batches, in the same
order, for every backend. ``source.backend`` names the backend that runs (``gpu-cache`` may report
where each split actually lives: ``source.placement``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fastdmtg.data import SPLITS, Dataset
from fastdmtg.data.base import decode_parallel, uint16_as_int16

from .plan import PlannedBatch, plan_epoch, resolve_shard, shard_num_batches

log = logging.getLogger("fastdmtg.pipelines")


@dataclass(frozen=True)
class LoaderBackend:
    """A data.backend (a module of pipelines/ whose ``BACKEND`` holds it: the table is
    ``fastdmtg.registry.LOADER_BACKENDS``): ``status(deep) -> (usable,
    reason)`` says whether its packages are there and why not (``deep=False`` only looks for them,
    without importing); ``build(dataset, decode_cache, data_config, common_kwargs, device_fraction)``
    returns its ``Source``; ``checks_on_every_rank``: under DDP, ranks other than 0 check the caches
    rank 0 built (backends with caches)."""
    name: str
    build: Callable
    status: Callable = lambda deep=True: (True, "built in")
    checks_on_every_rank: bool = False
    order: int = 10                      # its place in listings and messages


class PipelineError(ValueError):
    """A backend cannot be used as configured (missing package, unreadable or corrupt file,
    settings that disagree with what was prepared); the message names the file or setting."""


class Source:
    backend: str = "?"

    def __init__(self, dataset: Dataset, *, rank: int | None = None, world_size: int | None = None,
                 flip: bool | None = None, num_workers: int = 0, progress: bool = True):
        self.dataset = dataset
        self.taskset, self.image_size = dataset.taskset, dataset.image_size
        self._rank, self._world = rank, world_size
        self.flip = dataset.default_flip if flip is None else bool(flip)
        self.num_workers, self.progress = int(num_workers), progress
        self.splits = SPLITS

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend}, dataset={self.dataset.name})"

    def num_samples(self, split: str) -> int:
        return self.dataset.num_samples(split)

    def describe(self, split: str = "train") -> str:
        """What actually serves ``split``: the backend, the source class and how (for reports)."""
        how = self._how(split)
        return f"{self.backend} ({type(self).__name__}{': ' + how if how else ''})"

    def _how(self, split: str) -> str:
        return ""

    # -- the plan ---------------------------------------------------------------------------
    def shard(self, rank=None, world_size=None, train: bool = True) -> tuple[int, int]:
        rank = self._rank if rank is None else rank
        world_size = self._world if world_size is None else world_size
        if rank is None and world_size is None and not train:
            return 0, 1      # implicit (torch.distributed) sharding is for training only: see plan.py
        return resolve_shard(rank, world_size)

    def num_batches(self, split: str, batch_size: int, train: bool = False, *, rank=None, world_size=None) -> int:
        r, w = self.shard(rank, world_size, train)
        return shard_num_batches(self.num_samples(split), batch_size, train, r, w)

    def plan(self, split, batch_size, *, shuffle, seed, epoch, skip, train, rank=None, world_size=None):
        r, w = self.shard(rank, world_size, train)
        return plan_epoch(self.num_samples(split), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                          train=train, skip=skip, rank=r, world=w, flip=self.flip and train)

    def batches(self, split, batch_size, *, shuffle, seed=0, epoch=0, device="cpu", skip=0, train=False,
                rank=None, world_size=None):
        plan = self.plan(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, skip=skip, train=train,
                         rank=rank, world_size=world_size)
        if not plan:
            return iter(())
        return self._produce(split, plan, torch.device(device), batch_size)

    # -- what a backend implements ----------------------------------------------------------------
    def validate(self, progress: bool = False, device: torch.device | str = "cpu") -> None:
        """Make every split ready to serve on ``device`` (decode it, build or check its cache) so
        that a bad file in any split stops the run before the first training step, naming the file."""
        raise NotImplementedError

    def _produce(self, split: str, plan: list[PlannedBatch], device: torch.device, batch_size: int):
        raise NotImplementedError

    # -- shared helpers ---------------------------------------------------------------------------
    def _batch(self, raw: dict[str, torch.Tensor], flip: np.ndarray | None) -> dict:
        return self.dataset.to_batch(raw, flags_on(flip, next(iter(raw.values())).device))


def decode_check(dataset, splits, progress: bool) -> None:
    """Decode every file of ``splits`` once with the reference decoder, keeping nothing (the
    validation of the backends that decode files per batch). Arrays need no decoding: opening them
    checked their files' sizes and headers."""
    for s in splits:
        if dataset.arrays(s) is None:
            decode_parallel(dataset.items(s), dataset.decode_one, None, progress=progress,
                            desc=f"check {dataset.name}/{s}")


def flags_on(plan_flip: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    """Host flags → device tensor, or None when nothing flips (decided on the host: no sync)."""
    if plan_flip is None or not plan_flip.any():
        return None
    return torch.from_numpy(plan_flip).to(device, non_blocking=True)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """A stored array as a tensor (uint16 as its int16 bit-cast)."""
    a = np.ascontiguousarray(uint16_as_int16(np.asarray(a)))
    return torch.from_numpy(a if a.flags.writeable else a.copy())   # rows of a read-only memory map


def gather_rows(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every array (memory-mapped or not), read in ascending order (friendlier to
    the page cache) and put back in batch order."""
    order = np.argsort(idx, kind="stable")
    srt = idx[order]
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return {k: to_tensor(a[srt][inv]) for k, a in arrays.items()}


def available_host_bytes() -> int:
    """MemAvailable (Linux); elsewhere the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("MemAvailable:"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def fits(nbytes: int, device: torch.device, fraction: float, what: str) -> bool:
    """Whether ``nbytes`` fit in ``fraction`` of the *free* memory of ``device`` (host RAM for the
    CPU); the rest is left to the model, activations and the allocator. Logs why when they do not."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        free, total = available_host_bytes(), None
    budget = int(free * fraction)
    where = str(device) if device.type == "cuda" else "host memory"
    if nbytes <= budget:
        log.info("%s: %.2f GiB in %s (%.1f GiB free)", what, nbytes / 2**30, where, free / 2**30)
        return True
    log.warning("%s needs %.2f GiB but only %.2f GiB (%.0f%% of the %.2f GiB free in %s) is allowed",
                what, nbytes / 2**30, budget / 2**30, fraction * 100, free / 2**30, where)
    return False


__all__ = ["Source", "PipelineError", "flags_on", "to_tensor", "gather_rows", "fits", "log"]
