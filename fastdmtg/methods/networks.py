"""Networks: train an explicit set of (possibly overlapping, possibly partial) task networks.

The second stage of TAG and HOA, whose selections may put a task into several networks (it is
trained in each and *served* — evaluated, kept after pruning — by the one where it is best), and
the pair/single networks HOA trains to estimate its losses.

``grouping.groups``: the tasks trained in each network; ``grouping.auxiliary``: per network, the
tasks that are *auxiliary* there (trained there, served by another network); resolved by
``fastdmtg.partition.resolve_networks``. On the command line a task written "+t" is auxiliary
(``--set 'grouping.groups=0,1,+2|2,3'``). Examples with 4 tasks:

    groups [[0, 1, 2], [2, 3]], auxiliary [[2], []]   network 0 trains {0, 1, 2} and serves 0, 1;
                                                      network 1 trains and serves {2, 3}
    groups [[0, 3]]                                   one network on tasks 0 and 3 only (tasks 1, 2
                                                      are not trained at all)

Branch k is network k (``model.branches`` = the number of networks, or 0: auto). Weights: z[t, k] = 1
when t is trained in network k, else 0 — so a network only ever sees the losses of its own tasks,
and (no shared trunk) K networks in one model train exactly like K separate networks.

Tasks in no network are *untrained*: they are evaluated from branch 0 with their untouched head,
so their metrics are meaningless; ``results.json`` lists them under ``untrained_tasks`` and
readers must ignore them (fastdmtg.compare does). Note the trainer's best-epoch choice uses the
total validation loss of all tasks (train.best_rule), untrained ones included; HOA
therefore reads each network's own best epoch from history.json instead.
"""
from __future__ import annotations

import torch

from ..partition import resolve_networks
from . import GroupingMethod


class NetworkGroups(GroupingMethod):
    name = "networks"
    order = 4
    augmentable = True               # constant 0/1 weights: trains with train.aggregator
    groups_example = "0,1,+2|2,3"    # given its groups (grouping.groups): K = one branch per group
    takes_auxiliary = True

    def __init__(self, networks: list[list[int]], served: list[list[int]], num_tasks: int):
        super().__init__(num_tasks, len(networks))
        self.networks, self.served = networks, served
        w = torch.zeros(num_tasks, len(networks))
        for k, net in enumerate(networks):
            w[net, k] = 1.0
        assign = torch.zeros(num_tasks, dtype=torch.long)      # untrained tasks: branch 0 (meaningless)
        for k, srv in enumerate(served):
            assign[srv] = k
        self.register_buffer("_weights", w)                     # (N, K)
        self.register_buffer("_assign", assign)
        trained = {i for n in networks for i in n}
        self.untrained = [i for i in range(num_tasks) if i not in trained]

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "NetworkGroups":
        names = task_names or [str(i) for i in range(num_tasks)]
        # (K = the number of networks: checked by the config, model.branches=0 resolves to it)
        networks, served = resolve_networks(cfg.grouping.groups, cfg.grouping.auxiliary, names)
        return cls(networks, served, num_tasks)

    def weights(self) -> torch.Tensor:
        return self._weights

    def assignment(self) -> torch.Tensor:
        return self._assign

    def extra_results(self, totals=None) -> dict:
        return {"networks": self.networks, "served_by_network": self.served, "untrained_tasks": self.untrained}


METHOD = NetworkGroups
