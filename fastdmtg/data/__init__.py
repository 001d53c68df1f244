"""Data sources: one interface the trainer uses for every dataset and backend.

``DataSource.batches(split, batch_size, shuffle=..., seed=..., epoch=..., device=..., skip=...)``
yields batch dicts already on ``device``:

    {"image": (B, 3, S, S) float32 in [0, 1], "labels": (B, N) int64}        # attribute datasets
    (Taskonomy adds "targets"/"mask", see fastdmtg/data/taskonomy.py)

Order is a pure function of (seed, epoch): the permutation of an epoch is drawn from a generator
seeded with (seed, epoch), so a resumed run skips the ``skip`` batches it had already consumed and
sees exactly the same batches as an uninterrupted one.

Under DDP (torchrun), training batches come from this rank's shard of the epoch permutation
(``fastdmtg.distributed.shard``); evaluation batches are not sharded.

Last-batch rule (training): the final partial batch is kept, except a single leftover sample,
which is dropped because BatchNorm cannot normalise a batch of one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..tasks import TaskSet


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def num_batches(n: int, batch_size: int, train: bool) -> int:
    full, rem = divmod(n, batch_size)
    if train and rem == 1:
        rem = 0
    return full + (1 if rem else 0)


def _ordered(n: int, shuffle: bool, seed: int, epoch: int, train: bool) -> torch.Tensor:
    from ..distributed import shard
    order = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
    return shard(order) if train else order


class DataSource:
    taskset: TaskSet
    image_size: int
    splits = ("train", "val", "test")

    def num_samples(self, split: str) -> int:
        raise NotImplementedError

    def num_batches(self, split: str, batch_size: int, train: bool = False) -> int:
        return num_batches(self.samples_per_rank(split, train), batch_size, train)

    def samples_per_rank(self, split: str, train: bool) -> int:
        """Training is sharded across DDP ranks (fastdmtg.distributed.shard); evaluation is not."""
        from ..distributed import world
        n = self.num_samples(split)
        return n // world()[1] if train else n

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                device: torch.device | str = "cpu", skip: int = 0, train: bool = False) -> Iterator[dict]:
        raise NotImplementedError


class MemorySource(DataSource):
    """Decoded uint8 images + labels held in memory (and moved to the device once: a GPU-resident
    cache when ``device`` is CUDA). Batches are gathered, converted to float and normalised on the
    device, so the host does no per-batch work."""

    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], taskset: TaskSet, image_size: int):
        self.data = {k: (torch.as_tensor(x), torch.as_tensor(y)) for k, (x, y) in splits.items()}
        for k, (x, y) in self.data.items():
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"{k} images: expected (M, 3, S, S) uint8, got {tuple(x.shape)} {x.dtype}")
            if y.shape != (x.shape[0], taskset.num_tasks):
                raise ValueError(f"{k} labels: expected ({x.shape[0]}, {taskset.num_tasks}), got {tuple(y.shape)}")
        self.taskset = taskset
        self.image_size = image_size
        self._on: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def num_samples(self, split: str) -> int:
        return self.data[split][0].shape[0]

    def _device_copy(self, split: str, device: torch.device):
        key = (split, str(device))
        if key not in self._on:
            x, y = self.data[split]
            self._on[key] = (x.to(device), y.to(device).long())
        return self._on[key]

    def batches(self, split, batch_size, *, shuffle, seed=0, epoch=0, device="cpu", skip=0, train=False):
        device = torch.device(device)
        x, y = self._device_copy(split, device)
        order = _ordered(x.shape[0], shuffle, seed, epoch, train)
        nb = num_batches(order.numel(), batch_size, train)
        order = order.to(device)
        for b in range(skip, nb):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield {"image": x.index_select(0, idx).float().div_(255.0), "labels": y.index_select(0, idx)}


class LoaderSource(DataSource):
    """A torch DataLoader over map-style datasets of raw files (reference-style baseline)."""

    def __init__(self, datasets: dict[str, torch.utils.data.Dataset], taskset: TaskSet, image_size: int,
                 num_workers: int = 2):
        self.datasets, self.taskset, self.image_size, self.num_workers = datasets, taskset, image_size, num_workers

    def num_samples(self, split):
        return len(self.datasets[split])

    def batches(self, split, batch_size, *, shuffle, seed=0, epoch=0, device="cpu", skip=0, train=False):
        ds = self.datasets[split]
        order = _ordered(len(ds), shuffle, seed, epoch, train)
        n = order.numel()
        nb = num_batches(n, batch_size, train)
        order = order[skip * batch_size: min(n, nb * batch_size)].tolist()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, order), batch_size=batch_size, shuffle=False,
            num_workers=self.num_workers, pin_memory=torch.device(device).type == "cuda",
            persistent_workers=False)
        for batch in loader:
            yield {"image": batch["image"].to(device, non_blocking=True).float().div_(255.0),
                   "labels": batch["labels"].to(device, non_blocking=True).long()}


def _limit(t: tuple[torch.Tensor, torch.Tensor], n: int):
    return (t[0][:n], t[1][:n]) if n else t


def default_cache_dir(cfg) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path.home() / ".cache" / "fastdmtg"


def build_data(cfg, progress: bool = True) -> DataSource:
    """Build the DataSource described by a DataConfig."""
    from ..tasks.attributes import AttributeTaskSet
    if cfg.backend == "auto":
        import dataclasses
        cfg = dataclasses.replace(cfg, backend="memory" if cfg.dataset == "synthetic" else "gpu-cache")
    if cfg.backend in ("gpu-cache", "ffcv", "dali"):
        from ..pipelines import build_source   # fastdmtg.pipelines (the repo's pipelines/ folder)
        return build_source(cfg, progress=progress)
    if cfg.dataset == "synthetic":
        from . import synthetic
        names = synthetic.task_names(cfg.synthetic_groups, cfg.synthetic_tasks_per_group)
        wanted = cfg.task_names()
        if wanted is not None:
            raise ValueError(f"data.tasks: the synthetic dataset always has its planted tasks {names}; "
                             f"leave data.tasks=all (got {wanted})")
        splits = synthetic.make_splits(cfg)
        splits = {k: _limit(v, cfg.limit_train if k == "train" else cfg.limit_eval) for k, v in splits.items()}
        return MemorySource(splits, AttributeTaskSet(names), cfg.image_size)
    if cfg.dataset == "celeba":
        from . import celeba
        if not cfg.root:
            raise ValueError("data.root: the celeba dataset needs its folder (--data-root PATH)")
        index = celeba.CelebAIndex(cfg.root, cfg.task_names())
        taskset = AttributeTaskSet(index.task_names)
        if cfg.backend == "torch":
            ds = {s: celeba.CelebAFiles(index, s, cfg.image_size, cfg.limit_train if s == "train" else cfg.limit_eval)
                  for s in ("train", "val", "test")}
            return LoaderSource(ds, taskset, cfg.image_size, cfg.num_workers)
        splits = {}
        for s in ("train", "val", "test"):
            lim = cfg.limit_train if s == "train" else cfg.limit_eval
            if lim:  # a quick run decodes only what it uses (no cache)
                sub = index.image_paths(s)[:lim]
                imgs = celeba.decode_split(sub, cfg.image_size, progress=progress, desc=f"decode celeba/{s}")
                labels = index.labels(s)[:lim]
            else:
                imgs = celeba.cached_split(index, s, cfg.image_size, default_cache_dir(cfg), progress=progress)
                labels = index.labels(s)
            if len(imgs) == 0:
                raise celeba.CelebAFormatError(f"{index.root / celeba.PARTITION_FILE}: split {s!r} is empty")
            splits[s] = (torch.from_numpy(imgs), torch.from_numpy(labels))
        return MemorySource(splits, taskset, cfg.image_size)
    if cfg.dataset == "taskonomy":
        from . import taskonomy
        return taskonomy.build_source(cfg, progress=progress)
    raise ValueError(f"data.dataset: unknown dataset {cfg.dataset!r}")


__all__ = ["DataSource", "MemorySource", "LoaderSource", "build_data", "epoch_permutation", "num_batches"]
