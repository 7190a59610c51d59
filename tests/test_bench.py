"""`proxymq bench` end to end: the real command against the real broker, as an operator runs it.

No timing assertions: the machine is shared and noisy. What must hold is that every mode ran,
answered every request, and that the figures and the plot were written.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shared.processes import script

pytestmark = pytest.mark.rabbit
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(90)
def test_bench_runs_the_three_modes(tmp_path: Path) -> None:
    figures, picture = tmp_path / "out.json", tmp_path / "out.png"
    args = ["bench", "--requests", "200", "--concurrency", "4", "--rounds", "1"]
    args += ["--warmup", "50", "--json", str(figures), "--plot", str(picture)]
    done = subprocess.run(
        [script("proxymq"), *args], capture_output=True, text=True, timeout=80, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr

    summary = json.loads(figures.read_text())["summary"]
    by_mode = {row["mode"]: row for row in summary}
    assert set(by_mode) == {"http", "rpc", "proxymq"}
    for row in by_mode.values():
        assert row["concurrency"] == 4
        assert row["rps"] > 0
        assert row["errors"] == 0
    assert picture.read_bytes()[:8] == PNG_MAGIC


def test_bench_help_names_every_option() -> None:
    done = subprocess.run(
        [script("proxymq"), "bench", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--requests", "--concurrency", "--rounds", "--body-size", "--plot", "--json"):
        assert flag in done.stdout
    assert "--amqp-url" in done.stdout
    assert "--partitions" in done.stdout
