"""Resumes and caches that cannot lie about the data (issue 28, run/resume/cache half).

* Data fingerprints (``fastdmtg.fingerprint``): a resume or ``eval`` on a dataset whose labels.csv,
  annotation files or image list changed stops with exit 2 naming the part, or goes on with
  ``--accept-data-change`` and records the change.
* The content-true decode-cache key: new bytes with the size and mtime restored (``cp -p``) are
  decoded again; a touch without new bytes is not.
* Resume restores a stepping LR scheduler; gpu-cache's device path checks the cache's checksums.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdmtg import checkpoint as ckpt
from fastdmtg import pipelines as P
from fastdmtg.cli import main
from fastdmtg.config import DataConfig, apply_overrides, get_recipe
from fastdmtg.data import store
from fastdmtg.fingerprint import DataChanged
from fastdmtg.train import Trainer, TrainingInterrupted, train

sys.path.insert(0, str(Path(__file__).parent))
from celeba_fixture import write_celeba  # noqa: E402
from folder_fixture import write_folder  # noqa: E402

FAST = ["train.tensorboard=false", "train.progress=false"]
SPEC = {"smile": {"type": "binary"}, "hair": {"type": "multiclass", "classes": 3}}


def folder(root: Path, n: int = 16, seed: int = 0) -> Path:
    """A folder dataset whose PNGs are stored uncompressed: new pixels keep the file's size."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        split = "train" if i < n // 2 else ("val" if i < 3 * n // 4 else "test")
        rows.append([f"img/{i:03d}.png", split, ["no", "yes"][i % 2], str(i % 3)])
    write_folder(root, ["image", "split", "smile", "hair"], rows, tasks_json=SPEC)
    for r in rows:                                     # rewrite: uncompressed (fixed size per shape)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / r[0], compress_level=0)
    return root


def folder_cfg(root: Path, cache: Path, extra=()):
    return apply_overrides(get_recipe("folder_k3"), FAST + [
        f"data.root={root}", f"data.cache_dir={cache}", "data.image_size=16", "model.width=2", "train.epochs=2",
        "train.batch_size=4", "train.eval_batch_size=4", "data.num_workers=0", *extra])


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return [x for x in err.strip().splitlines() if x.strip()][-1]


def edit_label(root: Path) -> None:
    """One training label flipped (yes ↔ no) in labels.csv."""
    lines = (root / "labels.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",no,", ",yes,") if ",no," in lines[1] else lines[1].replace(",yes,", ",no,")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# data fingerprints
# ------------------------------------------------------------------------------------------------
def test_resume_after_labels_changed_stops_naming_the_file_unless_accepted(tmp_path, capsys):
    root, cache, run = folder(tmp_path / "d"), tmp_path / "c", tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(folder_cfg(root, cache), run, stop_after_steps=3)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    edit_label(root)
    rc, _, err = cli(capsys, "train", "--resume", run, "--quiet")
    line = last_line(err)
    assert rc == 2 and line.startswith(f"error: {run}: the data changed since the run recorded it (labels.csv: sha1 ")
    assert "--accept-data-change" in line and "images" not in line and "tasks.json" not in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == before          # nothing trained or written
    rc, out, err = cli(capsys, "train", "--resume", run, "--quiet", "--accept-data-change")
    assert rc == 0, err
    res = json.loads((run / "results.json").read_text())
    hist = json.loads((run / "history.json").read_text())
    ch = [c for c in res["config_changes"] if c["field"] == "data: labels.csv"]
    assert len(ch) == 1 and ch[0]["old"] != ch[0]["new"] and ch[0]["epoch"] == 2 and ch[0]["global_step"] == 3
    assert ch == [c for c in hist[1].get("config_changes", []) if c["field"].startswith("data: ")]
    assert res["data_fingerprint"]["labels.csv"] == ch[0]["new"]


def test_refused_resume_of_a_finished_run_leaves_its_results_in_place(tmp_path, capsys):
    """A finished run continued for more epochs moves its results to previous/<n>/ — but only once the
    continuation has passed every start-up check: a resume refused for changed data (exit 2) leaves
    results.json and the grouped model where they were, and ``eval`` still works."""
    root, cache, run = folder(tmp_path / "d"), tmp_path / "c", tmp_path / "run"
    train(folder_cfg(root, cache, ["train.epochs=1"]), run)
    files = {f: (run / f).read_bytes() for f in ("results.json", "grouped_model.json")}
    edit_label(root)
    rc, _, err = cli(capsys, "train", "--resume", run, "--quiet", "--set", "train.epochs=2")
    assert rc == 2 and "the data changed since the run recorded it" in last_line(err)
    assert {f: (run / f).read_bytes() for f in files} == files and not (run / "previous").exists()


def test_resume_names_the_changed_image_list_and_tasks_json(tmp_path):
    root, cache, run = folder(tmp_path / "d"), tmp_path / "c", tmp_path / "run"
    cfg = folder_cfg(root, cache)
    with pytest.raises(TrainingInterrupted):
        train(cfg, run, stop_after_steps=2)
    from PIL import Image
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "img" / "010.png", compress_level=0)   # val, new size
    with pytest.raises(DataChanged, match=r"\(val images: 4 files, sha1 \w+ → 4 files, sha1 \w+; val images \(content\): \w+ → \w+\)") as e:
        Trainer(folder_cfg(root, cache), run, resume=True)
    assert "train images" not in str(e.value) and "labels.csv" not in str(e.value)
    run2 = tmp_path / "run2"
    folder(tmp_path / "d2")
    with pytest.raises(TrainingInterrupted):
        train(folder_cfg(tmp_path / "d2", cache), run2, stop_after_steps=2)
    (tmp_path / "d2" / "tasks.json").write_text(json.dumps(dict(SPEC, smile={"type": "binary", "weight": 2.0})))
    with pytest.raises(DataChanged, match=r"\(tasks.json: sha1 \w+ → sha1 \w+\)"):
        Trainer(folder_cfg(tmp_path / "d2", cache), run2, resume=True)
    ckpt.RunLock(run2).release()


def test_eval_on_changed_data_stops_unless_accepted_and_a_moved_folder_is_the_same_data(tmp_path, capsys):
    root, cache, run = folder(tmp_path / "d"), tmp_path / "c", tmp_path / "run"
    train(folder_cfg(root, cache, ["train.epochs=1"]), run)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)                       # same names (relative), sizes and bytes
    rc, _, err = cli(capsys, "eval", run, "--quiet", "--data-root", moved)
    assert rc == 0, err
    edit_label(moved)
    rc, _, err = cli(capsys, "eval", run, "--quiet", "--data-root", moved)
    line = last_line(err)
    assert rc == 2 and "the data changed since the run recorded it (labels.csv: " in line
    rc, _, err = cli(capsys, "eval", run, "--quiet", "--data-root", moved, "--accept-data-change")
    assert rc == 0, err
    ev = json.loads((run / "eval_test.json").read_text())
    assert [c["part"] for c in ev["data_changes"]] == ["labels.csv"]


def test_celeba_fingerprint_names_the_annotation_file_that_changed(tmp_path):
    """CelebA's parts: the attribute and partition files by content, the image list by names and sizes."""
    from fastdmtg.data import open_dataset
    from fastdmtg.fingerprint import changes
    root = tmp_path / "celeba"
    write_celeba(root, n=8, seed=1)
    cfg = DataConfig(dataset="celeba", root=str(root), tasks="celeba9", image_size=16)
    fp0 = open_dataset(cfg, progress=False).fingerprint()
    assert set(fp0) == {"list_attr_celeba.txt", "list_eval_partition.txt", "train images", "val images",
                        "test images"}
    part = root / "list_eval_partition.txt"
    part.write_text(part.read_text() + "\n")           # same partition, other bytes
    fp1 = open_dataset(cfg, progress=False).fingerprint()
    assert [k for k, _, _ in changes(fp0, fp1)] == ["list_eval_partition.txt"]
    img = root / "img_align_celeba" / "000001.jpg"
    img.write_bytes(img.read_bytes() + b"\0")          # one image one byte longer (train)
    fp2 = open_dataset(cfg, progress=False).fingerprint()
    assert [k for k, _, _ in changes(fp1, fp2)] == ["train images"]


def test_taskonomy_raw_fingerprint_names_its_split_file(tmp_path):
    from fastdmtg.data import taskonomy as tx
    from fastdmtg.fingerprint import changes
    from taskonomy_fixture import write_fixture
    fx = write_fixture(tmp_path / "raw", size=32, samples_per_building=2, seed=4)
    ds = tx.TaskonomyDataset.from_raw(fx["root"], ["depth_zbuffer"], 16, split_file=fx["split_file"])
    fp0 = ds.fingerprint()
    Path(fx["split_file"]).write_text(Path(fx["split_file"]).read_text() + " ")
    ds = tx.TaskonomyDataset.from_raw(fx["root"], ["depth_zbuffer"], 16, split_file=fx["split_file"])
    assert [k for k, _, _ in changes(fp0, ds.fingerprint())] == ["split file"]


# ------------------------------------------------------------------------------------------------
# the content-true decode cache key
# ------------------------------------------------------------------------------------------------
def _images(root: Path, cache: Path) -> torch.Tensor:
    cfg = DataConfig(dataset="folder", root=str(root), image_size=16, backend="gpu-cache", cache_dir=str(cache),
                     num_workers=0, folder_tasks={})
    src = P.build_source(cfg, progress=False)
    return torch.cat([b["image"] for b in src.batches("train", 4, shuffle=False)])


@pytest.mark.parametrize("settled", [True, False])
def test_new_bytes_with_size_and_mtime_restored_are_decoded_again(tmp_path, caplog, monkeypatch, settled):
    """``cp -p`` / ``rsync -a`` of new pixels: same size, same mtime (os.utime). The key was name + size
    + mtime: the cache served the old pixels. ``settled``: the files are older than store.RACY_NS
    (ctime decides); else they are recorded as unsettled (their CRC decides)."""
    if settled:
        monkeypatch.setattr(store, "RACY_NS", 0)
    root, cache = folder(tmp_path / "d"), tmp_path / "c"
    first = _images(root, cache)
    img = root / "img" / "002.png"
    st = img.stat()
    from PIL import Image
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(img, compress_level=0)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size == st.st_size and img.stat().st_mtime_ns == st.st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="fastdmtg.data"):
        got = _images(root, cache)
    assert torch.equal(got[2], torch.full((3, 16, 16), 7 / 255)) and not torch.equal(got[2], first[2])
    assert torch.equal(got[[0, 1, 3]], first[[0, 1, 3]])
    assert "002.png: other bytes" in caplog.text and "decoding it again" in caplog.text


def test_touch_without_new_bytes_keeps_the_cache(tmp_path, caplog, monkeypatch):
    """A new mtime and ctime with the same bytes (touch, chmod, a copy): the CRCs match, nothing is
    decoded again, the record is updated (the next start takes the fast path)."""
    monkeypatch.setattr(store, "RACY_NS", 0)
    root, cache = folder(tmp_path / "d"), tmp_path / "c"
    first = _images(root, cache)
    npy = next(cache.rglob("train/image.npy"))
    made = npy.stat().st_mtime_ns, npy.stat().st_ino
    img = root / "img" / "001.png"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="fastdmtg.data"):
        got = _images(root, cache)
    assert torch.equal(got, first) and "decoding it again" not in caplog.text
    assert "touched but not changed" in caplog.text
    assert (npy.stat().st_mtime_ns, npy.stat().st_ino) == made
    meta = json.loads((npy.parent / "meta.json").read_text())
    from fastdmtg.data.folder import FolderDataset
    assert meta["key"] == FolderDataset(root, None, 16).split_key("train")          # refreshed: fast path next


def test_unsettled_files_are_recorded_so(tmp_path):
    """A file changed within store.RACY_NS of its record may change again in the same ctime tick: its
    ctime is recorded as -1 and the split's key as unsettled (never equal to a fresh key)."""
    root, cache = folder(tmp_path / "d"), tmp_path / "c"
    _images(root, cache)
    split = next(cache.rglob("train/sources.json")).parent
    rec = json.loads((split / "sources.json").read_text())["files"]
    assert rec and all(r[3] == -1 for r in rec)
    assert json.loads((split / "meta.json").read_text())["key"].get("unsettled") is True


# ------------------------------------------------------------------------------------------------
# tests that were missing
# ------------------------------------------------------------------------------------------------
def test_resume_restores_a_stepping_scheduler(tmp_path):
    """StepLR every 2 epochs: a resume in epoch 2 that rebuilt the scheduler instead of loading its
    state would not decay after epoch 2 (its count restarts) — other LRs, other results."""
    cfg = lambda: apply_overrides(get_recipe("synthetic_k3"), FAST + [
        "data.synthetic_train=128", "data.synthetic_val=32", "data.synthetic_test=32", "train.batch_size=32",
        "model.width=2", "data.image_size=16", "train.epochs=4", "optim.schedule=step", "optim.step_epochs=2",
        "optim.gamma=0.5"])
    ref = train(cfg(), tmp_path / "ref")
    lrs = [h["lr"] for h in json.loads((tmp_path / "ref" / "history.json").read_text())]
    assert lrs == [0.01, 0.01, 0.005, 0.005]                # the lr each epoch trained with
    with pytest.raises(TrainingInterrupted):
        train(cfg(), tmp_path / "cut", stop_after_steps=6)  # in epoch 2 (4 steps per epoch)
    got = train(cfg(), tmp_path / "cut", resume=True)
    hist = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["lr"] for h in hist] == lrs
    drop = ("train_time_s", "speed", "env")
    assert {k: v for k, v in got.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}


def test_gpu_cache_on_the_device_checks_the_cache_checksums(tmp_path, monkeypatch, caplog):
    """gpu-cache's device branch (a split that fits in device memory) reads the cache with its CRC
    checked; here the device is stood in for on a CPU (``device.type == "cuda"``, ``fits`` true,
    ``.to(device)`` a no-op). Garbled cache bytes (same size) must be decoded again, not used."""
    from fastdmtg.pipelines import resident
    root, cache = folder(tmp_path / "d"), tmp_path / "c"
    first = _images(root, cache)
    npy = next(cache.rglob("train/image.npy"))
    data = bytearray(npy.read_bytes())
    data[-64:] = bytes(x ^ 0x5A for x in data[-64:])
    npy.write_bytes(bytes(data))

    class StandIn:                       # a "cuda" device whose tensors stay where they are
        type = "cuda"

        def __str__(self):
            return "cuda:0"

    class Stay(torch.Tensor):
        def to(self, *a, **k):
            return torch.Tensor(self) if a and isinstance(a[0], StandIn) else super().to(*a, **k)

    monkeypatch.setattr(resident, "fits", lambda *a, **k: True)
    monkeypatch.setattr(resident, "to_tensor", lambda a: torch.from_numpy(np.ascontiguousarray(a)).as_subclass(Stay))
    cfg = DataConfig(dataset="folder", root=str(root), image_size=16, backend="gpu-cache", cache_dir=str(cache),
                     num_workers=0, folder_tasks={})
    src = P.build_source(cfg, progress=False)
    with caplog.at_level(logging.WARNING):
        where, held = src.held("train", StandIn())
    assert where == "device"
    assert torch.equal(held["image"].float() / 255, first) and "damaged" in caplog.text
