"""torch.compile on CPU (the CPU half of the speed issue): the compiled training step computes what
the eager step computes, partial batches run eagerly (no dynamic-shape re-compilation), and a run
with batched branches + head pruning + compile finishes with every drop re-traced (the dynamo
re-compile limit is raised to the bound of the pruning rule)."""
import torch

from fastdmtg.config import apply_overrides, get_recipe
from fastdmtg.train import Trainer

FAST = ["train.tensorboard=false", "train.progress=false"]
# 2 tasks on 3 branches: cheap to compile, and with these settings the middle branch dies mid-run
TWO_TASKS = ["data.synthetic_groups=2", "data.synthetic_tasks_per_group=1", "data.synthetic_train=600",
             "data.synthetic_val=200", "data.synthetic_test=200", "train.epochs=3", "train.batch_size=64",
             "model.width=4", "model.batched=on"]
PRUNE = ["dmtg.tau=0.05", "dmtg.prune_eps=0.2", "dmtg.prune_patience=3"]


def cfg(extra=()):
    return apply_overrides(get_recipe("synthetic_k3"), FAST + TWO_TASKS + list(extra))


def test_compiled_step_matches_eager_and_partial_batches_stay_eager(tmp_path):
    from torch._dynamo.utils import counters
    eager = Trainer(cfg(), tmp_path / "eager", progress=False)
    comp = Trainer(cfg(["train.compile=on"]), tmp_path / "comp", progress=False)
    assert comp.runner.mode == "compile" and eager.runner.mode == "eager" and comp.speed["batched"]
    comp.model.load_state_dict(eager.model.state_dict())
    comp.method.load_state_dict(eager.method.state_dict())
    batch = next(iter(eager.data.batches("train", 64, shuffle=True, seed=0, epoch=0, device="cpu", train=True)))
    for step in range(2):
        a, b = eager.runner(batch), comp.runner(batch)
        # per-head losses depend on the network only: equal to float tolerance. (S itself is not
        # compared: at initialisation the K branches are identical, the exact S-gradient is 0 and
        # eager gives exactly 0, compiled code ~1e-9 rounding noise, which Adam turns into ±lr steps.)
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)
        if step == 0:
            torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    part = {k: (v[:24] if torch.is_tensor(v) else v) for k, v in batch.items()}
    total, L = comp.runner(part)                                          # the last partial batch
    assert torch.isfinite(total) and counters["stats"]["unique_graphs"] == graphs


def test_pruning_with_batched_branches_under_compile(tmp_path):
    import torch._dynamo.config as dynamo_cfg
    # 9 tasks, K=3: up to 18 drop steps, each a new graph — above dynamo's default limit of 8
    Trainer(apply_overrides(get_recipe("synthetic_k3"), FAST + PRUNE + ["train.compile=on"]), tmp_path / "nine",
            progress=False)
    assert dynamo_cfg.recompile_limit >= 9 * (3 - 1) + 2
    res = Trainer(cfg(PRUNE + ["train.compile=on"]), tmp_path / "run", progress=False).fit()
    assert res["speed"]["compile"] and res["speed"]["batched"]
    act = res["pruning"]["active"]
    assert res["pruning"]["events"] and not all(any(r[k] for r in act) for k in range(3))   # a branch died
    assert all(act[i][a] for i, a in enumerate(res["assignment"]))
    assert all(torch.isfinite(torch.tensor(v)) for v in res["test"]["loss"].values())
