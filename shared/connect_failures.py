"""How a failed broker connection is told, in the sidecars' logs and the operator's tool: the
cause in a few words, what to fix when the broker refused, the URL without its password. Apart
from shared/broker.py so that setting up logging (url-fetcher's too) loads no aio-pika."""

from __future__ import annotations

import aiormq
from yarl import URL

from shared.settings import masked, split_urls


def failure_reason(exc: BaseException) -> str:
    """A failed connection's cause in a few words, without the exception's repr."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError) and len(exc.args) == 2:
        return str(exc.args[1])  # (errno, text), as aiormq rewraps an OSError
    return str(exc) or type(exc).__name__


def refusal(url: str, exc: BaseException) -> tuple[str, str] | None:
    """What a broker that answered refused, and what to fix, when `exc` is such a refusal: a
    broker started or tried again as it is would refuse again."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"RabbitMQ at {redact(url)} refused the credentials ({failure_reason(exc)})",
            "fix the user and password in --amqp-url / PROXYMQ_AMQP_URL",
        )
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # The broker closed the connection when asked for the vhost; aiormq drops its reason.
        parsed = URL(url)
        vhost, user = parsed.path[1:] or "/", parsed.user or "guest"
        return (
            f"RabbitMQ at {redact(url)} refused vhost {vhost!r}: it does not exist, or user "
            f"{user!r} has no access to it",
            "fix the vhost in --amqp-url / PROXYMQ_AMQP_URL, or on the broker: "
            f"rabbitmqctl add_vhost {vhost}; rabbitmqctl set_permissions -p {vhost} {user} "
            "'.*' '.*' '.*'",
        )
    return None


def redact(url: str) -> str:
    """The broker URL(s) without password, for logs and error messages."""
    return ",".join(masked(u) for u in split_urls(url))
