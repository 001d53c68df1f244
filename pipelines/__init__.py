"""fastdmtg.pipelines: one loader interface, four backends, chosen by ``data.backend``.

    gpu-cache   decoded uint8 arrays resident in device memory; gather/flip/convert on the device
    ffcv        .beton files (``write_beton``), FFCV's compiled decode pipeline, then the device
    dali        NVIDIA DALI: JPEG/PNG decode on the GPU (``mixed``) or CPU (``device_id=None``)
    torch       a DataLoader over the raw files (the reference-style baseline)

``build_source(cfg, progress)`` returns a ``fastdmtg.data.DataSource`` whose ``batches(...)`` yields
the same batch layout for every backend (see ``pipelines/common.py``: order, last-batch rule,
DDP sharding, flips) and accepts two extra keywords, ``rank`` and ``world_size`` (default:
torch.distributed's when it is initialised, else a single process). See docs/pipelines.md.
"""
from __future__ import annotations

from .common import PipelineError, plan_epoch, resolve_shard, shard_num_batches, shard_positions

BACKENDS = ("gpu-cache", "ffcv", "dali", "torch")

#: flip augmentation on by default: Taskonomy yes (reference), CelebA no (reference)
DEFAULT_FLIP = {"celeba": False, "taskonomy": True}


def backend_status(name: str, deep: bool = True) -> tuple[bool, str]:
    """(usable, reason) — whether a backend's packages are there, and why not. ``deep=False`` only
    looks for the packages without importing them (importing ffcv costs seconds of numba JIT)."""
    import importlib.util
    if name in ("gpu-cache", "torch"):
        return True, "built in"
    if name == "ffcv":
        try:
            if deep:
                import ffcv.loader  # noqa: F401
                import cv2  # noqa: F401   (opencv needs libGL.so.1 / libglib at import)
            elif importlib.util.find_spec("ffcv") is None or importlib.util.find_spec("cv2") is None:
                raise ImportError("No module named 'ffcv'")
        except Exception as e:   # ImportError, or opencv's missing libGL (OSError)
            return False, (f"ffcv is not importable ({type(e).__name__}: {e}); install with "
                           "`bash .ci/install-pipelines.sh VENV` or `pip install fastdmtg[ffcv]` after the "
                           "Debian packages pkg-config libopencv-dev libturbojpeg0-dev libgl1 libglib2.0-0")
        return True, "installed"
    if name == "dali":
        try:
            if deep:
                import nvidia.dali  # noqa: F401
            elif importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
                raise ImportError("No module named 'nvidia.dali'")
        except Exception as e:
            return False, (f"nvidia-dali is not importable ({type(e).__name__}: {e}); install with "
                           "`pip install fastdmtg[dali]` (nvidia-dali-cuda130 or -cuda120)")
        return True, "installed"
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def build_source(cfg, progress: bool = True, *, rank: int | None = None, world_size: int | None = None,
                 flip: bool | None = None, device_fraction: float = 0.5):
    """The DataSource for a DataConfig whose ``backend`` is one of ``BACKENDS``.

    ``flip``: train-time horizontal flips (default ``DEFAULT_FLIP[dataset]``). ``device_fraction``:
    the share of free device memory gpu-cache may take before it falls back (a log line says so)."""
    from .datasets import build_spec
    backend = cfg.backend
    if backend not in BACKENDS:
        raise ValueError(f"data.backend: expected {'|'.join(BACKENDS)} here, got {backend!r}")
    ok, why = backend_status(backend)
    if not ok:
        raise PipelineError(f"data.backend={backend}: {why}")
    spec = build_spec(cfg, progress)
    flip = DEFAULT_FLIP[spec.kind] if flip is None else flip
    common = dict(rank=rank, world_size=world_size, flip=flip)
    workers = int(getattr(cfg, "num_workers", 2))
    if backend == "gpu-cache":
        from .gpu_cache import GpuCacheCeleba, GpuCacheTaskonomy
        if spec.kind == "celeba":
            return GpuCacheCeleba(spec, fraction=device_fraction, **common)
        return GpuCacheTaskonomy(spec, fraction=device_fraction, num_workers=workers, **common)
    if backend == "torch":
        from .torch_files import TorchCeleba, TorchTaskonomy
        if spec.kind == "celeba":
            return TorchCeleba(spec, num_workers=workers, **common)
        return TorchTaskonomy(spec, num_workers=workers, **common)
    if backend == "ffcv":
        from .ffcv_source import FfcvSource
        return FfcvSource(spec, num_workers=workers, progress=progress, **common)
    from .dali_source import DaliSource
    return DaliSource(spec, num_threads=max(1, workers), **common)


def write_beton(*args, **kwargs):
    """See ``fastdmtg.pipelines.ffcv_source.write_beton`` (imported lazily: FFCV is optional)."""
    from .ffcv_source import write_beton as _w
    return _w(*args, **kwargs)


def prepare_ffcv_main(argv=None) -> int:
    """``fastdmtg prepare --format ffcv ...`` — see ``ffcv_source.prepare_ffcv_main``."""
    from .ffcv_source import prepare_ffcv_main as _m
    return _m(argv)


__all__ = ["BACKENDS", "DEFAULT_FLIP", "build_source", "backend_status", "write_beton", "prepare_ffcv_main",
           "PipelineError", "resolve_shard", "shard_positions", "shard_num_batches", "plan_epoch"]
