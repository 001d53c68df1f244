"""One resolver (fastdmtg.builder.resolve): ``fastdmtg train --dry-run`` prints exactly what the builder
then assembles, and the auto rules read the backbones' declarations, not architecture names."""
import contextlib
import dataclasses
import json

import pytest
import torch

from fastdmtg import builder
from fastdmtg.cli import main as cli_main
from fastdmtg.config import apply_overrides, get_recipe
from fastdmtg.kernels._common import TRITON_IMPORT_ERROR
from fastdmtg.models.batched import BatchedMultiBranchNet
from fastdmtg.registry import BACKBONES

TINY = ["train.tensorboard=false", "train.progress=false", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2", "data.synthetic_train=64", "data.synthetic_val=32",
        "data.synthetic_test=32", "data.image_size=16", "model.width=2", "train.batch_size=32"]
AUTO_FIELDS = [("train", "device"), ("train", "amp"), ("train", "kernels"), ("train", "compile"),
               ("train", "cuda_graph"), ("train", "channels_last"), ("model", "batched"), ("model", "fused_stem"),
               ("optim", "fused"), ("model", "branches")]


def _dry_run(overrides, capsys) -> dict:
    """The config ``fastdmtg train --dry-run`` prints (its JSON on stdout, after any INFO log line)."""
    capsys.readouterr()
    assert cli_main(["train", "--dry-run", *[x for o in overrides for x in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n"):])


def _built(cfg) -> dict:
    """What the builder assembled on CPU for ``cfg``, read off the objects, in the dry run's terms."""
    from fastdmtg.models.resnet_celeba import Stem
    from fastdmtg.pipelines import build_source
    data = build_source(cfg.data, progress=False)
    step = builder.build_training_step(cfg, data.taskset, data.image_size, torch.device("cpu"))
    onoff = {True: "on", False: "off"}
    module = step.runner.eager_fn                      # the StepModule (one process: no DDP wrapper)
    convs = [p for p in step.model.parameters() if p.dim() == 4]
    return {("train", "device"): str(next(step.model.parameters()).device),
            ("train", "amp"): "off" if module._autocast is contextlib.nullcontext else "mixed",
            ("train", "kernels"): step.kernels,
            ("train", "compile"): onoff["compile" in step.runner.mode],
            ("train", "cuda_graph"): onoff["graph" in step.runner.mode],
            ("train", "channels_last"): onoff[all(p.is_contiguous(memory_format=torch.channels_last)
                                                  and not p.is_contiguous() for p in convs)],
            ("model", "batched"): onoff[isinstance(step.model, BatchedMultiBranchNet)],
            ("model", "fused_stem"): onoff[any(m.fused for m in step.model.modules() if isinstance(m, Stem))],
            ("optim", "fused"): onoff[bool(step.optimizer.defaults.get("fused"))],
            ("model", "branches"): step.model.num_branches,
            "speed": step.speed}


@pytest.mark.parametrize("extra", [
    [],                                                               # every switch auto (CPU: all off)
    ["train.compile=on", "train.channels_last=on", "model.batched=on", "model.fused_stem=on",
     "train.kernels=reference", "train.amp=mixed", "optim.fused=on", "model.branches=0"],
    ["grouping.method=naive-mtl", "train.aggregator=pcgrad", "model.branches=0", "train.channels_last=on"],
], ids=["all-auto", "switches-on", "augmentation"])
def test_dry_run_and_builder_agree_on_every_auto_field(extra, capsys):
    overrides = TINY + extra
    dry = _dry_run(overrides, capsys)
    cfg = apply_overrides(get_recipe("synthetic_k3"), overrides)
    built = _built(cfg)
    for sec, key in AUTO_FIELDS:          # data.backend: the loaders' own auto (test_architecture's dry-run test)
        assert dry[sec][key] == built[(sec, key)], f"{sec}.{key}: dry run {dry[sec][key]!r}, built {built[sec, key]!r}"
    # results.json's speed entries are the same values
    assert built["speed"] == {k: dry[sec][k] == "on" for sec, k in (("train", "compile"), ("train", "cuda_graph"),
                              ("train", "channels_last"), ("model", "batched"), ("model", "fused_stem"))}


def test_auto_rules_on_a_cuda_device_come_from_the_backbone_declarations(monkeypatch, tmp_path):
    """(CPU: the policy only; resolve looks at the device type.) On CUDA auto turns compile, graphs,
    channels_last, bf16 and the fused optimizer on, batched branches where the backbone declares
    ``batched_auto`` (resnet_celeba, not xception), the fused stem nowhere yet (FUSED_STEM_AUTO)."""
    cuda = torch.device("cuda")
    celeba = apply_overrides(get_recipe("celeba9_k3"), ["train.amp=auto"])     # the recipe: amp=off (fp32)
    r = builder.resolve(celeba, cuda, 1)
    assert (r.compile, r.cuda_graph, r.channels_last, r.batched, r.fused_stem, r.bf16, r.fused_optimizer) == \
        (True, True, True, True, False, True, True)
    assert r.kernels == ("triton" if TRITON_IMPORT_ERROR is None else "reference")
    assert r.speed() == {"compile": True, "cuda_graph": True, "channels_last": True, "batched": True,
                         "fused_stem": False}
    resolved, changed = r.as_config()
    assert (resolved.train.amp, resolved.model.batched, resolved.model.fused_stem, resolved.train.device) == \
        ("mixed", "on", "off", "cuda")
    assert "model.batched=on" in changed and "train.cuda_graph=on" in changed
    assert builder.resolve(celeba, cuda, 2).cuda_graph is False                        # DDP: opt-in only
    assert builder.resolve(get_recipe("celeba9_k3"), cuda, 1).bf16 is False           # amp=off stays off
    xception = get_recipe("taskonomy5_k3")
    assert builder.resolve(xception, cuda, 1).batched is False
    # the rule reads the declaration: a throwaway backbone (xception's parts) declaring batched_auto
    (tmp_path / "toy_batched_backbone.py").write_text(
        "from fastdmtg.models.backbone import Backbone\n"
        "from fastdmtg.models.xception import build_parts\n"
        "BACKBONE = Backbone('toy_batched', build_parts, batched_auto=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    BACKBONES.add("toy_batched_backbone")
    try:
        toy = apply_overrides(xception, ["model.arch=toy_batched"])
        assert builder.resolve(toy, cuda, 1).batched is True
        assert builder.resolve(toy, torch.device("cpu"), 1).batched is False           # never on CPU
    finally:
        BACKBONES.remove("toy_batched_backbone")


def test_prepare_model_records_what_ran():
    """An ``auto`` that the architecture cannot follow is turned off in the Resolved the step keeps
    (results.json's speed); an explicit ``on`` is an error naming the field."""
    from torch import nn

    from fastdmtg.models.multibranch import LinearHeads, MultiBranchNet

    def plain():          # a branch that declares no batching and has no fused stem
        return MultiBranchNet(nn.Identity(), nn.Sequential(nn.Flatten(1), nn.Linear(12, 4)), LinearHeads(3, 4, 2), 2)
    cfg = get_recipe("synthetic_k3")
    asked = dataclasses.replace(builder.resolve(cfg, torch.device("cpu")), batched=True, fused_stem=True)
    model, ran = builder.prepare_model(plain(), cfg, asked)
    assert (ran.batched, ran.fused_stem) == (False, False) and (asked.batched, asked.fused_stem) == (True, True)
    assert not isinstance(model, BatchedMultiBranchNet)
    on = apply_overrides(cfg, ["model.fused_stem=on"])
    with pytest.raises(ValueError, match=r"^model.fused_stem=on: model.arch=resnet_celeba has no ResNet-variant stem$"):
        builder.prepare_model(plain(), on, builder.resolve(on, torch.device("cpu")))
    on = apply_overrides(cfg, ["model.batched=on"])
    with pytest.raises(ValueError, match=r"^model.batched=on is not supported for model.arch=resnet_celeba$"):
        builder.prepare_model(plain(), on, builder.resolve(on, torch.device("cpu")))


def test_bmtn_asks_the_backbone_declaration():
    """BMTN's locations and split points come from ``Backbone.rsa``; a backbone without one is refused
    with model.arch and the backbones that declare one named."""
    from fastdmtg.config import ModelConfig
    from fastdmtg.methods.bmtn import rsa_locations, split_options
    from fastdmtg.tasks import TaskSpec
    rsa = rsa_locations(ModelConfig(arch="resnet_celeba"))
    assert rsa.locations == ("stem", "block", "pool") and rsa.split_field == "shared"
    specs = [TaskSpec(f"t{i}", "class", 2) for i in range(3)]
    opts = split_options(ModelConfig(arch="resnet_celeba", width=2), specs, 16)
    # stem conv 3·3·3·2 + BN 2·2 = 58 parameters move from each branch into the trunk
    assert opts["none"]["shared_params"] == 0 and opts["stem"]["shared_params"] == 58
    assert opts["none"]["branch_params"] - opts["stem"]["branch_params"] == 58
    assert [o["shared_locations"] for o in opts.values()] == [0, 1]
    with pytest.raises(ValueError, match=r"^model.arch=xception: BMTN needs a backbone that declares its RSA "
                                         r"locations and split points \(Backbone.rsa\); the backbones that do: "
                                         r"resnet_celeba$"):
        split_options(ModelConfig(arch="xception"), specs, 16)
