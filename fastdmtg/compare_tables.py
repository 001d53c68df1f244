"""The tables of ``fastdmtg compare``: one small function per table and output format.

comparison.md (Results, Per task, one-shot vs two-shot, Groupings), comparison.csv, per_task.csv,
groupings.csv, comparison.tex (booktabs) and the grouping-stability matrices (fastdmtg/seeds.py).
A row's treatment (its display name, the NormGain reference, RG's partitions, a learned grouping,
its place in the one-shot vs two-shot table) comes from its ``RowStyle`` — set by its baseline, or
the style the baseline registered under the row's method declares — never from a method's name.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from . import baselines
from .baselines._core import Row, RowStyle, groups_text
from .partition import format_groups
from .seeds import fmt_flops, fmt_time, write_stability

_PLAIN = RowStyle()


def style(row: Row) -> RowStyle:
    """The row's own style, else that of the baseline registered under its method, else plain."""
    if row.style is not None:
        return row.style
    return baselines.get(row.method).style if row.method in baselines.known() else _PLAIN


def display(row: Row) -> str:
    """The name the human-read tables (Markdown, LaTeX) give a row (naive MTL as `fastdmtg train` calls
    it); comparison.json / .csv keep the method keys of --methods."""
    return style(row).display or row.method


# ----------------------------------------------------------------------------- numbers

def _ms(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def row_metrics(row: Row, naive: dict) -> dict:
    from .metrics import normgain, normgain_error
    if row.error:
        return {}
    tl = [r["total_loss"] for r in row.results]
    te = [r.get("total_error") for r in row.results]
    ngl = [normgain(naive["test"]["loss"], r["test"]["loss"])["value"] for r in row.results]
    # NormGain_E over the tasks that have an evaluation metric (all of them for CelebA and Taskonomy; the
    # classification tasks of a folder dataset with regression tasks too)
    nge = [(normgain_error(naive["test"], r["test"]) or {}).get("value") for r in row.results]
    naive_units = naive["epochs"]
    # RG: one row holds S independent partitions; its cost is that of one of them (mean)
    per = max(len(row.results), 1) if style(row).partitions else 1
    cost = sum(c[1] for c in row.cost_runs) / naive_units / per
    hours = sum(c[2] for c in row.cost_runs) / 3600 / per
    out = {}
    for name, vals in (("total_loss", tl), ("total_error", te), ("normgain_loss", ngl), ("normgain_error", nge)):
        out[name], out[name + "_std"] = _ms(vals)
    out.update(rel_encoder_cost=cost, hours=hours, runs=len(row.cost_runs), n=len(row.results))
    return out


def _task_metrics(results: list[dict], names: list[str]) -> dict:
    """Per task, the mean over ``results`` of its test error (when it has one) and of its MAE / RMSE
    (regression tasks): {"error:<task>": …, "mae:<task>": …, "rmse:<task>": …}."""
    out = {}
    for t in names:
        errs = [r["test"]["error"][t] for r in results if (r["test"].get("error") or {}).get(t) is not None]
        if errs:
            out[f"error:{t}"] = float(np.mean(errs))
        for key in ("mae", "rmse"):
            v = [r["test"]["metrics"][t][key] for r in results
                 if key in ((r["test"].get("metrics") or {}).get(t) or {})]
            if v:
                out[f"{key}:{t}"] = float(np.mean(v))
    return out


def _reference_metrics(row: Row, m: dict) -> dict:
    """The naive-MTL row is the NormGain reference: its NormGain is "—" (empty in the CSV and null in the
    JSON), not a number. (With --seeds the reference is the first naive seed; the other naive seeds
    against it would measure seed noise, not a gain.)"""
    if not style(row).reference or not m:
        return m
    return dict(m, **{k: None for k in ("normgain_loss", "normgain_loss_std", "normgain_error", "normgain_error_std")})


# ----------------------------------------------------------------------------- text

def _fmt(v, std=None, n=1, digits=4, signed=False):
    if v is None:
        return "—"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    if n > 1 and std is not None:
        s += f" ± {std:.{digits}f}"
    return s


def _k(row: Row) -> str:
    return "—" if row.k is None else str(row.k)


def _cite(tables: str, paper: bool) -> str:
    """" (Tables …)" after a heading when the comparison runs one of the paper's recipes, else nothing:
    on your own data the table numbers of the paper would be a false citation."""
    return f" ({tables})" if paper else ""


def _seeds_note(rows: list[Row]) -> str:
    n = max((len(r.results) for r in rows if not r.error and not style(r).partitions), default=1)
    rg = any(style(r).partitions and not r.error for r in rows)
    parts = ([f"each cell the mean of {n} seeds"] if n > 1 else []) + \
        (["RG: the mean over its random partitions"] if rg else [])
    return ("" if not parts else " — " + "; ".join(parts))


def _md_table_head(cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def to_csv(dict_rows: list[dict]) -> str:
    if not dict_rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict_rows[0].keys()))
    w.writeheader()
    w.writerows(dict_rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------- Results (Tables 1/3)

_CSV_METRICS = ("total_loss", "total_loss_std", "total_error", "total_error_std", "normgain_loss",
                "normgain_loss_std", "normgain_error", "normgain_error_std", "rel_encoder_cost", "hours", "runs", "n")


class _Columns:
    """The Results table's optional columns: a column no row has a value in is left out (e.g. the total
    error when a task is a regression)."""

    def __init__(self, rows: list[Row], ms: list[dict]):
        self.flops = any(r.flops is not None for r in rows)
        self.te = any(m.get("total_error") is not None for m in ms)
        self.nge = any(m.get("normgain_error") is not None for m in ms)

    def head(self) -> list[str]:
        return ["Method", "K", "Total loss ↓"] + (["Total error ↓"] if self.te else []) + ["NormGain_L (%) ↑"] + \
            (["NormGain_E (%) ↑"] if self.nge else []) + \
            ["Rel. encoder cost", "Train time", "Runs"] + (["FLOPs/image"] if self.flops else []) + ["Groups (served)"]

    def cells(self, row: Row, m: dict, names: list[str]) -> list[str]:
        cells = [display(row), _k(row), _fmt(m["total_loss"], m["total_loss_std"], m["n"])] + \
            ([_fmt(m["total_error"], m["total_error_std"], m["n"], 2)] if self.te else []) + \
            [_fmt(m["normgain_loss"], m["normgain_loss_std"], m["n"], 2, True)] + \
            ([_fmt(m["normgain_error"], m["normgain_error_std"], m["n"], 2, True)] if self.nge else []) + \
            [f"{m['rel_encoder_cost']:.2f}", fmt_time(m["hours"]), str(m["runs"])]
        if self.flops:
            cells.append(fmt_flops(row.flops))
        return cells + [_groups_cell(row, names)]


def _groups_cell(row: Row, names: list[str]) -> str:
    distinct = len({format_groups(g) for g in row.groups})
    if distinct == 1:
        return groups_text(row.groups[0], names)
    if style(row).partitions:
        return f"{len(row.groups)} random partitions"
    return f"{distinct} groupings over {len(row.groups)} seeds"


def _json_row(row: Row, m: dict, names: list[str]) -> dict:
    return {"method": row.method, "K": row.k, **m, "gflops_per_image": row.flops,
            "groups": [[[names[t] for t in g] for g in part] for part in row.groups],
            "networks": [[[names[t] for t in g] for g in nets] for nets in row.networks],
            "runs_used": [c[0] for c in row.cost_runs], "notes": row.notes}


def _csv_row(row: Row, m: dict, names: list[str]) -> dict:
    return {"method": row.method, "K": "" if row.k is None else row.k,
            **{key: ("" if m[key] is None else m[key]) for key in _CSV_METRICS},
            "gflops_per_image": "" if row.flops is None else row.flops,
            "groups": groups_text(row.groups[0], names) if len(row.groups) == 1 else ""}


def results_table(rows: list[Row], ms: list[dict], names: list[str], paper: bool) -> tuple[list[str], list, list]:
    """→ (Markdown lines, comparison.csv rows, comparison.json rows)."""
    cols = _Columns(rows, ms)
    head = cols.head()
    md = [f"## Results{_cite('Tables 1 and 3', paper)}", ""] + _md_table_head(head)
    csv_rows, json_rows = [], []
    for row, m in zip(rows, ms):
        if row.error:
            md.append(f"| {display(row)} | {_k(row)} | failed: {row.error} |" + " |" * (len(head) - 3))
            json_rows.append({"method": row.method, "K": row.k, "error": row.error})
            continue
        md.append("| " + " | ".join(cols.cells(row, m, names)) + " |")
        json_rows.append(_json_row(row, m, names))
        csv_rows.append(_csv_row(row, m, names))
    return md + _results_notes(rows, cols.flops), csv_rows, json_rows


def _results_notes(rows: list[Row], has_flops: bool) -> list[str]:
    notes = [(row.method, row.k, n) for row in rows for n in row.notes]
    md = ["", "Notes:"] + [f"- {m}{'' if k is None else f' K={k}'}: {n}" for m, k, n in notes] if notes else []
    return md + [
        "", "Total loss/error: sums over tasks on the test split (total error = Σ 100·(1 − acc)). NormGain vs "
        "the naive-MTL run (its own row: — , the reference). Rel. encoder cost: Σ branches × epochs of every run the method needed / naive MTL's "
        "(TAG's affinity run counts 1 + N/affinity_every); RG: per random partition. Train time: Σ train_time_s of "
        "those runs (one seed). ± : std over the seeds (--seeds) or RG's partitions." + (" FLOPs/image: forward per image of the evaluated training network (all K·N heads, batch 1), "
                                                                                         "1 FLOP per multiply-add (fastdmtg.bench.count_flops; the paper's thop convention)."
                                                                                         if has_flops else "")]


# ----------------------------------------------------------------------------- Per task (Table 2)

def _evaluated(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not r.error and r.results]


def per_task_loss_table(rows: list[Row], names: list[str], naive: dict, paper: bool) -> tuple[list[str], list]:
    """Test loss (NormGain_L %) per task → (Markdown lines, per_task.csv rows)."""
    from .metrics import normgain
    md = ["", f"## Per task: test loss (NormGain_L %){_cite('Table 2', paper)}{_seeds_note(rows)}", ""] + \
        _md_table_head(["Method", "K"] + names)
    pt_rows = []
    for row in _evaluated(rows):
        per = [np.mean([r["test"]["loss"][t] for r in row.results]) for t in names]
        gain = [np.mean([normgain(naive["test"]["loss"], r["test"]["loss"])["per_task"].get(t, float("nan"))
                         for r in row.results]) for t in names]
        ref = style(row).reference
        md.append(f"| {display(row)} | {_k(row)} | " + " | ".join(
            f"{v:.4f}" + ("" if ref else f" ({g:+.1f})") for v, g in zip(per, gain)) + " |")
        pt_rows.append({"method": row.method, "K": row.k, **{f"loss:{t}": v for t, v in zip(names, per)},
                        **{f"gain:{t}": g for t, g in zip(names, gain)}, **_task_metrics(row.results, names)})
    return md, pt_rows


def _metric_cell(m: dict, t: str) -> str:
    if f"error:{t}" in m:
        return f"{m[f'error:{t}']:.2f}"
    if f"mae:{t}" in m:
        return f"{m[f'mae:{t}']:.4g} / {m[f'rmse:{t}']:.4g}"
    return "—"


def per_task_metric_table(rows: list[Row], names: list[str]) -> list[str]:
    """The error where a task has one, MAE / RMSE for regression tasks (your own tasks)."""
    md = ["", f"## Per task: test error (%) or MAE / RMSE{_seeds_note(rows)}", ""] + \
        _md_table_head(["Method", "K"] + names)
    for row in _evaluated(rows):
        m = _task_metrics(row.results, names)
        md.append(f"| {display(row)} | {_k(row)} | " + " | ".join(_metric_cell(m, t) for t in names) + " |")
    return md


# ----------------------------------------------------------------------------- one-shot vs two-shot (Table 4)

def two_shot_table(rows: list[Row], naive: dict, paper: bool) -> list[str]:
    """Shown when a row retrains a one-shot method's groups (its RowStyle.two_shot)."""
    ts = [r for r in rows if not r.error and style(r).two_shot is not None]
    if not any(style(r).two_shot[2] for r in ts):
        return []
    md = ["", f"## One-shot vs two-shot with DMTG's groups{_cite('Table 4', paper)}", "",
          "| K | Method | Total loss ↓ | NormGain_L (%) ↑ | Total error ↓ | NormGain_E (%) ↑ |",
          "|---|---|---|---|---|---|"]
    for row in sorted(ts, key=lambda r: (r.k, style(r).two_shot[0])):
        m = row_metrics(row, naive)
        md.append(f"| {row.k} | {style(row).two_shot[1]} | {_fmt(m['total_loss'])} | "
                  f"{_fmt(m['normgain_loss'], signed=True, digits=2)} "
                  f"| {_fmt(m['total_error'], digits=2)} | {_fmt(m['normgain_error'], signed=True, digits=2)} |")
    return md


# ----------------------------------------------------------------------------- Groupings (Tables A4/A5)

def _grouping_cells(row: Row, i: int, part: list[list[int]], n: int) -> list[str]:
    """Entry = the group serving the task (1-based); "+g" = also trained in group g."""
    served = {t: gi + 1 for gi, g in enumerate(part) for t in g}
    aux = {t: [] for t in range(n)}
    if i < len(row.networks):
        # a selection's networks are in the order of its served groups (each serves >= 1 task)
        for ni, net in enumerate(row.networks[i]):
            for t in net:
                if served[t] != ni + 1:
                    aux[t].append(ni + 1)
    return [f"{served[t]}" + (f" (+{','.join(map(str, aux[t]))})" if aux[t] else "") for t in range(n)]


def groupings_table(rows: list[Row], names: list[str], paper: bool) -> tuple[list[str], list]:
    """→ (Markdown lines, groupings.csv rows)."""
    md = ["", f"## Groupings{_cite('Tables A4/A5', paper)}: group serving each task; (+g) also trained in group g",
          ""] + _md_table_head(["Method", "K"] + names)
    g_rows = []
    for row in (r for r in rows if not r.error):
        for i, part in enumerate(row.groups):
            label = display(row) + (f" (seed {i})" if len(row.groups) > 1 else "")     # RG: partition i
            cells = _grouping_cells(row, i, part, len(names))
            md.append(f"| {label} | {_k(row)} | " + " | ".join(cells) + " |")
            g_rows.append({"method": label, "K": row.k, **{t: c for t, c in zip(names, cells)}})
    return md, g_rows


# ----------------------------------------------------------------------------- all of them

def build_tables(rows: list[Row], names: list[str], naive: dict, paper: bool = False) -> dict:
    """→ {"markdown": str, "csv": str, "groupings_csv": str, "per_task_csv": str, "rows": [...]}.
    ``paper``: the recipe is one of the paper's (its table numbers are cited in the headings)."""
    ms = [_reference_metrics(r, row_metrics(r, naive)) for r in rows]
    md, csv_rows, json_rows = results_table(rows, ms, names, paper)
    pt_md, pt_rows = per_task_loss_table(rows, names, naive, paper)
    g_md, g_rows = groupings_table(rows, names, paper)
    md += pt_md + per_task_metric_table(rows, names) + two_shot_table(rows, naive, paper) + g_md
    return {"markdown": "\n".join(md) + "\n", "csv": to_csv(csv_rows), "groupings_csv": to_csv(g_rows),
            "per_task_csv": to_csv(pt_rows), "rows": json_rows}


# ----------------------------------------------------------------------------- LaTeX

def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&") \
        .replace("#", r"\#").replace("{", r"\{").replace("}", r"\}")


def _pm(v, sd, n, digits, signed=False) -> str:
    if v is None:
        return "--"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    if n > 1 and sd is not None:
        s += rf" $\pm$ {sd:.{digits}f}"
    return "$" + s.replace(r" $\pm$ ", r" \pm ") + "$"


def _latex_cells(row: Row, m: dict, has_err: bool) -> list[str]:
    n, base = m["n"], style(row).reference
    cells = [_tex(display(row)), _k(row).replace("—", "--"), _pm(m["total_loss"], m["total_loss_std"], n, 4)]
    if has_err:
        cells.append(_pm(m["total_error"], m["total_error_std"], n, 2))
    cells.append("--" if base else _pm(m["normgain_loss"], m["normgain_loss_std"], n, 2, True))
    if has_err:
        cells.append("--" if base else _pm(m["normgain_error"], m["normgain_error_std"], n, 2, True))
    return cells + [f"{m['rel_encoder_cost']:.2f}", fmt_time(m["hours"]), str(n)]


def latex_table(rows: list[Row], naive: dict, title: str) -> str:
    """The results table (Tables 1/3 shape) as a booktabs LaTeX table."""
    has_err = any(not r.error and any(x.get("total_error") is not None for x in r.results) for r in rows)
    cols = ["Method", "$K$", r"Total loss $\downarrow$"] + ([r"Total error $\downarrow$"] if has_err else []) + \
           [r"$\Delta_L$ (\%) $\uparrow$"] + ([r"$\Delta_E$ (\%) $\uparrow$"] if has_err else []) + \
           ["Rel.\\ cost", "Train time", "Seeds"]
    out = [r"% requires \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
           rf"\caption{{{_tex(title)}. Mean $\pm$ std over seeds; $\Delta$: NormGain against naive MTL.}}",
           r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule", " & ".join(cols) + r" \\", r"\midrule"]
    for row in rows:
        if row.error:
            out.append(f"{_tex(display(row))} & {_k(row).replace('—', '--')} & "
                       f"\\multicolumn{{{len(cols) - 2}}}{{l}}{{failed}} \\\\")
            continue
        out.append(" & ".join(_latex_cells(row, row_metrics(row, naive), has_err)) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- files

def write_extra_tables(out: Path, rows: list[Row], names: list[str], naive: dict, title: str) -> list[Path]:
    """comparison.tex, and the grouping-stability matrices of the rows trained with several seeds
    whose grouping is learned (DMTG) → the paths written."""
    from .checkpoint import atomic_write_text
    written = [out / "comparison.tex"]
    atomic_write_text(written[0], latex_table(rows, naive, title))
    for row in rows:
        if row.error or not style(row).learned_grouping or len(row.groups) < 2:
            continue
        stem = f"grouping_stability_{row.method.replace(' ', '_')}_k{row.k}"
        written += write_stability(out, row.groups, names, stem,
                                   f"{row.method} K={row.k}: same group over {len(row.groups)} seeds")
    return written


def write_tables(out: Path, tables: dict, rows: list[Row], names: list[str], naive: dict, title: str) -> list[Path]:
    """comparison.md, comparison.csv, groupings.csv, per_task.csv, then write_extra_tables → the extra
    paths written."""
    from .checkpoint import atomic_write_text
    atomic_write_text(out / "comparison.md", f"# {title}\n\n" + tables["markdown"])
    atomic_write_text(out / "comparison.csv", tables["csv"])
    atomic_write_text(out / "groupings.csv", tables["groupings_csv"])
    atomic_write_text(out / "per_task.csv", tables["per_task_csv"])
    return write_extra_tables(out, rows, names, naive, title)
