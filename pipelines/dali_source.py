"""dali: NVIDIA DALI decodes the raw files — on the GPU (``decoders.image(device="mixed")``,
nvJPEG / nvImageCodec) when the target device is CUDA, on the CPU with ``device_id=None``
otherwise (what the tests and CI run).

Every input of a sample comes from ONE batch-mode ``external_source`` callback with one output per
file kind, so the image and its label maps are read in lock-step by construction, in the plan's
order (``common.plan_epoch``) — DALI's own file readers shuffle with their own generator and could
not reproduce the other backends' order or the DDP sharding.

Stages (B = this batch's size, which may be smaller than the pipeline's max batch size):

    CelebA      host   encoded JPEG bytes (B × variable uint8) + labels (B, N) int64
                DALI   decoders.image(RGB) → (B, 218, 178, 3) uint8          [mixed: GPU | cpu]
                torch  → (B, 3, H, W) → reference resize (bilinear, half-pixel, no antialias,
                       rounded: ``celeba.load_image``) → (B, 3, S, S) uint8 → float/255  [device]
    Taskonomy   host   encoded PNG bytes per domain (header checked: bit depth, colour type, side)
      raw root  DALI   rgb, normal: decoders.image(RGB) (B, H, H, 3) uint8     [mixed | cpu]
                       segment_semantic: decoders.image(GRAY) (B, H, H, 1) uint8 [mixed | cpu]
                       depth, keypoints, edges: decoders.image(ANY_DATA, dtype=UINT16) → cast
                       INT32 (B, H, H, 1) [cpu] — without ``dtype`` DALI silently decodes 16-bit
                       PNGs to 8 bits, and torch cannot take DALI's UINT16
                torch  → (B, C, H, H) → ``prepare``'s resize per domain (antialiased bilinear,
                       or nearest-exact for class ids) → make_batch                  [device]
      prepared  host   rows of the memory-mapped arrays (C, S, S) per domain → DALI (copy to the
                       GPU when CUDA) → make_batch
Resizing in torch rather than ``fn.resize`` keeps the values equal to the reference decoders
(DALI's resampling rounds differently).
"""
from __future__ import annotations

import struct

import numpy as np
import torch

from .common import (PipelineError, ShardedSource, celeba_batch, resize_like_reference, resize_taskonomy,
                     taskonomy_batch)
from .datasets import as_int16


def _to_torch(tl, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A DALI TensorList → one torch tensor on ``device`` (or a list when the samples' shapes differ)."""
    from nvidia.dali.backend import TensorListGPU
    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        if not tl.is_dense_tensor():
            return [_to_torch_gpu_one(tl[i], device) for i in range(len(tl))]
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    if tl.is_dense_tensor():
        return torch.from_numpy(tl.as_array()).to(device, non_blocking=True)
    return [torch.from_numpy(np.array(tl[i])).to(device, non_blocking=True) for i in range(len(tl))]


def _to_torch_gpu_one(t, device):
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _nhwc_to_nchw(x) -> torch.Tensor | list:
    if isinstance(x, list):
        return [t.permute(2, 0, 1) for t in x]
    return x.permute(0, 3, 1, 2)


class _Feed:
    """The external_source callback: batch i of the plan as one list per output."""

    def __init__(self, plan, read):
        self.plan, self.read = plan, read

    def __call__(self, info):
        i = info.iteration
        if i >= len(self.plan):
            raise StopIteration
        return self.read(self.plan[i].index)


def _png_check(buf: np.ndarray, path: str, domain: str, side: int):
    from fastdmtg.data import taskonomy as tx
    head = buf[:29].tobytes()
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise tx.TaskonomyFormatError(f"{path}: not a PNG file")
    w, h, depth, colour = struct.unpack(">IIBB", head[16:26])
    if (depth, colour) != tx.PNG_TYPE[domain]:
        want = tx.PNG_TYPE[domain]
        raise tx.TaskonomyFormatError(f"{path}: expected a {want[0]}-bit {tx._PNG_COLOUR[want[1]]} PNG for {domain}, "
                                      f"found {depth}-bit {tx._PNG_COLOUR.get(colour, f'colour type {colour}')}")
    if w != side or h != side:
        raise tx.TaskonomyFormatError(f"{path}: image is {w}x{h}, expected {side}x{side}")


def _read_bytes(path: str, missing_error) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise missing_error(f"{path}: missing") from None


class DaliSource(ShardedSource):
    backend = "dali"

    def __init__(self, spec, *, num_threads: int = 2, prefetch: int = 2, rank=None, world_size=None,
                 flip: bool = False):
        super().__init__(rank=rank, world_size=world_size, flip=flip)
        self.spec, self.taskset, self.image_size, self.kind = spec, spec.taskset, spec.image_size, spec.kind
        self.num_threads, self.prefetch = num_threads, prefetch
        self.prepared = spec.kind == "taskonomy" and spec.is_prepared_root

    def num_samples(self, split):
        return self.spec.num_samples(split)

    # -- readers (host side of the external source) --------------------------------------------
    def _celeba_reader(self, split):
        from fastdmtg.data.celeba import CelebAFormatError
        paths, labels = [str(p) for p in self.spec.paths(split)], np.ascontiguousarray(self.spec.labels(split))

        def read(idx):
            return [_read_bytes(paths[i], CelebAFormatError) for i in idx], [labels[i] for i in idx]
        return read, paths

    def _taskonomy_reader(self, split):
        from fastdmtg.data.taskonomy import TaskonomyFormatError
        if self.prepared:
            arrays = self.spec.arrays(split)

            def read_rows(idx):
                return tuple([np.ascontiguousarray(as_int16(a[i])) for i in idx] for a in arrays.values())
            return read_rows, None
        paths, side = self.spec.raw_paths(split), self.spec.raw()["side"]

        def read(idx):
            out = []
            for d in self.spec.domains:
                col = []
                for i in idx:
                    p = paths[i][d]
                    buf = _read_bytes(p, TaskonomyFormatError)
                    _png_check(buf, p, d, side)
                    col.append(buf)
                out.append(col)
            return tuple(out)
        return read, paths

    # -- the pipeline ----------------------------------------------------------------------------
    def _pipeline(self, plan, read, batch_size, device):
        from nvidia.dali import fn, pipeline_def, types
        gpu = device.type == "cuda"
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        decode_dev = "mixed" if gpu else "cpu"
        feed = _Feed(plan, read)
        kind, domains, prepared = self.kind, self.spec.domains if self.kind == "taskonomy" else (), self.prepared

        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipe():
            if kind == "celeba":
                enc, labels = fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True,
                                                 dtype=[types.UINT8, types.INT64])
                return fn.decoders.image(enc, device=decode_dev, output_type=types.RGB), labels
            srcs = fn.external_source(source=feed, num_outputs=len(domains), batch=True, batch_info=True)
            if len(domains) == 1:
                srcs = [srcs]
            outs = []
            for d, s in zip(domains, srcs):
                if prepared:
                    outs.append(s.gpu() if gpu else s)
                elif d in ("rgb", "normal"):
                    outs.append(fn.decoders.image(s, device=decode_dev, output_type=types.RGB))
                elif d == "segment_semantic":
                    outs.append(fn.decoders.image(s, device=decode_dev, output_type=types.GRAY))
                else:
                    x = fn.decoders.image(s, device="cpu", output_type=types.ANY_DATA, dtype=types.UINT16)
                    outs.append(fn.cast(x, dtype=types.INT32))
            return tuple(outs)

        p = pipe()
        p.build()
        return p

    def _culprit(self, paths, pb, err: Exception):
        """DALI's decode error does not name our file: find it with the reference decoder."""
        if self.kind == "celeba":
            from fastdmtg.data.celeba import load_image
            for i in pb.index:
                load_image(paths[i], 8)        # raises CelebAFormatError naming the file
        elif paths is not None:
            from fastdmtg.data.taskonomy import load_domain
            for i in pb.index:
                for d, p in paths[i].items():
                    load_domain(p, d)           # raises TaskonomyFormatError naming the file
        raise PipelineError(f"dali: decoding a batch failed ({type(err).__name__}: {err})") from err

    def _produce(self, split, plan, device, batch_size):
        from fastdmtg.data.celeba import CelebAFormatError
        from fastdmtg.data.taskonomy import TaskonomyFormatError
        read, paths = self._celeba_reader(split) if self.kind == "celeba" else self._taskonomy_reader(split)
        pipe = self._pipeline(plan, read, batch_size, device)
        try:
            for pb in plan:
                try:
                    outs = pipe.run()
                except (CelebAFormatError, TaskonomyFormatError):
                    raise
                except StopIteration:
                    raise PipelineError(f"dali: the pipeline ended before the plan's {len(plan)} batches") from None
                except Exception as e:   # DALI reports decode errors as RuntimeError
                    self._culprit(paths, pb, e)
                if self.kind == "celeba":
                    img = _nhwc_to_nchw(_to_torch(outs[0], device))
                    if isinstance(img, list):   # mixed image sizes: resize one by one
                        img = torch.cat([resize_like_reference(t[None], self.image_size) for t in img])
                    else:
                        img = resize_like_reference(img, self.image_size)
                    labels = torch.from_numpy(outs[1].as_array()).to(device, non_blocking=True)
                    yield celeba_batch(img, labels, pb.flip)
                else:
                    yield taskonomy_batch(self._taskonomy_raw(outs, device), self.spec.task_names, pb.flip)
        finally:
            del pipe

    def _taskonomy_raw(self, outs, device) -> dict[str, torch.Tensor]:
        from fastdmtg.data import taskonomy as tx
        raw = {}
        for d, tl in zip(self.spec.domains, outs):
            x = _to_torch(tl, device)
            if self.prepared:                # rows are (C, S, S) already
                raw[d] = x if not isinstance(x, list) else torch.stack(x)
                continue
            x = _nhwc_to_nchw(x)
            if isinstance(x, list):
                x = torch.stack(x)           # the header check made every side equal
            bits = 16 if tx.DTYPE[d] == np.uint16 else 8
            raw[d] = resize_taskonomy(x, self.image_size, tx.resize_mode(d, self.spec.seg_resize), bits)
        return raw
