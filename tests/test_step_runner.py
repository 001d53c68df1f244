"""The StepRunner's CUDA-graph logic on CPU, with a stand-in for the graph (``StepRunner(graphs=...)``).

The stand-in behaves as a CUDA graph does for the runner: capturing records the step on the static
buffers (here it runs it once: the step the runner's first replay would do, which it then skips),
and each replay re-runs the step reading the static buffers and writing into the outputs recorded
at capture. So a replay computes on whatever the runner copied into the static batch — a batch
copy that misses a nested field (Taskonomy's ``targets``) or a shape check that lets a different
batch through is seen as a different loss or different weights than the same steps run eagerly.
The real graph is exercised on a GPU by tests/test_gpu_training.py."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from fastdmtg.step import StepRunner


class FakeGraph:
    def __init__(self, step, out, optimizer):
        self.step, self.out, self.optimizer = step, out, optimizer
        self.replays = 0
        self._first = True

    def replay(self):
        self.replays += 1
        if self._first:                      # the capture ran this step already
            self._first = False
            return
        # a CUDA graph's backward writes the gradients it allocated at capture (grads were None then)
        self.optimizer.zero_grad(set_to_none=True)
        total, L = self.step()
        self.out[0].copy_(total)             # replays write into the outputs recorded at capture
        self.out[1].copy_(L)


class FakeGraphs:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.side_steps = 0
        self.graphs: list[FakeGraph] = []

    @contextlib.contextmanager
    def side_stream(self):
        self.side_steps += 1
        yield

    def capture(self, step):
        out = step()
        g = FakeGraph(step, out, self.optimizer)
        self.graphs.append(g)
        return g, out


class Toy(nn.Module):
    """Image → one scalar per sample; losses against a nested target dict and a mask (a Taskonomy
    batch's structure). The losses broadcast, so a target of another (broadcastable) shape is no
    error: only the runner's shape check keeps it off the graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 1)

    def forward(self, batch):
        y = self.lin(batch["image"].flatten(1))[:, 0]                       # (B,)
        t = batch["targets"]
        seg = ((y[:, None, None] - t["seg"].float()) ** 2).mean()
        depth = ((y[:, None, None, None] - t["depth"]) ** 2 * batch["mask"]).mean()
        L = torch.stack([seg, depth])
        return L.sum(), L.detach()


def batch(seed: int, b: int = 4, depth_hw=(3, 3)):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(b, 3, 2, 2, generator=g),
            "targets": {"seg": torch.randint(0, 5, (b, 3, 3), generator=g),
                        "depth": torch.randn(b, 1, *depth_hw, generator=g)},
            "mask": torch.rand(b, 1, 3, 3, generator=g) > 0.3}


def _leaves(b):
    return [x for v in b.values() for x in (_leaves(v) if isinstance(v, dict) else [v])]


def runners(warmup=2, full_batch=None):
    graph_model, eager_model = Toy(), Toy()
    opt_g = torch.optim.SGD(graph_model.parameters(), lr=0.1, momentum=0.9)
    opt_e = torch.optim.SGD(eager_model.parameters(), lr=0.1, momentum=0.9)
    fake = FakeGraphs(opt_g)
    graph = StepRunner(graph_model, opt_g, "graph", warmup=warmup, full_batch=full_batch, graphs=fake)
    eager = StepRunner(eager_model, opt_e, "eager")
    return graph, eager, fake


def run_both(graph, eager, batches):
    for i, b in enumerate(batches):
        tg, Lg = graph(b)
        te, Le = eager(b)
        torch.testing.assert_close(tg, te, rtol=1e-6, atol=1e-7, msg=f"total, step {i}")
        torch.testing.assert_close(Lg, Le, rtol=1e-6, atol=1e-7, msg=f"L, step {i}")
    for pg, pe in zip(graph.eager_fn.parameters(), eager.eager_fn.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-6, atol=1e-7)


def test_replays_copy_every_field_of_a_nested_batch():
    """Warm-up, capture, replays: the same losses and weights as the eager steps, batch after batch
    (targets are a nested dict: a copy that skips it replays on the capture's targets)."""
    graph, eager, fake = runners(warmup=2)
    batches = [batch(i) for i in range(6)]
    run_both(graph, eager, batches)
    # the capture step's batch (step 3) belongs to the caller: the static buffers are copies of it
    assert all(torch.equal(a, b) for a, b in zip(_leaves(batches[2]), _leaves(batch(2))))
    assert fake.side_steps == 2 and graph.eager_steps == 2          # warm-up on the side stream
    assert graph.captures == 1 and fake.graphs[0].replays == 4       # steps 3..6 from the graph
    # the static buffers hold the last batch, nested fields included
    last = batch(5)
    assert torch.equal(graph.static_batch["targets"]["depth"], last["targets"]["depth"])
    assert torch.equal(graph.static_batch["targets"]["seg"], last["targets"]["seg"])


def test_a_batch_of_another_nested_shape_runs_eagerly():
    """A batch whose image matches the capture but a nested target does not (and would broadcast
    into the static buffer) is not replayed: it runs eagerly; the graph serves the next full batch."""
    graph, eager, fake = runners(warmup=1)
    odd = batch(10, depth_hw=(1, 3))
    run_both(graph, eager, [batch(0), batch(1), odd, batch(2)])
    assert graph.captures == 1 and fake.graphs[0].replays == 2       # batch(1) and batch(2)


def test_partial_batches_never_warm_up_nor_capture():
    """full_batch: a partial batch (e.g. the first after resuming at the end of an epoch) runs
    eagerly, is not counted as a warm-up step and is never captured, before or after capture."""
    graph, eager, fake = runners(warmup=1, full_batch=4)
    run_both(graph, eager, [batch(0, b=3)])
    assert graph.eager_steps == 0 and graph.captures == 0 and fake.side_steps == 0
    run_both(graph, eager, [batch(1), batch(2), batch(3, b=3), batch(4)])
    assert graph.captures == 1 and fake.graphs[0].replays == 2 and fake.side_steps == 1
    assert graph.static_batch["image"].shape[0] == 4


def test_invalidate_warms_up_and_captures_again():
    """After invalidate() (head pruning changed the step): ``warmup`` eager steps, then a new capture;
    the old graph is never replayed again."""
    graph, eager, fake = runners(warmup=2)
    run_both(graph, eager, [batch(i) for i in range(4)])
    assert graph.captures == 1
    graph.invalidate()
    assert graph.graph is None and graph.static_batch is None
    run_both(graph, eager, [batch(i) for i in range(4, 9)])
    assert graph.captures == 2 and fake.side_steps == 4
    assert fake.graphs[0].replays == 2 and fake.graphs[1].replays == 3


def test_eager_mode_never_touches_the_graph_machinery():
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fake = FakeGraphs(opt)
    r = StepRunner(model, opt, "eager", graphs=fake)
    for i in range(3):
        r(batch(i))
    assert fake.side_steps == 0 and not fake.graphs and r.captures == 0
    with pytest.raises(ValueError, match="unknown step mode"):
        StepRunner(model, opt, "graphs")
