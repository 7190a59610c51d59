"""Telling RabbitMQ's refusal of an oversized message from the other failures it causes."""

from __future__ import annotations

import aiormq

from shared.broker import refused_for_size

REFUSAL = aiormq.exceptions.ChannelPreconditionFailed(
    "PRECONDITION_FAILED - message size 135266304 is larger than configured max size 134217728"
)


def test_the_refused_message_is_the_one_of_the_size_the_broker_names() -> None:
    assert refused_for_size(REFUSAL, 135266304)


def test_other_publishes_failed_by_the_same_channel_close_are_not_refused() -> None:
    """The close fails every publish in flight on the channel with the same exception: a
    4-byte reply that shared it is a passing channel loss, published again, not dead-lettered."""
    assert not refused_for_size(REFUSAL, 4)
    assert not refused_for_size(REFUSAL, 1352663)


def test_other_precondition_failures_are_not_refusals() -> None:
    unknown_tag = aiormq.exceptions.ChannelPreconditionFailed(
        "PRECONDITION_FAILED - unknown delivery tag 7"
    )
    assert not refused_for_size(unknown_tag, 7)
    assert not refused_for_size(ConnectionError("message size 4 is larger"), 4)
