"""Run under torchrun (2 gloo ranks) by tests/test_fidelity.py: builds the Trainer for
grouping.ddp_noise=shared and =per_rank, draws two Gumbel samples per rank through the trainer's DMTG
method, gathers them on rank 0, checks that model.sync_bn=true is refused on CPU, and writes
OUT/probe.json.

    torchrun --standalone --nproc_per_node=2 tests/ddp_noise_probe.py OUT
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from fastdmtg.config import apply_overrides, get_recipe
from fastdmtg.train import Trainer

SMALL = ["train.tensorboard=false", "train.progress=false", "data.synthetic_train=64", "data.synthetic_val=16",
         "data.synthetic_test=16", "train.batch_size=8", "model.width=1", "train.device=cpu"]


def main(out: Path) -> None:
    res = {}
    for mode in ("shared", "per_rank"):
        cfg = apply_overrides(get_recipe("synthetic_k3"), SMALL + [f"grouping.ddp_noise={mode}"])
        tr = Trainer(cfg, out / mode, progress=False)
        z = [tr.method.weights(0).detach().tolist() for _ in range(2)]          # 2 steps × (N, K)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, z)
        res[mode] = {"z": gathered, "global_batch": tr.global_batch}
    try:
        Trainer(apply_overrides(get_recipe("synthetic_k3"), SMALL + ["model.sync_bn=true"]), out / "sync",
                progress=False)
        res["sync_bn_error"] = ""
    except ValueError as e:
        res["sync_bn_error"] = str(e)
    if dist.get_rank() == 0:
        (out / "probe.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
