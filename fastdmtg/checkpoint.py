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

One writer per run folder, across processes and hosts: ``RunLock`` creates ``RUN/.lock`` atomically
(a hard link, or ``O_CREAT|O_EXCL``) for the life of a run and removes it at the end; the file records
the holder's host, pid, process start and start time, so a second writer can say who holds it and a
lock left by a killed process of the same host is taken over (never one of another host).
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import platform
import sys
import time
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


# ----------------------------------------------------------------------------- the run lock

def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (/proc/PID/stat field 22), or None: with
    the boot id it tells a live holder from another process that got its pid later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # the command name (field 2) is in parentheses and may hold spaces: count from the last ")"
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _own_record() -> dict:
    return {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(sys.argv), "boot_id": _boot_id(), "process_start": _process_start(os.getpid())}


def _read_record(lock: Path | int) -> dict | None:
    """The holder's record in a lock file (a path, or a descriptor: then the record of that very file,
    whatever the name points to now), or None (unreadable, or not a record: e.g. being written)."""
    try:
        if isinstance(lock, int):
            size = os.fstat(lock).st_size
            text = os.pread(lock, size, 0).decode("utf-8")
        else:
            text = Path(lock).read_text(encoding="utf-8")
        rec = json.loads(text)
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and type(rec.get("pid")) is int and isinstance(rec.get("host"), str)
    return rec if ok else None


def _holder_text(rec: dict | None) -> str:
    if rec is None:
        return "holder unknown"
    return f"pid {rec['pid']} on {rec['host']}, started {rec.get('started', '?')}: {rec.get('command', '')}".rstrip(": ")


def _in_use(path: Path, rec: dict | None) -> str:
    """The message for a lock held by a live run of this host."""
    return f"{path.parent} is in use by another run ({_holder_text(rec)}); wait for it to finish or choose another --out"


def _refusal(path: Path, rec: dict | None) -> str:
    """The message for a lock this host must not take over (another host's, or one it cannot read)."""
    if rec is None:
        return (f"{path.parent} is locked ({path} does not say by whom); if no run uses this folder, "
                f"delete {path} and start again")
    return (f"{path.parent} is in use by a run on another host ({_holder_text(rec)}); a lock of another host "
            f"is never taken over: if that run is really gone, delete {path} and start again")


def _try_flock(fd: int) -> bool | None:
    """flock(LOCK_EX | LOCK_NB) on ``fd`` → True taken, False held by another descriptor, None not
    supported by this file system."""
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _process_alive(rec: dict) -> bool | None:
    """Whether the process of a record of this host still runs → True / False, or None when only
    its pid can be checked and that pid exists (a record without boot id and process start)."""
    pid, boot = rec["pid"], _boot_id()
    if pid <= 0:
        return None
    if boot is not None and rec.get("boot_id") not in (None, boot):
        return False                                  # written before this host's last boot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                           # another user's process: it exists
        pass
    start = _process_start(pid)
    if rec.get("process_start") is None or start is None:
        return None
    return start == rec["process_start"]


def _holder_gone(rec: dict, fd: int) -> bool | None:
    """A lock of this host: whether its holder is gone (True), alive (False), or the lock is being
    removed by another process right now (None: look again). Takes the lock file's flock when free:
    a live holder of this version holds it, so a holder in another pid namespace is seen too."""
    free = _try_flock(fd)
    alive = _process_alive(rec)
    if free is False:                                 # held: its holder, or another process removing it
        return None if alive is False else False
    if alive is None:                                 # pid exists, identity unknown: the flock decides
        return free is True
    return not alive


def _open_existing(path: Path) -> int:
    """A descriptor of an existing lock file to take its flock with: read-write where allowed (NFS maps
    flock to a write lock, which needs it), else read-only."""
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class RunLock:
    """RUN/.lock for the life of a run, across processes and hosts on a shared file system.

    Taken atomically: the holder's record (host, pid, boot id and process start, start time, command)
    is written to a file of its own, then hard-linked to RUN/.lock — ``link(2)`` either creates the
    name or fails, on local file systems and on NFS v3+ (where a lost reply is told apart by the link
    count, as open(2) recommends); where hard links are not supported, ``O_CREAT|O_EXCL``. The holder
    also keeps an ``flock`` on it and removes it on ``release()``.

    A lock that exists is judged from its record: held by a live process of this host → refused
    (RunLocked naming it); left by a process of this host that is gone (no such pid, or the pid now
    belongs to another process or boot, and no flock held) → removed and taken; held by another host →
    refused, never taken over, since this host cannot see that host's processes: the message says to
    delete the file if that run is really gone. ``RunLock(run_dir)`` acquires it or raises."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None
        self.reclaimed: dict | None = None           # the record of a stale lock removed on the way
        for _ in range(50):      # a stale lock removed by another process meanwhile: look again
            if self._create():
                return
            if not self._remove_if_stale():
                time.sleep(0.02)
        raise RunLocked(_in_use(self.path, _read_record(self.path)))

    def _create(self) -> bool:
        """Take the lock if RUN/.lock does not exist → whether it was taken."""
        rec = json.dumps(_own_record()) + "\n"
        tmp = self.path.with_name(f".lock.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror or _reason(e)}") from None
        try:
            os.write(fd, rec.encode("utf-8"))
            os.fsync(fd)
            _try_flock(fd)
            taken = self._link(tmp, fd, rec)
        except BaseException:
            os.close(fd)
            raise
        finally:
            _unlink_quietly(tmp)
        if taken is None:                            # no hard links here: the record's own fd is not the lock's
            os.close(fd)
            return self._create_exclusive(rec)
        if not taken:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _link(self, tmp: Path, fd: int, rec: str) -> bool | None:
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return os.fstat(fd).st_nlink == 2        # NFS: the link was made but its reply was lost
        except FileNotFoundError:
            return False        # our file was removed as a killed writer's by the holder that just won
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
                return None
            if os.fstat(fd).st_nlink == 2:
                return True
            raise WriteFailed(f"cannot write {self.path}: {e.strerror or _reason(e)}") from None

    def _create_exclusive(self, rec: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror or _reason(e)}") from None
        _try_flock(fd)
        try:
            os.write(fd, rec.encode("utf-8"))
            os.fsync(fd)
        except OSError:          # the lock is what matters; the record only makes the message better
            pass
        self._fd = fd
        return True

    def _remove_if_stale(self) -> bool:
        """RUN/.lock exists: remove it when its holder is gone (see the class) → whether it was removed
        or is gone already; raise RunLocked when it is held."""
        try:
            fd = _open_existing(self.path)
        except FileNotFoundError:
            return True                              # released meanwhile
        try:
            rec = _read_record(fd)
            if rec is None or rec.get("host") != platform.node():
                raise RunLocked(_refusal(self.path, rec))
            gone = _holder_gone(rec, fd)
            if gone is None:                         # a reclaimer holds it, or it changed: look again
                return False
            if not gone:
                raise RunLocked(_in_use(self.path, rec))
            # removed under its flock and only if the name is still this file: of two processes
            # reclaiming one stale lock, one removes it, the other finds the new holder's lock
            if _same_file(fd, self.path):
                os.unlink(self.path)
                self.reclaimed = rec
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)                                 # closing the descriptor releases the flock

    def __del__(self):
        self.release()
