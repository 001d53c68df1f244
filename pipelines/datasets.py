"""The two datasets as the pipelines see them: where the raw files are, what the decoded /
prepared arrays are, which task set. Parsing and decoding stay in ``fastdmtg.data.celeba`` and
``fastdmtg.data.taskonomy`` (the reference decoders); this module only gathers what a backend needs.

CelebA (``CelebASpec``)
    paths(split)      raw JPEG paths, the split's first ``limit`` when a limit is set
    labels(split)     (M, N) int64 in {0, 1}
    decoded(split)    (M, 3, S, S) uint8 — ``celeba.cached_split`` (the .npy cache) or, for a limited
                      quick run, ``celeba.decode_split`` of only the files it uses

Taskonomy (``TaskonomySpec``)
    raw               the raw root (when ``data.root`` is one): per-split sample ids and per-domain
                      PNG paths, in the order ``taskonomy.prepare`` writes rows
    prepared()        the prepared folder (``taskonomy.build_source`` prepares it once when the root
                      is raw) and its memory-mapped arrays: {domain: (M, C, S, S) uint8 | uint16}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastdmtg.data import default_cache_dir


class CelebASpec:
    kind = "celeba"

    def __init__(self, cfg, progress: bool = True):
        from fastdmtg.data import celeba
        from fastdmtg.tasks.attributes import AttributeTaskSet
        if not cfg.root:
            raise ValueError("data.root: the celeba dataset needs its folder (--data-root PATH)")
        self.cfg, self.progress = cfg, progress
        self.index = celeba.CelebAIndex(cfg.root, cfg.task_names())
        self.taskset = AttributeTaskSet(self.index.task_names)
        self.image_size = cfg.image_size
        self.cache_dir = default_cache_dir(cfg)
        for s in ("train", "val", "test"):
            if self.num_samples(s) == 0:
                raise celeba.CelebAFormatError(f"{self.index.root / celeba.PARTITION_FILE}: split {s!r} is empty")

    def limit(self, split: str) -> int:
        return self.cfg.limit_train if split == "train" else self.cfg.limit_eval

    def num_samples(self, split: str) -> int:
        n = len(self.index.splits[split][0])
        return min(n, self.limit(split)) if self.limit(split) else n

    def paths(self, split: str) -> list[Path]:
        return self.index.image_paths(split)[:self.num_samples(split)]

    def labels(self, split: str) -> np.ndarray:
        return self.index.labels(split)[:self.num_samples(split)]

    def decoded(self, split: str) -> np.ndarray:
        from fastdmtg.data import celeba
        if self.limit(split):   # a quick run decodes only what it uses (no cache), as build_data does
            return celeba.decode_split(self.paths(split), self.image_size, progress=self.progress,
                                       desc=f"decode celeba/{split}")
        return celeba.cached_split(self.index, split, self.image_size, self.cache_dir, progress=self.progress)


class TaskonomySpec:
    kind = "taskonomy"

    def __init__(self, cfg, progress: bool = True):
        from fastdmtg.config import TASKONOMY_5
        from fastdmtg.data import taskonomy as tx
        from fastdmtg.tasks.taskonomy import TaskonomyTaskSet
        if not cfg.root:
            raise ValueError("data.root: the taskonomy dataset needs its folder (--data-root PATH): a raw "
                             "Taskonomy root or a folder made by `fastdmtg prepare taskonomy`")
        self.cfg, self.progress = cfg, progress
        self.task_names = cfg.task_names() or list(TASKONOMY_5)
        self.taskset = TaskonomyTaskSet.from_config(self.task_names, cfg)
        self.domains = tx.needed_domains(self.task_names)
        self.image_size = cfg.image_size
        self.seg_resize = cfg.taskonomy_seg_resize
        self.limits = {"train": cfg.limit_train, "val": cfg.limit_eval, "test": cfg.limit_eval}
        self.root = Path(cfg.root)
        self.is_prepared_root = (self.root / "index.json").is_file()
        self._prepared = None
        self._raw = None
        if self.is_prepared_root:
            self.prepared()   # validates it against the config now, not at the first batch

    # -- raw files ------------------------------------------------------------------------------
    def raw(self) -> dict:
        """{"layout", "side", "splits": {split: [(building, point, view)]}}; needs a raw root."""
        from fastdmtg.data import taskonomy as tx
        if self._raw is None:
            if self.is_prepared_root:
                raise tx.TaskonomyFormatError(
                    f"{self.root}: a prepared folder (index.json), but this backend reads the raw Taskonomy "
                    "PNGs; give the raw root as data.root")
            layout = tx.detect_layout(self.root)
            split = tx.load_split(self.cfg.taskonomy_split_file or None)
            splits = {}
            for s in tx.SPLITS:
                samples = tx.index_samples(self.root, layout, split[s], self.domains)
                splits[s] = samples[:self.limits[s]] if self.limits[s] else samples
            b0, p0, v0 = splits["train"][0]
            side, _, _, _ = tx.png_header(tx.domain_dir(self.root, layout, "rgb", b0) / tx.file_name("rgb", p0, v0))
            self._raw = {"layout": layout, "side": side, "splits": splits}
        return self._raw

    def raw_paths(self, split: str) -> list[dict[str, str]]:
        from fastdmtg.data import taskonomy as tx
        r = self.raw()
        return [{d: str(tx.domain_dir(self.root, r["layout"], d, b) / tx.file_name(d, p, v)) for d in self.domains}
                for b, p, v in r["splits"][split]]

    # -- prepared folder ------------------------------------------------------------------------
    def prepared(self):
        """The ``TaskonomySource`` of the prepared folder (prepared from the raw root on first use)."""
        from fastdmtg.data import taskonomy as tx
        if self._prepared is None:
            self._prepared = tx.build_source(self.cfg, progress=self.progress)
        return self._prepared

    @property
    def folder(self) -> Path:
        return self.prepared().folder

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """{domain: memory-mapped (M, C, S, S) array} of the prepared split, limited to M rows."""
        from fastdmtg.data import taskonomy as tx
        src = self.prepared()
        n = src.num_samples(split)
        out = {}
        for d in self.domains:
            p = src.folder / split / f"{d}.npy"
            try:
                a = np.load(p, mmap_mode="r")
            except FileNotFoundError:
                raise tx.TaskonomyFormatError(f"{p}: missing (prepared folder incomplete)") from None
            except ValueError as e:
                raise tx.TaskonomyFormatError(f"{p}: not a readable .npy file ({e})") from None
            if a.dtype != tx.DTYPE[d] or a.ndim != 4 or a.shape[1] != tx.CHANNELS[d] or a.shape[0] < n \
                    or a.shape[2:] != (src.image_size, src.image_size):
                raise tx.TaskonomyFormatError(f"{p}: shape {a.shape} {a.dtype}, expected ({n}, {tx.CHANNELS[d]}, "
                                              f"{src.image_size}, {src.image_size}) {np.dtype(tx.DTYPE[d])}")
            out[d] = a[:n]
        return out

    def num_samples(self, split: str) -> int:
        if self._prepared is not None or self.is_prepared_root:
            return self.prepared().num_samples(split)
        return len(self.raw()["splits"][split])


def build_spec(cfg, progress: bool = True):
    if cfg.dataset == "celeba":
        return CelebASpec(cfg, progress)
    if cfg.dataset == "taskonomy":
        return TaskonomySpec(cfg, progress)
    raise ValueError(f"data.backend={cfg.backend!r} is for the celeba and taskonomy datasets; "
                     f"data.dataset={cfg.dataset!r} uses data.backend=memory")


def as_int16(a: np.ndarray) -> np.ndarray:
    """uint16 → the int16 bit-cast (lossless; torch moves and converts int16 everywhere)."""
    return a.view(np.int16) if a.dtype == np.uint16 else a
