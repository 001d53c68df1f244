"""Task partitions: the typed value, its one text parser and formatter (the edge), and its resolution.

Inside the package a partition is ``list[list[int | str]]`` (``config.Partition``): the tasks of each
group, in group order, as task indices or task names (names are resolved to indices once the task
list is known: ``resolve_partition`` / ``resolve_networks``). The method ``networks`` adds, per
network, its *auxiliary* tasks (``grouping.auxiliary``): trained there, served (evaluated, kept) by
another network.

The text form exists only at the edge (``--set grouping.groups=...``, a config file, printed
tables):

    "0,1|2"      groups separated by "|", tasks by "," — indices or task names
    "0,1,+2|2,3" (method ``networks``) a task written "+t" is auxiliary in that network
"""
from __future__ import annotations

FIELD = "grouping.groups"


def parse_text(text: str) -> tuple[list[list[int | str]], list[list[int | str]]]:
    """"0,1,+2|b,3" → (groups [[0, 1, 2], ["b", 3]], auxiliary [[2], []]); auxiliary is [] when no
    task is marked '+'. Indices and names are checked against the tasks later (resolve_*)."""
    groups, aux = [], []
    for part in text.split("|"):
        g, a = [], []
        for tok in (t.strip() for t in part.split(",")):
            if not tok:
                continue
            is_aux = tok.startswith("+")
            tok = tok[1:].strip() if is_aux else tok
            if not tok:
                raise ValueError(f"{FIELD}: '+' without a task in {text!r}")
            t = int(tok) if tok.isdigit() else tok
            g.append(t)
            if is_aux:
                a.append(t)
        if not g:
            raise ValueError(f"{FIELD}: empty group in {text!r} (expected e.g. 0,1|2)")
        groups.append(g)
        aux.append(a)
    return groups, (aux if any(aux) else [])


def format_groups(groups: list[list[int | str]], served: list[int] | None = None) -> str:
    """The text form (inverse of parse_text): ``served[t]`` = index of the network serving task t (a
    task of a network that does not serve it is written '+t'); None: every task served where it is."""
    return "|".join(",".join(str(t) if served is None or served[t] == k else f"+{t}" for t in g)
                    for k, g in enumerate(groups))


def check_shape(groups, auxiliary) -> None:
    """What can be checked before the tasks are known: lists of non-empty groups of task indices (>= 0)
    or names, no task twice in a group; auxiliary empty or one list per group, within its group."""
    for field, value in ((FIELD, groups), ("grouping.auxiliary", auxiliary)):
        if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
            raise ValueError(f"{field}: expected a list of groups (lists of task indices or names), "
                             f"e.g. [[0, 1], [2]], got {value!r}")
        for g in value:
            for t in g:
                ok = (isinstance(t, int) and not isinstance(t, bool) and t >= 0) or (isinstance(t, str) and t)
                if not ok:
                    raise ValueError(f"{field}: {t!r} is not a task index (>= 0) or a task name")
    for g in groups:
        if not g:
            raise ValueError(f"{FIELD}: an empty group in {groups!r}")
        twice = sorted({str(t) for t in g if g.count(t) > 1})
        if twice:
            raise ValueError(f"{FIELD}: task(s) {twice} twice in group {g!r}")
    if auxiliary:
        if len(auxiliary) != len(groups):
            raise ValueError(f"grouping.auxiliary: one list per group of {FIELD} ({len(groups)}), got "
                             f"{len(auxiliary)}")
        for k, (g, a) in enumerate(zip(groups, auxiliary)):
            if any(t not in g for t in a):
                raise ValueError(f"grouping.auxiliary: {a!r} are not all tasks of group {k} {g!r}")


def _index(t: int | str, names: list[str]) -> int:
    if isinstance(t, int):
        if not 0 <= t < len(names):
            raise ValueError(f"{FIELD}: task index {t} out of range 0..{len(names) - 1}")
        return t
    if t.isdigit():
        return _index(int(t), names)
    if t in names:
        return names.index(t)
    raise ValueError(f"{FIELD}: unknown task {t!r}; tasks: {', '.join(names)}")


def resolve_networks(groups, auxiliary, names: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """→ (networks: task indices trained in each network, served: task indices served by each). Every
    task is served by at most one network; an auxiliary task must be served by some network."""
    check_shape(groups, auxiliary)
    networks, served = [], []
    for k, g in enumerate(groups):
        net = [_index(t, names) for t in g]
        twice = sorted({names[i] for i in net if net.count(i) > 1})
        if twice:
            raise ValueError(f"{FIELD}: task(s) {twice} twice in group {g!r}")
        aux = {_index(t, names) for t in auxiliary[k]} if auxiliary else set()
        networks.append(net)
        served.append([i for i in net if i not in aux])
    flat = [i for s in served for i in s]
    dup = sorted({names[i] for i in flat if flat.count(i) > 1})
    if dup:
        raise ValueError(f"{FIELD}: task(s) {dup} served by more than one network; mark the extra "
                         "memberships auxiliary ('+t')")
    for net, srv in zip(networks, served):
        for i in net:
            if i not in srv and i not in flat:
                raise ValueError(f"{FIELD}: task {names[i]!r} is auxiliary ('+') but no network serves it")
    return networks, served


def resolve_partition(groups, names: list[str]) -> list[list[int]]:
    """A partition of all the tasks: [[0, "b"], [2]] → [[0, 1], [2]]; every task exactly once."""
    parts, _ = resolve_networks(groups, [], names)
    if sorted(i for g in parts for i in g) != list(range(len(names))):
        raise ValueError(f"{FIELD}: {format_groups(groups)} must name every task exactly once "
                         f"({len(names)} tasks: {', '.join(names)})")
    return parts
