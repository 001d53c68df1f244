"""Figures written next to a run.

grouping.png shows the model that was kept: the probabilities of the *selected* epoch (the one
best.pt, grouped_model.* and results.json come from), and the trajectory of every task's most likely
branch over the epochs with that epoch marked. Epochs are numbered from 1, branches from 1 to K; a
"group" in results.json and on the console is a branch that serves at least one task, numbered in
branch order.
"""
from __future__ import annotations

from pathlib import Path

_RULES = {"val_loss": "lowest validation loss",
          "reference": "validation and training both improved"}


def _settled_text(confidence: dict | None) -> str:
    """The title's line on whether the grouping settled (none without ``confidence``)."""
    if confidence is None:
        return ""
    from .report import SETTLED_MARGIN
    return (f"\ngrouping settled: every margin >= {SETTLED_MARGIN:g}" if confidence["settled"] else
            f"\ngrouping NOT settled: a margin < {SETTLED_MARGIN:g} (more epochs, a τ schedule, or seeds)")


def _probabilities_panel(fig, ax, probs, task_names: list[str], confidence: dict | None, epoch: int) -> None:
    """The left panel: the (N, K) probabilities of the selected epoch, each cell written, each task's
    margin beside its name."""
    n, k = probs.shape
    im = ax.imshow(probs, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(k), [f"branch {j + 1}" for j in range(k)], rotation=45, ha="right")
    per = (confidence or {}).get("per_task", {})
    ax.set_yticks(range(n), [f"{t}  (margin {per[t]['margin']:.2f})" if t in per else t for t in task_names])
    for i in range(n):
        for j in range(k):
            ax.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center",
                    color="white" if probs[i, j] < 0.5 else "black", fontsize=7)
    ax.set_title(f"Probability that a task uses a branch\n(epoch {epoch})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)


def grouping_heatmap(history: list[dict], task_names: list[str], path: str | Path,
                     selected_epoch: int | None = None, rule: str | None = None, keep_figure: bool = False,
                     confidence: dict | None = None):
    """Write grouping.png atomically. ``history``: the history.json records (1-based "epoch");
    ``selected_epoch`` (1-based): the epoch whose probabilities are shown and marked (default:
    the last recorded). ``confidence``: results.json "grouping_confidence" (fastdmtg.report): each
    task's label then carries its margin, and an unsettled grouping is said in the title. Returns the matplotlib figure when ``keep_figure`` (the caller closes it,
    e.g. TensorBoard's add_figure does), else None; None too when no record has probabilities."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    from .checkpoint import _atomic_write_bytes
    recs = [h for h in history if "probabilities" in h]
    if not recs:
        return None
    by_epoch = {r["epoch"]: r for r in recs}
    sel = by_epoch.get(selected_epoch, recs[-1]) if selected_epoch is not None else recs[-1]
    probs = np.array(sel["probabilities"])                                    # (N, K)
    n, k = probs.shape
    epochs = [r["epoch"] for r in recs]
    fig, axes = plt.subplots(1, 2, figsize=(5 + 0.6 * k + 0.25 * len(recs), 2.2 + 0.3 * n),
                             gridspec_kw={"width_ratios": [k + 1, max(len(recs), 3)]})
    _probabilities_panel(fig, axes[0], probs, task_names, confidence, sel["epoch"])
    why = f", chosen by {_RULES.get(rule, rule)}" if rule and selected_epoch is not None and sel["epoch"] == selected_epoch else ""
    fig.suptitle(f"Task grouping of the kept model: epoch {sel['epoch']}{why}{_settled_text(confidence)}", fontsize=10)

    traj = np.array([r["assignment"] for r in recs]).T                         # (N, epochs)
    ax = axes[1]
    cmap = plt.get_cmap("tab10")
    ax.imshow(traj, cmap=cmap, vmin=-0.5, vmax=9.5, aspect="auto", interpolation="nearest",
              extent=(epochs[0] - 0.5, epochs[-1] + 0.5, n - 0.5, -0.5))
    ax.set_yticks(range(n), [])
    ax.set_xlabel("epoch")
    ax.axvline(sel["epoch"], color="red", linewidth=2)
    ax.set_title("Most likely branch of each task\nper epoch", fontsize=9)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Patch(color=cmap(j % 10), label=f"branch {j + 1}") for j in range(k)]
    handles.append(plt.Line2D([], [], color="red", linewidth=2, label=f"selected epoch ({sel['epoch']})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _atomic_write_bytes(path, buf.getvalue())
    if keep_figure:
        return fig
    plt.close(fig)
    return None
