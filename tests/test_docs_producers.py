"""docs/producers.md: its Python, JavaScript and curl examples run as printed, end to end.

Each example marked ```` ```LANG producer ```` is written out as a user would save it and run as
a subprocess, configured only by environment variables (the connection string or a SAS URL, the
requests queue, a fresh chat id and reply queue), against Azurite and a worker answering through
the fake model. The test checks that the reply reached the example (it printed it and deleted it
from its reply queue) and that the chat was stored. The worker writes plain JSON or Base64, so
both ways of decoding in every example are exercised.
"""

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import (
    AssistantCreate,
    AssistantDelta,
    AssistantPost,
    AssistantReply,
    ToolApprovalRequired,
    ToolCallsRequired,
    parse_message,
)
from schemas.decode import decode_body
from schemas.events import ReplyEvent
from tests.support.approval_tools import approval_registry
from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, run
from tests.support.processes import WorkerProcess, wait_until
from tests.support.runs import TOOL_LOG_ENV, ReplyQueue, ToolLog, model_env, serving
from tests.test_approvals_e2e import mail_bot
from worker.devtools.redis_server import RedisServer
from worker.testing import FakeOpenAI

DOC = REPO_ROOT / "docs" / "producers.md"
WORKER_CLI = str(Path(sys.executable).parent / "assistant-worker")
QUESTION = "Hello! What can you do?"
# The fake model's echo scenario (any model name with "echo" in it).
ANSWER = f"You said: {QUESTION}"
EXAMPLE_TIMEOUT = 90.0
EVENTS: dict[str, type[ReplyEvent]] = {
    "assistantReply": AssistantReply,
    "toolCallsRequired": ToolCallsRequired,
    "toolApprovalRequired": ToolApprovalRequired,
    "assistantDelta": AssistantDelta,
}
_FENCE = re.compile(r"^```([\w#+-]+)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """Every fenced code block of a markdown text: (language, rest of the info string, code)."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in _FENCE.finditer(text)]


def producer_example(language: str, role: str = "producer") -> str:
    """The one block marked ```` ```LANGUAGE ROLE ```` (a producer, or an approver)."""
    found = [
        code
        for lang, info, code in fenced_blocks(DOC.read_text())
        if lang == language and role in info.split()
    ]
    assert len(found) == 1, f"expected one ```{language} {role} block in {DOC}, got {len(found)}"
    return found[0]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as server:
        yield server


def documented_sas(connection_string: str) -> dict[str, str]:
    """QUEUE_SERVICE_URL and QUEUE_SAS as the page gets them: ``eval "$(assistant-worker
    sas)"`` in bash, with the connection in AzureWebJobsStorage."""
    [line] = [
        code.splitlines()[0]
        for lang, _, code in fenced_blocks(DOC.read_text())
        if lang == "sh" and "assistant-worker sas" in code
    ]
    script = f"{line.replace('.venv/bin/assistant-worker', shlex.quote(WORKER_CLI))}\nenv"
    env = {**os.environ, "AzureWebJobsStorage": connection_string}
    shell = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert shell.returncode == 0, shell.stderr
    values = dict(line.partition("=")[::2] for line in shell.stdout.splitlines() if "=" in line)
    return {name: values[name] for name in ("QUEUE_SERVICE_URL", "QUEUE_SAS")}


def example_env(storage: StorageEnv, chat_id: str, reply_queue: str) -> dict[str, str]:
    """What a user sets: the storage connection, the queues, a chat id; nothing of the test's."""
    keep = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT"}
    env = {key: value for key, value in os.environ.items() if key in keep}
    env.update(
        AzureWebJobsStorage=storage.connection_string,
        **documented_sas(storage.connection_string),
        WORKER_REQUESTS_QUEUE=storage.requests_queue,
        CHAT_ID=chat_id,
        REPLY_QUEUE=reply_queue,
        REPLY_TIMEOUT="60",
    )
    return env


def command(language: str, path: Path) -> list[str]:
    if language == "python":
        return [sys.executable, str(path)]
    if language == "js":
        return ["node", str(path)]
    bash = shutil.which("bash")
    assert bash, "the curl example needs bash"
    return [bash, str(path)]


def example_path(language: str, tmp_path: Path) -> Path:
    """Where a user would save the example: for JavaScript, in a project that has
    ``@azure/storage-queue`` in its node_modules (the repository's, linked)."""
    if language == "js":
        (tmp_path / "node_modules").symlink_to(REPO_ROOT / "node_modules")
        return tmp_path / "producer.mjs"
    return tmp_path / ("producer.py" if language == "python" else "producer.sh")


async def run_example(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), EXAMPLE_TIMEOUT)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"{argv} did not finish within {EXAMPLE_TIMEOUT} s:\n{out.decode()}\n{err.decode()}"
        ) from None
    return int(process.returncode or 0), out.decode(), err.decode()


@pytest.mark.parametrize("encoding", ["none", "base64"])
@pytest.mark.parametrize("language", ["python", "js", "sh"])
def test_example_gets_its_reply(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path, language: str, encoding: str
) -> None:
    """The example creates, posts with replyTo, and prints the reply the worker sent it."""
    if language == "sh":
        assert shutil.which("curl"), "the curl example needs curl on PATH"
    chat_id = f"docs-{language}-{storage.suffix}"
    reply_queue = f"replies-{storage.suffix}"
    path = example_path(language, tmp_path)
    path.write_text(producer_example(language))
    settings = storage.settings(
        **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo-bot"),
        WORKER_MESSAGE_ENCODING=encoding,
    )

    async def scenario() -> tuple[int, str, str]:
        async with serving(settings):
            return await run_example(
                command(language, path), example_env(storage, chat_id, reply_queue), tmp_path
            )

    code, out, err = run(scenario())
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"the example printed nothing; stderr:\n{err}"
    reply = json.loads(lines[-1])
    assert reply["type"] == "assistantReply"
    assert reply["id"] == chat_id
    assert reply["status"] == "completed"
    assert reply["content"] == ANSWER
    assert reply["error"] is None
    assert str(reply["requestId"]).startswith("post-")
    # Every field of the event is present (null when empty).
    assert set(reply) == {field.alias for field in AssistantReply.model_fields.values()}
    assert [m["role"] for m in reply["recentMessages"]] == ["User", "Assistant"]
    # The example deleted the reply it read; the chat holds the conversation.
    assert run(storage.count(reply_queue)) == 0
    rows = run(storage.partition(chat_id))
    assert rows["state"]["Exists"] is True
    assert rows["msg-0001"]["Role"] == "System"
    assert rows["msg-0001"]["Content"] == "You are a helpful assistant. Be brief."
    assert rows["msg-0002"]["Content"] == QUESTION
    assert rows["msg-0003"]["Content"] == ANSWER
    assert run(storage.count(storage.requests_poison)) == 0


def test_every_json_block_is_a_valid_message() -> None:
    """The JSON shown on the page is what the worker reads or writes."""
    blocks = [code for lang, _, code in fenced_blocks(DOC.read_text()) if lang == "json"]
    assert blocks
    for code in blocks:
        payload = decode_body(code)
        event = EVENTS.get(str(payload.get("type")))
        if event is not None:
            reply = event.model_validate(payload)
            assert set(payload) == set(reply.to_wire()), "an event field is missing"
        else:
            parse_message(payload)


def test_other_examples_build_the_same_requests() -> None:
    """The C#, PowerShell and Azure CLI examples (not run here: no .NET, pwsh or az on CI) use
    the same settings and the same request fields as the examples that are run."""
    text = DOC.read_text()
    for language in ("csharp", "powershell"):
        [code] = [c for lang, _, c in fenced_blocks(text) if lang == language]
        for needle in ("AzureWebJobsStorage", "WORKER_REQUESTS_QUEUE", "REPLY_QUEUE", "CHAT_ID"):
            assert needle in code, f"{language}: {needle}"
        for field in ("assistantCreate", "assistantPost", "userMessage", "replyTo", "requestId"):
            assert field in code, f"{language}: {field}"
    [az] = [c for lang, _, c in fenced_blocks(text) if lang == "sh" and "az storage" in c]
    bodies = re.findall(r'--content "(\{.*?\})"', az)
    assert len(bodies) == 2
    for body in bodies:
        # The shell's view of the body, with the variables given values.
        body = body.replace('\\"', '"').replace("$chat", "chat-42").replace("$replies", "r-q")
        message = parse_message(json.loads(body.replace("$post_id", "p-1")))
        assert isinstance(message, AssistantCreate | AssistantPost)
        assert message.request_id
        if isinstance(message, AssistantPost):
            assert message.reply_to == "r-q"


@pytest.mark.parametrize(("language", "encoding"), [("python", "none"), ("js", "base64")])
def test_approver_example_decides_through_the_queues(
    storage: StorageEnv,
    fake: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    language: str,
    encoding: str,
) -> None:
    """The approver example, run as printed, reads the toolApprovalRequired events of two
    posts from the reply queue (leaving the replies there), approves the mail to the allowed
    domain and denies the other, through the requests queue: the approved call runs once, the
    denied one never, and the audit names the approver."""
    monkeypatch.setenv(TOOL_LOG_ENV, str(tmp_path / "tools.jsonl"))
    tools = ToolLog(tmp_path / "tools.jsonl")
    fake.set_default(mail_bot)
    chat_id = f"approver-{language}-{storage.suffix}"
    reply_queue = f"replies-{storage.suffix}"
    path = example_path(language, tmp_path)
    path.write_text(producer_example(language, "approver"))
    settings = storage.settings(
        **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="mail-bot"),
        WORKER_MESSAGE_ENCODING=encoding,
    )
    env = {
        **example_env(storage, chat_id, reply_queue),
        "MAX_EVENTS": "2",
        "APPROVER": f"{language}-approver",
        "ALLOWED_DOMAIN": "example.com",
    }
    replies = ReplyQueue(storage, reply_queue)

    async def scenario() -> tuple[int, str, str, list[dict[str, Any]]]:
        async with serving(settings, approval_registry()):
            await storage.send(
                {"type": "assistantCreate", "id": chat_id, "approvalRequired": ["send_email"]}
            )
            for number, text in enumerate(["mail bo@example.com", "mail eve@elsewhere.org"]):
                await storage.send({"type": "assistantPost", "id": chat_id, "userMessage": text,
                                    "replyTo": reply_queue, "requestId": f"post-{number}"})  # fmt: skip
            code, out, err = await run_example(command(language, path), env, tmp_path)
            found = await replies.wait_for("assistantReply", 30, count=2) if code == 0 else []
            return code, out, err, found

    code, out, err, found = run(scenario())
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    decisions = [json.loads(line) for line in out.splitlines() if line.strip()]
    # The two posts' runs wait in the order the chat applied the posts, which queues do not
    # promise: each decision is checked against its own post below.
    assert sorted(d["approvals"][0]["approve"] for d in decisions) == [False, True]
    by_request = {reply["requestId"]: reply for reply in found}
    assert (
        by_request["post-0"]["content"] == "send_email: sent to bo@example.com: mail bo@example.com"
    )
    assert by_request["post-1"]["content"] == (
        "send_email: denied: eve@elsewhere.org is outside example.com"
    )
    assert tools.count() == {("send_email", "mail bo@example.com"): 1}
    rows = run(storage.partition(chat_id))
    audits = [(row["Approval"], row["ApprovalBy"]) for key, row in sorted(rows.items())
              if key.startswith("msg-") and row["Role"] == "Tool"]  # fmt: skip
    assert sorted(audits) == [
        ("approved", f"{language}-approver"),
        ("denied", f"{language}-approver"),
    ]
    assert run(storage.count(storage.requests_poison)) == 0


# --- the streaming consumers --------------------------------------------------------------------


def consumer_example(language: str) -> str:
    """The one block marked ```` ```LANGUAGE consumer ````."""
    found = [
        code
        for lang, info, code in fenced_blocks(DOC.read_text())
        if lang == language and "consumer" in info.split()
    ]
    assert len(found) == 1, f"expected one ```{language} consumer block in {DOC}, got {len(found)}"
    return found[0]


def consumer_path(language: str, tmp_path: Path) -> Path:
    if language == "js":
        (tmp_path / "node_modules").symlink_to(REPO_ROOT / "node_modules")
        return tmp_path / "consumer.mjs"
    return tmp_path / "consumer.py"


def check_streamed(out: str, err: str, answer: str) -> dict[str, Any]:
    """The consumer's last line: the text it put together is the reply's content."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"the consumer printed nothing; stderr:\n{err}"
    result: dict[str, Any] = json.loads(lines[-1])
    reply = result["reply"]
    assert reply["status"] == "completed"
    assert result["text"] == reply["content"] == answer
    assert result["held"] == reply["deltaCount"] >= 1
    assert answer in err.replace("\n", ""), "the text was shown as it came"
    return result


@pytest.mark.parametrize(
    ("language", "sink"), [("python", "queue"), ("python", "redis"), ("js", "queue")]
)
def test_streaming_consumer_puts_the_deltas_together(
    storage: StorageEnv, tmp_path: Path, redis_server: RedisServer, language: str, sink: str
) -> None:
    chat_id = f"docs-stream-{language}-{sink}-{storage.suffix}"
    reply_queue = f"sreplies-{storage.suffix}"
    path = consumer_path(language, tmp_path)
    path.write_text(consumer_example(language))
    redis = {"WORKER_STREAM_REDIS_URL": redis_server.url} if sink == "redis" else {}

    async def scenario() -> tuple[int, str, str]:
        async with FakeOpenAI(chunk_delay=0.05) as fake:
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo-bot"),
                WORKER_STREAM_INTERVAL_MS="50",
                **redis,
            )
            async with serving(settings):
                env = {**example_env(storage, chat_id, reply_queue), **redis}
                return await run_example(command(language, path), env, tmp_path)

    code, out, err = run(scenario())
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    result = check_streamed(out, err, ANSWER)
    assert result["held"] >= 2, "the answer came in several deltas"


@pytest.mark.slow
@pytest.mark.parametrize("language", ["python", "js"])
def test_streaming_consumer_through_a_worker_killed_mid_stream(
    storage: StorageEnv, tmp_path: Path, language: str
) -> None:
    """Worker A is SIGKILLed while it streams the answer; its post comes back to worker B,
    whose try streams the text again under the next attempt: the consumer keeps that attempt
    and ends with exactly the reply's content."""
    chat_id = f"docs-killed-{language}-{storage.suffix}"
    reply_queue = f"kreplies-{storage.suffix}"
    path = consumer_path(language, tmp_path)
    path.write_text(consumer_example(language))
    answer = " ".join(f"word{n:02d}" for n in range(30)) + "."
    with FakeOpenAI(chunk_delay=0.1).running_in_thread() as fake:
        fake.script("teller", [{"content": answer}, {"content": answer}])
        env = storage.env(
            **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="teller"),
            WORKER_STREAM_INTERVAL_MS="100",
            WORKER_VISIBILITY_TIMEOUT="3",
            WORKER_MAX_POLLING_INTERVAL="0.2",
        )
        consumer: subprocess.Popen[str] | None = None
        try:
            with WorkerProcess(env, tmp_path / "a.log") as first:
                first.wait_for_events("worker.started", 1, timeout=30)  # the queues exist
                consumer = subprocess.Popen(
                    command(language, path),
                    cwd=tmp_path,
                    env=example_env(storage, chat_id, reply_queue),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )

                def streaming() -> bool:
                    calls = [r for r in fake.requests if r.endpoint == "chat.create"]
                    started = calls[-1].first_token_at if calls else None
                    return started is not None and time.time() - started > 1.0

                wait_until(
                    streaming,
                    timeout=60,
                    what=lambda: f"A streaming the answer for a second; A's log:\n{first.tail()}",
                )
                first.kill()
            with WorkerProcess(env, tmp_path / "b.log"):
                out, err = consumer.communicate(timeout=EXAMPLE_TIMEOUT)
        finally:
            if consumer is not None and consumer.poll() is None:
                consumer.kill()
                consumer.communicate()
    assert consumer is not None and consumer.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    check_streamed(out, err, answer)
    assert fake.calls(endpoint="chat.create") == 2, "B's try streamed the answer again"
