"""The log explains a failed run: through the real queues on Azurite and the fake model over
real HTTP, each failure a user can cause or meet is a warning (or an error) that names the
message type, the chat, the post's request id, the run and the error, with secrets masked; a
retried model error is logged once per attempt with its status; a worker started without a
model endpoint says so at once.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import structlog

from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, run
from tests.support.processes import WorkerProcess
from tests.support.runs import ReplyQueue, create_body, model_env, post_body, serving
from worker.config.settings import NO_MODEL_ENDPOINT
from worker.testing import FakeOpenAI

SECRET = "sk-failure-logs-secret-0123456789"
WARNING_OR_ABOVE = {"warning", "error", "critical"}


def events(logs: list[Any], name: str) -> list[dict[str, Any]]:
    return [dict(e) for e in logs if e.get("event") == name]


def post_and_wait(
    storage: StorageEnv, env: dict[str, str]
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Create a chat, post to it with replyTo, wait for the reply; returns it, the log
    events (with the bound context, as the JSON log has them) and the chat id."""
    chat_id = f"logs-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[dict[str, Any], list[Any]]:
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            async with serving(storage.settings(**env)):
                await storage.send(create_body(chat_id, storage.table))
                await storage.send(
                    post_body(chat_id, storage.table, "hi", replyTo=replies.name, requestId="p-1")
                )
                [reply] = await replies.wait_for("assistantReply", 30)
        return reply, logs

    reply, logs = run(scenario())
    return reply, [dict(e) for e in logs], chat_id


def assert_names_the_run(line: dict[str, Any], chat_id: str, run_id: str) -> None:
    assert line["log_level"] in WARNING_OR_ABOVE, line
    assert line.get("type") in {"assistantPost", "runStep"}, line
    assert line.get("chat_id") == chat_id, line
    assert line.get("request_id") == "p-1", line
    assert line.get("run_id") == run_id, line


def test_a_model_404_is_a_warning_with_the_redacted_error(storage: StorageEnv) -> None:
    """A wrong OPENAI_BASE_URL: the run fails, and the log says why (the status, the URL it
    tried, with the key that happens to be in it masked), not just "model -> failed"."""

    with FakeOpenAI().running_in_thread() as fake:
        env = model_env(f"{fake.url}/{SECRET}/v2", OPENAI_API_KEY=SECRET)
        reply, logs, chat_id = post_and_wait(storage, env)
    assert reply["status"] == "failed"
    run_id = reply["runId"]

    [call] = events(logs, "model.call_failed")
    assert_names_the_run(call, chat_id, run_id)
    assert call["status"] == 404
    assert "refused the request (404) at http://" in call["error"]
    assert "/***/v2/chat/completions" in call["error"]
    [ended] = events(logs, "run.ended")
    assert_names_the_run(ended, chat_id, run_id)
    assert ended["status"] == "failed" and "404" in ended["error"]
    assert SECRET not in repr(logs)


def test_a_retried_model_error_is_logged_once_per_attempt(storage: StorageEnv) -> None:
    """A 500, then a 429: two warnings with their statuses and the delay before the retry;
    then the run completes. Every line of the run, in-process steps and queued steps alike,
    carries the post's request id."""
    with FakeOpenAI().running_in_thread() as fake:
        fake.fault("500", count=1)
        fake.fault("429", count=1, retry_after=0)
        reply, logs, chat_id = post_and_wait(
            storage, model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo")
        )
    assert reply["status"] == "completed"
    run_id = reply["runId"]
    calls = events(logs, "model.call_failed")
    assert [c["status"] for c in calls] == [500, 429]
    for call in calls:
        assert_names_the_run(call, chat_id, run_id)
        assert call["retry_in_seconds"] is not None
        assert str(call["status"]) in call["error"]
    assert calls[1]["retry_in_seconds"] == 0
    of_the_run = [e for e in logs if e.get("run_id") == run_id]
    assert {e.get("type") for e in of_the_run} >= {"assistantPost", "runStep"}
    assert {e.get("request_id") for e in of_the_run} == {"p-1"}, of_the_run


def test_a_failing_tool_is_a_warning(storage: StorageEnv) -> None:
    """The model reads a tool's error and goes on; the operator finds it in the log."""
    with FakeOpenAI().running_in_thread() as fake:
        fake.script(
            "tool-bot",
            [
                {"tool_calls": [{"name": "note", "arguments": {"label": [7]}}]},
                {"content": "done"},
            ],
        )
        reply, logs, chat_id = post_and_wait(
            storage,
            model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="tool-bot"),
        )
    assert reply["status"] == "completed"
    [failed] = events(logs, "tool.failed")
    assert_names_the_run(failed, chat_id, reply["runId"])
    assert failed["tool"] == "note" and "invalid arguments" in failed["error"]
    [step] = [e for e in events(logs, "step.completed") if e.get("tools")]
    assert step["tools"] == ["note"]


def test_a_worker_without_a_model_endpoint_says_so_at_start(
    storage: StorageEnv, tmp_path: Path
) -> None:
    env = storage.env(OPENAI_API_KEY="", OPENAI_BASE_URL="", AZURE_OPENAI_ENDPOINT="")
    env = {**env, "PATH": os.environ.get("PATH", "")}
    with WorkerProcess(env, tmp_path / "worker.log", "--burst") as worker:
        worker.proc.wait(timeout=60)
        [line] = worker.events("model.not_configured")
    assert line["level"] == "warning", line
    assert line["reason"] == NO_MODEL_ENDPOINT
    assert NO_MODEL_ENDPOINT.index("OPENAI_BASE_URL") < NO_MODEL_ENDPOINT.index("OPENAI_API_KEY")


def logged_events() -> dict[str, str]:
    """Every event the worker logs at info or above, with its level, found in the source."""
    found: dict[str, str] = {}
    for package in ("worker", "handlers"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if "testing" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                level, args = node.func.attr, node.args
                if level not in {"info", "warning", "error"} or not args:
                    continue
                name = args[0].value if isinstance(args[0], ast.Constant) else None
                if isinstance(name, str) and re.fullmatch(r"[a-z_]+\.[a-z_]+", name):
                    found[name] = level
    return found


def test_every_log_event_is_in_the_operations_table_with_its_level() -> None:
    """docs/operations.md 7.3 lists each event the code logs (``step.completed``, the most
    common, included) at the level the code logs it."""
    lines = (REPO_ROOT / "docs" / "operations.md").read_text().splitlines()
    start = lines.index("<!-- log events -->") + 3
    documented: dict[str, str] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        names, level, _ = (cell.strip() for cell in line.strip("|").split("|", 2))
        for name in re.findall(r"`([^`]+)`", names):
            documented[name] = level
    assert documented == logged_events()
