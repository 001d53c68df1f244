"""gpu-cache and memory: the decoded dataset held in memory, batches gathered there.

    decode once     the dataset's arrays (in memory, or a prepared folder), or its decode cache
                    (``cache.DecodeCache``: decoded once per dataset and settings, checked before use)
    hold            gpu-cache: on the training device — index, flip and convert there, so the host does
                              no per-batch work beyond launching a few kernels
                    memory:   in host memory (pinned when training on CUDA); each batch is gathered on
                              the host and copied
                    a split that does not fit (more than ``fraction`` of the free device / host
                    memory) moves down — device → host → streamed from the memory-mapped files
                    (batches gathered in ``num_workers`` DataLoader processes) — with a log line;
                    ``source.placement[split]`` records where each split ended up
    per batch       rows of the plan (``plan.plan_epoch``) → ``dataset.to_batch`` on the device

Reading a split into memory checks its checksums (the read dominates the cost); streamed files get
the size + header checks (``fastdmtg data verify`` checks their checksums).
"""
from __future__ import annotations

import numpy as np
import torch

from .source import LoaderBackend, PipelineError, Source, fits, gather_rows, log, to_tensor


class _MappedRows(torch.utils.data.Dataset):
    """Item b = batch b of the plan, gathered from memory-mapped arrays. Pickles as file names (a
    pickled np.memmap would copy the data into the worker)."""

    def __init__(self, arrays: dict[str, np.ndarray], batches: list[np.ndarray]):
        self.arrays, self.batches = arrays, batches

    def __getstate__(self):
        spec = {k: (a.filename, a.dtype.str, a.offset, a.shape) if isinstance(a, np.memmap) else a
                for k, a in self.arrays.items()}
        return {"spec": spec, "batches": self.batches}

    def __setstate__(self, st):
        self.batches = st["batches"]
        self.arrays = {k: np.memmap(v[0], dtype=np.dtype(v[1]), mode="r", offset=v[2], shape=v[3])
                       if isinstance(v, tuple) else v for k, v in st["spec"].items()}

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        return gather_rows(self.arrays, self.batches[b])


class ResidentSource(Source):
    """``placement="device"``: the gpu-cache backend; ``"host"``: the memory backend."""

    def __init__(self, dataset, *, placement: str = "device", cache=None, fraction: float = 0.5, **kw):
        super().__init__(dataset, **kw)
        if placement not in ("device", "host"):
            raise ValueError(f"placement must be device|host, got {placement!r}")
        self.want, self.cache, self.fraction = placement, cache, fraction
        self.backend = "gpu-cache" if placement == "device" else "memory"
        self.placement: dict[str, str] = {}
        self._held: dict[tuple[str, str], tuple[str, dict]] = {}

    def _arrays(self, split: str, load: bool) -> dict[str, np.ndarray]:
        ds = self.dataset
        if ds.arrays(split) is not None:
            return ds.load_arrays(split) if load else ds.arrays(split)
        if self.cache is None:
            raise PipelineError(f"{ds.name}: {self.backend} needs a decode cache for this dataset")
        dec, table = self.cache.arrays(split, load), ds.table(split)
        return {k: dec[k] if k in dec else table[k] for k in ds.fields}

    def held(self, split: str, device: torch.device) -> tuple[str, dict]:
        """(where, {field: tensor | memory-mapped array}) of ``split``, decoded and placed on first use."""
        key = (split, str(device))
        if key not in self._held:
            ds = self.dataset
            nbytes = sum(f.nbytes for f in ds.fields.values()) * ds.num_samples(split)
            what = f"{self.backend}: {ds.name}/{split} ({', '.join(ds.fields)})"
            cuda = device.type == "cuda"
            if self.want == "device" and cuda and fits(nbytes, device, self.fraction, what):
                where = "device"
                data = {k: to_tensor(a).to(device) for k, a in self._arrays(split, load=True).items()}
            elif fits(nbytes, torch.device("cpu"), self.fraction, what):
                where = "host"
                data = {k: to_tensor(a) for k, a in self._arrays(split, load=True).items()}
                if cuda:
                    data = {k: t.pin_memory() for k, t in data.items()}
            else:
                where = "stream"
                data = self._arrays(split, load=False)
            if self.want == "device" and cuda and where != "device":
                log.warning("%s: held in %s instead of %s", what, "host memory" if where == "host" else
                            f"memory-mapped files, streamed by {self.num_workers} DataLoader worker(s)", device)
            self.placement[split] = where
            self._held[key] = (where, data)
        return self._held[key]

    def _how(self, split):
        where = self.placement.get(split)
        return {None: "not loaded yet", "device": "held on the device", "host": "held in host memory",
                "stream": "streamed from memory-mapped files"}[where]

    def validate(self, progress: bool = False, device: torch.device | str = "cpu") -> None:
        """Decode (or check the caches of) every split and place it for ``device``."""
        for s in self.splits:
            self.held(s, torch.device(device))

    def _produce(self, split, plan, device, batch_size):
        where, data = self.held(split, device)
        bounds = np.cumsum([0] + [len(p.index) for p in plan])
        if where == "stream":
            reader = _MappedRows(data, [p.index for p in plan])
            if self.num_workers > 0 and len(plan) > 1:
                it = iter(torch.utils.data.DataLoader(reader, batch_size=None, shuffle=False,
                                                      num_workers=self.num_workers, prefetch_factor=4,
                                                      pin_memory=device.type == "cuda"))
            else:
                it = (reader[i] for i in range(len(reader)))
            for pb, raw in zip(plan, it):
                yield self._batch({k: t.to(device, non_blocking=True) for k, t in raw.items()}, pb.flip)
            return
        on_device = where == "device" or device.type == "cpu"
        flat = torch.from_numpy(np.concatenate([p.index for p in plan]))
        if on_device:
            flat = flat.to(next(iter(data.values())).device, non_blocking=True)   # one copy per epoch
        pin = device.type == "cuda" and not on_device
        for b, pb in enumerate(plan):
            i = flat[bounds[b]:bounds[b + 1]]
            raw = {k: t.index_select(0, i) for k, t in data.items()}
            if not on_device:   # host gather (into pinned memory), then an asynchronous copy
                raw = {k: (t.pin_memory() if pin else t).to(device, non_blocking=True) for k, t in raw.items()}
            yield self._batch(raw, pb.flip)


__all__ = ["ResidentSource"]


GPU_CACHE = LoaderBackend("gpu-cache", lambda ds, cache, cfg, kw, frac: ResidentSource(
    ds, placement="device", cache=cache, fraction=frac, **kw), checks_on_every_rank=True, order=0)
MEMORY = LoaderBackend("memory", lambda ds, cache, cfg, kw, frac: ResidentSource(
    ds, placement="host", cache=cache, fraction=frac, **kw), checks_on_every_rank=True, order=1)
BACKEND = (GPU_CACHE, MEMORY)            # this file's two data.backend entries
