"""Benchmark the fused ops (fastdmtg/kernels/<op>.py): eager PyTorch reference vs torch.compile'd
reference vs Triton. Rows are named after the op (``--only`` matches the op name or the case name).

    python benchmarks/kernels.py --out benchmarks/results/h100_2026-11-23_kernels.md [--sweep]
        [--only ce_ignore] [--no-compile]

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first, L2 flushed
between repetitions) for forward, backward (``autograd.grad`` on a retained graph) and
forward+backward. Achieved bandwidth is the *minimum* bytes the op must move (every input read
once, every output written once; see ``min_bytes``) over the measured time, and is also given
as a fraction of a measured device-to-device copy (bytes read + written). GPU launches per
fwd+bwd step are counted with torch.profiler (every CUDA kernel/memset/memcpy event).

``--sweep`` first times a few block/warp settings of the dense kernels and keeps the fastest.
``--quick`` shrinks everything (CPU smoke test of the script itself under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from fastdmtg import ops
from fastdmtg.kernels import bn_relu_maxpool, ce_ignore, grouped_bce, grouped_ce, gumbel_mask, masked_l1

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEV = "cuda" if CUDA else "cpu"


def bench_ms(fn, quick=False) -> float:
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100 if not quick else 20, return_mode="median")
    fn()  # CPU smoke: one warm-up, a few timed calls
    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def copy_bandwidth_gbs(quick=False) -> float:
    n = (1 << 28) if CUDA and not quick else (1 << 20)  # 1 GiB of fp32 on GPU
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), quick)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def count_launches(fn) -> int:
    if not CUDA:
        return -1
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def es(t: torch.Tensor) -> int:
    return t.element_size()


# ----------------------------------------------------------------------------------------------
# cases: each returns inputs, the three callables and the byte floors
# ----------------------------------------------------------------------------------------------
class Case:
    def __init__(self, op, name, desc, inputs, diff, call, ref, fwd_bytes, bwd_bytes, compile_ref=True):
        self.op, self.name, self.desc, self.inputs, self.diff = op, name, desc, inputs, diff
        # call(inputs, backend) -> output tensor to differentiate; ref(**inputs) -> tuple, [0] differentiated
        self.call, self.ref = call, ref
        self.fwd_bytes, self.bwd_bytes, self.compile_ref = fwd_bytes, bwd_bytes, compile_ref

    def matches(self, only) -> bool:
        return not only or any(o in self.op or o in self.name for o in only)


def _grad_out(out):
    return torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)


def case_grouped_ce(K, N, B, C=2, dtype=torch.bfloat16):
    logits = torch.randn(K, N, B, C, device=DEV, dtype=dtype, requires_grad=True)
    target = torch.randint(0, C, (B, N), device=DEV)
    z = torch.softmax(torch.randn(N, K, device=DEV), 1).requires_grad_(True)
    x_bytes = logits.numel() * es(logits)
    small = 3 * z.numel() * 4  # z in, L out (+dz)
    fwd = x_bytes + target.numel() * es(target) + small
    bwd = 2 * x_bytes + target.numel() * es(target) + small
    return Case(
        "grouped_ce", f"celeba{N}_k{K}", f"K={K} N={N} B={B} C={C} {str(dtype)[6:]}",
        dict(logits=logits, target=target, z=z), ["logits", "z"],
        lambda i, be: ops.grouped_ce_loss(**i, backend=be)[0], grouped_ce.reference, fwd, bwd,
    )


def case_gumbel(N, K):
    S = torch.randn(N, K, device=DEV, requires_grad=True)
    seed = torch.tensor(1, device=DEV)
    tau = torch.tensor(0.5, device=DEV)
    nk = N * K * 4

    return Case(
        "gumbel_mask", f"n{N}_k{K}", f"N={N} K={K}",
        dict(logits=S, seed=seed, tau=tau), ["logits"],
        lambda i, be: ops.gumbel_softmax_mask(i["logits"], i["tau"], i["seed"], backend=be),
        lambda logits, seed, tau: (gumbel_mask.reference(logits, tau, seed, False),), 2 * nk, 3 * nk,
    )


def case_masked_l1(K, B, C=3, H=256, W=256):
    pred = torch.randn(K, B, C, H, W, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(B, C, H, W, device=DEV)  # fp32 targets from the loader
    mask = torch.rand(B, 1, H, W, device=DEV) > 0.1
    z = torch.softmax(torch.randn(K, device=DEV), 0).requires_grad_(True)
    p_bytes = pred.numel() * es(pred)
    rest = target.numel() * es(target) + mask.numel() * es(mask)
    return Case(
        "masked_l1", f"normal_k{K}_b{B}", f"K={K} B={B} C={C} {H}x{W} bf16 pred, fp32 target, bool mask",
        dict(pred=pred, target=target, mask=mask, z=z), ["pred", "z"],
        lambda i, be: ops.masked_l1_loss(**i, backend=be)[0], masked_l1.reference, p_bytes + rest,
        2 * p_bytes + rest,
    )


def case_ce_ignore(K, B, C=18, H=256, W=256):
    logits = torch.randn(K, B, C, H, W, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, C, (B, H, W), device=DEV)  # int64, ~1/C pixels ignored
    z = torch.softmax(torch.randn(K, device=DEV), 0).requires_grad_(True)
    x_bytes = logits.numel() * es(logits)
    t_bytes = target.numel() * es(target)

    return Case(
        "ce_ignore", f"seg_k{K}_b{B}", f"K={K} B={B} C={C} {H}x{W} bf16 logits, int64 target",
        dict(logits=logits, target=target, z=z), ["logits", "z"],
        lambda i, be: ops.ce_ignore_loss(**i, backend=be)[0], ce_ignore.reference, x_bytes + t_bytes,
        2 * x_bytes + t_bytes,
    )


def case_bn_relu_maxpool(B, C, S=64, dtype=torch.bfloat16):
    """The CelebA stem after the conv: B images, C channels (64 per branch; 192 = K=3 batched), S×S."""
    x = (torch.randn(B, C, S, S, device=DEV) * 1.5 + 0.3).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = (torch.rand(C, device=DEV) + 0.5).requires_grad_(True)
    b = (torch.randn(C, device=DEV) * 0.2).requires_grad_(True)
    rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    x_bytes = x.numel() * es(x)
    o_bytes = B * C * ((S - 3) // 2 + 1) ** 2 * es(x)   # the pooled output
    return Case(
        "bn_relu_maxpool", f"stem_b{B}_c{C}", f"B={B} C={C} {S}x{S} {str(dtype)[6:]} channels_last",
        dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b), ["x", "weight", "bias"],
        lambda i, be: ops.bn_relu_maxpool(**i, backend=be),
        lambda **i: (bn_relu_maxpool.reference(**i),), x_bytes + o_bytes, 2 * x_bytes + o_bytes,
    )


def make_cases(quick: bool):
    if quick:
        return [case_grouped_ce(2, 5, 16), case_gumbel(9, 3), case_masked_l1(2, 1, H=16, W=16),
                case_ce_ignore(2, 1, C=5, H=8, W=16), case_bn_relu_maxpool(2, 4, S=9)]
    cs = [
        case_grouped_ce(5, 40, 256),
        case_grouped_ce(3, 9, 256),
        case_gumbel(40, 5),
        case_masked_l1(5, 32),
        case_masked_l1(3, 64),
        case_ce_ignore(5, 32),
        case_ce_ignore(3, 24),
        case_bn_relu_maxpool(256, 64),
        case_bn_relu_maxpool(256, 192),
    ]
    for c in (cs[1], cs[4], cs[6], cs[8]):
        c.compile_ref = False  # inductor compiles cost device minutes; primary cases only
    return cs


# ----------------------------------------------------------------------------------------------
def impl_fns(case: Case, impl: str):
    """(fwd, both) zero-arg callables for one implementation.

    Fresh leaf views of the differentiable inputs per implementation, and no autograd graph is
    kept alive between calls: a leaf's AccumulateGrad node remembers the stream it was created
    on, and a stale one from the default stream invalidates a later CUDA-graph capture.
    """
    inputs = {k: (v.detach().requires_grad_(True) if k in case.diff else v) for k, v in case.inputs.items()}
    diff = [inputs[k] for k in case.diff]
    if impl == "triton":
        run = lambda: case.call(inputs, "triton")  # noqa: E731
    else:
        ref = case.ref if impl == "eager" else torch.compile(case.ref, dynamic=False)
        run = lambda: ref(**inputs)[0]  # noqa: E731
    g = _grad_out(run().detach())

    def fwd():
        return run()

    def both():
        return torch.autograd.grad(run(), diff, g)

    return fwd, both


def graph_ms(fn, quick=False) -> float:
    """Median time of one CUDA-graph replay of ``fn`` (host launch overhead removed).

    This is what a trainer that captures its step sees. (A backward cannot be captured on its
    own: autograd runs it on the forward's stream, so bwd = graph(fwd+bwd) - graph(fwd).)
    """
    if not CUDA:
        return bench_ms(fn, quick)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = bench_ms(graph.replay, quick)
    del graph
    return ms


def sweep(quick: bool, lines: list, only=None):
    """Try block/warp settings of the dense kernels on the primary Taskonomy shapes.

    masked_l1 is timed fwd+bwd; ce_ignore's forward settings are timed on the forward alone
    (the graph of fwd) and its backward settings on fwd+bwd with the forward already chosen.
    The ce_ignore candidates are ``ce_ignore.SWEEP`` (tests/test_kernels_gpu.py checks each one).
    """
    lines.append("\n### Block-size sweep (Triton, CUDA-graph replay, median us)\n")
    seg_fwd, seg_bwd = list(ce_ignore.SWEEP.items())
    seg = (lambda: case_ce_ignore(5, 32) if not quick else case_ce_ignore(2, 1, C=5, H=8, W=16))
    stem = (lambda: case_bn_relu_maxpool(256, 192) if not quick else case_bn_relu_maxpool(2, 4, S=9))
    groups = [
        (lambda: case_masked_l1(5, 32) if not quick else case_masked_l1(2, 1, H=16, W=16), masked_l1.CONFIG,
         ("block", "warps"), [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)], "fwd+bwd"),
        (seg, ce_ignore.CONFIG, seg_fwd[0], seg_fwd[1], "fwd"),
        (seg, ce_ignore.CONFIG, seg_bwd[0], seg_bwd[1], "fwd+bwd"),
        (stem, bn_relu_maxpool.CONFIG, ("bwd_cw", "bwd_rows", "warps"),
         [(16, 8, 4), (8, 8, 4), (16, 4, 4), (32, 8, 8), (8, 16, 4)], "fwd+bwd"),
    ]
    for make, CONFIG, keys, grid, what in groups:
        case = make()
        if not case.matches(only):
            continue
        best = None
        for values in grid:
            CONFIG.update(zip(keys, values))
            try:
                fwd, both = impl_fns(case, "triton")
                t = graph_ms(fwd if what == "fwd" else both, quick) * 1e3
            except Exception as exc:
                print(f"sweep {keys} {values}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            setting = " ".join(f"{k}={v}" for k, v in zip(keys, values))
            lines.append(f"- {case.name} {what}: {setting}: {t:.1f} us")
            print(lines[-1], flush=True)
            if best is None or t < best[0]:
                best = (t, values)
        if best is not None:
            CONFIG.update(zip(keys, best[1]))
            setting = " ".join(f"{k}={v}" for k, v in zip(keys, best[1]))
            lines.append(f"- **{case.name} {what}: chose {setting}**")
        case.inputs.clear()
        if CUDA:
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the Markdown report here")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the ops (or cases) whose name contains one of these, e.g. ce_ignore")
    args = ap.parse_args()
    torch.manual_seed(0)

    import triton

    gpu = torch.cuda.get_device_name() if CUDA else "CPU (TRITON_INTERPRET=1 smoke run)"
    lines = [
        "## Kernels (fastdmtg.ops)\n",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {gpu}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
        f"- command: `{' '.join(['python3'] + sys.argv)}`",
    ]
    bw = copy_bandwidth_gbs(args.quick)
    lines.append(f"- measured device-to-device copy: {bw:.0f} GB/s (bytes read + written, 1 GiB fp32)")
    print("\n".join(lines), flush=True)
    if args.sweep:
        sweep(args.quick, lines, args.only)
    for mod in (grouped_ce, grouped_bce, masked_l1, ce_ignore, bn_relu_maxpool):
        lines.append(f"- Triton CONFIG of {mod.__name__.rsplit('.', 1)[-1]}: {dict(mod.CONFIG)}")
    lines.append("")
    lines.append(
        "graph = one CUDA-graph replay (host overhead removed; what a captured training step sees), "
        "median of triton.testing.do_bench; bwd = graph(fwd+bwd) - graph(fwd). eager-dispatch = the "
        "same fwd+bwd launched from Python without a graph (includes host overhead). GB/s = minimum "
        "bytes (inputs read once, outputs written once) / graph time; %copy = that / measured copy "
        "bandwidth. launches = GPU kernels+memsets+memcpys (torch.profiler), fwd + bwd.\n"
    )
    lines.append("| op | case | impl | graph fwd us | graph bwd us | graph fwd+bwd us | fwd GB/s | bwd GB/s | fwd+bwd GB/s | fwd+bwd %copy | eager-dispatch fwd+bwd us | launches fwd + bwd | speedup vs eager (graph) |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = []
    for case in make_cases(args.quick):
        if not case.matches(args.only):
            continue
        res = {}
        impls = ["eager", "compiled", "triton"]
        if args.no_compile or not case.compile_ref:
            impls.remove("compiled")
        for impl in impls:
            try:
                fwd, both = impl_fns(case, impl)
                gf, gt = graph_ms(fwd, args.quick) * 1e3, graph_ms(both, args.quick) * 1e3
                et = bench_ms(both, args.quick) * 1e3
                nf, nt = count_launches(fwd), count_launches(both)
                n = f"{nf} + {nt - nf}" if nf >= 0 else "n/a"
            except Exception as exc:  # report, keep going
                print(f"{case.name} {impl}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            res[impl] = (gf, max(gt - gf, 1e-3), gt, et, n)
        for impl, (tf, tb, tt, et, n) in res.items():
            bf = case.fwd_bytes / (tf * 1e-6) / 1e9
            bb = case.bwd_bytes / (tb * 1e-6) / 1e9
            bt = (case.fwd_bytes + case.bwd_bytes) / (tt * 1e-6) / 1e9
            sp = res["eager"][2] / tt if "eager" in res else float("nan")
            lines.append(
                f"| {case.op} | {case.desc} | {impl} | {tf:.1f} | {tb:.1f} | {tt:.1f} | {bf:.0f} | {bb:.0f} | {bt:.0f} | "
                f"{100 * bt / bw:.0f}% | {et:.1f} | {n} | {sp:.2f}x |"
            )
            print(lines[-1], flush=True)
        if "triton" in res:
            summary.append((case, res))
        case.inputs.clear()
        if CUDA:
            torch.cuda.empty_cache()

    lines.append("\nTargets (graph fwd+bwd; loss reductions >= 70% of copy bandwidth and faster than eager "
                 "and compiled; Gumbel mask one launch fwd, one bwd; the fused stem faster than the compiled "
                 "reference, which is what the CelebA step runs without it):\n")
    for case, res in summary:
        tt = res["triton"][2]
        gt = (case.fwd_bytes + case.bwd_bytes) / (tt * 1e-6) / 1e9
        faster = all(tt < r[2] for k, r in res.items() if k != "triton")
        lines.append(f"- {case.op} {case.desc}: {100 * gt / bw:.0f}% of copy BW, "
                     f"{'faster than all baselines' if faster else 'NOT faster than every baseline'}, "
                     f"launches {res['triton'][4]}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
