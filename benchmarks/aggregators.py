"""Step time of the training augmentations (UW, GradNorm, PCGrad, the torchjd aggregators) relative to
naive MTL on the same network, data and batch — the cost of their extra backward passes.

    .venv/bin/python benchmarks/aggregators.py [--width 16] [--image-size 32] [--batch 128] [--steps 10] \
        [--report benchmarks/results/cpu_2026-12-07_aggregators.md]

Every method's step is built by ``fastdmtg.builder.build_training_step`` (what ``fastdmtg train`` runs)
on the embedded planted-group data (9 tasks, the CelebA ResNet variant at ``--width``, one shared
network: K = 1). Each method: ``--warmup`` steps untimed, then ``--steps`` timed steps (forward,
backward or the augmentation's backward, optimizer step); the median step time and its ratio to naive
MTL's are reported. The methods run in an interleaved order, ``--rounds`` times, and the median over
rounds is taken, so a load change on the machine hits every method alike.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time

import torch

METHODS = ["naive-mtl", "uw", "gradnorm", "pcgrad", "mgda", "cagrad", "nash-mtl", "imtl", "aligned-mtl", "upgrad"]


def build(method: str, args):
    from fastdmtg.builder import build_training_step
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.pipelines import build_source
    cfg = apply_overrides(get_recipe("synthetic_naive"), [
        f"grouping.method={method}", "model.branches=0", f"model.width={args.width}",
        f"data.image_size={args.image_size}", f"train.batch_size={args.batch}",
        f"data.synthetic_train={args.batch * (args.warmup + args.steps)}"])
    torch.manual_seed(0)
    src = build_source(cfg.data, progress=False)
    step = build_training_step(cfg, src.taskset, src.image_size, torch.device("cpu"))
    batches = list(src.batches("train", args.batch, shuffle=False, seed=0, epoch=0, device=torch.device("cpu"),
                               train=True))
    return step, batches


def time_method(method: str, args) -> float:
    step, batches = build(method, args)
    for b in batches[:args.warmup]:
        step.runner(b)
    times = []
    for b in batches[args.warmup:args.warmup + args.steps]:
        t0 = time.perf_counter()
        step.runner(b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--report", help="write the markdown table here")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "naive-mtl" not in methods:
        methods.insert(0, "naive-mtl")
    per = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            per[m].append(time_method(m, args))
            print(f"round {r + 1}: {m}: {per[m][-1] * 1e3:.1f} ms/step", flush=True)
    med = {m: statistics.median(v) for m, v in per.items()}
    n_params = sum(p.numel() for p in build("naive-mtl", args)[0].model.parameters())
    lines = ["# Training augmentations: step time vs naive MTL (CPU)", "",
             f"Command: `.venv/bin/python benchmarks/aggregators.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}`",
             "", f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}. Network: the CelebA ResNet variant, width {args.width}, "
             f"{args.image_size}×{args.image_size} images, 9 tasks, K = 1, {n_params:,} parameters; batch {args.batch}; "
             f"median of {args.steps} steps after {args.warmup} warm-up steps, median over {args.rounds} "
             "interleaved rounds.", "",
             "| method | ms / step | × naive MTL |", "|---|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {med[m] * 1e3:.1f} | {med[m] / med['naive-mtl']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
