"""Figures written next to a run."""
from __future__ import annotations

from pathlib import Path


def grouping_heatmap(history: list[dict], task_names: list[str], path: str | Path) -> None:
    """Heat-map of the final N×K assignment probabilities softmax(S), with the per-epoch argmax
    trajectory as a second panel. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .checkpoint import _atomic_write_bytes
    recs = [h for h in history if "probabilities" in h]
    if not recs:
        return
    probs = np.array(recs[-1]["probabilities"])                               # (N, K)
    n, k = probs.shape
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.6 * k + 0.25 * len(recs), 1.5 + 0.3 * n),
                             gridspec_kw={"width_ratios": [k, max(len(recs), 2)]})
    ax = axes[0]
    im = ax.imshow(probs, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(k), [f"branch {j}" for j in range(k)], rotation=45, ha="right")
    ax.set_yticks(range(n), task_names)
    for i in range(n):
        for j in range(k):
            ax.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center",
                    color="white" if probs[i, j] < 0.5 else "black", fontsize=7)
    ax.set_title(f"softmax(S), epoch {recs[-1]['epoch'] + 1}")
    fig.colorbar(im, ax=ax, fraction=0.05)
    traj = np.array([r["assignment"] for r in recs]).T                         # (N, epochs)
    ax = axes[1]
    ax.imshow(traj, cmap="tab10", vmin=0, vmax=9, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n), [])
    ax.set_xlabel("epoch")
    ax.set_title("argmax branch per epoch")
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())
