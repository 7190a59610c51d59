"""preStop hook of a microservice container: make its dequeuer sidecar drain first, then return.

    lifecycle: {preStop: {exec: {command: [python, /usr/local/lib/proxymq/drain.py]}}}

Why: Kubernetes stops a native sidecar (an init container with `restartPolicy: Always`) only
after the main containers have exited. That order suits the enqueuer (the API stops calling it
first) but is backwards for the dequeuer, which calls the microservice: if the microservice
stopped first, requests the dequeuer still holds would fail and be retried, dead-lettered or
handed back late. This hook runs before the microservice gets its SIGTERM; it sends the
dequeuer `POST /drain` on its admin port over the pod's loopback (the same stop as SIGTERM: it
leaves the group, finishes what is in flight within its shutdown grace and closes its
connection, its partition channels with it, so held requests go back to the head of their
queues) and waits until that port no longer accepts connections: the dequeuer has exited. The
kubelet does not restart containers of a terminating pod.

How long it waits: the shutdown grace the dequeuer answers with (its `--shutdown-grace` or
PROXYMQ_SHUTDOWN_GRACE, 25 s by default) plus 10 s to leave the group and close its channels;
so raising PROXYMQ_SHUTDOWN_GRACE (and terminationGracePeriodSeconds) is enough, the hook
follows. `--timeout` sets a fixed wait instead.

The pod needs nothing else: no shared process namespace, no common user id (both let this
container read the dequeuer's environment and files, its AMQP credentials among them). Without
a dequeuer on the port (connection refused) it says so and returns at once, so the pod still
stops, only without the drain-first order. Standard library only: it runs in the microservice's
image.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

DEFAULT_PORT = 9081  # the dequeuer's --admin-port default (dequeuer/settings.py)
DEFAULT_GRACE = 25.0  # its --shutdown-grace default, for an answer without one
STOP_MARGIN = 10.0  # after the grace: leave the group, close the partition channels, exit
CALL_TIMEOUT = 5.0


class NoDequeuer(Exception):
    """Nothing to drain: no dequeuer listens on the port, or it refused the drain."""


def request_drain(port: int) -> float:
    """POST /drain; the dequeuer's shutdown grace in seconds. Never through an HTTP proxy: the
    container's `http_proxy` would send this pod's own loopback call elsewhere."""
    url = f"http://127.0.0.1:{port}/drain"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(urllib.request.Request(url, method="POST"), timeout=CALL_TIMEOUT) as got:
            body = got.read()
    except urllib.error.HTTPError as exc:
        raise NoDequeuer(f"{url}: {exc.code} {exc.read()[:200]!r}") from None
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        if not isinstance(reason, TimeoutError):
            raise NoDequeuer(f"{url}: {reason}") from None
        # Something listens: a dequeuer too busy to answer may still drain, so wait for it.
        print(f"{url}: no answer within {CALL_TIMEOUT:g} s; waiting all the same", file=sys.stderr)
        return DEFAULT_GRACE
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None  # the drain started all the same
    grace = answer.get("grace") if isinstance(answer, dict) else None
    if isinstance(grace, int | float) and 0 <= grace < float("inf"):
        return float(grace)
    return DEFAULT_GRACE


def listening(port: int) -> bool:
    """The admin port is closed only as the dequeuer exits (its last step); anything but a
    refusal (a connect timeout under load, say) counts as still there."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drain the dequeuer sidecar before this exits.")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"the dequeuer's admin port (default: $PROXYMQ_ADMIN_PORT, else {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="longest wait in seconds (default: the dequeuer's shutdown grace + 10); keep it "
        "under terminationGracePeriodSeconds",
    )
    args = parser.parse_args(argv)
    port = args.port
    if port is None:
        given = os.environ.get("PROXYMQ_ADMIN_PORT") or str(DEFAULT_PORT)
        if not given.isdigit():
            parser.error(f"PROXYMQ_ADMIN_PORT={given!r} is not a port")
        port = int(given)
    try:
        grace = request_drain(port)
    except NoDequeuer as exc:
        print(f"no dequeuer drained: {exc}", file=sys.stderr)
        return 0
    wait = args.timeout if args.timeout is not None else grace + STOP_MARGIN
    deadline = time.monotonic() + wait
    while listening(port):
        if time.monotonic() >= deadline:
            print(f"the dequeuer on port {port} still runs after {wait:g} s", file=sys.stderr)
            return 0
        time.sleep(0.2)
    print("the dequeuer drained and stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
