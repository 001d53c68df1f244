"""The baselines of ``fastdmtg compare`` as plugins (issue 25): a baseline is one file in
fastdmtg/baselines/, found by listing the package; compare, its plan and its tables never name one;
no import cycle among compare, compare_plan, compare_runs, compare_tables, seeds and the baselines;
the progress lines' ETA (issue 33) from known costs."""
import ast
import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import fastdmtg
from fastdmtg import baselines
from fastdmtg.compare import compare_main
from fastdmtg.compare_plan import Plan, PlannedRun, ProgressETA

SETS = ["train.tensorboard=false", "train.progress=false", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2", "data.synthetic_train=128", "data.synthetic_val=64",
        "data.synthetic_test=64", "train.epochs=1", "train.batch_size=64", "data.image_size=16", "model.width=2"]
SMALL = ["--recipe", "synthetic_k3", "--k", "2", "--no-flops", *[x for s in SETS for x in ("--set", s)]]


def _doc_baseline() -> str:
    """The baseline of docs/baselines.md "Adding a baseline", as written there: a throwaway two-shot
    baseline — its measurement stage (the naive run, shared with the reference), its selection (the
    two tasks with the lowest naive test loss together) and its run (that grouping, from the naive
    weights)."""
    doc = (Path(fastdmtg.__file__).parents[1] / "docs" / "baselines.md").read_text()
    section = doc.split("## Adding a baseline", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.startswith("# fastdmtg/baselines/easy.py")
    return code


THROWAWAY = _doc_baseline()


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on fastdmtg.baselines' search path holding the throwaway baseline's one file."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "easy.py").write_text(THROWAWAY)
    monkeypatch.setattr(baselines, "__path__", [*baselines.__path__, str(d)])
    baselines.clear_cache()
    yield d
    sys.modules.pop("fastdmtg.baselines.easy", None)
    baselines.clear_cache()


def test_a_baseline_is_one_file(plugin_dir, tmp_path, capsys):
    """Adding a two-shot baseline touches exactly one file (its own): the documented one is a
    --methods name, planned (its dependency on the naive run, its stage known later), trained and in
    every table under its display name, after the grouping methods (its section)."""
    assert [p.name for p in plugin_dir.iterdir()] == ["easy.py"]
    assert "easy" in baselines.known() and baselines.known()[-1] == "easy"     # the last section
    out = tmp_path / "cmp"
    assert compare_main(["--methods", "easy,naive", "--out", str(out), "--dry-run", *SMALL]) == 0
    plan = capsys.readouterr().out
    assert "  naive: 1 run" in plan and "  easy: + the easy pairs (known after naive)" in plan
    assert compare_main(["--methods", "easy,naive", "--out", str(out), *SMALL]) == 0
    log = capsys.readouterr().out
    assert "[2/1+] easy K=2: easy/k2 — training (fixed, K=2, 1 epochs)" in log   # a run of its stage
    cfg = json.loads((out / "easy" / "k2" / "config.json").read_text())
    assert cfg["train"]["init_from"] == str(out / "naive")
    naive = json.loads((out / "naive" / "results.json").read_text())
    loss = naive["test"]["loss"]
    order = sorted(range(4), key=lambda t: loss[naive["tasks"][t]])
    assert cfg["grouping"]["groups"] == sorted([order[:2], order[2:]])
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["naive", "easy"]                   # table order: its section
    assert rows[1]["K"] == "2" and float(rows[1]["rel_encoder_cost"]) == pytest.approx(1 + 2)
    md = (out / "comparison.md").read_text()
    assert "| easy-pairs | 2 |" in md
    assert "easy-pairs" in (out / "comparison.tex").read_text()
    assert any(r["method"] == "easy-pairs" for r in csv.DictReader((out / "groupings.csv").open()))
    # a second invocation reuses both runs
    assert compare_main(["--methods", "easy,naive", "--out", str(out), *SMALL]) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 2


def test_declarations_give_the_method_lists():
    """The lists compare kept by hand (its default methods, the sections, --aggregator's methods,
    the aliases) come out of the baselines' declarations, as they were."""
    from fastdmtg.methods import AUGMENTATIONS
    assert baselines.defaults() == ["naive", "stl", "rg", "tag", "hoa", "bmtn", "dmtg", "dmtg-two-shot"]
    assert baselines.known() == baselines.defaults() + ["cs"] + list(AUGMENTATIONS) + ["tag-pcgrad"]
    assert [m for m in baselines.known() if baselines.get(m).aggregated] == \
        ["stl", "rg", "tag", "hoa", "bmtn", "dmtg-two-shot", "cs"]
    assert baselines.aliases() == {"naive-mtl": "naive", "two-shot": "dmtg-two-shot"}
    assert [baselines.section_index(m) for m in ("dmtg", "cs", "uw", "tag-pcgrad")] == [0, 0, 1, 2]
    assert baselines.reference_name() == "naive"


def test_two_baselines_with_one_name_refused(plugin_dir):
    (plugin_dir / "easy2.py").write_text(THROWAWAY)
    baselines.clear_cache()
    try:
        with pytest.raises(ValueError, match="'easy' declared twice"):
            baselines.known()
    finally:
        (plugin_dir / "easy2.py").unlink()
        sys.modules.pop("fastdmtg.baselines.easy2", None)


def test_a_broken_baseline_file_is_named(plugin_dir, tmp_path, capsys):
    (plugin_dir / "easy.py").write_text(THROWAWAY.replace('section="combination"', 'section="bogus"'))
    baselines.clear_cache()
    assert compare_main(["--methods", "naive", "--out", str(tmp_path / "x"), "--dry-run", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: baseline plugin ")
    assert err.split(":")[1].strip().endswith("easy.py")
    assert "section must be one of grouping, augmentation, combination, got 'bogus'" in err


# ----------------------------------------------------------------------------- compare knows no baseline

PKG = Path(fastdmtg.__file__).parent
COMPARE = ["compare.py", "compare_runs.py", "compare_plan.py", "compare_tables.py", "seeds.py"]


def _code_strings(path: Path) -> set[str]:
    """The string constants of a module's code (docstrings and f-string text left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    fstr = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs and id(n) not in fstr}


def test_compare_never_names_a_baseline():
    """No string in the code of compare, its run machinery, plan, tables or seeds is a baseline's name
    or alias (a branch like ``row.method == "naive"`` would be one)."""
    names = set(baselines.known()) | set(baselines.aliases())
    for f in COMPARE:
        assert not (_code_strings(PKG / f) & names), (f, _code_strings(PKG / f) & names)


def _imports(path: Path, module: str, is_pkg: bool) -> set[str]:
    """Modules of the package a module imports, function-local imports included, those under
    ``if TYPE_CHECKING:`` left out."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in MODULES and m != module}


def _module(p: Path) -> str:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _cycles_through(graph: dict[str, set[str]], mine: set[str]) -> list[list[str]]:
    """Import cycles that pass through a module of ``mine`` (depth-first search from each)."""
    found = []
    for start in sorted(mine):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    found.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_import_cycle_through_compare_or_the_baselines():
    graph = {m: _imports(p, m, p.name == "__init__.py") for m, p in MODULES.items()}
    mine = {m for m in MODULES if m.startswith(("fastdmtg.compare", "fastdmtg.baselines"))} | {"fastdmtg.seeds"}
    assert len(mine) >= 17                                    # compare ×4, seeds, the package and its files
    assert _cycles_through(graph, mine) == []
    # the detector finds the cycle that was there (compare → seeds → compare, function-local)
    planted = dict(graph, **{"fastdmtg.seeds": graph["fastdmtg.seeds"] | {"fastdmtg.compare"}})
    assert ["fastdmtg.compare", "fastdmtg.seeds", "fastdmtg.compare"] in _cycles_through(planted, mine)


# ----------------------------------------------------------------------------- ETA (issue 33)

def _plan(*runs: tuple[str, float], rate=None) -> Plan:
    return Plan(runs=[PlannedRun(k, k, k, None, Path(k), [], False, branch_epochs=be) for k, be in runs],
                sec_per_branch_epoch=rate)


def test_eta_from_known_costs(tmp_path):
    """ETA = Σ branch-epochs of the plan's runs not done × seconds per branch-epoch measured so far."""
    plan = _plan(("naive", 1.0), ("stl", 4.0), ("dmtg/k2", 2.0))
    cmp = SimpleNamespace(out=tmp_path, _cost={}, _wall={})
    eta = ProgressETA(plan)
    assert eta(cmp) == "" and eta.seconds(cmp) is None                   # nothing measured: no ETA
    cmp._cost["naive"] = (1.0, 30.0)                                     # 30 s per branch-epoch
    assert eta.seconds(cmp) == pytest.approx((4 + 2) * 30) and eta(cmp) == "3.0 min"
    cmp._cost["stl"] = (4.0, 90.0)                                       # (30 + 90) / 5 = 24 s
    assert eta.seconds(cmp) == pytest.approx(2 * 24) and eta(cmp) == "48 s"
    cmp._cost["dmtg/k2"] = (2.0, 60.0)
    assert eta(cmp) == ""                                                 # all done
    # a finished run reused from OUT measures it; before any, the plan's own measurement
    assert ProgressETA(_plan(("a", 2.0), rate=90.0))(SimpleNamespace(out=tmp_path, _cost={}, _wall={})) == "3.0 min"
    # the wall time of the runs trained in this pass wins over train_time_s (the loop only)
    cmp = SimpleNamespace(out=tmp_path, _cost={"naive": (1.0, 30.0)}, _wall={"naive": (1.0, 45.0)})
    assert eta.seconds(cmp) == pytest.approx((4 + 2) * 45)


def test_progress_lines_carry_the_eta(tmp_path, monkeypatch):
    """The progress lines of the local pass: ``[done/total]`` for the first run (no step time yet), then
    ``[done/total, ETA …]`` from the runs trained so far — a fake trainer on a fake clock: naive's run
    (1 branch-epoch) takes 150 s of wall time (120 s in its training loop) → STL's 4 branch-epochs:
    600 s = 10 min."""
    from fastdmtg.compare_runs import Comparison
    now = [1000.0]

    def fake_train(self, cfg, run_dir, resume):
        k = cfg.num_branches
        names = self.names
        now[0] += 150.0 * k
        return {"tasks": names, "num_branches": k, "epochs": cfg.train.epochs, "train_time_s": 120.0 * k,
                "assignment": list(range(k)) * (len(names) // k), "total_loss": 1.0, "total_error": None,
                "test": {"loss": {t: 0.25 for t in names}}}
    monkeypatch.setattr(Comparison, "_train", fake_train)       # the Planner keeps its own _train
    from fastdmtg.compare_plan import make_plan
    from fastdmtg.config import apply_overrides, get_recipe
    lines = []
    base = apply_overrides(get_recipe("synthetic_k3"), SETS)
    cmp = Comparison(base, tmp_path / "c", [2], log=lambda m, flush=True: lines.append(m), flops=False)
    cmp.clock = lambda: now[0]
    plan = make_plan(cmp, ["naive", "stl"])
    assert [r.key for r in plan.runs] == ["naive", "stl"] and plan.total == "2"
    cmp.total, cmp.eta = plan.total, ProgressETA(plan)
    cmp.run_methods(["naive", "stl"])
    heads = [ln.split(" — ")[0] for ln in lines if ln.startswith("[")]
    assert heads == ["[1/2] naive: naive", "[2/2, ETA 10.0 min] stl: stl"]
    assert [ln.split(":")[0].strip() for ln in lines if "done in" in ln] == ["done in 150 s", "done in 600 s"]


def test_a_second_reference_run_is_refused(plugin_dir):
    """The NormGain reference is one run: a baseline file declaring a second one is refused when the
    table is built (the table's rule), whatever is asked of it first."""
    (plugin_dir / "easy.py").write_text(THROWAWAY.replace('later="the easy pairs"',
                                                          'later="the easy pairs", reference=lambda cmp: {}'))
    baselines.clear_cache()
    with pytest.raises(ValueError, match="exactly one baseline must declare the NormGain reference run"):
        baselines.get("naive")
    with pytest.raises(ValueError, match="exactly one baseline must declare the NormGain reference run"):
        baselines.all_baselines()
