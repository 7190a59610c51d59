"""What operators see: metrics that move by exactly what was sent, and one trace from the API's
traceparent to the microservice, exported over OTLP to a receiver this test runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
import pamqp.encode
import pytest
from aio_pika.abc import AbstractQueue, AbstractRobustConnection, HeadersType
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from shared import envelope, topology
from shared.processes import free_port
from tests.conftest import Stack, foreign_replier, metric, serving
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def test_both_sidecars_admin_endpoints(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The contract's admin port of each sidecar: `/healthz` alive, `/readyz` with what it
    checked (the dequeuer's microservice too), `/metrics` in Prometheus text format."""
    dequeuer = await stack.dequeuer(service, target.url)
    enqueuer, _ = await stack.enqueuer()
    for process, prefix in [(enqueuer, "proxymq_enqueuer_"), (dequeuer, "proxymq_dequeuer_")]:
        admin = f"http://127.0.0.1:{process.admin_port}"  # type: ignore[attr-defined]
        async with http.get(f"{admin}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{admin}/readyz") as response:
            assert response.status == 200
            ready = await response.json()
        assert ready["ready"] is True and ready["checks"]["broker_connected"] is True
        async with http.get(f"{admin}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            families = list(text_string_to_metric_families(await response.text()))
        assert any(family.name.startswith(prefix) for family in families)
        assert "proxymq_broker_connected" in {family.name for family in families}
    assert ready["checks"]["microservice_ready"] is True


async def test_metrics_count_exactly_what_was_sent(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    dequeuer = await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    for _ in range(7):
        async with http.get(f"{url}/{service}/echo/ok") as r:
            assert r.status == 200
    for _ in range(3):
        async with http.get(f"{url}/{service}/status/404") as r:
            assert r.status == 404
    for _ in range(2):
        async with http.get(f"{url}/not-{service}/x") as r:
            assert r.status == 404
    enq, deq = enqueuer.admin_port, dequeuer.admin_port  # type: ignore[attr-defined]
    requests = "proxymq_enqueuer_requests_total"
    assert await metric(http, enq, requests, {"service": service, "outcome": "2xx"}) == 7
    assert await metric(http, enq, requests, {"service": service, "outcome": "4xx"}) == 3
    assert await metric(http, enq, requests, {"outcome": "unknown_service"}) == 2
    assert (
        await metric(
            http, enq, "proxymq_enqueuer_request_duration_seconds_count", {"service": service}
        )
        == 10
    )
    assert await metric(http, enq, "proxymq_enqueuer_in_flight_requests") == 0
    assert await metric(http, enq, "proxymq_broker_connected") == 1
    messages = "proxymq_dequeuer_messages_total"
    assert await metric(http, deq, messages, {"service": service, "outcome": "replied"}) == 10
    assert (
        await metric(
            http, deq, "proxymq_dequeuer_forward_duration_seconds_count", {"status_class": "2xx"}
        )
        == 7
    )
    assert (
        await metric(
            http, deq, "proxymq_dequeuer_forward_duration_seconds_count", {"status_class": "4xx"}
        )
        == 3
    )
    assert await metric(http, deq, "proxymq_dequeuer_queue_wait_seconds_count") == 10
    assert await metric(http, deq, "proxymq_dequeuer_partitions_owned") == 8
    assert await metric(http, deq, "proxymq_dequeuer_breaker_open") == 0
    assert await metric(http, deq, "proxymq_dequeuer_retries_total") == 0


async def test_service_names_callers_make_up_get_no_series_of_their_own(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A request refused before it was published (here 400, no partition key; a 413 or a 429
    alike) counted under whatever service name its path gave, with a duration histogram: 5,000
    made-up names grew /metrics to 110,000 lines and the enqueuer by 53 MiB. A service labels
    its requests once it was found on the broker; the others count under `_unknown`."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer("--require-partition-key")
    async with http.get(f"{url}/{service}/x", headers={"X-Partition-Key": "k"}) as response:
        assert response.status == 200
    for name in [f"made-up-{n}" for n in range(3)] + [service]:
        async with http.get(f"{url}/{name}/x") as response:
            assert response.headers["X-ProxyMQ-Error"] == "bad_partition_key"
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    async with http.get(f"http://127.0.0.1:{admin}/metrics") as response:
        assert "made-up-" not in await response.text()
    requests = "proxymq_enqueuer_requests_total"
    assert await metric(http, admin, requests, {"service": "_unknown"}) == 3
    assert await metric(http, admin, requests, {"service": service}) == 2


@pytest.fixture
async def otlp() -> AsyncIterator[tuple[str, list[tuple[str, Span]]]]:
    """An OTLP/HTTP receiver: (service.name, span) for every span exported to it."""
    spans: list[tuple[str, Span]] = []

    async def receive(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            name = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope in resource_spans.scope_spans:
                spans.extend((name, s) for s in scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", spans
    await runner.cleanup()


async def test_one_trace_from_api_to_microservice(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url, env=env)
    _, url = await stack.enqueuer(env=env)
    trace_id, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with http.get(
        f"{url}/{service}/echo/traced", headers={"traceparent": f"00-{trace_id}-{caller_span}-01"}
    ) as response:
        assert response.status == 200
    async with asyncio.timeout(10):
        while len(spans) < 4:
            await asyncio.sleep(0.1)
    by_kind = {s.kind: (name, s) for name, s in spans}
    server = by_kind[Span.SPAN_KIND_SERVER]
    producer = by_kind[Span.SPAN_KIND_PRODUCER]
    consumer = by_kind[Span.SPAN_KIND_CONSUMER]
    client = by_kind[Span.SPAN_KIND_CLIENT]
    assert {s.trace_id.hex() for _, s in spans} == {trace_id}
    assert server[0] == producer[0] == "proxymq-enqueuer"
    assert consumer[0] == client[0] == "proxymq-dequeuer"
    assert server[1].parent_span_id.hex() == caller_span
    assert producer[1].parent_span_id == server[1].span_id
    assert consumer[1].parent_span_id == producer[1].span_id
    assert client[1].parent_span_id == consumer[1].span_id
    attributes = {a.key: a.value for a in consumer[1].attributes}
    assert attributes["messaging.system"].string_value == "rabbitmq"
    assert (
        attributes["messaging.message.conversation_id"].string_value
        == (response.headers["X-Correlation-ID"])
    )
    received = dict(target.seen[0].headers)["traceparent"]
    assert received == f"00-{trace_id}-{client[1].span_id.hex()}-01"


@pytest.mark.parametrize("traced", [False, True])
async def test_the_callers_trace_context_reaches_the_microservice(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
    traced: bool,
) -> None:
    """The contract's `traceparent` / `tracestate`, carried through the queue: as sent when the
    sidecars do not trace; when they do, the caller's trace and its `tracestate` go on under
    the dequeuer's call span."""
    endpoint, _ = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url, env=env if traced else None)
    _, url = await stack.enqueuer(env=env if traced else None)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
    context = {"traceparent": traceparent, "tracestate": "vendor=abc,other=x1"}
    async with http.get(f"{url}/{service}/echo/traced", headers=context) as response:
        assert response.status == 200
    received = dict(target.seen[0].headers)
    assert received["tracestate"] == "vendor=abc,other=x1"
    if traced:
        assert received["traceparent"].split("-")[1] == trace_id
        assert received["traceparent"] != traceparent
    else:
        assert received["traceparent"] == traceparent


async def test_json_logs_one_line_per_outcome(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """One JSON line per request on each side, with the correlation id; never the body."""
    await stack.dequeuer(service, target.url, "--json-logs")
    _, url = await stack.enqueuer("--json-logs")
    async with http.post(
        f"{url}/{service}/echo/x",
        data=b"secret-body",
        headers={"X-Partition-Key": "k1", "X-Api-Key": "hidden"},
    ) as r:
        request_id = r.headers["X-Correlation-ID"]
    mine: list[dict[str, Any]] = []
    async with asyncio.timeout(5):  # the dequeuer logs after it acked, maybe after the answer
        while len(mine) < 2:
            lines = [json.loads(x) for x in stack.log_text().splitlines() if x.startswith("{")]
            mine = [line for line in lines if line.get("correlation_id") == request_id]
            await asyncio.sleep(0.05)
    enqueued = [line for line in mine if line["logger"] == "enqueuer.app"]
    replied = [line for line in mine if line["logger"] == "dequeuer.consumer"]
    assert len(enqueued) == 1
    assert len(replied) == 1
    assert enqueued[0]["status"] == 200
    assert enqueued[0]["service"] == service
    assert "duration_ms" in enqueued[0]
    assert replied[0]["status"] == 200
    assert replied[0]["partition"].startswith(f"{service}.p")
    assert "duration_ms" in replied[0]
    assert "secret-body" not in stack.log_text()
    assert "hidden" not in stack.log_text()


async def test_server_spans_of_proxymq_errors_carry_their_status(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """A ProxyMQ error is the enqueuer's answer like any other: its SERVER span has the status
    code, and only a 5xx makes it an error (HTTP semantic conventions). Raised through the span,
    a caller's 404 showed as a failed span without a status code, and a 504 had none either."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer(env=env)
    answers = {}
    for path, headers in (
        (f"/not-{service}/x", {}),
        (f"/{service}/delay/3", {"X-Request-Timeout": "0.5"}),
    ):
        async with http.get(url + path, headers=headers) as response:
            answers[response.headers["X-Correlation-ID"]] = response.status
    assert sorted(answers.values()) == [404, 504]

    def servers() -> dict[str, Span]:
        found = {}
        for _, s in spans:
            attributes = {a.key: a.value for a in s.attributes}
            if s.kind == Span.SPAN_KIND_SERVER:
                found[attributes["messaging.message.conversation_id"].string_value] = s
        return found

    async with asyncio.timeout(10):
        while len(servers()) < 2:
            await asyncio.sleep(0.1)
    for request_id, s in servers().items():
        attributes = {a.key: a.value for a in s.attributes}
        assert attributes["http.response.status_code"].int_value == answers[request_id]
        failed = s.status.code == s.status.STATUS_CODE_ERROR
        assert failed == (answers[request_id] >= 500), (answers[request_id], s.status)


async def test_each_batched_request_carries_its_own_trace(
    stack: Stack,
    service: str,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """With --batch-size, each request of a batch reaches the microservice with the trace
    context of its own call span, as a plain call does (docs/message-format.md): the items
    carried the caller's `traceparent` as sent (none when the caller sent none), so the
    microservice's work hung under no span of the dequeuer's."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    items: list[dict[str, Any]] = []

    async def batch(request: web.Request) -> web.Response:
        got = await request.json()
        items.extend(got)
        return web.json_response([{"status": 200} for _ in got])

    async def up(_: web.Request) -> web.Response:
        return web.Response(text="up")  # the dequeuer's readiness probe

    app = web.Application()
    app.router.add_post("/batch", batch)
    app.router.add_get("/", up)
    async with serving(app) as microservice:
        await stack.dequeuer(
            service,
            microservice,
            "--batch-size",
            "4",
            "--batch-wait-ms",
            "300",
            env=env,
        )
        _, url = await stack.enqueuer(env=env)
        callers = {f"{n:032x}": f"{n:016x}" for n in range(1, 4)}  # trace id -> caller's span

        async def call(trace_id: str, span_id: str) -> None:
            async with http.get(
                f"{url}/{service}/x",
                headers={"traceparent": f"00-{trace_id}-{span_id}-01", "X-Partition-Key": span_id},
            ) as response:
                assert response.status == 200

        await asyncio.gather(*(call(t, s) for t, s in callers.items()))
    assert len(items) == 3
    dequeuer_spans = [s for name, s in spans if name == "proxymq-dequeuer"]
    async with asyncio.timeout(10):
        while sum(s.kind == Span.SPAN_KIND_CONSUMER for s in dequeuer_spans) < 3:
            await asyncio.sleep(0.1)
            dequeuer_spans = [s for name, s in spans if name == "proxymq-dequeuer"]
    for item in items:
        _, trace_id, span_id, _ = dict(item["headers"])["traceparent"].split("-")
        assert trace_id in callers
        sent_under = [s for s in dequeuer_spans if s.span_id.hex() == span_id]
        assert sent_under, f"the item's traceparent names no span of the dequeuer: {span_id}"
        consumer = [
            s
            for s in dequeuer_spans
            if s.trace_id.hex() == trace_id and s.kind == Span.SPAN_KIND_CONSUMER
        ]
        assert sent_under[0].parent_span_id == consumer[0].span_id


class Raw(bytes):
    """Written as an AMQP string of bytes that are no UTF-8, as another client might."""


async def published_by_another_client(
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
    service: str,
    headers: dict[str, Any],
    correlation_id: str = "from-another-client",
) -> AbstractQueue:
    """Publish one request as any AMQP client may (docs/message-format.md), `Raw` values as
    strings that are no UTF-8; returns the queue its reply goes to."""
    encode = pamqp.encode.encode_table_value

    def raw_strings(value: Any) -> bytes:
        if isinstance(value, Raw):
            return b"S" + len(value).to_bytes(4, "big") + bytes(value)
        return encode(value)

    channel = await amqp.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    monkeypatch.setattr(pamqp.encode, "encode_table_value", raw_strings)
    try:
        exchange = await channel.get_exchange(service)
        message = aio_pika.Message(
            b"", headers=headers, correlation_id=correlation_id, reply_to=replies.name
        )
        await exchange.publish(message, routing_key="k")
    finally:
        monkeypatch.undo()
    return replies


async def test_a_trace_context_that_is_no_utf8_is_ignored(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """A `traceparent` AMQP header of bytes that are no UTF-8 (pamqp reads it as `bytes`) made
    the tracing dequeuer's span fail before the request was handled: never called, never
    answered, held unacked on a live channel for good. It is no trace context: ignored."""
    endpoint, _ = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url, "--partitions", "1", env=env)
    headers = {envelope.H_METHOD: "GET", envelope.H_PATH: "/x", "traceparent": Raw(b"\xff\xfe")}
    replies = await published_by_another_client(amqp, monkeypatch, service, headers)
    async with asyncio.timeout(10):
        async with replies.iterator() as answers:
            reply = await anext(answers)
    assert reply.headers[envelope.H_STATUS] == 200
    assert [seen.path for seen in target.seen] == ["/x"]


async def test_the_callers_trace_goes_on_when_only_the_dequeuer_traces(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """A request whose trace context is in its HTTP headers only (an enqueuer without tracing,
    or another AMQP client) is processed in the caller's trace: the tracing dequeuer began a
    new one and sent the microservice its `traceparent` in place of the caller's, so the
    caller's trace ended at the queue."""
    endpoint, _ = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url, "--partitions", "1", env=env)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
    headers = {
        envelope.H_METHOD: "GET",
        envelope.H_PATH: "/x",
        envelope.H_HEADERS: json.dumps([["traceparent", traceparent]]),
    }
    replies = await published_by_another_client(amqp, monkeypatch, service, headers)
    async with asyncio.timeout(10):
        async with replies.iterator() as answers:
            reply = await anext(answers)
    assert reply.headers[envelope.H_STATUS] == 200
    received = dict(target.seen[0].headers)["traceparent"]
    assert received.split("-")[1] == trace_id
    assert received != traceparent  # the dequeuer's call span, child of the caller's


async def test_a_request_id_cannot_write_log_lines_of_its_own(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request id of a message from another AMQP client is any string: with line breaks in
    it, each line the dequeuer logged about the request wrote lines the publisher chose (a
    forged ERROR here) into the text log. Fields are written escaped when they hold any."""
    await stack.dequeuer(service, target.url, "--partitions", "1")
    forged = "x\n00:00:00 ERROR   forged: the publisher wrote this line"
    headers = {envelope.H_METHOD: "GET", envelope.H_PATH: "/x"}
    # Such a request is malformed (no HTTP header can carry the id): it is dead-lettered and
    # the line that says so names it.
    await published_by_another_client(amqp, monkeypatch, service, headers, forged)
    async with asyncio.timeout(10):
        while "forged" not in stack.log_text():
            await asyncio.sleep(0.05)
    lines = stack.log_text().splitlines()
    assert not [line for line in lines if line.startswith("00:00:00")]
    assert any("correlation_id='x\\n00:00:00 ERROR" in line for line in lines)


async def test_a_repeated_request_is_traced_under_the_first_ones_id(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """A repeat of an Idempotency-Key is answered with the first request's id, as its log line
    says; its SERVER span named an id minted for it and then dropped, found nowhere else."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer(env=env)
    ids = []
    for _ in range(2):
        async with http.post(
            f"{url}/{service}/echo/once", headers={"Idempotency-Key": "order-7"}
        ) as response:
            assert response.status == 200
            ids.append(response.headers["X-Correlation-ID"])
    assert ids[0] == ids[1]

    def server_ids() -> list[str]:
        return [
            next(
                a.value.string_value
                for a in s.attributes
                if a.key == "messaging.message.conversation_id"
            )
            for _, s in spans
            if s.kind == Span.SPAN_KIND_SERVER
        ]

    async with asyncio.timeout(10):
        while len(server_ids()) < 2:
            await asyncio.sleep(0.1)
    assert server_ids() == ids


async def test_a_password_in_the_target_is_in_no_log_line_or_span(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """A `--target` with a user and password (Basic auth to the microservice, read from
    PROXYMQ_TARGET_FILE) is a secret like the AMQP URL's: the readiness lines and the call
    span's `url.full` wrote it out whole."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    secret = "s3cret-pw"
    await stack.dequeuer(service, f"http://probe:{secret}@127.0.0.1:{target.port}", env=env)
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/echo/x") as response:
        assert response.status == 200
    assert dict(target.seen[0].headers)["Authorization"].startswith("Basic ")
    async with asyncio.timeout(10):
        while not any(s.kind == Span.SPAN_KIND_CLIENT for _, s in spans):
            await asyncio.sleep(0.1)
    assert "microservice ready at http://probe:" in stack.log_text()
    assert secret not in stack.log_text()
    assert not [s for _, s in spans if secret.encode() in s.SerializeToString()]


async def test_an_error_code_another_replier_made_up_is_counted_as_service_failed(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """A reply from any AMQP client may carry any `x-proxymq-error`: its caller gets
    `service_failed`, and so is it counted. An asynchronous request's result counted the string
    itself as its outcome, a series of its own for each one a replier chose."""
    headers: HeadersType = {envelope.H_STATUS: 502, envelope.H_ERROR: "made-up-code-1"}
    channel = await foreign_replier(amqp, service, headers, b"{}")
    enqueuer, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/x") as response:
        assert response.headers["X-ProxyMQ-Error"] == "service_failed"
    async with http.get(f"{url}/{service}/x", headers={"Prefer": "respond-async"}) as accepted:
        location = accepted.headers["Location"]
    async with asyncio.timeout(10):
        while True:
            async with http.get(f"{url}{location}") as result:
                if result.status != 202:
                    assert result.headers["X-ProxyMQ-Error"] == "service_failed"
                    break
            await asyncio.sleep(0.05)
    await channel.close()
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    async with http.get(f"http://127.0.0.1:{admin}/metrics") as response:
        assert "made-up-code" not in await response.text()
    results = "proxymq_enqueuer_async_results_total"
    assert await metric(http, admin, results, {"outcome": "service_failed"}) == 1


async def test_a_synchronous_call_the_microservice_answers_202_has_its_duration(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The duration histogram is for calls answered as calls, and a microservice's own 202 (a
    job it accepted) answers one: it was left out as if it were the enqueuer's `respond-async`
    202, so a service that answers 202 had no latency on the dashboard and in
    ProxyMQSlowRequests."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    async with http.post(f"{url}/{service}/status/202") as response:
        assert response.status == 202
    async with http.post(f"{url}/{service}/x", headers={"Prefer": "respond-async"}) as response:
        assert response.status == 202
    # A reply within `wait` is answered as a call, and timed as one (it was left out).
    waited = {"Prefer": "respond-async, wait=10"}
    async with http.post(f"{url}/{service}/x", headers=waited) as response:
        assert response.status == 200
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    durations = "proxymq_enqueuer_request_duration_seconds_count"
    assert await metric(http, admin, durations, {"service": service}) == 2


async def test_every_line_about_a_request_the_broker_dead_lettered_names_it(
    stack: Stack, service: str, target: Target, amqp: AbstractRobustConnection
) -> None:
    """A request RabbitMQ dead-lettered itself (here another client's, expired in its queue) is
    answered from `S.notify`; when its reply queue is gone, the line saying the reply was
    dropped had no correlation id, service or partition: a search by the request's id found
    the notice and not what became of its answer."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(service)
    gone = f"{service}.no-such-reply-queue"
    message = aio_pika.Message(b"", correlation_id="late-1", reply_to=gone, expiration=0.1)
    await exchange.publish(message, routing_key="k")
    await channel.close()
    await stack.dequeuer(service, target.url, "--partitions", "1", "--json-logs")
    mine: list[dict[str, Any]] = []
    async with asyncio.timeout(30):  # the reply is tried again for 15 s (REPLY_QUEUE_WAIT)
        while not any(gone in line["msg"] for line in mine):
            await asyncio.sleep(0.2)
            lines = [json.loads(x) for x in stack.log_text().splitlines() if x.startswith("{")]
            mine = [line for line in lines if gone in line["msg"] or "dead letter" in line["msg"]]
    for line in mine:
        assert line.get("correlation_id") == "late-1", line
        assert line.get("service") == service, line
        assert line.get("partition") == f"{service}.p0", line


async def test_the_service_name_of_otel_resource_attributes_is_kept(
    stack: Stack,
    service: str,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """`OTEL_RESOURCE_ATTRIBUTES=service.name=...` names the service as `OTEL_SERVICE_NAME`
    does (the OpenTelemetry SDK's standard variables): the sidecar's own default replaced it."""
    endpoint, spans = otlp
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=billing-edge,deployment.environment=test",
    }
    _, url = await stack.enqueuer(env=env)
    async with http.get(f"{url}/not-{service}/x") as response:
        assert response.status == 404
    async with asyncio.timeout(10):
        while not spans:
            await asyncio.sleep(0.1)
    assert {name for name, _ in spans} == {"billing-edge"}


@pytest.fixture
async def silent_collector() -> AsyncIterator[str]:
    """An OTLP endpoint that accepts connections and never answers: a collector hung, or the
    path to it gone silent."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", free_port())
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()


async def test_a_collector_that_never_answers_does_not_hold_up_a_stop(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    silent_collector: str,
) -> None:
    """The spans still buffered at a stop are exported for a short while only: a collector
    that never answered added its export timeout (10 s) to every stop, and to the dequeuer's
    25 s grace, past Kubernetes' default 30 s before the pod is killed."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": silent_collector}
    dequeuer = await stack.dequeuer(service, target.url, env=env)
    enqueuer, url = await stack.enqueuer(env=env)
    async with http.get(f"{url}/{service}/echo/x") as response:
        assert response.status == 200
    for process in (enqueuer, dequeuer):
        started = time.monotonic()
        assert await asyncio.to_thread(process.stop, 30) == 0
        assert time.monotonic() - started < 6, process


async def test_a_method_http_does_not_define_names_no_span(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """Span names are bounded: a method that is none of HTTP's (a WebDAV one the enqueuer's
    parser takes, any token another AMQP client writes) is `_OTHER`, the span `HTTP`, as
    OpenTelemetry's HTTP conventions say. Each one a caller chose was a span name of its own."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url, "--partitions", "1", env=env)
    _, url = await stack.enqueuer(env=env)
    for method in ("GET", "PROPFIND"):
        async with http.request(method, f"{url}/{service}/echo/x") as response:
            assert response.status == 200
    headers = {envelope.H_METHOD: "MADE-UP-1", envelope.H_PATH: "/x"}
    await published_by_another_client(amqp, monkeypatch, service, headers)

    def named(kind: int) -> dict[str, list[tuple[str, str]]]:
        found: dict[str, list[tuple[str, str]]] = {}
        for _, s in spans:
            if s.kind == kind:
                attributes = {a.key: a.value.string_value for a in s.attributes}
                found.setdefault(s.name, []).append(
                    (
                        attributes["http.request.method"],
                        attributes.get("http.request.method_original", ""),
                    )
                )
        return found

    async with asyncio.timeout(10):
        while sum(map(len, named(Span.SPAN_KIND_CLIENT).values())) < 3:
            await asyncio.sleep(0.1)
    assert named(Span.SPAN_KIND_SERVER) == {
        "GET /{service}": [("GET", "")],
        "HTTP /{service}": [("_OTHER", "PROPFIND")],
    }
    clients = named(Span.SPAN_KIND_CLIENT)
    assert clients["GET"] == [("GET", "")]
    assert sorted(clients["HTTP"]) == [("_OTHER", "MADE-UP-1"), ("_OTHER", "PROPFIND")]
    assert set(clients) == {"GET", "HTTP"}


async def test_a_service_name_a_caller_made_up_names_no_span(
    stack: Stack,
    service: str,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """A span is named after a service found on the broker, as a metrics label is: the
    PRODUCER span of a call to a service that does not exist (404) was `publish NAME`, a span
    name for every name a caller made up."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    _, url = await stack.enqueuer(env=env)
    for n in range(3):
        async with http.get(f"{url}/made-up-{n}-{service}/x") as response:
            assert response.headers["X-ProxyMQ-Error"] == "unknown_service"
    async with asyncio.timeout(10):
        while sum(s.kind == Span.SPAN_KIND_SERVER for _, s in spans) < 3:
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # the same batch, or one more, has any other span
    assert {s.name for _, s in spans} == {"GET /{service}"}


async def test_the_process_span_of_a_request_that_failed_is_an_error(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """The dequeuer's CONSUMER span says whether the request was processed: one dead-lettered
    after its last attempt failed, one dropped as its deadline had passed, and one malformed
    (which had no span at all) are errors with their `error.type`; each of these was a span
    with no status, as if it had been answered."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await stack.dequeuer(service, target.url, "--partitions", "1", "--max-attempts", "1", env=env)
    past = int((time.time() - 60) * 1000)
    sent: dict[str, dict[str, Any]] = {
        "answered": {envelope.H_METHOD: "GET", envelope.H_PATH: "/x"},
        "dead_lettered": {envelope.H_METHOD: "GET", envelope.H_PATH: "/status/503"},
        "expired": {envelope.H_METHOD: "GET", envelope.H_PATH: "/x", envelope.H_DEADLINE: past},
        "malformed": {envelope.H_METHOD: "CONNECT", envelope.H_PATH: "/x"},
    }
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for name, headers in sent.items():
        headers["traceparent"] = traceparent
        await published_by_another_client(amqp, monkeypatch, service, headers, name)

    def consumers() -> dict[str, Span]:
        found = {}
        for _, s in spans:
            attributes = {a.key: a.value.string_value for a in s.attributes}
            if s.kind == Span.SPAN_KIND_CONSUMER:
                found[attributes["messaging.message.conversation_id"]] = s
        return found

    async with asyncio.timeout(10):
        while len(consumers()) < len(sent):
            await asyncio.sleep(0.1)
    for name, s in consumers().items():
        attributes = {a.key: a.value.string_value for a in s.attributes}
        if name == "answered":
            assert s.status.code == s.status.STATUS_CODE_UNSET, s.status
            assert "error.type" not in attributes
        else:
            assert s.status.code == s.status.STATUS_CODE_ERROR, (name, s.status)
            assert attributes["error.type"] == name


async def test_the_line_about_a_malformed_request_names_its_service_and_partition(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A malformed request is dead-lettered before it is handled: the line saying so had its
    correlation id alone, so a search by service or partition did not find it."""
    await stack.dequeuer(service, target.url, "--partitions", "1", "--json-logs")
    headers = {envelope.H_METHOD: "CONNECT", envelope.H_PATH: "/x"}
    await published_by_another_client(amqp, monkeypatch, service, headers, "bad-1")
    mine: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not mine:
            await asyncio.sleep(0.1)
            lines = [json.loads(x) for x in stack.log_text().splitlines() if x.startswith("{")]
            mine = [line for line in lines if "malformed" in line["msg"]]
    assert [
        (line["correlation_id"], line.get("service"), line.get("partition")) for line in mine
    ] == [("bad-1", service, f"{service}.p0")]


async def test_otel_sdk_disabled_turns_tracing_off(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """`OTEL_SDK_DISABLED=true` (the OpenTelemetry SDK's standard switch) turns tracing off
    where an endpoint is set: the caller's trace context reaches the microservice as sent."""
    endpoint, spans = otlp
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SDK_DISABLED": "true",
    }
    await stack.dequeuer(service, target.url, env=env)
    _, url = await stack.enqueuer(env=env)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with http.get(f"{url}/{service}/echo/x", headers={"traceparent": traceparent}) as r:
        assert r.status == 200
    assert dict(target.seen[0].headers)["traceparent"] == traceparent
    await asyncio.sleep(0.5)
    assert not spans


async def test_the_traces_endpoint_alone_turns_tracing_on(
    stack: Stack,
    service: str,
    http: aiohttp.ClientSession,
    otlp: tuple[str, list[tuple[str, Span]]],
) -> None:
    """`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, the OpenTelemetry SDK's variable for the traces'
    endpoint alone (the full URL), turns tracing on as `OTEL_EXPORTER_OTLP_ENDPOINT` does: it
    was ignored, and no span was exported."""
    endpoint, spans = otlp
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{endpoint}/v1/traces"}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    _, url = await stack.enqueuer(env=env)
    async with http.get(f"{url}/not-{service}/x") as response:
        assert response.status == 404
    async with asyncio.timeout(10):
        while not spans:
            await asyncio.sleep(0.1)
    assert {s.name for _, s in spans} == {"GET /{service}"}
