"""The package's structure as behaviour: one builder of the training step (trainer and bench),
methods that return decisions instead of calling the trainer, batching declared by the backbone,
one partition parser/formatter, the rule for model.branches."""
import pytest
import torch
from torch import nn

from fastdmtg import builder
from fastdmtg.config import ConfigError, apply_overrides, get_recipe, method_branches
from fastdmtg.methods import StepContext
from fastdmtg.models.batched import supports_batching
from fastdmtg.models.multibranch import LinearHeads, MultiBranchNet
from fastdmtg.partition import format_groups, parse_groups, parse_networks

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
                                                               "grouping.affinity_every=2", "train.kernels=reference"])
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
    for s in range(2):                       # step 0 snapshots, step 1 is measured
        step.runner(batches[s])
        seen.clear()
        assert step.method.observe_step(StepContext(s, 0, batches[s], step.model, step.optimizer, ts)) == []
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


def test_partition_text_round_trips_through_one_parser():
    names = ["a", "b", "c", "d"]
    assert parse_groups("0,1|c,3", names) == [[0, 1], [2, 3]]
    assert format_groups([[0, 1], [2, 3]]) == "0,1|2,3"
    nets, served = parse_networks("0,1,+2|2,3", names)
    assert (nets, served) == ([[0, 1, 2], [2, 3]], [[0, 1], [2, 3]])
    assert format_groups(nets, [0, 0, 1, 1]) == "0,1,+2|2,3"
    for bad, why in (("0,1|2", "exactly once"), ("0,+1|1,2,3", "networks"), ("0,1|x,2,3", "unknown task"),
                     ("0,0|1,2,3", "twice")):
        with pytest.raises(ValueError, match=why):
            parse_groups(bad, names)


def test_model_branches_rule():
    base = get_recipe("synthetic_k3")
    fixed = apply_overrides(base, ["grouping.method=fixed", "grouping.groups=0,1|2,3,4|5,6,7,8", "model.branches=5"])
    assert fixed.model.branches == 3 == method_branches(fixed.grouping)
    assert apply_overrides(base, ["grouping.method=naive-mtl"]).model.branches == 1
    dmtg = apply_overrides(base, ["model.branches=5"])
    assert dmtg.model.branches == 5 and method_branches(dmtg.grouping) is None
    with pytest.raises(ConfigError, match="needs a partition"):
        apply_overrides(base, ["grouping.method=fixed"])


def test_trainer_applies_the_methods_pruning_decisions(tmp_path):
    """DMTG only returns HeadsPruned; the trainer makes the model compute the remaining heads."""
    from fastdmtg.train import Trainer
    # a low τ and a high learning rate: heads drop within the 4 steps of this tiny run
    cfg = apply_overrides(get_recipe("synthetic_k3"), TINY + ["train.epochs=2", "grouping.tau=0.1", "optim.lr=0.1",
                                                              "grouping.prune_eps=0.3", "grouping.prune_patience=1"])
    t = Trainer(cfg, tmp_path / "run")
    res = t.fit()
    mask = t.method.head_mask()                                   # (N, K) bool
    assert res["pruning"]["events"] and mask is not None and not bool(mask.all())
    n, k = mask.shape
    assert t.model.task_branches == tuple(tuple(b for b in range(k) if mask[i, b]) for i in range(n))
