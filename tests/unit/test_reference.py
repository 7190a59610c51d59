"""docs/configuration.md is generated from the settings code: this fails when they drift."""

from pathlib import Path

from shared import reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_current() -> None:
    assert DOC.read_text() == reference.render(), (
        "docs/configuration.md is stale: run `proxymq docs-config --output docs/configuration.md`"
    )


def test_every_flag_is_documented() -> None:
    text = DOC.read_text()
    for flag in (
        "--amqp-url",
        "--partition-key",
        "--max-body",
        "--ordering",
        "--concurrency",
        "--allow-private",
        "PROXYMQ_TIMEOUT",
    ):
        assert flag in text
