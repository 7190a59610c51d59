"""The enqueuer's configuration; field descriptions are its `--help`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from enqueuer.guard import read_token
from shared import partition_key
from shared.settings import (
    ByteSize,
    CommaList,
    Count,
    FilePath,
    Host,
    Metavar,
    Name,
    Port,
    Seconds,
    SidecarSettings,
    check_queue_name_part,
)


class EnqueuerSettings(SidecarSettings):
    """Sidecar next to an API: takes HTTP calls to /{service}/{path}, publishes them to the
    service's RabbitMQ partitions and answers with the microservice's reply."""

    prog = "proxymq-enqueuer"

    host: Host = Field(
        "127.0.0.1",
        description="address the API listens on (localhost: only "
        "the pod's own containers can call it)",
    )
    port: Port = Field(8080, description="API port", ge=1, le=65535)
    admin_port: Port = Field(
        9080, description="port of /healthz, /readyz and /metrics", ge=0, le=65535
    )
    admin_host: Host = Field(
        "0.0.0.0", description="address of the admin port (probes come from the kubelet)"
    )
    auth_token_file: FilePath | None = Field(
        None,
        description="file holding a bearer token callers must send (Authorization: Bearer "
        "TOKEN), read at start: a new token needs a restart; without it, any process that "
        "reaches --host:--port may call",
    )
    max_headers: int = Field(
        100,
        ge=1,
        # aiohttp holds up to twice as many lines of 8 KiB while a head arrives: 16 MiB per
        # connection at 1000.
        le=1000,
        description="most request headers a caller may send (at most 1000); more get 431 "
        "headers_too_large",
    )
    max_header_bytes: ByteSize = Field(
        64 * 1024,
        description="largest total size of a request's headers; larger gets 431 headers_too_large",
    )
    partition_key: Annotated[CommaList, Metavar("SOURCE[,SOURCE...]")] = Field(
        ["header:X-Partition-Key"],
        description="where the partition key comes from, in order, first match wins: "
        "header:NAME, json:/json/pointer (in a body whose Content-Type names json, or has "
        "none), query:NAME (repeat the flag or separate by commas). A JSON string is the key "
        "as it is; a number, true or false is its text, a whole number as an integer (10.0 "
        "is 10, 1e16 is 10000000000000000; a fraction or an exponent is read as a double, as "
        "JavaScript does); null is no key; an object or an array is 400 bad_partition_key",
    )
    require_partition_key: bool = Field(
        False,
        description="answer 400 bad_partition_key when no source yields a key (a body that is "
        "no JSON yields none, and the next source is tried; otherwise unkeyed requests are "
        "spread over the partitions, with no order between them)",
    )
    timeout: Seconds = Field(
        30.0,
        gt=0,
        description="longest a caller waits, in seconds (at most 30 days); X-Request-Timeout "
        "may ask for less",
    )
    idle_timeout: Seconds = Field(
        75.0,
        gt=0,
        description="seconds a caller's connection may stay idle between requests, or take to "
        "send a request's head, before it is closed",
    )
    max_body: ByteSize = Field(
        1024 * 1024,
        description="largest request body (e.g. 1MiB); larger gets 413 body_too_large, as does "
        "a body RabbitMQ refuses (over its max_message_size, 128 MiB by default)",
    )
    services: Annotated[CommaList, Metavar("SERVICE[,SERVICE...]")] = Field(
        [],
        description="services callers may reach (comma separated); "
        "empty allows any service that has a topology",
    )
    max_in_flight: Count = Field(
        10_000,
        gt=0,
        description="requests waiting for a reply at once, "
        "asynchronous ones included (at most 1,000,000); more get 429 backpressure",
    )
    max_in_flight_per_service: Count | None = Field(
        None,
        gt=0,
        description="requests of one service waiting for a reply at once, so that a slow or "
        "stuck service leaves slots to the others; more get 429 backpressure; default: half of "
        "--max-in-flight, all of it when --services names one service",
    )
    result_ttl: Seconds = Field(
        600.0, gt=0, description="seconds an asynchronous result is kept after it is done"
    )
    max_results: Count = Field(
        10_000,
        gt=0,
        description="asynchronous results kept (at most 1,000,000); the oldest finished ones "
        "go first",
    )
    max_result_bytes: ByteSize = Field(
        64 * 1024 * 1024,
        description="bytes of answers (bodies and headers) kept at most (e.g. 64MiB) by each "
        "of the asynchronous results and the Idempotency-Key repeats; the oldest go first, "
        "the newest is always kept",
    )
    idempotency_window: Seconds = Field(
        300.0,
        gt=0,
        description="seconds a repeated "
        "Idempotency-Key gets the first request's id and result "
        "instead of a second message, counted from the first's arrival; "
        "and for as long as the first still runs",
    )
    breaker_failures: Count = Field(
        5,
        ge=1,
        description="failed publishes in a row (timeouts, "
        "lost channels) that open the breaker on the broker connection: "
        "callers then get 503 at once (at most 1,000,000)",
    )
    breaker_reset: Seconds = Field(
        5.0,
        gt=0,
        description="seconds the breaker stays open before one publish probes the broker again; "
        "a restored broker connection closes it at once",
    )
    shutdown_grace: Seconds = Field(
        5.0,
        ge=0,
        description="seconds a stopping enqueuer (SIGTERM) waits for the replies its callers "
        "await; callers still waiting then get 503 broker_unavailable, while their requests "
        "may still run. The pod's grace period must cover it (docs/operations.md)",
    )
    instance_id: Name | None = Field(
        None,
        description="name of this enqueuer (reply queue proxymq.replies.ID, and its lease "
        "proxymq.replies.ID.lease): letters, digits and - _ . : @ # , / +, one per "
        "enqueuer: a second one with the same id stops at startup (the first stops if it finds "
        "the second after a reconnect); default: a random id",
    )

    def in_flight_share(self) -> int:
        """The slots one service may hold (`--max-in-flight-per-service`)."""
        if self.max_in_flight_per_service is not None:
            return min(self.max_in_flight_per_service, self.max_in_flight)
        if len(self.services) == 1:
            return self.max_in_flight
        return max(1, self.max_in_flight // 2)

    @field_validator("partition_key")
    @classmethod
    def _key_sources(cls, values: list[str]) -> list[str]:
        partition_key.parse_sources(values)
        return values

    @field_validator("auth_token_file")
    @classmethod
    def _token_readable(cls, value: str | None) -> str | None:
        """Read once here so that a missing or empty token file is a configuration error like
        any other (exit 2), not a failure once the enqueuer starts."""
        read_token(value)
        return value

    @field_validator("instance_id")
    @classmethod
    def _fits_a_queue_name(cls, value: str | None) -> str | None:
        """A queue name is at most 255 bytes, of characters the AMQP client takes: an id too
        long or with another character stopped the enqueuer with a traceback (`Max length
        exceeded for queue`, `Invalid value for queue`) once it was already listening."""
        if value is None:
            return value
        check_queue_name_part(value)
        if len(f"proxymq.replies.{value}.lease") > 255:
            raise ValueError(
                "at most 233 bytes: it names the queues proxymq.replies.ID and "
                "proxymq.replies.ID.lease"
            )
        return value
