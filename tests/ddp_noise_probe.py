"""Run under torchrun (2 gloo ranks) by tests/test_fidelity.py: builds the Trainer for
dmtg.ddp_noise=shared and =per_rank, draws two Gumbel samples per rank through the trainer's DMTG
method, gathers them on rank 0, trains one epoch (fit_probe: the samples and S of each rank), checks that model.sync_bn=true is refused on CPU, and writes
OUT/probe.json.

    torchrun --standalone --nproc_per_node=2 tests/ddp_noise_probe.py OUT
"""
import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from fastdmtg.config import apply_overrides, get_recipe
from fastdmtg.train import Trainer

SMALL = ["train.tensorboard=false", "train.progress=false", "data.synthetic_train=64", "data.synthetic_val=16",
         "data.synthetic_test=16", "train.batch_size=8", "model.width=1", "train.device=cpu"]


def fit_probe(out: Path) -> list:
    """One epoch of training with per-rank noise (so the ranks' S gradients differ before the
    all-reduce): per rank, the samples of every step (a hash per image), the grouping logits S and a
    checksum of the weights at the end, gathered on every rank."""
    cfg = apply_overrides(get_recipe("synthetic_k3"), SMALL + ["dmtg.ddp_noise=per_rank", "train.epochs=1"])
    tr = Trainer(cfg, out, progress=False)
    seen, step = [], tr.runner.fn                           # eager on CPU: the runner calls fn(batch)

    def recorder(batch):
        seen.append([hashlib.sha1(img.numpy().tobytes()).hexdigest()[:16] for img in batch["image"]])
        return step(batch)
    tr.runner.fn = recorder
    tr.fit()
    state = {"steps": seen, "S": tr.method.logits.detach().tolist(),
             "weights": float(sum(p.detach().double().sum() for p in tr.model.parameters()))}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def main(out: Path) -> None:
    res = {}
    for mode in ("shared", "per_rank"):
        cfg = apply_overrides(get_recipe("synthetic_k3"), SMALL + [f"dmtg.ddp_noise={mode}"])
        tr = Trainer(cfg, out / mode, progress=False)
        z = [tr.method.weights().detach().tolist() for _ in range(2)]          # 2 steps × (N, K)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, z)
        res[mode] = {"z": gathered, "global_batch": tr.global_batch}
    res["fit"] = fit_probe(out / "fit")
    try:
        Trainer(apply_overrides(get_recipe("synthetic_k3"), SMALL + ["model.sync_bn=true"]), out / "sync",
                progress=False)
        res["sync_bn_error"] = ""
    except ValueError as e:
        res["sync_bn_error"] = str(e)
    from fastdmtg.distributed import broadcast_float, global_mean
    r = dist.get_rank()
    gathered = [None] * dist.get_world_size()
    # rank 0 saw 1 sample with loss sum 3, rank 1 3 samples with sum 5: the mean over all is 8/4 = 2
    dist.all_gather_object(gathered, (global_mean([3.0, 5.0][r], [1, 3][r], "cpu"),
                                      broadcast_float(7.0 if r == 0 else None, "cpu")))
    res["global_mean"] = [g[0] for g in gathered]
    res["broadcast"] = [g[1] for g in gathered]
    if r == 0:
        (out / "probe.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
