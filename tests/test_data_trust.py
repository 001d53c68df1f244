"""Regression tests for data that could be silently wrong: caches keyed by what they were decoded
from and checked before use, prepared folders that say when they are incomplete, every split
validated before the first step, DDP shards of every dataset, the backend that really ran.

Each test goes through an interface that predates the loader rewrite where one exists
(``fastdmtg.pipelines.build_source`` with gpu-cache/torch, ``fastdmtg.train.train``/``Trainer``,
``fastdmtg bench``'s stepper, the CLI), so it also states what the earlier code got wrong.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdmtg.config import Config, DataConfig, GroupingConfig, ModelConfig, OptimConfig, TrainConfig
from fastdmtg.methods.dmtg import DMTGConfig
from fastdmtg.data import celeba as cb
from fastdmtg.data import taskonomy as tx
from fastdmtg import pipelines as P

sys.path.insert(0, str(Path(__file__).parent))
from celeba_fixture import write_celeba  # noqa: E402
from taskonomy_fixture import path_of, write_fixture, write_png  # noqa: E402

SIZE = 32


def celeba_cfg(root, cache, backend="gpu-cache", **kw) -> DataConfig:
    return DataConfig(dataset="celeba", root=str(root), tasks="celeba9", image_size=SIZE, backend=backend,
                      cache_dir=str(cache), num_workers=0, **kw)


def reference_images(root: Path, split: str) -> torch.Tensor:
    """Every image of ``split`` decoded on its own by ``celeba.load_image``, as the batches give it."""
    idx = cb.CelebAIndex(root, None)
    return torch.from_numpy(np.stack([cb.load_image(p, SIZE) for p in idx.image_paths(split)])).float() / 255


def images(src, split: str) -> torch.Tensor:
    return torch.cat([b["image"] for b in src.batches(split, 5, shuffle=False)])


def cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.npy") if p.stat().st_size > 1000)


# ------------------------------------------------------------------------------------------------
# the CelebA decode cache
# ------------------------------------------------------------------------------------------------
def test_same_relative_root_from_two_folders_does_not_share_a_cache(tmp_path, monkeypatch, caplog):
    """`--data-root data/celeba` from two working folders, one cache dir: each run decodes its own
    images (the cache was keyed by the paths as typed: the second run trained on the first one's
    images with its own labels), into its own cache entry (going back to the first folder finds its
    cache intact)."""
    for i, where in enumerate(("a", "b")):
        write_celeba(tmp_path / where / "data" / "celeba", n=8, seed=10 + i)
    cache = tmp_path / "cache"
    for where, typed in (("a", "data/celeba"), ("b", "data/celeba"), ("a", "data/celeba"),
                         ("a", str(tmp_path / "a" / "data" / "celeba")), ("a", "./data/../data/celeba")):
        monkeypatch.chdir(tmp_path / where)
        with caplog.at_level(logging.WARNING):
            src = P.build_source(celeba_cfg(typed, cache), progress=False)
            assert torch.equal(images(src, "train"), reference_images(tmp_path / where / "data" / "celeba", "train"))
    assert "decoding it again" not in caplog.text             # one entry per folder, however it is typed
    assert len(list(cache.iterdir())) == 2


def test_image_changed_after_caching_is_decoded_again(tmp_path, caplog):
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    write_celeba(root, n=8, seed=1)
    images(P.build_source(celeba_cfg(root, cache), progress=False), "train")
    from PIL import Image
    img = root / "img_align_celeba" / "000002.jpg"
    Image.fromarray(np.zeros((218, 178, 3), np.uint8)).save(img, quality=90)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="fastdmtg.data"):
        got = images(P.build_source(celeba_cfg(root, cache), progress=False), "train")
    assert torch.equal(got, reference_images(root, "train")) and float(got[1].abs().sum()) == 0
    assert "stale: its source files changed" in caplog.text and "train" in caplog.text


def test_image_deleted_after_caching_is_an_error_naming_it(tmp_path):
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    write_celeba(root, n=8, seed=1)
    images(P.build_source(celeba_cfg(root, cache), progress=False), "train")
    (root / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(cb.CelebAFormatError, match="000003.jpg: image listed in the annotations is missing"):
        images(P.build_source(celeba_cfg(root, cache), progress=False), "train")


@pytest.mark.parametrize("damage", ["garbled", "truncated", "empty"])
def test_damaged_cache_is_never_used(tmp_path, caplog, damage):
    """Garbled bytes (same size), a truncated file or an empty one: decoded again with a log line
    naming the file; the batches are the reference's (garbled bytes were used, different results,
    exit 0; truncated: `mmap length is greater than file size` without a file name; empty: EOFError
    after epoch 1 had trained)."""
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    write_celeba(root, n=12, seed=2)
    images(P.build_source(celeba_cfg(root, cache), progress=False), "val")
    files = cache_files(cache)
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        if damage == "garbled":
            data[-200:] = bytes(x ^ 0x5A for x in data[-200:])
        elif damage == "truncated":
            data = data[: len(data) // 2]
        else:
            data = bytearray()
        f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        got = images(P.build_source(celeba_cfg(root, cache), progress=False), "val")
    assert torch.equal(got, reference_images(root, "val"))
    damaged = [f for f in files if f.parent.name == "val"]
    assert damaged and all(str(f.parent) in caplog.text for f in damaged), caplog.text
    assert "decoding it again" in caplog.text


def test_damaged_manifests_are_rewritten(tmp_path, caplog):
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    write_celeba(root, n=8, seed=2)
    P.build_source(celeba_cfg(root, cache), progress=False, validate=True)
    folder = next(cache.iterdir())
    (folder / "index.json").write_text("{oops")
    (folder / "val" / "meta.json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING):
        src = P.build_source(celeba_cfg(root, cache), progress=False, validate=True)
    assert torch.equal(images(src, "val"), reference_images(root, "val"))
    assert "index.json: not valid JSON" in caplog.text and "val/meta.json: not a split manifest" in caplog.text
    assert P.verify_path(folder) == (1, [])


def test_data_verify_command(tmp_path, capsys):
    from fastdmtg.cli import main
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    write_celeba(root, n=8, seed=1)
    P.build_source(celeba_cfg(root, cache), progress=False, validate=True)
    assert main(["data", "verify", str(cache)]) == 0
    assert "ok:" in capsys.readouterr().out
    f = cache_files(cache)[0]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1                                               # one bit of the payload
    f.write_bytes(bytes(data))
    assert main(["data", "verify", str(cache)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {f}: checksum" in out
    assert main(["data", "verify", str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# prepared Taskonomy folders
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tx_raw(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("txraw") / "raw", size=SIZE, samples_per_building=2, seed=5)


def _tx_run_cfg(root, split_file, **data_kw) -> Config:
    return Config(name="tx", data=DataConfig(dataset="taskonomy", root=str(root), image_size=SIZE, tasks="taskonomy5",
                                             num_workers=0, taskonomy_split_file=str(split_file), **data_kw),
                  model=ModelConfig(arch="xception", branches=2, shared_blocks=11),
                  dmtg=DMTGConfig(tau=4.0), optim=OptimConfig(name="adam", lr=1e-3, schedule="none"),
                  train=TrainConfig(epochs=1, batch_size=2, eval_batch_size=2, device="cpu", progress=False,
                                    tensorboard=False))


def test_empty_prepared_file_stops_the_run_before_training(tx_raw, tmp_path):
    """A zero-byte .npy in the val split of a prepared folder: an error naming it, before any step
    (it was an EOFError traceback after epoch 1 had trained)."""
    from fastdmtg.train import train
    prep = tx.prepare(tx_raw["root"], tmp_path / "prep", SIZE, split_file=tx_raw["split_file"], workers=1,
                      progress=False)
    (prep / "val" / "normal.npy").write_bytes(b"")
    with pytest.raises(tx.TaskonomyFormatError, match=r"val/normal.npy: 0 bytes, the manifest says \d+ .*"
                                                      r"re-run `fastdmtg prepare taskonomy"):
        train(_tx_run_cfg(prep, tx_raw["split_file"]), tmp_path / "run")
    assert not (tmp_path / "run" / "history.json").exists()
    assert P.verify_path(prep)[1] and "normal.npy" in P.verify_path(prep)[1][0]


def test_partial_prepared_folder_says_prepare_did_not_finish(tx_raw, tmp_path):
    prep = tx.prepare(tx_raw["root"], tmp_path / "prep", SIZE, split_file=tx_raw["split_file"], workers=1,
                      progress=False)
    (prep / "index.json").unlink()                      # what an interrupted prepare leaves (index.json is last)
    with pytest.raises(tx.TaskonomyFormatError, match=r"prepare did not finish \(no index.json\): re-run "
                                                      r"`fastdmtg prepare taskonomy ROOT OUT`"):
        P.build_source(_tx_run_cfg(prep, tx_raw["split_file"]).data, progress=False)
    shutil.rmtree(prep / "test")
    (prep / ".test.tmp-999999").mkdir()
    n, problems = P.verify_path(prep)
    assert problems and "prepare did not finish" in problems[0]


def test_raw_png_changed_after_caching_is_prepared_again(tx_raw, tmp_path, caplog):
    root = tmp_path / "raw"
    shutil.copytree(tx_raw["root"], root)
    cfg = _tx_run_cfg(root, tx_raw["split_file"], cache_dir=str(tmp_path / "cache")).data
    P.build_source(cfg, progress=False, validate=True)
    f = path_of(root, "domain", "rgb", "charlie", 1, 0)
    write_png(f, np.zeros((SIZE, SIZE, 3), np.uint8))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="fastdmtg.data"):
        src = P.build_source(cfg, progress=False, validate=True)
    assert "stale" in caplog.text and "val" in caplog.text
    assert float(next(iter(src.batches("val", 1, shuffle=False)))["image"].abs().sum()) == 0


# ------------------------------------------------------------------------------------------------
# validation before the first step
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,image", [("val", "000006.jpg"), ("test", "000008.jpg")])
@pytest.mark.parametrize("backend", ["gpu-cache", "torch"])
def test_bad_image_in_an_eval_split_stops_the_run_before_training(tmp_path, split, image, backend):
    """A truncated image in val (found after epoch 1 had trained) or test (after every epoch): the
    run stops before its first step — setting up the trainer fails — naming the file."""
    from fastdmtg.train import Trainer, train
    root = tmp_path / "celeba"
    write_celeba(root, n=8, seed=3)                      # 4 train / 2 val / 2 test
    p = root / "img_align_celeba" / image
    p.write_bytes(p.read_bytes()[:300])
    cfg = Config(data=celeba_cfg(root, tmp_path / "cache", backend), model=ModelConfig(width=4, branches=2),
                 train=TrainConfig(epochs=2, batch_size=2, device="cpu", progress=False, tensorboard=False))
    with pytest.raises(cb.CelebAFormatError, match=f"{image}: unreadable or truncated image"):
        Trainer(cfg, tmp_path / "setup")
    with pytest.raises(cb.CelebAFormatError, match=f"{image}: unreadable or truncated image"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "history.json").exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ------------------------------------------------------------------------------------------------
# the backend that ran
# ------------------------------------------------------------------------------------------------
def test_trainer_torch_backend_on_a_raw_taskonomy_root_decodes_pngs(tx_raw, tmp_path):
    """data.backend=torch on a raw root: the trainer's source is the DataLoader over the PNGs (a PNG
    changed between two passes shows up; nothing is prepared). It used to prepare a cache and
    read .npy rows."""
    from fastdmtg.train import Trainer
    root = tmp_path / "raw"
    shutil.copytree(tx_raw["root"], root)
    trainer = Trainer(_tx_run_cfg(root, tx_raw["split_file"], backend="torch", cache_dir=str(tmp_path / "c")),
                      tmp_path / "run", progress=False)
    src = trainer.data
    assert type(src).__name__ == "TorchSource" and src.decodes_files("train")
    first = next(iter(src.batches("train", 1, shuffle=False)))["image"]
    write_png(path_of(root, "domain", "rgb", "alpha", 1, 0), np.zeros((SIZE, SIZE, 3), np.uint8))
    again = next(iter(src.batches("train", 1, shuffle=False)))["image"]
    assert float(first.abs().sum()) > 0 and float(again.abs().sum()) == 0
    assert not (tmp_path / "c").exists() and not (root / ".fastdmtg_cache").exists()


@pytest.mark.parametrize("recipe", ["taskonomy5_k3", "celeba9_k3"])
def test_bench_reference_row_runs_the_torch_backend_over_raw_files(tmp_path, recipe):
    """bench step's "reference style … (PNG/JPEG decode)" row: the source that runs decodes the raw
    files (for Taskonomy it used to time .npy memmap reads)."""
    from fastdmtg import bench, testing
    from fastdmtg.config import apply_overrides, get_recipe
    sets = (["data.image_size=32", "train.batch_size=2", "model.branches=2", "model.shared_blocks=11"]
            if recipe.startswith("taskonomy") else ["data.image_size=32", "train.batch_size=4", "model.width=4"])
    cfg = apply_overrides(get_recipe(recipe), sets + [])
    raw = tmp_path / "raw"
    if recipe.startswith("taskonomy"):
        testing.write_taskonomy_raw(raw, n=4, side=64)
    else:
        raw.mkdir()
        testing.write_celeba_raw(raw, 10)
    step, info = bench.build_stepper(cfg, torch.device("cpu"), loader="torch", raw_root=raw, num_workers=0)
    src = info["source"]
    assert next(iter(src.batches("train", 2, shuffle=False)))["image"].shape == (2, 3, 32, 32)
    assert type(src).__name__ == "TorchSource" and src.decodes_files("train")
    assert "decodes the files of every batch" in src.describe()
    assert not any(raw.rglob("*.npy"))


def test_loader_benchmark_rows_name_the_source_that_ran(tmp_path):
    """benchmarks/loaders.py: each row carries the class and backend of the source that ran, and
    where gpu-cache really held the data."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("loaders_bench", Path(__file__).parents[1] / "benchmarks" / "loaders.py")
    lb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lb)
    root = tmp_path / "celeba"
    write_celeba(root, n=12, seed=1)
    cfg = celeba_cfg(root, tmp_path / "cache", "torch")
    rows = lb.bench_dataset("CelebA", cfg, 3, "resnet_celeba", 4, 2, 1, ["gpu-cache", "memory", "torch"],
                            with_step=False)
    assert [(r["backend"], r["source_class"], r["ran"]) for r in rows] == [
        ("gpu-cache", "ResidentSource", "gpu-cache"), ("memory", "ResidentSource", "memory"),
        ("torch", "TorchSource", "torch")]
    assert "held in host memory" in rows[0]["source"] and "decodes the files" in rows[2]["source"]
    assert all(r["samples"] == 6 for r in rows)


# ------------------------------------------------------------------------------------------------
# DDP on Taskonomy through the trainer
# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_ddp_taskonomy_memory_backend_shards_the_epoch(tx_raw, tmp_path):
    """2 gloo processes, Taskonomy (a prepared folder), data.backend=memory: each rank runs its shard
    (4 training samples, 2 per rank, batch 2 → 1 step per epoch); every batch used to run on every
    rank (2 steps) while num_batches said 1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    prep = tx.prepare(tx_raw["root"], tmp_path / "prep", SIZE, split_file=tx_raw["split_file"], workers=1,
                      progress=False)
    run = tmp_path / "ddp"
    sets = ["data.image_size=32", "train.batch_size=2", "train.eval_batch_size=2", "model.branches=2",
            "model.shared_blocks=11", "train.epochs=2", "train.tensorboard=false", "data.backend=memory",
            "data.num_workers=0", "train.init=scratch", "model.sync_bn=false"]   # CPU gloo: no SyncBN
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdmtg",
           "train", "--recipe", "taskonomy5_k3", "--data-root", str(prep), "--out", str(run), "--quiet",
           *[a for s in sets for a in ("--set", s)]]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stderr[-3000:]
    hist = json.loads((run / "history.json").read_text())
    assert [h["global_step"] for h in hist] == [1, 2]
    assert json.loads((run / "results.json").read_text())["speed"]["world_size"] == 2
