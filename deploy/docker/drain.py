"""preStop hook of a microservice container: make its dequeuer sidecar drain first, then return.

    lifecycle: {preStop: {exec: {command: [python, /usr/local/lib/proxymq/drain.py]}}}

Why: Kubernetes stops a native sidecar (an init container with `restartPolicy: Always`) only
after the main containers have exited. That order suits the enqueuer (the API stops calling it
first) but is backwards for the dequeuer, which calls the microservice: if the microservice
stopped first, requests the dequeuer still holds would fail and be retried, dead-lettered or
handed back late. This hook runs before the microservice gets its SIGTERM; it sends SIGTERM to
the dequeuer (which leaves the group, finishes what is in flight within its shutdown grace and
closes its connection, its partition channels with it, so held requests go back to the head of
their queues) and waits until that process is gone. The kubelet does not restart containers of
a terminating pod.

How long it waits: the dequeuer's own shutdown grace (its `--shutdown-grace` flag, else its
PROXYMQ_SHUTDOWN_GRACE, else the default 25 s), read from /proc, plus 10 s to leave the group
and close its channels; so raising PROXYMQ_SHUTDOWN_GRACE (and terminationGracePeriodSeconds)
is enough, the hook follows. `--timeout` sets a fixed wait instead.

Needs `shareProcessNamespace: true` in the pod and the same user id in both containers (a
process may signal another of its own uid). Without them it finds no dequeuer, says so and
returns at once, so the pod still stops, only without the drain-first order.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

PROC = Path("/proc")
DEFAULT_GRACE = 25.0  # the dequeuer's --shutdown-grace default (dequeuer/settings.py)
STOP_MARGIN = 10.0  # after the grace: leave the group, close the partition channels, exit


def dequeuer_pids(name: str) -> list[int]:
    """Processes whose command line runs the console script `name` (`python .../name ...`)."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if any(os.path.basename(arg.decode(errors="replace")) == name for arg in argv[:3]):
            found.append(int(entry.name))
    return found


def _number(value: bytes) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0 <= number < float("inf") else None


def shutdown_grace(pid: int) -> float:
    """The grace the dequeuer `pid` was given: its flag wins over its environment, as in the
    dequeuer; the default when neither is set or readable."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        environ = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return DEFAULT_GRACE
    for index, arg in enumerate(argv):
        if arg == b"--shutdown-grace" and index + 1 < len(argv):
            found = _number(argv[index + 1])
        elif arg.startswith(b"--shutdown-grace="):
            found = _number(arg.partition(b"=")[2])
        else:
            continue
        return DEFAULT_GRACE if found is None else found
    for entry in environ:
        name, _, value = entry.partition(b"=")
        if name == b"PROXYMQ_SHUTDOWN_GRACE":
            found = _number(value)
            return DEFAULT_GRACE if found is None else found
    return DEFAULT_GRACE


def drain_wait(pids: list[int]) -> float:
    """Seconds to wait for the dequeuers `pids` to drain and exit."""
    return max(shutdown_grace(pid) for pid in pids) + STOP_MARGIN


def running(pid: int) -> bool:
    """A process that exited but is not reaped yet (a zombie) counts as gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drain the dequeuer sidecar before this exits.")
    parser.add_argument("--name", default="proxymq-dequeuer", help="console script to signal")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="longest wait in seconds (default: the dequeuer's shutdown grace + 10); keep it "
        "under terminationGracePeriodSeconds",
    )
    args = parser.parse_args(argv)
    pids = dequeuer_pids(args.name)
    if not pids:
        print(f"no {args.name} process visible (is shareProcessNamespace on?)", file=sys.stderr)
        return 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as exc:  # another uid, or already gone
            print(f"cannot signal {args.name} (pid {pid}): {exc}", file=sys.stderr)
    wait = args.timeout if args.timeout is not None else drain_wait(pids)
    deadline = time.monotonic() + wait
    while any(running(pid) for pid in pids):
        if time.monotonic() >= deadline:
            print(f"{args.name} still running after {wait:.0f} s", file=sys.stderr)
            return 0
        time.sleep(0.2)
    print(f"{args.name} drained and stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
