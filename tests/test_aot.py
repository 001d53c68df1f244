"""Ahead-of-time compilation of the fused kernels (fastdmtg.aot, ``fastdmtg bench kernels-aot``).

The limit rules are checked on hand-made records (no compiler); one end-to-end run compiles a small
subset (grouped_ce at CelebA-9 K=3 for sm_90, ~10-30 s on 2 cores) in the clean child process that
``bench kernels-aot`` starts, since the tests run triton's interpreter (TRITON_INTERPRET=1), which
replaces the kernels by Python functions that cannot be compiled."""
import re

import pytest

from fastdmtg import aot
from fastdmtg.aot import TARGETS, Result, check_limits, parse_ptxas

PTXAS_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_bwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_kernel
    96 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 512 bytes smem
"""


def _r(regs=32, shared=0, st=0, ld=0, warps=4):
    return Result(regs=regs, shared=shared, spill_stores=st, spill_loads=ld, num_warps=warps, seconds=0.0)


def test_parse_ptxas_reads_registers_spills_and_static_smem():
    assert parse_ptxas(PTXAS_LOG) == (255, 12, 20, 512)
    assert parse_ptxas("ptxas info    : Used 40 registers\n") == (40, 0, 0, 0)
    with pytest.raises(ValueError, match="no register count"):
        parse_ptxas("ptxas info    : 11 bytes gmem\n")


def test_limits_are_the_programming_guide_values():
    # opt-in shared memory per block, CUDA C++ Programming Guide: 8.0 163 KB, 8.9 99 KB, 9.0 227 KB
    assert {n: t.smem_per_block for n, t in TARGETS.items()} == {
        "sm_80": 163 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
    assert {t.cc for t in TARGETS.values()} == {80, 89, 90}


def test_a_kernel_within_every_limit_passes():
    for t in TARGETS.values():
        assert check_limits(_r(regs=128, shared=t.smem_per_block, warps=16), t) == []   # 16·32·128 = 65,536


def test_spills_fail():
    p = check_limits(_r(st=12, ld=0), TARGETS["sm_90"])
    assert len(p) == 1 and "spills" in p[0]
    assert check_limits(_r(st=0, ld=4), TARGETS["sm_80"])


def test_shared_memory_over_the_target_limit_fails_on_that_target_only():
    r = _r(shared=100 * 1024)                         # > 99 KB (sm_89), < 163 KB (sm_80), < 227 KB (sm_90)
    assert check_limits(r, TARGETS["sm_80"]) == [] and check_limits(r, TARGETS["sm_90"]) == []
    p = check_limits(r, TARGETS["sm_89"])
    assert len(p) == 1 and "shared memory 102400 B > 101376 B" in p[0]


def test_register_file_per_block_and_per_thread():
    p = check_limits(_r(regs=129, warps=16), TARGETS["sm_90"])      # 16·32·129 = 66,048 > 65,536
    assert len(p) == 1 and "66048 > 65536" in p[0]
    assert any("registers/thread" in x for x in check_limits(_r(regs=256, warps=1), TARGETS["sm_80"]))


def test_main_fails_with_the_offending_configuration_named(monkeypatch, tmp_path, capsys):
    """A fake compiled record with spills makes the command exit 1 and name kernel and target."""
    pytest.importorskip("triton")
    fake = aot.Launch("grouped_ce", "_fwd_kernel", None, (), {"K": 3, "BLOCK_B": 256, "num_warps": 4},
                      where=["celeba9 K=3 amp=mixed"])
    monkeypatch.setattr(aot, "collect", lambda *a, **k: [fake])
    monkeypatch.setattr(aot, "specialisation", lambda ln: "÷16: B")
    monkeypatch.setattr(aot, "compile_one", lambda ln, t: (lambda r: (setattr(r, "problems", check_limits(r, t)), r)[1])(
        _r(regs=40, st=8 if t.name == "sm_89" else 0)))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "aot.md"
    assert aot.main(["--out", str(out)]) == 1
    text = out.read_text()
    assert "| grouped_ce | _fwd_kernel | K=3, BLOCK_B=256; warps 4 | ÷16: B | celeba9 K=3 amp=mixed |" in text
    assert "40 / 0 / 0 | 40 / 0 / 8 | 40 / 0 / 0 | FAIL |" in text
    assert "grouped_ce._fwd_kernel [K=3, BLOCK_B=256; warps 4; ÷16: B] on sm_89: spills (8 B stores, 0 B loads)" in text
    assert "exceed a target's limits" in capsys.readouterr().err


def test_main_refuses_to_compile_under_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--targets", "sm_90"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--k", "0"], ["--targets", "sm_70"], ["--amp", "fp16"], ["--recipes", "nope"],
                                  ["--recipes", "folder_k3"]])
def test_bad_arguments_exit_2(args, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert aot.main(args) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.timeout(600)
def test_bench_kernels_aot_compiles_a_subset_for_sm90(tmp_path):
    """The CI run: the launches grouped_ce's launchers pick at CelebA-9 K=3 (batch 256, C = 2), compiled
    for sm_90 in a clean child; every row fits and reports real registers."""
    pytest.importorskip("triton")
    import fastdmtg.kernels.grouped_ce as gce
    from fastdmtg.bench import bench_main
    from fastdmtg.kernels._common import npow2
    out = tmp_path / "aot.md"
    rc = bench_main(["kernels-aot", "--recipes", "celeba9_k3", "--k", "3", "--targets", "sm_90", "--ops", "grouped_ce",
                     "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    rows = [ln for ln in text.splitlines() if ln.startswith("| grouped_ce") or ln.startswith("| _partials")]
    bb = min(npow2(256), gce.CONFIG["block_b"])       # the launcher's own rule at batch 256
    warps = gce.CONFIG["warps"]
    kernels = {r.split(" | ")[1]: r for r in rows}
    assert set(kernels) == {"_fwd_kernel", "_bwd_kernel", "_finalize_kernel"}, rows
    assert f"K=3, BLOCK_B={bb}, BLOCK_C=2; warps {warps}" in kernels["_fwd_kernel"]
    assert f"K=3, BLOCK_B={bb}, BLOCK_C=2, BLOCK_K=4; warps {warps}" in kernels["_bwd_kernel"]
    assert "BLOCK_H=32, BLOCK_P=1" in kernels["_finalize_kernel"]          # H = N·K = 27, one partial per head
    # batch 256 and N = 9 as the binder specialises them: B divisible by 16, N not, P = 1 a constant
    assert "| =1: PB; ÷16: B |" in kernels["_fwd_kernel"] and "| ÷16: B |" in kernels["_bwd_kernel"]
    assert "=1: P" in kernels["_finalize_kernel"]
    for r in rows:
        regs, smem, spills = (int(v) for v in re.search(r"\| (\d+) / (\d+) / (\d+) \| ok \|$", r).groups())
        assert 8 <= regs <= 255 and spills == 0
