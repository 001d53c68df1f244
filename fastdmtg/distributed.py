"""DDP through torchrun.

    torchrun --nproc_per_node=G -m fastdmtg train ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup()`` then joins the process group (NCCL on
CUDA, gloo on CPU) and pins each rank to ``cuda:LOCAL_RANK``. Semantics:

* ``train.batch_size`` is per rank (the global batch is G × batch_size, as in the reference's
  "24 per GPU × 2 GPUs").
* Every epoch all ranks draw the same permutation (seeded by (seed, epoch)) and rank r takes its
  shard of it (``fastdmtg.pipelines.plan``: batch b of rank r is ``order[r::G][b·B:(b+1)·B]``): each
  sample is used at most once per epoch and every rank runs the same number of steps.
* ``dmtg.ddp_noise=shared`` (default, the release: all its ranks are seeded alike): every rank
  draws the *same* Gumbel sample — one draw per global step, so G ranks × batch b train exactly like
  one process with batch G·b (with SyncBatchNorm). ``per_rank``: rank r offsets the shared seed
  tensor by r · 2^40 and draws its own. Either way the gradient of the grouping logits S is
  all-reduced like any parameter.
* ``model.sync_bn=true`` (default, the release converts every model) converts BatchNorm to
  SyncBatchNorm under DDP — CUDA only: a CPU (gloo) run with it stops with an error and needs
  ``model.sync_bn=false``, where each rank keeps its own BatchNorm statistics (buffers are not
  broadcast; rank 0's are saved).
* The epoch's training loss (plateau schedule, best-checkpoint rule, history) is the mean over all
  ranks' samples; rank 0 validates and broadcasts the validation loss to the other ranks' schedulers.
* The global batch (G × batch_size) is printed at start and written to results.json (``batch``).
* Rank 0 evaluates, logs and writes checkpoints; other ranks wait at a barrier. Resume loads the
  same last.pt on every rank.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> torch.device:
    """Join the process group if launched by torchrun; return this rank's device."""
    if not launched_by_torchrun():
        return None
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself when not distributed). Collective: every rank
    must call it; used where rank 0 alone decides (run-folder lock, checkpoint writes, validation)
    so that the other ranks stop with it instead of waiting at the next collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_finite(value: float, device) -> bool:
    """True on every rank iff the value is finite on every rank (a NaN on one rank stops all)."""
    import math
    ok = torch.tensor(1.0 if math.isfinite(value) else 0.0, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def global_mean(total: float, count: int, device) -> float:
    """Σ total / Σ count over all ranks (this rank's numbers when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return total / max(count, 1)
    t = torch.tensor([float(total), float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]) / max(float(t[1]), 1.0)


def broadcast_float(value: float | None, device) -> float:
    """Rank 0's ``value`` on every rank (collective: every rank calls it)."""
    t = torch.tensor([float(value) if value is not None else float("nan")], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)
    return float(t[0])


def ranks_differing(t: torch.Tensor) -> list[int]:
    """The ranks whose copy of ``t`` differs from rank 0's ([] when not distributed). Collective:
    every rank must call it (rare checks only — it all-gathers the whole tensor)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.detach().to(dev, torch.float64).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]

