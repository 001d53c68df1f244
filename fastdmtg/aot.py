"""Ahead-of-time compilation of every fused kernel for named GPU targets, without a GPU or a driver.

    fastdmtg bench kernels-aot [--recipes celeba9_k3,celeba40_k5,taskonomy5_k3] [--k 1,2,3,4,5]
                               [--targets sm_80,sm_89,sm_90] [--amp mixed] [--ops ...] [--out FILE]

What it proves on a CPU machine: each Triton kernel of ``kernels/`` compiles to PTX and a cubin
(triton's own ptxas) for the A100 (sm_80), the RTX 4090 (sm_89) and the H100 (sm_90), at every
launch configuration its launcher picks for the recipes' shapes, and fits the target: registers,
shared memory and spills are read from the compiled kernel (``metadata.shared``; ``ptxas -v`` on
the PTX, with the flags triton itself passes) and checked against the limits below. The command
exits 1 when any configuration breaks a limit or fails to compile.

Which configurations: not a hand-written list. Each recipe (at each K of ``--k``) is built on the
meta device — model outputs, stem input and grouping logits take their real shapes, no memory — and
the ops run through their public entry points (``TaskSet.head_losses``, ``ops.gumbel_softmax_mask``,
``ops.gumbel_uniforms``, ``ops.bn_relu_maxpool``), forward and backward, with every ``*_kernel`` of
the op files replaced by a recorder. The launchers therefore pick the block sizes, warps and
constexprs exactly as they would on the GPU; the recorded launches are bound with triton's own
binder (``create_function_from_signature`` + ``JITFunction._pack_args``: the argument
specialisations a real launch would get, 16-byte-aligned pointers as from the CUDA allocator) and
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. Identical
launches (same kernel, signature, constexprs, specialisations and options) compile once.

Why a child process: under ``TRITON_INTERPRET=1`` (how the tests run the kernels on CPU) triton
replaces every ``@triton.jit`` function by its interpreter, which cannot be compiled; ``bench
kernels-aot`` therefore runs this module as ``python -m fastdmtg.aot`` with that variable removed.

Limits (NVIDIA, CUDA C++ Programming Guide, "Compute Capabilities" → "Technical Specifications per
Compute Capability"): maximum shared memory per thread block (opt-in) 163 KB on 8.0, 99 KB on 8.9,
227 KB on 9.0 (1 KB = 1024 bytes); 255 registers per thread; 64 K 32-bit registers per thread block
(and per SM), so num_warps × 32 × registers must stay ≤ 65,536. Any spill (ptxas' "spill stores" or
"spill loads" > 0) fails as well: the kernels were written to stay in registers.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Target:
    name: str                 # sm_80
    cc: int                   # compute capability × 10
    gpu: str                  # the GPU the target stands for
    smem_per_block: int       # bytes, opt-in maximum per thread block
    regs_per_thread: int = 255
    regs_per_block: int = 64 * 1024


# CUDA C++ Programming Guide, Technical Specifications per Compute Capability (module doc)
TARGETS = {t.name: t for t in (Target("sm_80", 80, "A100", 163 * 1024),
                               Target("sm_89", 89, "RTX 4090", 99 * 1024),
                               Target("sm_90", 90, "H100", 227 * 1024))}
DEFAULT_RECIPES = ("celeba9_k3", "celeba40_k5", "taskonomy5_k3")
# train.amp → (dtype of the task-head outputs the losses read, dtype of the stem conv's output): the
# precision policy (fastdmtg.step.set_output_precision) keeps the heads fp32 under mixed (the CUDA
# default, train.amp=auto), bf16 makes them bf16, off is fp32 throughout
AMP = {"mixed": (torch.float32, torch.bfloat16), "bf16": (torch.bfloat16, torch.bfloat16),
       "off": (torch.float32, torch.float32)}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments as the launcher passed them."""
    op: str                   # the op file (grouped_ce, ...)
    kernel: str               # the kernel's name (_fwd_kernel, ...)
    fn: object                # triton JITFunction
    args: tuple
    kwargs: dict
    where: list = field(default_factory=list)     # the recipe/K/dtype/layout labels that launch it
    tag: str = ""             # a variant of the same call (the stem's memory layout)


@dataclass
class Result:
    """Resources of one compiled configuration on one target; ``problems`` empty = fits."""
    regs: int
    shared: int               # bytes: triton's dynamic shared memory + ptxas' static smem
    spill_stores: int
    spill_loads: int
    num_warps: int
    seconds: float
    problems: list = field(default_factory=list)


def check_limits(r: Result, t: Target) -> list[str]:
    """The rules a compiled configuration must meet on target ``t`` (module doc); [] when it fits."""
    out = []
    if r.shared > t.smem_per_block:
        out.append(f"shared memory {r.shared} B > {t.smem_per_block} B per block on {t.name}")
    if r.regs > t.regs_per_thread:
        out.append(f"{r.regs} registers/thread > {t.regs_per_thread}")
    if r.num_warps * 32 * r.regs > t.regs_per_block:
        out.append(f"{r.num_warps} warps × 32 × {r.regs} registers = {r.num_warps * 32 * r.regs} > "
                   f"{t.regs_per_block} per block")
    if r.spill_stores or r.spill_loads:
        out.append(f"spills ({r.spill_stores} B stores, {r.spill_loads} B loads)")
    return out


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, static smem bytes) from ``ptxas -v``."""
    regs = _PTXAS_REGS.search(log)
    if regs is None:
        raise ValueError(f"ptxas -v printed no register count:\n{log}")
    spill = _PTXAS_SPILL.search(log)
    smem = _PTXAS_SMEM.search(log)
    return (int(regs.group(1)), int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0,
            int(smem.group(1)) if smem else 0)


# ------------------------------------------------------------------------------------ recording
class _Recorder:
    """Stands in for a ``@triton.jit`` kernel in its module: ``kernel[grid](*args, **kw)`` records."""

    def __init__(self, op: str, name: str, fn, sink: list):
        self.op, self.name, self.fn, self.sink = op, name, fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.op, self.name, self.fn, args, kwargs))
        return launch


@contextmanager
def recording(sink: list):
    """Every ``*_kernel`` of the fused-op files records its launches into ``sink`` instead of
    running, and the triton backend resolves on the meta device (whose tensors have shapes, dtypes
    and strides but no memory). Restores both on exit."""
    from triton.runtime.jit import JITFunction

    from . import ops as _ops  # noqa: F401  (imports every op file: each is registered there)
    from .kernels import _common
    mods = [m for name, m in sys.modules.items() if name.startswith("fastdmtg.kernels.")]
    saved = []
    for m in mods:
        for name, v in list(vars(m).items()):
            if name.endswith("_kernel") and isinstance(v, JITFunction):
                saved.append((m, name, v))
                setattr(m, name, _Recorder(m.__name__.rsplit(".", 1)[1], name, v, sink))
    interp = _common._INTERPRET
    _common._INTERPRET = True          # resolve_backend: "triton" on a non-CUDA (here meta) device
    try:
        yield
    finally:
        _common._INTERPRET = interp
        for m, name, v in saved:
            setattr(m, name, v)


def step_batch(specs, B: int, S: int, dev) -> dict:
    """A batch in the layout the trainer's sources give the step (fastdmtg.bench module doc)."""
    if all(s.kind == "class" for s in specs):
        return {"labels": torch.empty((B, len(specs)), dtype=torch.int64, device=dev)}
    targets = {s.name: (torch.empty((B, S, S), dtype=torch.int64, device=dev) if s.kind == "segment" else
                        torch.empty((B, s.out_channels, S, S), dtype=torch.float32, device=dev)) for s in specs}
    return {"targets": targets, "mask": torch.empty((B, 1, S, S), dtype=torch.bool, device=dev)}


def _run(fn, *args, **kwargs):
    """Forward then backward (a gradient of the output's own layout) of one op call."""
    out = fn(*args, **kwargs)
    first = out[0] if isinstance(out, tuple) else out
    first.backward(torch.empty_like(first))


def _record_gumbel(N: int, K: int, hard: bool, dev) -> None:
    from . import ops as fops
    logits = torch.empty((N, K), dtype=torch.float32, device=dev, requires_grad=True)
    tau = torch.empty((), dtype=torch.float32, device=dev)         # DMTG keeps tau in a tensor
    seed = torch.empty((), dtype=torch.int64, device=dev)
    _run(fops.gumbel_softmax_mask, logits, tau, seed, hard=hard, backend="triton")
    fops.gumbel_uniforms(seed, N, K, backend="triton")


def _record_losses(model, taskset, specs, shape: tuple[int, int, int, int], dtype, dev, want) -> None:
    """The fused losses of the task set on the model's head outputs in ``dtype``; ``shape`` = (N, K, B, S)."""
    N, K, B, S = shape
    for m in model.modules():      # autocast has no meta device; the dtype is set below anyway
        if getattr(m, "keep_fp32", False):
            m.keep_fp32 = False
    with torch.no_grad():
        outs = model(torch.empty((B, 3, S, S), device=dev))
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    outs = [o.detach().to(dtype).requires_grad_() for o in outs]
    z = torch.empty((N, K), dtype=torch.float32, device=dev)
    loss_ops = {"class": {"grouped_ce"}, "segment": {"ce_ignore"}}
    if any(want(o) for s in specs for o in loss_ops.get(s.kind, {"masked_l1"})):
        out_arg = outs[0] if len(outs) == 1 and specs[0].kind == "class" else outs
        _run(taskset.head_losses, out_arg, step_batch(specs, B, S, dev), z, kernels="triton")


def _record_stem(st, B: int, S: int, stem_dtype, dev, sink: list) -> None:
    """The fused stem in both memory layouts (train.channels_last), tagged by layout."""
    from . import ops as fops
    x = st[0](torch.empty((B, 3, S, S), device=dev)).detach().to(stem_dtype)   # the conv's output
    bn = st[1]
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt).requires_grad_()
        n0 = len(sink)
        _run(fops.bn_relu_maxpool, xf, None, None, bn.weight, bn.bias, True, 0.1, bn.eps, backend="triton")
        for ln in sink[n0:]:
            ln.tag = "channels_last" if fmt is torch.channels_last else "contiguous"


def record_recipe(cfg, dtype: torch.dtype, stem_dtype: torch.dtype, ops: set | None = None) -> list[Launch]:
    """The kernel launches of one training step of ``cfg`` (losses, Gumbel mask, fused stem in both
    memory layouts), forward and backward, head outputs in ``dtype`` and the stem's input in
    ``stem_dtype``; on the meta device."""
    from .config import resolved_branches
    from .data import task_specs, taskset_for
    from .models import build_multibranch
    from .models.resnet_celeba import Stem
    specs = task_specs(cfg)
    cfg = resolved_branches(cfg, len(specs))
    N, K, B, S = len(specs), cfg.model.branches, cfg.train.batch_size, cfg.data.image_size
    dev = torch.device("meta")
    with torch.device(dev):
        model = build_multibranch(cfg.model, specs, S).train()
    taskset = taskset_for(cfg, [s.name for s in specs])
    sink: list[Launch] = []
    want = (lambda name: True) if not ops else (lambda name: name in ops)
    with recording(sink):
        if want("gumbel_mask"):
            _record_gumbel(N, K, cfg.dmtg.hard, dev)
        _record_losses(model, taskset, specs, (N, K, B, S), dtype, dev, want)
        stems = [m for m in model.modules() if isinstance(m, Stem)]
        if stems and want("bn_relu_maxpool"):
            _record_stem(stems[0], B, S, stem_dtype, dev, sink)
    if ops:
        sink = [s for s in sink if s.op in ops or s.op == "_partials"]
    return sink


def _all_class_heads(cfg) -> bool:
    from .data import task_specs
    return all(s.kind == "class" for s in task_specs(cfg))


def grouped_bce_launches(cfg, dtype) -> list[Launch]:
    """grouped_bce is in no recipe (CelebA heads are 2-way softmax): its launches at the CelebA
    shapes (K, N, B) of ``cfg``, through its public entry point."""
    from . import ops as fops
    from .data import task_specs
    from .config import resolved_branches
    specs = task_specs(cfg)
    cfg = resolved_branches(cfg, len(specs))
    N, K, B = len(specs), cfg.model.branches, cfg.train.batch_size
    dev = torch.device("meta")
    sink: list[Launch] = []
    with recording(sink):
        logits = torch.empty((K, N, B), dtype=dtype, device=dev, requires_grad=True)
        _run(fops.grouped_bce_loss, logits, torch.empty((B, N), dtype=torch.int64, device=dev),
             torch.empty((N, K), dtype=torch.float32, device=dev), backend="triton")
    return sink


# ------------------------------------------------------------------------------------ compiling
def bind(launch: Launch, target: Target):
    """(signature, constexprs, attrs, options) of a launch, as triton's runtime would bind it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", target.cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def config_key(launch: Launch) -> tuple:
    """What makes two launches the same compiled kernel (the target aside)."""
    sig, cexp, attrs, opts = bind(launch, TARGETS["sm_90"])
    return (launch.op, launch.kernel, tuple(sig.items()), tuple(sorted(cexp.items())), repr(sorted(attrs.items())),
            opts.num_warps, opts.num_stages)


def compile_one(launch: Launch, target: Target) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource
    sig, cexp, attrs, options = bind(launch, target)
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(launch.fn, sig, cexp, attrs), target=GPUTarget("cuda", target.cc, 32),
                       options=options.__dict__)
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        # the flags triton's make_cubin passes (same register allocation), plus nothing else
        cmd = [get_ptxas(target.cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(target.cc)}", str(ptx), "-o", str(ptx) + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs, st, ld, smem = parse_ptxas(log)
    r = Result(regs, int(k.metadata.shared) + smem, st, ld, int(k.metadata.num_warps), time.perf_counter() - t0)
    r.problems = check_limits(r, target)
    return r


def _fmt_constexprs(launch: Launch) -> str:
    """The launch's constexpr keyword arguments and num_warps, as the launcher passed them."""
    kw = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
    items = [f"{k}={v}" for k, v in kw.items() if not isinstance(v, float)]
    return ", ".join(items) + f"; warps {launch.kwargs.get('num_warps', 4)}"


def specialisation(launch: Launch) -> str:
    """The integer arguments triton specialises for this launch (module doc): "=1" (compiled as the
    constant 1) and "÷16" (known divisible by 16), and the pointers that are not 16-byte aligned
    ("unaligned"; the others are, as from the CUDA allocator). Two launches with the same
    constexprs can differ only here."""
    sig, _, attrs, _ = bind(launch, TARGETS["sm_90"])
    names = list(sig)
    ones = [n for n, v in sig.items() if v == "constexpr" and n not in launch.kwargs]
    div = [names[k[0]] for k, a in attrs.items()
           if len(k) == 1 and not sig[names[k[0]]].startswith("*") and any("divisibility" in str(x) for x in a)]
    aligned = {names[k[0]] for k, a in attrs.items() if len(k) == 1 and any("divisibility" in str(x) for x in a)}
    # a pointer into a tensor at an offset (e.g. the row z[i] of the grouping weights) may not be
    # 16-byte aligned; triton then compiles without that assumption
    unaligned = [n for n, v in sig.items() if v.startswith("*") and n not in aligned]
    parts = ([f"=1: {', '.join(ones)}"] if ones else []) + ([f"÷16: {', '.join(div)}"] if div else []) + \
        ([f"unaligned: {', '.join(unaligned)}"] if unaligned else [])
    return "; ".join(parts) or "—"


def collect(recipes, ks, amps, ops=None, log=print) -> list[Launch]:
    """The distinct launches of every recipe × K × precision policy, each with the labels that launch it."""
    from .config import evolve, get_recipe
    seen: dict[tuple, Launch] = {}
    for recipe in recipes:
        for k in ks:
            cfg = evolve(get_recipe(recipe), model={"branches": k})
            base = recipe.split("_")[0]
            for dname in amps:
                got = record_recipe(cfg, *AMP[dname], ops)
                # grouped_bce's launches at the shapes of recipes whose heads are all classifications
                if _all_class_heads(cfg) and (not ops or "grouped_bce" in ops):
                    got += grouped_bce_launches(cfg, AMP[dname][0])
                for ln in got:
                    label = f"{base} K={k} amp={dname}" + (f" {ln.tag}" if ln.tag else "")
                    key = config_key(ln)
                    if key not in seen:
                        seen[key] = ln
                    if label not in seen[key].where:
                        seen[key].where.append(label)
            log(f"recorded {recipe} K={k}: {len(seen)} distinct launches so far")
    return sorted(seen.values(), key=lambda ln: (ln.op, ln.kernel, _fmt_constexprs(ln), specialisation(ln)))


def _where(labels: list[str]) -> str:
    """Compress 'celeba9 K=1 bf16', 'celeba9 K=2 bf16' ... into 'celeba9 K=1,2 bf16'."""
    groups: dict[tuple, list[str]] = {}
    for lab in labels:
        base, k, rest = lab.split(" ", 2)
        groups.setdefault((base, rest), []).append(k[2:])
    return "; ".join(f"{b} K={','.join(ks)} {rest}" for (b, rest), ks in groups.items())


def _args(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="fastdmtg bench kernels-aot",
                                 description="compile every fused kernel for sm_80/89/90 without a GPU")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help="recipes whose shapes pick the configurations (default: %(default)s)")
    ap.add_argument("--k", default="1,2,3,4,5", help="branch counts K applied to every recipe (default 1..5)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"some of {', '.join(TARGETS)}")
    ap.add_argument("--amp", default="mixed",
                    help="precision policies (train.amp), comma-separated: mixed (the CUDA default: heads fp32, stem "
                         "bf16), bf16 (heads bf16 too), off (fp32); default mixed")
    ap.add_argument("--ops", default="", help="only these op files (comma-separated; default: all)")
    ap.add_argument("--fresh-cache", action="store_true",
                    help="compile into an empty triton cache (a temporary TRITON_CACHE_DIR): honest compile times")
    ap.add_argument("--out", help="write the Markdown table here too")
    return ap.parse_args(argv)


def _check_args(args) -> str | None:
    """What is wrong with the command line (the error line), or None; ``args.ks`` = the K list."""
    try:
        args.ks = [int(k) for k in args.k.split(",") if k]
        if not args.ks or min(args.ks) < 1:
            raise ValueError
    except ValueError:
        return f"--k {args.k!r}: expected comma-separated integers >= 1"
    bad = [t for t in args.targets.split(",") if t not in TARGETS]
    badd = [d for d in args.amp.split(",") if d not in AMP]
    if bad or badd:
        return f"--targets {bad} / --amp {badd}: expected some of {', '.join(TARGETS)} / {', '.join(AMP)}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return ("TRITON_INTERPRET=1 replaces the kernels by the interpreter; run `fastdmtg bench kernels-aot` (it "
                "starts a clean child) or unset it")
    from .config import ConfigError, get_recipe
    from .data import task_specs
    try:                          # a recipe whose tasks only its data knows (folder_*) cannot be shaped here
        for r in args.recipes.split(","):
            if r:
                task_specs(get_recipe(r))
    except (ConfigError, ValueError) as e:
        return f"--recipes: {e}"
    return None


def _head(args, argv: list[str] | None, targets: list) -> list[str]:
    import triton
    return [f"# Fused kernels compiled ahead of time for {', '.join(f'{t.name} ({t.gpu})' for t in targets)}", "",
            f"- command: `fastdmtg bench kernels-aot {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"- triton {triton.__version__} (its bundled ptxas), torch {torch.__version__}; no GPU: "
            "`triton.compile(ASTSource, target=GPUTarget('cuda', cc, 32))`, registers and spills from `ptxas -v`, "
            "shared = triton's dynamic + static shared memory",
            f"- configurations: every distinct launch of the recipes {args.recipes} at K = {args.k}, train.amp="
            f"{args.amp} (losses, Gumbel mask and its uniforms, fused stem contiguous and channels_last; "
            "grouped_bce at the CelebA shapes), forward and backward, recorded from the launchers themselves",
            "- limits (CUDA C++ Programming Guide, technical specifications per compute capability): shared memory "
            "per block (opt-in) " + ", ".join(f"{t.name} {t.smem_per_block // 1024} KB" for t in targets) +
            "; 255 registers/thread; warps × 32 × registers ≤ 65,536; no spills", "",
            "| op | kernel | constexprs; warps | specialised ints | used by | " + " | ".join(
                f"{t.name} regs / smem B / spills" for t in targets) + " | status |",
            "|---|---|---|---|---|" + "---:|" * len(targets) + "---|"]


def _compile_row(ln, targets: list, failures: list[str], times: list) -> str:
    """One launch compiled for every target → its table row; failures and compile times appended."""
    cells, status = [], "ok"
    what = f"{ln.op}.{ln.kernel} [{_fmt_constexprs(ln)}; {specialisation(ln)}]"
    for t in targets:
        try:
            r = compile_one(ln, t)
        except Exception as e:  # a configuration that does not compile is a failed row
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            cells.append(f"compile failed: {type(e).__name__}")
            failures.append(f"{what} on {t.name}: {type(e).__name__}: {msg}")
            status = "FAIL"
            continue
        times.append((r.seconds, f"{ln.op}.{ln.kernel} [{_fmt_constexprs(ln)}] on {t.name}"))
        cells.append(f"{r.regs} / {r.shared} / {r.spill_stores + r.spill_loads}")
        if r.problems:
            status = "FAIL"
            failures.append(f"{what} on {t.name}: {'; '.join(r.problems)}")
    return (f"| {ln.op} | {ln.kernel} | {_fmt_constexprs(ln)} | {specialisation(ln)} | {_where(ln.where)} | "
            + " | ".join(cells) + f" | {status} |")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    error = _check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    targets = [TARGETS[t] for t in args.targets.split(",")]
    ops = {o for o in args.ops.split(",") if o} or None
    say = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731  progress on stderr
    fresh = tempfile.TemporaryDirectory(prefix="fastdmtg-aot-cache-") if args.fresh_cache else None
    if fresh is not None:
        os.environ["TRITON_CACHE_DIR"] = fresh.name          # read by triton when it compiles
    t_start = time.perf_counter()
    launches = collect([r for r in args.recipes.split(",") if r], args.ks, args.amp.split(","), ops, say)
    lines, failures, times = _head(args, argv, targets), [], []
    for ln in launches:
        lines.append(_compile_row(ln, targets, failures, times))
        say(lines[-1])
    took = time.perf_counter() - t_start
    cache = ("an empty triton cache (--fresh-cache)" if fresh is not None else
             "triton's cache (~/.triton/cache or TRITON_CACHE_DIR): configurations compiled before are read back")
    lines += ["", f"{len(launches)} configurations × {len(targets)} targets = {len(times)} compiled in {took:.0f} s "
              f"wall, into {cache}; {len(failures)} failing."]
    if times:
        slow = max(times)
        lines.append(f"Compile time per configuration and target (triton.compile + ptxas -v): mean "
                     f"{sum(t for t, _ in times) / len(times):.2f} s, max {slow[0]:.2f} s ({slow[1]}).")
    if fresh is not None:
        fresh.cleanup()
    if failures:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in failures]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if failures:
        print(f"error: {len(failures)} kernel configuration(s) exceed a target's limits or fail to compile "
              "(see the table)", file=sys.stderr)
        return 1
    return 0


def run_clean(argv: list[str]) -> int:
    """``main`` in a child process without TRITON_INTERPRET (module doc): what ``bench kernels-aot`` runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    return subprocess.run([sys.executable, "-m", "fastdmtg.aot", *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
