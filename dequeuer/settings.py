"""The dequeuer's configuration; field descriptions are its `--help`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from shared.settings import (
    ByteSize,
    CommaList,
    Count,
    Host,
    Metavar,
    Milliseconds,
    Name,
    Port,
    Seconds,
    SidecarSettings,
    Url,
    UrlPath,
    check_queue_name_part,
    check_url,
)
from shared.topology import INT64_MAX, check_service_name


class DequeuerSettings(SidecarSettings):
    """Sidecar next to a microservice: consumes the service's partition queues, calls the
    microservice over HTTP and publishes its replies."""

    prog = "proxymq-dequeuer"

    service: Name = Field(description="the service this dequeuer serves (its exchange and queues)")
    target: Url = Field(
        "http://127.0.0.1:8000",
        description="base URL of the microservice; a user and password in it are sent as "
        "Basic auth, in place of a caller's Authorization",
    )
    admin_port: Port = Field(
        9081,
        ge=0,
        le=65535,
        description="port of /healthz, /readyz, /metrics, and of POST /drain (the same stop "
        "as SIGTERM, for the pod's preStop hook; answered on the loopback only)",
    )
    admin_host: Host = Field("0.0.0.0", description="address of the admin port")
    partitions: int = Field(
        8,
        ge=1,
        le=1024,
        description="partition queues of the service; all "
        "dequeuers and the existing layout must agree",
    )
    ordering: Literal["key", "partition", "none"] = Field(
        "key",
        description="key: one request at a time per partition key, different keys in "
        "parallel; partition: one at a time per partition; none: no order at all",
    )
    concurrency: int = Field(64, ge=1, le=10_000, description="calls to the microservice at once")
    batch_size: int = Field(
        1, ge=1, le=1000, description="requests per call to --batch-path (1: no batching)"
    )
    batch_wait_ms: Milliseconds = Field(
        20, ge=0, description="longest wait to fill a batch (less than --call-timeout)"
    )
    batch_path: UrlPath = Field("/batch", description="the microservice's batch endpoint")
    instance_id: Name | None = Field(
        None,
        description="name of this dequeuer in the broker's connection list and among the "
        "service's members (heartbeat queue SERVICE.members.ID): letters, digits and "
        "- _ . : @ # , / +, at most 253 bytes (a pod's name is one), one per dequeuer: a second "
        "one with the same id stops at startup; default: host name and a random suffix",
    )
    call_timeout: Seconds = Field(
        60.0,
        gt=0,
        description="longest single call to the microservice, "
        "in seconds (a request's own deadline may cut it shorter)",
    )
    max_response: ByteSize = Field(
        16 * 1024 * 1024,
        description="largest microservice answer carried back (e.g. 16MiB; with batching, "
        "each request's own answer): a larger one is dead-lettered and its caller gets 502 "
        "service_failed. An answer in flight takes about 3.5 times its size in the dequeuer "
        "and 2.5 times in the enqueuer; RabbitMQ refuses messages over its max_message_size "
        "(128 MiB by default), which is handled the same way",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="calls per request before a retryable failure is dead-lettered (502 "
        "service_failed to the caller); a call that never left (its connection refused) is "
        "none of them and is retried after the backoff",
    )
    retry_backoff_ms: Milliseconds = Field(
        200,
        ge=0,
        description="first retry delay; doubles per attempt, with jitter, up to 10 s; at "
        "least what an answer's Retry-After asks (up to the same 10 s)",
    )
    retry_on: Annotated[CommaList, Metavar("FAILURE[,FAILURE...]")] = Field(
        ["connect", "timeout", "502", "503", "504"],
        description="failures worth a retry: connect, timeout and 5xx statuses (4xx never)",
    )
    broker_consumer_timeout: Seconds = Field(
        1800.0,
        gt=0,
        description="RabbitMQ's consumer_timeout in seconds (30 minutes unless "
        "rabbitmq.conf says otherwise): a request held longer makes the broker close the channel; "
        "a --call-timeout above it is warned about at startup",
    )
    delivery_limit: int = Field(
        20,
        ge=1,
        le=INT64_MAX,  # what AMQP carries: larger failed the declaration, half made
        description="quorum queue x-delivery-limit: deliveries "
        "before the broker dead-letters a message (poison messages)",
    )
    max_length: int | None = Field(
        None,
        ge=1,
        le=INT64_MAX,
        description="x-max-length of each partition "
        "(reject-publish: the enqueuer answers 429 when full)",
    )
    ready_path: UrlPath | None = Field(
        None,
        description="the microservice's readiness path: nothing is consumed until it "
        "answers 2xx (without it, any answer below 500 at / counts as up: a 503 says not yet)",
    )
    ready_timeout: Seconds = Field(2.0, gt=0, description="seconds one readiness probe may take")
    ready_interval: Seconds = Field(
        2.0,
        gt=0,
        description="seconds between readiness probes once "
        "up; 3 failures in a row pause consumption",
    )
    breaker_failures: Count = Field(
        5,
        ge=1,
        description="failed calls in a row (failures --retry-on names, at most 1,000,000) that "
        "open the circuit breaker (requests then wait in RabbitMQ); a timeout its caller's "
        "deadline cut below --call-timeout counts only when the call had twice the "
        "microservice's slowest recent answer",
    )
    breaker_reset: Seconds = Field(
        10.0,
        gt=0,
        description="seconds the breaker stays open before one request probes the microservice; "
        "with other dequeuers ready, its partitions go to them meanwhile, and it takes its share "
        "back for the probe (away twice as long after each failed probe, up to 120 s)",
    )
    shutdown_grace: Seconds = Field(
        25.0,
        ge=0,
        description="seconds a stopping dequeuer (SIGTERM, POST /drain) "
        "or a partition handover waits for requests in flight; fits "
        "Kubernetes' default 30 s",
    )
    heartbeat_interval: Seconds = Field(
        0.5, gt=0, description="seconds between membership heartbeats on exchange SERVICE.members"
    )
    member_expiry: Seconds = Field(
        2.5,
        gt=0,
        description="this dequeuer, not heard from for this long, is gone and its "
        "partitions are taken over (it tells the others in its heartbeats)",
    )

    @field_validator("service")
    @classmethod
    def _service_name(cls, value: str) -> str:
        return check_service_name(value)

    @field_validator("instance_id")
    @classmethod
    def _names_a_queue(cls, value: str | None) -> str | None:
        """It names the heartbeat queue: another character was replaced with '-' and the id cut
        to 100, so that two ids could become one, and the second dequeuer stopped as a duplicate.
        253 is a pod's name's limit; `members_queue` fits any of them in a queue name."""
        if value is None:
            return value
        check_queue_name_part(value)
        if len(value.encode()) > 253:
            raise ValueError("at most 253 bytes (a pod's name is at most 253)")
        return value

    @field_validator("retry_on")
    @classmethod
    def _retry_on(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in ("connect", "timeout") and not (
                value.isdigit() and 500 <= int(value) <= 599
            ):
                raise ValueError(f"{value!r}: retry on connect, timeout or a 5xx status")
        return values

    @field_validator("batch_size")
    @classmethod
    def _batch_fits_concurrency(cls, value: int, info: ValidationInfo) -> int:
        """A batch only holds requests in flight at the same time, and at most `concurrency`
        are: a larger batch could never fill, and every batch would wait --batch-wait-ms."""
        concurrency = info.data.get("concurrency")
        if isinstance(concurrency, int) and value > concurrency:
            raise ValueError(
                f"{value} is more than --concurrency {concurrency}; a batch holds requests "
                f"in flight at once, so raise --concurrency to at least {value}"
            )
        return value

    @field_validator("call_timeout")
    @classmethod
    def _call_outlasts_batch_wait(cls, value: float, info: ValidationInfo) -> float:
        """A request's wait for its batch to fill counts against its call: a batch that could
        wait the whole call never sent a lone request, which timed out uncalled (and each such
        timeout counted against the breaker)."""
        size, wait_ms = info.data.get("batch_size", 1), info.data.get("batch_wait_ms", 0)
        if size > 1 and wait_ms / 1000 >= value:
            raise ValueError(
                f"{value:g} s is no longer than --batch-wait-ms {wait_ms}: a request could "
                "time out waiting for its batch to fill; lower --batch-wait-ms well below it"
            )
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        """Refused at start: a target without scheme or host was never ready, silently."""
        check_url(value, ("http", "https"), "a URL like http://HOST or https://HOST")
        return value

    @field_validator("batch_path", "ready_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/'")
        return value

    @field_validator("member_expiry")
    @classmethod
    def _expiry_spans_heartbeats(cls, value: float, info: ValidationInfo) -> float:
        """A member must be heard from at least twice within its expiry: otherwise dequeuers
        take each other for gone between heartbeats, and their partitions change hands for
        ever (each handover counts against the requests' delivery limit)."""
        interval = info.data.get("heartbeat_interval")
        if isinstance(interval, float) and value < 2 * interval:
            raise ValueError(
                f"{value:g} s is less than two --heartbeat-interval ({interval:g} s); "
                f"set it to at least {2 * interval:g}"
            )
        return value
