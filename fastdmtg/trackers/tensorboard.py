"""TensorBoard: event files in RUN/tb (the hparams record in RUN/tb/hparams). Browse with
``tensorboard --logdir RUN/tb`` (or a folder of runs)."""
from __future__ import annotations

from pathlib import Path

from . import Tracker


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    order = 0
    modules = ("tensorboard",)
    extra = ""                     # a dependency of fastdmtg

    def __init__(self, run_dir: Path, cfg, state: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def add_figure(self, tag: str, figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step)            # closes the figure

    def add_hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        self.writer.add_hparams(hparams, metrics, run_name="hparams")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()

    def __getattr__(self, name: str):
        if name.startswith("add_") and "writer" in self.__dict__:   # SummaryWriter's other records
            return getattr(self.writer, name)
        raise AttributeError(name)


TRACKER = TensorBoardTracker
