"""``fastdmtg bench step`` / ``fastdmtg profile`` on CPU for a CelebA-shaped and a Taskonomy recipe,
shrunk with ``--set``: the report is written with real timings, the step consumes batches in the
trainer's layout (the Taskonomy one compared with the real gpu-cache source over an official-format
fixture), the loss is finite and the parameters move."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from fastdmtg import bench, testing
from fastdmtg.config import DataConfig, apply_overrides, get_recipe
from fastdmtg.data.taskonomy import TASKONOMY_5

sys.path.insert(0, str(Path(__file__).parent))
from taskonomy_fixture import write_fixture  # noqa: E402

CPU = torch.device("cpu")
# Xception at 32×32, K=2, everything but the branch end shared: a step takes ~0.2 s on 2 cores
TX_SET = ["data.image_size=32", "train.batch_size=2", "model.branches=2", "model.shared_blocks=11"]
CELEBA_SET = ["data.image_size=32", "train.batch_size=8", "model.width=8"]
FAST = ["--steps", "2", "--repeats", "1", "--warmup", "1", "--workers", "0", "--device", "cpu"]


def _sets(over):
    return [a for o in over for a in ("--set", o)]


def _table(report: str) -> dict[str, list[str]]:
    """Rows of the report's main table: configuration -> the other cells."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| configuration") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _check_runs(runs: list[dict], rows: dict, batch: int, n: int) -> None:
    """The raw measurements behind the table: finite losses, img/s = batch / step time, and the table
    cells formatted from them. No bound on the speed itself: a loaded 2-core machine may print 0 img/s."""
    assert len(runs) == n and all(math.isfinite(r["loss"]) for r in runs)
    for r, (mode, kernels, ms, ips, *_rest) in zip(runs, rows.values()):
        assert r["ms_per_step"] > 0 and math.isfinite(r["ms_per_step"])
        assert r["img_per_s"] == pytest.approx(batch * 1e3 / r["ms_per_step"])
        assert ms == f"{r['ms_per_step']:.3f}" and ips == f"{r['img_per_s']:,.0f}"


WHERE = "GPU-resident" if torch.cuda.is_available() else "host-memory (CPU)"


def _params(info):
    step_module = info["runner"].eager_fn
    return [p.detach().clone() for p in list(step_module.model.parameters()) + list(step_module.method.parameters())]


def test_step_main_celeba(tmp_path):
    out = tmp_path / "celeba.md"
    assert bench.step_main(["--recipe", "celeba9_k3", *_sets(CELEBA_SET), *FAST, "--jpegs", "24",
                            "--out", str(out)]) == 0
    report = out.read_text()
    assert "- projected hours: 100 epochs × 162,770 CelebA train images / throughput (training steps only)" in report
    assert ("MFU against 989 TFLOP/s dense bf16 (H100 SXM datasheet)" if torch.cuda.is_available()
            else "no MFU on CPU (it is defined against a GPU's peak)") in report
    rows = _table(report)
    # on CPU: the reference-style row and the two eager rows (graph / Triton rows are filtered out)
    assert list(rows) == ["reference style: eager fp32 + torch DataLoader (JPEG decode)",
                          f"eager fp32, {WHERE} uint8 cache", "+ bf16 autocast"]
    for cells in rows.values():
        mode, kernels, ms, ips, _, mfu, hours, data = cells
        assert (mode, kernels) == ("eager", "reference")
    runs = json.loads(out.with_suffix(".json").read_text())
    _check_runs(runs, rows, batch=8, n=3)


def test_step_main_taskonomy(tmp_path):
    out = tmp_path / "sub" / "taskonomy.md"
    assert bench.step_main(["--recipe", "taskonomy5_k3", *_sets(TX_SET), *FAST, "--only", "0,1",
                            "--train-images", "1000", "--out", str(out)]) == 0
    report = out.read_text()
    assert "batch 2," in report and "Taskonomy 32×32" in report and "rotate loss on" in report
    assert "100 epochs × 1,000 train images (--train-images)" in report
    rows = _table(report)
    # row 0 decoded the official-format PNGs written by write_taskonomy_raw through the torch backend
    assert list(rows) == ["reference style: eager fp32 + torch DataLoader (PNG decode + resize)",
                          f"eager fp32, {WHERE} uint8/uint16 cache"]
    flops = float(re.search(r"= ([0-9.]+) GFLOP", report).group(1))
    assert flops > 0
    runs = json.loads(out.with_suffix(".json").read_text())
    _check_runs(runs, rows, batch=2, n=2)


def _layout(batch: dict) -> dict:
    def one(t):
        return (tuple(t.shape), t.dtype, t.is_contiguous())
    return {"image": one(batch["image"]), "mask": one(batch["mask"]),
            "targets": {k: one(v) for k, v in batch["targets"].items()}}


def test_taskonomy_stepper_layout_loss_and_update(tmp_path):
    from fastdmtg.pipelines import build_source
    from fastdmtg.tasks.taskonomy import TaskonomyTaskSet
    cfg = apply_overrides(get_recipe("taskonomy5_k3"), TX_SET + [])
    step, info = bench.build_stepper(cfg, CPU, n_batches=2)
    assert isinstance(info["taskset"], TaskonomyTaskSet) and info["taskset"].names == TASKONOMY_5
    assert info["taskset"].rotate_loss                          # the recipe's reference loss
    before = _params(info)
    total, L = step()
    assert math.isfinite(float(total)) and L.shape == (5, 2) and torch.isfinite(L).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(info)))
    batch = info["last_batch"]
    img, t, mask = batch["image"], batch["targets"], batch["mask"]
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["segment_semantic"].shape == (2, 32, 32) and t["segment_semantic"].dtype == torch.int64
    assert 0 <= int(t["segment_semantic"].min()) and int(t["segment_semantic"].max()) <= 17
    for name, c in (("depth_zbuffer", 1), ("normal", 3), ("keypoints2d", 1), ("edge_texture", 1)):
        assert t[name].shape == (2, c, 32, 32) and t[name].dtype == torch.float32
    assert mask.shape == (2, 1, 32, 32) and mask.dtype == torch.bool and mask.any() and not mask.all()

    # the same layout as the trainer's default source over a real (official-format) folder
    fx = write_fixture(tmp_path / "raw", size=32, samples_per_building=2)
    real = build_source(DataConfig(dataset="taskonomy", root=str(fx["root"]), tasks="taskonomy5", image_size=32,
                                 backend="gpu-cache", cache_dir=str(tmp_path / "cache"), num_workers=0,
                                 taskonomy_split_file=str(fx["split_file"])), progress=False)
    real_batch = next(iter(real.batches("train", 2, shuffle=True, seed=0, epoch=0, device=CPU, train=True)))
    assert type(info["source"]) is type(real) and _layout(batch) == _layout(real_batch)


def test_write_taskonomy_raw_is_official_format(tmp_path):
    from fastdmtg.data import taskonomy as tx
    split = testing.write_taskonomy_raw(tmp_path / "raw", n=3, side=32)
    assert json.loads(split.read_text())["train"] == ["benchtrain"]
    root = tmp_path / "raw"
    assert tx.detect_layout(root) == tx.LAYOUT_DOMAIN_FIRST
    assert len(tx.index_samples(root, tx.LAYOUT_DOMAIN_FIRST, ["benchtrain"], tx.DOMAINS)) == 3
    for d in tx.DOMAINS:        # load_domain checks the PNG bit depth / colour type, size and seg ids
        a = tx.load_domain(tx.domain_dir(root, tx.LAYOUT_DOMAIN_FIRST, d, "benchtrain") / tx.file_name(d, 0, 0), d, 32)
        assert a.shape == (tx.CHANNELS[d], 32, 32) and a.dtype == tx.DTYPE[d]
        if d == "depth_zbuffer":
            assert (a == 65535).any() and (a < 8192).any()


def test_profile_main_taskonomy(tmp_path):
    out = tmp_path / "prof"
    assert bench.profile_main(["--recipe", "taskonomy5_k3", *_sets(TX_SET), "--steps", "2", "--warmup", "1",
                               "--out", str(out), "--device", "cpu"]) == 0
    summary = (out / "summary.md").read_text()
    assert (out / "trace.json").stat().st_size > 0
    ms = float(re.search(r"; ([0-9.]+) ms/step over 2 steps", summary).group(1))
    assert ms > 0 and "synthetic Taskonomy 32×32" in summary and "mode eager, kernels reference" in summary
    assert "| op / kernel | calls | total ms |" in summary


def test_scaling_rows():
    tx_base = get_recipe("taskonomy5_k3")
    rows = bench._scaling_configs(tx_base, "taskonomy5_k3", [], [])
    assert [(c.model.branches, c.train.batch_size) for _, c in rows] == [(3, 24), (4, 16), (5, 12)]
    rows = bench._scaling_configs(tx_base, "taskonomy5_k3", ["train.batch_size=2"], ["train.amp=bf16"])
    assert all(c.train.batch_size == 2 and c.train.amp == "bf16" for _, c in rows)
    cel = bench._scaling_configs(get_recipe("celeba9_k3"), "celeba9_k3", [], [])
    assert [n for n, _ in cel] == ["celeba9_k2", "celeba9_k3", "celeba9_k4", "celeba9_k5", "celeba40_k5"]
    assert [n for n, _ in bench._scaling_configs(get_recipe("synthetic_k3"), "synthetic_k3", [], [],
                                                 ("celeba9_k2",))] == ["celeba9_k2"]
    assert [n for n, _ in bench._scaling_configs(tx_base, "taskonomy5_k3", [], [])] == [
        "taskonomy5_k3 K=3 (batch 24)", "taskonomy5_k3 K=4 (batch 16)", "taskonomy5_k3 K=5 (batch 12)"]


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("cpu", 989.0)])
def test_peak_by_gpu_name(name, peak):
    assert bench.peak_bf16_tflops(name)[0] == peak


def test_train_images():
    """The training-set size of the projected hours, from each dataset format's BenchData."""
    from fastdmtg.testing import train_images
    assert train_images(get_recipe("celeba9_k3"), 0) == (
        162_770, "100 epochs × 162,770 CelebA train images / throughput (training steps only)")
    assert train_images(get_recipe("synthetic_k3"), 0)[0] == get_recipe("synthetic_k3").data.synthetic_train
    assert train_images(get_recipe("taskonomy5_k3"), 0)[0] is None          # unknown: no hours
    assert train_images(get_recipe("taskonomy5_k3"), 5000)[0] == 5000
