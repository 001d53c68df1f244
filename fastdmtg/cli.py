"""Command line: a thin layer over the library.

    fastdmtg train [--recipe NAME] [--data-root PATH] [--method dmtg|naive-mtl|uw|gradnorm|pcgrad|…] [--set key=value ...]
                   [--out RUN_DIR] [--init-from RUN] [--reference RUN_OR_RESULTS] [--resume RUN_DIR]
    fastdmtg eval RUN_DIR [--split test] [--data-root PATH]
    fastdmtg recipes
    fastdmtg prepare taskonomy ROOT OUT [...]
    fastdmtg data verify PATH [...]
    fastdmtg compare ... | fastdmtg bench flops|step|kernels-aot|roofline ... | fastdmtg profile ...
    fastdmtg predict RUN_DIR IMAGE... [--out preds.csv]
    fastdmtg export RUN_DIR --format onnx|torchscript [--out FILE]
    fastdmtg --version
    train/eval/compare/bench/profile: --progress/--no-progress, --quiet, --log-level (fastdmtg/log.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import NAIVE_OF, RECIPE_FOLLOWS, RECIPES, Config, ConfigError, apply_overrides, get_recipe
from .log import add_output_flags, get_logger, progress_flag
from .log import setup as setup_logging

log = get_logger("fastdmtg.cli")


def _train_parser(sub):
    p = sub.add_parser("train", help="train a grouping run (default: DMTG on the embedded synthetic data)")
    p.add_argument("--recipe", help=f"named recipe ({', '.join(sorted(RECIPES))}); default synthetic_k3, or "
                                    "with --data-root the dataset found there: folder_k3 (labels.csv), celeba9_k3, "
                                    "taskonomy5_k3")
    p.add_argument("--data-root", help="dataset folder in its official layout (CelebA: img_align_celeba/ ...), or "
                                       "your own DIR/labels.csv (README: Your own tasks)")
    from .methods import AUGMENTATIONS
    p.add_argument("--method", choices=["dmtg", "naive-mtl", "naive", *AUGMENTATIONS],
                   help="grouping method (naive-mtl, or naive as compare calls it: the K=1 reference; the recipe's "
                        "naive twin when it has one; uw, gradnorm, pcgrad, mgda, …: one shared network trained with "
                        "that augmentation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", help="run folder (default runs/<name>-<time>)")
    p.add_argument("--init-from", help="naive-MTL run folder or checkpoint to copy into all K branches")
    p.add_argument("--reference", help="naive-MTL run folder or results.json for NormGain")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    p.add_argument("--logger", action="append", default=[], metavar="NAME",
                   help="also log to this tracker next to TensorBoard: mlflow | wandb (repeatable or "
                        "comma-separated; train.logger; docs/trackers.md)")
    p.add_argument("--accept-data-change", action="store_true",
                   help="--resume on a dataset that changed since the run recorded it (labels, image list, "
                        "annotation files): go on with the new data and record the change in results.json")
    p.add_argument("--config", metavar="FILE", help="a JSON (or YAML) file with a full or partial config, laid "
                                                    "over the recipe; --data-root/--method/--set apply on top")
    add_output_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the config with every auto switch resolved for this machine, and exit")
    p.add_argument("--save-config", metavar="FILE", help="write that resolved config to FILE (a starting point "
                                                         "for --config)")


def _flag_overrides(args) -> list[str]:
    """--data-root / --method / --init-from / --reference and --set, as overrides (in that order)."""
    over = list(args.overrides)
    if args.data_root:
        over.insert(0, f"data.root={args.data_root}")
    if args.method:
        over.insert(0, f"grouping.method={args.method}")
    if args.init_from:
        over.append(f"train.init_from={args.init_from}")
    if args.reference:
        over.append(f"train.reference={args.reference}")
    if getattr(args, "logger", None):
        over.append(f"train.logger={','.join(args.logger)}")
    return over


def default_recipe(data_root: str | None) -> str:
    """The recipe of `train`/`compare` without --recipe: the embedded synthetic set, or the recipe of
    the dataset format that recognises --data-root (an error saying what was looked for when none does)."""
    if not data_root:
        return "synthetic_k3"
    from .data import detect_format
    return detect_format(data_root).recipe


def build_config(args) -> Config:
    recipe = args.recipe or default_recipe(args.data_root)
    from .methods import AUGMENTATIONS
    if (args.method in ("naive-mtl", "naive") or args.method in AUGMENTATIONS) and recipe in NAIVE_OF:   # one shared network
        recipe = NAIVE_OF[recipe]
    return apply_overrides(_with_file(get_recipe(recipe), args), _flag_overrides(args))


def _with_file(cfg: Config, args) -> Config:
    """--config FILE laid over ``cfg``."""
    if not getattr(args, "config", None):
        return cfg
    from .configfile import merge_config, read_config_file
    return merge_config(cfg, read_config_file(args.config), args.config)


def resume_config(args) -> Config:
    """The config a `train --resume RUN ...` command line asks for: RUN/config.json (or, with
    --recipe, that recipe) with the flags and --set applied. The trainer compares it with the config
    stored in the run's last.pt: resume-safe changes are applied, any other one is refused."""
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder (--resume)")
    if args.out and Path(args.out).resolve() != run_dir.resolve():
        raise ConfigError(f"--out {args.out}: a resumed run stays in its folder ({run_dir}); drop --out, or "
                          "start a new run with --out alone")
    if args.recipe:
        return build_config(args)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}/config.json not found: not a fastdmtg run folder")
    return apply_overrides(_with_file(Config.load(run_dir / "config.json"), args), _flag_overrides(args))


def _resolved_config(args, cfg: Config) -> bool:
    """--save-config FILE / --dry-run: the config with every auto switch resolved for this machine,
    written to FILE / printed. True when the command ends here (--dry-run)."""
    from .builder import resolve
    resolved, auto = resolve(cfg).as_config()         # the builder's own resolver: the run's values
    if args.save_config:
        from .checkpoint import atomic_write_json
        atomic_write_json(args.save_config, resolved.to_dict())
        print(f"config written to {args.save_config} (start from it with --config {args.save_config})",
              file=sys.stderr)          # stderr: stdout holds only the JSON of --dry-run
    if not args.dry_run:
        return False
    from .train import best_rule_text
    print(json.dumps(resolved.to_dict(), indent=2))
    print(best_rule_text(resolved), file=sys.stderr)
    if auto:
        print(f"auto resolved for this machine: {', '.join(auto)}", file=sys.stderr)
    return True


def cmd_train(args) -> int:
    import os
    if args.method == "naive":              # compare's name for it; naive-mtl is the config's (and the output's)
        args.method = "naive-mtl"
    main_rank = os.environ.get("RANK", "0") == "0"
    if args.resume:
        run_dir = Path(args.resume)
        cfg = resume_config(args)
        resume = True
    else:
        cfg = build_config(args)
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        resume = False
    if (args.dry_run or args.save_config) and _resolved_config(args, cfg):
        return 0
    if main_rank:
        log.info(f"run folder: {run_dir}")
    from .checkpoint import WriteFailed, has_checkpoint
    from .distributed import cleanup
    from .train import Diverged, RunStopped, TrainingInterrupted, exit_code, train
    try:
        res = _train_in_process_group(train, cleanup, cfg, run_dir, resume, progress=progress_flag(args),
                                      accept_data_change=args.accept_data_change)
    except KeyboardInterrupt:      # Ctrl-C outside the training loop (start-up, final evaluation)
        if main_rank:
            then = (f"continue with: fastdmtg train --resume {run_dir}" if has_checkpoint(run_dir)
                    else "no checkpoint was written")
            print(f"\ninterrupted; {then}", file=sys.stderr)
        return 130
    except WriteFailed as e:       # before training started (config.json, the lock file)
        print(f"error: {e}", file=sys.stderr)
        return 5
    except RunStopped as e:
        if isinstance(e, Diverged) and e.results:
            print(format_results(e.results))
        if main_rank:
            print(f"\n{e}" if isinstance(e, TrainingInterrupted) else f"error: {e}", file=sys.stderr)
        return exit_code(e)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        if main_rank:             # under torchrun every rank stops with the same message: say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    if res:  # only rank 0 has results under torchrun
        print(format_results(res))
        print(f"results: {run_dir / 'results.json'}")
    return 0


def _train_in_process_group(train, cleanup, *args, **kw) -> dict:
    """train(); then leave the DDP process group (if torchrun started one) however it ended: a rank
    that exits with the group alive may abort in gloo's teardown ("terminate called without an
    active exception", exit -6) instead of returning its status."""
    try:
        return train(*args, **kw)
    finally:
        cleanup()


def format_results(res: dict) -> str:
    from .report import format_results as fmt
    return fmt(res)


def cmd_eval(args) -> int:
    from .checkpoint import atomic_write_json, has_checkpoint
    from .export import load_grouped
    from .pipelines import build_source
    from .log import bars_on
    from .builder import resolve_device
    from .train import evaluate
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not (run_dir / "grouped_model.json").exists() and has_checkpoint(run_dir):
        raise FileNotFoundError(f"{run_dir}: the run has not finished (no grouped_model.json yet); "
                                f"continue it with: fastdmtg train --resume {run_dir}")
    device = resolve_device(args.device)
    model, meta = load_grouped(run_dir, device)
    cfg = Config.from_dict(meta["config"])
    if args.data_root:
        cfg = apply_overrides(cfg, [f"data.root={args.data_root}"])
    bars = bars_on(progress_flag(args))
    data = build_source(cfg.data, progress=bars)
    if data.taskset.names != meta["tasks"]:
        print(f"error: the dataset's tasks {data.taskset.names} differ from the model's {meta['tasks']}",
              file=sys.stderr)
        return 2
    data_changes = _check_eval_data(run_dir, data, args)
    res = evaluate(model, data.taskset, data, args.split, cfg.train.eval_batch_size, device, progress=bars)
    res["split"], res["groups"] = args.split, [[meta["tasks"][i] for i in g] for g in meta["groups"]]
    if data_changes:
        res["data_changes"] = [{"part": k, "old": o, "new": n} for k, o, n in data_changes]
    from .report import round_floats
    atomic_write_json(run_dir / f"eval_{args.split}.json", round_floats(res))
    log.info(f"per-task metrics written to {run_dir / f'eval_{args.split}.json'}")
    from .report import format_eval
    print(format_eval(res, meta["tasks"]))
    return 0


def _check_eval_data(run_dir: Path, data, args) -> list:
    """The data against the fingerprint in RUN/results.json (fastdmtg.fingerprint): DataChanged (exit 2)
    naming the changed parts, or with --accept-data-change the changes (recorded in eval_<split>.json)."""
    from . import fingerprint
    from .checkpoint import read_json
    rp = run_dir / "results.json"
    old = read_json(rp).get("data_fingerprint") if rp.exists() else None
    return fingerprint.check(old, fingerprint.data_fingerprint(data), str(run_dir), args.accept_data_change,
                             f"fastdmtg eval {run_dir}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:      # Ctrl-C at any moment (imports, start-up): no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130


#: the commands that parse their own options (argparse's REMAINDER cannot pass a leading --option
#: through): command → (module, its main, help)
OWN_PARSERS = {
    "compare": ("compare", "compare_main", "run a set of grouping methods and write comparison tables"),
    "bench": ("bench", "bench_main", "benchmarks: flops | step | kernels-aot | roofline"),
    "profile": ("bench", "profile_main", "torch.profiler trace of steady-state training steps"),
    "predict": ("export", "predict_main", "predict every task for your own images: predict RUN_DIR IMAGE... "
                "[--out preds.csv]"),
    "export": ("export", "export_main", "the grouped model with its post-processing as ONNX or TorchScript: "
               "export RUN_DIR --format onnx|torchscript"),
}


def _run_own_parser(cmd: str, rest: list[str]) -> int:
    import importlib
    module, fn, _ = OWN_PARSERS[cmd]
    return getattr(importlib.import_module(f"fastdmtg.{module}"), fn)(rest)


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__
    ap = argparse.ArgumentParser(prog="fastdmtg", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"fastdmtg {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    pe = sub.add_parser("eval", help="evaluate the pruned grouped model of a run on a split; prints the totals and "
                                     "writes RUN_DIR/eval_<split>.json (per-task metrics)")
    pe.add_argument("run_dir")
    pe.add_argument("--split", default="test", choices=["train", "val", "test"])
    pe.add_argument("--data-root", help="dataset folder, if it moved since training")
    pe.add_argument("--device", default="auto")
    pe.add_argument("--accept-data-change", action="store_true",
                    help="evaluate on a dataset that changed since the run recorded it (recorded in "
                         "eval_<split>.json)")
    add_output_flags(pe)
    sub.add_parser("recipes", help="list the named recipes")
    for name, (_, _, hlp) in OWN_PARSERS.items():
        sp = sub.add_parser(name, help=hlp, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    pd = sub.add_parser("data", help="data verify PATH...: check the checksums of prepared folders, decode caches "
                                     "and .beton files (exit 1 when something is damaged)")
    pd.add_argument("rest", nargs=argparse.REMAINDER, help="verify PATH...")
    pp = sub.add_parser("prepare", help="convert a dataset to the fast on-disk format")
    pp.add_argument("dataset", help="a dataset format (taskonomy ROOT OUT: its fast .npy format; add --format ffcv "
                                    "for .beton files of any format with files: celeba, taskonomy, folder)")
    pp.add_argument("rest", nargs=argparse.REMAINDER, help="ROOT OUT [options]")
    return ap


def cmd_recipes(args) -> int:
    print(f"{'recipe':33s} {'follows':9s} {'dataset':10s} {'tasks':10s} {'arch':14s} {'K':>2s}  "
          f"{'method':9s} epochs")
    for name in sorted(RECIPES):
        c = get_recipe(name)
        tasks = c.data.tasks if isinstance(c.data.tasks, str) else f"{len(c.data.tasks)} tasks"
        print(f"{name:33s} {RECIPE_FOLLOWS.get(name, 'ours'):9s} {c.data.dataset:10s} {tasks:10s} "
              f"{c.model.arch:14s} {c.num_branches or 'auto':>2}  {c.grouping.method:9s} {c.train.epochs}")
    print("follows: paper = the paper where explicit, else the released code (docs/fidelity.md); "
          "reference = the released code as it is; ours = fastdmtg's demo/test data")
    return 0


def cmd_data(args) -> int:
    if args.rest[:1] != ["verify"]:
        print("usage: fastdmtg data verify PATH [PATH ...]", file=sys.stderr)
        return 2
    from .pipelines.cache import verify_main
    return verify_main(args.rest[1:])


def cmd_prepare(args) -> int:
    """`prepare NAME ROOT OUT`: the format's own prepared form (its ``prepare``); with --format ffcv the
    .beton files (fastdmtg.pipelines), for any format."""
    if "--format" in args.rest:
        i = args.rest.index("--format")
        fmt = args.rest[i + 1] if i + 1 < len(args.rest) else ""
        if fmt != "ffcv":
            print(f"error: --format: expected ffcv, got {fmt!r}", file=sys.stderr)
            return 2
        return prepare_ffcv_main([args.dataset] + args.rest)
    from .data import get_format
    prepare = get_format(args.dataset).prepare
    if prepare is None:
        print(f"error: `prepare {args.dataset}` only makes FFCV files (--format ffcv); its default "
              "decode cache is built automatically on first use", file=sys.stderr)
        return 2
    return prepare(args.rest)


def prepare_ffcv_main(argv: list[str] | None = None) -> int:
    """``fastdmtg prepare --format ffcv DATASET ROOT [OUT] [options]``: write the .beton files of
    every split (decoding first when needed). ``--format ffcv`` may be passed through or left out.
    Returns the exit status (2 on a data or argument error)."""
    from .data import FORMATS, get_format
    ap = argparse.ArgumentParser(prog="fastdmtg prepare --format ffcv",
                                 description="Write FFCV .beton files of a dataset (for data.backend=ffcv).")
    ap.add_argument("--format", choices=("ffcv",), default="ffcv", help=argparse.SUPPRESS)
    # the formats with a folder to read (the others are generated or handed in as arrays)
    ap.add_argument("dataset", choices=tuple(f.name for f in FORMATS.declarations() if f.detect is not None))
    ap.add_argument("root", help="dataset root (CelebA official layout; Taskonomy raw root or prepared folder)")
    ap.add_argument("out", nargs="?", default=None,
                    help="folder for the .beton files (default: CACHE_DIR/ffcv, where data.backend=ffcv looks)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="default: the format's (DatasetFormat.image_size: 64; taskonomy 256)")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--image-mode", choices=("raw", "jpg"), default="raw")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--splits", default="train,val,test")
    ap.add_argument("--split-file", default="", help="taskonomy: custom split JSON")
    ap.add_argument("--seg-resize", choices=("nearest", "bilinear"), default="nearest")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from .config import DataConfig
    from .data import open_dataset
    from .pipelines import DecodeCache, PipelineError, default_cache_dir
    from .pipelines.ffcv_source import ensure_beton
    size = a.image_size or get_format(a.dataset).image_size
    try:
        cfg = DataConfig(dataset=a.dataset, root=a.root, tasks=a.tasks, image_size=size, cache_dir=a.cache_dir,
                         taskonomy_split_file=a.split_file, taskonomy_seg_resize=a.seg_resize)
        ds = open_dataset(cfg, progress=not a.no_progress)
        base = default_cache_dir(cfg.cache_dir, ds)
        cache = DecodeCache(ds, base, workers=a.workers, progress=not a.no_progress)
        for s in [x for x in a.splits.split(",") if x]:
            p = ensure_beton(ds, s, cache, Path(a.out) if a.out else base / "ffcv", image_mode=a.image_mode,
                             jpeg_quality=a.jpeg_quality, num_workers=a.workers, progress=not a.no_progress)
            print(p)
    except (ValueError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "recipes": cmd_recipes, "data": cmd_data, "prepare": cmd_prepare}


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OWN_PARSERS:
        try:
            return _run_own_parser(argv[0], argv[1:])
        except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = _parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", None))
    try:
        if args.cmd in OWN_PARSERS:
            return _run_own_parser(args.cmd, args.rest)
        return _COMMANDS[args.cmd](args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
