"""The house plan (ARCHITECTURE.md): which room of the code may import which.

Every module of ``worker/``, ``handlers/`` and ``schemas/`` is read with ``ast`` (imports inside
functions and ``TYPE_CHECKING`` blocks count too: a lazy import is still a dependency) and held
against the plan below. A new package must be added here, and to the code map of
ARCHITECTURE.md, before anything may import it.
"""

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from tests.support.azurite import REPO_ROOT

# Room -> the rooms it may import (its own room always). "worker.loop" here means only the
# loop's contract (CONTRACT); the loop's own modules are for the wiring alone.
PLAN: dict[str, set[str]] = {
    "schemas": set(),
    "worker.config": {"schemas"},
    "worker.runs": {"schemas"},
    "worker.queues": {"schemas"},
    "worker.testing": set(),
    "worker.connections": {"worker.config"},
    "worker.deadletters": {"schemas", "worker.config", "worker.connections", "worker.queues"},
    "worker.backends": {"schemas", "worker.config", "worker.connections", "worker.runs"},
    "worker.store": {
        "schemas",
        "worker.config",
        "worker.connections",
        "worker.loop",
        "worker.runs",
    },
    "worker.observability": {
        "schemas",
        "worker.backends",
        "worker.config",
        "worker.queues",
        "worker.runs",
    },
    "worker.streaming": {
        "schemas",
        "worker.config",
        "worker.loop",
        "worker.observability",
        "worker.queues",
    },
    "worker.mcp": {"schemas", "worker.config", "worker.loop", "worker.observability"},
    "worker.loop": {
        "schemas",
        "worker.config",
        "worker.deadletters",
        "worker.observability",
        "worker.queues",
    },
    "handlers": {
        "schemas",
        "worker.backends",
        "worker.config",
        "worker.loop",
        "worker.mcp",
        "worker.observability",
        "worker.runs",
        "worker.store",
        "worker.streaming",
    },
    "worker.http": {
        "handlers",
        "schemas",
        "worker.config",
        "worker.connections",
        "worker.loop",
        "worker.observability",
        "worker.queues",
        "worker.store",
    },
    "worker.client": {"schemas", "worker.queues", "worker.streaming"},
}
# The wiring and the entry points may import every room above; nothing imports them but
# the rooms listed (the CLI's commands load the wiring, the demo is a command).
WIRING = {"worker.app": {"worker.cli", "worker.devtools"}}
ENTRY = {
    "worker.cli": {"worker.__main__"},
    "worker.devtools": {"worker.cli"},
    "worker.__main__": set(),
}
# What of the loop others may import: the handler interface, the kinds of failure and the
# pure decisions. The loop itself (worker.py) and the storage gate are the wiring's.
CONTRACT = {"worker.loop.handling", "worker.loop.errors", "worker.loop.outcome"}
# The SDKs that reach outside the process, and the only modules that may import each.
ADAPTERS: dict[str, tuple[str, ...]] = {
    "azure": (
        "worker.connections.",
        "worker.queues.azure",
        "worker.store.",
        "worker.backends.clients",  # the Azure OpenAI token provider (azure.identity)
        "worker.observability.tracing",  # switches on the Azure SDK's own spans
    ),
    "openai": ("worker.backends.",),
    "redis": ("worker.streaming.",),
    "mcp": ("worker.mcp.",),
}
# Modules of a room that must not reach the outside (pure): no adapter SDK, no I/O package.
PURE = (
    "worker.store.layout",
    "worker.store.cache",
    "worker.store.protocol",
    "worker.loop.outcome",
    "worker.loop.errors",
    "worker.queues.polling",
    "worker.deadletters.envelope",
    "worker.deadletters.identity",
)
ROOTS = ("worker", "handlers", "schemas")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = modules()


def imports_of(path: Path) -> set[str]:
    """Every module named by an import in ``path`` (absolute imports; the project has no
    relative ones), with ``from a import b`` also naming ``a.b`` when that is a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            if node.module is None:
                continue
            names.add(node.module)
            names.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if f"{node.module}.{alias.name}" in MODULES
            )
    return names


def room(module: str) -> str:
    """The room of a project module: its package under ``worker/`` (or the loose module),
    or its top-level package."""
    parts = module.split(".")
    if parts[0] == "worker" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


GRAPH = {module: imports_of(path) for module, path in MODULES.items()}


def project_edges() -> list[tuple[str, str]]:
    return [
        (source, target)
        for source, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] in ROOTS and target in MODULES
    ]


def test_every_room_is_in_the_plan() -> None:
    """Each package of ``worker/`` has its place in the plan, and the only loose modules are
    the entry point and the wiring (everything else lives in a room named for its role)."""
    rooms = {room(module) for module in MODULES}
    planned = set(PLAN) | set(WIRING) | set(ENTRY) | {"worker"}
    assert rooms <= planned, f"rooms missing from the plan: {sorted(rooms - planned)}"
    loose = sorted(
        path.name for path in (REPO_ROOT / "worker").glob("*.py") if path.name != "__init__.py"
    )
    assert loose == ["__main__.py", "app.py"]


@pytest.mark.parametrize("source_room", sorted(PLAN))
def test_rooms_import_only_what_the_plan_allows(source_room: str) -> None:
    """A room imports only the rooms below it in the plan; of the loop, only its contract."""
    allowed = PLAN[source_room] | {source_room}
    wrong = sorted(
        f"{source} -> {target}"
        for source, target in project_edges()
        if room(source) == source_room
        and target != "worker"
        and (
            room(target) not in allowed
            or (room(target) == "worker.loop" != source_room and target not in CONTRACT)
        )
    )
    assert not wrong, "imports across the house plan:\n" + "\n".join(wrong)


def test_the_wiring_and_entry_points_are_imported_only_from_above() -> None:
    """Nothing imports the CLI, the demo or the wiring but the rooms above them."""
    callers = {**WIRING, **ENTRY}
    wrong = sorted(
        f"{source} -> {target}"
        for source, target in project_edges()
        if room(target) in callers
        and room(source) != room(target)
        and room(source) not in callers[room(target)]
    )
    assert not wrong, "\n".join(wrong)


def test_only_adapters_import_the_sdks_that_reach_out() -> None:
    """Azure, openai, Redis and MCP are imported only by the adapters at the edge."""
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            top = target.split(".")[0]
            if top in ADAPTERS and not module.startswith(ADAPTERS[top]):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    """The pure parts (decisions, schedules, layout, the envelope) import no SDK, no network
    or event-loop package: they are tested without I/O."""
    io = {*ADAPTERS, "aiohttp", "asyncio", "httpx", "prometheus_client", "opentelemetry"}
    assert not {target.split(".")[0] for target in GRAPH[module]} & io


def test_the_pure_core_stands_alone() -> None:
    """schemas/ and the run machine import nothing of the worker's I/O."""
    for module, targets in GRAPH.items():
        if room(module) in ("schemas", "worker.runs"):
            outside = {t for t in targets if t.split(".")[0] in ROOTS and room(t) != room(module)}
            assert outside <= {t for t in outside if room(t) == "schemas"}, (module, outside)


def test_no_module_imports_itself_in_a_circle() -> None:
    """No two modules of the project import each other, directly or through others."""
    edges: dict[str, set[str]] = defaultdict(set)
    for source, target in project_edges():
        if source != target and MODULES[target].name != "__init__.py":
            edges[source].add(target)
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)


def test_the_plan_itself_has_no_circle() -> None:
    """The rooms form layers: following the allowed imports never leads back."""
    seen: set[str] = set()
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, " -> ".join((*stack, name))
        if name in seen:
            return
        for below in sorted(PLAN.get(name, set())):
            visit(below, (*stack, name))
        seen.add(name)
        order.append(name)

    for name in sorted(PLAN):
        visit(name, ())
    assert set(order) == set(PLAN)


def test_the_architecture_page_maps_every_room_and_names_real_files() -> None:
    """ARCHITECTURE.md has a code-map entry for every room of the plan, and every path it
    names exists: the page cannot drift from the tree unnoticed."""
    text = (REPO_ROOT / "ARCHITECTURE.md").read_text()
    for name in [*PLAN, *WIRING, *ENTRY]:
        path = name.replace(".", "/")
        entry = f"`{path}/`" if (REPO_ROOT / path).is_dir() else f"`{path}.py`"
        assert entry in text, f"ARCHITECTURE.md has no entry for {entry}"
    for path in re.findall(
        r"`((?:worker|handlers|schemas|tests|bench|deploy|docs)/[\w/.]*)`", text
    ):
        assert (REPO_ROOT / path).exists(), f"ARCHITECTURE.md names {path}, which does not exist"
