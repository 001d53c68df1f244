"""The training step and its fast paths.

``StepModule`` is the differentiable part of one step — grouping weights, the K-branch forward and
the weighted K·N-head loss — as one module, so DDP sees every parameter (the grouping logits S
included) and torch.compile sees one graph:

    forward(batch) -> (total, L):  z = method.weights()          # (N, K), fresh Gumbel noise
                                   outputs = model(image)        # under bf16 autocast on CUDA
                                   total, L = taskset.head_losses(outputs, batch, z)

Precision policy (``train.amp``; measured in benchmarks/results/cpu_2026-11-30_precision_*.md):
``mixed`` (the CUDA default) runs the encoders under bf16 autocast and the task heads (decoders,
linear heads) in fp32 (``set_output_precision``); the losses are computed in fp32 outside autocast
(the ops upcast their inputs and accumulate in fp32); evaluation runs without autocast. ``bf16`` is plain
autocast everywhere (evaluation included), ``off`` is fp32.

A method with a training augmentation (``methods.StepBackward``: UW, GradNorm, PCGrad, the torchjd
aggregators) replaces forward + ``total.backward()`` by its own ``forward(step, batch)``, which uses
``outputs`` and ``losses`` (per-head losses with one-hot weights); that step runs eagerly only.

``StepRunner`` runs forward + backward + optimizer step in one of three ways:

* eager;
* torch.compile'd StepModule (backward and the optimizer stay eager);
* CUDA graph: the whole step (forward, backward, fused capturable Adam with the LR as a device
  tensor) captured once and replayed with the batch copied into static buffers. The Gumbel seed is
  a device tensor incremented inside the graph, so every replay draws new noise. The first
  ``warmup`` steps run eagerly on a side stream (real steps, as capture requires), the next is
  captured and replayed; a batch of another shape (the last partial batch) runs eagerly. With
  ``full_batch`` set, a partial batch is never warmed up on or captured, and in compile-only mode
  it runs eagerly too (no dynamic-shape re-compilation).
  ``invalidate()`` drops the graph when the step itself changes (head pruning: the set of active
  heads is static within one graph); the next step warms up and re-captures.

Under DDP (``wrap_ddp``) the whole step is captured too, gradient all-reduce included (NCCL >= 2.9.6
allows collectives in a graph). PyTorch's CUDA-graph notes ("Usage with DistributedDataParallel") list
three conditions, all met here: DDP is constructed on a side stream, at least 11 DDP-enabled eager
steps run before capture (``DDP_GRAPH_WARMUP``: DDP rebuilds its buckets and samples timing statistics
in its first iterations, host work a replay would skip), and NCCL's asynchronous error handling is off
(``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``, set by the trainer before the process group starts). Every
rank captures at the same step and replays the same graph, as NCCL requires.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .models.multibranch import FP32Output

# eager DDP steps before a whole-step capture (PyTorch CUDA-graph notes: "at least 11")
DDP_GRAPH_WARMUP = 11


class StepModule(nn.Module):
    def __init__(self, model: nn.Module, method: nn.Module, taskset, autocast, channels_last: bool = False,
                 kernels: str = "auto"):
        super().__init__()
        self.model, self.method = model, method
        self.taskset = taskset
        self._autocast = autocast
        self.channels_last = channels_last
        self.kernels = kernels          # the fused losses' backend (train.kernels: auto | triton | reference)

    def forward(self, batch: dict):
        z = self.method.weights()                                             # (N, K)
        return self.losses(self.outputs(batch), batch, z)

    def outputs(self, batch: dict):
        """The model's outputs for the batch (stacked (K, N, B, C) or N × (K, B, ...))."""
        image = batch["image"]
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.model(image)

    def losses(self, outputs, batch: dict, z: torch.Tensor):
        """(total = Σ z·L, L (N, K) detached) for weights ``z`` (N, K); a training augmentation
        (methods.StepBackward) calls it once per head with a one-hot z to get that head's loss."""
        task_branches = self.model.task_branches                              # models.BranchedNet
        if task_branches is None:
            return self.taskset.head_losses(outputs, batch, z, kernels=self.kernels)
        # head pruning (docs/pruning.md): only the active heads were computed; L is 0 at dropped heads
        if isinstance(outputs, torch.Tensor):                                  # stacked: same layout
            total, L = self.taskset.head_losses(outputs, batch, z, kernels=self.kernels)
        else:
            total, L = self.taskset.head_losses(outputs, batch, z, active=task_branches, kernels=self.kernels)
        mask = self.method.head_mask()                                        # (N, K) bool
        return total, (L * mask if mask is not None else L)


def _clone_static(batch):
    if isinstance(batch, dict):
        return {k: _clone_static(v) for k, v in batch.items()}
    return batch.clone()


def _copy_into(dst, src):
    if isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    else:
        dst.copy_(src, non_blocking=True)


def _shapes(batch):
    if isinstance(batch, dict):
        return tuple((k, _shapes(v)) for k, v in sorted(batch.items()))
    return tuple(batch.shape)


class CudaGraphs:
    """What the graph modes need from CUDA: a side stream for the warm-up steps and the capture of
    one step into a replayable graph. ``StepRunner(graphs=...)`` takes a stand-in with the same two
    methods, so the capture logic (static buffers, shape checks, the full-batch rule, re-capture
    after ``invalidate``) is tested on CPU (tests/test_step_runner.py)."""

    @staticmethod
    @contextlib.contextmanager
    def side_stream():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            yield
        torch.cuda.current_stream().wait_stream(s)

    @staticmethod
    def capture(step):
        """(graph, step()'s outputs as recorded): ``graph.replay()`` re-runs the step on the same
        buffers, writing into those outputs. Capturing runs nothing."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, out


class StepRunner:
    def __init__(self, forward: nn.Module, optimizer: torch.optim.Optimizer, mode: str = "eager",
                 warmup: int = 3, full_batch: int | None = None, graphs=None, step_backward=None):
        if mode not in ("eager", "compile", "graph", "compile+graph"):
            raise ValueError(f"unknown step mode {mode!r}")
        # a training augmentation (methods.StepBackward: UW, GradNorm, PCGrad, the aggregators) replaces
        # ``total.backward()``; it computes per-head losses or gradients outside any graph: eager only
        if step_backward is not None and mode != "eager":
            raise ValueError(f"a training augmentation ({step_backward.name}) runs eagerly, not in mode {mode!r}")
        self.step_backward = step_backward
        self.optimizer, self.mode, self.warmup = optimizer, mode, warmup
        self.full_batch = full_batch        # batches of another size run eagerly (compile/graph modes)
        self.eager_fn = forward
        self.fn = torch.compile(forward) if "compile" in mode else forward
        self.graph = None
        self.static_batch = self.static_out = self.static_shapes = None
        self.eager_steps = 0
        self.captures = 0
        self.graphs = graphs if graphs is not None else CudaGraphs()

    def _full(self, batch: dict) -> bool:
        return self.full_batch is None or batch["image"].shape[0] == self.full_batch

    def invalidate(self) -> None:
        """Forget the captured graph (e.g. the set of active heads changed): the next steps warm up
        eagerly again and a new graph is captured. Each call costs ``warmup`` eager steps + 1 capture."""
        self.graph = None
        self.static_batch = self.static_out = None
        self.eager_steps = 0

    def _eager_step(self, fn, batch):
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_backward is None:
            total, L = fn(batch)
            total.backward()
        else:
            total, L = self.step_backward(fn, batch)       # the augmentation's loss and gradients
        self.optimizer.step()
        return total.detach(), L

    def __call__(self, batch: dict):
        if self.mode == "eager":
            return self._eager_step(self.fn, batch)
        if not self._full(batch):
            # the compiled / captured step is specialised to the full batch: a partial batch (the
            # last of an epoch, or the first after resuming there) runs eagerly instead of being
            # captured or re-compiled with dynamic shapes (which would make the main graph dynamic)
            return self._eager_step(self.eager_fn, batch)
        if self.mode == "compile":
            return self._eager_step(self.fn, batch)
        if self.graph is not None:
            if _shapes(batch) == self.static_shapes:
                _copy_into(self.static_batch, batch)
                self.graph.replay()
                return self.static_out
            return self._eager_step(self.eager_fn, batch)                      # e.g. last partial batch
        if self.eager_steps < self.warmup:
            # warm-up on a side stream (as capture requires): these are real training steps
            with self.graphs.side_stream():
                out = self._eager_step(self.fn, batch)
            self.eager_steps += 1
            return out
        self._capture(batch)
        self.graph.replay()                                                    # capture ran nothing: do the step
        return self.static_out

    def _capture(self, batch):
        self.static_batch = _clone_static(batch)
        self.static_shapes = _shapes(batch)
        self.optimizer.zero_grad(set_to_none=True)

        def step():
            total, L = self.fn(self.static_batch)
            total.backward()
            self.optimizer.step()
            return total.detach(), L
        self.graph, self.static_out = self.graphs.capture(step)
        self.captures += 1


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool, for_graph: bool) -> nn.Module:
    """DistributedDataParallel around the step module. ``broadcast_buffers=False``: rank-local BN
    statistics and Gumbel seed offsets. ``for_graph``: constructed on a side stream, as whole-step
    capture requires (the runner then warms up ``DDP_GRAPH_WARMUP`` steps)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kw = dict(device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
              find_unused_parameters=find_unused_parameters)
    with warnings.catch_warnings():
        # broadcast_buffers=False is what we mean (its successor option still syncs buffers at init)
        warnings.simplefilter("ignore", FutureWarning)
        if not for_graph:
            return DDP(module, **kw)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            ddp = DDP(module, **kw)
        torch.cuda.current_stream(device).wait_stream(side)
        return ddp


def set_output_precision(model: nn.Module, keep_fp32: bool) -> int:
    """The precision policy's switch (``train.amp``): every task head declared a
    ``models.multibranch.FP32Output`` (the dense decoders, ``LinearHeads``, the batched net's stacked heads) runs in fp32 under bf16 autocast
    when ``keep_fp32`` (train.amp=mixed/auto), in bf16 otherwise (train.amp=bf16). Returns the number
    of modules set."""
    n = 0
    for m in model.modules():
        if isinstance(m, FP32Output):
            m.keep_fp32 = bool(keep_fp32)
            n += 1
    return n


def autocast_factory(enabled: bool, device: torch.device, for_graph: bool):
    if not enabled:
        return contextlib.nullcontext
    # the autocast weight cache must be off under graph capture (cached casts would be stale)
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=not for_graph)
