"""A service's objects on the broker, as the contract names them and of the kinds it gives:
exchange `S` (x-consistent-hash), quorum partitions `S.p0..` dead-lettering to the quorum
`S.dlq`, and every other object of the service's named `S.<word>`, never matching
`^S\\.p\\d+$`."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from shared import topology
from shared.cli.ensure_broker import basic_auth, management_url
from tests.conftest import Stack
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def management(amqp_url: str, path: str) -> Any:
    """`path` of the broker's management API, under the vhost of `amqp_url`."""
    vhost = quote(URL(amqp_url).path[1:] or "/", safe="")
    api = URL(f"{management_url(amqp_url)}/api/{path.format(vhost=vhost)}", encoded=True)
    headers = {"Authorization": basic_auth(amqp_url)}
    async with aiohttp.ClientSession() as http, http.get(api, headers=headers) as response:
        assert response.status == 200, f"the management API answers {response.status}"
        return await response.json()


async def test_a_services_objects_are_named_and_made_as_the_contract_says(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    await stack.dequeuer(service, target.url, "--partitions", "3")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/x") as response:
        assert response.status == 200
    mine = re.compile(rf"^{re.escape(service)}(\..+)?$")
    queues = {
        q["name"]: q
        for q in await management(amqp_url, "queues/{vhost}")
        if mine.match(str(q["name"]))
    }
    exchanges = {
        e["name"]: e
        for e in await management(amqp_url, "exchanges/{vhost}")
        if mine.match(str(e["name"]))
    }
    assert (exchanges[service]["type"], exchanges[service]["durable"]) == (
        "x-consistent-hash",
        True,
    )
    partitions = topology.Topology(service, partitions=3).queues
    for name in partitions:
        arguments = queues[name]["arguments"]
        assert (queues[name]["type"], queues[name]["durable"]) == ("quorum", True)
        assert isinstance(arguments, dict)
        assert arguments["x-single-active-consumer"] is True
        assert arguments["x-delivery-limit"] >= 1
        assert arguments["x-dead-letter-exchange"] == topology.dead_letter_exchange(service)
    dlq = queues[topology.dead_letter_queue(service)]
    assert (dlq["type"], dlq["durable"]) == ("quorum", True)
    dead = topology.dead_letter_exchange(service)
    bindings = await management(amqp_url, f"exchanges/{{vhost}}/{dead}/bindings/source")
    routed = {binding["destination"] for binding in bindings}
    assert topology.dead_letter_queue(service) in routed
    pattern = re.compile(topology.partition_pattern(service))
    assert sorted(name for name in queues if pattern.search(name)) == partitions
    others = (set(queues) | set(exchanges)) - {service, *partitions}
    assert others, "the membership and dead-letter objects are there too"
    for name in others:
        assert name.startswith(f"{service}.") and not pattern.search(name), name
