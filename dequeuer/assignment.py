"""Which dequeuer should own which partition: balanced, deterministic and sticky.

Every dequeuer computes the same answer from the same membership view, so no coordinator is
needed; when views differ for a moment, single active consumer on each partition queue (the
broker, not this function) still keeps one consumer at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _score(member: str, salt: str) -> int:
    digest = hashlib.blake2b(f"{member}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(partitions: int, members: Iterable[str]) -> dict[str, frozenset[int]]:
    """Each member gets floor(N/D) or ceil(N/D) partitions. Rendezvous hashing picks, for each
    partition, the highest-scoring member with room left, so a join or a leave moves few
    partitions besides those that must move."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    base, extra = divmod(partitions, len(ordered))
    by_quota_rank = sorted(ordered, key=lambda m: _score(m, "quota"), reverse=True)
    quota = {m: base + (1 if rank < extra else 0) for rank, m in enumerate(by_quota_rank)}
    owned: dict[str, set[int]] = {m: set() for m in ordered}
    for partition in range(partitions):
        for member in sorted(ordered, key=lambda m: _score(m, str(partition)), reverse=True):
            if len(owned[member]) < quota[member]:
                owned[member].add(partition)
                break
    return {m: frozenset(p) for m, p in owned.items()}
