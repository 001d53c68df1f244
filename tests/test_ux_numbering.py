"""One epoch numbering (from 1) in everything a person reads; grouping.png shows the kept epoch;
checkpoints written before the convention still resume (issue 15, items 3 and 4)."""
import json
import re

import numpy as np
import pytest
import torch

from fastdmtg import checkpoint as ckpt
from fastdmtg.cli import main
from fastdmtg.config import apply_overrides, get_recipe
from fastdmtg.train import TrainingInterrupted, train

FAST = ["train.tensorboard=false", "train.progress=false"]
TINY = ["data.synthetic_train=256", "data.synthetic_val=64", "data.synthetic_test=64", "train.batch_size=64",
        "model.width=2", "data.image_size=16"]


def tiny(extra=()):
    return apply_overrides(get_recipe("synthetic_k3"), FAST + TINY + list(extra))


def test_console_results_history_and_plot_agree(tmp_path, capsys, monkeypatch):
    import fastdmtg.plots as plots
    seen = {}
    real = plots.grouping_heatmap

    def spy(history, names, path, selected_epoch=None, **kw):
        seen["selected"] = selected_epoch
        return real(history, names, path, selected_epoch=selected_epoch, **kw)
    monkeypatch.setattr(plots, "grouping_heatmap", spy)
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--set", "train.epochs=3"] + [a for x in FAST + TINY for a in ("--set", x)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^epoch (\d+)/3:", out, re.M) == ["1", "2", "3"]
    best = int(re.search(r"best epoch (\d+) of 3", out).group(1))
    res = json.loads((run / "results.json").read_text())
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert res["best_epoch"] == best and 1 <= best <= 3
    assert seen["selected"] == best
    # the selected epoch is the one the kept model comes from: its probabilities are results.json's
    rec = next(h for h in hist if h["epoch"] == best)
    assert np.allclose(rec["probabilities"], res["probabilities"])
    # best.pt keeps its internal 0-based index
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == best - 1
    # groups are the used branches in branch order, each line naming its branch (1-based)
    used = sorted(set(res["assignment"]))
    # (each task with its assignment probability at the kept epoch: results.json "grouping_confidence")
    p = res["grouping_confidence"]["per_task"]
    for i, (k, g) in enumerate(zip(used, res["groups"])):
        tasks = ", ".join(f"{t} {p[t]['probability']:.2f}" for t in g)
        assert f"group {i + 1}: {tasks}  (branch {k + 1} of 3)" in out
    assert (run / "train.log").read_text().count("epoch 3/3:") == 1


def test_grouping_plot_shows_the_selected_epoch(tmp_path):
    from fastdmtg.plots import grouping_heatmap
    hist = [{"epoch": e, "probabilities": [[0.1 * e, 1 - 0.1 * e], [0.5, 0.5]], "assignment": [e % 2, 0]}
            for e in (1, 2, 3)]
    fig = grouping_heatmap(hist, ["a", "b"], tmp_path / "g.png", selected_epoch=2, rule="val_loss",
                           keep_figure=True)
    assert (tmp_path / "g.png").stat().st_size > 1000
    heat, traj = fig.axes[0], fig.axes[1]
    assert np.allclose(np.asarray(heat.images[0].get_array()), hist[1]["probabilities"])
    assert "epoch 2" in heat.get_title() and "lowest validation loss" in fig._suptitle.get_text()
    assert [t.get_text() for t in heat.get_xticklabels()] == ["branch 1", "branch 2"]
    labels = [t.get_text() for t in traj.get_legend().get_texts()]
    assert labels == ["branch 1", "branch 2", "selected epoch (2)"]
    assert list(traj.lines[0].get_xdata()) == [2, 2]                       # the mark on the trajectory
    x0, x1 = traj.images[0].get_extent()[:2]
    assert (x0, x1) == (0.5, 3.5)                                          # x axis: epochs 1..3
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_resume_from_a_checkpoint_written_before_1_based_epochs(tmp_path):
    """A run interrupted by an older version (history.json epochs from 0, no epoch_base in last.pt)
    resumes to the same files a new run writes."""
    cfg = tiny(["train.epochs=3"])
    run = tmp_path / "old"
    with pytest.raises(TrainingInterrupted):
        train(cfg, run, stop_after_steps=6)                                # mid epoch 2 (4 steps/epoch)
    hist_path = run / "history.json"
    old = [dict(h, epoch=h["epoch"] - 1) for h in json.loads(hist_path.read_text())]
    assert [h["epoch"] for h in old] == [0]
    hist_path.write_text(json.dumps(old))
    st = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    st.pop("epoch_base")
    ckpt.save_checkpoint(run / "checkpoints" / "last.pt", st)
    res = train(cfg, run, resume=True)
    hist = json.loads(hist_path.read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert 1 <= res["best_epoch"] <= 3


def test_tensorboard_has_per_task_val_probabilities_figure_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = apply_overrides(get_recipe("synthetic_k3"), ["train.progress=false", *TINY, "train.epochs=2"])
    res = train(cfg, tmp_path / "run")
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    ev = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "images": 0})
    ev.Reload()
    tags = ev.Tags()
    names = res["tasks"]
    for t in names:
        got = [e.value for e in ev.Scalars(f"val/loss/{t}")]
        assert got == pytest.approx([h["val"]["loss"][t] for h in hist])
        assert len(ev.Scalars(f"val/error/{t}")) == 2
    p = [e.value for e in ev.Scalars(f"grouping/p/{names[0]}/branch2")]
    assert p == pytest.approx([h["probabilities"][0][1] for h in hist])
    assert [e.value for e in ev.Scalars("train/epoch")] == [1, 2]
    assert "grouping/selected_epoch" in tags["images"]
    hp = EventAccumulator(str(tmp_path / "run" / "tb" / "hparams"))
    hp.Reload()
    assert hp.Scalars("test/total_loss")[0].value == pytest.approx(res["total_loss"])
