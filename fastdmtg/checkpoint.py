"""Atomic, safe checkpoint I/O.

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed
over the target (``os.replace`` is atomic on POSIX), so an interruption at any moment leaves either
the old or the new file — never a truncated one. Checkpoints are loaded with
``torch.load(weights_only=True)``: no pickled code is ever executed from a run folder.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch


def _atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupted or foreign file: say which
        raise RuntimeError(f"{path}: cannot load checkpoint ({e})") from e


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    _atomic_write_bytes(path, data)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model weights not found")
    return load_file(str(path))
