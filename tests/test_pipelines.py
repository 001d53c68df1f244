"""fastdmtg.pipelines: every dataset × backend against the reference decoding, on tiny data written here
(the synthetic generator; tests/celeba_fixture.py; tests/taskonomy_fixture.py as a raw root and as a
prepared folder).

Checked per pair: exactly the reference samples, labels and flips in exactly the reference order
(the reference: the format's own decoder on each sample — ``celeba.load_image``, Taskonomy's
``decode_sample``, the prepared or generated arrays — batched by the plan's rules written out here
by hand), ``num_batches`` = what is yielded, resume ``skip``, val/test splits, the source class that
ran. DDP (2 gloo processes under torchrun, one launch for every pair): see ``test_ddp_*``.

FFCV runs in child processes (``_ffcv_results``, and the DDP launch): several FFCV Loaders in one
process can raise a numba finalizer KeyError at garbage collection, which pytest would attribute to
whatever test happens to be running; every FFCV case has its own time limit (tests/case_runner.py:
a hang dumps the stacks and ends the child, that case fails with the stacks, and a new child runs
the cases after it; the DDP launch has a limit per pair). Backends that are installed are never skipped; one that is not installed is
skipped with the reason (CI installs both: .ci/install-pipelines.sh).
"""
from __future__ import annotations

import faulthandler
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
from fastdmtg.data import open_dataset
from fastdmtg.data import celeba as cb
from fastdmtg.data import taskonomy as tx
from fastdmtg.data.folder import write_demo
from fastdmtg import pipelines as P
from fastdmtg.pipelines import plan as plan_mod
from fastdmtg.pipelines.source import to_tensor

sys.path.insert(0, str(Path(__file__).parent))
from case_runner import hang_message, run_cases  # noqa: E402
from celeba_fixture import write_celeba  # noqa: E402
from taskonomy_fixture import write_fixture  # noqa: E402

CELEBA_N = 40          # 20 train / 10 val / 10 test
CELEBA_SIZE = 32
TX_RAW, TX_SIZE = 32, 16
DATASETS = ["synthetic", "celeba", "taskonomy", "taskonomy-prepared", "folder"]
IN_PROCESS = ["gpu-cache", "memory", "torch", "dali"]
CLASS = {"gpu-cache": P.ResidentSource, "memory": P.ResidentSource, "torch": P.TorchSource, "ffcv": P.FfcvSource,
         "dali": P.DaliSource}
BATCH = {"synthetic": 4, "celeba": 7, "taskonomy": 3, "taskonomy-prepared": 3, "folder": 5}


def _installed(name):
    ok, why = P.backend_status(name, deep=False)   # cheap: no ffcv import (numba JIT) in this process
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why))


BACKENDS = [_installed(b) for b in IN_PROCESS]


# ------------------------------------------------------------------------------------------------
# data + references (shared with the child processes through a JSON of paths)
# ------------------------------------------------------------------------------------------------
def make_data(base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    cel = base / "celeba"
    write_celeba(cel, n=CELEBA_N, seed=1)
    fx = write_fixture(base / "txraw", layout="domain", size=TX_RAW, samples_per_building=4, seed=2)
    prep = base / "txprep"
    tx.prepare(fx["root"], prep, TX_SIZE, split_file=fx["split_file"], domains=tx.needed_domains(tx.TASK_DOMAIN),
               workers=1, progress=False)
    # your own tasks (DIR/labels.csv): binary, multiclass and regression columns, 5 % of the cells empty
    folder = write_demo(base / "folder", n_train=21, n_eval=7, size=20, seed=3)
    return {"celeba": str(cel), "tx_root": str(fx["root"]), "tx_split": str(fx["split_file"]), "tx_prep": str(prep),
            "folder": str(folder), "cache": str(base / "cache")}


def cfg_for(d: dict, dataset: str, backend: str, **kw) -> DataConfig:
    common = dict(backend=backend, cache_dir=d["cache"], num_workers=0)
    if dataset == "synthetic":
        c = dict(dataset="synthetic", image_size=16, synthetic_groups=2, synthetic_tasks_per_group=2,
                 synthetic_train=21, synthetic_val=7, synthetic_test=6)
    elif dataset == "celeba":
        c = dict(dataset="celeba", root=d["celeba"], tasks="celeba9", image_size=CELEBA_SIZE)
    elif dataset == "folder":
        c = dict(dataset="folder", root=d["folder"], image_size=16)
    else:
        c = dict(dataset="taskonomy", root=d["tx_root"] if dataset == "taskonomy" else d["tx_prep"],
                 image_size=TX_SIZE, tasks="taskonomy5", taskonomy_split_file=d["tx_split"])
    return DataConfig(**{**c, **common, **kw})


def reference_batches(ds, split: str, bs: int, *, shuffle: bool, seed: int, epoch: int, train: bool,
                      flip: bool) -> list[dict]:
    """The reference: every sample decoded on its own by the format's decoder (``ds.sample``), in the
    order and batches of the single-process rule — order = the (seed, epoch) permutation, batches of
    ``bs`` consecutive positions, in training a last batch of one sample dropped."""
    n = ds.num_samples(split)
    order = (plan_mod.epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)).tolist()
    flags = plan_mod.flip_flags(n, seed, epoch) if (flip and train) else None
    nb = n // bs + (1 if n % bs and not (train and n % bs == 1) else 0)
    out, read = [], ds.sample_reader(split)
    for b in range(nb):
        pos = list(range(b * bs, min(n, (b + 1) * bs)))
        rows = [read(order[p]) for p in pos]
        raw = {k: to_tensor(np.stack([r[k] for r in rows])) for k in ds.fields}
        f = flags[pos] if flags is not None else None
        out.append(ds.to_batch(raw, f if f is not None and bool(f.any()) else None))
    return out


def assert_same_batch(a: dict, b: dict, what=""):
    assert a.keys() == b.keys(), what
    assert torch.equal(a["image"], b["image"]), f"{what}: images differ"
    assert a["image"].is_contiguous() and a["image"].dtype == torch.float32, f"{what}: image not contiguous float"
    if "labels" in b:
        assert torch.equal(a["labels"], b["labels"]) and a["labels"].dtype == torch.int64, f"{what}: labels"
    elif torch.is_tensor(b["targets"]):                 # your own tasks: (B, N) float32, NaN = missing
        assert a["targets"].dtype == torch.float32 and a["targets"].shape == b["targets"].shape, what
        assert torch.equal(a["targets"].isnan(), b["targets"].isnan()), f"{what}: missing labels differ"
        assert torch.equal(a["targets"].nan_to_num(-7.0), b["targets"].nan_to_num(-7.0)), f"{what}: targets"
    else:
        assert torch.equal(a["mask"], b["mask"]), f"{what}: mask"
        assert a["targets"].keys() == b["targets"].keys()
        for k in b["targets"]:
            assert a["targets"][k].dtype == b["targets"][k].dtype, f"{what}: {k} dtype"
            assert torch.equal(a["targets"][k], b["targets"][k]), f"{what}: target {k} differs"


# ------------------------------------------------------------------------------------------------
# checks, used in-process and by the FFCV child
# ------------------------------------------------------------------------------------------------
def check_pair(d: dict, dataset: str, backend: str, light: bool = False):
    """Same batches as the reference (values, order, flips) for train/eval, two epochs; val/test;
    num_batches = yielded; resume skip; the source class that ran. ``light``: fewer passes (FFCV
    compiles a loader per batch size and sample count)."""
    src = P.build_source(cfg_for(d, dataset, backend), progress=False, validate=True)
    assert type(src) is CLASS[backend] and src.backend == backend, (type(src), src.backend)
    ds = open_dataset(cfg_for(d, dataset, backend), progress=False)          # opened independently
    bs = BATCH[dataset]
    assert src.flip == ds.default_flip == (dataset.startswith("taskonomy"))   # the references' choices
    modes = ((0, True, True), (1, False, False)) if light else ((0, True, True), (1, True, True), (1, False, True),
                                                                 (0, False, False))
    for epoch, train, shuffle in modes:
        got = list(src.batches("train", bs, shuffle=shuffle, seed=5, epoch=epoch, train=train))
        want = reference_batches(ds, "train", bs, shuffle=shuffle, seed=5, epoch=epoch, train=train,
                                 flip=src.flip)
        assert len(got) == len(want) == src.num_batches("train", bs, train), (len(got), len(want))
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_batch(a, b, f"{backend}/{dataset} epoch {epoch} train={train} batch {i}")
    for split in ("val",) if light else ("val", "test"):
        got = list(src.batches(split, 4, shuffle=False))
        want = reference_batches(ds, split, 4, shuffle=False, seed=0, epoch=0, train=False, flip=False)
        assert len(got) == len(want) == src.num_batches(split, 4)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_batch(a, b, f"{backend}/{dataset} {split} batch {i}")
    # resume: skip=k gives exactly the rest of the uninterrupted epoch
    full = list(src.batches("train", 2, shuffle=True, seed=4, epoch=2, train=True))
    rest = list(src.batches("train", 2, shuffle=True, seed=4, epoch=2, train=True, skip=3))
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:]):
        assert_same_batch(a, b, f"{backend}/{dataset} skip")
    assert list(src.batches("train", 2, shuffle=True, seed=4, epoch=2, train=True, skip=len(full))) == []


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pipelines"))


def test_implicit_ddp_leaves_eval_whole(data, monkeypatch):
    """Under torch.distributed (faked: rank 1 of 2) training batches are this rank's shard, and
    evaluation is not sharded (rank 0 evaluates the whole split)."""
    import torch.distributed as dist
    src = P.build_source(cfg_for(data, "celeba", "memory"), progress=False)
    explicit = [b["labels"] for b in src.batches("train", 3, shuffle=True, seed=2, epoch=1, train=True,
                                                 rank=1, world_size=2)]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    got = [b["labels"] for b in src.batches("train", 3, shuffle=True, seed=2, epoch=1, train=True)]
    assert len(got) == len(explicit) == src.num_batches("train", 3, True) == 3      # 20 // 2 = 10 → 3+3+3(+1 dropped)
    assert all(torch.equal(a, b) for a, b in zip(got, explicit))
    ev = list(src.batches("train", 4, shuffle=False))
    assert sum(len(b["image"]) for b in ev) == src.num_samples("train") and src.num_batches("train", 4) == len(ev)


def test_unknown_backend_and_dataset(data):
    with pytest.raises(ValueError, match="data.backend"):
        DataConfig(backend="nope")
    with pytest.raises(ValueError, match="data.dataset: expected synthetic|celeba|taskonomy"):
        DataConfig(dataset="mydata")
    assert P.backend_status("torch") == (True, "built in") and P.backend_status("memory")[0]


def test_missing_package_is_a_clear_error(data, monkeypatch):
    monkeypatch.setattr(P, "backend_status", lambda name, deep=True: (False, "ffcv is not importable (test)"))
    with pytest.raises(P.PipelineError, match=r"data.backend=ffcv: ffcv is not importable \(test\); or use "
                                              r"data.backend=gpu-cache\|memory\|torch"):
        P.build_source(cfg_for(data, "celeba", "ffcv"), progress=False)


# ------------------------------------------------------------------------------------------------
# every dataset × in-process backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_matches_reference(data, backend, dataset):
    check_pair(data, dataset, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_on_cuda(data, backend, dataset):
    """On the GPU: gpu-cache holds the data on the device, every backend's batches land on it and
    equal the CPU reference — exactly, except DALI's GPU JPEG decoder (nvJPEG), whose IDCT may round
    differently from libjpeg: within 2/255 there, labels and order exact."""
    dev = torch.device("cuda")
    src = P.build_source(cfg_for(data, dataset, backend), progress=False, validate=True, device=dev)
    ds = open_dataset(cfg_for(data, dataset, backend), progress=False)
    got = list(src.batches("train", BATCH[dataset], shuffle=True, seed=5, epoch=1, device=dev, train=True))
    want = reference_batches(ds, "train", BATCH[dataset], shuffle=True, seed=5, epoch=1, train=True, flip=src.flip)
    assert len(got) == len(want) == src.num_batches("train", BATCH[dataset], True)
    if backend == "gpu-cache":
        assert src.placement["train"] == "device"
    for i, (a, b) in enumerate(zip(got, want)):
        assert a["image"].device.type == "cuda"
        a = {k: (v.cpu() if torch.is_tensor(v) else {t: x.cpu() for t, x in v.items()}) for k, v in a.items()}
        if backend == "dali" and dataset == "celeba":
            assert torch.equal(a["labels"], b["labels"])
            assert (a["image"] - b["image"]).abs().max() <= 2 / 255 + 1e-6, f"batch {i}"
        else:
            assert_same_batch(a, b, f"{backend}/{dataset} cuda batch {i}")


def test_auto_is_gpu_cache(data):
    src = P.build_source(cfg_for(data, "synthetic", "auto"), progress=False)
    assert type(src) is P.ResidentSource and src.backend == "gpu-cache"


def test_torch_backend_decodes_the_files_of_every_batch(data, tmp_path):
    """data.backend=torch on a raw root reads the raw files at every batch (a file changed between two
    epochs shows up), and writes no cache; on a prepared folder it reads its rows."""
    import shutil
    root = tmp_path / "raw"
    shutil.copytree(data["tx_root"], root)
    cfg = cfg_for(data, "taskonomy", "torch", root=str(root), cache_dir=str(tmp_path / "cache"))
    src = P.build_source(cfg, progress=False)
    assert type(src) is P.TorchSource and src.decodes_files("train")
    before = next(iter(src.batches("train", 1, shuffle=False)))["image"]
    ds = src.dataset
    first = Path(ds.items("train")[0]["rgb"])
    from taskonomy_fixture import write_png
    write_png(first, np.zeros((TX_RAW, TX_RAW, 3), np.uint8))
    after = next(iter(src.batches("train", 1, shuffle=False)))["image"]
    assert before.abs().sum() > 0 and after.abs().sum() == 0
    assert not (tmp_path / "cache").exists() and not (root / ".fastdmtg_cache").exists()
    prep = P.build_source(cfg_for(data, "taskonomy-prepared", "torch"), progress=False)
    assert not prep.decodes_files("train") and "reads rows" in prep.describe()


def test_resident_moves_down_when_it_does_not_fit(data, monkeypatch, caplog):
    """gpu-cache: a split that does not fit on the device is held in host memory, one that does not
    fit there either is streamed from the memory-mapped cache — each with a log line — and the
    batches stay the reference's."""
    import logging
    from fastdmtg.pipelines import resident, source
    assert source.fits(10 << 20, torch.device("cpu"), 0.5, "x")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 8 << 30))
    with caplog.at_level(logging.WARNING, logger="fastdmtg.pipelines"):
        assert not source.fits(10 << 20, torch.device("cuda"), 0.5, "celeba/train")
    assert "celeba/train needs 0.01 GiB" in caplog.text
    for dataset in ("celeba", "taskonomy"):
        ds = open_dataset(cfg_for(data, dataset, "gpu-cache"), progress=False)
        monkeypatch.setattr(resident, "fits", lambda *a, **k: False)
        src = P.build_source(cfg_for(data, dataset, "gpu-cache", num_workers=1), progress=False)
        got = list(src.batches("train", 3, shuffle=True, seed=1, train=True))
        assert src.placement["train"] == "stream" and "streamed" in src.describe()
        for a, b in zip(got, reference_batches(ds, "train", 3, shuffle=True, seed=1, epoch=0, train=True,
                                               flip=src.flip)):
            assert_same_batch(a, b, f"{dataset} streamed")


def _corrupt_celeba(base: Path) -> Path:
    root = base / "celeba_bad"
    write_celeba(root, n=8, seed=3)
    p = root / "img_align_celeba" / "000006.jpg"          # partition 1: val
    p.write_bytes(p.read_bytes()[:300])                   # truncated JPEG
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_in_val_is_named_before_any_batch(tmp_path, backend):
    root = _corrupt_celeba(tmp_path)
    cfg = cfg_for({"celeba": str(root), "cache": str(tmp_path / "c")}, "celeba", backend)
    with pytest.raises(cb.CelebAFormatError, match="000006.jpg: unreadable or truncated"):
        P.build_source(cfg, progress=False, validate=True)


@pytest.mark.parametrize("backend", ["torch", _installed("dali")])
@pytest.mark.parametrize("case", ["truncated", "eight_bit_depth"])
def test_corrupt_png_is_named_by_the_batch_that_reads_it(tmp_path, backend, case):
    """Without validation (data.validate=false) the backends that decode per batch name the file too."""
    fx = write_fixture(tmp_path / "raw", size=TX_RAW, samples_per_building=2, seed=4)
    bad = fx["root"] / "depth_zbuffer" / "alpha" / "point_1_view_0_domain_depth_zbuffer.png"
    if case == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        from PIL import Image
        Image.fromarray(np.zeros((TX_RAW, TX_RAW), np.uint8)).save(bad)
    d = {"tx_root": str(fx["root"]), "tx_split": str(fx["split_file"]), "cache": str(tmp_path / "c")}
    with pytest.raises(tx.TaskonomyFormatError, match="point_1_view_0_domain_depth_zbuffer.png"):
        for _ in P.build_source(cfg_for(d, "taskonomy", backend), progress=False).batches("train", 4, shuffle=False):
            pass


@pytest.fixture(scope="module")
def memory_history(data, tmp_path_factory):
    """The short run on the memory backend: the reference of every other backend's run (trained once
    for all of them, the FFCV child's included)."""
    return training_history(data, "memory", tmp_path_factory.mktemp("train-memory"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "memory"])
def test_training_identical_to_memory_backend(data, memory_history, backend, tmp_path):
    """A short DMTG run through the Trainer gives exactly the losses and validation results of the
    same run on the memory backend."""
    assert training_history(data, backend, tmp_path) == memory_history


def training_history(d, backend, tmp: Path) -> list:
    """[train_loss, val] per epoch of a short DMTG run (2 epochs) on ``backend``, as history.json holds
    them (JSON values: the same after a trip through the FFCV child's arguments). One torch thread:
    the reference is trained once, in this process, and compared with runs here and in the child."""
    from fastdmtg.config import Config, ModelConfig, TrainConfig
    from fastdmtg.train import train
    cfg = Config(data=cfg_for(d, "celeba", backend), model=ModelConfig(width=4, branches=2),
                 train=TrainConfig(epochs=2, batch_size=6, eval_batch_size=8, device="cpu", progress=False,
                                   tensorboard=False))
    out = tmp / f"run-{backend}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the same float reductions in this process and in the FFCV child
    try:
        train(cfg, out)
    finally:
        torch.set_num_threads(threads)
    return [[h["train_loss"], h["val"]] for h in json.loads((out / "history.json").read_text())]


# ------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes, every pair, one torchrun launch
# ------------------------------------------------------------------------------------------------
def _image_key(img_u8: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img_u8).tobytes()).hexdigest()[:16]


def ddp_child(spec_json: str) -> None:
    """One rank (under torchrun): for every pair, the training epoch's sample ids per batch,
    ``num_batches``, and the same after a resume skip; written after every pair. Each pair has a
    time limit: a hang dumps the stacks and ends the process."""
    import torch.distributed as dist
    spec = json.loads(spec_json)
    d, out = spec["data"], Path(spec["out"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    res = {}
    for pair in spec["pairs"]:
        dataset, backend = pair.split("/")
        faulthandler.dump_traceback_later(spec["limit"], exit=True)
        try:
            cfg = cfg_for(d, dataset, backend)
            src = P.build_source(cfg, progress=False, flip=False, validate=True)   # flips off: ids from pixels
            ds = src.dataset
            img = next(k for k, f in ds.fields.items() if f.kind == "image")
            read = ds.sample_reader("train")
            ids = {_image_key(read(i)[img]): i for i in range(ds.num_samples("train"))}
            bs = BATCH[dataset] - 1

            def epoch(skip=0):
                return [[ids[_image_key((b["image"][j] * 255).round().to(torch.uint8).numpy())]
                         for j in range(len(b["image"]))]
                        for b in src.batches("train", bs, shuffle=True, seed=3, epoch=1, train=True, skip=skip)]
            res[pair] = {"batches": epoch(), "resumed": epoch(skip=1), "num_batches": src.num_batches("train", bs, True),
                         "n": ds.num_samples("train"), "bs": bs, "class": type(src).__name__}
        except BaseException:
            res[pair] = {"error": traceback.format_exc()}
        faulthandler.cancel_dump_traceback_later()
        Path(out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _torchrun_pairs(data, tmp: Path, pairs: list[str], limit: int, timeout: int):
    spec = json.dumps({"data": data, "out": str(tmp), "pairs": pairs, "limit": limit})
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_pipelines as t; t.ddp_child(sys.argv[2])"
    script = tmp / "child.py"
    script.write_text(code)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(Path(__file__).parent), spec]
    try:
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (p.stdout + p.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        tail = f"{hang_message('torchrun', timeout)}: {(e.stderr or b'')[-3000:]!r}"
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) if (tmp / f"rank{r}.json").exists() else {}
             for r in (0, 1)]
    return ranks, tail


def check_ddp(ranks, tail, pair):
    """Shards disjoint, their union the epoch (at most 2·world − 1 left out, as the plan says), the
    same number of steps on both ranks, num_batches = yielded, resume = the rest of the epoch."""
    for r in (0, 1):
        assert pair in ranks[r], f"rank {r} did not finish {pair} (time limit or crash):\n{tail}"
        assert "error" not in ranks[r][pair], ranks[r][pair].get("error")
    a, b = ranks[0][pair], ranks[1][pair]
    assert a["class"] == b["class"] == CLASS[pair.split("/")[1]].__name__
    n, bs = a["n"], a["bs"]
    for x in (a, b):
        assert len(x["batches"]) == x["num_batches"] and x["resumed"] == x["batches"][1:]
        assert all(2 <= len(bt) <= bs for bt in x["batches"])
    assert a["num_batches"] == b["num_batches"]
    sa, sb = [i for bt in a["batches"] for i in bt], [i for bt in b["batches"] for i in bt]
    assert not set(sa) & set(sb) and len(set(sa)) == len(sa) and len(set(sb)) == len(sb)
    order = plan_mod.epoch_permutation(n, 3, 1).tolist()
    assert sorted(sa + sb) == sorted(order[:len(sa) + len(sb)]) and n - len(sa) - len(sb) <= 3
    assert sa == order[0::2][:len(sa)] and sb == order[1::2][:len(sb)]


@pytest.fixture(scope="module")
def _ddp_in_process(data, tmp_path_factory):
    pairs = [f"{ds}/{be}" for ds in DATASETS for be in IN_PROCESS if P.backend_status(be, deep=False)[0]]
    return _torchrun_pairs(data, tmp_path_factory.mktemp("ddp"), pairs, limit=300, timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_two_processes(_ddp_in_process, dataset, backend):
    check_ddp(*_ddp_in_process, f"{dataset}/{backend}")


# ------------------------------------------------------------------------------------------------
# FFCV, in child processes
# ------------------------------------------------------------------------------------------------
FFCV_CASES = [f"pair/{ds}" for ds in DATASETS] + ["training", "write_beton", "corrupt_beton", "jpeg_mode",
                                                   "prepare_cli"]
FFCV_LIMIT = 300       # seconds per case: a hang guard (idle: under 30 s each)


def _ffcv_case(d: dict, case: str, tmp: Path, memory_history: list):
    name, _, ds = case.partition("/")
    if ds:
        return check_pair(d, ds, "ffcv", light=True)
    from fastdmtg.pipelines import ffcv_source as F
    if name == "training":
        assert training_history(d, "ffcv", tmp) == memory_history
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
        import logging
        cfg = cfg_for(d, "celeba", "ffcv", cache_dir=str(tmp / "cache"))
        src = P.build_source(cfg, progress=False)
        path = src.beton("val")
        want = [b["image"] for b in src.batches("val", 4, shuffle=False)]
        bad = tmp / "bad.beton"
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(P.PipelineError, match="bad.beton"):
            F.check_beton(bad)
        bad.write_bytes(b"\0" * 10)
        with pytest.raises(P.PipelineError, match="bad.beton"):
            F.check_beton(bad)
        # a truncated, garbled or manifest-less cached .beton is never read: written again, a log line names it
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("fastdmtg.pipelines").addHandler(handler)
        try:
            for damage in ("truncate", "garble", "manifest"):
                if damage == "truncate":
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                elif damage == "garble":
                    b = bytearray(path.read_bytes())
                    b[len(b) // 2:len(b) // 2 + 64] = bytes(x ^ 0xFF for x in b[len(b) // 2:len(b) // 2 + 64])
                    path.write_bytes(bytes(b))
                    assert P.verify_path(path)[1], "verify must report the garbled .beton"
                else:
                    (path.parent / (path.name + ".json")).unlink()
                records.clear()
                fresh = P.build_source(cfg, progress=False)
                got = [b["image"] for b in fresh.batches("val", 4, shuffle=False)]
                assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
                assert any(path.name in r.getMessage() for r in records), damage
        finally:
            logging.getLogger("fastdmtg.pipelines").removeHandler(handler)
        assert P.verify_path(path) == (1, [])
    elif name == "jpeg_mode":
        # JPEG storage is lossy: same labels and order, images close to the reference
        cfg = cfg_for(d, "celeba", "ffcv")
        ds = open_dataset(cfg, progress=False)
        src = F.FfcvSource(ds, cache=P.DecodeCache(ds, Path(d["cache"])), beton_dir=tmp, image_mode="jpg",
                           jpeg_quality=95, num_workers=1, progress=False)
        ref = reference_batches(ds, "train", 8, shuffle=True, seed=1, epoch=0, train=False, flip=False)
        got = list(src.batches("train", 8, shuffle=True, seed=1))
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert torch.equal(a["labels"], b["labels"])
            assert (a["image"] - b["image"]).abs().mean() < 0.06
    elif name == "prepare_cli":
        from fastdmtg.cli import prepare_ffcv_main
        out = tmp / "betons"
        rc = prepare_ffcv_main(["--format", "ffcv", "taskonomy", d["tx_root"], str(out), "--image-size", str(TX_SIZE),
                                  "--split-file", d["tx_split"], "--cache-dir", d["cache"], "--no-progress",
                                  "--splits", "val"])
        assert rc == 0 and len(list(out.glob("taskonomy_val_*.beton"))) == 1
        assert P.verify_path(out)[1] == []
        assert prepare_ffcv_main(["celeba", str(tmp / "missing"), "--no-progress"]) == 2


def _ffcv_case_entry(arg: dict, case: str) -> None:
    """One FFCV case in a child process of ``case_runner`` (its own time limit)."""
    torch.set_num_threads(1)
    t = Path(arg["tmp"]) / case.replace("/", "_")
    t.mkdir(parents=True, exist_ok=True)
    _ffcv_case(arg["data"], case, t, arg["memory_history"])


@pytest.fixture(scope="module")
def _ffcv_results(data, memory_history, tmp_path_factory):
    ok, why = P.backend_status("ffcv", deep=False)
    if not ok:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("ffcv")
    # each case in a child process under its own limit; a hung case fails alone (case_runner)
    return run_cases("test_pipelines", "_ffcv_case_entry", {"data": data, "tmp": str(tmp), "memory_history": memory_history},
                     FFCV_CASES,
                     FFCV_LIMIT, tmp / "results.json")


def test_case_runner_isolates_a_hung_case(tmp_path):
    """A case that hangs fails alone with a clear message (and its stack); the cases after it still
    run in a new child; a failing case reports its traceback."""
    res = run_cases("case_runner", "_selftest", str(tmp_path), ["a", "hang", "fail", "hang_with_child", "b"], 2,
                    tmp_path / "results.json")
    assert res["a"] is None and res["b"] is None
    # what a hung case left running is killed with it (it held the output open: the wait must not stall)
    assert "'hang_with_child' did not finish within 2 s" in res["hang_with_child"]
    assert _wait_until(lambda: not _alive(int((tmp_path / "orphan.pid").read_text())), 10)
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "ran"
    assert "'hang' did not finish within 2 s — a hang, not a wrong result" in res["hang"]
    assert "in _selftest" in res["hang"]
    assert "ValueError: planted failure" in res["fail"]


# a failed writer worker stops the write whatever the caller's SIGINT disposition or thread: the
# ways a process is started (foreground: Python's handler; background job / nohup: ignored; an
# application's own handler) and write_beton called from a thread other than the main one
WRITER_CASES = ["sigint_default", "sigint_ignored", "sigint_handler", "other_thread", "worker_killed", "worker_hangs"]
WRITER_LIMIT = 120     # seconds per case; idle about 3 s (ffcv imported in the child): a hang guard


def _writer_case(tmp: str, case: str) -> None:
    """One WRITER_CASES case, in a child of ``case_runner``: a worker fails at sample 3 (raises, is
    killed, or hangs under ``timeout=5``) → a PipelineError naming the file, no file left behind,
    no process of the writer's group left behind; then the same arrays write a readable .beton."""
    import signal
    import threading
    import multiprocessing as mp
    from fastdmtg.pipelines import ffcv_source as F
    tmp = Path(tmp) / case
    tmp.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    y = np.arange(12, dtype=np.int16).reshape(6, 2)
    seen = []
    if case == "sigint_ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    elif case == "sigint_handler":
        signal.signal(signal.SIGINT, lambda *a: seen.append(a))     # records, raises nothing
    else:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    orig = F._Rows.__getitem__

    def boom(self, i):
        if i == 3:
            if case == "worker_killed":     # dies without a word: seen by its exit code
                os.kill(os.getpid(), signal.SIGKILL)
            if case == "worker_hangs":      # never returns: write_beton's timeout, and the worker killed
                import time
                time.sleep(3600)
            return orig(self, 10 ** 9)       # IndexError inside _Rows.__getitem__, which sets ``failed``
        return orig(self, i)

    def write(name, out):
        try:
            out.append(F.write_beton(tmp / name, {"image": x, "labels": y}, num_workers=1,
                                     timeout=5 if case == "worker_hangs" else None))
        except BaseException as e:
            out.append(e)

    groups = []
    kill = getattr(F, "_kill_group", None)         # (absent before the writer ran in a child process)
    F._kill_group = lambda child: (groups.append(child.pid), kill(child))
    F._Rows.__getitem__ = boom
    try:
        out = []
        if case == "other_thread":
            t = threading.Thread(target=write, args=("b.beton", out))
            t.start()
            t.join()
        else:
            write("b.beton", out)
    finally:
        F._Rows.__getitem__ = orig
        if kill is not None:
            F._kill_group = kill
    assert isinstance(out[0], P.PipelineError), out[0]
    # the writer's process group was killed: none of its processes (FFCV's workers) is left running
    assert len(groups) == 1
    assert _wait_until(lambda: not _live_in_group(groups[0]), 30), _live_in_group(groups[0])
    why = "timed out after 5 s" if case == "worker_hangs" else "writer worker failed"
    assert "b.beton" in str(out[0]) and why in str(out[0]), out[0]
    assert not (tmp / "b.beton").exists() and not list(tmp.glob(".b.beton.tmp*"))
    assert mp.active_children() == [] and not seen
    p = F.write_beton(tmp / "c.beton", {"image": x, "labels": y}, num_workers=1)
    assert F.check_beton(p, {"image": "image", "labels": "ndarray"}, 6).num_samples == 6


def _live_in_group(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that are not zombies (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()        # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(cond, seconds: float) -> bool:
    import time
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def _writer_results(tmp_path_factory):
    ok, why = P.backend_status("ffcv", deep=False)
    if not ok:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("ffcv_writer")
    return run_cases("test_pipelines", "_writer_case", str(tmp), WRITER_CASES, WRITER_LIMIT, tmp / "results.json")


@pytest.mark.parametrize("case", WRITER_CASES)
def test_failed_writer_worker_always_stops_the_write(_writer_results, case):
    assert _writer_results[case] is None, _writer_results[case]


@pytest.mark.slow
@pytest.mark.timeout(FFCV_LIMIT * len(FFCV_CASES) + 120)
@pytest.mark.parametrize("case", FFCV_CASES)
def test_ffcv(_ffcv_results, case):
    assert _ffcv_results[case] is None, _ffcv_results[case]


@pytest.fixture(scope="module")
def _ddp_ffcv(data, tmp_path_factory):
    ok, why = P.backend_status("ffcv", deep=False)
    if not ok:
        pytest.skip(why)
    return _torchrun_pairs(data, tmp_path_factory.mktemp("ddp_ffcv"), [f"{ds}/ffcv" for ds in DATASETS],
                           limit=FFCV_LIMIT, timeout=FFCV_LIMIT * len(DATASETS) + 60)


@pytest.mark.slow
@pytest.mark.timeout(FFCV_LIMIT * len(DATASETS) + 120)
@pytest.mark.parametrize("dataset", DATASETS)
def test_ddp_two_processes_ffcv(_ddp_ffcv, dataset):
    check_ddp(*_ddp_ffcv, f"{dataset}/ffcv")
