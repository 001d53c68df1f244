"""GPU-only checks of the fast training step (skipped without CUDA): CUDA-graph replay is the same
computation as eager steps, draws fresh Gumbel noise on every replay, and a full run works."""
import pytest
import torch

from fastdmtg.config import apply_overrides, get_recipe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _params(step_fn_info):
    model = step_fn_info["runner"].eager_fn.model
    if hasattr(model, "to_multibranch"):
        model = model.to_multibranch()
    method = step_fn_info["runner"].eager_fn.method
    return [p.detach().clone() for p in list(model.parameters()) + list(method.parameters())], method


@cuda
@pytest.mark.parametrize("kernels,batched", [("reference", "off"), ("triton", "off"), ("triton", "on")])
def test_graph_steps_equal_eager_steps(kernels, batched):
    from fastdmtg.bench import build_stepper
    dev = torch.device("cuda")
    # deterministic convolutions and no TF32: the two runs must differ only by graph vs eager
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    base = apply_overrides(get_recipe("celeba9_k3"), ["train.batch_size=64", "train.amp=off",
                                                      f"train.kernels={kernels}", "train.compile=off", f"model.batched={batched}",
                                                      "train.channels_last=off"])
    results = {}
    for mode in ("off", "on"):
        cfg = apply_overrides(base, [f"train.cuda_graph={mode}"])
        step, info = build_stepper(cfg, dev, n_batches=8)
        seed0 = int(info["runner"].eager_fn.method.seed)
        for _ in range(8):                       # warm-up 3 eager, capture at 4, then replays
            step()
        torch.cuda.synchronize()
        params, method = _params(info)
        assert int(method.seed) == seed0 + 8     # the seed tensor advanced on every replay
        results[mode] = (params, info["runner"].captures)
    assert results["on"][1] == 1 and results["off"][1] == 0
    for a, b in zip(results["off"][0], results["on"][0]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@cuda
def test_graph_steps_equal_eager_steps_with_nested_taskonomy_batches():
    """The Taskonomy batch is nested ({"image", "targets": {task: map}, "mask"}): every replay must
    copy the new targets into the static buffers (a copy that skipped the nested dict would train on
    the captured batch's targets over and over)."""
    from fastdmtg.bench import build_stepper
    dev = torch.device("cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    base = apply_overrides(get_recipe("taskonomy5_k3"), ["train.batch_size=4", "data.image_size=64", "train.amp=off",
                                                         "train.kernels=triton", "train.compile=off",
                                                         "train.channels_last=off"])
    results = {}
    for mode in ("off", "on"):
        step, info = build_stepper(apply_overrides(base, [f"train.cuda_graph={mode}"]), dev, loader="memory",
                                   n_batches=8)
        for _ in range(8):
            step()
        torch.cuda.synchronize()
        results[mode] = (_params(info)[0], info["runner"].captures)
        if mode == "on":
            static, last = info["runner"].static_batch, info["last_batch"]
            for task, t in last["targets"].items():
                assert torch.equal(static["targets"][task], t), task
    assert results["on"][1] == 1 and results["off"][1] == 0
    for a, b in zip(results["off"][0], results["on"][0]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@cuda
def test_replays_draw_fresh_noise():
    """Identical inputs on every replay — one batch, and the learning rate set to 0 so the weights
    stay put: every head's loss L is the same each replay, so the weighted total can only change
    through the Gumbel noise (frozen noise would give the same total three times)."""
    from fastdmtg.bench import build_stepper
    cfg = apply_overrides(get_recipe("celeba9_k3"), ["train.batch_size=32", "train.cuda_graph=on",
                                                     "train.kernels=triton"])
    step, info = build_stepper(cfg, torch.device("cuda"), loader="memory", n_batches=1)
    for group in info["runner"].optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(0.0)                 # capturable optimizer: the LR is a device tensor
        else:
            group["lr"] = 0.0
    for _ in range(4):
        step()
    assert info["runner"].captures == 1
    totals, Ls = [], []
    for _ in range(3):
        total, L = step()
        totals.append(float(total))
        Ls.append(L.detach().clone())
    for L in Ls[1:]:
        torch.testing.assert_close(L, Ls[0], rtol=1e-5, atol=1e-6)
    assert len(set(totals)) == 3


@cuda
def test_full_run_on_gpu(tmp_path):
    from fastdmtg.train import train
    cfg = apply_overrides(get_recipe("synthetic_k3"), ["train.tensorboard=false", "train.progress=false"])
    res = train(cfg, tmp_path / "run")
    assert res["speed"]["cuda_graph"] and res["speed"]["compile"] and res["speed"]["channels_last"]
    assert res["speed"]["graph_captures"] == 1
    assert res["env"]["kernels"] == "triton"
    assert sorted(i for g in res["groups"] for i in g) == sorted(res["tasks"])


@cuda
def test_pruning_with_graph_and_compile_recaptures(tmp_path):
    """Head pruning under the CUDA defaults (compile + whole-step graph + batched branches): changes
    of the active set re-capture (bounded), the run finishes, and it picks the same groups as the
    eager run with the same pruning settings."""
    from fastdmtg.train import train
    base = ["train.tensorboard=false", "train.progress=false",
            "dmtg.prune_eps=0.05", "dmtg.prune_patience=50"]
    fast = train(apply_overrides(get_recipe("synthetic_k3"), base), tmp_path / "fast")
    eager = train(apply_overrides(get_recipe("synthetic_k3"), base + [
        "train.compile=off", "train.cuda_graph=off", "train.amp=off"]), tmp_path / "eager")
    assert fast["speed"]["cuda_graph"] and fast["speed"]["compile"]
    ev = fast["pruning"]["events"]
    assert ev, "the settings are meant to prune"
    # one capture at the start, then at most one per drop step (drops closer together than the
    # warm-up, or in the last steps of the run, share or skip a re-capture)
    assert 1 < fast["speed"]["graph_captures"] <= 1 + len({e["step"] for e in ev})
    assert fast["pruning"]["head_step_fraction"] < 1.0
    act = torch.tensor(fast["pruning"]["active"])
    assert act.any(1).all() and all(act[i, a] for i, a in enumerate(fast["assignment"]))
    canon = lambda r: sorted(sorted(g) for g in r["groups"])
    assert canon(fast) == canon(eager)


def _ddp_steps(cfg, dev, graph: bool, steps: int):
    """``steps`` training steps of the bench stepper's model/method/optimizer wrapped in DDP (one-rank
    NCCL group), eager or with whole-step CUDA-graph capture; returns (per-branch params, captures)."""
    from fastdmtg.bench import build_stepper
    from fastdmtg.step import DDP_GRAPH_WARMUP, StepRunner, wrap_ddp
    _, info = build_stepper(cfg, dev, n_batches=steps)
    inner = info["runner"]
    runner = StepRunner(wrap_ddp(inner.eager_fn, dev, False, for_graph=graph), inner.optimizer,
                        "graph" if graph else "eager", warmup=DDP_GRAPH_WARMUP)
    bs = cfg.train.batch_size
    batches = [b for b in info["source"].batches("train", bs, shuffle=True, seed=0, epoch=0, device=dev, train=True)
               if b["image"].shape[0] == bs]
    assert len(batches) >= steps
    for b in batches[:steps]:
        runner(b)
    torch.cuda.synchronize()
    return _params(info)[0], runner.captures


@cuda
def test_ddp_whole_step_graph_equals_eager(tmp_path, monkeypatch):
    """train.cuda_graph=on under DDP: the step (gradient all-reduce included) captured after the
    required eager warm-up replays to the same parameters as eager DDP steps. One-rank NCCL group:
    the reducer, its side-stream construction and the captured all-reduce are the same code as with
    G ranks (the multi-GPU run is in test_torchrun_ddp_cuda_graph)."""
    import torch.distributed as dist
    from fastdmtg.step import DDP_GRAPH_WARMUP
    dev = torch.device("cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")   # as the trainer sets it (fastdmtg/step.py)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        cfg = apply_overrides(get_recipe("celeba9_k3"), ["train.batch_size=32", "train.amp=off", "train.kernels=triton",
                                                         "train.compile=off", "model.batched=on"])
        steps = DDP_GRAPH_WARMUP + 4                  # warm-up, capture, replays
        eager, n0 = _ddp_steps(cfg, dev, False, steps)
        graph, n1 = _ddp_steps(cfg, dev, True, steps)
    finally:
        dist.destroy_process_group()
    assert (n0, n1) == (0, 1)
    for a, b in zip(eager, graph):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_torchrun_ddp_cuda_graph(tmp_path):
    """Two ranks, train.cuda_graph=on: the run finishes, captures once per rank, and its groups cover
    every task."""
    import json
    import os
    import subprocess
    import sys
    run = tmp_path / "ddp_graph"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdmtg",
           "train", "--recipe", "synthetic_k3", "--out", str(run), "--quiet", "--set", "train.tensorboard=false",
           "--set", "train.cuda_graph=on", "--set", "train.epochs=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["speed"]["world_size"] == 2 and res["speed"]["cuda_graph"] and res["speed"]["graph_captures"] == 1
    assert sorted(i for g in res["groups"] for i in g) == sorted(res["tasks"])


def test_cuda_graph_under_ddp_is_opt_in():
    """(Runs on CPU: only the policy.) train.cuda_graph=auto keeps graphs off under DDP; =on turns them
    on, except with head pruning or SyncBatchNorm, which are refused with the field named."""
    from fastdmtg.builder import resolve
    dev = torch.device("cuda")                   # resolve only looks at the device type
    base = apply_overrides(get_recipe("celeba9_k3"), ["model.sync_bn=false"])   # SyncBN is the default under DDP
    assert resolve(base, dev, 1).cuda_graph is True
    assert resolve(base, dev, 2).cuda_graph is False
    assert resolve(apply_overrides(base, ["train.cuda_graph=on", "model.sync_bn=false"]), dev, 2).cuda_graph is True
    for extra, field in ((["dmtg.prune_eps=0.01"], "dmtg.prune_eps"), (["model.sync_bn=true"], "model.sync_bn")):
        with pytest.raises(ValueError, match=field):
            resolve(apply_overrides(base, ["train.cuda_graph=on"] + extra), dev, 2)
