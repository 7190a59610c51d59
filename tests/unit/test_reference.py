"""docs/configuration.md is generated from the settings code: this fails when they drift."""

from pathlib import Path

from shared import reference

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


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


def test_url_fetcher_readme_shows_its_flags_as_help_does() -> None:
    """url-fetcher's README listed its flags in sentences of their own (`Address to listen
    on.`), apart from its `--help`."""
    from url_fetcher.settings import UrlFetcherSettings

    table = reference.table(UrlFetcherSettings)
    assert table in (ROOT / "url-fetcher" / "README.md").read_text(), (
        "url-fetcher/README.md's flags table is stale: paste `reference.table` of its settings"
    )
