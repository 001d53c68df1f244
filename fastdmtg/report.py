"""What a person reads about a run: per-task headline metrics, the final summary, the per-epoch
validation line, and how settled the grouping is.

Headline metric of a task = the first of ``HEADLINES`` its metrics hold (the task set's meter
computes them; results.json ``test.metrics``): accuracy, MAE / RMSE in the data's units, mIoU, the
normals' accuracy within 30°, depth RMSE, F1; a task with none of them shows its error, else its
loss. A new metric plugs in as one row of ``HEADLINES``.

Grouping confidence (DMTG and every method that reports assignment probabilities): per task, at
the kept epoch, p = softmax(S)[task, its branch] (the noiseless probabilities of history.json /
results.json ``probabilities``), margin = p − the second largest probability, and the normalised
entropy H/log K (0 = certain, 1 = uniform). The grouping is *settled* when every task's margin is at
least ``SETTLED_MARGIN`` (0.5); otherwise the run warns and says what to do.
"""
from __future__ import annotations

import math

#: significant digits of the floats in the JSON files people read (results.json, history.json,
#: eval_<split>.json, comparison.json): enough for every comparison, without float noise such as
#: 2.100000000000002. Rounding is idempotent, so a resumed run writes the same bytes.
JSON_DIGITS = 12


def round_floats(obj, digits: int = JSON_DIGITS):
    """``obj`` (nested dicts / lists) with every finite float rounded to ``digits`` significant digits."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj

#: (metric keys, format) in order of preference; the first row whose keys a task's metrics all hold
#: is its headline
HEADLINES = [
    (("accuracy",), lambda m: f"acc {100 * m['accuracy']:.1f}%"),
    (("mae", "rmse"), lambda m: f"MAE {m['mae']:.4g} RMSE {m['rmse']:.4g}"),
    (("miou",), lambda m: f"mIoU {m['miou']:.1f}"),
    (("acc30",), lambda m: f"acc@30° {m['acc30']:.1f}%"),
    (("rmse",), lambda m: f"RMSE {m['rmse']:.4g}"),
    (("f1",), lambda m: f"F1 {m['f1']:.1f}"),
]
#: a grouping is settled when every task's margin (top − second probability) is at least this
SETTLED_MARGIN = 0.5
#: the epoch line lists every task up to this many tasks; above, one summary per metric
EPOCH_TASKS_MAX = 10
WIDTH = 100


def _finite(*vs) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in vs)


def headline(task: str, split: dict) -> str:
    """One task's headline metric on an evaluated split ({"loss", "error", "metrics"})."""
    m = (split.get("metrics") or {}).get(task) or {}
    for keys, fmt in HEADLINES:
        if all(k in m for k in keys):
            return fmt(m) if _finite(*(m[k] for k in keys)) else "/".join(keys) + " n/a"
    err = (split.get("error") or {}).get(task)
    if err is not None:
        return f"error {err:.2f}"
    return f"loss {split['loss'][task]:.4f}"


def _wrap(prefix: str, items: list[str]) -> list[str]:
    """``items`` joined by ", " after ``prefix``, in lines of at most WIDTH characters; an item is never
    split, continuation lines are indented by 4."""
    lines, cur = [], prefix
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if cur.strip() and len(cur) + 1 + len(piece) > WIDTH and cur != prefix:
            lines.append(cur.rstrip())
            cur = "    "
        cur += ("" if cur in (prefix, "    ") else " ") + piece
    lines.append(cur.rstrip())
    return lines


def per_task_lines(prefix: str, split: dict, names: list[str]) -> list[str]:
    """Every task's headline, wrapped at ``WIDTH`` characters."""
    return _wrap(prefix, [f"{t} {headline(t, split)}" for t in names])


def summary_line(prefix: str, split: dict, names: list[str]) -> str:
    """Many tasks: per headline kind, the mean over its tasks and the worst task (one line)."""
    kinds: dict[tuple, list] = {}
    for t in names:
        m = (split.get("metrics") or {}).get(t) or {}
        keys = next((k for k, _ in HEADLINES if all(x in m for x in k)), None)
        if keys is not None and _finite(*(m[k] for k in keys)):
            kinds.setdefault(keys, []).append((t, m[keys[0]]))
    parts = []
    for keys, vals in kinds.items():
        lower_better = keys[0] in ("mae", "rmse")
        worst = max(vals, key=lambda x: x[1]) if lower_better else min(vals, key=lambda x: x[1])
        mean = sum(v for _, v in vals) / len(vals)
        scale, unit = (100, "%") if keys[0] == "accuracy" else (1, "%" if keys[0] == "acc30" else "")
        parts.append(f"{keys[0]} mean {scale * mean:.4g}{unit} over {len(vals)} tasks "
                     f"(worst {worst[0]} {scale * worst[1]:.4g}{unit})")
    return prefix + ("; ".join(parts) if parts else f"{len(names)} tasks")


def epoch_task_lines(val: dict, names: list[str]) -> list[str]:
    """The validation part of an epoch line: every task's headline (≤ EPOCH_TASKS_MAX tasks), else a
    one-line summary."""
    if len(names) <= EPOCH_TASKS_MAX:
        return per_task_lines("  val: ", val, names)
    return [summary_line("  val: ", val, names)]


# ------------------------------------------------------------------------------------------ confidence
def grouping_confidence(probabilities, assignment: list[int], names: list[str]) -> dict | None:
    """The confidence record of results.json (module doc), or None when there is nothing to be unsure
    about (no probabilities, or K = 1)."""
    if probabilities is None or not probabilities or len(probabilities[0]) < 2:
        return None
    k = len(probabilities[0])
    per = {}
    for t, row, a in zip(names, probabilities, assignment):
        h = -sum(p * math.log(p) for p in row if p > 0) / math.log(k)
        per[t] = {"branch": a + 1, "probability": row[a],
                  "margin": row[a] - max(p for j, p in enumerate(row) if j != a), "entropy": h}
    low = min(per, key=lambda t: per[t]["margin"])
    settled = per[low]["margin"] >= SETTLED_MARGIN
    return {"per_task": per, "min_margin": per[low]["margin"], "least_settled_task": low,
            "min_probability": min(v["probability"] for v in per.values()), "settled": settled,
            "rule": f"settled when every task's margin (its branch's probability minus the next largest) "
                    f">= {SETTLED_MARGIN}; probabilities = softmax of the grouping logits at the kept epoch"}


def unsettled_tasks(conf: dict) -> list[str]:
    return [t for t, v in conf["per_task"].items() if v["margin"] < SETTLED_MARGIN]


def confidence_line(conf: dict) -> str:
    low = conf["least_settled_task"]
    v = conf["per_task"][low]
    state = "settled" if conf["settled"] else "NOT settled"
    return (f"grouping confidence: {state} — lowest margin {v['margin']:.2f} ({low}: p {v['probability']:.2f}, "
            f"entropy {v['entropy']:.2f}); rule: every margin >= {SETTLED_MARGIN}")


def unsettled_warning(conf: dict) -> str:
    bad = unsettled_tasks(conf)
    return (f"the grouping is not settled: {len(bad)} task(s) with margin < {SETTLED_MARGIN} "
            f"({', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}); another seed or more epochs may group them "
            "differently — train longer (--set train.epochs=…), anneal τ (--set dmtg.tau_schedule=anneal), "
            "or train several seeds and check `fastdmtg compare --stability RUN_DIR RUN_DIR …`")


# ------------------------------------------------------------------------------------------ summary
def format_results(res: dict) -> str:
    """The final summary of a run (what `fastdmtg train` prints): the groups with each task's
    assignment probability, the totals, every task's headline metric, NormGain, the time."""
    lines = [f"method {res['method']}, K={res['num_branches']}, best epoch {res['best_epoch']} of {res['epochs']}"]
    used = sorted(set(res["assignment"]))      # groups = the branches in use, in branch order (1..K)
    conf = res.get("grouping_confidence")
    for i, g in enumerate(res["groups"]):
        tasks = ", ".join(f"{t} {conf['per_task'][t]['probability']:.2f}" if conf else t for t in g)
        lines.append(f"  group {i + 1}: {tasks}  (branch {used[i] + 1} of {res['num_branches']})")
    if conf:
        lines.append(confidence_line(conf))
    t = res["test"]
    lines.append(f"test total loss {t['total_loss']:.4f}" +
                 (f", total error {t['total_error']:.2f}" if t.get("total_error") is not None else ""))
    lines += per_task_lines("test per task: ", t, res["tasks"]) if len(res["tasks"]) <= EPOCH_TASKS_MAX * 4 \
        else [summary_line("test per task: ", t, res["tasks"])]
    for key in ("normgain_loss", "normgain_error"):
        if key in res and res[key].get("value") is not None:
            lines.append(f"{key}: {res[key]['value']:+.2f}%")
    lines.append(f"train time {res['train_time_s']:.1f} s on {res['env']['device']}")
    return "\n".join(lines)


def format_eval(res: dict, names: list[str]) -> str:
    """`fastdmtg eval`: the totals and every task's headline metric."""
    lines = [f"{res['split']} total loss {res['total_loss']:.4f}" +
             (f", total error {res['total_error']:.2f}" if res.get("total_error") is not None else "")]
    lines += per_task_lines(f"{res['split']} per task: ", res, names)
    return "\n".join(lines)
