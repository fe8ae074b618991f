"""The commands the user guides show match the command lines the code has today.

Every ``python -m MODULE ...`` in README.md and the docs below (code blocks and inline code) names
a module with a command line, and every ``--flag`` it shows is a flag of that command (of the
subcommand for ``python -m edge``, of the re-tuning parser for ``router.tune --from-log``). The
flag tables of docs/ROUTER.md list every flag of their command, and the defaults they quote are
the parsers' defaults. Relative links between the docs lead to files and headings that exist.
The parsers are read in-process: nothing is started.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ["README.md", "docs/DEMO.md", "docs/ROUTER.md", "docs/SECURITY.md", "docs/RELIABILITY.md",
          "docs/RESULTS.md", "docs/DEVELOPING.md"]
COMMAND = re.compile(r"python -m ([A-Za-z_][\w.]*)((?:[ \t]+[^\s`|]+)*)")
FLAG = re.compile(r"^\[?(--[a-z][a-z0-9-]*)")
NOT_OURS = {"pytest", "pip", "venv"}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@cache
def parser_of(module_name: str, from_log: bool = False) -> argparse.ArgumentParser | None:
    """The argparse parser ``python -m module_name`` builds (None: the module takes no flags)."""
    module = importlib.import_module(module_name)
    if not hasattr(module, "main"):
        module = importlib.import_module(f"{module_name}.__main__")
    if "ArgumentParser" not in inspect.getsource(module):
        return None  # main() does its work without a command line: never called here

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        module.main(["--from-log", "x"] if from_log else [])
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise AssertionError(f"python -m {module_name} did not parse its arguments")


def options(parser: argparse.ArgumentParser | None, subcommand: str | None = None) -> set[str]:
    """The option strings of ``parser`` (of its subcommand ``subcommand`` when it has subcommands)."""
    if parser is None:
        return set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and subcommand in action.choices:
            parser = action.choices[subcommand]
    return {s for action in parser._actions for s in action.option_strings}


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, words) for every ``python -m`` command in the guides; comments dropped."""
    found = []
    for guide in GUIDES:
        text = re.sub(r"\\\n\s*", " ", (ROOT / guide).read_text())  # join continued shell lines
        lines = [(f"{guide}:{number}", line) for number, line in enumerate(text.splitlines(), 1)]
        # inline code that wraps onto the next line, e.g. `python -m bench.x --out A\n--plot B`, as one line
        lines += [(f"{guide}, inline", span.replace("\n", " "))
                  for span in re.findall(r"(?<!`)`(python -m [^`]*\n[^`]*)`", text)]
        for where, line in lines:
            for match in COMMAND.finditer(line.split(" #")[0]):
                if match.group(1) not in NOT_OURS:
                    found.append((where, match.group(1), match.group(2).split()))
    return found


COMMANDS = shown_commands()


def test_the_guides_show_commands() -> None:
    modules = {module for _, module, _ in COMMANDS}
    assert {"cloud", "router", "router.tune", "router.monitor", "router.demo", "edge", "proto.healthcheck"} <= modules


@pytest.mark.parametrize("where, module, words", COMMANDS, ids=[f"{w} {m}" for w, m, _ in COMMANDS])
def test_every_flag_shown_exists(where: str, module: str, words: list[str]) -> None:
    parser = parser_of(module, from_log="--from-log" in words)
    subcommand = words[0] if module == "edge" and words and not words[0].startswith("-") else None
    known = options(parser, subcommand)
    shown = {m.group(1) for w in words if (m := FLAG.match(w))}
    unknown = sorted(shown - known)
    assert not unknown, f"{where}: python -m {module} {' '.join(words)} shows {unknown}, which it does not take"


# ------------------------------------------------------------------ docs/ROUTER.md's flag tables

ROUTER_DOC = (ROOT / "docs" / "ROUTER.md").read_text()


def flag_table(heading_text: str) -> dict[str, str]:
    """``--flag`` -> default cell of the first table after the line containing ``heading_text``."""
    after = ROUTER_DOC[ROUTER_DOC.index(heading_text):]
    lines = after[after.index("\n| flag |"):].strip().splitlines()
    rows: dict[str, str] = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        flag_cell, default = (c.strip() for c in line.strip("|").split("|")[:2])
        for flag in re.findall(r"`(--[a-z0-9-]+)", flag_cell):
            rows[flag] = default
    return rows


def _same_default(quoted: str, actual: object) -> bool:
    """A number or a single word quoted in the table equals the parser's default; prose is not compared."""
    cell = quoted.strip("`")
    number = re.fullmatch(r"(-?\d+(?:\.\d+)?)(?: \(.*\))?", cell)
    if number:
        return actual is not None and float(number.group(1)) == float(actual)
    if re.fullmatch(r"[A-Za-z]+", cell) and isinstance(actual, str):
        return cell == actual
    return True


TABLES = [("### Flags of `python -m router`", "router", False, {"--help"}),
          ("`python -m router.tune` (`router/tune.py`", "router.tune", False, {"--help", "--checkpoint", "--out"}),
          ("### Re-tuning from the log", "router.tune", True, {"--help", "--out"})]


@pytest.mark.parametrize("heading, module, from_log, untabled", TABLES, ids=[t[1] + "-log" * t[2] for t in TABLES])
def test_flag_tables_list_every_flag_with_its_default(heading: str, module: str, from_log: bool,
                                                      untabled: set[str]) -> None:
    table = flag_table(heading)
    parser = parser_of(module, from_log)
    assert parser is not None
    actions = {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}
    missing = sorted(set(actions) - set(table) - untabled)
    unknown = sorted(set(table) - set(actions))
    assert not missing, f"docs/ROUTER.md's table after {heading!r} lacks {missing}"
    assert not unknown, f"docs/ROUTER.md's table after {heading!r} shows {unknown}, which {module} does not take"
    wrong = {f: (table[f], actions[f].default) for f in table if not _same_default(table[f], actions[f].default)}
    assert not wrong, f"defaults in docs/ROUTER.md differ from the parser's: {wrong}"


# ------------------------------------------------------------------ links between the docs


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


LINKS = [(guide, target) for guide in GUIDES + ["docs/CLOUD.md", "docs/BENCHMARKS.md"]
         for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / guide).read_text())
         if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("guide, target", LINKS, ids=[f"{g}->{t}" for g, t in LINKS])
def test_links_between_docs_resolve(guide: str, target: str) -> None:
    file, _, anchor = target.partition("#")
    path = (ROOT / guide).parent / file if file else ROOT / guide
    assert path.exists(), f"{guide} links to {target}: no file {path.relative_to(ROOT)}"
    if anchor:
        assert anchor in anchors(path), f"{guide} links to {target}: {path.name} has no such heading"


# ------------------------------------------------------------------ the router's metrics


def router_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name -> (type, label names) of every metric the router registers."""
    from prometheus_client.metrics import MetricWrapperBase

    from router.metrics import RouterMetrics

    suffix = {"counter": "_total", "info": "_info"}
    found = {}
    for metric in vars(RouterMetrics()).values():
        if isinstance(metric, MetricWrapperBase):
            found[metric._name + suffix.get(metric._type, "")] = (metric._type, tuple(metric._labelnames))
    return found


def test_router_metrics_table_matches_the_registry() -> None:
    section = ROUTER_DOC[ROUTER_DOC.index("## Metrics (`router/metrics.py`"):]
    section = section[:section.index("\n\n", section.index("| metric |"))]  # the table only
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \|([^|]*)\|", section, flags=re.M)
    documented = {name: (kind, tuple(re.findall(r"[a-z_]+", labels))) for name, kind, labels in rows}
    actual = router_metrics()
    assert set(documented) == set(actual), (f"in docs/ROUTER.md only: {sorted(set(documented) - set(actual))}; "
                                            f"in router/metrics.py only: {sorted(set(actual) - set(documented))}")
    for name, (kind, labels) in actual.items():
        assert documented[name][0] == kind, f"{name}: docs/ROUTER.md says {documented[name][0]}, it is a {kind}"
        if kind != "info":  # an Info's labels are its keys, not label names
            assert documented[name][1] == labels, f"{name}: docs/ROUTER.md says labels {documented[name][1]}"


def test_router_metric_names_in_the_guides_exist() -> None:
    actual = router_metrics()
    for guide in GUIDES:
        for name in re.findall(r"`(router_[a-z_]+)", (ROOT / guide).read_text()):
            assert name in actual or name == "router_ms", f"{guide} names {name}, which the router does not export"
