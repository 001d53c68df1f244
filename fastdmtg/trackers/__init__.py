"""Experiment trackers: TensorBoard, MLflow, Weights & Biases — one interface, one path.

The trainer holds one :class:`Trackers` (on rank 0 only; None when no tracker is on) and talks to it in
TensorBoard's ``SummaryWriter`` vocabulary: ``add_scalar(tag, value, step)``, ``add_figure(tag, figure,
step)``, ``add_hparams(hparams, metrics)``, ``flush()``. *What* is recorded is decided once, by the
trainer's call sites and ``fastdmtg/tboard.py`` (``log_epoch``, ``log_hparams``), so every tracker gets
the same metrics, hyper-parameters and grouping figure; each tracker only says *how* it stores them
(one file per tracker in this package, with ``TRACKER = TheClass``: ``TRACKERS`` finds it).

Trackers in use: TensorBoard when ``train.tensorboard`` (on by default), plus each name listed in
``train.logger`` (comma-separated, ``--logger NAME``). Each tracker's run id is kept in
``RUN/trackers.json``, so ``--resume`` continues the same MLflow run / W&B run. A tracker whose package
is missing stops the run before it starts (one line saying what to install); a tracker that fails in
the middle of a run is dropped with a warning and training goes on (a run is never lost to a tracker).
Set-up of each tracker: docs/trackers.md.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from ..configcheck import ConfigError
from ..log import get_logger
from ..registry import Plugins, subclass_of

log = get_logger("fastdmtg.trackers")

STATE_FILE = "trackers.json"          # RUN/trackers.json: {tracker: {its run id, store, ...}}


class TrackerError(ConfigError):
    """A tracker cannot start (package missing, store unreachable, not logged in): one line, exit 2."""


class Tracker:
    """One tracker. ``open`` gets the run folder, the run's config and what the tracker stored in
    RUN/trackers.json when the run started (empty for a new run); ``state()`` is what to store."""
    name = ""
    order = 10                          # its place in listings and messages
    modules: tuple[str, ...] = ()       # importable modules the tracker needs
    extra = ""                          # pip install 'fastdmtg[EXTRA]' installs them

    def __init__(self, run_dir: Path, cfg, state: dict):
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        raise NotImplementedError

    def add_figure(self, tag: str, figure, step: int) -> None:
        raise NotImplementedError

    def add_hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self, status: str) -> None:
        """``status``: finished | killed (interrupted, resumable) | failed."""


# train.logger name → its Tracker class: every module of this package with ``TRACKER = TheClass``
# (fastdmtg/registry.py); trackers of other packages: entry points of the group "fastdmtg.trackers"
TRACKERS = Plugins("tracker", "train.logger", __name__, "TRACKER",
                   accepts=subclass_of(Tracker), order=lambda c: c.order,
                   group="fastdmtg.trackers")


def enabled(cfg) -> list[str]:
    """The trackers a run uses: TensorBoard (train.tensorboard), then train.logger's names."""
    names = ["tensorboard"] if cfg.train.tensorboard else []
    return names + [n for n in logger_names(cfg.train.logger) if n not in names]


def logger_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


tracker_class = TRACKERS.load      # name → its Tracker class


def missing_modules(cls) -> list[str]:
    return [m for m in cls.modules if importlib.util.find_spec(m) is None]


def check_installed(cfg) -> None:
    """Before anything else of a run: every tracker of train.logger can be imported, else one line
    saying what to install (TensorBoard, a dependency, is only warned about in open_trackers)."""
    for name in logger_names(cfg.train.logger):
        cls = tracker_class(name)
        missing = missing_modules(cls)
        if missing:
            raise TrackerError(f"--logger {name} (train.logger): the package{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} not installed; "
                               f"install with: pip install 'fastdmtg[{cls.extra}]'")


def read_state(run_dir: Path) -> dict:
    from .. import checkpoint as ckpt
    p = Path(run_dir) / STATE_FILE
    if not p.exists():
        return {}
    st = ckpt.read_json(p)
    if not isinstance(st, dict):
        raise ckpt.RunFileError(f"{p}: expected a JSON object {{tracker: {{run id, ...}}}}")
    return st


def open_trackers(cfg, run_dir: str | Path, resume: bool) -> "Trackers | None":
    """Start every tracker of the run (rank 0 only); a resumed run continues each tracker's stored run.
    None when no tracker is on."""
    from .. import checkpoint as ckpt
    run_dir = Path(run_dir)
    check_installed(cfg)
    stored = read_state(run_dir) if resume else {}
    opened: list[Tracker] = []
    try:
        for name in enabled(cfg):
            cls = tracker_class(name)
            if missing_modules(cls):            # only TensorBoard gets here (check_installed): go on without it
                log.warning("TensorBoard is not installed (pip install tensorboard): no RUN/tb records")
                continue
            st = stored.get(name) if isinstance(stored.get(name), dict) else {}
            try:
                opened.append(cls(run_dir, cfg, st))
            except TrackerError:
                raise
            except Exception as e:  # the tracker's own error (store unreachable, not logged in, ...)
                raise TrackerError(f"--logger {name}: cannot start ({_one_line(e)})") from None
        if not opened:
            return None
        new = dict(stored, **{t.name: t.state() for t in opened if t.state()})
        if new != stored:
            ckpt.atomic_write_json(run_dir / STATE_FILE, new)
    except BaseException:
        for t in opened:
            t.close("failed")
        raise
    return Trackers(opened)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def status_of(error: BaseException | None) -> str:
    """The end state for a run that ended with ``error`` (None: it finished)."""
    if error is None:
        return "finished"
    if isinstance(error, KeyboardInterrupt) or getattr(error, "exit_code", None) == 130:
        return "killed"                   # interrupted: resumable
    return "failed"


class Trackers:
    """The trackers of a run behind SummaryWriter's API (what fastdmtg.tboard and the trainer call).
    A tracker that raises is dropped with a warning; the others go on."""

    def __init__(self, trackers: list[Tracker]):
        # TensorBoard last: its add_figure closes the figure the others still have to draw
        self.trackers = sorted(trackers, key=lambda t: t.name == "tensorboard")
        self.step = 0                   # the highest step recorded: where the end-of-run metrics go
        self._closed = False

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _each(self, method: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:      # a tracker never stops a run: say so once, then without it
                log.warning(f"{t.name}: {method} failed ({_one_line(e)}); the run goes on without {t.name}")
                self.trackers.remove(t)
                try:
                    t.close("failed")
                except Exception:
                    pass

    def add_scalar(self, tag: str, value, step: int, *args, **kw) -> None:
        self.step = max(self.step, int(step))
        self._each("add_scalar", str(tag), float(value), int(step))

    def add_figure(self, tag: str, figure, step: int | None = None, close: bool = True, **kw) -> None:
        step = self.step if step is None else int(step)
        self._each("add_figure", tag, figure, step)
        if close and "tensorboard" not in self.names:
            import matplotlib.pyplot as plt
            plt.close(figure)

    def add_hparams(self, hparam_dict: dict, metric_dict: dict, *args, **kw) -> None:
        self._each("add_hparams", dict(hparam_dict), {k: float(v) for k, v in metric_dict.items()}, self.step)

    def flush(self) -> None:
        self._each("flush")

    def close(self, error: BaseException | None = None) -> None:
        """End every tracker's run: finished (``error`` None), killed (interrupted) or failed."""
        if self._closed:
            return
        self._closed = True
        status = status_of(error)
        self._each("flush")
        self._each("close", status)

    def __getattr__(self, name: str):
        # SummaryWriter's other add_* methods (e.g. add_text): to the trackers that have them
        if name.startswith("add_"):
            def forward(*args, **kw):
                for t in [t for t in self.trackers if hasattr(t, name)]:
                    try:
                        getattr(t, name)(*args, **kw)
                    except Exception as e:
                        log.warning(f"{t.name}: {name} failed ({_one_line(e)})")
            return forward
        raise AttributeError(name)


class Buffer:
    """Scalars held for a batched write: flushed at ``size`` entries or ``seconds`` after the first."""

    def __init__(self, size: int = 1000, seconds: float = 10.0):
        self.items: list = []
        self.size, self.seconds = size, seconds
        self._t0 = time.monotonic()

    def add(self, item) -> bool:
        """Add; True when the buffer should be flushed now."""
        if not self.items:
            self._t0 = time.monotonic()
        self.items.append(item)
        return len(self.items) >= self.size or time.monotonic() - self._t0 >= self.seconds

    def take(self) -> list:
        items, self.items = self.items, []
        return items
