"""Dataset formats: parsing, validation, decoding, ``prepare``, the synthetic generator, and the task
set each dataset defines. Runtime loading (batches, devices, DDP shards, caches) is
``fastdmtg.pipelines``'s job; this package never imports it.

    open_dataset(cfg)      the ``Dataset`` a ``DataConfig`` names (parsed and checked, nothing decoded)
    taskset_for(cfg, names) the task set of a saved run's task names (no data needed)
    task_specs(cfg)        the specs of the tasks a config trains (no data needed)

See ``base.py`` for the interface every format implements and ``registry.py`` to add one.
"""
from __future__ import annotations

from .arrays import ArrayDataset, image_label_fields
from .base import SPLITS, DataFormatError, Dataset, DatasetFormat, Field
from .registry import FORMATS, get_format


def open_dataset(cfg, progress: bool = True) -> Dataset:
    """The dataset described by a ``DataConfig`` (``cfg.dataset`` picks the format)."""
    return get_format(cfg.dataset).open(cfg, progress)


def taskset_for(cfg, names: list[str]):
    """The task set a run of ``cfg`` (a ``Config``) trained on, from its task names."""
    return get_format(cfg.data.dataset).taskset(cfg, names)


def task_specs(cfg):
    """The task specs a ``Config`` trains, without opening the data: data.tasks, or the dataset's
    full task list (the synthetic set's planted tasks, Taskonomy-5, CelebA-40). For FLOP counts and
    benchmarks on synthetic data."""
    from ..config import CELEBA_40, TASK_PRESETS
    if cfg.data.dataset == "synthetic":
        from .synthetic import task_names
        names = task_names(cfg.data.synthetic_groups, cfg.data.synthetic_tasks_per_group)
    else:
        names = cfg.data.task_names() or (TASK_PRESETS["taskonomy5"] if cfg.data.dataset == "taskonomy" else CELEBA_40)
    return taskset_for(cfg, names).specs


__all__ = ["open_dataset", "taskset_for", "task_specs", "get_format", "FORMATS", "Dataset", "DatasetFormat", "Field",
           "ArrayDataset", "image_label_fields", "DataFormatError", "SPLITS"]
