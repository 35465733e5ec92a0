"""Generate the JSON Schema files that producers in other languages validate against.

``python -m schemas.export`` rewrites ``schemas/json/``; ``--check`` exits 1 when the committed
files differ from the models (the test suite runs that check).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from schemas.events import (
    AssistantDelta,
    AssistantReply,
    AssistantState,
    DeadLetterEnvelope,
    ToolApprovalRequired,
    ToolCallsRequired,
)
from schemas.requests import (
    AssistantCreate,
    AssistantDelete,
    AssistantPost,
    RunDeadline,
    RunStep,
    SubmitToolApprovals,
    SubmitToolOutputs,
)

SCHEMA_DIR = Path(__file__).parent / "json"
MODELS: dict[str, type[BaseModel]] = {
    "assistantCreate": AssistantCreate,
    "assistantPost": AssistantPost,
    "submitToolOutputs": SubmitToolOutputs,
    "submitToolApprovals": SubmitToolApprovals,
    "assistantDelete": AssistantDelete,
    "runStep": RunStep,
    "runDeadline": RunDeadline,
    "assistantReply": AssistantReply,
    "assistantDelta": AssistantDelta,
    "toolCallsRequired": ToolCallsRequired,
    "toolApprovalRequired": ToolApprovalRequired,
    "deadLetterEnvelope": DeadLetterEnvelope,
    "assistantState": AssistantState,
}


EVENTS = frozenset(
    {"assistantReply", "assistantDelta", "toolCallsRequired", "toolApprovalRequired"}
)


def render(name: str, model: type[BaseModel]) -> str:
    """The schema file's text for one model (stable key order, trailing newline)."""
    # Events are described as the worker writes them (every reply field required, possibly
    # null); requests as the worker accepts them.
    mode: Literal["validation", "serialization"] = (
        "serialization" if name in EVENTS else "validation"
    )
    schema = model.model_json_schema(by_alias=True, mode=mode)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{name}.schema.json",
        **schema,
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def expected_files() -> dict[Path, str]:
    """Every schema file as the models define it now."""
    return {SCHEMA_DIR / f"{name}.schema.json": render(name, m) for name, m in MODELS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    expected = expected_files()
    stale = [
        path for path, text in expected.items() if not path.exists() or path.read_text() != text
    ]
    extra = [p for p in SCHEMA_DIR.glob("*.schema.json") if p not in expected]
    if args.check:
        for path in [*stale, *extra]:
            print(f"stale: {path.name} (run: python -m schemas.export)", file=sys.stderr)
        return 1 if stale or extra else 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for path in extra:
        path.unlink()
    for path, text in expected.items():
        path.write_text(text)
    print(f"wrote {len(expected)} schema files to {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
