"""The offline end-to-end demo (``make run`` / ``assistant-worker demo``).

Azurite (unless ``AzureWebJobsStorage`` is set), the fake OpenAI server scripted as the
weather bot of the Assistants docs (unless ``OPENAI_API_KEY`` or ``AZURE_OPENAI_ENDPOINT`` is
set: then the real service answers), the worker, and a producer that creates the assistant
with the extension's payload, posts the question with ``stream: true``, prints the
conversation as it happens (the answer word by word, as the model writes it), the reply's
status, and the counts of the final ``AssistantState`` (its messages were shown already); then,
unless ``--once``, the commands that reach the same worker and storage from another terminal.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from handlers.query import get_state
from schemas import encode_body
from worker.app import App, open_app
from worker.client.replies import wait_for_reply
from worker.client.stream import QueueEvents, follow
from worker.config.redact import Redactor
from worker.config.settings import DEV_STORAGE, Settings
from worker.devtools.azurite import REPO_ROOT, Azurite
from worker.observability.logs import configure_logging
from worker.store.layout import ChatMessage
from worker.testing import FakeOpenAI

QUESTION = "What's the weather like right now in my favorite city?"
INSTRUCTIONS = (
    "You are a weather bot. Use the provided functions to answer questions about the weather."
)
DEFAULT_PORTS = (10000, 10001, 10002)
REPLY_TIMEOUT = 120.0


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def describe(message: ChatMessage, names: dict[str, str]) -> str:
    """One line of the conversation, as a person reads it."""
    if message.tool_calls:
        calls = json.loads(message.tool_calls)
        for call in calls:
            names[call["id"]] = call["functionName"]
        asked = ", ".join(f"{c['functionName']}({c['functionArguments']})" for c in calls)
        return f"[Assistant] calls {asked}"
    if message.role == "Tool":
        return f"[Tool]      {names.get(message.name or '', 'tool')} -> {message.content}"
    return f"[{message.role}]".ljust(12) + message.content


class StreamedAnswer:
    """Streamed text waiting to be printed, on the ``[Assistant]`` line."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        self.started = False

    def __call__(self, text: str) -> None:
        self._pending.append(text)

    def take(self) -> str:
        text, self._pending = "".join(self._pending), []
        if text and not self.started:
            self.started = True
            return "[Assistant] " + text
        return text


async def show_conversation(
    app: App, chat_id: str, done: asyncio.Event, answer: StreamedAnswer | None = None
) -> None:
    """Print each new message of the chat as the worker stores it; with ``answer``, the
    answers are streamed: their text is printed as it comes, not when stored. The text taken
    before a read of the chat was written after every message that read returns but the
    answer: printing it after them keeps the conversation in order."""
    store = await app.stores.get("AzureWebJobsStorage", "ChatState")
    shown = 0
    names: dict[str, str] = {}
    while True:
        finished = done.is_set()
        streamed = answer.take() if answer is not None else ""
        for message in await store.read_messages(chat_id):
            if message.index > shown:
                final = message.role == "Assistant" and not message.tool_calls
                if not (answer is not None and final):
                    print(describe(message, names), flush=True)
                shown = message.index
        if streamed:
            sys.stdout.write(streamed)
            sys.stdout.flush()
        if finished:
            if answer is not None and answer.started:
                print(flush=True)
            return
        await asyncio.sleep(0.1)


async def run_demo(
    settings: Settings, *, api: str, question: str, keep_serving: bool, storage_line: str | None
) -> int:
    async with open_app(settings) as app:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, app.worker.stop)
        serving = asyncio.create_task(app.worker.run())
        chat_id = f"weather-{uuid.uuid4().hex[:8]}"
        replies = f"demo-replies-{uuid.uuid4().hex[:8]}"
        await app.broker.ensure_queues([settings.requests_queue, replies])
        try:
            reply = await converse(
                app, settings, serving, chat_id, replies, api=api, question=question
            )
        finally:
            # The producer's reply queue was for this conversation only.
            with contextlib.suppress(Exception):
                await app.broker.queue(replies).client.delete_queue()
        if reply is None and serving.done():
            return 1
        store = await app.stores.get("AzureWebJobsStorage", "ChatState")
        say(f"AssistantState of '{chat_id}' (what assistantQuery returns; `state` prints it whole)")
        for line in state_summary((await get_state(store, chat_id)).to_wire()):
            print(line, flush=True)
        if keep_serving:
            say("the worker keeps running; Ctrl-C stops it. From another terminal:")
            for line in follow_ups(chat_id, storage_line):
                print(f"    {line}", flush=True)
            await serving
        else:
            app.worker.stop()
            await serving
        return 0 if reply is not None and reply["status"] == "completed" else 1


async def converse(
    app: App,
    settings: Settings,
    serving: "asyncio.Task[None]",
    chat_id: str,
    replies: str,
    *,
    api: str,
    question: str,
) -> dict[str, Any] | None:
    """The producer's side: create the assistant, post the question, print the conversation
    as the worker stores it and the reply; the reply (None if none came in time)."""
    create = {"id": chat_id, "instructions": INSTRUCTIONS, "api": api,
              "chatStorageConnectionSetting": "AzureWebJobsStorage", "collectionName": "ChatState"}  # fmt: skip
    say(f"producer: create the assistant (the extension's payload, Base64, api={api})")
    print(json.dumps(create), flush=True)
    await app.broker.send(settings.requests_queue, encode_body(create, "base64"))
    store = await app.stores.get("AzureWebJobsStorage", "ChatState")
    while not (await get_state(store, chat_id)).exists:
        if serving.done():
            return None  # the worker stopped (its error is in the log above)
        await asyncio.sleep(0.2)

    streamed = api != "assistants"  # the legacy Assistants API does not stream
    request_id = f"demo-{chat_id}"
    post = {"id": chat_id, "userMessage": question, "chatModel": settings.chat_model,
            "replyTo": replies, "requestId": request_id, "stream": streamed}  # fmt: skip
    say(
        "producer: post the question"
        + (" (stream: true)" if streamed else "")
        + "; the conversation as it happens:"
    )
    await app.broker.send(settings.requests_queue, encode_body(post))
    done = asyncio.Event()
    answer = StreamedAnswer() if streamed else None
    printer = asyncio.create_task(show_conversation(app, chat_id, done, answer))
    reply: dict[str, Any] | None
    if answer is not None:
        events = QueueEvents(app.broker, replies, request_id)
        reply = (await follow(events, within=REPLY_TIMEOUT, on_text=answer)).reply
    else:
        reply = await wait_for_reply(
            app.broker, replies, request_id=request_id, within=REPLY_TIMEOUT
        )
    done.set()
    await printer
    if reply is None:
        say(f"no reply within {REPLY_TIMEOUT:g} s")
    else:
        say(f"assistantReply on '{replies}': status {reply['status']}")
        if answer is None or not answer.started or reply["status"] != "completed":
            # A streamed answer was printed as it came; the reply's content is the same text.
            print(reply.get("content") or reply.get("error"), flush=True)
    return reply


def state_summary(state: dict[str, Any]) -> list[str]:
    """The state's counts, without its messages (the conversation was shown as it happened)."""
    lines = [
        f"exists: {str(state['exists']).lower()}, totalMessages: {state['totalMessages']}, "
        f"totalTokens: {state['totalTokens']} (the latest model call's, as the extension counts)"
    ]
    for summary in state.get("runs", []):
        usage = summary.get("usage") or {}
        total = (
            f", usage.totalTokens: {usage['totalTokens']} (all its model calls)" if usage else ""
        )
        lines.append(f"run {summary['runId']}: {summary['status']}{total}")
    return lines


def follow_ups(chat_id: str, storage_line: str | None) -> list[str]:
    """Commands that reach this demo's worker and storage from another terminal."""
    exe = Path(sys.executable).parent / "assistant-worker"
    return [
        *([storage_line] if storage_line else []),
        f"{exe} send post {chat_id} 'And tomorrow?' --wait",
        f"{exe} state {chat_id}",
        f"{exe} poison list",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assistant-worker demo", description=__doc__)
    parser.add_argument("--api", choices=["chat", "responses", "assistants"], default="chat")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--once", action="store_true", help="exit after the answer")
    args = parser.parse_args(argv)
    return demo(api=args.api, question=args.question, keep_serving=not args.once)


def demo(*, api: str, question: str, keep_serving: bool) -> int:
    """Set up what is missing (storage, model, tools), then run the demo."""
    with ExitStack() as stack:
        # What another terminal must set to reach the same storage (None: nothing).
        storage_line: str | None = None
        if not os.environ.get("AzureWebJobsStorage"):
            try:
                azurite = Azurite(location=REPO_ROOT / ".azurite", ports=DEFAULT_PORTS).start()
                os.environ["AzureWebJobsStorage"] = DEV_STORAGE
            except RuntimeError:
                # The default ports are taken (another emulator?): use free ones. The
                # connection string holds only Azurite's well-known development key.
                azurite = Azurite(location=REPO_ROOT / ".azurite").start()
                os.environ["AzureWebJobsStorage"] = azurite.connection_string
                storage_line = f"export AzureWebJobsStorage='{azurite.connection_string}'"
            stack.callback(azurite.stop)
            say(f"Azurite is up (queue port {azurite.queue_port}, table port {azurite.table_port})")
        else:
            storage_line = "# with the same AzureWebJobsStorage as this terminal"
        if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("AZURE_OPENAI_ENDPOINT")):
            # The offline model writes about ten words a second, as a real one does.
            fake = stack.enter_context(
                FakeOpenAI(scenario="weather", chunk_delay=0.1).running_in_thread()
            )
            os.environ["OPENAI_BASE_URL"] = fake.base_url
            os.environ["OPENAI_API_KEY"] = "sk-offline-demo"
            os.environ.setdefault("CHAT_MODEL_DEPLOYMENT_NAME", "weather-bot")
            say(f"the offline model (fake OpenAI server, weather bot) is at {fake.base_url}")
        else:
            say("using the real model service from OPENAI_API_KEY / AZURE_OPENAI_ENDPOINT")
        # Deltas every 100 ms: the answer shows word by word (the default is 250 ms).
        os.environ.setdefault("WORKER_STREAM_INTERVAL_MS", "100")
        tools = [m for m in os.environ.get("WORKER_TOOLS", "").split(",") if m.strip()]
        os.environ["WORKER_TOOLS"] = ",".join(dict.fromkeys([*tools, "worker.devtools.weather"]))
        settings = Settings.from_env()
        # The conversation is the show: the worker's own log keeps to warnings and errors.
        configure_logging(settings.log_format, Redactor(settings.secrets()), level=logging.WARNING)
        return asyncio.run(
            run_demo(
                settings,
                api=api,
                question=question,
                keep_serving=keep_serving,
                storage_line=storage_line,
            )
        )


if __name__ == "__main__":
    sys.exit(main())
