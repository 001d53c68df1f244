"""fastdmtg.pipelines: every runtime loader, for every dataset format of ``fastdmtg.data``.

    plan.py         the ONE epoch plan: order (seed, epoch), last-batch rule, DDP shards, resume skip, flips
    source.py       the ``Source`` base class the trainer iterates
    cache.py        decode caches and .beton files keyed by content and checked before use;
                    ``fastdmtg data verify``
    resident.py     gpu-cache (device memory) and memory (host memory)
    torch_files.py  torch: a DataLoader decoding the raw files of every batch
    ffcv_source.py  ffcv: .beton files, FFCV's compiled readers
    dali_source.py  dali: NVIDIA DALI decodes the raw files (GPU or CPU)

``build_source(cfg)`` returns the ``Source`` a ``DataConfig`` asks for; every backend yields the same
batches in the same order for every dataset. See docs/pipelines.md.
"""
from __future__ import annotations

import torch.distributed as dist

from fastdmtg.data import SPLITS, Dataset, open_dataset
from fastdmtg.registry import LOADER_BACKENDS

from .cache import DecodeCache, default_cache_dir, verify_path
from .dali_source import DaliSource
from .ffcv_source import FfcvSource, write_beton
from .plan import epoch_permutation, flip_flags, plan_epoch, resolve_shard, shard_num_batches, shard_positions
from .resident import ResidentSource
from .source import LoaderBackend, PipelineError, Source
from .torch_files import TorchSource

#: what data.backend=auto runs (on a CPU it holds the data in host memory: the same as memory)
AUTO = "gpu-cache"
BACKENDS = tuple(LOADER_BACKENDS)        # the data.backend names (auto aside), one table: fastdmtg.registry


backend = LOADER_BACKENDS.load     # name → its LoaderBackend


def backend_status(name: str, deep: bool = True) -> tuple[bool, str]:
    """(usable, reason) — whether a backend's packages are there, and why not. ``deep=False`` only
    looks for the packages without importing them (importing ffcv costs seconds of numba JIT)."""
    if name not in LOADER_BACKENDS:
        raise ValueError(f"data.backend: unknown backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return backend(name).status(deep)


def build_source(cfg, progress: bool = True, *, dataset: Dataset | None = None, rank: int | None = None,
                 world_size: int | None = None, flip: bool | None = None, device_fraction: float = 0.5,
                 validate: bool = False, device="cpu") -> Source:
    """The ``Source`` for a ``DataConfig``: ``cfg.dataset`` picks the format (``fastdmtg.data``),
    ``cfg.backend`` the loader (``auto`` = gpu-cache).

    ``dataset``: an already opened ``Dataset`` (default: ``open_dataset(cfg)``). ``flip``: train-time
    horizontal flips (default: the dataset's reference choice). ``device_fraction``: the share of free
    device (host) memory gpu-cache (memory) may take per split before it moves the split down (a log
    line says so). ``validate``: decode every split — or check its cache — now, placing it for
    ``device`` (under DDP rank 0 first, so caches are built once)."""
    name = AUTO if cfg.backend == "auto" else cfg.backend
    ok, why = backend_status(name)
    if not ok:
        raise PipelineError(f"data.backend={name}: {why}; or use data.backend=gpu-cache|memory|torch")
    ds = dataset if dataset is not None else open_dataset(cfg, progress)
    cache = None
    if any(ds.arrays(s) is None for s in SPLITS):     # something to decode: a decode cache
        cache = DecodeCache(ds, default_cache_dir(cfg.cache_dir, ds), workers=0, progress=progress)
    common = dict(rank=rank, world_size=world_size, flip=flip, num_workers=cfg.num_workers, progress=progress)
    src = backend(name).build(ds, cache, cfg, common, device_fraction)
    if validate:
        validate_source(src, progress, device)
    return src


def validate_source(src: Source, progress: bool = False, device="cpu") -> None:
    """``src.validate`` — under DDP on rank 0 first (it builds the caches), then on the others (they
    open and check them; backends without caches are not checked twice)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        src.validate(progress, device)
        return
    if dist.get_rank() == 0:
        src.validate(progress, device)
    dist.barrier()
    if dist.get_rank() != 0 and backend(src.backend).checks_on_every_rank:
        src.validate(False, device)


__all__ = ["AUTO", "BACKENDS", "LoaderBackend", "backend", "build_source", "validate_source", "backend_status", "Source", "PipelineError",
           "ResidentSource", "TorchSource", "FfcvSource", "DaliSource",
           "DecodeCache", "default_cache_dir", "verify_path", "write_beton", "epoch_permutation",
           "flip_flags", "plan_epoch", "resolve_shard", "shard_num_batches", "shard_positions"]
