"""torch: a plain ``torch.utils.data.DataLoader`` that decodes the raw files of every batch — the
reference-style baseline (every epoch decodes and resizes every image again, on the CPU, in
``num_workers`` worker processes).

    worker      dataset.sample_reader(split)(i): the format's reference decoder on the sample's files
                (CelebA: ``celeba.load_image``; Taskonomy raw root: ``load_domain`` + ``resize_map`` per
                domain) + its parsed values → {field: array}; 16-bit maps as their int16 bit-cast
    collate     → {field: (B, …)} [pinned host memory when training on CUDA]
    device      → ``dataset.to_batch`` (normalise, flips)

Datasets without files (the synthetic set, arrays from Python) and prepared Taskonomy folders are
read row by row instead: there is nothing to decode. The order comes from the plan
(``plan.plan_epoch``) through ``batch_sampler``, so it equals every other backend's.
"""
from __future__ import annotations

import torch

from .source import LoaderBackend, Source, decode_check, to_tensor


class _Samples(torch.utils.data.Dataset):
    def __init__(self, reader, n: int):
        self.reader, self.n = reader, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: to_tensor(v) for k, v in self.reader(i).items()}


class TorchSource(Source):
    backend = "torch"

    def decodes_files(self, split: str = "train") -> bool:
        """Whether batches come from decoding files (False: rows of arrays, nothing to decode)."""
        return self.dataset.arrays(split) is None

    def _how(self, split):
        return "decodes the files of every batch" if self.decodes_files(split) else "reads rows of arrays"

    def validate(self, progress: bool = False, device="cpu") -> None:
        """Decode every file of every split once with the reference decoder (one extra pass, in
        parallel processes: this backend keeps nothing), or check the arrays' files."""
        decode_check(self.dataset, self.splits, progress)

    def _produce(self, split, plan, device, batch_size):
        ds = _Samples(self.dataset.sample_reader(split), self.num_samples(split))
        kw = dict(num_workers=self.num_workers, pin_memory=device.type == "cuda", persistent_workers=False)
        if self.num_workers > 0:
            kw["prefetch_factor"] = 4
        loader = torch.utils.data.DataLoader(ds, batch_sampler=[p.index.tolist() for p in plan], **kw)
        for pb, raw in zip(plan, loader):
            yield self._batch({k: t.to(device, non_blocking=True) for k, t in raw.items()}, pb.flip)


__all__ = ["TorchSource"]


BACKEND = LoaderBackend("torch", lambda ds, cache, cfg, kw, frac: TorchSource(ds, **kw), order=2)
