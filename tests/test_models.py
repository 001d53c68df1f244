"""Architecture: shapes and parameter counts of the CelebA ResNet variant and the containers."""
import pytest
import torch

from fastdmtg.config import ModelConfig
from fastdmtg.models import GroupedNet, build_multibranch
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
    with pytest.raises(ConfigError, match="K"):
        ModelConfig(branches=0)


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
