"""Your own tasks from Python: images and per-task targets handed over as tensors
(``fastdmtg.api``), no files. ``data.dataset=tensors``; the task declarations live in the run's
config (``data.folder_tasks``) exactly as for the folder format, so ``load_grouped`` rebuilds the
heads of such a run. The data itself is not in the run folder: ``fastdmtg eval`` cannot reopen it
(evaluate in Python with ``fastdmtg.api.evaluate_tensors``).
"""
from __future__ import annotations

import numpy as np

from ..tasks.generic import GenericTaskSet
from .arrays import ArrayDataset
from .base import DataFormatError, DatasetFormat, Field
from .celeba import resize_like_reference
from .folder import folder_taskset, targets_batch


def tensor_dataset(splits: dict[str, dict[str, np.ndarray]], taskset: GenericTaskSet, image_size: int,
                   limits: dict[str, int] | None = None) -> ArrayDataset:
    """{split: {"image": (M, 3, S, S) uint8, "targets": (M, N) float32 (NaN = missing)}} → a dataset."""
    fields = {"image": Field(np.uint8, (3, image_size, image_size), "image"),
              "targets": Field(np.float32, (taskset.num_tasks,), "value")}
    ds = ArrayDataset("tensors", splits, fields, taskset, image_size, to_batch=targets_batch, limits=limits)
    return ds


def open_tensors(cfg, progress: bool = True):
    raise DataFormatError("data.dataset=tensors: this run's data was handed over from Python and is not stored; "
                          "pass it again through fastdmtg.api (train_tensors / evaluate_tensors)")


def tensors_known_tasks(cfg) -> list[str] | None:
    """data.tasks, else the declarations the config carries."""
    names = cfg.task_names()
    return names if names is not None else (list(cfg.folder_tasks) or None)


FORMAT = DatasetFormat("tensors", open_tensors, folder_taskset,
                       "your own tasks from Python tensors (fastdmtg.api.train_tensors)",
                       known_tasks=tensors_known_tasks, resize=resize_like_reference, order=4)
