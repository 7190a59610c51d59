"""The Dockerfiles, read statically (no Docker engine here): non-root, health checked, the
dependency layer before the source, and nothing copied that the build context leaves out."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from tests.deploy.support import CONTRACT_PORTS, ROOT, dockerfile_command, dockerfile_lines

DOCKERFILES = {
    ROOT / "enqueuer" / "Dockerfile": ROOT,
    ROOT / "dequeuer" / "Dockerfile": ROOT,
    ROOT / "url-fetcher" / "Dockerfile": ROOT,
    ROOT / "examples" / "api" / "Dockerfile": ROOT / "examples" / "api",
}
DEPENDENCY_FILES = ("pyproject.toml", "requirements.txt")
IDS = [str(p.relative_to(ROOT)) for p in DOCKERFILES]


def final_stage(lines: list[str]) -> list[str]:
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return lines[starts[-1] :]


def copies(lines: list[str]) -> list[tuple[int, list[str]]]:
    """(line index, sources) of every COPY from the build context (not --from a stage)."""
    found = []
    for index, line in enumerate(lines):
        words = line.split()
        if words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words[1:-1] if not w.startswith("--")]
        found.append((index, sources))
    return found


def ignored(path: str, context: Path) -> bool:
    """.dockerignore semantics as far as these files use them: the last matching rule wins."""
    rules = context / ".dockerignore"
    verdict = False
    for raw in rules.read_text().splitlines() if rules.exists() else []:
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern == "**" or any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    stage = final_stage(dockerfile_lines(dockerfile))
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users, f"{dockerfile}: the final stage has no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"{dockerfile}: USER {users[-1]} (numeric, so runAsNonRoot can check)"
    assert int(uid) != 0, f"{dockerfile}: runs as root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_has_a_health_check(dockerfile: Path) -> None:
    checks = [
        line
        for line in final_stage(dockerfile_lines(dockerfile))
        if line.startswith("HEALTHCHECK ")
    ]
    assert len(checks) == 1, dockerfile
    assert " CMD " in checks[0], dockerfile
    command = dockerfile_command(dockerfile)
    if command in ("proxymq-enqueuer", "proxymq-dequeuer"):
        assert "/readyz" in checks[0]
        assert str(CONTRACT_PORTS[command]["admin_port"]) in checks[0]
    elif command == "url-fetcher":
        assert "/healthz" in checks[0]
        assert "8000" in checks[0]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: Path) -> None:
    """So a source edit rebuilds only the last layers, not the dependency download."""
    lines = dockerfile_lines(dockerfile)
    installs = [
        i for i, line in enumerate(lines) if line.startswith("RUN ") and "pip install -r" in line
    ]
    assert installs, f"{dockerfile}: no dependency install from a requirements list"
    source_copies = [
        index
        for index, sources in copies(lines)
        if not all(
            any(fnmatch.fnmatch(s, d) for d in DEPENDENCY_FILES) or s.endswith(".txt")
            for s in sources
        )
    ]
    assert source_copies, dockerfile
    assert installs[0] < min(source_copies), f"{dockerfile}: source copied before dependencies"
    dependency_copies = [i for i, _ in copies(lines) if i < installs[0]]
    assert dependency_copies, f"{dockerfile}: the install has no dependency file to read"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_the_dependency_layer_copies_nothing_but_the_dependency_list(dockerfile: Path) -> None:
    """A README edit reran the whole dependency download: README.md was copied beside
    pyproject.toml, though only the package's own install reads it."""
    lines = dockerfile_lines(dockerfile)
    install = next(
        i for i, line in enumerate(lines) if line.startswith("RUN ") and "pip install -r" in line
    )
    before = [source for index, sources in copies(lines) if index < install for source in sources]
    assert set(before) <= {"pyproject.toml", "requirements.txt"}, f"{dockerfile}: {before}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    context = DOCKERFILES[dockerfile]
    for _, sources in copies(dockerfile_lines(dockerfile)):
        for source in sources:
            assert (context / source).exists(), f"{dockerfile}: COPY {source} not found"
            assert not ignored(source.rstrip("/"), context), (
                f"{dockerfile}: {source} is dockerignored"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_exposes_the_contract_ports(dockerfile: Path) -> None:
    command = dockerfile_command(dockerfile)
    exposed = {
        int(port)
        for line in dockerfile_lines(dockerfile)
        if line.startswith("EXPOSE ")
        for port in line.split()[1:]
    }
    expected = set(CONTRACT_PORTS.get(command or "", {}).values())
    assert expected <= exposed, (
        f"{dockerfile}: EXPOSE {sorted(exposed)}, contract {sorted(expected)}"
    )


def test_the_context_keeps_tests_docs_and_git_out() -> None:
    for path in (".git", ".venv", "tests/conftest.py", "docs/deploy.md", "deploy/k8s/api.yaml"):
        assert ignored(path, ROOT), path
    for path in (
        "pyproject.toml",
        "shared/settings.py",
        "url-fetcher/url_fetcher/app.py",
        "deploy/docker/drain.py",
    ):
        assert not ignored(path, ROOT), path


def test_the_dependency_list_the_images_install_is_pyprojects() -> None:
    """The Dockerfiles read project.dependencies with tomllib; a renamed table breaks them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"], "images would install no dependency"
    scripts = project["scripts"]
    for dockerfile in DOCKERFILES:
        command = dockerfile_command(dockerfile)
        if command is not None:
            assert command in scripts, f"{dockerfile}: ENTRYPOINT {command} is not a console script"
