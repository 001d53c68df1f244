"""fastdmtg.pipelines: every backend against the reference decoders, on tiny official-format
datasets written here (tests/celeba_fixture.py, tests/taskonomy_fixture.py).

Checked per backend: exactly the reference samples and labels in exactly the reference order
(``MemorySource`` over ``celeba.load_image`` decodes; ``TaskonomySource`` over ``taskonomy.prepare``),
flips consistent between the image and every map (normal x negated), DDP shards covering each
sample once per epoch with equal batch counts in training, determinism given a seed, resume
``skip``, and errors naming corrupt files.

FFCV's checks run in ONE child process (``_ffcv_results``): several FFCV Loaders in one process can
raise a numba finalizer KeyError at garbage collection, which pytest would attribute to whatever
test happens to be running; in a child it cannot touch another test, and a hung FFCV writer is
killed by the timeout. Backends that are installed are never skipped; one that is not installed
is skipped with the reason (CI installs both: .ci/install-pipelines.sh).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdmtg.config import DataConfig
from fastdmtg.data import MemorySource, epoch_permutation, num_batches
from fastdmtg.data import celeba as cb
from fastdmtg.data import taskonomy as tx
from fastdmtg import pipelines as P
from fastdmtg.pipelines import common as C

sys.path.insert(0, str(Path(__file__).parent))
from celeba_fixture import write_celeba  # noqa: E402
from taskonomy_fixture import write_fixture  # noqa: E402

CELEBA_N = 40          # 20 train / 10 val / 10 test
CELEBA_SIZE = 32
TX_RAW, TX_SIZE = 32, 16
IN_PROCESS = ["gpu-cache", "torch", "dali"]


def _installed(name):
    ok, why = P.backend_status(name, deep=False)   # cheap: no ffcv import (numba JIT) in this process
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why))


BACKENDS = [_installed(b) for b in IN_PROCESS]


# ------------------------------------------------------------------------------------------------
# data + references (shared with the FFCV child process through a JSON of paths)
# ------------------------------------------------------------------------------------------------
def make_data(base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    cel = base / "celeba"
    write_celeba(cel, n=CELEBA_N, seed=1)
    fx = write_fixture(base / "txraw", layout="domain", size=TX_RAW, samples_per_building=4, seed=2)
    return {"celeba": str(cel), "tx_root": str(fx["root"]), "tx_split": str(fx["split_file"]),
            "cache": str(base / "cache")}


def celeba_cfg(d, backend, **kw):
    c = DataConfig(dataset="celeba", root=d["celeba"], tasks="celeba9", image_size=CELEBA_SIZE, backend="torch",
                   cache_dir=d["cache"], num_workers=0)
    c.backend = backend        # set after validation: DataConfig may not list the pipeline backends yet
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def tx_cfg(d, backend, **kw):
    c = DataConfig(dataset="taskonomy", root=d["tx_root"], image_size=TX_SIZE, tasks="taskonomy5", backend="torch",
                   cache_dir=d["cache"], num_workers=0, taskonomy_split_file=d["tx_split"])
    c.backend = backend
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def celeba_reference(d, split="train") -> MemorySource:
    """The reference decoding: celeba.load_image of every file, in a MemorySource."""
    idx = cb.CelebAIndex(d["celeba"], DataConfig(tasks="celeba9").task_names())
    x = np.stack([cb.load_image(p, CELEBA_SIZE) for p in idx.image_paths(split)])
    from fastdmtg.tasks.attributes import AttributeTaskSet
    return MemorySource({split: (torch.from_numpy(x), torch.from_numpy(idx.labels(split)))},
                        AttributeTaskSet(idx.task_names), CELEBA_SIZE)


def tx_reference(d):
    """The reference: taskonomy.prepare's arrays read by TaskonomySource (flips included)."""
    return tx.build_source(tx_cfg(d, "torch"), progress=False)


def assert_same_batch(a: dict, b: dict, what=""):
    assert torch.equal(a["image"], b["image"]), f"{what}: images differ"
    assert a["image"].is_contiguous(), f"{what}: image not contiguous NCHW"
    if "labels" in b:
        assert torch.equal(a["labels"], b["labels"]) and a["labels"].dtype == torch.int64, f"{what}: labels"
    else:
        assert torch.equal(a["mask"], b["mask"]), f"{what}: mask"
        assert a["targets"].keys() == b["targets"].keys()
        for k in b["targets"]:
            assert a["targets"][k].dtype == b["targets"][k].dtype, f"{what}: {k} dtype"
            assert torch.equal(a["targets"][k], b["targets"][k]), f"{what}: target {k} differs"


def sample_key(batch: dict, j: int) -> str:
    """Identity of sample j of a batch (its un-flipped image bytes: the fixtures' images are random)."""
    return hashlib.sha1(batch["image"][j].numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# checks, used in-process and by the FFCV child
# ------------------------------------------------------------------------------------------------
def check_matches_reference(d, backend, dataset):
    src = P.build_source(celeba_cfg(d, backend) if dataset == "celeba" else tx_cfg(d, backend), progress=False)
    ref = celeba_reference(d) if dataset == "celeba" else tx_reference(d)
    bs = 7 if dataset == "celeba" else 3
    for epoch in (0, 1):
        for train, shuffle in ((True, True), (False, True), (False, False)):
            got = list(src.batches("train", bs, shuffle=shuffle, seed=5, epoch=epoch, train=train))
            want = list(ref.batches("train", bs, shuffle=shuffle, seed=5, epoch=epoch, train=train))
            assert len(got) == len(want) == src.num_batches("train", bs, train), (len(got), len(want))
            for i, (a, b) in enumerate(zip(got, want)):
                assert_same_batch(a, b, f"{backend}/{dataset} epoch {epoch} train={train} batch {i}")
    # val / test splits too (no shuffling)
    for split in ("val", "test"):
        got = [b["image"].shape[0] for b in src.batches(split, 4, shuffle=False)]
        assert sum(got) == src.num_samples(split)


def check_flip_consistency(d, backend, dataset):
    kw = {"flip": True}
    cfg = celeba_cfg(d, backend) if dataset == "celeba" else tx_cfg(d, backend)
    src = P.build_source(cfg, progress=False, **kw)
    n = src.num_samples("train")
    flips = tx.flip_flags(n, 9, 0).numpy()
    assert flips.any() and not flips.all()
    # same order (shuffle, seed 9) with and without the train augmentation
    aug = list(src.batches("train", n, shuffle=True, seed=9, epoch=0, train=True))[0]
    plain = list(src.batches("train", n, shuffle=True, seed=9, epoch=0, train=False))[0]
    for j in range(n):
        f = (lambda x: x.flip(-1)) if flips[j] else (lambda x: x)
        assert torch.equal(aug["image"][j], f(plain["image"][j]))
        if dataset == "celeba":
            assert torch.equal(aug["labels"][j], plain["labels"][j])
            continue
        assert torch.equal(aug["mask"][j], f(plain["mask"][j]))
        for t, v in plain["targets"].items():
            want = f(v[j])
            if t == "normal" and flips[j]:
                want = want.clone()
                want[0] = -want[0]
            assert torch.equal(aug["targets"][t][j], want), (t, j)


def check_sharding(d, backend, dataset):
    cfg = celeba_cfg(d, backend) if dataset == "celeba" else tx_cfg(d, backend)
    src = P.build_source(cfg, progress=False, flip=False)
    n = src.num_samples("train")
    everything = sorted(sample_key(b, j) for b in src.batches("train", n, shuffle=False) for j in range(len(b["image"])))
    assert len(set(everything)) == n
    for world, bs in ((2, 3), (3, 2)):
        for epoch in (0, 1):
            seen_eval, seen_train, counts = [], [], []
            for r in range(world):
                ev = list(src.batches("train", bs, shuffle=True, seed=1, epoch=epoch, rank=r, world_size=world))
                tr = list(src.batches("train", bs, shuffle=True, seed=1, epoch=epoch, train=True, rank=r,
                                      world_size=world))
                assert len(tr) == src.num_batches("train", bs, True, rank=r, world_size=world)
                assert all(len(b["image"]) <= bs for b in ev + tr) and all(len(b["image"]) >= 2 for b in tr)
                seen_eval += [sample_key(b, j) for b in ev for j in range(len(b["image"]))]
                seen_train += [sample_key(b, j) for b in tr for j in range(len(b["image"]))]
                counts.append(len(tr))
            assert sorted(seen_eval) == everything                         # eval: each sample exactly once
            assert len(set(counts)) == 1                                   # train: same number of steps per rank
            assert len(set(seen_train)) == len(seen_train)                 # train: no repeats (no padding) ...
            assert n - len(seen_train) <= 2 * world - 1                    # ... and at most 2W-1 left out


def check_determinism_and_skip(d, backend, dataset):
    cfg = celeba_cfg(d, backend) if dataset == "celeba" else tx_cfg(d, backend)
    a = list(P.build_source(cfg, progress=False).batches("train", 3, shuffle=True, seed=4, epoch=2, train=True))
    b_src = P.build_source(cfg, progress=False)
    b = list(b_src.batches("train", 3, shuffle=True, seed=4, epoch=2, train=True))
    for x, y in zip(a, b):
        assert_same_batch(x, y, "same seed")
    c = list(b_src.batches("train", 3, shuffle=True, seed=5, epoch=2, train=True))
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, c)), "another seed, another order"
    resumed = list(b_src.batches("train", 3, shuffle=True, seed=4, epoch=2, train=True, skip=2))
    assert len(resumed) == len(a) - 2
    for x, y in zip(resumed, a[2:]):
        assert_same_batch(x, y, "skip")
    assert list(b_src.batches("train", 3, shuffle=True, seed=4, epoch=2, train=True, skip=len(a))) == []


def check_training_identical(d, backend, tmp: Path):
    """A short DMTG run through the Trainer (fastdmtg.data.build_data → build_source) gives exactly
    the losses and validation results of the same run on the memory backend."""
    from fastdmtg.config import Config, ModelConfig, TrainConfig
    from fastdmtg.train import train

    def run(be):
        cfg = Config(data=celeba_cfg(d, be), model=ModelConfig(width=4, branches=2),
                     train=TrainConfig(epochs=2, batch_size=6, eval_batch_size=8, device="cpu", progress=False,
                                       tensorboard=False))
        out = tmp / f"run-{be}"
        train(cfg, out)
        return [(h["train_loss"], h["val"]) for h in json.loads((out / "history.json").read_text())]
    assert run(backend) == run("memory")


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pipelines"))


# ------------------------------------------------------------------------------------------------
# the plan (pure functions)
# ------------------------------------------------------------------------------------------------
def test_plan_single_process_equals_fastdmtg_data():
    for n in range(1, 30):
        for bs in (1, 2, 3, 7, 32):
            for train in (False, True):
                pos = C.shard_positions(n, bs, train, 0, 1)
                assert len(pos) == num_batches(n, bs, train) == C.shard_num_batches(n, bs, train)
                flat = np.concatenate(pos) if pos else np.zeros(0, int)
                assert (flat == np.arange(len(flat))).all()          # contiguous batches, epoch order
    plan = C.plan_epoch(10, 3, shuffle=True, seed=2, epoch=1, train=False, skip=0, rank=0, world=1, flip=False)
    assert (np.concatenate([p.index for p in plan]) == epoch_permutation(10, 2, 1).numpy()).all()


def test_plan_sharding_rules():
    for n in range(1, 60):
        for bs in (1, 2, 3, 8):
            for world in (1, 2, 3, 4):
                ev = [C.shard_positions(n, bs, False, r, world) for r in range(world)]
                flat = np.sort(np.concatenate([np.concatenate(p) for p in ev if p]))
                assert (flat == np.arange(n)).all()                       # eval: exactly once
                assert max(map(len, ev)) - min(map(len, ev)) <= 1
                for r in range(world):
                    assert len(ev[r]) == C.shard_num_batches(n, bs, False, r, world)
                tr = [C.shard_positions(n, bs, True, r, world) for r in range(world)]
                assert len({len(p) for p in tr}) == 1                     # train: same number of steps
                for r in range(world):                                    # = fastdmtg.distributed.shard + num_batches
                    mine = np.arange(n)[r::world][: n // world]
                    want = [mine[b * bs:(b + 1) * bs] for b in range(num_batches(len(mine), bs, True))]
                    assert [p.tolist() for p in tr[r]] == [w.tolist() for w in want]
                    assert len(tr[r]) == C.shard_num_batches(n, bs, True, r, world)
                used = np.concatenate([np.concatenate(p) for p in tr if p]) if tr[0] else np.zeros(0, int)
                assert len(np.unique(used)) == len(used)                  # no padding
                assert n - len(used) <= 2 * world - 1
                if bs >= 2:
                    assert all(len(b) >= 2 for p in tr for b in p)        # no batch of one in training


def test_resolve_shard(monkeypatch):
    assert C.resolve_shard() == (0, 1)
    assert C.resolve_shard(1, 4) == (1, 4)
    with pytest.raises(ValueError):
        C.resolve_shard(4, 4)
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    assert C.resolve_shard() == (2, 3)


def test_implicit_ddp_matches_memory_source_and_leaves_eval_whole(data, monkeypatch):
    """Under torch.distributed (faked: rank 1 of 2) training batches equal the trainer's memory
    source's for that rank, and evaluation is not sharded (rank 0 evaluates the whole split)."""
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    src, ref = P.build_source(celeba_cfg(data, "gpu-cache"), progress=False), celeba_reference(data)
    for bs in (3, 4, 9):
        got = list(src.batches("train", bs, shuffle=True, seed=2, epoch=1, train=True))
        want = list(ref.batches("train", bs, shuffle=True, seed=2, epoch=1, train=True))
        assert len(got) == len(want) == src.num_batches("train", bs, True) == ref.num_batches("train", bs, True)
        for a, b in zip(got, want):
            assert_same_batch(a, b, f"ddp rank 1 bs {bs}")
    ev = list(src.batches("train", 4, shuffle=False))
    assert sum(len(b["image"]) for b in ev) == src.num_samples("train") and src.num_batches("train", 4) == len(ev)


def test_unknown_backend_and_dataset(data):
    with pytest.raises(ValueError, match="data.backend"):
        P.build_source(celeba_cfg(data, "nope"), progress=False)
    with pytest.raises(ValueError, match="memory"):
        P.build_source(DataConfig(dataset="synthetic", backend="torch"), progress=False)
    assert P.backend_status("torch") == (True, "built in")


# ------------------------------------------------------------------------------------------------
# in-process backends (gpu-cache, torch, dali)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["celeba", "taskonomy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(data, backend, dataset):
    check_matches_reference(data, backend, dataset)


@pytest.mark.parametrize("dataset", ["celeba", "taskonomy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_consistency(data, backend, dataset):
    check_flip_consistency(data, backend, dataset)


@pytest.mark.parametrize("dataset", ["celeba", "taskonomy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharding_covers_each_sample_once(data, backend, dataset):
    check_sharding(data, backend, dataset)


@pytest.mark.parametrize("dataset", ["celeba", "taskonomy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_and_skip(data, backend, dataset):
    check_determinism_and_skip(data, backend, dataset)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_identical_to_memory_backend(data, backend, tmp_path):
    check_training_identical(data, backend, tmp_path)


def test_taskonomy_defaults_to_flips_celeba_does_not(data):
    assert P.build_source(tx_cfg(data, "gpu-cache"), progress=False).flip is True
    assert P.build_source(celeba_cfg(data, "gpu-cache"), progress=False).flip is False


@pytest.mark.parametrize("backend", ["torch", _installed("dali")])
def test_taskonomy_from_prepared_folder(data, backend):
    """data.root = a prepared folder: torch reads its arrays; dali feeds their rows."""
    ref = tx_reference(data)
    src = P.build_source(tx_cfg(data, backend, root=str(ref.folder)), progress=False)
    for a, b in zip(src.batches("train", 4, shuffle=True, seed=3, train=True),
                    ref.batches("train", 4, shuffle=True, seed=3, train=True)):
        assert_same_batch(a, b, f"{backend} prepared")


def test_gpu_cache_falls_back_when_it_does_not_fit(data, monkeypatch, caplog):
    import logging
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 8 << 30))
    with caplog.at_level(logging.WARNING, logger="fastdmtg.pipelines"):
        assert not C.fits_on_device(10 << 20, torch.device("cuda"), 0.5, "celeba/train")
    assert "pinned host memory" in caplog.text and "celeba/train" in caplog.text
    assert C.fits_on_device(10 << 20, torch.device("cpu"), 0.5, "x")
    # the fallback paths give the same batches
    from fastdmtg.pipelines import gpu_cache
    monkeypatch.setattr(gpu_cache, "fits_on_device", lambda *a, **k: False)
    for cfg, ref in ((celeba_cfg(data, "gpu-cache"), celeba_reference(data)),
                     (tx_cfg(data, "gpu-cache"), tx_reference(data))):
        src = P.build_source(cfg, progress=False)
        for a, b in zip(src.batches("train", 3, shuffle=True, seed=1, train=True),
                        ref.batches("train", 3, shuffle=True, seed=1, train=True)):
            assert_same_batch(a, b, "fallback")


def _corrupt_celeba(base: Path) -> Path:
    root = base / "celeba_bad"
    write_celeba(root, n=8, seed=3)
    p = root / "img_align_celeba" / "000002.jpg"          # partition 0: train
    p.write_bytes(p.read_bytes()[:300])                   # truncated JPEG
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_is_named(tmp_path, backend):
    root = _corrupt_celeba(tmp_path)
    cfg = celeba_cfg({"celeba": str(root), "cache": str(tmp_path / "c")}, backend)
    with pytest.raises(cb.CelebAFormatError, match="000002.jpg"):
        src = P.build_source(cfg, progress=False)
        for _ in src.batches("train", 4, shuffle=False):
            pass


@pytest.mark.parametrize("backend", ["torch", _installed("dali")])
@pytest.mark.parametrize("case", ["truncated", "eight_bit_depth"])
def test_corrupt_png_is_named(tmp_path, backend, case):
    fx = write_fixture(tmp_path / "raw", size=TX_RAW, samples_per_building=2, seed=4)
    bad = fx["root"] / "depth_zbuffer" / "alpha" / "point_1_view_0_domain_depth_zbuffer.png"
    if case == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        from PIL import Image
        Image.fromarray(np.zeros((TX_RAW, TX_RAW), np.uint8)).save(bad)
    d = {"tx_root": str(fx["root"]), "tx_split": str(fx["split_file"]), "cache": str(tmp_path / "c")}
    with pytest.raises(tx.TaskonomyFormatError, match="point_1_view_0_domain_depth_zbuffer.png"):
        for _ in P.build_source(tx_cfg(d, backend), progress=False).batches("train", 4, shuffle=False):
            pass


# ------------------------------------------------------------------------------------------------
# FFCV, in a child process
# ------------------------------------------------------------------------------------------------
FFCV_CASES = [f"{c}/{ds}" for c in ("matches_reference", "flip_consistency", "sharding", "determinism_and_skip")
              for ds in ("celeba", "taskonomy")] + ["training", "write_beton", "corrupt_beton", "jpeg_mode", "prepare_cli"]


def _ffcv_case(d: dict, case: str, tmp: Path):
    name, _, ds = case.partition("/")
    if ds:
        return {"matches_reference": check_matches_reference, "flip_consistency": check_flip_consistency,
                "sharding": check_sharding, "determinism_and_skip": check_determinism_and_skip}[name](d, "ffcv", ds)
    from fastdmtg.pipelines import ffcv_source as F
    if name == "training":
        check_training_identical(d, "ffcv", tmp)
    elif name == "write_beton":
        x = np.random.default_rng(0).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
        y = np.arange(12, dtype=np.int16).reshape(6, 2)
        with pytest.raises(ValueError, match="dtype"):
            F.write_beton(tmp / "a.beton", {"image": x, "labels": y.astype(np.uint64)})
        with pytest.raises(ValueError, match="rows"):
            F.write_beton(tmp / "a.beton", {"image": x, "labels": y[:5]})
        with pytest.raises(ValueError, match="image field"):
            F.write_beton(tmp / "a.beton", {"image": x.astype(np.int16), "labels": y})
        # a worker that dies mid-write: FFCV alone would wait forever; we raise, and leave no file
        orig = F._Rows.__getitem__

        def boom(self, i):
            if i == 3:
                self.failed.set()
                raise RuntimeError("boom")
            return orig(self, i)
        F._Rows.__getitem__ = boom
        try:
            with pytest.raises(P.PipelineError, match="writer worker failed"):
                F.write_beton(tmp / "b.beton", {"image": x, "labels": y}, num_workers=1)
        finally:
            F._Rows.__getitem__ = orig
        assert not (tmp / "b.beton").exists() and not list(tmp.glob(".b.beton.tmp*"))
        p = F.write_beton(tmp / "c.beton", {"image": x, "labels": y}, num_workers=1)
        r = F.check_beton(p, {"image": "image", "labels": "ndarray"}, 6)
        assert r.num_samples == 6
    elif name == "corrupt_beton":
        src = P.build_source(celeba_cfg(d, "ffcv"), progress=False)
        path = src.beton("val")
        bad = tmp / "bad.beton"
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(P.PipelineError, match="bad.beton"):
            F.check_beton(bad)
        bad.write_bytes(b"\0" * 10)
        with pytest.raises(P.PipelineError, match="bad.beton"):
            F.check_beton(bad)
        # a corrupt cached .beton is reported, naming it, before FFCV reads it
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        fresh = P.build_source(celeba_cfg(d, "ffcv"), progress=False)
        with pytest.raises(P.PipelineError, match=path.name):
            list(fresh.batches("val", 4, shuffle=False))
        path.unlink()                                        # rewritten on next use
    elif name == "jpeg_mode":
        # JPEG storage is lossy: same labels and order, images close to the reference
        spec = P.build_source(celeba_cfg(d, "ffcv"), progress=False).spec
        src = F.FfcvSource(spec, image_mode="jpg", jpeg_quality=95, num_workers=1, progress=False)
        ref = celeba_reference(d)
        for a, b in zip(src.batches("train", 8, shuffle=True, seed=1), ref.batches("train", 8, shuffle=True, seed=1)):
            assert torch.equal(a["labels"], b["labels"])
            assert (a["image"] - b["image"]).abs().mean() < 0.06
    elif name == "prepare_cli":
        out = tmp / "betons"
        rc = F.prepare_ffcv_main(["--format", "ffcv", "taskonomy", d["tx_root"], str(out), "--image-size", str(TX_SIZE),
                                  "--split-file", d["tx_split"], "--cache-dir", d["cache"], "--no-progress",
                                  "--splits", "val"])
        assert rc == 0 and len(list(out.glob("taskonomy_val_*.beton"))) == 1
        assert F.prepare_ffcv_main(["celeba", str(tmp / "missing"), "--no-progress"]) == 2


def _ffcv_child(spec_json: str):
    """Entry point of the child process: run every FFCV case, write {case: error or None}."""
    spec = json.loads(spec_json)
    d, out, tmp = spec["data"], Path(spec["out"]), Path(spec["tmp"])
    torch.set_num_threads(1)
    results = {}
    for case in FFCV_CASES:
        t = tmp / case.replace("/", "_")
        t.mkdir(parents=True, exist_ok=True)
        try:
            _ffcv_case(d, case, t)
            results[case] = None
        except BaseException:
            results[case] = traceback.format_exc()
        out.write_text(json.dumps(results))   # after every case: a timeout still reports the finished ones
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def _ffcv_results(data, tmp_path_factory):
    ok, why = P.backend_status("ffcv", deep=False)
    if not ok:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("ffcv")
    out = tmp / "results.json"
    spec = json.dumps({"data": data, "out": str(out), "tmp": str(tmp)})
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_pipelines as t; t._ffcv_child(sys.argv[2])")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), spec], env=env,
                              capture_output=True, text=True, timeout=240)
        tail = (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        tail = f"the FFCV child timed out after 240 s\n{(e.stdout or b'')[-2000:]!r}"
    results = json.loads(out.read_text()) if out.exists() else {}
    return results, tail


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", FFCV_CASES)
def test_ffcv(_ffcv_results, case):
    results, tail = _ffcv_results
    assert case in results, f"FFCV child did not run {case}:\n{tail}"
    assert results[case] is None, results[case]
