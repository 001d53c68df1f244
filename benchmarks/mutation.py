"""Mutation testing of the modules that hold the math (cosmic-ray; not part of CI).

    pip install cosmic-ray                                  # 8.7.0 was used (docs/testing.md)
    python benchmarks/mutation.py                           # every target below
    python benchmarks/mutation.py metrics plan              # some targets (names below)
    python benchmarks/mutation.py --list                    # targets, files, line ranges, tests

Each target is one module (optionally only some of its functions: the PyTorch ``reference`` of each
fused op) and the few fast test files that guard it — the whole suite is far too slow per mutant.
The repository is copied to a scratch folder first (``--work``, default ``runs/mutation``, git-
ignored) and mutated there, so the checkout is never touched; the copy imports as ``fastdmtg``
ahead of an editable install (``PYTHONPATH``; ``fastdmtg/kernels`` and ``fastdmtg/pipelines`` are
links to the copy's ``kernels/`` and ``pipelines/``). Per target: ``cosmic-ray init``, the filters
(operator set, line ranges), a baseline run of the tests on the unmutated copy (must pass), then
``cosmic-ray exec`` (one mutant at a time, a per-mutant time limit of ``--timeout-factor`` × the
baseline). Results: ``benchmarks/results/mutation_<date>.json`` (score per module and every
surviving mutant's diff) and a markdown summary printed at the end.

Operators (the filter in ``EXCLUDE``): every cosmic-ray core operator except mutations *to* the bit
operators, ``//``, ``%`` and ``@``, *to* ``~``/unary ``+``, comparisons swapped between the
``==``/``<`` family and ``is``/``in`` (they mostly raise TypeError: incompetent, not informative),
and the variable inserter/replacer (random variable swaps). Arithmetic swaps among + − × ÷ **,
all comparison swaps within a family, boolean/constant/number/unary/loop/decorator/exception
mutations are kept.

Run it at low priority on a shared machine: ``nice -n 10 python benchmarks/mutation.py``.
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

KERNEL_REF = ("reference",)

#: the fast tests of tests/test_pruning.py (no training runs)
PRUNING_UNIT = ["test_rule_drops_after_patience_and_resets_when_probability_rises",
                "test_probabilities_renormalise_over_active_heads", "test_rule_never_drops_the_last_head_of_a_task",
                "test_branch_dropped_once_no_task_can_choose_it", "test_config_validation",
                "test_dropped_heads_get_no_compute_and_no_gradient",
                "test_weights_restricted_to_active_heads_and_dropped_logits_frozen",
                "test_step_runner_invalidate_and_stacked_layout", "test_training_flops_accounting"]

def _aggr(*tests: str) -> list[str]:
    """Node ids of tests/test_aggregators.py (a name without ``[…]`` runs all its parametrisations)."""
    return [f"tests/test_aggregators.py::{t}" for t in tests]


#: the PCGrad projection by hand (torchjd's PCGrad through the augmentation)
PCGRAD = ("test_pcgrad_projects_conflicting_gradients_by_hand", "test_pcgrad_leaves_non_conflicting_gradients_alone")

#: the planner's tests of tests/test_compare_plan_unit.py (node ids: a -k word matches file names too)
PLAN_UNIT = ["test_plan_runs_dependencies_and_stages", "test_identical_configs_are_planned_once",
             "test_a_method_that_reads_a_planned_runs_files_waits_for_the_first_of_them",
             "test_stages_are_listed_once", "test_every_string_of_a_config_is_a_possible_dependency",
             "test_plan_after_runs_finished_reuses_them_and_measures_the_eta",
             "test_rate_of_the_finished_runs", "test_pending_result_knows_its_folder_and_nothing_else",
             "test_plan_total_and_eta", "test_format_plan_by_hand", "test_add_flops_counts_each_distinct_model_once",
             "test_add_flops_without_the_counter_leaves_the_plan_alone", "test_annotations_resolve"]
#: … and the Ray executor's (a stand-in ray module)
RAY_UNIT = ["test_ray_waves_dependencies_and_failures", "test_ray_on_a_running_cluster_is_left_running",
            "test_ray_address_and_start_errors", "test_ray_interrupted_is_a_training_interruption_and_shuts_down",
            "test_train_task_sets_the_threads_and_resumes_from_a_checkpoint",
            "test_ray_available_follows_the_import_system"]

#: name → (module file, top-level functions or classes to mutate (None = the whole module), pytest arguments)
TARGETS: dict[str, tuple[str, tuple[str, ...] | None, list[str]]] = {
    "metrics": ("fastdmtg/metrics.py", None, ["tests/test_metrics.py", "tests/test_bug_guards.py", "-k",
                                              "normgain or summarize or attribute or evaluate"]),
    "plan": ("pipelines/plan.py", None, ["tests/test_plan.py"]),
    # node ids, not -k: a -k word also matches the file name ("run" is in "test_pruning")
    "dmtg": ("fastdmtg/methods/dmtg.py", None,
             ["tests/test_grouping.py", *[f"tests/test_pruning.py::{t}" for t in PRUNING_UNIT],
              "tests/test_bug_guards.py::test_trainer_applies_the_tau_schedule_each_epoch"]),
    "pruning": ("fastdmtg/methods/dmtg_pruning.py", None,
                [f"tests/test_pruning.py::{t}"
                 for t in [*PRUNING_UNIT, "test_rule_on_hand_states", "test_per_part_flops_by_hand"]]),
    "attributes": ("fastdmtg/tasks/attributes.py", None, ["tests/test_grouping.py", "tests/test_metrics.py"]),
    # the top-level functions only (mIoU, rotate loss): the whole module is ~600 mutants, the meter ~330
    "taskonomy_tasks": ("fastdmtg/tasks/taskonomy.py", ("miou_from_confusion", "rotate_l1"),
                        ["tests/test_bug_guards.py", "tests/test_taskonomy.py", "-k",
                         "miou or loss or metric or meter"]),
    # the task set (losses, heads) and the meter (metrics), against the fast tests that call them
    "taskonomy_taskset": ("fastdmtg/tasks/taskonomy.py", ("TaskonomyTaskSet", "TaskonomyMeter"),
                          ["tests/test_bug_guards.py::test_miou_ignores_class_zero",
                           *[f"tests/test_fidelity.py::{t}" for t in
                             ["test_meter_reports_the_chosen_miou", "test_taskset_from_config_reads_the_switches"]],
                           *[f"tests/test_taskonomy.py::{t}" for t in
                             ["test_head_losses_match_definitions", "test_rotate_loss_is_min_over_nine_shifts",
                              "test_metrics_hand_computed", "test_meter_accumulates_over_the_set_not_per_batch",
                              "test_annotations_resolve",
                              # written from the survivors of the first run
                              "test_taskset_rejects_bad_arguments_and_reads_a_bare_config",
                              "test_head_losses_of_a_pruned_layout_and_the_rotate_total",
                              "test_meter_without_mask_by_hand", "test_meter_with_nothing_or_one_pixel_valid",
                              "test_meter_keypoint_threshold_and_rotate_loss_without_autograd",
                              "test_meter_normal_angles_at_the_edges",
                              "test_taskset_and_meter_annotations_resolve"]]]),
    # your own tasks: declarations, losses, predictions, metrics
    # the fast unit tests of the task set, the meter and the declarations (no training runs; ~2 s)
    "generic_tasks": ("fastdmtg/tasks/generic.py", None,
                      [f"tests/test_folder_dataset.py::{t}" for t in (
                          "test_inferred_types_and_targets", "test_numeric_binary_and_inference_rules",
                          "test_tasks_json_declares_and_config_wins", "test_head_losses_mask_missing_and_weight",
                          "test_head_losses_pruned_layout", "test_meter_metrics_by_type",
                          "test_normgain_error_over_tasks_with_an_error", "test_errors_name_file_line_column",
                          "test_tasks_json_class_names_and_binary_labels",
                          "test_folder_tasks_in_the_config_are_checked")]),
    # the value model and the exact DP solver (~290 of the module's ~1200 mutants)
    "grouping_search": ("fastdmtg/grouping_search.py",
                        ("mean_partner_values", "_finalise", "_submasks_with_lowbit", "select_dp"),
                        ["tests/test_grouping_search.py"]),
    # the rest of the module, in two halves that can run side by side: the partitions, solvers and
    # candidate sets of TAG/HOA/networks, then RSA and the BMTN tree search
    "grouping_search_select": ("fastdmtg/grouping_search.py",
                               ("set_partitions", "stirling2", "num_partitions", "check_value_model",
                                "tag_value_model", "hoa_value_model", "all_subsets", "Selection", "_check_inputs",
                                "select_exhaustive", "select_bnb", "_greedy_cover", "agglomerate",
                                "linkage_partition", "restricted_candidates", "select_networks", "tag_select",
                                "hoa_select"),
                               ["tests/test_grouping_search.py"]),
    "grouping_search_bmtn": ("fastdmtg/grouping_search.py",
                             ("rankdata", "pearson", "spearman", "rdm", "rsa_affinity", "cluster_cost",
                              "bmtn_tree_cost", "_best_partition", "bmtn_select"),
                             ["tests/test_grouping_search.py"]),
    "ref_masked_l1": ("kernels/masked_l1.py", KERNEL_REF, ["tests/test_op_masked_l1.py", "tests/test_ops.py"]),
    "ref_ce_ignore": ("kernels/ce_ignore.py", KERNEL_REF, ["tests/test_op_ce_ignore.py", "tests/test_ops.py"]),
    "ref_grouped_ce": ("kernels/grouped_ce.py", KERNEL_REF, ["tests/test_op_grouped_ce.py", "tests/test_ops.py"]),
    "ref_grouped_bce": ("kernels/grouped_bce.py", KERNEL_REF, ["tests/test_ops.py"]),
    "ref_gumbel_mask": ("kernels/gumbel_mask.py", ("reference", "gumbel_softmax_from_uniform"),
                        ["tests/test_op_gumbel_mask.py", "tests/test_grouping.py"]),
    "ref_bn_relu_maxpool": ("kernels/bn_relu_maxpool.py", KERNEL_REF, ["tests/test_op_bn_relu_maxpool.py"]),
    # the training augmentations and CS (issue 27): the hand computations on the toy step of
    # tests/test_aggregators.py (no training run; the compare tests of that file are slow)
    "aggregators": ("fastdmtg/methods/aggregators.py", None,
                    _aggr(*PCGRAD, "test_pcgrad_per_branch_and_on_the_trunk",
                          "test_aggregator_solver_missing_names_the_install",
                          "test_aggregation_frees_the_steps_graph_with_the_last_task_backward",
                          "test_aggregator_update_is_the_aggregator_of_the_jacobian[pcgrad]",
                          "test_aggregator_update_is_the_aggregator_of_the_jacobian[mgda]",
                          "test_without_torchjd_the_aggregators_say_how_to_install_it",
                          "test_aggregation_section_defaults_are_the_papers_values_and_its_bounds_are_inclusive")),
    "augment": ("fastdmtg/methods/augment.py", None,
                _aggr(*PCGRAD, "test_uw_loss_and_gradients_by_hand", "test_gradnorm_two_weight_updates_by_hand",
                      "test_aggregator_update_is_the_aggregator_of_the_jacobian[pcgrad]",
                      "test_plain_methods_keep_the_plain_backward", "test_shared_blocks_trunk_branches_and_refusals",
                      "test_last_layer_is_the_last_weight_of_two_or_more_dimensions",
                      "test_pcgrad_per_branch_and_on_the_trunk",
                      "test_gradnorm_skips_a_branch_without_tasks_and_uses_the_trunk_without_branch_weights")),
    "uw": ("fastdmtg/methods/uw.py", None,
           _aggr("test_uw_loss_and_gradients_by_hand", "test_plain_methods_keep_the_plain_backward",
                 "test_uw_state_is_checkpointed_with_the_method", "test_uw_factors_by_task_kind_and_results",
                 "test_uw_and_gradnorm_with_heads_off_a_branch")),
    "gradnorm": ("fastdmtg/methods/gradnorm.py", None,
                 _aggr("test_gradnorm_two_weight_updates_by_hand",
                       "test_gradnorm_renormalises_per_branch_and_leaves_other_weights",
                       "test_gradnorm_skips_a_branch_without_tasks_and_uses_the_trunk_without_branch_weights",
                       "test_uw_and_gradnorm_with_heads_off_a_branch", "test_gradnorm_with_more_networks_than_tasks")),
    "cs": ("fastdmtg/methods/cs.py", None,
           _aggr("test_cs_similarity_matrix_from_known_gradients",
                 "test_cs_measures_the_cosine_of_the_task_gradients_of_the_measured_step",
                 "test_cs_similarity_of_short_and_long_gradients_and_its_results")),
    # the compare planner (issue 33) on a Comparison of the synthetic data (no training), and the Ray
    # executor driving a stand-in ray module: tests/test_compare_plan_unit.py (~2 s); the real Ray
    # runs (tests/test_compare_ray.py, slow) are not in the selection
    "compare_plan": ("fastdmtg/compare_plan.py",
                     ("Pending", "PendingValue", "PendingResult", "PlannedRun", "Plan", "Planner", "_strings", "_rate",
                      "make_plan", "add_flops", "format_plan"),
                     [*[f"tests/test_compare_plan_unit.py::{t}" for t in PLAN_UNIT],
                      "tests/test_compare_ray.py::test_dry_run_plan_by_hand",
                      "tests/test_compare_ray.py::test_progress_total_counts_the_stages"]),
    "compare_ray": ("fastdmtg/compare_plan.py", ("RayOptions", "ray_available", "_train_task", "run_on_ray"),
                    [f"tests/test_compare_plan_unit.py::{t}" for t in RAY_UNIT]),
    # data fingerprints (issue 28): the digests and the comparison by hand, and per format the part
    # that changed (CelebA, Taskonomy raw; your own folder: tests/test_resume_data.py, slow: training runs)
    "fingerprint": ("fastdmtg/fingerprint.py", None,
                    ["tests/test_fingerprint_unit.py",
                     "tests/test_resume_data.py::test_celeba_fingerprint_names_the_annotation_file_that_changed",
                     "tests/test_resume_data.py::test_taskonomy_raw_fingerprint_names_its_split_file"]),
    # the extension points' table type (issue 25): discovery, order, names, errors, add/remove
    "registry": ("fastdmtg/registry.py", None,
                 ["tests/test_registry.py", "tests/test_plugins.py", "tests/test_file_counts.py",
                  "tests/test_architecture_doc.py",
                  "tests/test_compare_baselines.py::test_a_baseline_is_one_file",
                  "tests/test_compare_baselines.py::test_a_broken_baseline_file_is_named"]),
}

EXCLUDE = [
    r"core/ReplaceBinaryOperator_\w+_(BitAnd|BitOr|BitXor|LShift|RShift|FloorDiv|Mod|MatMult)$",
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE)_(Is|IsNot|In|NotIn)$",
    r"core/ReplaceComparisonOperator_(Is|IsNot|In|NotIn)_(Eq|NotEq|Lt|LtE|Gt|GtE)$",
    r"core/ReplaceComparisonOperator_(Is|IsNot)_(In|NotIn)$",
    r"core/ReplaceComparisonOperator_(In|NotIn)_(Is|IsNot)$",
    r"core/ReplaceUnaryOperator_\w+_(Invert|UAdd)$",
    r"core/VariableInserter",
    r"core/VariableReplacer",
]


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def function_lines(path: Path, names: tuple[str, ...]) -> list[str]:
    """'start-end' line ranges (decorators included) of the top-level functions or classes called
    ``names``."""
    tree = ast.parse(path.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, _DEFS) and node.name in names:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out.append(f"{start}-{node.end_lineno}")
    missing = set(names) - {n.name for n in tree.body if isinstance(n, _DEFS)}
    if missing:
        raise SystemExit(f"{path}: no top-level function or class {sorted(missing)}")
    return out


def make_copy(work: Path) -> Path:
    """A copy of the tracked files (and untracked, not ignored ones) of the repository."""
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if not (REPO / f).is_file():
            continue
        dst = src / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst)
    for sub in ("kernels", "pipelines"):
        (src / "fastdmtg" / sub).symlink_to(Path("..") / sub)
    return src


def toml_str(s: str) -> str:
    return json.dumps(s)


def write_config(path: Path, module: str, test_cmd: str, timeout: float, lines: list[str] | None) -> None:
    cfg = [
        "[cosmic-ray]",
        f"module-path = {toml_str(module)}",
        f"timeout = {timeout:.1f}",
        "excluded-modules = []",
        f"test-command = {toml_str(test_cmd)}",
        "",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "",
        "[cosmic-ray.filters.operators-filter]",
        "exclude-operators = [" + ", ".join(toml_str(e) for e in EXCLUDE) + "]",
    ]
    if lines is not None:
        cfg += ["", "[cosmic-ray.filters.line-filter]", "[cosmic-ray.filters.line-filter.lines]",
                f"{toml_str(module)} = [" + ", ".join(toml_str(x) for x in lines) + "]"]
    path.write_text("\n".join(cfg) + "\n")


def tool(name: str) -> str:
    exe = Path(PY).parent / name
    return str(exe) if exe.exists() else name


def summarize(db: Path) -> dict:
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT m.module_path, m.operator_name, m.occurrence, m.start_pos_row, r.worker_outcome, "
        "r.test_outcome, r.diff FROM mutation_specs m JOIN work_items w ON m.job_id = w.job_id "
        "LEFT JOIN work_results r ON r.job_id = w.job_id").fetchall()
    con.close()
    counts = {"killed": 0, "survived": 0, "incompetent": 0, "skipped": 0, "pending": 0}
    survivors = []
    for module, op, occ, line, worker, test, diff in rows:
        worker, test = (worker or "").lower() or None, (test or "").lower() or None   # stored as enum names
        if worker is None:
            counts["pending"] += 1
        elif worker == "skipped":
            counts["skipped"] += 1
        elif test == "survived":
            counts["survived"] += 1
            survivors.append({"line": line, "operator": op, "occurrence": occ, "diff": diff})
        elif test == "killed":
            counts["killed"] += 1
        else:
            counts["incompetent"] += 1
    run = counts["killed"] + counts["survived"]
    counts["score"] = round(100.0 * counts["killed"] / run, 1) if run else None
    survivors.sort(key=lambda s: s["line"])
    return {"counts": counts, "survivors": survivors}


def run_target(name: str, src: Path, work: Path, factor: float, resume: bool = False) -> dict:
    module, funcs, pytest_args = TARGETS[name]
    lines = function_lines(src / module, funcs) if funcs else None
    test_cmd = " ".join([PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                         *[f"'{a}'" if " " in a else a for a in pytest_args]])
    env = dict(os.environ, PYTHONPATH=str(src), FASTDMTG_MUTATION="1")
    t0 = time.perf_counter()
    base = subprocess.run(test_cmd, shell=True, cwd=src, env=env, capture_output=True, text=True)
    base_s = time.perf_counter() - t0
    if base.returncode != 0:
        print(f"{name}: the tests fail on the unmutated copy; target not run:\n{base.stdout[-3000:]}", flush=True)
        return {"module": module, "error": "baseline tests fail", "tests": pytest_args,
                "counts": dict.fromkeys(("killed", "survived", "incompetent", "skipped", "pending"), 0) | {"score": None}}
    cfg, db = work / f"{name}.toml", work / f"{name}.sqlite"
    if not (resume and db.exists()):
        write_config(cfg, module, test_cmd, max(30.0, factor * base_s), lines)
        if db.exists():
            db.unlink()
        subprocess.run([tool("cosmic-ray"), "init", str(cfg), str(db)], cwd=src, env=env, check=True)
        subprocess.run([tool("cr-filter-operators"), str(db), str(cfg)], cwd=src, env=env, check=True)
        if lines is not None:
            subprocess.run([tool("cr-filter-lines"), "--config", str(cfg), str(db)], cwd=src, env=env, check=True)
    else:                                   # keep the session's results; new tests take part from here on
        write_config(cfg, module, test_cmd, max(30.0, factor * base_s), lines)
    t0 = time.perf_counter()
    subprocess.run([tool("cosmic-ray"), "exec", str(cfg), str(db)], cwd=src, env=env, check=True)
    res = summarize(db)
    res.update(module=module, functions=list(funcs) if funcs else None, lines=lines, tests=pytest_args,
               baseline_s=round(base_s, 1), exec_s=round(time.perf_counter() - t0, 1))
    print(f"{name}: {res['counts']} ({res['exec_s']:.0f} s)", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help=f"targets (default: all): {', '.join(TARGETS)}")
    ap.add_argument("--list", action="store_true", help="show the targets and exit")
    ap.add_argument("--work", default=str(REPO / "runs" / "mutation"), help="scratch folder (default runs/mutation)")
    ap.add_argument("--timeout-factor", type=float, default=4.0, help="per-mutant limit = factor × baseline time")
    ap.add_argument("--resume", action="store_true",
                    help="continue a target's session (its pending mutants) instead of starting it again")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/mutation_<date>.json; "
                                                 "targets already in it are kept)")
    a = ap.parse_args(argv)
    unknown = [t for t in a.targets if t not in TARGETS]
    if unknown:
        print(f"mutation: unknown target(s) {unknown}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if a.list:
        for n, (m, f, t) in TARGETS.items():
            print(f"{n:20s} {m}{' ' + str(function_lines(REPO / m, f)) if f else ''}  <- {' '.join(t)}")
        return 0
    if shutil.which(tool("cosmic-ray")) is None:
        print("mutation: cosmic-ray is not installed (pip install cosmic-ray)", file=sys.stderr)
        return 2
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = make_copy(work)
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"mutation_{dt.date.today()}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in a.targets or list(TARGETS):
        results[name] = run_target(name, src, work, a.timeout_factor, a.resume)
        results[name]["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")        # after every target: nothing lost
    print("\n| target | module | killed | survived | incompetent | score |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        c = r["counts"]
        print(f"| {name} | {r['module']} | {c['killed']} | {c['survived']} | {c['incompetent']} | {c['score']} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
