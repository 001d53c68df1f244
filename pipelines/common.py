"""What every backend shares: the per-rank batch plan (order, last batch, DDP sharding, flips),
the batch layouts, and the device-side conversion of raw stored values into model inputs.

Batch plan
----------
The epoch order is ``fastdmtg.data.epoch_permutation(n, seed, epoch)`` (or ``arange(n)`` without
shuffling), the same permutation ``MemorySource``/``LoaderSource`` use, so a single-process run of
any backend sees exactly the batches of the existing sources.

DDP sharding (``world`` ranks, per-rank ``batch_size`` = B): the epoch order is cut into *global
batches* of G = B·world consecutive positions; rank r takes positions r, r + world, r + 2·world …
of each global batch — i.e. batch b of rank r is ``order[r::world][b·B:(b+1)·B]``, the rule of
``fastdmtg.distributed.shard`` + ``fastdmtg.data`` that the trainer's ``memory`` source follows, so
every backend gives the same batches under DDP too. A full global batch gives every rank exactly B
samples. The last, partial global batch (R = n mod G samples) is

* **train** (``train=True``): every rank takes R // world samples (the ``n mod world`` left over sit
  out — equal per-rank batch sizes keep DDP's gradient average an average over samples); kept
  only when that is at least 2 — BatchNorm cannot normalise a batch of one, and every rank must run
  the same number of steps or DDP's gradient all-reduce hangs. So every rank has the same number of
  batches, no sample is repeated (**no padding**), and at most 2·world − 1 samples (the tail of this
  epoch's permutation: different samples every epoch) are **dropped**. With world = 1 this is
  exactly ``fastdmtg.data.num_batches`` (only a single leftover sample is dropped).
* **eval** (``train=False``) with an explicit rank/world: always kept, rank r taking
  ⌈(R − r) / world⌉ of it — every sample is seen exactly once across ranks, which metrics need.
  When 0 < R < world, ranks r ≥ R have one batch fewer than the others: evaluation must not run a
  collective per batch (sum the meters across ranks once at the end).
* rank/world taken implicitly from an initialised torch.distributed shard **training only**:
  evaluation then covers the whole split on every rank, as the trainer expects (rank 0 evaluates,
  the others wait at a barrier — ``fastdmtg.distributed``).

Flips (``flip=True``, Taskonomy's train augmentation): ``fastdmtg.data.taskonomy.flip_flags(n,
seed, epoch)[j]`` decides for epoch *position* j, so the flips do not depend on the backend, the
world size, or ``skip``.

Stage layouts (every backend ends in one of these, on ``device``):

    CelebA      raw   image (B, 3, S, S) uint8, labels (B, N) int64
                batch {"image": (B, 3, S, S) float32 in [0, 1], "labels": (B, N) int64}
    Taskonomy   raw   {domain: (B, C, S, S) uint8 | int16 (16-bit maps bit-cast) | int32}
                batch {"image": (B, 3, S, S) float32, "targets": {task: tensor}, "mask": (B, 1, S, S) bool}
                (``fastdmtg.data.taskonomy.make_batch`` — the normalisation and the normal-x negation)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from fastdmtg.data import DataSource, epoch_permutation

log = logging.getLogger("fastdmtg.pipelines")


class PipelineError(RuntimeError):
    """A backend cannot be used as configured (missing package, unreadable/corrupt prepared file,
    settings that disagree with what was prepared); the message names the file or setting."""


# ------------------------------------------------------------------------------------------------
# ranks
# ------------------------------------------------------------------------------------------------
def resolve_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the explicit values when given, else torch.distributed's when it is
    initialised, else (0, 1)."""
    if rank is None or world_size is None:
        import torch.distributed as dist
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


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------
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
    g = batch_size * world
    full, rem = divmod(n, g)
    if rem and (rem // world >= 2 if train else rem > rank):
        full += 1
    return full


@dataclass
class PlannedBatch:
    """One batch of one rank: dataset row indices (int64, order of the batch) and flips (bool or None)."""
    index: np.ndarray
    flip: np.ndarray | None


def plan_epoch(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, train: bool, skip: int,
               rank: int, world: int, flip: bool) -> list[PlannedBatch]:
    """This rank's batches of the epoch, the first ``skip`` left out (resume)."""
    order = (epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)).numpy()
    flags = None
    if flip:
        from fastdmtg.data.taskonomy import flip_flags
        flags = flip_flags(n, seed, epoch).numpy()
    pos = shard_positions(n, batch_size, train, rank, world)
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    return [PlannedBatch(order[p], flags[p] if flags is not None else None) for p in pos[skip:]]


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
class ShardedSource(DataSource):
    """Base of the pipeline sources: resolves the rank, plans the epoch, and leaves producing the
    planned batches to ``_produce``. ``flip`` turns on the horizontal-flip train augmentation (on
    for Taskonomy, off for CelebA by default)."""

    kind: str = "celeba"          # celeba | taskonomy
    backend: str = "?"

    def __init__(self, *, rank: int | None = None, world_size: int | None = None, flip: bool = False):
        self._rank, self._world = rank, world_size
        self.flip = flip

    def shard(self, rank=None, world_size=None, train: bool = True) -> tuple[int, int]:
        rank = self._rank if rank is None else rank
        world_size = self._world if world_size is None else world_size
        if rank is None and world_size is None and not train:
            return 0, 1      # implicit (torch.distributed) sharding is for training only: see the module doc
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

    def _produce(self, split: str, plan: list[PlannedBatch], device: torch.device, batch_size: int):
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# device-side conversion
# ------------------------------------------------------------------------------------------------
def flip_rows(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror (along the last dim) the rows of ``x`` whose flag is set."""
    f = flags.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(f, x.flip(-1), x)


def _flags_on(plan_flip: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    """Host flags → device tensor, or None when nothing flips (decided on the host: no sync)."""
    if plan_flip is None or not plan_flip.any():
        return None
    return torch.from_numpy(plan_flip).to(device, non_blocking=True)


def celeba_batch(image_u8: torch.Tensor, labels: torch.Tensor, flip: np.ndarray | None) -> dict:
    """(B, 3, S, S) uint8 + (B, N) integer labels on the device → the CelebA batch dict. Always
    returns new, contiguous NCHW tensors (FFCV/DALI reuse their output buffers; a permuted NHWC
    view would make the model's convolutions pick other algorithms and round differently)."""
    image = image_u8.contiguous().to(torch.float32).div_(255.0)
    flags = _flags_on(flip, image.device)
    if flags is not None:
        image = flip_rows(image, flags)
    return {"image": image, "labels": labels.to(torch.int64, copy=True)}


def taskonomy_batch(raw: dict[str, torch.Tensor], task_names: list[str], flip: np.ndarray | None) -> dict:
    from fastdmtg.data.taskonomy import make_batch
    raw = {d: x.contiguous() for d, x in raw.items()}   # NCHW, as every other source gives
    dev = next(iter(raw.values())).device
    return make_batch(raw, task_names, _flags_on(flip, dev))


def resize_like_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """CelebA reference resize on the device: (B, 3, H, W) uint8 → (B, 3, size, size) uint8,
    bilinear, half-pixel centres, no antialias, rounded (``fastdmtg.data.celeba.load_image``)."""
    import torch.nn.functional as F
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.to(torch.float32), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_taskonomy(x: torch.Tensor, size: int, mode: str, bits: int) -> torch.Tensor:
    """Taskonomy prepare's resize on the device (``taskonomy.resize_map``, batched): (B, C, H, W)
    integer → (B, C, size, size) of the same dtype; bilinear = antialiased triangle filter,
    nearest = nearest-exact; rounded and clamped to the source bit depth."""
    import torch.nn.functional as F
    if x.shape[-2:] == (size, size):
        return x
    xf = x.to(torch.float32)
    if bits == 16 and x.dtype == torch.int16:
        xf = (x.to(torch.int32) & 0xFFFF).to(torch.float32)
    if mode == "bilinear":
        y = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        y = F.interpolate(xf, size=(size, size), mode="nearest-exact")
    y = y.round_().clamp_(0, (1 << bits) - 1)
    if bits == 16:   # back to the int16 bit-cast of the uint16 value (explicit: no reliance on wrap-around)
        v = y.to(torch.int32)
        return torch.where(v >= 32768, v - 65536, v).to(torch.int16)
    return y.to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# device memory
# ------------------------------------------------------------------------------------------------
def fits_on_device(nbytes: int, device: torch.device, fraction: float, what: str) -> bool:
    """Whether ``nbytes`` fit in ``fraction`` of the device's *free* memory (the rest is left to
    the model, activations and the allocator). Logs why when they do not."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    budget = int(free * fraction)
    if nbytes <= budget:
        log.info("gpu-cache: %s: %.2f GiB on %s (%.1f GiB free of %.1f GiB)", what, nbytes / 2**30, device,
                 free / 2**30, total / 2**30)
        return True
    log.warning("gpu-cache: %s needs %.2f GiB but only %.2f GiB (%.0f%% of the %.2f GiB free on %s) is allowed; "
                "keeping it in pinned host memory and gathering each batch on the host instead",
                what, nbytes / 2**30, budget / 2**30, fraction * 100, free / 2**30, device)
    return False


__all__ = ["PipelineError", "resolve_shard", "shard_positions", "shard_num_batches", "plan_epoch", "PlannedBatch",
           "ShardedSource", "celeba_batch", "taskonomy_batch", "flip_rows", "resize_like_reference",
           "resize_taskonomy", "fits_on_device", "log"]
