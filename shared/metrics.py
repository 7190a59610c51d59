"""Prometheus metrics of each sidecar, each set in its own registry (no global state).

Labels stay bounded: service, partition queue, outcome (a status class or an error code); never
ids or keys. A service name a caller made up is counted as `_unknown`, a call to the enqueuer's
own paths (polling an asynchronous result) as `_proxymq`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
UNKNOWN_SERVICE = "_unknown"
OWN_PATHS_LABEL = "_proxymq"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class EnqueuerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "proxymq_enqueuer_requests",
            "Requests answered, by outcome (status class of the "
            "microservice's answer, or ProxyMQ's error code; disconnected when the caller hung "
            "up first)",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "proxymq_enqueuer_request_duration_seconds",
            "From request received to answer, for calls answered as calls (not respond-async 202s)",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "proxymq_enqueuer_in_flight_requests",
            "Requests published and waiting for a reply (asynchronous ones included)",
            ["service"],
            registry=self.registry,
        )
        self.accepted_async = Counter(
            "proxymq_enqueuer_async_accepted",
            "Requests answered 202 (Prefer: respond-async)",
            ["service"],
            registry=self.registry,
        )
        self.async_results = Counter(
            "proxymq_enqueuer_async_results",
            "Asynchronous requests finished, by outcome (as for requests), each counted once "
            "however often it is polled",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.dropped_results = Counter(
            "proxymq_enqueuer_async_results_dropped",
            "Asynchronous results dropped before --result-ttl to stay within --max-results and "
            "--max-result-bytes (their polls get 404)",
            registry=self.registry,
        )
        self.breaker_open = Gauge(
            "proxymq_enqueuer_breaker_open",
            "1 while the breaker on the broker connection is open (callers get 503 at once)",
            registry=self.registry,
        )
        self.late_replies = Counter(
            "proxymq_enqueuer_late_replies",
            "Replies that arrived after their caller stopped waiting, and were dropped",
            registry=self.registry,
        )
        self.connected = Gauge(
            "proxymq_broker_connected",
            "1 while the broker connection is up",
            registry=self.registry,
        )
        self.reconnects = Counter(
            "proxymq_broker_reconnects",
            "Broker connections restored after a loss",
            registry=self.registry,
        )


class DequeuerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "proxymq_dequeuer_messages",
            "Requests settled, by outcome: replied, expired (deadline "
            "passed before the call), dead_lettered, malformed",
            ["service", "partition", "outcome"],
            registry=self.registry,
        )
        self.forward_duration = Histogram(
            "proxymq_dequeuer_forward_duration_seconds",
            "One HTTP call to the microservice",
            ["service", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "proxymq_dequeuer_queue_wait_seconds",
            "From publish to the first call attempt",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "proxymq_dequeuer_in_flight_requests",
            "Requests taken from a partition and not yet settled",
            ["service", "partition"],
            registry=self.registry,
        )
        self.retries = Counter(
            "proxymq_dequeuer_retries",
            "Calls to the microservice attempted again after a retryable failure",
            ["service"],
            registry=self.registry,
        )
        self.connected = Gauge(
            "proxymq_broker_connected",
            "1 while the broker connection is up",
            registry=self.registry,
        )
        self.reconnects = Counter(
            "proxymq_broker_reconnects",
            "Broker connections restored after a loss",
            registry=self.registry,
        )
        self.partitions_owned = Gauge(
            "proxymq_dequeuer_partitions_owned",
            "Partitions this dequeuer consumes (assigned and subscribed)",
            ["service"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "proxymq_dequeuer_queue_depth",
            "Messages ready in each partition this dequeuer "
            "owns (sampled every 5 s); summed over dequeuers it is the service's backlog",
            ["service", "partition"],
            registry=self.registry,
        )
        self.rebalances = Counter(
            "proxymq_dequeuer_rebalances",
            "Changes of this dequeuer's partition assignment",
            ["service"],
            registry=self.registry,
        )
        self.handovers = Counter(
            "proxymq_dequeuer_handovers",
            "Partitions given up to another dequeuer after their requests in flight finished",
            ["service"],
            registry=self.registry,
        )
        self.breaker_open = Gauge(
            "proxymq_dequeuer_breaker_open",
            "1 while the circuit breaker in front of the "
            "microservice is open (requests wait in RabbitMQ)",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "proxymq_dequeuer_batch_size",
            "Requests per call to the microservice's batch endpoint (--batch-size > 1)",
            ["service"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
