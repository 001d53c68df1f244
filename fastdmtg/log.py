"""Messages and progress bars, one policy for every command.

Messages go through stdlib ``logging`` under the ``fastdmtg`` logger: INFO to stdout (the epoch
lines, run summaries), WARNING and above to stderr with a ``warning:`` / ``error:`` prefix. A run
also appends its messages to RUN_DIR/train.log (``RunLog``). ``fastdmtg.epochs`` carries the
per-epoch lines (a caller can raise that logger's level to mute them alone).

Progress bars (tqdm, on stderr) are drawn only on a terminal: piped to a file, a run writes its
epoch lines and no ``\\r`` updates. ``--progress`` forces them on, ``--no-progress`` / ``--quiet``
off (``--quiet`` keeps the epoch lines; ``--log-level WARNING`` drops them).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

LOGGER = "fastdmtg"
EPOCHS = "fastdmtg.epochs"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Console(logging.Handler):
    """INFO → the current sys.stdout, WARNING+ → the current sys.stderr (looked up at each message,
    so redirections made after set-up, e.g. by pytest, are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(msg + "\n")
            stream.flush()
        except Exception:                      # never let a message sink a run
            self.handleError(record)


class _Prefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING and not msg.startswith("warning:"):
            return f"warning: {msg}"
        return msg


def get_logger(name: str = LOGGER) -> logging.Logger:
    """The package logger (with its console handler installed once, at INFO, unless configured)."""
    root = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Console) for h in root.handlers):
        h = _Console()
        h.setFormatter(_Prefix("%(message)s"))
        root.addHandler(h)
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        # records still propagate to the root logger: an application's (or pytest's) handlers see them
    return logging.getLogger(name)


def setup(level: str | None = None) -> logging.Logger:
    """Set the package's log level for a command (--log-level; INFO when not given); returns the
    package logger."""
    log = get_logger()
    log.setLevel(level.upper() if level else logging.INFO)
    return log


def is_tty(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bars_on(flag: bool | None, default: bool = True) -> bool:
    """Progress bars: ``flag`` when given (--progress / --no-progress), else ``default`` (e.g.
    train.progress) on a terminal only (tqdm draws on stderr)."""
    if flag is not None:
        return bool(flag)
    return bool(default) and is_tty()


class RunLog:
    """RUN_DIR/train.log: every message of the package (at the package's level), appended, with
    timestamps. ``close()`` detaches it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "train.log"
        self.handler: logging.Handler | None = None
        try:
            h = logging.FileHandler(self.path, mode="a", encoding="utf-8", delay=False)
        except OSError:                        # a read-only or full disk: the run reports that itself
            return
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        get_logger().addHandler(h)
        self.handler = h

    def close(self) -> None:
        if self.handler is not None:
            get_logger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def add_output_flags(p: argparse.ArgumentParser, progress_help: str = "progress bars") -> None:
    """--progress/--no-progress, --quiet and --log-level, the same on every command."""
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{progress_help} (default: on when stderr is a terminal, off when piped)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (same as --no-progress); "
                                                        "epoch and summary lines stay")
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None,
                   help="message level (default INFO; WARNING drops the epoch lines)")


def progress_flag(args) -> bool | None:
    """The --progress/--no-progress/--quiet decision: True, False or None (auto: terminal only)."""
    if getattr(args, "quiet", False):
        return False
    return getattr(args, "progress", None)
