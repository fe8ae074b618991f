"""The README runs as written: every ```python block, and the compose settings table.

Snippets that talk to a router read its address from ``MATMAMBA_ROUTER``; for those the test
starts a real cloud replica and ``python -m router`` on 127.0.0.1 (shipped vision checkpoint) and
sets that variable. No snippet is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_compose import COMPOSE, GPU_OVERRIDE
from .test_router_integration import VISION, Process, cloud_process, free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
ROUTER_VARIABLE = "MATMAMBA_ROUTER"


@pytest.fixture(scope="module")
def router_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A cloud replica and a router (its own Ray) on 127.0.0.1, as the README's commands start them."""
    tmp = tmp_path_factory.mktemp("readme")
    cloud = cloud_process(VISION, tmp, "cloud").start()
    port = free_port()
    router = Process("router", ["--checkpoint", str(VISION), "--edge-level", "4", "--cloud", cloud.address,
                                "--port", str(port), "--metrics-port", "-1", "--deadline-ms", "5000"],
                     port, tmp / "router.log").start()
    try:
        cloud.wait_serving()
        router.wait_serving()
        yield router.address
    finally:
        router.kill()
        cloud.kill()


def test_the_readme_has_its_snippets() -> None:
    assert len(SNIPPETS) >= 3
    assert sum(ROUTER_VARIABLE in s for s in SNIPPETS) >= 1  # the edge client SDK snippet


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    if ROUTER_VARIABLE in SNIPPETS[index]:
        monkeypatch.setenv(ROUTER_VARIABLE, request.getfixturevalue("router_address"))
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {})


def test_every_compose_variable_is_documented_with_its_default() -> None:
    """The README's settings table lists each ${VAR:-default} of the compose files, with that default."""
    table = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", README, flags=re.M))
    used = re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", COMPOSE.read_text() + GPU_OVERRIDE.read_text())
    assert used
    for name, default in used:
        assert name in table, f"${{{name}}} of the compose file is not in the README's settings table"
        shown = table[name].strip()
        assert shown == (f"`{default}`" if default else "*(empty)*"), f"{name}: README says {shown}, file {default!r}"
