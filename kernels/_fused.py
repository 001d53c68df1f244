"""One description per fused op → its ``torch.library`` custom ops and its eager fast path.

A fused op is a forward launcher (inputs → outputs; output 0 is the one differentiable output, the
others are non-differentiable by-products such as the detached per-head losses) and a backward
launcher ``backward(grad of output 0, *saved) → gradients of the inputs listed in grad_inputs``.
``FusedOp`` turns that description into

* the custom ops ``fastdmtg::<name>`` and ``fastdmtg::<name>_bwd`` (schemas from the launchers'
  annotations, fake implementations for tracing, ``register_autograd`` wiring them together), which
  torch.compile(fullgraph=True) traces; and
* a ``torch.autograd.Function`` calling the same launchers, used in eager mode because a custom-op
  call costs ~60 µs of Python dispatch (measured 70 µs vs 12 µs for an autograd.Function doing the
  same work, 2026-11-23), more than the GPU time of the CelebA-sized losses.

Both are generated from the same two functions below (``_setup``, ``_backward``), so the eager and
the compiled paths cannot drift apart. Neither syncs with the host, so CUDA-graph capture works
with both.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ._common import f32_scalar

NAMESPACE = "fastdmtg"
_TENSOR = object()  # marks a tensor slot (or None) among the saved values


@dataclass(frozen=True)
class OpSpec:
    name: str                      # custom ops fastdmtg::<name> and fastdmtg::<name>_bwd
    forward: Callable              # Triton launcher; its annotations give the custom op's schema
    forward_fake: Callable         # same signature: empty outputs of the right shape/dtype/strides
    backward: Callable             # (grad of output 0, *save(inputs, outputs)) -> grads
    backward_fake: Callable
    save: Callable                 # (inputs, outputs) -> the backward's arguments after the grad
    grad_inputs: tuple             # input positions of the backward's outputs, in order


def _stash(ctx, values) -> None:
    """Tensors (and None) through save_for_backward, plain values (floats, ints, dtypes) on ctx."""
    tensors, layout = [], []
    for v in values:
        if v is None or isinstance(v, torch.Tensor):
            tensors.append(v)
            layout.append(_TENSOR)
        else:
            layout.append(v)
    ctx.save_for_backward(*tensors)
    ctx.fused_layout = layout


def _unstash(ctx) -> list:
    it = iter(ctx.saved_tensors)
    return [next(it) if v is _TENSOR else v for v in ctx.fused_layout]


class FusedOp:
    """``op(*inputs)`` → the forward's outputs, differentiable in output 0 (see the module doc)."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.n_inputs = len(inspect.signature(spec.forward).parameters)
        lib = torch.library
        self.op = lib.custom_op(f"{NAMESPACE}::{spec.name}", mutates_args=())(spec.forward)
        self.op.register_fake(spec.forward_fake)
        self.bwd_op = lib.custom_op(f"{NAMESPACE}::{spec.name}_bwd", mutates_args=())(spec.backward)
        self.bwd_op.register_fake(spec.backward_fake)
        self.op.register_autograd(lambda ctx, *g: self._backward(ctx, g, self.bwd_op), setup_context=self._setup)
        self.fn = self._eager_function()

    def _setup(self, ctx, inputs, output) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        _stash(ctx, self.spec.save(tuple(inputs), outputs))
        g0 = outputs[0]
        ctx.fused_grad_meta = (g0.shape, g0.dtype, g0.device)       # zeros when no grad flows into it
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outputs[1:])

    def _backward(self, ctx, grads, backward) -> tuple:
        g = grads[0]
        if g is None:
            shape, dtype, device = ctx.fused_grad_meta
            g = torch.zeros(shape, dtype=dtype, device=device)
        res = backward(g, *_unstash(ctx))
        res = res if isinstance(res, (tuple, list)) else (res,)
        out = [None] * self.n_inputs
        for i, r in zip(self.spec.grad_inputs, res):
            out[i] = r
        return tuple(out)

    def _eager_function(self):
        op = self

        def forward(ctx, *inputs):
            out = op.spec.forward(*inputs)
            op._setup(ctx, inputs, out)
            return out

        def backward(ctx, *grads):
            return op._backward(ctx, grads, op.spec.backward)

        # built with type() so the autograd node is named after the op (<name>_eagerBackward)
        return type(f"{self.spec.name}_eager", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *inputs):
        if torch.compiler.is_compiling():
            return self.op(*inputs)
        return self.fn.apply(*inputs)


def _grouped_loss_forward_fake(logits, target, z):
    N, K = z.shape
    return f32_scalar(logits.device), logits.new_empty((N, K), dtype=torch.float32)


def _grouped_loss_backward_fake(grad_total, logits, target, z, L):
    return torch.empty_like(logits), torch.empty_like(z)


def grouped_loss_op(name: str, forward: Callable, backward: Callable) -> FusedOp:
    """The spec every grouped head loss shares — (logits, target, z (N, K)) → (total (), L (N, K)
    fp32), gradients for logits and z, the backward fed the inputs and L — around its two launchers."""
    return FusedOp(OpSpec(name, forward, _grouped_loss_forward_fake, backward, _grouped_loss_backward_fake,
                          save=lambda inputs, outputs: (*inputs, outputs[1]), grad_inputs=(0, 2)))
