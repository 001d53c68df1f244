"""Training augmentations (UW, GradNorm, PCGrad and the torchjd aggregators; fastdmtg/methods/uw.py,
gradnorm.py, aggregators.py, augment.py) and the CS grouping baseline (methods/cs.py) against hand
computations, and their wiring into the step, the config, the CLI and compare."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from fastdmtg.config import Config, ConfigError, apply_overrides, evolve, get_recipe
from fastdmtg.builder import build_method
from fastdmtg.methods.cs import gradient_cosine
from fastdmtg.methods.naive import NaiveMTL
from fastdmtg.tasks import TaskSpec

FAST = ["--set", "train.tensorboard=false", "--set", "train.progress=false"]


# ----------------------------------------------------------------------------- a toy step
# Two tasks on one shared vector θ (the branch's (1, 2) weight) with linear losses, so every task
# gradient on θ is a chosen constant vector:  L_i = a_i · θ + b_i + ½ h_i²  (h: the heads' parameter)

class _Param(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(value, dtype=torch.float64).clone())


class ToyNet(nn.Module):
    def __init__(self, theta, heads):
        super().__init__()
        self.shared = nn.Sequential()                                   # no trunk
        self.branches = nn.ModuleList([_Param([theta])])                # θ (1, 2)
        self.heads = nn.ModuleList([_Param(heads)])                     # h (N,)


class ToyTasks:
    def __init__(self, kinds):
        self.specs = [TaskSpec(f"t{i}", k, 2) for i, k in enumerate(kinds)]


class ToyStep:
    """What a StepBackward uses of a step.StepModule: method, outputs(batch), losses(outputs, batch, z)."""

    def __init__(self, A, b, theta, heads, kinds=("class", "class")):
        self.A, self.b = torch.tensor(A, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        self.model = ToyNet(theta, heads)
        self.method = NaiveMTL(len(b))
        self.taskset = ToyTasks(kinds)

    def outputs(self, batch):
        return self.model.branches[0].weight.view(-1)                   # θ (2,)

    def losses(self, outputs, batch, z):
        h = self.model.heads[0].weight
        L = (self.A @ outputs + self.b + 0.5 * h ** 2)[:, None]        # (N, 1)
        return (z.to(L.dtype) * L).sum(), L.detach()


BATCH = {"image": torch.zeros(1)}


def _augmentation(name, toy, **sections):
    cfg = evolve(get_recipe("synthetic_naive"), grouping={"method": name}, **sections)
    method = build_method(cfg, len(toy.b))
    aug = method.step_backward()
    aug.bind(toy.model, toy.taskset, method.weights())
    return aug


# ----------------------------------------------------------------------------- PCGrad

def test_pcgrad_projects_conflicting_gradients_by_hand():
    """g1 = (1, 0), g2 = (−1, 1) conflict (g1·g2 = −1): g1' = g1 − (g1·g2)/‖g2‖² g2 = (½, ½),
    g2' = g2 − (g2·g1)/‖g1‖² g1 = (0, 1); the shared update is g1' + g2' = (½, 3/2). The heads keep
    their own gradients (h_i)."""
    pytest.importorskip("torchjd")
    toy = ToyStep([[1.0, 0.0], [-1.0, 1.0]], [1.0, 1.0], [0.3, -0.2], [2.0, -3.0])
    aug = _augmentation("pcgrad", toy)
    total, L = aug(toy, BATCH)
    assert toy.model.branches[0].weight.grad.view(-1).tolist() == pytest.approx([0.5, 1.5])
    assert toy.model.heads[0].weight.grad.tolist() == pytest.approx([2.0, -3.0])
    # the logged loss is the plain sum: (0.3 + 1 + 2) + (−0.3 − 0.2 + 1 + 4.5)
    assert float(total) == pytest.approx(3.3 + 5.0)


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    """g1·g2 = 2 > 0: no projection, the update is the plain sum (3, 2)."""
    pytest.importorskip("torchjd")
    toy = ToyStep([[1.0, 2.0], [2.0, 0.0]], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0])
    aug = _augmentation("pcgrad", toy)
    aug(toy, BATCH)
    assert toy.model.branches[0].weight.grad.view(-1).tolist() == pytest.approx([3.0, 2.0])


# ----------------------------------------------------------------------------- UW

@pytest.mark.parametrize("form", ["paper", "uniform"])
def test_uw_loss_and_gradients_by_hand(form):
    """Task 0 classification, task 1 regression; s = (0.5, −0.2). paper: loss = e^{−s0} L0 + s0/2 +
    ½ e^{−s1} L1 + s1/2; uniform: e^{−s0} L0 + s0 + e^{−s1} L1 + s1."""
    toy = ToyStep([[1.0, 2.0], [-1.0, 0.5]], [3.0, 2.0], [0.4, 0.1], [1.0, 2.0], kinds=("class", "regression"))
    aug = _augmentation("uw", toy, uw={"form": form})
    with torch.no_grad():
        aug.log_var.copy_(torch.tensor([[0.5], [-0.2]]))
    s0, s1 = 0.5, -0.2
    L0 = 1.0 * 0.4 + 2.0 * 0.1 + 3.0 + 0.5 * 1.0 ** 2           # 4.1
    L1 = -1.0 * 0.4 + 0.5 * 0.1 + 2.0 + 0.5 * 2.0 ** 2          # 3.65
    c0, c1, r = (1.0, 0.5, 0.5) if form == "paper" else (1.0, 1.0, 1.0)
    total, L = aug(toy, BATCH)
    assert L[:, 0].tolist() == pytest.approx([L0, L1])
    assert float(total) == pytest.approx(L0 + L1)                  # the logged loss: unweighted
    gs = aug.log_var.grad[:, 0].tolist()
    assert gs == pytest.approx([-c0 * math.exp(-s0) * L0 + r, -c1 * math.exp(-s1) * L1 + r])
    w0, w1 = c0 * math.exp(-s0), c1 * math.exp(-s1)
    theta_grad = [w0 * 1.0 + w1 * -1.0, w0 * 2.0 + w1 * 0.5]
    assert toy.model.branches[0].weight.grad.view(-1).tolist() == pytest.approx(theta_grad)
    assert toy.model.heads[0].weight.grad.tolist() == pytest.approx([w0 * 1.0, w1 * 2.0])


# ----------------------------------------------------------------------------- GradNorm

def test_gradnorm_two_weight_updates_by_hand():
    """a1 = (3, 0), a2 = (0, 1), b = (1, 1), θ = (1, 1), α = 1.5, SGD lr 0.1 on w and θ.
    Step 1: L = (4, 2) = L(0); ‖∇_W L_i‖ = (3, 1); G = (3, 1), Ḡ = 2, r = (1, 1), target (2, 2):
    ∂L_grad/∂w = (+3, −1); θ's gradient w1 a1 + w2 a2 = (3, 1).
    Step 2: w = (0.7, 1.1) renormalised to sum 2; θ = (0.7, 0.9): L = (3.1, 1.9), r from L/L(0)."""
    alpha = 1.5
    toy = ToyStep([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])
    aug = _augmentation("gradnorm", toy, gradnorm={"alpha": alpha})
    aug.weight.data = aug.weight.data.double()
    params = [toy.model.branches[0].weight, aug.weight]
    opt = torch.optim.SGD(params, lr=0.1)

    opt.zero_grad()
    aug(toy, BATCH)
    assert aug.weight.grad[:, 0].tolist() == pytest.approx([3.0, -1.0])
    assert toy.model.branches[0].weight.grad.view(-1).tolist() == pytest.approx([3.0, 1.0])
    assert aug.initial_loss[:, 0].tolist() == pytest.approx([4.0, 2.0])
    opt.step()

    opt.zero_grad()
    aug(toy, BATCH)
    w = [0.7 * 2 / 1.8, 1.1 * 2 / 1.8]                              # renormalised: Σ w = N = 2
    assert aug.weight[:, 0].tolist() == pytest.approx(w)
    norms = [3.0, 1.0]
    G = [w[0] * norms[0], w[1] * norms[1]]
    ratio = [3.1 / 4.0, 1.9 / 2.0]
    r = [x / (sum(ratio) / 2) for x in ratio]
    target = [sum(G) / 2 * ri ** alpha for ri in r]
    expect = [math.copysign(n, g - t) for n, g, t in zip(norms, G, target)]
    assert aug.weight.grad[:, 0].tolist() == pytest.approx(expect)
    assert toy.model.branches[0].weight.grad.view(-1).tolist() == pytest.approx([w[0] * 3.0, w[1] * 1.0])
    assert aug.last["target"][(1, 0)] == pytest.approx(target[1])


# ----------------------------------------------------------------------------- CS

def test_cs_similarity_matrix_from_known_gradients():
    """g1 = (1, 0 | 0), g2 = (1, 1 | 0), g3 = (0, −2 | 0), g4 = 0 (two parameter tensors each):
    C12 = 1/√2, C13 = 0, C23 = −1/√2; a zero gradient has similarity 0 (its diagonal too)."""
    grads = [[torch.tensor([1.0, 0.0]), torch.tensor([0.0])], [torch.tensor([1.0, 1.0]), torch.tensor([0.0])],
             [torch.tensor([0.0, -2.0]), torch.tensor([0.0])], [torch.zeros(2), torch.zeros(1)]]
    C = gradient_cosine(grads)
    s = 1 / math.sqrt(2)
    expect = [[1, s, 0, 0], [s, 1, -s, 0], [0, -s, 1, 0], [0, 0, 0, 0]]
    assert C.tolist() == [pytest.approx(row) for row in expect]


def test_cs_measures_the_cosine_of_the_task_gradients_of_the_measured_step():
    """The CS run's measurement = the cosine of ∇_θs L_i computed directly at the parameters the
    measured step started from (a copy of the model), on that step's batch."""
    from fastdmtg.builder import build_training_step
    from fastdmtg.pipelines import build_source
    cfg = apply_overrides(get_recipe("synthetic_k3"), [
        "grouping.method=cs-affinity", "model.branches=0", "cs.every=2", "data.image_size=16",
        "data.synthetic_train=256", "train.batch_size=64", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2"])
    torch.manual_seed(0)
    src = build_source(cfg.data, progress=False)
    ts = src.taskset
    step = build_training_step(cfg, ts, src.image_size, torch.device("cpu"))
    from fastdmtg.methods import StepContext
    batches = list(src.batches("train", 64, shuffle=False, seed=0, epoch=0, device=torch.device("cpu"), train=True))
    before = None
    for s, batch in enumerate(batches[:2]):
        if s == 1:
            before = copy.deepcopy(step.model)
        step.runner(batch)
        step.method.observe_step(StepContext(s, 0, batch, step.model, step.optimizer, ts))
    assert int(step.method.affinity_count) == 1
    # direct: task gradients of the encoder of the model as step 1 started, on batch 1
    before.train()
    enc = [p for n, p in before.named_parameters() if not n.startswith("heads.")]
    out = before(batches[1]["image"])
    g = []
    for i in range(ts.num_tasks):
        z = torch.zeros(ts.num_tasks, 1)
        z[i] = 1
        total, _ = ts.head_losses(out, batches[1], z)
        g.append(torch.cat([x.reshape(-1) for x in torch.autograd.grad(total, enc, retain_graph=True)]).double())
    G = torch.stack(g)
    expect = (G @ G.T) / (G.norm(dim=1)[:, None] * G.norm(dim=1)[None, :])
    assert torch.allclose(step.method.last, expect, atol=1e-5)


# ----------------------------------------------------------------------------- torchjd wiring

AGGREGATORS = ["pcgrad", "mgda", "cagrad", "nash-mtl", "imtl", "aligned-mtl", "upgrad"]


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_update_is_the_aggregator_of_the_jacobian(name):
    """Fixed groups {0,1,2}{3} on a model with a shared stem (blocks: the trunk with all 4 tasks,
    branch 1 with tasks 0–2, branch 2 with task 3), SGD lr 0.1: each block's parameters move by
    −0.1 × A(J_b), J_b computed here independently (a copy of the model, one autograd pass per task);
    the heads by −0.1 × their own gradient of Σ z·L."""
    pytest.importorskip("torchjd")
    from fastdmtg.builder import build_training_step
    from fastdmtg.methods.aggregators import make_aggregator
    from fastdmtg.pipelines import build_source
    cfg = apply_overrides(get_recipe("synthetic_k3"), [
        "grouping.method=fixed", "grouping.groups=0,1,2|3", "model.branches=0", "model.shared=stem",
        f"train.aggregator={name}", "data.image_size=16", "data.synthetic_train=64", "train.batch_size=32",
        "data.synthetic_groups=2", "data.synthetic_tasks_per_group=2", "optim.name=sgd", "optim.lr=0.1",
        "optim.momentum=0", "model.width=2"])
    torch.manual_seed(0)
    src = build_source(cfg.data, progress=False)
    ts = src.taskset
    step = build_training_step(cfg, ts, src.image_size, torch.device("cpu"))
    assert step.mode == "eager" and not step.speed["batched"]
    batch = next(iter(src.batches("train", 32, shuffle=False, seed=0, epoch=0, device=torch.device("cpu"), train=True)))
    ref = copy.deepcopy(step.model)
    ref.train()
    out = ref(batch["image"])
    z = step.method.weights()
    blocks = {"trunk": (list(ref.shared.parameters()), [(0, 0), (1, 0), (2, 0), (3, 1)]),
              "branch 1": (list(ref.branches[0].parameters()), [(0, 0), (1, 0), (2, 0)]),
              "branch 2": (list(ref.branches[1].parameters()), [(3, 1)])}
    expected = {}
    torch.manual_seed(123)                         # PCGrad's random order: the same draws as the step
    for key, (params, heads) in blocks.items():
        rows = []
        for i, k in heads:
            e = torch.zeros_like(z)
            e[i, k] = 1
            loss, _ = ts.head_losses(out, batch, e)
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]))
        J = torch.stack(rows)
        # one head: its own gradient (nothing to aggregate)
        expected[key] = (J, make_aggregator(name, cfg, len(heads))(J) if len(heads) > 1 else J[0])
    total, _ = ts.head_losses(out, batch, z)
    head_grads = torch.autograd.grad(total, list(ref.heads.parameters()))
    aug = step.method.step_backward()
    assert [b.name for b in aug.blocks] == list(blocks)
    torch.manual_seed(123)
    step.runner(batch)
    for (key, (params, _)), (J_step, _) in zip(blocks.items(), aug.last):
        J, v = expected[key]
        assert torch.allclose(J_step, J, atol=1e-6), key
        moved = torch.cat([(p0 - p).reshape(-1) for p0, p in
                           zip(params, {"trunk": step.model.shared, "branch 1": step.model.branches[0],
                                        "branch 2": step.model.branches[1]}[key].parameters())])
        assert torch.allclose(moved, 0.1 * v, atol=1e-5), key
    for h0, h, g in zip(ref.heads.parameters(), step.model.heads.parameters(), head_grads):
        assert torch.allclose(h0 - h, 0.1 * g, atol=1e-6)


def test_without_torchjd_the_aggregators_say_how_to_install_it(monkeypatch, tmp_path, capsys):
    """torchjd missing: `fastdmtg train --method pcgrad` stops with one line naming the extra, exit 2."""
    import sys
    from fastdmtg.cli import main
    monkeypatch.setitem(sys.modules, "torchjd", None)               # import torchjd → ImportError
    code = main(["train", "--method", "pcgrad", "--out", str(tmp_path / "r"), *FAST,
                 "--set", "train.epochs=1", "--set", "data.synthetic_train=64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'fastdmtg[aggregators]'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- config and step

def test_aggregator_config_errors():
    base = get_recipe("synthetic_k3")
    with pytest.raises(ConfigError, match="train.aggregator=pcgrad applies to"):
        evolve(base, train={"aggregator": "pcgrad"})                                   # dmtg: learned weights
    with pytest.raises(ConfigError, match="already trains with uw"):
        evolve(base, grouping={"method": "uw"}, model={"branches": 0}, train={"aggregator": "pcgrad"})
    with pytest.raises(ConfigError, match="train.aggregator: expected none"):
        evolve(base, train={"aggregator": "nope"})
    with pytest.raises(ConfigError, match="one encoder for all tasks"):
        evolve(base, grouping={"method": "gradnorm"})                                   # the recipe's K = 3
    assert evolve(base, grouping={"method": "gradnorm"}, model={"branches": 0}).num_branches == 1
    with pytest.raises(ConfigError, match="gradnorm.alpha"):
        evolve(base, gradnorm={"alpha": -1.0})
    with pytest.raises(ConfigError, match="uw.form"):
        evolve(base, uw={"form": "other"})


def test_augmentation_refuses_compile_on_and_ddp():
    from fastdmtg.builder import resolve
    cfg = apply_overrides(get_recipe("synthetic_naive"), ["grouping.method=pcgrad", "train.compile=on"])
    with pytest.raises(ValueError, match="train.compile=on: training augmentation pcgrad runs eagerly"):
        resolve(cfg, torch.device("cpu"), 1)
    cfg = apply_overrides(get_recipe("synthetic_naive"), ["grouping.method=uw"])
    with pytest.raises(ValueError, match="not supported under DDP"):
        resolve(cfg, torch.device("cpu"), 2)
    assert resolve(cfg, torch.device("cpu"), 1).batched is False


def test_plain_methods_keep_the_plain_backward():
    """No augmentation: the method has none, the runner calls total.backward() (every fast path)."""
    cfg = get_recipe("synthetic_k3")
    assert build_method(cfg, 9).step_backward() is None
    fixed = evolve(cfg, grouping={"method": "fixed", "groups": [[0, 1, 2], [3, 4, 5], [6, 7, 8]]}, model={"branches": 0})
    assert build_method(fixed, 9).step_backward() is None
    aug = build_method(evolve(fixed, train={"aggregator": "uw"}), 9).step_backward()
    assert aug is not None and aug.name == "uw" and tuple(aug.log_var.shape) == (9, 3)


def test_uw_state_is_checkpointed_with_the_method():
    cfg = evolve(get_recipe("synthetic_naive"), grouping={"method": "uw"})
    m = build_method(cfg, 3)
    assert "augment.log_var" in m.state_dict()
    assert any(p is m.augment.log_var for p in m.parameters())      # the run's optimizer trains it


# ----------------------------------------------------------------------------- compare

@pytest.mark.timeout(600)
def test_compare_tag_paper_methods_on_the_embedded_data(tmp_path, capsys):
    """naive, UW, GradNorm, PCGrad, CS and TAG + PCGrad in one comparison (1 epoch, small sizes):
    every row present, in the TAG paper's order (grouping methods, augmentations, combinations), the
    augmentations as one shared network, tag-pcgrad as TAG's networks trained with PCGrad."""
    pytest.importorskip("torchjd")
    from fastdmtg.compare import compare_main
    out = tmp_path / "cmp"
    sets = ["data.synthetic_groups=2", "data.synthetic_tasks_per_group=2", "data.synthetic_train=256",
            "data.synthetic_val=64", "data.synthetic_test=64", "train.epochs=1", "train.batch_size=64",
            "data.image_size=16", "model.width=2", "tag.affinity_every=2", "cs.every=2"]
    args = ["--recipe", "synthetic_k3", "--methods", "pcgrad,tag-pcgrad,naive,uw,gradnorm,cs", "--k", "2",
            "--out", str(out), "--no-flops", *FAST, *[x for s in sets for x in ("--set", s)]]
    assert compare_main(args) == 0
    capsys.readouterr()
    data = json.loads((out / "comparison.json").read_text())
    # categories in order, the order given within each
    assert [r["method"] for r in data["rows"]] == ["naive", "cs", "pcgrad", "uw", "gradnorm", "tag+pcgrad"]
    for r in data["rows"]:
        assert "error" not in r and math.isfinite(r["total_loss"]), r["method"]
    for name in ("uw", "gradnorm", "pcgrad"):
        c = json.loads((out / name / "config.json").read_text())
        assert c["grouping"]["method"] == name and Config.from_dict(c).num_branches == 1
    uw = json.loads((out / "uw" / "results.json").read_text())["augmentation"]
    assert uw["name"] == "uw" and len(uw["log_var"]) == 4 and any(v[0] != 0 for v in uw["log_var"])
    gn = json.loads((out / "gradnorm" / "results.json").read_text())["augmentation"]
    assert sum(v[0] for v in gn["weight"]) == pytest.approx(4) and gn["alpha"] == 1.5
    tp = json.loads((out / "tag-pcgrad" / "k2" / "config.json").read_text())
    tag_sel = data["details"]["tag_selection_k2"]
    assert tp["train"]["aggregator"] == "pcgrad" and tp["grouping"]["groups"] == tag_sel["networks"]
    cs = data["details"]["cs_similarity"]
    assert len(cs["matrix"]) == 4 and cs["measurements"] >= 1
    assert all(abs(cs["matrix"][i][i] - 1) < 1e-9 for i in range(4))
    md = (out / "comparison.md").read_text()
    assert "| tag+pcgrad | 2 |" in md and "| uw | — |" in md


def test_compare_aggregator_switch_trains_the_selected_networks(tmp_path, capsys):
    """--aggregator uw: RG's networks train with UW (rows rg+uw); the naive reference does not."""
    from fastdmtg.compare import compare_main
    out = tmp_path / "agg"
    sets = ["data.synthetic_groups=2", "data.synthetic_tasks_per_group=1", "data.synthetic_train=128",
            "data.synthetic_val=64", "data.synthetic_test=64", "train.epochs=1", "train.batch_size=64",
            "data.image_size=16", "model.width=1"]
    args = ["--recipe", "synthetic_k3", "--methods", "naive,rg", "--k", "2", "--rg-partitions", "1",
            "--aggregator", "uw", "--out", str(out), "--no-flops", *FAST, *[x for s in sets for x in ("--set", s)]]
    assert compare_main(args) == 0
    capsys.readouterr()
    rows = [r["method"] for r in json.loads((out / "comparison.json").read_text())["rows"]]
    assert rows == ["naive", "rg+uw"]
    assert json.loads((out / "rg" / "k2" / "seed0" / "config.json").read_text())["train"]["aggregator"] == "uw"
    assert json.loads((out / "naive" / "config.json").read_text())["train"]["aggregator"] == "none"
    assert compare_main(["--out", str(out), "--aggregator", "bogus"]) == 2
    assert "unknown training augmentation" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every dataset (shapes)

def _one_step(cfg, expect_blocks):
    """One step of ``cfg`` built as a run builds it: finite losses, a gradient on every shared parameter
    of every block, J_b of shape (heads of the block, its parameters)."""
    from fastdmtg.builder import build_training_step
    from fastdmtg.pipelines import build_source
    torch.manual_seed(0)
    src = build_source(cfg.data, progress=False)
    step = build_training_step(cfg, src.taskset, src.image_size, torch.device("cpu"))
    batch = next(iter(src.batches("train", cfg.train.batch_size, shuffle=False, seed=0, epoch=0,
                                  device=torch.device("cpu"), train=True)))
    total, L = step.runner(batch)
    assert torch.isfinite(total) and torch.isfinite(L).all()
    aug = step.method.step_backward()
    if hasattr(aug, "blocks"):
        assert [b.name for b in aug.blocks] == expect_blocks
        for block, (J, v) in zip(aug.blocks, aug.last):
            assert tuple(J.shape) == (len(block.heads), sum(p.numel() for p in block.params))
            assert all(p.grad is not None for p in block.params)
    return step


@pytest.mark.timeout(900)
def test_pcgrad_on_the_taskonomy_fixture(tmp_path):
    """Xception with a shared trunk and decoders (list heads), fixed groups {seg, depth}{normal, kp, edge}
    trained with PCGrad: three blocks (the Xception costs ~30 s on an idle 2-core CPU: one test only);
    UW's factors on the Taskonomy tasks: segmentation a classification, the rest regression."""
    pytest.importorskip("torchjd")
    from taskonomy_fixture import write_fixture
    from fastdmtg.data import taskonomy as tx
    raw = write_fixture(tmp_path / "raw", layout="domain", size=32)
    tx.prepare(raw["root"], tmp_path / "prep", 32, split_file=raw["split_file"], workers=1, progress=False)
    cfg = apply_overrides(get_recipe("taskonomy5_k3"), [
        f"data.root={tmp_path / 'prep'}", "data.image_size=32", "data.num_workers=0", "data.backend=memory",
        "grouping.method=fixed", "grouping.groups=0,1|2,3,4", "model.branches=0", "model.shared_blocks=4",
        "train.aggregator=pcgrad", "train.batch_size=2", "train.init=scratch", "train.amp=off"])
    step = _one_step(cfg, ["trunk", "branch 1", "branch 2"])
    uw = build_method(evolve(cfg, train={"aggregator": "uw"}), 5).step_backward()
    uw.bind(step.model, step.runner.eager_fn.taskset, step.method.weights())
    assert [s.kind for s in step.runner.eager_fn.taskset.specs][0] == "segment"
    assert uw.factor[:, 0].tolist() == [1.0, 0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("name", ["uw", "gradnorm", "mgda"])
def test_augmentations_on_celeba_and_your_own_folder(name, tmp_path):
    """The CelebA ResNet variant on the CelebA-format fixture (9 attributes, one shared network) and your
    own folder with a binary, a multiclass and a regression task."""
    if name == "mgda":
        pytest.importorskip("torchjd")
    from celeba_fixture import write_celeba
    from folder_fixture import mixed_folder
    write_celeba(tmp_path / "celeba", n=8)
    cfg = apply_overrides(get_recipe("celeba9_naive"), [
        f"data.root={tmp_path / 'celeba'}", f"grouping.method={name}", "model.width=4", "train.batch_size=4",
        "data.num_workers=0", "data.backend=memory"])
    _one_step(cfg, ["branch 1"])
    root = mixed_folder(tmp_path / "own", n=12, size=16)
    cfg = apply_overrides(get_recipe("folder_naive"), [
        f"data.root={root}", f"grouping.method={name}", "model.width=4", "train.batch_size=6", "data.image_size=16",
        "data.num_workers=0", "data.backend=memory"])
    step = _one_step(cfg, ["branch 1"])
    if name == "uw":                  # smile (binary), hair (multiclass): 1; age (regression): ½
        assert step.method.augment.factor[:, 0].tolist() == [1.0, 1.0, 0.5]


# ----------------------------------------------------------------------------- K branches, a trunk (unit)
# The toy step with K branches (each a (1, 2) vector θ_k, or none: the branch then uses the trunk's θ)
# and the method's weights z given: L_ik = a_i · θ_k + b_i + ½ h_i²  (h: the heads' parameter).
# Written from mutants of benchmarks/mutation.py (docs/testing.md) that the one-branch toy cannot tell.

class _Weights:
    def __init__(self, z):
        self.z = torch.as_tensor(z, dtype=torch.float64)

    def weights(self):
        return self.z


class ToyNetK(nn.Module):
    def __init__(self, thetas, heads, trunk=None):
        super().__init__()
        self.shared = nn.Sequential() if trunk is None else _Param([trunk])
        self.branches = nn.ModuleList([nn.Sequential() if t is None else _Param([t]) for t in thetas])
        self.heads = nn.ModuleList([_Param(heads)])


class ToyStepK:
    def __init__(self, A, b, thetas, heads, z, trunk=None, kinds=None, saves=False):
        self.saves = saves
        self.A, self.b = torch.tensor(A, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        self.model = ToyNetK(thetas, heads, trunk)
        self.method = _Weights(z)
        self.taskset = ToyTasks(kinds or ["class"] * len(b))

    def outputs(self, batch):
        thetas = [br.weight.view(-1) if isinstance(br, _Param) else self.model.shared.weight.view(-1)
                  for br in self.model.branches]
        out = torch.stack(thetas, 1)                                    # (2, K)
        # ** 1.0 keeps the values and gradients but saves its input for the backward, as a network's
        # layers do: a backward pass that frees the graph makes a later one through it fail
        if self.saves:
            self.last_out = out ** 1.0
            return self.last_out
        return out

    def losses(self, outputs, batch, z):
        h = self.model.heads[0].weight
        L = self.A @ outputs + self.b[:, None] + 0.5 * (h ** 2)[:, None]     # (N, K)
        return (z.to(L.dtype) * L).sum(), L.detach()


def _bound(name, toy, groups=None, **sections):
    """The augmentation ``name`` bound to the toy: on naive MTL (K = 1), or on fixed ``groups`` (K of them)."""
    if groups is None:
        cfg = evolve(get_recipe("synthetic_naive"), grouping={"method": name}, **sections)
    else:
        cfg = evolve(get_recipe("synthetic_naive"), grouping={"method": "fixed", "groups": groups},
                     model={"branches": 0}, train={"aggregator": name}, **sections)
    aug = build_method(cfg, len(toy.b)).step_backward()
    aug.bind(toy.model, toy.taskset, toy.method.weights())
    return aug


def test_shared_blocks_trunk_branches_and_refusals():
    """Blocks: the trunk (every active head, task-major) and each branch with an active head and
    parameters of its own; a branch without heads or without parameters is none."""
    from fastdmtg.methods.augment import active_heads, shared_blocks
    z = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    model = ToyNetK([[1.0, 0.0], [0.0, 1.0], None], [0.0, 0.0, 0.0], trunk=[1.0, 1.0])
    assert active_heads(z) == [(0, 0), (1, 0), (1, 2), (2, 2)]
    blocks = shared_blocks(model, z)
    assert [(b.name, b.heads) for b in blocks] == [("trunk", [(0, 0), (1, 0), (1, 2), (2, 2)]),
                                                   ("branch 1", [(0, 0), (1, 0)])]
    assert blocks[0].params == [model.shared.weight] and blocks[1].params == [model.branches[0].weight]
    model.shared.weight.requires_grad_(False)                          # a frozen trunk: no block
    model.branches[0].weight.requires_grad_(False)
    assert shared_blocks(model, z) == []
    with pytest.raises(ValueError, match="needs per-branch modules"):
        shared_blocks(nn.Linear(2, 2), z)
    for bad in (torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 0.0]])):
        with pytest.raises(ValueError, match="constant 0/1 weights"):
            active_heads(bad)


def test_last_layer_is_the_last_weight_of_two_or_more_dimensions():
    from fastdmtg.methods.augment import head_params, last_layer
    lin, conv, bn, bias = torch.zeros(3, 2), torch.zeros(2, 2, 3, 3), torch.zeros(2), torch.zeros(3)
    assert last_layer([conv, lin, bn]) is lin
    assert last_layer([lin, conv, bn, bias]) is conv
    assert last_layer([lin]) is lin
    one = torch.zeros(1)
    assert last_layer([bias, bn, one]) is one and last_layer([bias, bn]) is bn    # only 1-d: the last one
    net = ToyNetK([[1.0, 0.0]], [1.0, 2.0])
    net.heads.append(_Param([3.0]))
    net.heads[1].weight.requires_grad_(False)
    assert head_params(net) == [net.heads[0].weight]                    # the trainable ones


def test_pcgrad_per_branch_and_on_the_trunk():
    """K = 2, z = [[1, 0], [1, 0], [0, 1]]: branch 1 holds tasks 0, 1 (conflicting: PCGrad's (½, 3/2)
    as in the one-branch case), branch 2 task 2 alone (its own gradient, nothing to aggregate)."""
    pytest.importorskip("torchjd")
    z = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    toy = ToyStepK([[1.0, 0.0], [-1.0, 1.0], [2.0, -3.0]], [1.0, 1.0, 1.0], [[0.3, -0.2], [0.1, 0.1]],
                   [2.0, -3.0, 1.0], z)
    toy.model.heads.append(_Param([0.0]))                   # a head the step does not run: no gradient
    # a shared parameter no loss reaches (a layer the forward skips): a zero column of J, a zero update
    toy.model.branches[0].unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    aug = _bound("pcgrad", toy, groups=[[0, 1], [2]])
    assert [(b.name, b.heads) for b in aug.blocks] == [("branch 1", [(0, 0), (1, 0)]), ("branch 2", [(2, 1)])]
    assert aug.aggregators[1] is None
    aug(toy, BATCH)
    assert toy.model.heads[1].weight.grad is None
    assert toy.model.branches[0].weight.grad.view(-1).tolist() == pytest.approx([0.5, 1.5])
    assert toy.model.branches[1].weight.grad.view(-1).tolist() == pytest.approx([2.0, -3.0])
    assert toy.model.heads[0].weight.grad.tolist() == pytest.approx([2.0, -3.0, 1.0])
    (J1, v1), (J2, v2) = aug.last
    assert J1.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0, 0.0]] and J2.tolist() == [[2.0, -3.0]]
    assert toy.model.branches[0].unused.grad.tolist() == [0.0, 0.0, 0.0]
    # a trunk shared by both branches, the branches without parameters: one block, the trunk, all heads
    toy = ToyStepK([[1.0, 0.0], [-1.0, 1.0], [2.0, 2.0]], [1.0, 1.0, 1.0], [None, None], [0.0, 0.0, 0.0], z,
                   trunk=[0.0, 0.0])
    aug = _bound("pcgrad", toy, groups=[[0, 1], [2]])
    assert [(b.name, b.heads) for b in aug.blocks] == [("trunk", [(0, 0), (1, 0), (2, 1)])]
    aug(toy, BATCH)
    J, v = aug.last[0]
    assert J.tolist() == [[1.0, 0.0], [-1.0, 1.0], [2.0, 2.0]]
    assert toy.model.shared.weight.grad.view(-1).tolist() == pytest.approx(v.tolist())


def test_aggregator_solver_missing_names_the_install(monkeypatch):
    pytest.importorskip("torchjd")
    import sys
    from fastdmtg.methods.aggregators import make_aggregator
    cfg = get_recipe("synthetic_naive")
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    with pytest.raises(ValueError, match=r"^cagrad: .*\(or pip install 'fastdmtg\[aggregators\]'\)$"):
        make_aggregator("cagrad", cfg, 2)


def test_gradnorm_renormalises_per_branch_and_leaves_other_weights():
    """Σ_{T_k} w = |T_k| per branch; weights outside the method's heads stay as they are; a one-task
    branch's weight is 1 whatever it was (also below 1)."""
    z = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    toy = ToyStepK([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1.0, 1.0, 1.0], [[1.0, 1.0], [1.0, 1.0]],
                   [0.0, 0.0, 0.0], z)
    aug = _bound("gradnorm", toy, groups=[[0, 1], [2]])
    with torch.no_grad():
        aug.weight.copy_(torch.tensor([[0.5, 7.0], [1.0, 3.0], [9.0, 0.25]]))
    aug.renormalise()
    assert aug.weight.tolist() == [pytest.approx([0.5 * 2 / 1.5, 7.0]), pytest.approx([1.0 * 2 / 1.5, 3.0]),
                                   pytest.approx([9.0, 1.0])]
    assert aug.results()["weight"] == aug.weight.tolist() and aug.results()["alpha"] == 1.5
    from fastdmtg.methods.gradnorm import GradNorm
    assert GradNorm(3, 2).alpha == 1.5                                  # the paper's CelebA/NYU value


def test_gradnorm_skips_a_branch_without_tasks_and_uses_the_trunk_without_branch_weights():
    """Branch 1 has no task (z = 0): GradNorm on branch 2 alone, with the numbers of the one-branch
    hand test (∂L_grad/∂w = (+3, −1) at step 1). Then the same with the branches parameter-free: W is
    the trunk's last layer."""
    for thetas, trunk in (([[5.0, 5.0], [1.0, 1.0]], None), ([None, None], [1.0, 1.0])):
        toy = ToyStepK([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0], thetas, [0.0, 0.0], [[0.0, 1.0], [0.0, 1.0]],
                       trunk=trunk)
        aug = _bound("gradnorm", toy, groups=[[0], [1]], gradnorm={"alpha": 1.5})
        aug.weight.data = aug.weight.data.double()
        aug(toy, BATCH)
        assert aug.weight.grad.tolist() == [[0.0, 3.0], [0.0, -1.0]]
        assert aug.initial_loss.tolist() == [[0.0, 4.0], [0.0, 2.0]]
        W = toy.model.branches[1].weight if trunk is None else toy.model.shared.weight
        assert W.grad.view(-1).tolist() == pytest.approx([3.0, 1.0])
        assert aug.last["G"] == {(0, 1): pytest.approx(3.0), (1, 1): pytest.approx(1.0)}


def test_uw_factors_by_task_kind_and_results():
    """c = 1 for every classification kind, ½ for the others (paper form); the uniform form keeps 1."""
    kinds = ["class", "segment", "binary", "multiclass", "regression", "depth"]
    toy = ToyStepK([[1.0, 0.0]] * 6, [1.0] * 6, [[0.0, 0.0]], [0.0] * 6, [[1.0]] * 6, kinds=kinds)
    aug = _bound("uw", toy)
    assert aug.factor[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert aug.results() == {"name": "uw", "form": "paper", "log_var": [[0.0]] * 6}
    aug = _bound("uw", toy, uw={"form": "uniform"})
    assert aug.factor[:, 0].tolist() == [1.0] * 6
    from fastdmtg.methods.uw import UncertaintyWeighting
    assert UncertaintyWeighting(2, 1).form == "paper"


def test_cs_similarity_of_short_and_long_gradients_and_its_results():
    """The cosine does not depend on the gradients' lengths (norms below and above 1); extra_results
    before any measurement (none) and after two (their mean)."""
    grads = [[torch.tensor([0.5, 0.0])], [torch.tensor([0.01, 0.01])], [torch.tensor([0.0, 3.0])]]
    s = 1 / math.sqrt(2)
    assert gradient_cosine(grads).tolist() == [pytest.approx(r) for r in [[1, s, 0], [s, 1, s], [0, s, 1]]]
    cfg = apply_overrides(get_recipe("synthetic_naive"), ["grouping.method=cs-affinity", "cs.every=3"])
    m = build_method(cfg, 2)
    assert m.extra_results() == {"cs_similarity": None, "cs_measurements": 0, "cs_every": 3}
    with torch.no_grad():
        m.affinity_sum.copy_(torch.tensor([[2.0, 0.5], [0.5, 2.0]], dtype=torch.float64))
        m.affinity_count.fill_(2)
    assert m.extra_results() == {"cs_similarity": [[1.0, 0.25], [0.25, 1.0]], "cs_measurements": 2, "cs_every": 3}
    m.on_epoch_start(1)                                    # the totals the results are taken from
    with torch.no_grad():
        m.affinity_count.fill_(5)
    assert m.extra_results()["cs_measurements"] == 2


def test_uw_and_gradnorm_with_heads_off_a_branch():
    """K = 2, z = [[1, 0], [0, 1]]: the inactive heads' log-variances get no gradient (UW), and the
    logged loss of both is Σ z·L over the active heads (UW: L_00 = 1 + 1 = 2, L_11 = 2 + 1 = 3)."""
    z = [[1.0, 0.0], [0.0, 1.0]]
    toy = ToyStepK([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0], [[1.0, 1.0], [2.0, 2.0]], [0.0, 0.0], z,
                   kinds=["class", "regression"])
    aug = _bound("uw", toy, groups=[[0], [1]])
    total, L = aug(toy, BATCH)
    assert float(total) == pytest.approx(2.0 + 3.0)
    assert aug.log_var.grad.tolist() == [pytest.approx([-1.0 * 2.0 + 0.5, 0.0]), pytest.approx([0.0, -0.5 * 3.0 + 0.5])]
    # GradNorm: one task per branch, so G_i = Ḡ and r_i = 1 on each: no weight moves (‖∇L_0‖ = 3 on
    # branch 1, ‖∇L_1‖ = 1 on branch 2: a task counted on the other branch would make them differ)
    toy = ToyStepK([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0], [[1.0, 1.0], [2.0, 2.0]], [0.0, 0.0], z)
    aug = _bound("gradnorm", toy, groups=[[0], [1]])
    aug.weight.data = aug.weight.data.double()
    total, L = aug(toy, BATCH)
    assert float(total) == pytest.approx(4.0 + 3.0)
    assert aug.weight.grad.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert aug.last["G"] == {(0, 0): pytest.approx(3.0), (1, 1): pytest.approx(1.0)}


def test_gradnorm_with_more_networks_than_tasks():
    """Overlapping networks {0}, {1}, {0, 1} (K = 3 > N = 2): the third network's two tasks are
    balanced as in the one-branch hand test (∂L_grad/∂w = (+3, −1)), the one-task networks not at all."""
    toy = ToyStepK([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0], [[1.0, 1.0]] * 3, [0.0, 0.0], [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
                   saves=True)
    cfg = evolve(get_recipe("synthetic_naive"), grouping={"method": "networks", "groups": [[0], [1], [0, 1]],
                                                         "auxiliary": [[], [], [0, 1]]},
                 model={"branches": 0}, train={"aggregator": "gradnorm"})
    aug = build_method(cfg, 2).step_backward()
    aug.bind(toy.model, toy.taskset, toy.method.weights())
    aug.weight.data = aug.weight.data.double()
    aug(toy, BATCH)
    assert aug.weight.grad.tolist() == [[0.0, 0.0, 3.0], [0.0, 0.0, -1.0]]
    assert sorted(aug.last["G"]) == [(0, 0), (0, 2), (1, 1), (1, 2)]


def test_aggregation_frees_the_steps_graph_with_the_last_task_backward():
    """The last per-task backward pass frees the step's graph (its saved activations are not held
    while the aggregator solves): a backward through the step's outputs afterwards fails."""
    pytest.importorskip("torchjd")
    z = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    toy = ToyStepK([[1.0, 0.0], [-1.0, 1.0], [2.0, -3.0]], [1.0, 1.0, 1.0], [[0.3, -0.2], [0.1, 0.1]],
                   [2.0, -3.0, 1.0], z, saves=True)
    aug = _bound("pcgrad", toy, groups=[[0, 1], [2]])
    aug(toy, BATCH)
    assert toy.model.branches[0].weight.grad.view(-1).tolist() == pytest.approx([0.5, 1.5])
    with pytest.raises(RuntimeError, match="second time"):
        toy.last_out.sum().backward()


def test_aggregation_section_defaults_are_the_papers_values_and_its_bounds_are_inclusive():
    """AggregationConfig: the defaults docs/baselines.md names (CAGrad's c = 0.4 of its image-MTL
    experiments; Nash-MTL's max norm 1.0 and an update every step, its code's defaults), and each
    bound where it is: c = 0 and max norm = 0 (off) accepted, below refused; every ≥ 1 accepted, 0 refused."""
    from fastdmtg.configcheck import ConfigError
    from fastdmtg.methods.aggregators import AggregationConfig

    a = AggregationConfig()
    assert (a.cagrad_c, a.nash_max_norm, a.nash_update_every) == (0.4, 1.0, 1)
    for ok in ({"cagrad_c": 0.0}, {"cagrad_c": 0.5}, {"nash_max_norm": 0.0}, {"nash_max_norm": 0.5},
               {"nash_update_every": 1}, {"nash_update_every": 3}):
        assert AggregationConfig(**ok)
    for bad, field in (({"cagrad_c": -0.5}, "cagrad_c"), ({"nash_max_norm": -0.5}, "nash_max_norm"),
                       ({"nash_update_every": 0}, "nash_update_every")):
        with pytest.raises(ConfigError, match=f"aggregation.{field} must be >= "):
            AggregationConfig(**bad)
