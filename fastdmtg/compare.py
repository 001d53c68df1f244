"""Comparison of grouping methods on one recipe: the DMTG paper's Tables 1–4 and A4/A5.

    fastdmtg compare --recipe synthetic_k3 --methods naive,stl,rg,tag,hoa,bmtn,dmtg,dmtg-two-shot \\
                     --k 2,3 --out DIR [--set KEY=VALUE ...] [--seeds N] [--rg-partitions 3] [--data-root PATH]

Every method is a grouping method of the same trainer on the same models, data and metrics. Each
baseline is one file in fastdmtg/baselines/ (its runs, selection and rows; docs/baselines.md, "Adding
a baseline"); it asks the run machinery (fastdmtg/compare_runs.py) for its runs, each in its own
folder under DIR trained by ``fastdmtg.train.train``; fastdmtg/compare_tables.py writes the tables.
This module is the command: arguments, plan, tables written. Resumable: a run folder with
results.json is reused, one with only checkpoints is resumed; re-running the same command continues
an interrupted comparison. One progress line per run ([done/total], with an ETA once a step time is
known). The runs are planned first (``--dry-run`` prints the plan) and trained by ``--executor
local`` (here, one after the other) or ``--executor ray`` (fastdmtg/compare_plan.py; docs/cluster.md).

Methods — the baselines found in fastdmtg/baselines/ (docs/baselines.md has the details and the
deviations from the papers):
    naive          naive MTL, one encoder (the NormGain reference)
    stl            one network per task: ``fixed`` groups 0|1|...|N−1 with nothing shared
    rg             random partition into K groups, mean ± std over --rg-partitions partitions
    tag            TAG: affinity run (tag-affinity) → tag_select → train the chosen networks
    hoa            HOA: all pair networks + the STL singles → hoa_select → train the chosen networks
    bmtn           BMTN: RSA affinity from the STL networks → split point + clustering → train
    dmtg           DMTG (one shot)
    dmtg-two-shot  DMTG's groups retrained from scratch and from the naive-MTL weights (Table 4)
    cs             the TAG paper's CS: gradient cosine similarity (cs-affinity run) → tag_select → train
    uw, gradnorm, pcgrad, mgda, cagrad, nash-mtl, imtl, aligned-mtl, upgrad
                   training augmentations on one shared network (fastdmtg.methods.AUGMENTATIONS)
    tag-pcgrad     TAG's selected networks trained with PCGrad (the TAG paper §5)
    --aggregator NAME trains every grouping method's selected networks with NAME (rows METHOD+NAME)

Outputs in DIR: comparison.md (all tables), comparison.csv (one row per method × K),
groupings.csv (Table A4/A5 shape), per_task.csv, comparison.json (everything, including the
affinity matrices and the selections), comparison.tex (booktabs) and, with --seeds N ≥ 2, the DMTG
grouping-stability matrices (fastdmtg/seeds.py).

Relative encoder cost = Σ over the runs a method needed of (encoder branches × epochs), divided by
naive MTL's (1 × epochs). A TAG affinity run counts 1 + N/affinity_every (each measurement costs
about N encoder forward+backward passes). Hours = Σ train_time_s of those runs / 3600; for RG
both are per random partition (the mean over seeds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import baselines, compare_plan
from .baselines._core import Row
from .compare_runs import Comparison
from .compare_tables import build_tables, write_tables
from .config import ConfigError, apply_overrides, get_recipe
from .log import add_output_flags, get_logger, progress_flag
from .log import setup as setup_logging

_log = get_logger("fastdmtg.compare")


def known_methods() -> list[str]:
    """Every --methods name (fastdmtg/baselines/), in table order."""
    return baselines.known()


def method_order(m: str) -> int:
    """0 grouping methods, 1 training augmentations, 2 combinations (the TAG paper's layout)."""
    return baselines.section_index(m)


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdmtg compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="named recipe (fastdmtg recipes); default synthetic_k3, or "
                                                  "with --data-root the dataset found there (folder_k3, celeba9_k3, "
                                                  "taskonomy5_k3)")
    default = baselines.defaults()
    others = [m for m in baselines.known() if m not in default]
    alias = "; ".join(f"{a} = {n}" for a, n in baselines.aliases().items())
    p.add_argument("--methods", default=",".join(default), help=f"comma list of {','.join(default)} "
                   f"(the default); also {', '.join(others)}" + (f" ({alias})" if alias else "")
                   + " — docs/baselines.md")
    aggregated = [m for m in baselines.known() if baselines.get(m).aggregated]
    p.add_argument("--aggregator", default=None, metavar="NAME",
                   help=f"train the grouping methods' selected networks ({', '.join(aggregated)}) "
                        "with this training augmentation (train.aggregator; rows named METHOD+NAME)")
    p.add_argument("--k", default=None, help="comma list of K values (default: the recipe's model.branches)")
    p.add_argument("--out", required=True, help="comparison folder (one subfolder per run; re-run to resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every run, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--data-root", help="dataset folder (CelebA / Taskonomy / your own DIR/labels.csv)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every method's evaluated networks with N seeds (train.seed, +1, …) → mean ± std "
                        "in every numeric column, and a grouping-stability matrix (default 1)")
    p.add_argument("--rg-partitions", type=int, default=3, help="RG: random partitions per K (default 3)")
    p.add_argument("--overlap", choices=["train", "partition"], default="train",
                   help="TAG/HOA overlapping selections: train every chosen network (default) or only the "
                        "served partition")
    p.add_argument("--naive-recipe", help="recipe of the naive-MTL reference (default: the recipe itself with "
                                          "grouping.method=naive-mtl, i.e. the same optimizer as every method)")
    p.add_argument("--rsa-images", type=int, default=256, help="BMTN: images for the RDMs (default 256)")
    add_output_flags(p, "the trainer's progress bars")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOPs column (fastdmtg.bench.count_flops)")
    add_executor_flags(p)
    p.add_argument("--stability", nargs="+", metavar="RUN_DIR",
                   help="only write the grouping-stability matrix of these finished runs (e.g. DMTG trained with "
                        "several --set train.seed=S) to --out, and exit")
    return p


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (runs, dependencies, estimated cost) and exit; trains nothing")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after the other in this process (default); ray: every run a Ray task "
                        "(pip install -e \".[ray]\"; docs/cluster.md)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (ray start --head); default: a "
                                                      "local Ray instance on this machine's CPUs/GPUs")
    p.add_argument("--ray-cpus-per-run", type=float, default=1.0,
                   help="Ray: CPUs per run, also its torch threads (default 1)")
    p.add_argument("--ray-gpus-per-run", type=float, default=None,
                   help="Ray: GPUs per run (default 1 when this machine has a GPU, else 0)")
    p.add_argument("--ray-max-retries", type=int, default=3,
                   help="Ray: retries of a run whose worker died; it resumes from its last checkpoint (default 3)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="Ray: CPUs of the local instance (default: all)")


def execute(cmp: Comparison, methods: list[str], args) -> int | None:
    """Plan; with --dry-run print the plan (→ exit 0); with --executor ray train every run on Ray. Then
    (None) the local pass trains what is left in this process and writes the tables."""
    if args.executor == "ray" and not compare_plan.ray_available():
        print(compare_plan.RAY_MISSING, file=sys.stderr)
        return 2
    if args.ray_cpus_per_run <= 0 or (args.ray_gpus_per_run or 0) < 0 or args.ray_max_retries < 0:
        print("error: --ray-cpus-per-run must be > 0, --ray-gpus-per-run and --ray-max-retries >= 0", file=sys.stderr)
        return 2
    plan = compare_plan.make_plan(cmp, methods)
    if args.dry_run:
        if cmp.flops:
            compare_plan.add_flops(plan)
        print(compare_plan.format_plan(plan, device=cmp.base.train.device))
        return 0
    _log.info(f"plan: {len(plan.runs)} runs to train, {plan.total} in all"
              + (f" (+ the runs known after {', '.join(sorted({k for _, k in plan.stages}))})" if plan.stages else ""))
    if args.executor == "ray":
        opts = compare_plan.RayOptions(args.ray_address, args.ray_cpus_per_run, args.ray_gpus_per_run,
                                       args.ray_max_retries, args.ray_num_cpus)
        compare_plan.run_on_ray(cmp, methods, opts)
        plan = compare_plan.make_plan(cmp, methods)
    cmp.total = plan.total
    cmp.eta = compare_plan.ProgressETA(plan)      # the progress lines' "ETA …" once a step time is known
    return None


def parse_methods(text: str) -> list[str]:
    """--methods → the baselines' names (aliases resolved, duplicates dropped), in table order:
    grouping methods, augmentations, combinations (the order given within each)."""
    methods = []
    for m in (x.strip() for x in text.split(",") if x.strip()):
        m = baselines.aliases().get(m, m)
        if m not in known_methods():
            raise ConfigError(f"--methods: unknown method {m!r}; known: {', '.join(known_methods())}")
        if m not in methods:
            methods.append(m)
    return sorted(methods, key=method_order)          # stable


def _check_args(args) -> None:
    from .methods import AUGMENTATIONS
    if args.aggregator is not None and args.aggregator not in AUGMENTATIONS:
        raise ConfigError(f"--aggregator: unknown training augmentation {args.aggregator!r}; known: "
                          f"{', '.join(AUGMENTATIONS)}")
    if args.seeds < 1 or args.rg_partitions < 1:
        raise ConfigError("--seeds and --rg-partitions must be >= 1")


def _comparison(args) -> tuple[Comparison, list[int]]:
    """The recipe with --data-root and --set applied, the K values → the Comparison (data source built)."""
    if args.recipe is None:
        from .cli import default_recipe
        args.recipe = default_recipe(args.data_root)
    over = ([f"data.root={args.data_root}"] if args.data_root else []) + list(args.overrides)
    base = apply_overrides(get_recipe(args.recipe), over)
    naive_cfg = apply_overrides(get_recipe(args.naive_recipe), over) if args.naive_recipe else None
    ks = [int(x) for x in args.k.split(",")] if args.k else [base.num_branches]
    if ks == [None]:
        raise ConfigError("--k: the recipe's K depends on the data's number of tasks, which is unknown; give --k")
    if any(k < 1 for k in ks):
        raise ConfigError("--k: every K must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmp = Comparison(base, out, ks, seeds=args.rg_partitions, train_seeds=args.seeds, overlap=args.overlap,
                     rsa_images=args.rsa_images, naive_cfg=naive_cfg, progress=progress_flag(args),
                     flops=not args.no_flops, aggregator=args.aggregator)
    return cmp, ks


def _write_outputs(cmp: Comparison, args, methods: list[str], ks: list[int], rows: list[Row]) -> None:
    """The tables (compare_tables.write_tables) and comparison.json; prints the Markdown."""
    from .checkpoint import atomic_write_json
    from .config import RECIPE_FOLLOWS
    from .report import round_floats
    out = cmp.out
    naive = cmp.reference()
    paper = RECIPE_FOLLOWS.get(args.recipe) in ("paper", "reference")       # the paper's datasets and recipes
    tables = build_tables(rows, cmp.names, naive, paper=paper)
    written = write_tables(out, tables, rows, cmp.names, naive, title=f"Comparison: {args.recipe}, K ∈ {ks}")
    atomic_write_json(out / "comparison.json", round_floats({"recipe": args.recipe, "ks": ks, "methods": methods,
                                                 "aggregator": args.aggregator,
                                                 "tasks": cmp.names, "seeds": args.seeds,
                                                 "rg_partitions": args.rg_partitions, "overlap": args.overlap,
                                                 "rows": tables["rows"], "details": cmp.details}))
    print()
    print(tables["markdown"])
    print(f"tables: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'groupings.csv'}, "
          + ", ".join(str(p) for p in written))


def _compare(args) -> int:
    """Plan, train, write the tables → the exit code; a user's mistake raises ConfigError/ValueError."""
    methods = parse_methods(args.methods)
    _check_args(args)
    cmp, ks = _comparison(args)
    _log.info(f"comparison of {', '.join(methods)} on {args.recipe} ({cmp.n} tasks), K ∈ {ks}, in {cmp.out}")
    code = execute(cmp, methods, args)        # the plan; --dry-run prints it; --executor ray trains the runs
    if code is not None:
        return code
    rows, failed = cmp.run_methods(methods)
    _write_outputs(cmp, args, methods, ks, rows)
    return 1 if failed else 0


def compare_main(argv: list[str]) -> int:
    from .checkpoint import WriteFailed
    from .train import RunStopped, TrainingInterrupted, exit_code
    try:
        parser = _parser()                    # lists the baselines: a broken baseline file stops here
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.stability:
        from .seeds import stability_main
        return stability_main(args.stability, args.out)
    try:
        return _compare(args)
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"\n{e}\ninterrupted: re-run the same command to continue the comparison"
              if isinstance(e, TrainingInterrupted) else f"error: {e}", file=sys.stderr)
        return exit_code(e)
