"""What a dataset format provides to the loaders (``fastdmtg.pipelines``).

A format module (``synthetic``, ``celeba``, ``taskonomy``, …) parses and validates its files and
returns a ``Dataset``: the task set, the image size, and per split a list of samples, each made of
named *fields* — fixed-shape arrays such as ``image`` (3, S, S) uint8 or ``labels`` (N,) uint8.
Nothing here knows about batches, devices, ranks or caches; the loaders know nothing about file
formats. The contract:

    fields                      {name: Field(dtype, shape, kind)}: what one sample holds
    num_samples(split)
    arrays(split)               every field of every sample, already in memory or memory-mapped
                                (in-memory data, a prepared folder) — or None: decode them
    table(split)                the fields that need no decoding (labels parsed from annotations)
    items(split)                per sample, the files of its decoded fields {field: path} (None
                                when there are no files); ``decode_one(item)`` decodes one sample
                                to {field: array} — the *reference decoder*
    cache_id() / split_key(s)   what the decoded arrays depend on (resolved root, decode parameters,
                                format version; per split the files' names and ``stat_key``s)
    to_batch(raw, flips)        device-side: stored values (B, …) → the batch dict the task set eats
    resize(field, x)            device-side, batched: the reference decoder's resize (DALI decodes
                                full-size files; the values must equal ``decode_one``'s)

Stored dtypes are compact (uint8 / uint16); the loaders move uint16 as its int16 bit-cast (torch
moves and converts int16 everywhere) and ``to_batch`` undoes it.

A new dataset = one module defining a ``Dataset`` subclass and a ``DatasetFormat`` (how to open it
from a ``DataConfig``, which task set its task names make), registered in ``fastdmtg.data.FORMATS``.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

SPLITS = ("train", "val", "test")


class DataFormatError(ValueError):
    """A dataset file or folder is missing or malformed; the message names it (and the line/field)."""


@dataclass(frozen=True)
class Field:
    """One per-sample array. ``kind``: ``image`` — the model input, (3, S, S) uint8 RGB, mirrored
    by the flip augmentation; ``map`` — a dense (C, S, S) target mirrored with the image; ``value`` —
    per-sample values (labels), never mirrored. ``encoding``: how its files store it, for decoders
    that read files themselves (DALI): ``jpeg`` | ``png`` | None (no file: parsed or generated)."""
    dtype: np.dtype
    shape: tuple[int, ...]
    kind: str = "value"
    encoding: str | None = None

    def __post_init__(self):
        if self.kind not in ("image", "map", "value"):
            raise ValueError(f"Field.kind must be image|map|value, got {self.kind!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Dataset:
    """A parsed dataset (see the module doc). Subclasses set the attributes in ``__init__``."""

    name: str = "?"
    taskset = None
    image_size: int = 0
    fields: dict[str, Field] = {}
    #: the flip augmentation's default (the reference's choice per dataset)
    default_flip: bool = False
    #: its decode cache goes next to the data by default (a full decode is large), when that is writable
    cache_beside_data: bool = False
    #: the fields ``table`` gives (parsed, not decoded)
    table_fields: tuple[str, ...] = ()
    #: the version of the format's decoder (in ``params``: a new version decodes again); None: none given
    decode_version: int | None = None
    #: the reference decoder, item -> {decoded field: array}; picklable (a module-level function or a
    #: functools.partial of one) so decode workers can receive it
    decode_one: Callable[[dict], dict[str, np.ndarray]] | None = None

    # -- sizes --------------------------------------------------------------------------------
    def num_samples(self, split: str) -> int:
        raise NotImplementedError

    # -- ready arrays ------------------------------------------------------------------------
    def arrays(self, split: str) -> dict[str, np.ndarray] | None:
        """{field: (M, …) array} when the data is in memory or memory-mapped; None: decode it."""
        return None

    def load_arrays(self, split: str) -> dict[str, np.ndarray]:
        """``arrays(split)`` read into memory (formats with checksummed files check them here)."""
        return {k: (np.array(v) if isinstance(v, np.memmap) else v) for k, v in self.arrays(split).items()}

    def check(self, split: str) -> None:
        """Check the checksums of the split's stored arrays (formats that read checksummed files);
        raise naming a damaged file."""

    def table(self, split: str) -> dict[str, np.ndarray]:
        """The fields that need no decoding, {field: (M, …) array} (e.g. labels)."""
        return {}

    @property
    def decoded_fields(self) -> tuple[str, ...]:
        """The fields ``decode_one`` produces (the rest come from ``table``)."""
        return tuple(f for f in self.fields if f not in self.table_fields)

    # -- files and decoding ------------------------------------------------------------------
    def items(self, split: str) -> list[dict[str, str]] | None:
        """Per sample, {decoded field: file path}; None when the samples have no files."""
        return None

    def cache_id(self) -> dict:
        """What the decoded arrays of every split depend on besides the files: resolved root,
        ``params()``, limits (names a cache folder). By default: the format's name, ``root`` (resolved
        by the format), ``params()`` and the ``limits`` {split: samples} in effect."""
        return {"dataset": self.name, "root": str(self.root), "params": self.params(),
                "limits": {s: v for s, v in self.limits.items() if v}}

    def params(self) -> dict:
        """The decode parameters (image size, resize modes, the format's ``decode_version``)."""
        if self.decode_version is None:
            return {"image_size": self.image_size}
        return {"image_size": self.image_size, "decode_version": self.decode_version}

    def info(self) -> dict:
        """Format-specific facts recorded in a prepared folder's index."""
        return {}

    def split_key(self, split: str) -> dict:
        """What the decoded arrays of ``split`` depend on: by default each file's name and
        ``stat_key`` (size, mtime, ctime, inode: a changed or replaced file changes the key)."""
        items = self.items(split)
        if items is None:
            return {}
        return {"files": files_digest([p for it in items for p in it.values()], self.missing_error),
                "count": len(items)}

    def fingerprint(self) -> dict[str, str]:
        """{part: digest} of the data a run trains on, cheap (no image read; ``fastdmtg.fingerprint``):
        per split the files' names (relative to ``root``) and sizes, or the arrays' ``split_key``
        (checksums) when the split has no files. Formats add their annotation files by content."""
        import json
        out = {}
        for s in SPLITS:
            items = self.items(s)
            if items is None:
                out[f"{s} arrays"] = json.dumps(self.split_key(s), sort_keys=True)
            else:
                out[f"{s} images"] = listing_digest([str(p) for it in items for p in it.values()],
                                                    getattr(self, "root", None), self.missing_error)
        return out

    def split_info(self, split: str) -> dict:
        """Extra, format-specific facts recorded with a prepared split (e.g. the sample ids)."""
        return {}

    def missing_error(self, path: str) -> DataFormatError:
        return DataFormatError(f"{path}: file listed by the dataset is missing")

    def sample(self, split: str, i: int) -> dict[str, np.ndarray]:
        """Every field of sample i, decoded by the reference decoder (or read from the arrays);
        for many samples, call ``sample_reader(split)`` once."""
        return self.sample_reader(split)(i)

    def sample_reader(self, split: str) -> "SampleReader":
        """A picklable callable i -> {field: array} for DataLoader workers."""
        a = self.arrays(split)
        if a is not None:
            return SampleReader(arrays=a)
        return SampleReader(decode=self.decode_one, items=self.items(split), table=self.table(split))

    def decode_into(self, split: str, out: dict[str, np.ndarray | str | Path], workers: int = 0,
                    progress: bool = True, desc: str = "decode") -> None:
        """Decode every sample of ``split`` into ``out`` ({decoded field: .npy file to fill in place,
        or an array}) with the reference decoder, in parallel processes."""
        decode_parallel(self.items(split), self.decode_one, out, workers, progress, desc)

    def check_encoded(self, field: str, buf: np.ndarray, path: str) -> None:
        """Check an encoded file's header before a foreign decoder (DALI) reads it; raise naming it."""

    # -- device side ------------------------------------------------------------------------
    def resize(self, field: str, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) decoded at full size → (B, C, S, S), equal to ``decode_one``'s resize."""
        raise NotImplementedError(f"{self.name}: no batched resize")

    def to_batch(self, raw: dict[str, torch.Tensor], flags: torch.Tensor | None) -> dict:
        """Stored values on the device → the batch dict; ``flags`` (B,) bool: mirror these samples."""
        raise NotImplementedError



# ------------------------------------------------------------------------------------------------
# helpers shared by the formats
# ------------------------------------------------------------------------------------------------
class SampleReader:
    """i -> {field: array} from in-memory / memory-mapped arrays, or by decoding files."""

    def __init__(self, arrays=None, decode=None, items=None, table=None):
        self.arrays, self.decode, self.items, self.table = arrays, decode, items, table or {}

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        if self.arrays is not None:
            return {k: np.asarray(v[i]) for k, v in self.arrays.items()}
        out = self.decode(self.items[i])
        out.update({k: v[i] for k, v in self.table.items()})
        return out


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode) of a file: what changes whenever its bytes change. mtime can
    be set back (``cp -p``, ``rsync -a``, ``tar x``, ``os.utime``), ctime cannot — writing the bytes
    or setting the mtime both set it to the current time — and a file put in place by a rename has
    another inode. (It also changes without new bytes: chmod, a copy of the whole folder; the decode
    cache then compares the files' checksums before it decodes anything again.)"""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def files_digest(paths: list[str], missing_error: Callable[[str], Exception]) -> str:
    """sha1 over (name, ``stat_key``) of every file, in order: changes when any file is replaced,
    rewritten (also with its size and mtime restored), added or removed. A missing file raises
    ``missing_error(path)``."""
    h = hashlib.sha1()
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise missing_error(str(p)) from None
        size, mtime, ctime, ino = stat_key(st)
        h.update(f"{p}\0{size}\0{mtime}\0{ctime}\0{ino}\n".encode())
    return h.hexdigest()


# file_digest / listing_digest: the digests of Dataset.fingerprint (fastdmtg.fingerprint compares them)
def file_digest(path: str | Path) -> str:
    """``sha1 <hex>`` of a file's bytes, or ``absent``."""
    h = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
    except FileNotFoundError:
        return "absent"
    return f"sha1 {h.hexdigest()}"


def listing_digest(paths: list[str], root: str | Path | None, missing_error) -> str:
    """``N files, sha1 <hex>`` over each file's name (relative to ``root``) and size, in order."""
    h = hashlib.sha1()
    root = str(root) + os.sep if root is not None else ""
    for p in paths:
        try:
            size = os.stat(p).st_size
        except FileNotFoundError:
            raise missing_error(str(p)) from None
        name = p[len(root):] if root and p.startswith(root) else p
        h.update(f"{name}\0{size}\n".encode())
    return f"{len(paths)} files, sha1 {h.hexdigest()}"


def uint16_as_int16(a: np.ndarray) -> np.ndarray:
    """uint16 → its int16 bit-cast (lossless; torch moves and converts int16 everywhere)."""
    return a.view(np.int16) if a.dtype == np.uint16 else a


def u16(x: torch.Tensor) -> torch.Tensor:
    """The int16 bit-cast of uint16 values (or int32 from a decoder) → the uint16 value as float32."""
    return (x.to(torch.int32) & 0xFFFF).to(torch.float32)


def flip_rows(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror (along the last dim) the rows of ``x`` whose flag is set."""
    f = flags.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(f, x.flip(-1), x)


def image_labels_batch(raw: dict[str, torch.Tensor], flags: torch.Tensor | None) -> dict:
    """The batch of an image + per-task labels dataset (CelebA, synthetic): stored
    {"image": (B, 3, S, S) uint8, "labels": (B, N) integer} on the device →
    {"image": (B, 3, S, S) float32 in [0, 1], "labels": (B, N) int64}. Always new, contiguous NCHW
    tensors (FFCV/DALI reuse their output buffers; a permuted view would make convolutions pick
    other algorithms and round differently)."""
    image = raw["image"].contiguous().to(torch.float32).div_(255.0)
    if flags is not None:
        image = flip_rows(image, flags)
    return {"image": image, "labels": raw["labels"].to(torch.int64, copy=True)}


def _open_out(out: dict) -> dict[str, np.ndarray]:
    return {k: (np.load(v, mmap_mode="r+") if isinstance(v, (str, Path)) else v) for k, v in out.items()}


def _decode_chunk(job) -> int:
    """Worker: decode samples [start, start + len(items)) into the .npy files (memory-mapped r+)."""
    out, start, items, decode = job
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one decode process per core: no nested intra-op thread pools
    try:
        arrays = _open_out(out)
        for j, item in enumerate(items):
            row = decode(item)
            for k, a in arrays.items():
                a[start + j] = row[k]
        for a in arrays.values():
            if isinstance(a, np.memmap):
                a.flush()
    finally:
        torch.set_num_threads(threads)   # matters when called in the caller's process (one chunk)
    return len(items)


def decode_parallel(items: list, decode, out: dict | None, workers: int = 0, progress: bool = True,
                    desc: str = "decode", chunk: int = 64) -> None:
    """Run ``decode`` over ``items`` in worker processes (``workers``: default min(8, cores)),
    writing row i of each field into ``out`` (.npy paths, filled in place). ``out=None``: decode
    only (validation: the first bad file raises, naming itself)."""
    if out is None:
        out = {}
    in_memory = any(not isinstance(v, (str, Path)) for v in out.values())
    jobs = [(out, i, items[i:i + chunk], decode) for i in range(0, len(items), chunk)]
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1 or in_memory:
            for job in jobs:
                bar.update(_decode_chunk(job))
        else:
            with ProcessPoolExecutor(workers) as ex:
                for n in ex.map(_decode_chunk, jobs):
                    bar.update(n)
    finally:
        bar.close()


@dataclass(frozen=True)
class DatasetFormat:
    """A registered dataset: ``open(cfg, progress)`` parses and validates it (no decoding) and
    returns a ``Dataset``; ``taskset(cfg, names)`` is the task set those task names make (to
    rebuild the heads of a saved run without its data).

    ``--data-root DIR`` without a recipe asks every format with a ``detect(Path) -> bool`` whether
    DIR is its folder (``fastdmtg.data.detect_format``); the first that says yes gives ``recipe``.
    ``looks_for`` says in a few words what ``detect`` checks, for the message listing what was looked
    for when no format recognises the folder.

    What the rest of fastdmtg knows about a dataset, it asks its format (the core has no branch on a
    dataset's name):
      ``presets``      task-set names for data.tasks (``{"celeba9": [...]}``);
      ``known_tasks``  ``DataConfig -> task names | None`` without opening the data (None: only the data
                       can tell); left out = data.tasks as written;
      ``check``        ``DataConfig -> None``, raises ValueError naming the field (config validation);
      ``resize``       ``(B, 3, H, W) uint8, S -> (B, 3, S, S) uint8`` as the decoder resizes (predict);
      ``prepare``      ``argv -> exit code``: ``fastdmtg prepare NAME ROOT OUT`` (its own prepared form);
      ``recipes``      ``config module -> [Recipe]``: the format's named recipes (the config module is
                       passed in, so a format never imports the config: no cycle);
      ``bench``        ``(fastdmtg.testing, config module) -> BenchData``: how the benchmarks run its
                       recipes without its data (None: they cannot);
      ``image_size``   the image side a command uses when none is given (``prepare --format ffcv``);
      ``order``        its place in the table (``fastdmtg.data.FORMATS``): detection asks the formats in
                       this order (a more specific one first), listings show them in it."""
    name: str
    open: Callable
    taskset: Callable
    about: str = ""
    detect: Callable | None = None
    looks_for: str = ""
    recipe: str | None = None
    presets: dict = field(default_factory=dict)
    known_tasks: Callable | None = None
    check: Callable | None = None
    resize: Callable | None = None
    prepare: Callable | None = None
    recipes: Callable | None = None
    bench: Callable | None = None
    image_size: int = 64
    order: int = 10


@dataclass(frozen=True)
class BenchData:
    """How ``fastdmtg bench step`` / ``profile`` / ``bench roofline`` run a format's recipes without its
    data (``DatasetFormat.bench``; ``fastdmtg.testing.bench_data(cfg)`` asks the config's format):

      ``synthetic``      ``(cfg, n) -> Dataset``: n random samples in the real shapes and dtypes (in memory)
      ``batches``        how many random batches the in-memory rows hold by default
      ``write_raw``      ``(root, n, image_size) -> None``: n samples as raw files in the official layout
                         (the reference-style DataLoader row)
      ``raw_data``       ``root -> {DataConfig field: value}``: the data config that reads those files
      ``raw_per_step``   the raw row's sample count: True = ``--raw-samples`` (default: enough for the
                         row's steps in one epoch), False = ``--jpegs``
      ``decode``, ``cache``  the row labels' words: what the DataLoader decodes, the stored dtypes
      ``train_images``   ``cfg -> (training-set size | None, its name in the header | why unknown)``
      ``describe``       ``(cfg, task names) -> a header line | None``
      ``scaling``        ``(recipe, names | None) -> [(label, config)]``: the rows of ``--scaling`` (before
                         the bench's switches; ``{batch}`` in a label = the row's final batch size);
                         ``names`` = ``--scaling-recipes``
      ``paper_line``     the header quotes the paper's Table A1 figures for the recipe"""
    synthetic: Callable
    write_raw: Callable
    raw_data: Callable
    train_images: Callable
    scaling: Callable
    batches: int = 64
    raw_per_step: bool = False
    decode: str = "JPEG decode"
    cache: str = "uint8"
    describe: Callable | None = None
    paper_line: bool = False


@dataclass(frozen=True)
class Recipe:
    """A named recipe a format ships: ``build() -> Config``; ``follows`` = paper | reference | ours;
    ``naive`` = the recipe ``--method naive-mtl`` switches to (its naive-MTL twin), None if none."""
    name: str
    build: Callable
    follows: str = "ours"
    naive: str | None = None


def recipe_fn(fn: Callable, *args, doc: str | None = None) -> Callable:
    """``fn(*args)`` as the zero-argument builder a recipe table holds, with ``fn``'s docstring (or
    ``doc``): ``fastdmtg recipes`` and the docs show it."""
    def build():
        return fn(*args)
    build.__doc__ = fn.__doc__ if doc is None else doc
    return build

