"""Files touched to add a thing (docs/architecture.md, "Extension points"), checked by adding a
throwaway one exactly that way: a loader backend = its file, a backbone = its file (each found by
listing its package: the ``plugin_file`` fixture writes the file to a temporary folder on the
package's search path, nothing else of the package is edited); a fused op = its file + its
registration in ``fastdmtg.ops`` (the file on sys.path, the registration added with monkeypatch).
A method is checked in tests/test_architecture.py, a baseline in tests/test_compare_baselines.py, a
dataset format in tests/test_plugins.py (docs/pipelines.md "Adding a dataset")."""
from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

BACKEND_FILE = '''
"""A throwaway loader backend: the dataset in host memory (its own name, nothing else)."""
from fastdmtg.pipelines import LoaderBackend, ResidentSource


def build(dataset, cache, cfg, common, device_fraction):
    source = ResidentSource(dataset, placement="host", cache=cache, fraction=device_fraction, **common)
    source.built_by = "{name}"
    return source


BACKEND = LoaderBackend("{name}", build)
'''


def _module(tmp_path, monkeypatch, prefix: str, text: str) -> str:
    """Write ``text`` as a new module on sys.path; returns its name (unique per test run)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_a_loader_backend_is_its_file(plugin_file):
    from fastdmtg.config import ConfigError, DataConfig
    from fastdmtg.pipelines import build_source
    from fastdmtg.registry import LOADER_BACKENDS
    small = dict(synthetic_train=16, synthetic_val=8, synthetic_test=8, image_size=16)
    with pytest.raises(ConfigError, match="data.backend"):
        DataConfig(backend="throwaway", **small)
    before = list(LOADER_BACKENDS)
    path = plugin_file(LOADER_BACKENDS, "throwaway_source", BACKEND_FILE.format(name="throwaway"))   # the one file
    assert [p.name for p in path.parent.iterdir()] == ["throwaway_source.py"]
    assert list(LOADER_BACKENDS) == before + ["throwaway"]                          # its order: after the built-ins
    src = build_source(DataConfig(backend="throwaway", **small), progress=False)
    ref = build_source(DataConfig(backend="memory", **small), progress=False)
    assert src.built_by == "throwaway" and src.taskset.names == ref.taskset.names
    got = list(src.batches("train", 8, shuffle=True, seed=3, epoch=1, train=True))
    want = list(ref.batches("train", 8, shuffle=True, seed=3, epoch=1, train=True))
    assert len(got) == len(want) == 2                   # the dataset's 16 training samples, as memory serves them
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)


OP_FILE = '''
r"""A throwaway fused op: L[k] = mean_i x[k, i]^2, total = sum_k z[k] L[k] (x (K, M), z (K,)).
Its Triton kernel, launchers, PyTorch reference and registration (FusedOp), as every op file has."""
import torch

from fastdmtg.kernels._common import f32_scalar, jit, resolve_backend, tl
from fastdmtg.kernels._fused import FusedOp, OpSpec


@jit
def _fwd_kernel(x_ptr, L_ptr, M, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + k * M + i, mask=i < M, other=0.0).to(tl.float32)
        acc += v * v
    tl.store(L_ptr + k, tl.sum(acc, axis=0) / M)


def _forward(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    K, M = x.shape
    L = torch.empty(K, dtype=torch.float32, device=x.device)
    _fwd_kernel[(K,)](x, L, M, BLOCK=64)
    return (z.float() * L).sum(), L


def _forward_fake(x, z):
    return f32_scalar(x.device), x.new_empty((x.shape[0],), dtype=torch.float32)


def _backward(grad_total: torch.Tensor, x: torch.Tensor, z: torch.Tensor, L: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    dx = grad_total * z.float()[:, None] * 2 * x.float() / x.shape[1]
    return dx.to(x.dtype), (grad_total * L).to(z.dtype)


def _backward_fake(grad_total, x, z, L):
    return torch.empty_like(x), torch.empty_like(z)


OP = FusedOp(OpSpec("{name}", _forward, _forward_fake, _backward, _backward_fake,
                    save=lambda inputs, outputs: (*inputs, outputs[1]), grad_inputs=(0, 1)))


def reference(x, z):
    L = (x.float() ** 2).mean(1)
    return (z * L).sum(), L.detach()


def {name}(x, z, backend=None):
    if resolve_backend(backend, x.device) == "reference":
        return reference(x, z)
    return OP(x, z)
'''


def test_a_fused_op_is_its_file_and_its_registration(tmp_path, monkeypatch):
    from fastdmtg import ops
    from fastdmtg.kernels._common import _INTERPRET, triton_available
    if not (triton_available() and (_INTERPRET or torch.cuda.is_available())):
        pytest.skip("the Triton kernel needs triton and a GPU or TRITON_INTERPRET=1")
    name = f"throwaway_sq_{uuid.uuid4().hex[:8]}"
    mod = _module(tmp_path, monkeypatch, "fastdmtg_throwaway_op", OP_FILE.format(name=name))
    import importlib
    fn = getattr(importlib.import_module(mod), name)
    monkeypatch.setattr(ops, name, fn, raising=False)                        # its registration in ops.py:
    monkeypatch.setattr(ops, "__all__", [*ops.__all__, name])                # the import line, its __all__ name
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 100, generator=g).to(device)
    z = torch.rand(3, generator=g).to(device)
    results = {}
    for backend in ("triton", "reference"):
        xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
        total, L = getattr(ops, name)(xr, zr, backend=backend)
        total.backward()
        results[backend] = (total.detach(), L, xr.grad, zr.grad)
    # by hand: L[k] = mean x^2, dx = z[k] 2x / M, dz = L
    L_hand = (x ** 2).mean(1)
    for total, L, dx, dz in results.values():
        torch.testing.assert_close(L, L_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(total, (z * L_hand).sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, z[:, None] * 2 * x / 100, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dz, L_hand, rtol=1e-5, atol=1e-6)
    # the registration made the custom op (what torch.compile traces) and its generated eager path
    assert hasattr(torch.ops.fastdmtg, name) and hasattr(torch.ops.fastdmtg, f"{name}_bwd")
    total, L = getattr(torch.ops.fastdmtg, name)(x, z)
    torch.testing.assert_close(L, L_hand, rtol=1e-5, atol=1e-6)
    xr = x.clone().requires_grad_()
    assert f"{name}_eager" in type(getattr(ops, name)(xr, z, backend="triton")[0].grad_fn).__name__


BACKBONE_FILE = '''
"""A throwaway backbone: a linear encoder, its first layer shared unless model.shared=none."""
from torch import nn

from fastdmtg.models import Parts
from fastdmtg.models.backbone import Backbone
from fastdmtg.models.resnet_celeba import build_parts as resnet_parts, feature_dim


def build_parts(cfg, task_specs, image_size):
    heads = resnet_parts(cfg, task_specs, image_size).heads        # the same heads, another encoder
    pixels = 3 * image_size * image_size
    shared = nn.Identity() if cfg.shared == "none" else nn.Sequential(nn.Flatten(), nn.Linear(pixels, pixels))
    branch = nn.Sequential(nn.Flatten(), nn.Linear(pixels, feature_dim(cfg.width, image_size)))
    return Parts(shared, branch, heads)


BACKBONE = Backbone("NAME", build_parts, nothing_shared={"shared": "none"})
'''


def test_a_backbone_is_its_file(plugin_file):
    """A new model.arch: its file in fastdmtg/models/ (a ``build_parts`` and its ``Backbone``
    declaration). The config refuses the name before the file and accepts it after,
    the model builds and computes every task's output, and what leaves it nothing shared (the STL
    baseline's override) and whether it loads pretrained weights come from the declaration."""
    from fastdmtg import registry
    from fastdmtg.config import Config, ConfigError, ModelConfig
    from fastdmtg.data import task_specs
    from fastdmtg.models import build_multibranch

    arch = f"toy_{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConfigError, match=f"model.arch: expected .*, got '{arch}'"):
        ModelConfig(arch=arch)
    plugin_file(registry.BACKBONES, arch, BACKBONE_FILE.replace("NAME", arch))          # the one file

    cfg = ModelConfig(arch=arch, shared="stem", branches=2, width=4)
    specs = task_specs(Config())
    net = build_multibranch(cfg, specs, 16)
    assert sum(p.numel() for p in net.shared.parameters()) == (3 * 16 * 16) ** 2 + 3 * 16 * 16
    out = net(torch.randn(2, 3, 16, 16))
    assert out is not None
    decl = registry.BACKBONES.load(arch)
    assert decl.share_nothing(cfg) == {"shared": "none"}
    assert decl.share_nothing(ModelConfig(arch=arch, shared="none")) == {}
    with pytest.raises(ConfigError, match=f"model.pretrained: model.arch={arch} loads no pretrained weights"):
        ModelConfig(arch=arch, pretrained="w.pth")
