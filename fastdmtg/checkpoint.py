"""Safe run-folder I/O: atomic writes, checkpoints, strict JSON, the run lock.

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed
over the target (``os.replace`` is atomic on POSIX), so an interruption at any moment leaves either
the old or the new file — never a truncated one. A failed write (disk full, I/O error) removes its
temporary file and raises ``WriteFailed`` naming the file; the target is untouched.

``checkpoints/last.pt`` keeps its predecessor as ``checkpoints/last.prev.pt`` (renamed over just
before the new file is put in place); resuming falls back to it, with a warning, when last.pt is
missing or unreadable. Checkpoints are loaded with ``torch.load(weights_only=True)``: no pickled
code is ever executed from a run folder.

JSON files are strict JSON (RFC 8259): a value that is not a finite number (NaN, ±inf — e.g. an
undefined metric) is written as ``null``.

One writer per run folder: ``RunLock`` holds ``RUN/.lock`` with ``fcntl.flock`` for the life of a
run (the OS releases it when the process dies, however it dies); the file records the holder's pid,
host and start time so a second writer can say who holds it.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import torch

LAST, LAST_PREV, BEST = "last.pt", "last.prev.pt", "best.pt"
# files whose presence means the folder holds a finished run (never overwritten by a new run)
FINISHED_MARKERS = ("results.json", "grouped_model.json", "grouped_model.safetensors")


class RunFileError(ValueError):
    """A file of a run folder cannot be read or does not hold what it should; names the file."""


class WriteFailed(OSError):
    """Writing a file failed (disk full, I/O error, permissions); the message names the file.
    The temporary file was removed and the target left as it was."""


class RunLocked(FileExistsError):
    """Another process holds the run folder's lock."""


def _reason(e: BaseException) -> str:
    """A one-line, non-empty reason for an exception raised by a reader library."""
    text = " ".join(str(e).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return text or type(e).__name__


# ----------------------------------------------------------------------------- writing

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                          # not supported on every filesystem: best effort
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _atomic_write_bytes(path: str | Path, data: bytes, keep_previous: str | Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically. ``keep_previous``: rename the current file there
    first (after the new content is safely on disk), so the previous version survives."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteFailed(f"cannot write {path}: {e.strerror or _reason(e)}") from None
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj):
    """``obj`` with every non-finite float replaced by None (JSON null): JSON has no NaN/Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj) -> None:
    """Strict JSON (non-finite numbers as null), written atomically."""
    atomic_write_text(path, json.dumps(strict_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in RUN and RUN/checkpoints (call with the lock held)."""
    gone = []
    for d in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if d.is_dir():
            for p in d.glob(".*.tmp*"):
                try:
                    p.unlink()
                    gone.append(p)
                except OSError:
                    pass
    return gone


# ----------------------------------------------------------------------------- reading

def read_json(path: str | Path):
    """Parse a JSON file; a missing, unreadable or invalid file raises one line naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except UnicodeDecodeError as e:
        raise RunFileError(f"{path}: not UTF-8 text (byte {e.start}): not a JSON file") from None
    except OSError as e:
        raise RunFileError(f"{path}: cannot read ({e.strerror or _reason(e)})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def save_checkpoint(path: str | Path, state: dict, keep_previous: bool = False) -> None:
    """Atomic ``torch.save``; ``keep_previous``: the file it replaces becomes ``<stem>.prev.pt``."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write_bytes(path, buf.getvalue(), path.with_name(f"{path.stem}.prev{path.suffix}") if keep_previous else None)


def load_checkpoint(path: str | Path, map_location="cpu", required: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint; missing → FileNotFoundError, unreadable or lacking ``required`` entries →
    RunFileError, each one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        size = path.stat().st_size
        if size == 0:
            raise RunFileError(f"{path}: not a readable checkpoint (empty file)")
        st = torch.load(path, map_location=map_location, weights_only=True)
    except RunFileError:
        raise
    except Exception as e:  # truncated, corrupt or foreign file: say which and why, on one line
        raise RunFileError(f"{path}: not a readable checkpoint, truncated or corrupt ({_reason(e)})") from None
    if not isinstance(st, dict):
        raise RunFileError(f"{path}: not a fastdmtg checkpoint (holds a {type(st).__name__}, not a dict)")
    missing = [k for k in required if k not in st]
    if missing:
        raise RunFileError(f"{path}: not a fastdmtg checkpoint (missing {', '.join(missing)})")
    return st


def load_resume_checkpoint(ckpt_dir: str | Path, map_location="cpu", required: tuple[str, ...] = (),
                           warn=print) -> tuple[Path, dict]:
    """The state to resume from: last.pt, or last.prev.pt (with a warning) when last.pt is missing or
    unreadable. An unreadable last.pt is renamed to ``last.unreadable.pt`` so that the next save
    does not rotate it over the good last.prev.pt. Neither readable → the error of last.pt."""
    ckpt_dir = Path(ckpt_dir)
    last, prev = ckpt_dir / LAST, ckpt_dir / LAST_PREV
    try:
        return last, load_checkpoint(last, map_location, required)
    except (FileNotFoundError, RunFileError) as e:
        if not prev.exists():
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(f"{ckpt_dir.parent}: nothing to resume ({last} not found)") from None
            raise
        try:
            st = load_checkpoint(prev, map_location, required)
        except (FileNotFoundError, RunFileError) as e2:
            raise RunFileError(f"{e}; and the previous checkpoint: {e2}") from None
        what = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        if last.exists():
            try:
                os.replace(last, ckpt_dir / "last.unreadable.pt")
                what += f"; moved to {ckpt_dir / 'last.unreadable.pt'}"
            except OSError:
                pass
        warn(f"warning: {last} is {what}; resuming from {prev}")
        return prev, st


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    _atomic_write_bytes(path, data)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model weights not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (header, truncation)
        raise RunFileError(f"{path}: not a readable safetensors file, truncated or corrupt ({_reason(e)})") from None


# ----------------------------------------------------------------------------- run folders

def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether RUN holds a checkpoint a run can resume from."""
    d = Path(run_dir) / "checkpoints"
    return (d / LAST).exists() or (d / LAST_PREV).exists()


def check_new_run_folder(run_dir: str | Path) -> None:
    """Refuse to start a new run in a folder that holds one: a finished run is never overwritten,
    an unfinished one is continued with --resume."""
    run_dir = Path(run_dir)
    done = [m for m in FINISHED_MARKERS if (run_dir / m).exists()]
    if done:
        raise FileExistsError(f"{run_dir} holds a finished run ({done[0]}); a finished run is never "
                              "overwritten: choose another --out (or --resume it to train more epochs)")
    # (a best.pt alone is what a run killed during its first epoch's end leaves: nothing to resume,
    # so a new run may start there)
    found = [n for n in (LAST, LAST_PREV) if (run_dir / "checkpoints" / n).exists()]
    if found:
        raise FileExistsError(f"{run_dir} already holds a run (checkpoints/{found[0]}); use --resume to continue "
                              "it or choose another --out")


class RunLock:
    """Exclusive lock on RUN/.lock for the life of a run (released by ``release()`` or by the OS when
    the process ends). ``RunLock(run_dir)`` acquires it or raises RunLocked naming the holder."""

    def __init__(self, run_dir: str | Path):
        import fcntl
        import platform
        import sys
        import time
        self.path = Path(run_dir) / ".lock"
        try:
            self._f = open(self.path, "a+", encoding="utf-8")       # "a+": never truncate the holder's record
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror or _reason(e)}") from None
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder()
            self._f.close()
            raise RunLocked(f"{self.path.parent} is in use by another run ({holder}); wait for it to finish "
                            "or choose another --out") from None
        info = {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join(sys.argv)}
        try:
            self._f.seek(0)
            self._f.truncate()
            self._f.write(json.dumps(info) + "\n")
            self._f.flush()
        except OSError:          # the lock is what matters; the record only makes the message better
            pass

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info.get('command', '')}".rstrip(": ")
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        f, self._f = getattr(self, "_f", None), None
        if f is not None:
            f.close()                # closing the descriptor releases the flock

    def __del__(self):
        self.release()
