"""What every fused-op file shares: the guarded triton import, the backend resolution, small helpers.

triton is an optional extra (``pip install fastdmtg[triton]``). Without it, every op file still
imports (its ``@jit`` kernels become placeholders that are never launched), the PyTorch references
run, and asking for the ``triton`` backend fails with the import error as the reason.

Backend resolution (per call site, from config; no process-wide switch)::

    resolve_backend("auto" | "triton" | "reference" | None, device) -> "triton" | "reference"

``auto`` (and None) is ``triton`` when triton imports and the device is CUDA, else ``reference``.
``triton`` on a CPU device needs ``TRITON_INTERPRET=1`` set before triton was first imported (how
the tests run the kernels on CPU). The environment variable ``FASTDMTG_KERNELS``, read once at import,
replaces ``auto`` wherever it is resolved: an override for tests and debugging, not a setting.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:  # the optional extra
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or triton failing to find a backend
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

BACKENDS = ("auto", "triton", "reference")
# read once, like triton reads TRITON_INTERPRET once: a plain constant for dynamo to trace
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ENV_OVERRIDE = os.environ.get("FASTDMTG_KERNELS", "").strip().lower()
if _ENV_OVERRIDE and _ENV_OVERRIDE not in BACKENDS:
    raise ValueError(f"FASTDMTG_KERNELS={_ENV_OVERRIDE!r}; expected one of {BACKENDS}")


def triton_available() -> bool:
    return TRITON_IMPORT_ERROR is None


def resolve_backend(name: Optional[str], device) -> str:
    """``"triton"`` or ``"reference"`` for a config value (auto | triton | reference) on ``device``."""
    name = "auto" if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"train.kernels: unknown kernel backend {name!r}; expected one of {BACKENDS}")
    if name == "auto" and _ENV_OVERRIDE:
        name = _ENV_OVERRIDE
    dev_type = torch.device(device).type
    if name == "reference":
        return "reference"
    if name == "auto":
        return "triton" if dev_type == "cuda" and TRITON_IMPORT_ERROR is None else "reference"
    if TRITON_IMPORT_ERROR is not None:
        raise ValueError(f"train.kernels=triton: triton is unavailable ({TRITON_IMPORT_ERROR}); install it "
                         "with pip install fastdmtg[triton], or use train.kernels=auto|reference")
    if dev_type != "cuda" and not _INTERPRET:
        raise ValueError("train.kernels=triton on a non-CUDA device needs TRITON_INTERPRET=1 (set before "
                         "triton is first imported); use train.kernels=auto|reference")
    return "triton"


def jit(fn=None, **kwargs):
    """``triton.jit``, or without triton a placeholder that is never launched (resolve_backend
    refuses the triton backend then)."""
    if triton is not None:
        return triton.jit(fn, **kwargs) if fn is not None else triton.jit(**kwargs)
    if fn is None:
        return lambda f: f
    return fn


def npow2(x: int) -> int:
    x = max(int(x), 1)
    return 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def int_view(t: torch.Tensor) -> torch.Tensor:
    """Triton has no bool pointer loads we want to rely on; a uint8 view is free."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def f32_scalar(device) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device=device)
