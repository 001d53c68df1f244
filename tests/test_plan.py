"""The epoch plan (fastdmtg.pipelines.plan: order, shards, flips — pure functions) against the rules
written out by hand. Kept apart from tests/test_pipelines.py (the loaders) so that it imports
nothing but the plan: benchmarks/mutation.py runs it once per mutant of the plan."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdmtg.pipelines import plan as plan_mod


def test_plan_single_process():
    for n in range(1, 30):
        for bs in (1, 2, 3, 7, 32):
            for train in (False, True):
                pos = plan_mod.shard_positions(n, bs, train, 0, 1)
                want = n // bs + (1 if n % bs and not (train and n % bs == 1) else 0)
                assert len(pos) == want == plan_mod.shard_num_batches(n, bs, train)
                flat = np.concatenate(pos) if pos else np.zeros(0, int)
                assert (flat == np.arange(len(flat))).all()          # contiguous batches, epoch order
    p = plan_mod.plan_epoch(10, 3, shuffle=True, seed=2, epoch=1, train=False, skip=0, rank=0, world=1, flip=False)
    assert (np.concatenate([b.index for b in p]) == plan_mod.epoch_permutation(10, 2, 1).numpy()).all()
    g = torch.Generator().manual_seed(2 * 1_000_003 + 1)                    # order = f(seed, epoch) only
    assert torch.equal(plan_mod.epoch_permutation(10, 2, 1), torch.randperm(10, generator=g))


def test_plan_sharding_rules():
    for n in range(1, 60):
        for bs in (1, 2, 3, 8):
            for world in (1, 2, 3, 4):
                ev = [plan_mod.shard_positions(n, bs, False, r, world) for r in range(world)]
                flat = np.sort(np.concatenate([np.concatenate(p) for p in ev if p]))
                assert (flat == np.arange(n)).all()                       # eval: exactly once
                assert max(map(len, ev)) - min(map(len, ev)) <= 1
                for r in range(world):
                    assert len(ev[r]) == plan_mod.shard_num_batches(n, bs, False, r, world)
                tr = [plan_mod.shard_positions(n, bs, True, r, world) for r in range(world)]
                assert len({len(p) for p in tr}) == 1                     # train: same number of steps
                for r in range(world):                                    # order[r::W][:n//W], in batches
                    mine = np.arange(n)[r::world][: n // world]
                    m = len(mine)
                    nb = m // bs + (1 if m % bs and not m % bs == 1 else 0)
                    want = [mine[b * bs:(b + 1) * bs] for b in range(nb)]
                    assert [p.tolist() for p in tr[r]] == [w.tolist() for w in want]
                    assert len(tr[r]) == plan_mod.shard_num_batches(n, bs, True, r, world)
                used = np.concatenate([np.concatenate(p) for p in tr if p]) if tr[0] else np.zeros(0, int)
                assert len(np.unique(used)) == len(used)                  # no padding
                assert n - len(used) <= 2 * world - 1
                if bs >= 2:
                    assert all(len(b) >= 2 for p in tr for b in p)        # no batch of one in training


def test_plan_flips_skip_and_shard_of_a_rank():
    """Flips: the documented key (sha256 of "taskonomy-flip:seed:epoch", 63 bits) drawn at epoch
    positions, pinned to recorded values (a resumed or re-run epoch flips the same samples, across
    versions); plan_epoch: rank r's rows are order[positions], its flips flags[positions], skip drops
    whole batches."""
    import hashlib
    for seed, epoch in ((0, 0), (3, 1), (7, 12)):
        key = int.from_bytes(hashlib.sha256(f"taskonomy-flip:{seed}:{epoch}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(key % 2 ** 63)
        assert torch.equal(plan_mod.flip_flags(50, seed, epoch), torch.rand(50, generator=g) < 0.5)
    assert plan_mod.flip_flags(12, 0, 0).int().tolist() == [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    assert plan_mod.flip_flags(12, 3, 1).int().tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0]
    order = plan_mod.epoch_permutation(23, 4, 2).numpy()
    flags = plan_mod.flip_flags(23, 4, 2).numpy()
    for train in (False, True):
        for skip in (0, 1, 2):
            got = plan_mod.plan_epoch(23, 3, shuffle=True, seed=4, epoch=2, train=train, skip=skip, rank=1,
                                      world=2, flip=True)
            pos = plan_mod.shard_positions(23, 3, train, 1, 2)[skip:]
            assert [b.index.tolist() for b in got] == [order[p].tolist() for p in pos]
            assert [b.flip.tolist() for b in got] == [flags[p].tolist() for p in pos]
    unshuffled = plan_mod.plan_epoch(7, 2, shuffle=False, seed=4, epoch=2, train=False, skip=0, rank=0, world=1,
                                     flip=False)
    assert [b.index.tolist() for b in unshuffled] == [[0, 1], [2, 3], [4, 5], [6]]
    assert all(b.flip is None for b in unshuffled)
    with pytest.raises(ValueError, match="skip"):
        plan_mod.plan_epoch(7, 2, shuffle=False, seed=0, epoch=0, train=False, skip=-1, rank=0, world=1, flip=False)
    with pytest.raises(ValueError, match="batch_size"):
        plan_mod.shard_positions(7, 0, False, 0, 1)


def test_resolve_shard(monkeypatch):
    assert plan_mod.resolve_shard() == (0, 1)
    assert plan_mod.resolve_shard(0, None) == (0, 1) and plan_mod.resolve_shard(None, 3) == (0, 3)
    assert plan_mod.resolve_shard(1, 4) == (1, 4)
    with pytest.raises(ValueError):
        plan_mod.resolve_shard(4, 4)
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    assert plan_mod.resolve_shard() == (2, 3)


def test_resolve_shard_rejects_a_negative_rank_and_an_empty_world():
    for rank, world in ((-1, 4), (-1, 1), (0, 0), (1, 1), (5, 4)):
        with pytest.raises(ValueError, match=f"rank {rank} / world_size {world}"):
            plan_mod.resolve_shard(rank, world)
    assert plan_mod.resolve_shard(3, 4) == (3, 4)


def test_plan_epoch_takes_its_options_by_keyword_only():
    """n and batch_size by position or keyword; the seven options (two bools, ints that are easy to
    swap) only by keyword."""
    kw = dict(shuffle=False, seed=0, epoch=0, train=False, skip=0, rank=0, world=1, flip=False)
    want = [[0, 1], [2, 3], [4]]
    assert [b.index.tolist() for b in plan_mod.plan_epoch(5, 2, **kw)] == want
    assert [b.index.tolist() for b in plan_mod.plan_epoch(n=5, batch_size=2, **kw)] == want
    with pytest.raises(TypeError):
        plan_mod.plan_epoch(5, 2, *kw.values())


def test_annotations_resolve():
    """The annotations are valid types (they are strings until something such as typing.get_type_hints
    or a dataclass tool evaluates them)."""
    import typing
    assert typing.get_type_hints(plan_mod.resolve_shard) == {"rank": int | None, "world_size": int | None,
                                                           "return": tuple[int, int]}
    assert typing.get_type_hints(plan_mod.PlannedBatch) == {"index": np.ndarray, "flip": np.ndarray | None}
    for f in (plan_mod.epoch_permutation, plan_mod.flip_flags, plan_mod.shard_positions,
              plan_mod.shard_num_batches, plan_mod.plan_epoch):
        typing.get_type_hints(f)


def test_a_draw_of_exactly_one_half_is_not_flipped():
    """flip ⇔ u < 0.5: at (seed 32, epoch 0) the draw at position 201,925 is exactly 0.5 (found by search;
    torch.rand's float32 draws are multiples of 2⁻²⁴), so it is not flipped."""
    import hashlib
    key = int.from_bytes(hashlib.sha256(b"taskonomy-flip:32:0").digest()[:8], "little")
    u = torch.rand(201_926, generator=torch.Generator().manual_seed(key % 2 ** 63))
    assert u[201_925].item() == 0.5
    flags = plan_mod.flip_flags(201_926, 32, 0)
    assert not flags[201_925] and flags[201_920:201_925].tolist() == [True] * 5    # draws .127 .395 .140 .005 .179
