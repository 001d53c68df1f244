"""Run-level metrics.

Normalised gain (DMTG paper, eq. 7 and 8), in percent, against a naive-MTL reference run:

    NormGain_L = 100 · (1/N) Σ_n (L_ref[n] − L[n]) / L_ref[n]
    NormGain_E = 100 · (1/N) Σ_n g_n,  g_n = the relative change of task n's evaluation metric m_n:
                 (m_ref − m) / m_ref when lower is better, (m − m_ref) / m_ref when higher is better

NormGain_E as the paper computes it: for CelebA the metric is the classification error E = 100·(1 − acc),
lower is better, so g = (E_ref − E)/E_ref — eq. 8 and Table 3 as printed. For Taskonomy (Table A2) each
task keeps its own metric: depth RMSE (lower is better), normals % < 30°, segmentation mIoU, keypoint
and edge F1 (higher is better) — Table A2's K=3 row (normal 0.24, mIoU 1.50, keypoint F1 13.50, edge
F1 14.86) is reproduced from its own metric columns by exactly this formula (docs/taskonomy.md §5;
(e_ref − e)/e_ref on e = 100 − metric would give 1.28, 1.39, 42.89, 48.55 instead).

A split's results say which metric NormGain_E uses per task: ``"gain_metric": {task: {"metric": NAME,
"higher_is_better": bool}}`` names an entry of ``"metrics"[task]`` (Taskonomy); without it, the per-task
``"error"`` (lower is better) is the metric (CelebA and your own classification tasks).

Total loss = Σ_n L[n]; total error (classification) = Σ_n 100·(1 − acc_n).
"""
from __future__ import annotations

from collections.abc import Collection


def normgain(reference: dict[str, float], ours: dict[str, float], higher_is_better: Collection[str] = ()) -> dict:
    """{'value': percent, 'per_task': {task: percent}, 'excluded': [...]} over the tasks in ``ours``:
    100·(r − v)/r per task, or 100·(v − r)/r for the tasks in ``higher_is_better``.

    A task whose reference value is 0 has no defined relative gain: it is excluded and listed."""
    missing = [t for t in ours if t not in reference]
    if missing:
        raise ValueError(f"reference run has no result for task(s) {missing}; "
                         f"it has {sorted(reference)}")
    per_task, excluded = {}, []
    for t, v in ours.items():
        r = reference[t]
        if r == 0:
            excluded.append(t)
            continue
        per_task[t] = 100.0 * ((v - r) if t in higher_is_better else (r - v)) / r
    value = sum(per_task.values()) / len(per_task) if per_task else float("nan")
    return {"value": value, "per_task": per_task, "excluded": excluded}


def normgain_error(reference: dict, ours: dict) -> dict | None:
    """NormGain_E (module doc) between two evaluated splits (a results.json's ``test``, a meter's output):
    normgain's dict, or None when ``ours`` has no per-task evaluation metric (regression tasks only)."""
    spec = ours.get("gain_metric")
    if not spec:
        if not ours.get("error") or not reference.get("error"):
            return None
        return normgain(reference["error"], ours["error"])
    ref_m, our_m, higher = {}, {}, []
    for task, g in spec.items():
        name = g["metric"]
        try:
            ref_m[task] = float(reference["metrics"][task][name])
        except (KeyError, TypeError):
            raise ValueError(f"reference run has no test metric {name!r} for task {task!r}; NormGain_E compares "
                             f"each task's metric (it has {sorted((reference.get('metrics') or {}).get(task) or {})})"
                             ) from None
        our_m[task] = float(ours["metrics"][task][name])
        if g["higher_is_better"]:
            higher.append(task)
    return normgain(ref_m, our_m, higher)


def summarize(split_result: dict, unified_error: bool) -> dict:
    """Add totals to a meter's compute() output. The total error is only defined when every task's
    error is in the same unit (classification); per-task errors are kept either way."""
    out = dict(split_result)
    out["total_loss"] = sum(split_result["loss"].values())
    if unified_error and split_result.get("error") is not None:
        out["total_error"] = sum(split_result["error"].values())
    return out
