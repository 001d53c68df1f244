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
def test_replays_draw_fresh_noise():
    from fastdmtg.bench import build_stepper
    cfg = apply_overrides(get_recipe("celeba9_k3"), ["train.batch_size=32", "train.cuda_graph=on",
                                                     "train.kernels=triton"])
    step, info = build_stepper(cfg, torch.device("cuda"), n_batches=4)
    for _ in range(4):
        step()
    seen = []
    for _ in range(3):
        total, L = step()
        seen.append(float(total))
    assert len(set(seen)) == 3                   # different batches / noise every replay


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
            "grouping.prune_eps=0.05", "grouping.prune_patience=50"]
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
