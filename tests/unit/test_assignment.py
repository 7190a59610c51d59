"""The partition assignment every dequeuer computes alone must agree, balance and stick."""

from __future__ import annotations

import itertools
import random

import pytest

from dequeuer.assignment import assign


@pytest.mark.parametrize(
    ("partitions", "members"),
    [
        (8, 1),
        (8, 2),
        (8, 3),
        (8, 5),
        (8, 8),
        (8, 11),
        (1, 3),
        (16, 6),
        (100, 7),
    ],
)
def test_balanced_and_complete(partitions: int, members: int) -> None:
    names = [f"d{i}" for i in range(members)]
    owned = assign(partitions, names)
    counts = sorted(len(p) for p in owned.values())
    assert counts[0] >= partitions // members
    assert counts[-1] <= -(-partitions // members)
    every = list(itertools.chain.from_iterable(owned.values()))
    assert sorted(every) == list(range(partitions))  # each partition exactly once


def test_same_answer_whatever_the_order() -> None:
    names = [f"pod-{i}" for i in range(5)]
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert assign(8, names) == assign(8, shuffled)


def test_a_join_moves_few_partitions() -> None:
    before = assign(12, ["a", "b", "c"])
    after = assign(12, ["a", "b", "c", "d"])
    moved = sum(1 for m in "abc" for p in before[m] if p not in after[m])
    assert moved <= 4  # at most what the newcomer must take, plus rounding


def test_no_members_no_assignment() -> None:
    assert assign(8, []) == {}
