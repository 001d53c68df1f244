"""Run-level metrics.

Normalised gain (DMTG paper, eq. 7 and 8), in percent, against a naive-MTL reference run:

    NormGain_L = 100 · (1/N) Σ_n (L_ref[n] − L[n]) / L_ref[n]
    NormGain_E = 100 · (1/N) Σ_n (E_ref[n] − E[n]) / E_ref[n]

Total loss = Σ_n L[n]; total error (classification) = Σ_n 100·(1 − acc_n).
"""
from __future__ import annotations


def normgain(reference: dict[str, float], ours: dict[str, float]) -> dict:
    """{'value': percent, 'per_task': {task: percent}, 'excluded': [...]} over the tasks in ``ours``.

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
        per_task[t] = 100.0 * (r - v) / r
    value = sum(per_task.values()) / len(per_task) if per_task else float("nan")
    return {"value": value, "per_task": per_task, "excluded": excluded}


def summarize(split_result: dict, unified_error: bool) -> dict:
    """Add totals to a meter's compute() output. The total error is only defined when every task's
    error is in the same unit (classification); per-task errors are kept either way."""
    out = dict(split_result)
    out["total_loss"] = sum(split_result["loss"].values())
    if unified_error and split_result.get("error") is not None:
        out["total_error"] = sum(split_result["error"].values())
    return out
