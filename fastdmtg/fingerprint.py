"""Data fingerprints: what a run was trained on, recorded so that a resume or ``eval`` on changed
data stops instead of silently going on with other labels or images.

Each dataset format says what its data is (``Dataset.fingerprint()``: {part: digest}) — the
annotation files by content (your own folder: labels.csv and tasks.json; CelebA: the attribute
and partition files; Taskonomy raw: the split file), the image list by names (relative to the
dataset folder, so a moved folder is the same data) and sizes, and in-memory or prepared arrays by
their checksums. No image is read: on CelebA (202,599 files) it costs a stat of each file and one
read of the two annotation files (benchmarks/results/cpu_2026-12-07_fingerprint.md). Where a decode
cache was checked, its content digest of the source files (their CRC-32s, ``fastdmtg.data.store``)
is added as ``<split> images (content)``: new bytes under the same names and sizes are a change too.

A run records the fingerprint in checkpoints/last.pt and results.json. ``fastdmtg train --resume``
and ``fastdmtg eval`` compare the parts both sides have, once the data is opened (and, on resume, its
decode caches checked: a changed image list is decoded again before the stop is reported); a difference stops with exit 2 naming the
parts, unless ``--accept-data-change`` is given: the run then goes on with the new data and records
each changed part (results.json and history.json ``config_changes``, field ``data: <part>``; eval:
``data_changes`` in eval_<split>.json). ``fastdmtg predict`` reads no dataset — it decodes the
images it is given and names classes from the task declarations stored in the run — so it has
nothing to compare.
"""
from __future__ import annotations

from .config import ConfigError


class DataChanged(ConfigError):
    """The dataset differs from the one the run recorded (exit 2); the message names the parts."""


def data_fingerprint(source) -> dict[str, str]:
    """The fingerprint of a loader's data: its dataset's parts, plus each split's content digest
    where the decode cache has checked the split."""
    fp = dict(source.dataset.fingerprint())
    cache = getattr(source, "cache", None)
    if cache is not None:
        for split, digest in cache.content_digests().items():
            fp[f"{split} images (content)"] = digest
    return fp


def changes(old: dict | None, new: dict) -> list[tuple[str, str, str]]:
    """(part, old, new) of every part both fingerprints have and that differs (a run recorded before
    fingerprints existed has none: nothing to compare)."""
    if not isinstance(old, dict):
        return []
    return [(k, str(old[k]), str(new[k])) for k in new if k in old and old[k] != new[k]]


def describe(diff: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"{k}: {o} → {n}" for k, o, n in diff)


def check(old: dict | None, new: dict, where: str, accept: bool, command: str) -> list[tuple[str, str, str]]:
    """The changed parts (accepted), or ``DataChanged`` when there are some and ``accept`` is False."""
    diff = changes(old, new)
    if diff and not accept:
        raise DataChanged(f"{where}: the data changed since the run recorded it ({describe(diff)}); restore it, "
                          f"or go on with the new data: {command} --accept-data-change (recorded in the results)")
    return diff
