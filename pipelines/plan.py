"""The epoch plan: which samples, in which batches, on which rank, flipped or not — the ONE place
every backend takes its order from.

Order
-----
The order of an epoch is a pure function of (seed, epoch): ``epoch_permutation(n, seed, epoch)``
(a generator seeded with seed·1,000,003 + epoch), or ``arange(n)`` without shuffling. A resumed run
(``skip`` = batches already consumed) sees exactly the batches of an uninterrupted one.

Shards (DDP, ``world`` ranks, per-rank batch size B)
------------------------------------------------------
The epoch order is cut into *global batches* of G = B·world consecutive positions; rank r takes
positions r, r + world, r + 2·world … of each — batch b of rank r is ``order[r::world][b·B:(b+1)·B]``.
A full global batch gives every rank exactly B samples. The last, partial global batch (R = n mod G
samples) is

* **train**: every rank takes R // world of it (the ``R mod world`` left over sit out — equal per-rank
  batch sizes keep DDP's gradient average an average over samples), kept only when that is at
  least 2: BatchNorm cannot normalise a batch of one, and every rank must run the same number of
  steps or DDP's all-reduce hangs. No sample is repeated (no padding); at most 2·world − 1 samples —
  the tail of this epoch's permutation, different ones every epoch — sit out. With world = 1 only a
  single leftover sample is dropped.
* **eval** with an explicit rank/world: always kept, rank r taking ⌈(R − r) / world⌉ of it — every
  sample exactly once across ranks. When 0 < R < world, ranks r ≥ R have one batch fewer.
* rank/world taken implicitly from an initialised torch.distributed shard **training only**:
  evaluation then covers the whole split on every rank (rank 0 evaluates, the others wait).

Flips
-----
``flip_flags(n, seed, epoch)[j]`` decides the flip of the sample at epoch *position* j, from a
generator of its own: flips do not depend on the backend, the world size or ``skip``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def flip_flags(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) bool: whether the sample at epoch position j is flipped (keyed by (seed, epoch) only)."""
    key = int.from_bytes(hashlib.sha256(f"taskonomy-flip:{seed}:{epoch}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(key & ((1 << 63) - 1))
    return torch.rand(n, generator=g) < 0.5


def resolve_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the explicit values when given, else torch.distributed's when it is
    initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    return rank, world_size


def shard_positions(n: int, batch_size: int, train: bool, rank: int, world: int) -> list[np.ndarray]:
    """Epoch positions (int64 arrays) of each batch of ``rank`` — see the module doc."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = batch_size * world
    full, rem = divmod(n, g)
    out = [np.arange(b * g + rank, (b + 1) * g, world, dtype=np.int64) for b in range(full)]
    if rem:
        if train:
            per_rank = rem // world                    # equal shares; the rem % world left over sit out
            last = full * g + rank + world * np.arange(per_rank, dtype=np.int64)
            keep = per_rank >= 2
        else:
            last = np.arange(full * g + rank, n, world, dtype=np.int64)
            keep = len(last) > 0
        if keep:
            out.append(last)
    return out


def shard_num_batches(n: int, batch_size: int, train: bool, rank: int = 0, world: int = 1) -> int:
    """``len(shard_positions(...))`` without building it."""
    g = batch_size * world
    full, rem = divmod(n, g)
    if rem and (rem // world >= 2 if train else rem > rank):
        full += 1
    return full


@dataclass
class PlannedBatch:
    """One batch of one rank: dataset row indices (int64, in batch order) and flips (bool or None)."""
    index: np.ndarray
    flip: np.ndarray | None


def plan_epoch(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, train: bool, skip: int,
               rank: int, world: int, flip: bool) -> list[PlannedBatch]:
    """This rank's batches of the epoch, the first ``skip`` left out (resume)."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    order = (epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)).numpy()
    flags = flip_flags(n, seed, epoch).numpy() if flip else None
    pos = shard_positions(n, batch_size, train, rank, world)
    return [PlannedBatch(order[p], flags[p] if flags is not None else None) for p in pos[skip:]]


__all__ = ["epoch_permutation", "flip_flags", "resolve_shard", "shard_positions", "shard_num_batches", "PlannedBatch",
           "plan_epoch"]
