"""Seeds in a comparison: repeated training, grouping stability, number formats.

``fastdmtg compare --seeds N`` trains every method's evaluated networks N times — training seeds
train.seed, train.seed + 1, …; folder KEY for the first (the folder a single-seed comparison uses,
so an earlier comparison is reused) and KEY-seedS for the others — and every numeric column of the
tables becomes mean ± std (sample std, n − 1) over the seeds. Selection runs (TAG's affinity run,
HOA's pair networks, BMTN's STL networks) run once; NormGain is taken against the first naive-MTL
seed. RG keeps its own meaning: ``--rg-partitions`` random partitions.

Grouping stability: for a method whose grouping comes out of training (DMTG), S[i, j] = the fraction
of seeds in which tasks i and j end in the same group (1 on the diagonal). Written per method and K
as grouping_stability_<method>_k<K>.csv and .png when there are at least 2 seeds;
``stability_main`` does the same for any set of finished run folders (e.g. ``fastdmtg train
--set train.seed=S`` runs): ``fastdmtg compare --stability RUN_DIR RUN_DIR ... --out DIR``.

Number formats (Markdown and LaTeX): losses 4 decimals, errors and NormGain 2, the training time
in s / min / h, FLOPs in k/M/GFLOP.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .baselines._core import partition_of
from .config import evolve


def repeat_runs(cmp, r: dict, label: str) -> list[dict]:
    """``r`` followed by its repeats with the next ``cmp.train_seeds − 1`` training seeds."""
    out = [r]
    cfg = cmp._cfgs[r["_key"]]
    for s in range(1, cmp.train_seeds):
        c = evolve(cfg, train={"seed": cfg.train.seed + s})
        out.append(cmp.run(f"{r['_key']}-seed{s}", c, f"{label} seed {cfg.train.seed + s}"))
    return out


def stability(partitions: list[list[list[int]]], n: int) -> np.ndarray:
    """(n, n): the fraction of the partitions in which tasks i and j share a group."""
    s = np.zeros((n, n))
    for part in partitions:
        for g in part:
            for i in g:
                for j in g:
                    s[i, j] += 1
    return s / max(len(partitions), 1)


def fmt_time(hours: float | None) -> str:
    if hours is None:
        return "—"
    sec = hours * 3600
    if sec < 60:
        return f"{sec:.0f} s"
    if sec < 3600:
        return f"{sec / 60:.1f} min"
    return f"{hours:.2f} h"


def fmt_flops(gflops: float | None) -> str:
    if gflops is None:
        return "—"
    f = gflops * 1e9
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


def stability_csv(s: np.ndarray, names: list[str]) -> str:
    lines = ["task," + ",".join(names)]
    for i, t in enumerate(names):
        lines.append(t + "," + ",".join(f"{v:.3f}" for v in s[i]))
    return "\n".join(lines) + "\n"


def stability_png(s: np.ndarray, names: list[str], title: str, path: Path) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import _atomic_write_bytes
    n = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
    im = ax.imshow(s, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{s[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if s[i, j] < 0.5 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="fraction of seeds in the same group")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())


def write_stability(out: Path, partitions: list[list[list[int]]], names: list[str], stem: str, title: str) -> list[Path]:
    from .checkpoint import atomic_write_text
    s = stability(partitions, len(names))
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    atomic_write_text(csv_path, stability_csv(s, names))
    stability_png(s, names, title, png_path)
    return [csv_path, png_path]


def stability_main(run_dirs: list[str], out: str) -> int:
    """Grouping stability of finished runs (their results.json "assignment"), e.g. DMTG trained with
    several --set train.seed=S."""
    from .checkpoint import read_json
    parts, names = [], None
    for d in run_dirs:
        p = Path(d) / "results.json"
        if not p.exists():
            raise FileNotFoundError(f"{p}: not a finished run (no results.json)")
        res = read_json(p)
        if names is not None and res.get("tasks") != names:
            raise ValueError(f"{p}: its tasks {res.get('tasks')} differ from {run_dirs[0]}'s {names}")
        names = res["tasks"]
        parts.append(partition_of(res["assignment"]))
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    written = write_stability(o, parts, names, "grouping_stability", f"same group over {len(parts)} runs")
    print(f"grouping stability over {len(parts)} runs: {', '.join(str(p) for p in written)}")
    return 0
