"""The README's error table is the list of every code the enqueuer answers with: this fails when
a code is added to `shared/errors.py` and not to the table, or its status differs."""

import re
from pathlib import Path

from shared import errors

README = Path(__file__).resolve().parents[2] / "README.md"
CONTRACT = {
    "bad_partition_key",
    "unknown_service",
    "body_too_large",
    "backpressure",
    "service_failed",
    "broker_unavailable",
    "timeout",
}


def _classes(cls: type[errors.ProxyMQError]) -> list[type[errors.ProxyMQError]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_classes(sub))]


def test_every_error_code_is_in_the_readmes_table_and_extensions_are_named() -> None:
    text = README.read_text()
    rows = set(re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", text, re.M))
    assert rows == {(str(c.status), c.code) for c in _classes(errors.ProxyMQError)}
    said = text.partition("The contract's codes are")[2].partition("are ProxyMQ's extensions")[0]
    contract, _, extensions = said.partition("the others")
    assert set(re.findall(r"`([a-z_]+)`", contract)) == CONTRACT
    assert set(re.findall(r"`([a-z_]+)`", extensions)) == {code for _, code in rows} - CONTRACT
