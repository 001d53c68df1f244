"""Command line: a thin layer over the library.

    fastdmtg train [--recipe NAME] [--data-root PATH] [--method dmtg|naive-mtl] [--set key=value ...]
                   [--out RUN_DIR] [--init-from RUN] [--reference RUN_OR_RESULTS] [--resume RUN_DIR]
    fastdmtg eval RUN_DIR [--split test] [--data-root PATH]
    fastdmtg recipes
    fastdmtg prepare taskonomy ROOT OUT [...]
    fastdmtg compare ... | fastdmtg bench flops|step ... | fastdmtg profile ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import RECIPE_FOLLOWS, RECIPES, Config, ConfigError, apply_overrides, get_recipe

NAIVE_OF = {"taskonomy5_k3": "taskonomy5_naive", "taskonomy5_k4": "taskonomy5_naive",
            "taskonomy5_k5": "taskonomy5_naive", "taskonomy5_vit_k3": "taskonomy5_vit_naive",
            "synthetic_k3": "synthetic_naive", "celeba9_k2": "celeba9_naive", "celeba9_k3": "celeba9_naive",
            "celeba9_k4": "celeba9_naive", "celeba9_k5": "celeba9_naive", "celeba40_k5": "celeba40_naive"}
NAIVE_OF.update({f"{k}_reference": f"{v}_reference" for k, v in NAIVE_OF.items() if f"{v}_reference" in RECIPES})


def _train_parser(sub):
    p = sub.add_parser("train", help="train a grouping run (default: DMTG on the embedded synthetic data)")
    p.add_argument("--recipe", help=f"named recipe ({', '.join(sorted(RECIPES))}); default synthetic_k3, "
                                    "or celeba9_k3 when --data-root is given")
    p.add_argument("--data-root", help="dataset folder in its official layout (CelebA: img_align_celeba/ ...)")
    p.add_argument("--method", choices=["dmtg", "naive-mtl"], help="grouping method (naive-mtl: K=1 reference)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", help="run folder (default runs/<name>-<time>)")
    p.add_argument("--init-from", help="naive-MTL run folder or checkpoint to copy into all K branches")
    p.add_argument("--reference", help="naive-MTL run folder or results.json for NormGain")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def build_config(args) -> Config:
    recipe = args.recipe or ("celeba9_k3" if args.data_root else "synthetic_k3")
    if args.method == "naive-mtl" and recipe in NAIVE_OF:
        recipe = NAIVE_OF[recipe]
    cfg = get_recipe(recipe)
    over = list(args.overrides)
    if args.data_root:
        over.insert(0, f"data.root={args.data_root}")
    if args.method:
        over.insert(0, f"grouping.method={args.method}")
    if args.init_from:
        over.append(f"train.init_from={args.init_from}")
    if args.reference:
        over.append(f"train.reference={args.reference}")
    return apply_overrides(cfg, over)


def cmd_train(args) -> int:
    from .train import NonFiniteLoss, TrainingInterrupted, exit_code, train
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").exists():
            print(f"error: {run_dir}/config.json not found: not a fastdmtg run folder", file=sys.stderr)
            return 2
        cfg = apply_overrides(Config.load(run_dir / "config.json"), args.overrides)
        resume = True
    else:
        cfg = build_config(args)
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        resume = False
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    import os
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"run folder: {run_dir}", flush=True)
    try:
        res = train(cfg, run_dir, resume=resume, progress=False if args.quiet else None)
    except (TrainingInterrupted, NonFiniteLoss) as e:
        print(f"\n{e}" if isinstance(e, TrainingInterrupted) else f"error: {e}", file=sys.stderr)
        return exit_code(e)
    if res:  # only rank 0 has results under torchrun
        print(format_results(res))
        print(f"results: {run_dir / 'results.json'}")
    return 0


def format_results(res: dict) -> str:
    lines = [f"method {res['method']}, K={res['num_branches']}, best epoch {res['best_epoch'] + 1}"]
    for i, g in enumerate(res["groups"]):
        lines.append(f"  group {i + 1}: {', '.join(g)}")
    t = res["test"]
    lines.append(f"test total loss {t['total_loss']:.4f}" +
                 (f", total error {t['total_error']:.2f}" if t.get("total_error") is not None else ""))
    for key in ("normgain_loss", "normgain_error"):
        if key in res:
            lines.append(f"{key}: {res[key]['value']:+.2f}%")
    lines.append(f"train time {res['train_time_s']:.1f} s on {res['env']['device']}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .checkpoint import atomic_write_json
    from .data import build_data
    from .export import load_grouped
    from .train import evaluate, resolve_device
    run_dir = Path(args.run_dir)
    device = resolve_device(args.device)
    model, meta = load_grouped(run_dir, device)
    cfg = Config.from_dict(meta["config"])
    if args.data_root:
        cfg = apply_overrides(cfg, [f"data.root={args.data_root}"])
    data = build_data(cfg.data, progress=not args.quiet)
    if data.taskset.names != meta["tasks"]:
        print(f"error: the dataset's tasks {data.taskset.names} differ from the model's {meta['tasks']}",
              file=sys.stderr)
        return 2
    res = evaluate(model, data.taskset, data, args.split, cfg.train.eval_batch_size, device, progress=not args.quiet)
    res["split"], res["groups"] = args.split, [[meta["tasks"][i] for i in g] for g in meta["groups"]]
    atomic_write_json(run_dir / f"eval_{args.split}.json", res)
    print(json.dumps({k: res[k] for k in ("split", "total_loss", "total_error", "loss", "error") if k in res},
                     indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("compare", "bench", "profile"):
        # these parse their own options (argparse's REMAINDER cannot pass a leading --option through)
        import importlib
        mod = importlib.import_module(f"fastdmtg.{'compare' if argv[0] == 'compare' else 'bench'}")
        try:
            return getattr(mod, f"{argv[0]}_main")(argv[1:])
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    ap = argparse.ArgumentParser(prog="fastdmtg", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    pe = sub.add_parser("eval", help="evaluate the pruned grouped model of a run on a split")
    pe.add_argument("run_dir")
    pe.add_argument("--split", default="test", choices=["train", "val", "test"])
    pe.add_argument("--data-root", help="dataset folder, if it moved since training")
    pe.add_argument("--device", default="auto")
    pe.add_argument("--quiet", action="store_true")
    sub.add_parser("recipes", help="list the named recipes")
    for name, mod, hlp in (("compare", "compare", "run a set of grouping methods and write comparison tables"),
                           ("bench", "bench", "benchmarks: flops | step"),
                           ("profile", "bench", "torch.profiler trace of steady-state training steps")):
        sp = sub.add_parser(name, help=hlp, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(module=mod)
    pp = sub.add_parser("prepare", help="convert a dataset to the fast on-disk format")
    pp.add_argument("dataset", choices=["taskonomy", "celeba"],
                    help="taskonomy ROOT OUT: fast .npy format; add --format ffcv for .beton files (celeba or taskonomy)")
    pp.add_argument("rest", nargs=argparse.REMAINDER, help="ROOT OUT [options]")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            return cmd_train(args)
        if args.cmd == "eval":
            return cmd_eval(args)
        if args.cmd == "recipes":
            print(f"{'recipe':30s} {'follows':9s} {'dataset':10s} {'tasks':10s} {'arch':14s} {'K':>2s}  "
                  f"{'method':9s} epochs")
            for name in sorted(RECIPES):
                c = RECIPES[name]()
                tasks = c.data.tasks if isinstance(c.data.tasks, str) else f"{len(c.data.tasks)} tasks"
                print(f"{name:30s} {RECIPE_FOLLOWS.get(name, 'ours'):9s} {c.data.dataset:10s} {tasks:10s} "
                      f"{c.model.arch:14s} {c.model.branches:2d}  {c.grouping.method:9s} {c.train.epochs}")
            print("follows: paper = the paper where explicit, else the released code (docs/fidelity.md); "
                  "reference = the released code as it is; ours = fastdmtg's demo/test data")
            return 0
        if args.cmd in ("compare", "bench", "profile"):
            import importlib
            mod = importlib.import_module(f"fastdmtg.{args.module}")
            return getattr(mod, f"{args.cmd}_main")(args.rest)
        if args.cmd == "prepare":
            if "--format" in args.rest:
                i = args.rest.index("--format")
                fmt = args.rest[i + 1] if i + 1 < len(args.rest) else ""
                if fmt != "ffcv":
                    print(f"error: --format: expected ffcv, got {fmt!r}", file=sys.stderr)
                    return 2
                from .pipelines import prepare_ffcv_main
                return prepare_ffcv_main([args.dataset] + args.rest)
            if args.dataset != "taskonomy":
                print("error: `prepare celeba` only makes FFCV files (--format ffcv); the default CelebA "
                      "cache is built automatically on first use", file=sys.stderr)
                return 2
            from .data import taskonomy
            return taskonomy.prepare_main(args.rest)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
