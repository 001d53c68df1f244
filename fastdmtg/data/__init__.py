"""Dataset formats: parsing, validation, decoding, ``prepare``, the synthetic generator, and the task
set each dataset defines. Runtime loading (batches, devices, DDP shards, caches) is
``fastdmtg.pipelines``'s job; this package never imports it.

    open_dataset(cfg)      the ``Dataset`` a ``DataConfig`` names (parsed and checked, nothing decoded)
    taskset_for(cfg, names) the task set of a saved run's task names (no data needed)
    task_specs(cfg)        the specs of the tasks a config trains (no data needed)
    detect_format(root)    the format whose folder ``root`` is (``--data-root`` without a recipe)

See ``base.py`` for the interface every format implements and ``registry.py`` to add one (its file).
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


def known_task_names(data) -> list[str] | None:
    """The task names a ``DataConfig`` trains, as far as it tells them without opening the data (its
    format's ``known_tasks``; data.tasks for a format that declares none); None when only the data can
    tell (a folder that is not there, or whose header does not parse: opening it reports that, naming
    the line)."""
    fmt = get_format(data.dataset)
    return fmt.known_tasks(data) if fmt.known_tasks is not None else data.task_names()


def detect_format(root) -> DatasetFormat:
    """The registered format that recognises the folder ``root`` (the first whose ``detect`` says
    yes, in registry order). None recognises it → a DataFormatError saying what each format looked
    for and what the folder holds (missing, a file, empty, or its first entries)."""
    from pathlib import Path
    root = Path(root)
    fmts = [f for f in FORMATS.declarations() if f.detect is not None]
    if root.is_dir():
        for f in fmts:
            if f.detect(root):
                return f
    wanted = "; ".join(f.looks_for for f in fmts)
    raise DataFormatError(f"--data-root {root}: no dataset found: looked for {wanted} — found {_found(root)}")


def _found(root, show: int = 6) -> str:
    """What a folder holds, in a few words, for the message of a folder no format recognises."""
    if not root.exists():
        return "no such folder"
    if not root.is_dir():
        return "a file, not a folder"
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in root.iterdir())
    if not entries:
        return "an empty folder"
    more = f", … ({len(entries)} entries)" if len(entries) > show else ""
    return ", ".join(entries[:show]) + more


def task_specs(cfg):
    """The task specs a ``Config`` trains, without opening the data (``known_task_names``). For FLOP
    counts and benchmarks on synthetic data."""
    names = known_task_names(cfg.data)
    if names is None:
        raise ValueError(f"data.dataset={cfg.data.dataset}: its tasks are known only once the data is opened "
                         "(data.root)")
    return taskset_for(cfg, names).specs


__all__ = ["open_dataset", "taskset_for", "detect_format", "task_specs", "known_task_names", "get_format", "FORMATS", "Dataset", "DatasetFormat", "Field",
           "ArrayDataset", "image_label_fields", "DataFormatError", "SPLITS"]
