"""``make run``: Azurite (unless ``AzureWebJobsStorage`` is set) and the worker, in the foreground.

It sends one assistantCreate request as a producer would (the extension's payload), waits
for the worker to apply it, prints the chat's AssistantState, and keeps serving until Ctrl-C.
From another terminal, with the same environment, ``.venv/bin/assistant-worker send create ID``
and ``.venv/bin/assistant-worker state ID`` talk to it.
"""

import asyncio
import json
import os
import signal
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path

from handlers.query import get_state
from schemas import encode_body
from worker.app import open_app
from worker.devtools.azurite import REPO_ROOT, Azurite
from worker.logs import configure_logging
from worker.redact import Redactor
from worker.settings import DEV_STORAGE, Settings

DEFAULT_PORTS = (10000, 10001, 10002)
DEMO_TIMEOUT = 30.0


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


async def demo(settings: Settings) -> None:
    async with open_app(settings) as app:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, app.worker.stop)
        serving = asyncio.create_task(app.worker.run())

        chat_id = f"demo-{uuid.uuid4().hex[:8]}"
        request = {
            "id": chat_id,
            "instructions": "You are a helpful assistant. Answer in one sentence.",
            "chatStorageConnectionSetting": "AzureWebJobsStorage",
            "collectionName": "ChatState",
        }
        say(f"producer: sending the extension's create payload to '{settings.requests_queue}'")
        print(json.dumps(request, indent=2), flush=True)
        await app.broker.ensure_queues([settings.requests_queue])
        await app.broker.send(settings.requests_queue, encode_body(request, "base64"))

        store = await app.stores.get("AzureWebJobsStorage", "ChatState")
        deadline = loop.time() + DEMO_TIMEOUT
        state = await get_state(store, chat_id)
        while not state.exists and loop.time() < deadline and not serving.done():
            await asyncio.sleep(0.2)
            state = await get_state(store, chat_id)
        say(f"AssistantState of '{chat_id}' (what assistantQuery returns)")
        print(json.dumps(state.to_wire(), indent=2), flush=True)
        exe = Path(sys.executable).parent / "assistant-worker"
        say(
            "the worker keeps running; press Ctrl-C to stop. From another terminal:\n"
            f"    {exe} send create my-chat --instructions 'Be brief.'\n"
            f"    {exe} state my-chat\n"
            f"    {exe} poison list"
        )
        await serving


def main() -> int:
    with ExitStack() as stack:
        if not os.environ.get("AzureWebJobsStorage"):
            try:
                azurite = Azurite(location=REPO_ROOT / ".azurite", ports=DEFAULT_PORTS).start()
                connection = DEV_STORAGE
            except RuntimeError:
                # The default ports are taken (another emulator?): use free ones instead.
                azurite = Azurite(location=REPO_ROOT / ".azurite").start()
                connection = azurite.connection_string
            stack.callback(azurite.stop)
            os.environ["AzureWebJobsStorage"] = connection
            say(
                f"Azurite is up (queue port {azurite.queue_port}, table port {azurite.table_port}, data in .azurite/)"
            )
        settings = Settings.from_env()
        configure_logging(settings.log_format, Redactor(settings.secrets()))
        asyncio.run(demo(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
