"""Groups of GPUs as multisets by node, and the arithmetic the searches do on them.

GPUs inside one node are interchangeable, so a group (one model replica) is
``((node index, gpu count), ...)`` sorted by node index: two groups with the
same counts on the same nodes are the same group.
"""

from __future__ import annotations

import itertools

Group = tuple[tuple[int, int], ...]  # ((node index, gpu count), ...) sorted by node index


def group_add(group: Group, node: int, k: int) -> Group:
    """``group`` with ``k`` more GPUs of ``node`` (fewer for k < 0; a node at 0 drops out)."""
    counts = dict(group)
    counts[node] = counts.get(node, 0) + k
    return tuple(sorted((n, c) for n, c in counts.items() if c > 0))


def group_union(a: Group, b: Group) -> Group:
    counts = dict(a)
    for n, c in b:
        counts[n] = counts.get(n, 0) + c
    return tuple(sorted(counts.items()))


def group_size(group: Group) -> int:
    """GPUs in the group."""
    return sum(c for _, c in group)


def sub_compositions(group: Group) -> list[Group]:
    """Every non-empty proper sub-multiset of a group's GPUs."""
    out = []
    for counts in itertools.product(*(range(c + 1) for _, c in group)):
        if 0 < sum(counts) < group_size(group):
            out.append(tuple((node, k) for (node, _), k in zip(group, counts) if k))
    return out
