"""Task partitions at the edge: the one parser and the one formatter of the ``grouping.groups`` text.

Inside the package a partition is ``list[list[int]]`` (task indices per group, in group order); the
text form exists only in configs and on the command line:

    "0,1|2"      groups separated by "|", tasks by "," — indices or task names
    "0,1,+2|2,3" (method ``networks``) a task written "+t" is auxiliary in that network: trained
                 there, served (evaluated) by another network
"""
from __future__ import annotations

FIELD = "grouping.groups"


def parse_networks(text: str, task_names: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """→ (networks: tasks trained in each network, served: tasks served by each network). Every task
    is served by at most one network; an auxiliary task must be served by some network."""
    def index(tok: str) -> int:
        if tok.isdigit():
            i = int(tok)
            if not 0 <= i < len(task_names):
                raise ValueError(f"{FIELD}: task index {i} out of range 0..{len(task_names) - 1}")
            return i
        if tok in task_names:
            return task_names.index(tok)
        raise ValueError(f"{FIELD}: unknown task {tok!r}; tasks: {', '.join(task_names)}")

    networks, served = [], []
    for part in text.split("|"):
        net, srv = [], []
        for tok in (t.strip() for t in part.split(",")):
            if not tok:
                continue
            aux = tok.startswith("+")
            i = index(tok[1:].strip() if aux else tok)
            if i in net:
                raise ValueError(f"{FIELD}: task {task_names[i]!r} twice in group {part!r}")
            net.append(i)
            if not aux:
                srv.append(i)
        if not net:
            raise ValueError(f"{FIELD}: empty group in {text!r}")
        networks.append(net)
        served.append(srv)
    flat = [i for s in served for i in s]
    dup = sorted({task_names[i] for i in flat if flat.count(i) > 1})
    if dup:
        raise ValueError(f"{FIELD}: task(s) {dup} served by more than one network; mark the extra "
                         "memberships auxiliary with '+'")
    for net, srv in zip(networks, served):
        for i in net:
            if i not in srv and i not in flat:
                raise ValueError(f"{FIELD}: task {task_names[i]!r} is auxiliary ('+') but no network "
                                 "serves it")
    return networks, served


def parse_groups(text: str, task_names: list[str]) -> list[list[int]]:
    """A partition: "0,1|2" or "a,b|c" → [[0, 1], [2]]; every task exactly once, no '+'."""
    if "+" in text:
        raise ValueError(f"{FIELD}: {text!r}: auxiliary tasks ('+') need grouping.method=networks")
    groups, _ = parse_networks(text, task_names)
    if sorted(i for g in groups for i in g) != list(range(len(task_names))):
        raise ValueError(f"{FIELD}: {text!r} must name every task exactly once "
                         f"({len(task_names)} tasks: {', '.join(task_names)})")
    return groups


def format_groups(groups: list[list[int]], served: list[int] | None = None) -> str:
    """Inverse of parse_groups / parse_networks: ``served[t]`` = index of the network serving task t
    (a task of a network that does not serve it is written '+t'); None: every task served where it is."""
    return "|".join(",".join(str(t) if served is None or served[t] == k else f"+{t}" for t in g)
                    for k, g in enumerate(groups))


def num_groups(text: str) -> int:
    """The number of groups of a partition text (before task names are known)."""
    return len(text.split("|"))
