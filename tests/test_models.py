"""Architecture: shapes and parameter counts of the CelebA ResNet variant and the containers."""
import pytest
import torch

from fastdmtg.config import ModelConfig
from fastdmtg.models import GroupedNet, MultiBranchNet, build_multibranch
from fastdmtg.models.resnet_celeba import feature_dim
from fastdmtg.tasks.attributes import AttributeTaskSet


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_feature_dim_is_14400_at_64px():
    assert feature_dim(64, 64) == 14400


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shared", ["none", "stem"])
def test_celeba_parameter_counts(k, shared):
    n = 9
    model = build_multibranch(ModelConfig(arch="resnet_celeba", branches=k, shared=shared),
                              AttributeTaskSet([f"t{i}" for i in range(n)]).specs, 64)
    trunk, stem = 75_840, 1_728 + 128          # stem = conv 3x3x3x64 + BN(64)
    head = 28_802                               # Linear(14400, 2)
    if shared == "none":
        want = k * trunk + k * n * head
    else:
        want = stem + k * (trunk - stem) + k * n * head
    assert n_params(model) == want


def test_forward_shapes_and_identical_branches():
    model = build_multibranch(ModelConfig(branches=3), AttributeTaskSet(["a", "b", "c", "d"]).specs, 64).eval()
    x = torch.rand(5, 3, 64, 64)
    out = model(x)
    assert out.shape == (3, 4, 5, 2)                       # (K, N, B, C)
    # deep copies: every branch computes the same function at initialisation
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], out[2])


def test_grouped_net_equals_argmax_selection():
    torch.manual_seed(0)
    specs = AttributeTaskSet([f"t{i}" for i in range(5)]).specs
    model = build_multibranch(ModelConfig(branches=3, width=8), specs, 32)
    for p in model.parameters():                               # make branches differ
        p.data.add_(0.05 * torch.randn_like(p))
    model.eval()
    assignment = torch.tensor([2, 0, 2, 2, 0])                 # branch 1 unused → dropped
    grouped = GroupedNet.from_multibranch(model, assignment.tolist()).eval()
    assert len(grouped.branches) == 2
    assert grouped.groups == [[1, 4], [0, 2, 3]]
    assert sum(h.num_tasks for h in grouped.heads) == 5        # N heads left of K·N
    x = torch.rand(4, 3, 32, 32)
    want = model.select_outputs(model(x), assignment)
    assert torch.allclose(grouped(x), want, atol=1e-6)


def test_invalid_k():
    from fastdmtg.config import ConfigError
    for bad in (-1, 65):
        with pytest.raises(ConfigError, match=r"model.branches \(K\) must be"):
            ModelConfig(branches=bad)
    assert ModelConfig(branches=0).branches == 0 and ModelConfig(branches=64).branches == 64   # 0 = auto


@pytest.mark.parametrize("shared", ["none", "stem"])
def test_batched_branches_equal_separate_branches(shared):
    """The grouped-conv form computes the same outputs and gradients as K separate branches, and
    converts back exactly."""
    from fastdmtg.models.batched import BatchedMultiBranchNet
    torch.manual_seed(0)
    specs = AttributeTaskSet([f"t{i}" for i in range(4)]).specs
    mb = build_multibranch(ModelConfig(branches=3, width=8, shared=shared), specs, 32)
    for p in mb.parameters():                                   # branches must differ for the test to bite
        p.data.add_(0.1 * torch.randn_like(p))
    bt = BatchedMultiBranchNet(mb)
    assert sum(p.numel() for p in bt.parameters()) == sum(p.numel() for p in mb.parameters())
    x = torch.rand(6, 3, 32, 32)
    for train_mode in (True, False):
        mb.train(train_mode), bt.train(train_mode)
        a, b = mb(x), bt(x)
        assert a.shape == b.shape == (3, 4, 6, 2)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mb.train(), bt.train()
    g = torch.randn(3, 4, 6, 2)
    (mb(x) * g).sum().backward()
    (bt(x) * g).sum().backward()
    back = bt.to_multibranch()
    # BN running statistics were updated identically, and the values convert back exactly
    for (n1, t1), (n2, t2) in zip(mb.state_dict().items(), back.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6)
    # gradients agree: compare the batched head gradient with the per-branch ones
    torch.testing.assert_close(bt.head_weight.grad, torch.stack([h.weight.grad for h in mb.heads]), rtol=1e-4, atol=1e-5)
    conv = [m for m in bt.branch.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    per = [[m for m in br.modules() if isinstance(m, torch.nn.Conv2d)][-1] for br in mb.branches]
    torch.testing.assert_close(conv.weight.grad, torch.cat([c.weight.grad for c in per]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared_blocks", [10, 0])
def test_batched_xception_with_decoders_equals_separate_branches(shared_blocks):
    """Taskonomy: batched Xception branches (grouped separable convs; at shared_blocks=0 the whole
    encoder, stem included, with a dense first conv) + the K·N decoders fed from channel blocks, with
    the reference's 1/√K gradient scaling: same outputs, gradients and BN statistics as K separate
    branches; with head pruning (a dead middle branch and a dropped head) only the active heads run."""
    from fastdmtg.models.batched import BatchedMultiBranchNet, supports_batching
    from fastdmtg.tasks.taskonomy import TaskonomyTaskSet
    torch.manual_seed(0)
    specs = TaskonomyTaskSet(["segment_semantic", "depth_zbuffer", "normal"]).specs
    mb = build_multibranch(ModelConfig(arch="xception", branches=3, shared_blocks=shared_blocks), specs, 32)
    assert mb.branch_grad_scale != 1.0 and supports_batching(mb)
    for p in mb.parameters():                                   # branches must differ for the test to bite
        p.data.add_(0.05 * torch.randn_like(p))
    bt = BatchedMultiBranchNet(mb)
    assert n_params(bt) == n_params(mb)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    outs_a, outs_b = mb(x), bt(x)
    assert [o.shape for o in outs_a] == [o.shape for o in outs_b] == [(3, 4, 18, 32, 32), (3, 4, 1, 32, 32),
                                                                     (3, 4, 3, 32, 32)]
    gs = [torch.randn_like(o) for o in outs_a]
    sum((o * g).sum() for o, g in zip(outs_a, gs)).backward()
    ga = x.grad.clone()
    x.grad = None
    sum((o * g).sum() for o, g in zip(outs_b, gs)).backward()

    def rel(a, b):
        return float((a - b).detach().norm() / a.detach().norm())
    assert max(rel(a, b) for a, b in zip(outs_a, outs_b)) < 1e-4
    # the input gradient crosses every (scaled) branch and, at shared_blocks=0, the whole encoder:
    # ~30 train-mode BNs over 2×2 maps amplify float rounding to ~1e-3 there (measured)
    tol = 1e-4 if shared_blocks else 1e-2
    assert rel(ga, x.grad) < tol
    back = bt.to_multibranch()
    for (n1, t1), (n2, t2) in zip(mb.state_dict().items(), back.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(t1, t2, rtol=1e-4, atol=1e-5, msg=n1)
    # parameter gradients: a decoder of branch 2, and the batched last conv vs the per-branch ones
    assert rel(mb.heads[2].heads[1][0].weight.grad, bt.heads[2].heads[1][0].weight.grad) < tol
    conv = [m for m in bt.branch.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    per = [[m for m in br.modules() if isinstance(m, torch.nn.Conv2d)][-1] for br in mb.branches]
    assert rel(torch.cat([c.weight.grad for c in per]), conv.weight.grad) < tol
    # pruning: branch 1 dead, task 0 also dropped on branch 2
    mask = torch.tensor([[True, False, False], [True, False, True], [False, False, True]])
    mb.set_active(mask)
    bt.set_active(mask)
    assert bt.live == 2 and bt.branch_slot.tolist() == [0, 2, 1]
    calls = []
    hooks = [h.register_forward_hook(lambda m, i, o, k=k, t=t: calls.append((t, k)))
             for k in range(3) for t, h in enumerate(bt.heads[k].heads)]
    outs_a, outs_b = mb(x), bt(x)
    for h in hooks:
        h.remove()
    assert sorted(calls) == sorted((i, k) for i in range(3) for k in range(3) if mask[i, k])
    for a, b in zip(outs_a, outs_b):
        assert a.shape == b.shape and rel(a, b) < 1e-4


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("kind", ["celeba", "taskonomy"])
def test_predict_equals_selected_outputs_and_runs_only_assigned_heads(kind, batched):
    """Evaluation's ``predict(x, assignment)`` gives exactly the argmax model's outputs
    (``select_outputs(forward(x))``) while computing only the used branches (per-branch form) and,
    for dense decoders, only each task's assigned head."""
    from fastdmtg.models.batched import BatchedMultiBranchNet
    torch.manual_seed(0)
    if kind == "celeba":
        specs = AttributeTaskSet([f"t{i}" for i in range(4)]).specs
        mb = build_multibranch(ModelConfig(branches=3, width=8, shared="stem"), specs, 32)
    else:
        from fastdmtg.tasks.taskonomy import TaskonomyTaskSet
        specs = TaskonomyTaskSet(["segment_semantic", "depth_zbuffer", "normal", "edge_texture"]).specs
        mb = build_multibranch(ModelConfig(arch="xception", branches=3, shared_blocks=10), specs, 32)
    for p in mb.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model = (BatchedMultiBranchNet(mb) if batched else mb).eval()
    assignment = [2, 0, 2, 2]                                   # branch 1 unused
    x = torch.rand(2, 3, 32, 32)
    calls = []
    hooks = []
    if not batched:
        hooks += [br.register_forward_hook(lambda m, i, o, k=k: calls.append(("branch", k)))
                  for k, br in enumerate(model.branches)]
    if kind == "taskonomy":
        hooks += [h.register_forward_hook(lambda m, i, o, k=k, t=t: calls.append(("head", t, k)))
                  for k in range(3) for t, h in enumerate(model.heads[k].heads)]
    with torch.no_grad():
        got = model.predict(x, assignment)
        n_calls = len(calls)
        want = MultiBranchNet.select_outputs(model(x), torch.tensor(assignment))
    for h in hooks:
        h.remove()
    if kind == "celeba":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert len(got) == len(want) == 4
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    predicted = calls[:n_calls]
    if not batched:
        assert sorted(c for c in predicted if c[0] == "branch") == [("branch", 0), ("branch", 2)]
    if kind == "taskonomy":
        assert sorted(c for c in predicted if c[0] == "head") == sorted(("head", i, k) for i, k in enumerate(assignment))
