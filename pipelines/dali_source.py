"""dali: NVIDIA DALI decodes the raw files — on the GPU (``decoders.image(device="mixed")``,
nvJPEG / nvImageCodec) when the target device is CUDA, on the CPU with ``device_id=None``
otherwise (what the tests and CI run).

Every field of a sample comes from ONE batch-mode ``external_source`` callback with one output per
field, so the image and its labels / label maps are read in lock-step by construction, in the
plan's order (``plan.plan_epoch``) — DALI's own file readers shuffle with their own generator and
could not reproduce the other backends' order or the DDP sharding.

Per field (B = this batch's size, which may be smaller than the pipeline's max batch size):

    a field with files (``dataset.items``)
        host   the encoded bytes, header checked first (``dataset.check_encoded``: Taskonomy PNGs'
               bit depth, colour type and side)
        DALI   3-channel uint8: decoders.image(RGB)     (B, H, W, 3)   [mixed: GPU | cpu]
               1-channel uint8: decoders.image(GRAY)    (B, H, W, 1)   [mixed | cpu]
               uint16: decoders.image(ANY_DATA, dtype=UINT16) → cast INT32 (B, H, W, 1) [cpu] —
               without ``dtype`` DALI silently decodes 16-bit PNGs to 8 bits, and torch cannot
               take DALI's UINT16
        torch  → (B, C, H, W) → ``dataset.resize`` (the reference decoder's resize, batched: CelebA
               bilinear without antialias, Taskonomy antialiased bilinear / nearest-exact) [device]
    every other field (labels; a prepared folder's or in-memory arrays' rows)
        host   the stored rows (uint16 as int16) → DALI (copied to the GPU when CUDA)
    then ``dataset.to_batch`` on the device.

Resizing in torch rather than ``fn.resize`` keeps the values equal to the reference decoders (DALI's
resampling rounds differently). A file DALI cannot decode is named by decoding the batch again with
the reference decoder.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from fastdmtg.data import DataFormatError
from fastdmtg.data.base import uint16_as_int16

from .source import LoaderBackend, PipelineError, Source, decode_check


def _to_torch(tl, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A DALI TensorList → one torch tensor on ``device`` (or a list when the samples' shapes differ)."""
    from nvidia.dali.backend import TensorListGPU
    if isinstance(tl, TensorListGPU):
        if not tl.is_dense_tensor():
            return [_to_torch_gpu_one(tl[i], device) for i in range(len(tl))]
        return _to_torch_gpu_one(tl.as_tensor(), device)
    if tl.is_dense_tensor():
        return torch.from_numpy(tl.as_array()).to(device, non_blocking=True)
    return [torch.from_numpy(np.array(tl[i])).to(device, non_blocking=True) for i in range(len(tl))]


def _to_torch_gpu_one(t, device):
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class _Feed:
    """The external_source callback: batch i of the plan as one list per output."""

    def __init__(self, plan, read):
        self.plan, self.read = plan, read

    def __call__(self, info):
        i = info.iteration
        if i >= len(self.plan):
            raise StopIteration
        return self.read(self.plan[i].index)


def _read_bytes(path: str, dataset) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise dataset.missing_error(path) from None


class DaliSource(Source):
    backend = "dali"

    def __init__(self, dataset, *, prefetch: int = 2, **kw):
        super().__init__(dataset, **kw)
        self.num_threads, self.prefetch = max(1, self.num_workers), prefetch

    def _decoded(self, split: str) -> tuple[str, ...]:
        """The fields DALI decodes from files for ``split`` (the rest are fed as rows)."""
        return self.dataset.decoded_fields if self.dataset.items(split) is not None else ()

    def _how(self, split):
        dec = self._decoded(split)
        return f"decodes {', '.join(dec)} from files" if dec else "feeds rows of arrays"

    def validate(self, progress: bool = False, device="cpu") -> None:
        """As the torch backend: every file decoded once by the reference decoder."""
        decode_check(self.dataset, self.splits, progress)

    # -- host side of the external source -------------------------------------------------------
    def _reader(self, split: str):
        ds = self.dataset
        decoded = self._decoded(split)
        items = ds.items(split) if decoded else None
        rows = ds.arrays(split)
        if rows is None:
            rows = ds.table(split)
        rows = {k: uint16_as_int16(np.asarray(v)) for k, v in rows.items() if k not in decoded}

        def read(idx):
            out = []
            for k in ds.fields:
                if k in decoded:
                    col = []
                    for i in idx:
                        p = items[i][k]
                        buf = _read_bytes(p, ds)
                        ds.check_encoded(k, buf, p)
                        col.append(buf)
                else:
                    col = [np.ascontiguousarray(rows[k][i]) for i in idx]
                out.append(col)
            return tuple(out)
        return read, decoded

    # -- the pipeline ----------------------------------------------------------------------------
    def _pipeline(self, plan, read, decoded, batch_size, device):
        from nvidia.dali import fn, pipeline_def, types
        gpu = device.type == "cuda"
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        decode_dev = "mixed" if gpu else "cpu"
        feed = _Feed(plan, read)
        fields = self.dataset.fields

        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipe():
            srcs = fn.external_source(source=feed, num_outputs=len(fields), batch=True, batch_info=True)
            if len(fields) == 1:
                srcs = [srcs]
            outs = []
            for (k, f), src in zip(fields.items(), srcs):
                if k not in decoded:
                    outs.append(src.gpu() if gpu else src)
                elif f.dtype == np.uint16:
                    x = fn.decoders.image(src, device="cpu", output_type=types.ANY_DATA, dtype=types.UINT16)
                    outs.append(fn.cast(x, dtype=types.INT32))
                else:
                    mode = types.RGB if f.shape[0] == 3 else types.GRAY
                    outs.append(fn.decoders.image(src, device=decode_dev, output_type=mode))
            return tuple(outs)

        p = pipe()
        p.build()
        return p

    def _culprit(self, split, pb, err: Exception):
        """DALI's decode error does not name our file: find it with the reference decoder."""
        read = self.dataset.sample_reader(split)
        for i in pb.index:
            read(int(i))                            # raises the format's error naming the file
        raise PipelineError(f"dali: decoding a batch failed ({type(err).__name__}: {err})") from err

    def _produce(self, split, plan, device, batch_size):
        read, decoded = self._reader(split)
        pipe = self._pipeline(plan, read, decoded, batch_size, device)
        try:
            for pb in plan:
                try:
                    outs = pipe.run()
                except DataFormatError:
                    raise
                except StopIteration:
                    raise PipelineError(f"dali: the pipeline ended before the plan's {len(plan)} batches") from None
                except Exception as e:   # DALI reports decode errors as RuntimeError
                    self._culprit(split, pb, e)
                raw = {}
                for k, tl in zip(self.dataset.fields, outs):
                    x = _to_torch(tl, device)
                    if k in decoded:
                        x = [t.permute(2, 0, 1) for t in x] if isinstance(x, list) else x.permute(0, 3, 1, 2)
                        if isinstance(x, list):             # mixed image sizes: resize one by one
                            x = torch.cat([self.dataset.resize(k, t[None]) for t in x])
                        else:
                            x = self.dataset.resize(k, x)
                    elif isinstance(x, list):
                        x = torch.stack(x)
                    raw[k] = x
                yield self._batch(raw, pb.flip)
        finally:
            del pipe


__all__ = ["DaliSource"]


def dali_status(deep: bool = True) -> tuple[bool, str]:
    """Whether nvidia-dali imports; ``deep=False`` only looks for the package."""
    try:
        if deep:
            import nvidia.dali  # noqa: F401
        elif importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
            raise ImportError("No module named 'nvidia.dali'")
    except Exception as e:
        return False, (f"nvidia-dali is not importable ({type(e).__name__}: {e}); install it with "
                       "`pip install fastdmtg[dali]` (nvidia-dali-cuda130 or -cuda120)")
    return True, "installed"


BACKEND = LoaderBackend("dali", lambda ds, cache, cfg, kw, frac: DaliSource(ds, **kw), status=dali_status,
                        order=4)
