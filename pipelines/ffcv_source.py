"""ffcv: .beton files read by FFCV's compiled (numba) decode pipeline, then moved to the device.

Writing (``write_beton``; ``fastdmtg prepare --format ffcv`` → ``fastdmtg.cli.prepare_ffcv_main``): one .beton
per split from the dataset's decoded arrays (its decode cache, a prepared folder, or arrays in
memory), one FFCV field per dataset field, in the dataset's order:

    the image field (kind "image", (3, S, S) uint8)   RGBImageField raw (exact) or jpg (lossy)
    every other field                                 NDArrayField of its stored dtype and shape;
                                                      uint16 as its lossless int16 bit-cast (torch
                                                      has no usable uint16)

    e.g. CelebA: image (RGB), labels (N,) uint8; Taskonomy: rgb (RGB), normal/segment_semantic
    (C, S, S) uint8, depth_zbuffer/keypoints2d/edge_texture (1, S, S) int16

Each .beton gets a manifest (``cache.write_manifest``: its key, size, CRC-32) written after it; a
.beton whose manifest is missing or disagrees, or whose allocation table points past its end, is
written again (a log line names it).

Every array is validated (dtype, shape, contiguity) before FFCV sees it: FFCV's writer does not
check dtypes, and an exception in one of its worker processes leaves its parent waiting forever.
So FFCV's writer runs in a forked child process with its own process group, which the caller
watches (``_watch_writer``): a worker that raises or ends with a non-zero exit code, the child's
own error, or ``timeout`` makes the caller SIGKILL the whole group, delete the temporary file and
raise a ``PipelineError`` naming the .beton and the reason. Nothing depends on a signal reaching
the caller (SIGINT is ignored in background jobs and under nohup) nor on which thread calls.
Files are written to a temporary name and renamed, so a crash never leaves a half-written .beton
under the final name.

Reading (``FfcvSource``), per batch:

    FFCV (host, numba threads)   image: SimpleRGBImageDecoder → (B, S, S, 3) uint8 → ToTensor
                                 others: NDArrayDecoder → (B, …) → ToTensor
                                 [CUDA: ToDevice(non_blocking) on FFCV's own streams]
    device                       image permuted to (B, 3, S, S); then ``dataset.to_batch``

The order is the plan's (``plan.plan_epoch``): one Loader per (split, batch size, device, number
of samples) with ``OrderOption.SEQUENTIAL`` and its indices replaced by this epoch's shard before
each pass — FFCV's own ``distributed``/``RANDOM`` orders would differ from every other backend.
FFCV reuses its output buffers, so the conversion always produces new tensors.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from fastdmtg.data import open_dataset
from fastdmtg.data.base import uint16_as_int16

from .cache import DecodeCache, default_cache_dir, file_problem, write_manifest
from .source import LoaderBackend, PipelineError, Source, log

#: dtypes an NDArray field may have (compact and torch-convertible)
ND_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float16, np.float32)
FORMAT_VERSION = 2


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
class _Rows:
    """Indexable view FFCV's writer workers read: item i = one sample, fields in order."""

    def __init__(self, arrays: dict[str, np.ndarray], image_fields: tuple[str, ...], failed):
        self.arrays, self.image_fields, self.failed = arrays, image_fields, failed
        self.n = len(next(iter(arrays.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        try:
            out = []
            for k, a in self.arrays.items():
                row = a[i]
                if k in self.image_fields:        # (3, S, S) → (S, S, 3): what RGBImageField encodes
                    row = row.transpose(1, 2, 0)
                out.append(np.ascontiguousarray(row))
            return tuple(out)
        except BaseException:
            self.failed.set()                      # tells the parent's watchdog; then die as FFCV would
            raise


def _validate(arrays: dict[str, np.ndarray], image_fields: tuple[str, ...]) -> int:
    if not arrays:
        raise ValueError("write_beton: no fields")
    n = None
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"write_beton: field {k!r} must be a numpy array, got {type(a).__name__}")
        if n is None:
            n = a.shape[0]
        if a.shape[0] != n:
            raise ValueError(f"write_beton: field {k!r} has {a.shape[0]} rows, the first field has {n}")
        if k in image_fields:
            if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1] != 3:
                raise ValueError(f"write_beton: image field {k!r} must be (M, 3, H, W) uint8, got {a.shape} {a.dtype}")
        elif a.dtype.type not in ND_DTYPES:
            raise ValueError(f"write_beton: field {k!r} has dtype {a.dtype}; use one of "
                             f"{', '.join(np.dtype(d).name for d in ND_DTYPES)}")
        elif a.ndim < 2:
            raise ValueError(f"write_beton: field {k!r} must be (M, ...) with at least one sample dimension")
    if not n:
        raise ValueError("write_beton: zero samples")
    return n


def write_beton(path: str | Path, arrays: dict[str, np.ndarray], *, image_fields: tuple[str, ...] = ("image",),
                image_mode: str = "raw", jpeg_quality: int = 90, num_workers: int = 0,
                timeout: float | None = None, progress: bool = False) -> Path:
    """Write ``arrays`` ({field: (M, ...) array}, one row per sample, fields in file order) to an
    FFCV .beton at ``path``. ``image_fields`` are (M, 3, H, W) uint8 and become RGBImageFields
    (``image_mode`` raw | jpg); every other field becomes an NDArrayField of its dtype and row shape.
    Returns ``path``."""
    from ffcv.fields import NDArrayField, RGBImageField
    import multiprocessing as mp
    if image_mode not in ("raw", "jpg"):
        raise ValueError(f"image_mode must be raw|jpg, got {image_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    n = _validate(arrays, tuple(image_fields))
    fields = {}
    for k, a in arrays.items():
        if k in image_fields:
            fields[k] = RGBImageField(write_mode=image_mode, jpeg_quality=jpeg_quality)
        else:
            fields[k] = NDArrayField(dtype=a.dtype, shape=tuple(a.shape[1:]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    workers = num_workers or min(8, os.cpu_count() or 1)
    ctx = mp.get_context("fork")
    failed = ctx.Event()                           # set by a failing worker (or the child's worker check)
    rows = _Rows(arrays, tuple(image_fields), failed)
    chunksize = max(1, min(100, n // workers or 1))
    recv, send = ctx.Pipe(duplex=False)            # the child's error message, if it raises
    child = ctx.Process(target=_write_child, args=(str(tmp), fields, workers, rows, chunksize, progress, failed, send),
                        name="fastdmtg-beton-writer", daemon=False)
    why, said = None, {}
    try:
        child.start()
        send.close()
        try:
            os.setpgid(child.pid, child.pid)      # also done in the child; whichever runs first (no race)
        except OSError:
            pass
        why = _watch_writer(child, failed, recv, timeout, said)
    finally:
        # on failure, on timeout, or on an exception here (a real Ctrl-C): the child and every
        # writer worker it forked go, whatever their signal handlers, and the partial file with them
        if child.pid is not None and (why is not None or child.exitcode != 0):
            _kill_group(child)
            _unlink_shm(said.get("shm"))
        recv.close()
        if tmp.exists() and (why is not None or sys.exc_info()[0] is not None):
            tmp.unlink()
    if why is not None:
        raise PipelineError(f"{path}: writing the .beton failed: {why}")
    os.replace(tmp, path)
    return path


def _write_child(tmp: str, fields: dict, workers: int, rows: _Rows, chunksize: int, progress: bool,
                 failed, send) -> None:
    """The forked writer process: its own process group (the parent kills the group: this process
    and FFCV's workers), FFCV's ``DatasetWriter`` in the main thread, and a thread that sets
    ``failed`` when a worker ends with a non-zero exit code (killed, crashed) without saying so, and
    kills the group when the caller itself has died."""
    import signal
    import traceback
    os.setpgid(0, 0)
    # the parent decides when this process stops (a terminal's Ctrl-C goes to the parent's group)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the forking thread is this process's main thread
    from ffcv.writer import DatasetWriter
    import ffcv.writer as fw
    import multiprocessing as mp
    if not progress:                              # FFCV's writer always draws a progress bar
        fw.tqdm = functools.partial(fw.tqdm, disable=True)
    started: list = []                            # FFCV's workers (mp.active_children() forgets the dead ones)

    class Worker(mp.Process):
        def start(self):
            super().start()
            started.append(self)

    fw.Process = Worker                           # this process only: it ends with the write
    parent = os.getppid()

    def check_workers():
        while not failed.is_set():
            if any(p.exitcode not in (None, 0) for p in list(started)):
                failed.set()                      # a worker killed or crashed before it could say so
            if os.getppid() != parent:            # the caller is gone (killed): nobody would stop us
                os.killpg(0, signal.SIGKILL)
            time.sleep(0.1)

    class Writer(DatasetWriter):
        def prepare(self):
            super().prepare()
            # FFCV's metadata lives in shared memory, unlinked only at its end: the parent unlinks
            # it when it kills this process
            send.send(("shm", self.metadata_sm.name))

    threading.Thread(target=check_workers, daemon=True).start()
    try:
        Writer(tmp, fields, num_workers=workers).from_indexed_dataset(rows, chunksize=chunksize)
    except BaseException as e:
        traceback.print_exc()
        sys.stderr.flush()
        send.send(("error", f"{type(e).__name__}: {e}"[:2000]))
        os._exit(1)
    send.close()


def _watch_writer(child, failed, recv, timeout: float | None, said: dict) -> str | None:
    """Wait for the writer process: None when it wrote the file, else why it failed (the process
    is then still running, or has ended). ``said``: what the writer sent ({"shm": name, "error": …})."""
    t0 = time.monotonic()
    while True:
        child.join(0.1)
        try:
            while recv.poll():
                key, value = recv.recv()
                said[key] = value
        except (EOFError, OSError):
            pass
        if failed.is_set():
            return "a writer worker failed (if it raised, its traceback is above)"
        if child.exitcode is not None:
            if child.exitcode == 0:
                return None
            if "error" in said:
                return said["error"]
            return (f"the writer process was killed by signal {-child.exitcode}" if child.exitcode < 0 else
                    f"the writer process exited with status {child.exitcode}")
        if timeout is not None and time.monotonic() - t0 > timeout:
            return f"timed out after {timeout:.0f} s"


def _unlink_shm(name: str | None) -> None:
    if name is None:
        return
    from multiprocessing import shared_memory
    try:
        shared_memory.SharedMemory(name=name).unlink()
    except FileNotFoundError:                      # the writer got as far as unlinking it
        pass


def _kill_group(child) -> None:
    """SIGKILL the writer's process group (the writer and FFCV's workers), then reap the writer."""
    import signal
    # the group outlives the writer while one of its workers lives, so its id cannot be reused yet
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:                     # nothing left in the group
        pass
    except PermissionError:                        # not its own group after all: the writer alone
        child.kill()
    child.join()


def check_beton(path: str | Path, fields: dict[str, str] | None = None, num_samples: int | None = None):
    """Open a .beton and check it before FFCV's compiled readers touch it (a truncated file would
    otherwise be read out of bounds). ``fields``: {name: "image" | "ndarray"} expected, in order.
    Returns the ffcv Reader."""
    from ffcv.fields import NDArrayField, RGBImageField
    from ffcv.reader import Reader
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: missing .beton file")
    size = path.stat().st_size
    try:
        reader = Reader(str(path))
    except Exception as e:   # AssertionError (version), ValueError/IndexError (garbage header)
        raise PipelineError(f"{path}: not a readable FFCV .beton ({type(e).__name__}: {e}); delete it to rewrite") from None
    table = reader.alloc_table
    if reader.num_samples == 0 or len(table) == 0:
        raise PipelineError(f"{path}: corrupt .beton (no samples or no allocation table); delete it to rewrite")
    end = int((table["ptr"].astype(np.int64) + table["size"].astype(np.int64)).max())
    if end > size:
        raise PipelineError(f"{path}: corrupt or truncated .beton (data up to byte {end}, file has {size}); "
                            "delete it to rewrite")
    if num_samples is not None and reader.num_samples != num_samples:
        raise PipelineError(f"{path}: {reader.num_samples} samples, expected {num_samples}")
    if fields is not None:
        kinds = {"image": RGBImageField, "ndarray": NDArrayField}
        got = list(reader.handlers)
        if got != list(fields) or any(not isinstance(reader.handlers[k], kinds[v]) for k, v in fields.items()):
            raise PipelineError(f"{path}: fields {got}, expected {list(fields)}")
    return reader


# ------------------------------------------------------------------------------------------------
# dataset → .beton files
# ------------------------------------------------------------------------------------------------
def beton_fields(dataset) -> dict[str, str]:
    return {k: ("image" if f.kind == "image" else "ndarray") for k, f in dataset.fields.items()}


def split_arrays(dataset, split: str, cache) -> dict[str, np.ndarray]:
    """{field: (M, …) array} of ``split`` in field order (16-bit maps as their int16 bit-cast)."""
    a = dataset.arrays(split)
    if a is None:
        dec, table = cache.arrays(split, load=False), dataset.table(split)
        a = {k: dec[k] if k in dec else table[k] for k in dataset.fields}
    return {k: uint16_as_int16(a[k]) for k in dataset.fields}


def beton_key(dataset, split: str, image_mode: str, jpeg_quality: int) -> dict:
    """Everything a .beton's content depends on."""
    table = {}
    if dataset.arrays(split) is None:
        table = {k: f"{zlib.crc32(np.ascontiguousarray(v).reshape(-1).view(np.uint8)):08x}"
                 for k, v in dataset.table(split).items()}
    return {"v": FORMAT_VERSION, "dataset": dataset.cache_id(), "split": split, "source": dataset.split_key(split),
            "table": table, "fields": {k: [f.dtype.str, list(f.shape), f.kind] for k, f in dataset.fields.items()},
            "mode": image_mode, "q": jpeg_quality if image_mode == "jpg" else None}


def beton_path(dataset, split: str, key: dict, out_dir: Path) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(out_dir) / f"{dataset.name}_{split}_{dataset.image_size}_{key['mode']}_{digest}.beton"


def ensure_beton(dataset, split: str, cache, out_dir: Path, *, image_mode: str = "raw", jpeg_quality: int = 90,
                 num_workers: int = 0, progress: bool = True, timeout: float | None = None) -> Path:
    """The checked .beton of ``split`` (written, or written again when missing, stale or damaged)."""
    key = beton_key(dataset, split, image_mode, jpeg_quality)
    path = beton_path(dataset, split, key, out_dir)
    fields, n = beton_fields(dataset), dataset.num_samples(split)
    if path.exists():
        why = file_problem(path, key, crc=True)
        if why is None:
            try:
                check_beton(path, fields, n)
                return path
            except PipelineError as e:
                why = str(e)
        log.warning("ffcv: %s; writing it again", why)
        path.unlink(missing_ok=True)
    if progress:
        log.warning("ffcv: writing %s", path)
    if dataset.arrays(split) is None:
        cache.check(split)            # written from checked data only
    else:
        dataset.check(split)
    image = tuple(k for k, v in fields.items() if v == "image")
    write_beton(path, split_arrays(dataset, split, cache), image_fields=image, image_mode=image_mode,
                jpeg_quality=jpeg_quality, num_workers=num_workers, timeout=timeout, progress=progress)
    write_manifest(path, key)
    check_beton(path, fields, n)
    return path


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
class FfcvSource(Source):
    backend = "ffcv"

    def __init__(self, dataset, *, cache=None, beton_dir: str | Path, image_mode: str = "raw", jpeg_quality: int = 90,
                 batches_ahead: int = 3, **kw):
        super().__init__(dataset, **kw)
        self.cache, self.beton_dir = cache, Path(beton_dir)
        self.image_mode, self.jpeg_quality, self.batches_ahead = image_mode, jpeg_quality, batches_ahead
        self.num_workers = max(1, self.num_workers)
        self._loaders: dict[tuple, object] = {}
        self._paths: dict[str, Path] = {}

    def beton(self, split: str) -> Path:
        if split not in self._paths:
            self._paths[split] = ensure_beton(self.dataset, split, self.cache, self.beton_dir,
                                              image_mode=self.image_mode, jpeg_quality=self.jpeg_quality,
                                              num_workers=self.num_workers, progress=self.progress)
        return self._paths[split]

    def validate(self, progress: bool = False, device="cpu") -> None:
        for s in self.splits:
            self.beton(s)

    def _loader(self, split: str, batch_size: int, device: torch.device, indices: np.ndarray):
        from ffcv.fields.decoders import NDArrayDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToDevice, ToTensor
        key = (split, batch_size, str(device), len(indices))
        if key not in self._loaders:
            move = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
            pipes = {}
            for name, kind in beton_fields(self.dataset).items():
                dec = SimpleRGBImageDecoder() if kind == "image" else NDArrayDecoder()
                pipes[name] = [dec, ToTensor(), *move]
            self._loaders[key] = Loader(str(self.beton(split)), batch_size=batch_size, num_workers=self.num_workers,
                                        order=OrderOption.SEQUENTIAL, indices=indices, pipelines=pipes,
                                        drop_last=False, os_cache=True, batches_ahead=self.batches_ahead, seed=0)
        loader = self._loaders[key]
        # this epoch's shard, in the plan's order (Sequential.sample_order returns these indices)
        loader.indices = indices
        loader.traversal_order.indices = indices
        loader.first_traversal_order = indices
        return loader

    def _produce(self, split, plan, device, batch_size):
        indices = np.concatenate([p.index for p in plan]).astype(np.uint64)
        loader = self._loader(split, batch_size, device, indices)
        names = list(loader.reader.handlers)
        images = [k for k, f in self.dataset.fields.items() if f.kind == "image"]
        n_out = 0
        for pb, out in zip(plan, loader):
            if out[0].shape[0] != len(pb.index):
                raise PipelineError(f"ffcv: batch of {out[0].shape[0]} samples, the plan has {len(pb.index)}")
            n_out += 1
            raw = {k: t.to(device, non_blocking=True) for k, t in zip(names, out)}
            for k in images:
                raw[k] = raw[k].permute(0, 3, 1, 2)                         # (B, 3, S, S) uint8
            yield self._batch(raw, pb.flip)
        if n_out != len(plan):
            raise PipelineError(f"ffcv: loader gave {n_out} batches, the plan has {len(plan)}")


def ffcv_status(deep: bool = True) -> tuple[bool, str]:
    """Whether ffcv (and opencv, which it needs) imports; ``deep=False`` only looks for the packages
    (importing ffcv costs seconds of numba JIT)."""
    try:
        if deep:
            import ffcv.loader  # noqa: F401
            import cv2  # noqa: F401   (opencv needs libGL.so.1 / libglib at import)
        elif importlib.util.find_spec("ffcv") is None or importlib.util.find_spec("cv2") is None:
            raise ImportError("No module named 'ffcv'")
    except Exception as e:   # ImportError, or opencv's missing libGL (OSError)
        return False, (f"ffcv is not importable ({type(e).__name__}: {e}); install it with "
                       "`bash .ci/install-pipelines.sh VENV` or `pip install fastdmtg[ffcv]` after the "
                       "Debian packages pkg-config libopencv-dev libturbojpeg0-dev libgl1 libglib2.0-0")
    return True, "installed"


BACKEND = LoaderBackend("ffcv", lambda ds, cache, cfg, kw, frac: FfcvSource(
    ds, cache=cache, **kw, beton_dir=default_cache_dir(cfg.cache_dir, ds) / "ffcv"),
    status=ffcv_status, checks_on_every_rank=True, order=3)
