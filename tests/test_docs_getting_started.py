"""docs/getting-started.md runs as written: the fake model and a worker from its commands (in
the background, as the page's terminals), then its producer commands one by one, against the
session's Azurite (the page's ``AzureWebJobsStorage``, with this test's queues). Only the fake
model's port is changed, to a free one.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.azurite import REPO_ROOT
from tests.support.cli import clean_env
from tests.support.env import StorageEnv
from tests.test_docs_producers import fenced_blocks

DOC = REPO_ROOT / "docs" / "getting-started.md"
DOC_PORT = "8089"
COMMAND_TIMEOUT = 120.0


def blocks() -> dict[str, str]:
    """The page's shell blocks by their name (the word after ```` ```sh ````)."""
    named = [(info, code) for lang, info, code in fenced_blocks(DOC.read_text()) if lang == "sh"]
    found = dict(named)
    assert len(found) == len(named), "two blocks with one name"
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def background(script: str, env: dict[str, str], log: Path) -> Iterator[Callable[[], str]]:
    """``bash -c script`` in a session of its own (killed whole on exit); yields a reader of
    its output so far."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield lambda: log.read_text(errors="replace")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_for(text: Callable[[], str], needle: str, within: float) -> None:
    deadline = time.monotonic() + within
    while needle not in text():
        assert time.monotonic() < deadline, f"no {needle!r} within {within} s:\n{text()}"
        time.sleep(0.1)


def shell(line: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", line],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


def lines_of(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture
def recipe(storage: StorageEnv, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The model and the worker of the page running; the environment of its terminals."""
    page = blocks()
    port = str(free_port())
    env = clean_env(**storage.env())
    with background(page["model"].replace(DOC_PORT, port), env, tmp_path / "model.log") as model:
        wait_for(model, '"base_url"', 30)
        worker_log = tmp_path / "worker.log"
        with background(page["worker"].replace(DOC_PORT, port), env, worker_log) as worker:
            wait_for(worker, '"worker.started"', 60)
            yield env
            log = worker()
    assert '"model.not_configured"' not in log, "OPENAI_BASE_URL alone configures the model"


def test_a_conversation_as_written(recipe: dict[str, str]) -> None:
    create, post, state = lines_of(blocks()["producer"])
    assert shell(create, recipe).returncode == 0
    waited = shell(post, recipe)
    assert waited.returncode == 0, waited.stderr
    reply = json.loads(waited.stdout)
    assert reply["status"] == "completed"
    assert "The Emerald City" in reply["content"]
    assert "waits for tool outputs" not in waited.stderr  # the tools are the worker's own
    shown = shell(state, recipe)
    assert shown.returncode == 0, shown.stderr
    chat = json.loads(shown.stdout)
    [run] = chat["runs"]
    # What the page says of the two token counts.
    assert run["usage"]["totalTokens"] > chat["totalTokens"] > 0


def test_a_failed_request_and_its_replay_as_written(recipe: dict[str, str]) -> None:
    post, listing, create, replay, state = lines_of(blocks()["poison"])
    waited = shell(post, recipe)
    assert waited.returncode == 1
    assert "assistant 'later-chat' does not exist (yet)" in waited.stderr
    assert "the request was dead-lettered (UnknownAssistant)" in waited.stderr
    listed = shell(listing, recipe)
    assert listed.returncode == 0, listed.stderr
    assert "later-chat" in listed.stdout
    assert "does not exist in table 'ChatState': send an assistantCreate first" in listed.stdout
    for line in (create, replay):
        done = shell(line, recipe)
        assert done.returncode == 0, done.stderr

    def completed() -> dict[str, Any] | None:
        shown = shell(state, recipe)
        assert shown.returncode == 0, shown.stderr
        chat = json.loads(shown.stdout)
        return chat if [r["status"] for r in chat["runs"]] == ["completed"] else None

    deadline = time.monotonic() + 30
    while (chat := completed()) is None:
        assert time.monotonic() < deadline, "the replayed post did not run"
        time.sleep(0.5)
    assert "The Emerald City" in chat["recentMessages"][-1]["content"]
