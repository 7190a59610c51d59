"""Soak: mixed traffic for minutes while dequeuers are killed (SIGKILL) and replaced
periodically and the broker restarts once, on a RabbitMQ node of its own.

`tests/reliability/test_soak.py` runs it for about a minute in `make test`; a longer run:

    .venv/bin/python -m tests.soak --minutes 5

It reports requests sent, accepted, answered and lost (which must be 0), and the resident memory
of each sidecar at the start and at the end: a leak shows as growth that a longer run makes
plain. Exit status 1 when anything accepted was lost or another promise was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from shared.cli.cluster import LocalCluster
from shared.processes import Process
from tests.conftest import Stack
from tests.reliability.support import (
    TimedTarget,
    Traffic,
    recovery_time,
    rss_mib,
    running,
    verify,
)

PARTITIONS = 4
WARMUP = 3.0  # seconds of traffic before the first RSS sample
RECOVERY_BOUND = 15.0  # broker back -> every key served again, as in the broker restart test


async def soak(node: LocalCluster, seconds: float, logs: Path, *, seed: int = 7) -> dict[str, Any]:
    """Run the soak against the single node `node`; returns the figures, with `problems`."""
    rng = random.Random(seed)
    only = node.nodes[0]
    stack = Stack(only.amqp_url(), logs)
    target = TimedTarget()
    await target.start()
    service = f"soak-{rng.getrandbits(32):08x}"
    events: list[str] = []
    try:
        names = iter(f"d{i}" for i in range(1000))

        async def dequeuer() -> Process:
            return await stack.dequeuer(
                service, target.url, "--partitions", str(PARTITIONS), "--instance-id", next(names)
            )

        steady = await dequeuer()  # never killed: its memory is measured start to end
        victims = [await dequeuer(), await dequeuer()]
        enqueuer, url = await stack.enqueuer("--timeout", "10")
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            traffic = Traffic(f"{url}/{service}", keys=16, rate=60, work=0.01)
            started = time.monotonic()
            async with running(traffic, http):
                await asyncio.sleep(WARMUP)
                rss_start = {"enqueuer": rss_mib(enqueuer.pid), "dequeuer": rss_mib(steady.pid)}
                kills = max(2, int(seconds // 15))
                restart_after = kills // 2
                for round_ in range(kills):
                    await asyncio.sleep((seconds - WARMUP) / (kills + 1))
                    victim = victims.pop(rng.randrange(len(victims)))
                    victim.signal(signal.SIGKILL)
                    victims.append(await dequeuer())
                    events.append(f"{time.monotonic() - started:.0f}s kill {victim.pid}")
                    if round_ == restart_after:
                        down = time.monotonic()
                        await asyncio.to_thread(node.ctl, only, "stop_app")
                        await asyncio.sleep(2)
                        await asyncio.to_thread(node.ctl, only, "start_app")
                        back = time.monotonic()
                        events.append(
                            f"{down - started:.0f}s broker restart "
                            f"({time.monotonic() - down:.1f} s down)"
                        )
                await asyncio.sleep((seconds - WARMUP) / (kills + 1))
            rss_end = {"enqueuer": rss_mib(enqueuer.pid), "dequeuer": rss_mib(steady.pid)}
            verdict = await verify(traffic, target, http, settle=90, logs=stack.log_text)
        # Nothing accepted is lost also when nothing is accepted: the service must be back too.
        recovered = recovery_time(traffic, back)
        if recovered is None or recovered > RECOVERY_BOUND:
            verdict.problems.append(
                f"not every key was served again within {RECOVERY_BOUND:g} s of the broker "
                f"restart ({recovered} s)"
            )
        return {
            "seconds": round(time.monotonic() - started, 1),
            **verdict.figures,
            "answered": sum(c.status == 200 for c in traffic.calls)
            + sum(c.final == 200 for c in traffic.calls),
            "dequeuer_kills": kills,
            "broker_restarts": 1,
            "broker_recovery_s": None if recovered is None else round(recovered, 2),
            "events": events,
            "rss_mib_start": rss_start,
            "rss_mib_end": rss_end,
            "problems": verdict.problems,
        }
    finally:
        stack.stop()
        await target.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="proxymq-soak-"))
    node = LocalCluster.with_free_ports(root / "node", 1, f"soak{os.getpid()}n", config=[])
    try:
        node.start()
        figures = asyncio.run(soak(node, args.minutes * 60, root, seed=args.seed))
    finally:
        node.destroy()
    print(json.dumps(figures, indent=2))
    if figures["problems"]:
        print(f"sidecar logs kept in {root}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
