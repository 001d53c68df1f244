"""Roofline lower bound (fastdmtg.roofline, ``fastdmtg bench roofline``): FLOPs and bytes of a tiny
network computed by hand, the bound max(F / peak, B / bandwidth) per group, and the command."""
import re

import pytest
import torch
from torch import nn

pytest.importorskip("fvcore")

from fastdmtg import roofline  # noqa: E402
from fastdmtg.roofline import GPU, bound_rows, network_groups  # noqa: E402


class Tiny(nn.Module):
    """conv 3→4 (3×3, pad 1, no bias) on 8×8 → flatten → 'heads' Linear(256, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.flat = nn.Flatten()
        self.heads = nn.Linear(256, 2)

    def forward(self, x):
        return self.heads(self.flat(self.conv(x)))


B = 10
CONV_MACS = 8 * 8 * 4 * 3 * 9               # 6,912 per sample
LIN_MACS = 256 * 2                          # 512
CONV_FLOPS = 3 * 2 * CONV_MACS * B          # fwd + bwd (bwd = 2× fwd), 2 FLOPs per MAC: 414,720
LIN_FLOPS = 3 * 2 * LIN_MACS * B            # 30,720
# activations read + written, 3× for fwd + bwd, trunk bf16 (2 B), heads fp32 (4 B); weights 12 B each
CONV_BYTES = 3 * (3 * 64 + 4 * 64) * 2 * B + 12 * (4 * 3 * 9)        # 26,880 + 1,296 = 28,176
LIN_BYTES = 3 * (256 + 2) * 4 * B + 12 * (256 * 2 + 2)               # 30,960 + 6,168 = 37,128


def _groups():
    torch.manual_seed(0)
    return network_groups(Tiny().eval(), torch.rand(1, 3, 8, 8), B)


def test_flops_and_bytes_per_group_by_hand():
    g = _groups()
    assert g["encoder convs"].flops == CONV_FLOPS and g["encoder convs"].bytes == CONV_BYTES
    assert g["heads"].flops == LIN_FLOPS and g["heads"].bytes == LIN_BYTES
    assert g["BN/ReLU/pool"].bytes == 0 and g["other (functional)"].flops == 0     # flatten is a view


def test_bf16_heads_halve_the_head_activation_bytes():
    torch.manual_seed(0)
    g = network_groups(Tiny().eval(), torch.rand(1, 3, 8, 8), B, head_bytes=2)
    assert g["heads"].bytes == 3 * (256 + 2) * 2 * B + 12 * (256 * 2 + 2)
    assert g["encoder convs"].bytes == CONV_BYTES


def test_bound_is_max_of_compute_and_memory_per_group_summed():
    # 1 MFLOP/s and 1 MB/s: the conv is compute-bound (0.41472 s > 0.028176 s), the head memory-bound
    gpu = GPU("toy", 1e-6, 1e-6, "")
    rows, total = bound_rows(_groups(), gpu)
    by = {r[0]: r for r in rows}
    assert by["encoder convs"][3] == pytest.approx(CONV_FLOPS / 1e6 * 1e3)
    assert by["encoder convs"][4] == pytest.approx(CONV_BYTES / 1e6 * 1e3)
    assert by["encoder convs"][6] == "compute" and by["heads"][6] == "memory"
    assert total == pytest.approx(CONV_FLOPS / 1e6 + LIN_BYTES / 1e6)
    # an H100: both groups memory-bound (tiny arithmetic intensity)
    _, t = bound_rows(_groups(), roofline.GPUS["h100"])
    assert t == pytest.approx(CONV_BYTES / 3.35e12 + LIN_BYTES / 3.35e12)


def test_published_peaks():
    assert (roofline.GPUS["h100"].bf16_tflops, roofline.GPUS["h100"].tb_per_s) == (989.0, 3.35)
    assert (roofline.GPUS["a100"].bf16_tflops, roofline.GPUS["a100"].tb_per_s) == (312.0, 2.039)
    assert (roofline.GPUS["4090"].bf16_tflops, roofline.GPUS["4090"].tb_per_s) == (165.2, 1.008)


def test_bench_roofline_celeba9_k3_h100(tmp_path, capsys):
    """The command on the recipe with a measured step: step FLOPs = 3·2·fvcore·batch, the 100-epoch
    bound = 100 · ceil(162,770 / 256) · step bound, and the measured/bound ratio."""
    from fastdmtg.bench import bench_main
    from fastdmtg.flops import count_flops
    from fastdmtg.config import get_recipe
    out = tmp_path / "r.md"
    assert bench_main(["roofline", "--recipe", "celeba9_k3", "--gpu", "h100", "--out", str(out)]) == 0
    text = out.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| celeba9_k3 | 3 | H100"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3"
    gflop, step_ms, epochs_min, measured = float(cells[4].replace(",", "")), float(cells[6]), float(cells[7]), cells[8]
    fv = count_flops(get_recipe("celeba9_k3"))["fvcore_1_per_mac"]
    assert gflop == pytest.approx(3 * 2 * fv * 256 / 1e9, rel=1e-3)
    assert epochs_min == pytest.approx(100 * 636 * step_ms / 1e3 / 60, rel=5e-4)      # ceil(162770/256) = 636
    assert measured == "6.908" and cells[9] == f"{6.908 / step_ms:.1f}×"
    assert float(cells[10]) == pytest.approx(100 * gflop * 1e9 / 989e12 / (step_ms / 1e3), abs=0.06)
    # the per-group table sums to the step bound
    bounds = [float(m) for m in re.findall(r"\| [a-zA-Z/() ]+ \| [\d,.]+ \| [\d,.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|",
                                            text)]
    assert len(bounds) == 6 and sum(bounds) == pytest.approx(step_ms, abs=1e-3)


def test_a_changed_recipe_has_no_measured_step(tmp_path):
    """--set model.branches=2 is not the measured celeba9_k3: no measured column."""
    from fastdmtg.bench import bench_main
    out = tmp_path / "r.md"
    assert bench_main(["roofline", "--recipe", "celeba9_k3", "--set", "model.branches=2", "--out", str(out)]) == 0
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| celeba9_k3 | 2 | H100"))
    assert row.split(" | ")[-3:-1] == ["—", "—"]


@pytest.mark.parametrize("args", [["--gpu", "v100"], ["--recipe", "nope"], ["--set", "model.nope=1"],
                                  ["--recipe", "folder_k3"]])
def test_bench_roofline_bad_input_exits_2(args, capsys):
    from fastdmtg.bench import bench_main
    assert bench_main(["roofline", *args]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_amp_bf16_moves_fewer_bytes_than_mixed(tmp_path):
    """--amp bf16 counts the heads' activations (and the losses' reads of them) at 2 B, not 4."""
    from fastdmtg.bench import bench_main
    mb = {}
    for amp in ("mixed", "bf16"):
        out = tmp_path / f"{amp}.md"
        assert bench_main(["roofline", "--recipe", "celeba9_k3", "--amp", amp, "--out", str(out)]) == 0
        row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| celeba9_k3 | 3 | H100"))
        mb[amp] = float(row.split(" | ")[5].replace(",", ""))
    assert mb["bf16"] < mb["mixed"] - 10          # heads: 142 MB at fp32 per step
