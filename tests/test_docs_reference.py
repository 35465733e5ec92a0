"""docs/reference.md stays true to the code: message fields, settings and CLI commands.

The field tables (each after an HTML comment ``<!-- fields: NAME -->``) are compared with the
JSON Schema of the pydantic models in ``schemas/`` (``schemas.export.MODELS`` and the nested
models in their ``$defs``), so a field added to a model and not to the page fails here. The
settings table (after ``<!-- settings -->``) is compared with what ``worker.config.settings`` reads:
the ``SPECS`` registry (variable, flag, default) and the other variables read in that module,
found by parsing its source. The table of queues lists every queue the worker consumes
(``Settings.work_queues``) with its setting and default, and the dead letters' ``errorType``
lists every class of permanent failure the code raises. The CLI section is compared with the
argument parser.
"""

import argparse
import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from schemas.export import EVENTS, MODELS
from schemas.requests import DEFAULT_STORAGE_SETTING, MESSAGE_TYPES, ChatRequest
from tests.support.azurite import REPO_ROOT
from worker.cli.main import build_parser
from worker.config import settings as settings_module
from worker.config.settings import SPECS, Settings
from worker.loop.errors import DEAD_LETTER_TYPES

DOC = REPO_ROOT / "docs" / "reference.md"
# The code whose failure classes the dead letters' errorType must name.
SOURCES = ("worker", "handlers", "schemas")
_MARKER = re.compile(r"<!--\s*(fields:\s*(\w+)|settings|error types)\s*-->")
_CODE = re.compile(r"`([^`]+)`")
# Models documented with their own table besides the exported ones: the fields every request has.
EXTRA_MODELS: dict[str, type[BaseModel]] = {"ChatRequest": ChatRequest}


# --- reading the page ---------------------------------------------------------------------------


def markdown_table(lines: list[str], start: int) -> list[dict[str, str]]:
    """The rows of the first table at or after line ``start``, as {header: cell}."""
    index = start
    while index < len(lines) and not lines[index].lstrip().startswith("|"):
        index += 1
    rows: list[list[str]] = []
    while index < len(lines) and lines[index].lstrip().startswith("|"):
        rows.append(split_row(lines[index]))
        index += 1
    assert len(rows) >= 2, f"no table after line {start + 1} of {DOC.name}"
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def split_row(line: str) -> list[str]:
    """The cells of one table row; ``\\|`` inside a cell is a literal bar."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def tables() -> dict[str, list[dict[str, str]]]:
    """Every marked table: ``fields:NAME`` or ``settings``."""
    lines = DOC.read_text().splitlines()
    found: dict[str, list[dict[str, str]]] = {}
    for number, line in enumerate(lines):
        match = _MARKER.search(line)
        if match:
            key = f"fields:{match.group(2)}" if match.group(2) else match.group(1)
            assert key not in found, f"{key} is marked twice in {DOC.name}"
            found[key] = markdown_table(lines, number + 1)
    return found


def first_code(cell: str) -> str:
    match = _CODE.search(cell)
    assert match, f"no `name` in the cell {cell!r}"
    return match.group(1)


# --- what the code defines ----------------------------------------------------------------------


def documented_schemas() -> dict[str, dict[str, Any]]:
    """Every model the page must describe, by name: the exported ones and their nested models."""
    found: dict[str, dict[str, Any]] = {}
    for name, model in {**MODELS, **EXTRA_MODELS}.items():
        mode: Literal["validation", "serialization"] = (
            "serialization" if name in EVENTS else "validation"
        )
        schema = model.model_json_schema(by_alias=True, mode=mode)
        found[name] = schema
        for def_name, definition in schema.get("$defs", {}).items():
            found.setdefault(def_name, definition)
    return found


SCHEMAS = documented_schemas()


def test_every_model_has_a_field_table() -> None:
    """Each exported message, and each object nested in one, has its table, and no table names
    a model that does not exist."""
    documented = {key.removeprefix("fields:") for key in tables() if key.startswith("fields:")}
    assert sorted(set(SCHEMAS) - documented) == [], "models without a table in reference.md"
    assert sorted(documented - set(SCHEMAS)) == [], "tables of models that do not exist"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_field_table_matches_the_model(name: str) -> None:
    """The table lists exactly the model's wire names; for requests, 'required' exactly where
    the schema requires the field; for reply events, every field always present."""
    table = tables().get(f"fields:{name}")
    if table is None:
        pytest.fail(f"reference.md has no `<!-- fields: {name} -->` table")
    schema = SCHEMAS[name]
    rows = {first_code(row["field"]): row for row in table}
    assert len(rows) == len(table), f"{name}: a field is listed twice"
    properties = set(schema.get("properties", {}))
    assert sorted(properties - set(rows)) == [], f"{name}: fields missing from the table"
    assert sorted(set(rows) - properties) == [], f"{name}: fields the model does not have"
    required = set(schema.get("required", []))
    if name in MESSAGE_TYPES or name in EXTRA_MODELS:
        marked = {
            field for field, row in rows.items() if row["required / default"].startswith("required")
        }
        assert marked == required, f"{name}: 'required' marks differ from the schema"
    if name in EVENTS:
        assert required == properties, f"{name}: the schema no longer requires every field"
        assert {row["always present"] for row in rows.values()} == {"yes"}


# --- settings -----------------------------------------------------------------------------------


def env_names_read_by_settings() -> tuple[set[str], set[str]]:
    """The variables ``worker/config/settings.py`` reads besides ``SPECS``: literal names passed to
    ``env.get(...)``, and name patterns from f-strings (``{}__accountName``)."""
    source = Path(settings_module.__file__).read_text()
    literals: set[str] = set()
    patterns: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "env"
            and node.args
        ):
            continue
        argument = node.args[0]
        if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
            literals.add(argument.value)
        elif isinstance(argument, ast.JoinedStr):
            patterns.add(
                "".join(
                    str(part.value) if isinstance(part, ast.Constant) else "{}"
                    for part in argument.values
                )
            )
    return literals, patterns


def settings_rows() -> Iterator[tuple[list[str], dict[str, str]]]:
    """(the variable names of the row, the row) for each row of the settings table."""
    table = tables().get("settings")
    assert table, "reference.md has no `<!-- settings -->` table"
    for row in table:
        names = [
            name
            for name in _CODE.findall(row["variable"])
            if re.fullmatch(r"[A-Za-z_<][A-Za-z0-9_<>]*", name)
        ]
        assert names, f"a settings row names no variable: {row}"
        yield names, row


def _as_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".+".join(re.escape(part) for part in pattern.split("{}")) + "$")


def test_settings_table_lists_every_variable_and_only_those() -> None:
    """Every variable the settings module reads is in the table, and every variable in the
    table is read (a placeholder such as ``<name>__endpoint`` stands for a pattern)."""
    literals, patterns = env_names_read_by_settings()
    known = {spec.env for spec in SPECS} | literals | {DEFAULT_STORAGE_SETTING}
    regexes = [_as_regex(pattern) for pattern in patterns]
    documented = [name for names, _ in settings_rows() for name in names]
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert sorted(known - set(documented)) == [], "variables missing from the settings table"
    for pattern, regex in zip(sorted(patterns), regexes, strict=True):
        assert any(regex.match(name) for name in documented), f"no variable of the form {pattern}"
    unknown = [
        name
        for name in documented
        if name not in known and not any(regex.match(name) for regex in regexes)
    ]
    assert unknown == [], "variables in the table that the worker does not read"


def test_settings_table_flags_and_defaults() -> None:
    """Each setting of the registry shows its CLI flag and its default; the others no flag."""
    by_env = {spec.env: spec for spec in SPECS}
    for names, row in settings_rows():
        specs = [by_env[name] for name in names if name in by_env]
        if not specs:
            assert row["flag"] == "—", f"{names}: only registry settings have flags"
            continue
        assert len(specs) == 1 and len(names) == 1, f"one registry setting per row: {names}"
        [spec] = specs
        assert row["flag"] == f"`{spec.flag}`", spec.env
        expected = f"`{spec.default}`" if spec.default else "—"
        assert row["default"] == expected, spec.env


def test_run_has_a_flag_per_setting() -> None:
    """What the table promises of `assistant-worker run --help`."""
    [run] = [parser for path, parser in commands() if path == "run"]
    options = {o for action in run._actions for o in action.option_strings}
    assert {spec.flag for spec in SPECS} <= options


# --- queues -------------------------------------------------------------------------------------


def section_table(heading: str) -> list[dict[str, str]]:
    """The first table after the line ``heading`` (a markdown heading of the page)."""
    lines = DOC.read_text().splitlines()
    assert heading in lines, f"{DOC.name} has no {heading!r} section"
    return markdown_table(lines, lines.index(heading) + 1)


def test_queues_table_lists_every_work_queue() -> None:
    """Each queue the worker consumes has its row: the default name and the setting that
    changes it, as ``worker.config.settings`` defines them; no row names a queue setting that the
    worker does not have."""
    defaults = Settings.from_env({})
    queue_specs = {
        spec.env: spec for spec in SPECS if getattr(defaults, spec.field) in defaults.work_queues
    }
    assert len(queue_specs) == len(defaults.work_queues)
    rows = {}
    for row in section_table("## Queues"):
        settings = [name for name in _CODE.findall(row["setting"]) if name.isupper()]
        for name in settings:
            rows[name] = row
    assert sorted(set(queue_specs) - set(rows)) == [], "work queues missing from the table"
    unknown = [name for name in rows if name.startswith("WORKER_") and name not in queue_specs]
    assert unknown == [], "queue settings in the table that the worker does not have"
    for name, spec in queue_specs.items():
        queue = first_code(rows[name]["queue (default name)"])
        assert queue == getattr(defaults, spec.field) == spec.default, name


def test_each_worker_message_type_names_its_queue() -> None:
    """The worker's own messages (``runStep``, ``runDeadline``) are in the queues table, in the
    row of the queue the code sends them to."""
    defaults = Settings.from_env({})
    by_queue = {first_code(row["queue (default name)"]): row for row in section_table("## Queues")}
    expected = {"runStep": defaults.runs_queue, "runDeadline": defaults.deadlines_queue}
    assert set(expected) <= set(MESSAGE_TYPES)
    for message_type, queue in expected.items():
        assert f"`{message_type}`" in by_queue[queue]["holds"], f"{message_type} on {queue}"
        others = [
            q for q, row in by_queue.items() if q != queue and f"`{message_type}`" in row["holds"]
        ]
        assert others == [], f"{message_type} is said to be on {others} too"


# --- dead letters -------------------------------------------------------------------------------


def permanent_error_types() -> set[str]:
    """Every constant error class the code dead-letters with: ``error_type="..."`` passed to
    ``PermanentError`` or ``DeadLetter`` (or a ``DeadLetter``'s second argument), and
    ``self.error_type = "..."`` in an exception class."""
    found: set[str] = set()
    for package in SOURCES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    if name not in {"PermanentError", "DeadLetter"}:
                        continue
                    values = [k.value for k in node.keywords if k.arg == "error_type"]
                    if name == "DeadLetter" and len(node.args) >= 2:
                        values.append(node.args[1])
                    found |= {
                        v.value
                        for v in values
                        if isinstance(v, ast.Constant) and isinstance(v.value, str)
                    }
                elif (
                    isinstance(node, ast.Assign)
                    and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)
                    and any(
                        isinstance(target, ast.Attribute) and target.attr == "error_type"
                        for target in node.targets
                    )
                ):
                    found.add(node.value.value)
    return found


def test_dead_letter_error_types_are_documented() -> None:
    """The ``errorType`` row of the dead letters names every class of permanent failure."""
    found = permanent_error_types()
    assert {"InvalidMessage", "UnknownAssistant", "InvalidToolOutputs", "UnknownRun"} <= found
    table = tables()["fields:DeadLetterInfo"]
    [row] = [row for row in table if first_code(row["field"]) == "errorType"]
    documented = set(_CODE.findall(row["meaning"]))
    assert sorted(found - documented) == [], "error types missing from the errorType row"


def test_error_types_table_names_each_cause_once() -> None:
    """The table of ``errorType`` values is the code's list (the one the dead-letter counter
    starts from), and that list holds every class of permanent failure the code raises."""
    listed = [first_code(row["`errorType`"]) for row in tables()["error types"]]
    assert listed == list(DEAD_LETTER_TYPES)
    assert sorted(permanent_error_types() - set(DEAD_LETTER_TYPES)) == []


# --- CLI ----------------------------------------------------------------------------------------


def commands(
    parser: argparse.ArgumentParser | None = None, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command with no subcommands of its own, as ("poison replay", its parser)."""
    parser = parser or build_parser()
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands and path:
        yield path, parser
    for action in subcommands:
        for name, sub in action.choices.items():
            yield from commands(sub, f"{path} {name}".strip())


def test_every_command_and_option_is_documented() -> None:
    """Each command appears as ``assistant-worker COMMAND`` and each of its options by name."""
    text = DOC.read_text()
    missing = []
    for path, parser in commands():
        if f"assistant-worker {path}" not in text:
            missing.append(f"assistant-worker {path}")
        for action in parser._actions:
            for option in action.option_strings:
                documented = re.search(re.escape(option) + r"(?![\w-])", text)
                if option.startswith("--") and option != "--help" and not documented:
                    missing.append(f"{path} {option}")
    assert missing == []


def test_no_pointer_to_the_spec() -> None:
    """The page stands on its own: the spec is not part of a clone."""
    text = DOC.read_text()
    assert "SPEC" not in text
