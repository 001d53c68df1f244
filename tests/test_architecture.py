"""The package's structure as behaviour: one builder of the training step (trainer and bench),
methods that return decisions instead of calling the trainer, batching declared by the backbone,
one partition parser/formatter, the rule for model.branches."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastdmtg import builder
from fastdmtg.config import Config, ConfigError, apply_overrides, evolve, get_recipe, method_branches, resolved_branches
from fastdmtg.methods import StepContext
from fastdmtg.models.batched import supports_batching
from fastdmtg.models.multibranch import LinearHeads, MultiBranchNet
from fastdmtg.partition import format_groups, parse_text, resolve_networks, resolve_partition

TINY = ["train.tensorboard=false", "train.progress=false", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2", "data.synthetic_train=128", "data.synthetic_val=64",
        "data.synthetic_test=64", "data.image_size=16", "model.width=2", "train.batch_size=64", "train.epochs=1"]


def test_trainer_and_bench_build_the_step_in_one_place(tmp_path, monkeypatch):
    """Trainer and bench.build_stepper both go through builder.build_training_step (bench times the
    step a run trains with)."""
    from fastdmtg import bench
    from fastdmtg import train as train_mod
    from fastdmtg.train import Trainer
    calls = []
    real = builder.build_training_step

    def spy(cfg, *a, **kw):
        calls.append(cfg.name)
        return real(cfg, *a, **kw)
    monkeypatch.setattr(builder, "build_training_step", spy)
    monkeypatch.setattr(train_mod, "build_training_step", spy)     # the name the trainer imported
    cfg = apply_overrides(get_recipe("synthetic_k3"), TINY)
    t = Trainer(cfg, tmp_path / "run")
    t.close()
    step, info = bench.build_stepper(cfg, torch.device("cpu"), loader="memory", n_batches=1)
    total, L = step()
    assert calls == [cfg.name, cfg.name]
    assert torch.isfinite(total) and L.shape == (4, 3)
    assert isinstance(t.model, type(info["runner"].eager_fn.model)) and t.runner.mode == info["mode"]


def test_tag_lookahead_uses_train_kernels(monkeypatch):
    """TAG's lookahead losses run on the train.kernels backend, as the training step's."""
    from fastdmtg.methods.tag import TagAffinity
    from fastdmtg.pipelines import build_source
    cfg = apply_overrides(get_recipe("synthetic_k3"), TINY + ["grouping.method=tag-affinity", "model.branches=1",
                                                               "tag.affinity_every=2", "train.kernels=reference"])
    torch.manual_seed(0)
    data = build_source(cfg.data, progress=False)
    ts = data.taskset
    step = builder.build_training_step(cfg, ts, data.image_size, torch.device("cpu"))
    assert isinstance(step.method, TagAffinity) and step.method.kernels == "reference"
    seen = []
    real = type(ts).head_losses

    def spy(self, *a, kernels="auto", **kw):
        seen.append(kernels)
        return real(self, *a, kernels=kernels, **kw)
    monkeypatch.setattr(type(ts), "head_losses", spy)
    batches = list(data.batches("train", 64, shuffle=False, train=True))
    decisions = []
    for s in range(2):                       # step 0 snapshots, step 1 is measured
        step.runner(batches[s])
        seen.clear()
        decisions.append(step.method.observe_step(StepContext(s, 0, batches[s], step.model, step.optimizer, ts)))
    assert decisions[0] == [] and [d.step for d in decisions[1]] == [2]
    assert int(step.method.affinity_count) == 1
    assert seen and set(seen) == {"reference"}


class _Block(nn.Module):
    """A channel-agnostic container (conv → BN → ReLU)."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


def _net(block_cls):
    branch = nn.Sequential(block_cls(2), nn.AvgPool2d(2), nn.Flatten(1))
    return MultiBranchNet(nn.Identity(), branch, LinearHeads(3, 2, 2), 2)


def test_batching_is_declared_by_the_backbone_not_its_class_name():
    BasicBlock = type("BasicBlock", (_Block,), {})                     # a known name, no declaration
    Declared = type("AnyName", (_Block,), {"batchable": True})
    assert supports_batching(_net(Declared)) is True
    assert supports_batching(_net(BasicBlock)) is False
    from fastdmtg.models.resnet_celeba import BasicBlock as RealBlock
    from fastdmtg.models.xception import XceptionBlock
    assert RealBlock.batchable and XceptionBlock.batchable


def test_partition_text_is_parsed_at_the_edge_and_resolved_once_the_tasks_are_known():
    names = ["a", "b", "c", "d"]
    # the edge: text → typed lists (indices stay ints, names stay names, '+' → auxiliary)
    assert parse_text("0,1|c,3") == ([[0, 1], ["c", 3]], [])
    assert parse_text(" 0 , +2 |2") == ([[0, 2], [2]], [[2], []])
    assert format_groups([[0, 1], [2, 3]]) == "0,1|2,3"
    # resolution against the task names
    assert resolve_partition([[0, 1], ["c", 3]], names) == [[0, 1], [2, 3]]
    nets, served = resolve_networks([[0, 1, 2], [2, 3]], [[2], []], names)
    assert (nets, served) == ([[0, 1, 2], [2, 3]], [[0, 1], [2, 3]])
    assert format_groups(nets, [0, 0, 1, 1]) == "0,1,+2|2,3"
    for groups, why in (([[0, 1], [2]], "exactly once"), ([[0, 1], ["x", 2, 3]], "unknown task"),
                        ([[0, 0], [1, 2, 3]], "twice"), ([[0, 1], [2, 7]], "out of range")):
        with pytest.raises(ValueError, match=why):
            resolve_partition(groups, names)
    with pytest.raises(ValueError, match="more than one network"):
        resolve_networks([[0, 1, 2], [2, 3]], [], names)
    with pytest.raises(ValueError, match="no network serves it"):
        resolve_networks([[0, 1, 2], [3]], [[2], []], names)
    for bad in ("0,1||2", "0,+|1"):
        with pytest.raises(ValueError):
            parse_text(bad)


def test_groups_are_typed_in_the_config_and_text_only_at_the_edge():
    base = get_recipe("synthetic_k3")
    cfg = apply_overrides(base, ["grouping.method=networks", "grouping.groups=0,1,+2|2,3", "model.branches=0"])
    assert cfg.grouping.groups == [[0, 1, 2], [2, 3]] and cfg.grouping.auxiliary == [[2], []]
    assert cfg.num_branches == 2
    # the stored config holds the lists; a config file may give either form
    again = Config.from_dict(cfg.to_dict())
    assert again.grouping.groups == [[0, 1, 2], [2, 3]] and again.grouping.auxiliary == [[2], []]
    d = base.to_dict()
    d["grouping"] = {"method": "fixed", "groups": "g0_t0,1,2|3,4,5|6,7,8"}
    d["model"]["branches"] = 0
    assert Config.from_dict(d).grouping.groups == [["g0_t0", 1, 2], [3, 4, 5], [6, 7, 8]]
    # typed construction (what compare does): the same config as the text
    typed = evolve(base, grouping={"method": "networks", "groups": [[0, 1, 2], [2, 3]], "auxiliary": [[2], []]},
                   model={"branches": 2})
    assert typed.to_dict() == apply_overrides(cfg, ["model.branches=2"]).to_dict()
    for over, why in ((["grouping.groups=0,1|2"], "only methods fixed and networks"),
                      (["grouping.method=fixed", "grouping.groups=0,+1|2", "model.branches=0"], "need grouping.method=networks"),
                      (["grouping.method=fixed", "model.branches=0"], "needs its groups")):
        with pytest.raises(ConfigError, match=why):
            apply_overrides(base, over)
    with pytest.raises(ConfigError, match="evolve: grouping has no field"):
        evolve(base, grouping={"tau": 2.0})


def test_model_branches_is_never_silently_replaced():
    base = get_recipe("synthetic_k3")                        # K = 3, set by the recipe
    # a K the method contradicts is an error naming both values, not a silent overwrite
    with pytest.raises(ConfigError, match=r"model.branches=3, but grouping.method=naive-mtl trains 1"):
        apply_overrides(base, ["grouping.method=naive-mtl"])
    with pytest.raises(ConfigError, match=r"model.branches=5, but grouping.method=fixed trains 3"):
        apply_overrides(base, ["grouping.method=fixed", "grouping.groups=0,1|2,3,4|5,6,7,8", "model.branches=5"])
    # 0 = auto: the method's K; config.json keeps the 0 the user gave
    fixed = apply_overrides(base, ["grouping.method=fixed", "grouping.groups=0,1|2,3,4|5,6,7,8", "model.branches=0"])
    assert fixed.model.branches == 0 and fixed.num_branches == 3 == method_branches(fixed, None)
    assert apply_overrides(base, ["grouping.method=tag-affinity", "model.branches=0"]).num_branches == 1
    # dmtg: an explicit K holds; auto = min(3, N), N from the data section when it tells it
    assert apply_overrides(base, ["model.branches=5"]).num_branches == 5
    two = apply_overrides(base, ["model.branches=0", "data.synthetic_groups=1", "data.synthetic_tasks_per_group=2"])
    assert two.num_branches == 2 and method_branches(two, 9) == 3
    assert resolved_branches(two, 2).model.branches == 2 and two.model.branches == 0     # a copy


def test_evolve_validates_and_shares_nothing_with_its_base():
    base = get_recipe("synthetic_k3")
    new = evolve(base, name="x", grouping={"method": "fixed", "groups": [[0, 1, 2], [3, 4, 5], [6, 7, 8]]})
    new.grouping.groups[0].append(99)
    assert base.grouping.groups == [] and base.grouping.method == "dmtg" and new.name == "x"
    with pytest.raises(ConfigError, match="dmtg.tau must be > 0"):
        evolve(base, dmtg={"tau": 0.0})


def test_tag_returns_affinity_decisions_and_the_trainer_records_them(tmp_path, monkeypatch):
    """TAG measures into its own state and returns AffinityMeasured; the trainer records each one."""
    from fastdmtg.methods import AffinityMeasured
    from fastdmtg.train import Trainer
    cfg = apply_overrides(get_recipe("synthetic_k3"), TINY + ["grouping.method=tag-affinity", "model.branches=1",
                                                               "tag.affinity_every=2", "train.kernels=reference"])
    t = Trainer(cfg, tmp_path / "run")
    seen = []
    monkeypatch.setattr(t, "_affinity_measured", lambda d: seen.append(d))
    try:
        t.fit()
    finally:
        t.close()
    # 128 training samples / batch 64 = 2 steps; the step after each snapshot (steps 2, 4, …) is measured
    assert [d.step for d in seen] == [2] and all(isinstance(d, AffinityMeasured) for d in seen)
    assert seen[0].affinity.shape == (4, 4) and seen[0].measurements == 1
    assert torch.equal(seen[0].affinity, t.method.affinity_sum.cpu())


def test_trainer_applies_the_methods_pruning_decisions(tmp_path):
    """DMTG only returns HeadsPruned; the trainer makes the model compute the remaining heads."""
    from fastdmtg.train import Trainer
    # a low τ and a high learning rate: heads drop within the 4 steps of this tiny run
    cfg = apply_overrides(get_recipe("synthetic_k3"), TINY + ["train.epochs=2", "dmtg.tau=0.1", "optim.lr=0.1",
                                                              "dmtg.prune_eps=0.3", "dmtg.prune_patience=1"])
    t = Trainer(cfg, tmp_path / "run")
    res = t.fit()
    mask = t.method.head_mask()                                   # (N, K) bool
    assert res["pruning"]["events"] and mask is not None and not bool(mask.all())
    n, k = mask.shape
    assert t.model.task_branches == tuple(tuple(b for b in range(k) if mask[i, b]) for i in range(n))


def test_the_trainer_applies_the_decisions_mask(tmp_path):
    """HeadsPruned carries its mask and the trainer applies that mask (not the method's state, which
    here has dropped nothing: head_mask() is None)."""
    from fastdmtg.methods import HeadsPruned
    from fastdmtg.train import Trainer
    cfg = apply_overrides(get_recipe("synthetic_k3"), TINY)
    t = Trainer(cfg, tmp_path / "run")
    try:
        assert t.method.head_mask() is None and t.model.task_branches is None
        mask = torch.tensor([[True, False, True], [True, True, True], [False, False, True], [True, True, False]])
        t._apply([HeadsPruned(1, (), mask, "")])
        assert t.model.task_branches == ((0, 2), (0, 1, 2), (2,), (0, 1))
    finally:
        t.close()


def test_dmtg_decision_mask_is_a_copy():
    """A decision is a value: later drops change the method's state, not a decision already made."""
    from fastdmtg.methods.dmtg import DMTG, DMTGConfig
    m = DMTG(2, 3, DMTGConfig(tau=0.05, prune_eps=0.1, prune_patience=1))
    with torch.no_grad():
        m.logits.copy_(torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]))
    (d,) = m.observe_step(StepContext(0, 0))
    assert d.mask.tolist() == [[True, False, False], [False, True, False]] and d.rule == "< eps=0.1 for 1 steps"
    m.prune_active.fill_(True)
    assert d.mask.tolist() == [[True, False, False], [False, True, False]]


def test_registries_import_on_first_use_and_name_the_field():
    """Datasets and methods are looked up through one lazy table lookup (fastdmtg.registry)."""
    from fastdmtg.data import get_format
    from fastdmtg.methods import method_class
    from fastdmtg.methods.fixed import FixedGroups
    assert method_class("fixed") is FixedGroups and get_format("folder").name == "folder"
    with pytest.raises(ValueError, match=r"^data.dataset: unknown dataset 'x'; known: synthetic, celeba, "):
        get_format("x")
    with pytest.raises(ValueError, match=r"^grouping.method: unknown method 'y'; known: dmtg, naive-mtl, "):
        method_class("y")


def test_flops_and_batching_check_build_the_auto_k():
    """Every place that builds a model from a config resolves model.branches=0 (auto) first: the FLOP
    count of a naive-MTL config with auto K is the one with K = 1 (before: K = 0, an error)."""
    from fastdmtg import bench
    from fastdmtg.flops import count_flops
    base = apply_overrides(get_recipe("synthetic_k3"), ["grouping.method=naive-mtl", "model.branches=1",
                                                        "data.image_size=16"])
    auto = apply_overrides(base, ["model.branches=0"])
    one = apply_overrides(base, ["model.branches=1"])
    assert count_flops(auto) == count_flops(one)
    assert bench._batching_support(auto) == bench._batching_support(one) == (True, "")


# ----------------------------------------------------------------------------- methods as plugins
TOY_METHOD = '''"""A throwaway one-shot method: naive MTL (one encoder) with every head loss weighted toy.weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdmtg.configcheck import check
from fastdmtg.methods import GroupingMethod


@dataclass
class ToyConfig:
    weight: float = 1.0

    def __post_init__(self):
        check(self.weight > 0, f"toy.weight must be > 0, got {self.weight}")


class Toy(GroupingMethod):
    name = "toy"
    config_section = ("toy", ToyConfig)

    def __init__(self, num_tasks: int, weight: float):
        super().__init__(num_tasks, 1)
        self.register_buffer("_w", torch.full((num_tasks, 1), float(weight)))

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "Toy":
        return cls(num_tasks, cfg.toy.weight)

    def weights(self) -> torch.Tensor:
        return self._w                                            # (N, 1)

    def assignment(self) -> torch.Tensor:
        return torch.zeros(self.num_tasks, dtype=torch.long, device=self._w.device)

    def extra_results(self, totals=None) -> dict:
        return {"toy_weight": float(self._w[0, 0]), "toy_steps": totals.total_steps}
'''


@pytest.mark.slow           # two fresh processes (torch imports): ~15 s idle, over a minute on a busy machine
def test_a_method_added_as_one_file_has_its_section_and_trains(tmp_path):
    """docs/architecture.md "Extension points": a one-shot method from outside the package is its file
    plus an entry point of the group fastdmtg.methods (its package's one line). The config gains its section
    (--set, config.json, the section's own validation), the trainer trains it and records its results.
    In a fresh process: the config gathers the sections when it is imported."""
    import json
    import os
    import subprocess
    import sys
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    dist = tmp_path / "toy_method-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fastdmtg.methods]\ntoy = toy_method:Toy\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "fastdmtg", "train", "--no-progress", "--set", "grouping.method=toy",
            "--set", "model.branches=0"] + [a for t in TINY for a in ("--set", t)]
    run = subprocess.run(args + ["--out", str(tmp_path / "run"), "--set", "toy.weight=0.5"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (res["method"], res["num_branches"], res["toy_weight"], res["toy_steps"]) == ("toy", 1, 0.5, 2)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["toy"] == {"weight": 0.5} and list(cfg)[-2:] == ["optim", "train"]
    bad = subprocess.run(args + ["--out", str(tmp_path / "bad"), "--set", "toy.weight=-1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "toy.weight must be > 0, got -1.0" in bad.stderr
    assert "Traceback" not in bad.stderr
    # this process did not see the entry point: no toy section here
    from fastdmtg.config import METHOD_SECTIONS
    assert "toy" not in METHOD_SECTIONS


def test_the_config_gathers_the_method_sections_and_names_none():
    """The methods' sections are declared by the method classes and gathered from the registry, in its
    order (config.json's order); config.py neither defines nor reads any of them."""
    import re
    from pathlib import Path

    from fastdmtg import config
    from fastdmtg.methods import AUGMENTATIONS, METHODS
    declared = [cls.config_section for t in (METHODS, AUGMENTATIONS) for cls in t.declarations()]
    expected = list(dict.fromkeys(d[0] for d in declared if d is not None))
    assert list(config.METHOD_SECTIONS) == expected == ["dmtg", "tag", "cs", "uw", "gradnorm", "aggregation"]
    assert list(Config().to_dict()) == ["name", "data", "model", "grouping", *expected, "optim", "train"]
    src = Path(config.__file__).read_text()
    for sec, cls in config.METHOD_SECTIONS.items():
        assert cls.__module__.startswith("fastdmtg.methods.") and cls.__name__ not in src
        assert not re.search(rf"\.{sec}\.", src), f"config.py reads the {sec} section"


def test_dry_runs_auto_values_come_from_the_rules_the_run_applies(monkeypatch):
    """``builder.resolve(cfg).as_config()`` (--dry-run, --save-config) takes each ``auto`` from the rule
    the run itself applies — the optimizer's fused rule in the builder, the loaders' auto backend — not
    from a copy: changing the rule changes what it reports."""
    from fastdmtg import builder, pipelines
    from fastdmtg.config import Config

    cfg = Config()
    assert cfg.optim.fused == "auto" and cfg.data.backend == "auto"
    resolved, changed = builder.resolve(cfg).as_config()
    assert resolved.optim.fused == "off" and "optim.fused=off" in changed          # CPU: no fused optimizer
    assert resolved.data.backend == pipelines.AUTO and f"data.backend={pipelines.AUTO}" in changed
    monkeypatch.setattr(builder, "use_fused_optimizer", lambda cfg, device: True)
    monkeypatch.setattr(pipelines, "AUTO", "memory")
    resolved, _ = builder.resolve(cfg).as_config()
    assert resolved.optim.fused == "on" and resolved.data.backend == "memory"


PLAIN_METHOD = '''"""A throwaway one-shot method without settings: one encoder, task i's head weighted i + 1."""
import torch

from . import GroupingMethod


class Ramp(GroupingMethod):
    name = "ramp"

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks, 1)
        self.register_buffer("_w", torch.arange(1, num_tasks + 1, dtype=torch.float32).unsqueeze(1))

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "Ramp":
        return cls(num_tasks)

    def weights(self) -> torch.Tensor:
        return self._w                                            # (N, 1)

    def assignment(self) -> torch.Tensor:
        return torch.zeros(self.num_tasks, dtype=torch.long, device=self._w.device)

    def extra_results(self, totals=None) -> dict:
        return {"ramp_weights": self._w[:, 0].tolist()}


METHOD = Ramp
'''


def test_a_method_is_its_file(plugin_file, tmp_path):
    """docs/architecture.md "Extension points": a one-shot method is its file in fastdmtg/methods/
    (``METHOD = TheClass``), nothing else edited: the config accepts its name, K=auto is its own (1),
    and the trainer trains it and records its results."""
    from fastdmtg.config import ConfigError
    from fastdmtg.methods import METHODS
    from fastdmtg.train import train
    with pytest.raises(ConfigError, match="grouping.method: expected one of .*got 'ramp'"):
        apply_overrides(Config(), ["grouping.method=ramp"])
    path = plugin_file(METHODS, "ramp", PLAIN_METHOD)
    assert [p.name for p in path.parent.iterdir()] == ["ramp.py"]
    cfg = apply_overrides(Config(), ["grouping.method=ramp", "model.branches=0", *TINY])
    res = train(cfg, tmp_path / "run", progress=False)
    assert (res["method"], res["num_branches"]) == ("ramp", 1)
    assert res["ramp_weights"] == [float(i + 1) for i in range(len(res["tasks"]))]


def test_a_method_section_the_config_was_built_without_is_refused(plugin_file):
    """A method with a section of its own registered after fastdmtg.config was imported (its sections
    are gathered then) is refused by name, not failed on at its first use of the section."""
    from fastdmtg.config import ConfigError
    from fastdmtg.methods import METHODS
    plugin_file(METHODS, "toy_method_late", TOY_METHOD.replace("from fastdmtg.methods import", "from . import")
                + "\n\nMETHOD = Toy\n")
    with pytest.raises(ConfigError, match="grouping.method=toy: its config section 'toy' was registered after "
                                          "fastdmtg.config was imported"):
        apply_overrides(Config(), ["grouping.method=toy"])
