"""A hostile producer against a real worker process on Azurite (SPEC §6, last row).

Bodies built to hurt (random bytes, deep nesting, thousands of keys, 60 KB emoji strings, NUL
bytes, numbers JSON cannot hold, over-long ids, thousands of unknown tool names), plain and
Base64, interleaved with valid creates: every hostile one is dead-lettered on its first
attempt with a reason a person can act on, every valid one is applied, and ``/healthz``
answers within a second throughout (polled while the worker handles the batch).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import StorageEnv
from tests.support.processes import WorkerProcess, table_rows, wait_until
from tests.support.scrape import Samples, parse_metrics, total

pytestmark = pytest.mark.slow

# A queue message holds 64 KiB of UTF-8 (Azurite checks it as Azure does).
QUEUE_MESSAGE_BYTES = 64 * 1024
# /healthz must answer within this many seconds at every probe, whatever is being handled.
HEALTH_BOUND = 1.0
# Seconds the whole batch may take (it takes a few on an idle machine).
BATCH_TIMEOUT = 90.0
# A reason a person reads: the envelope keeps at most this many characters of it.
MAX_REASON_CHARS = 2048
VALID_CREATES = 24
LAG = "assistant_worker_event_loop_lag_seconds"


@dataclass(frozen=True)
class Hostile:
    """One hostile body and a fragment its dead letter's reason must contain."""

    label: str
    body: str
    fragment: str


def _b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _keys(count: int) -> list[str]:
    """``count`` distinct keys of one or two printable ASCII characters (short, so that
    thousands fit a queue message)."""
    alphabet = [chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\']
    keys = list(alphabet) + [a + b for a in alphabet for b in alphabet]
    return keys[:count]


def hostile_bodies(table: str, rng: random.Random) -> list[Hostile]:
    """The hostile producer's bodies, each plain and (when it fits) Base64."""
    create = {"type": "assistantCreate", "collectionName": table}
    # 12,000 unknown names of two characters (repeating: a name may be given twice).
    pairs = [a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "0123456789"]
    unknown_tools = [pairs[n % len(pairs)] for n in range(12_000)]
    emoji = "\U0001f600"
    bodies = [
        # Random bytes: printable junk in plain text, raw bytes (not UTF-8) in Base64.
        Hostile(
            "random-text",
            "".join(chr(rng.randrange(0x21, 0x7F)) for _ in range(40_000)),
            "neither JSON nor Base64",
        ),
        Hostile("random-bytes-b64", _b64(rng.randbytes(40_000)), "not UTF-8"),
        Hostile("deep-arrays", "[" * 30_000 + "]" * 30_000, "nested too deeply"),
        Hostile("deep-objects-b64", _b64('{"a":' * 8_000 + "1" + "}" * 8_000), "nested too deeply"),
        # 9,000 keys in one object (more do not fit a queue message); its "id" is 0.
        Hostile(
            "9000-keys",
            json.dumps(
                {"type": "assistantCreate", **dict.fromkeys(_keys(9_000), 0)},
                separators=(",", ":"),
            ),
            "field 'id'",
        ),
        # 10,000 keys over many objects, each a tool the schema refuses.
        Hostile(
            "10000-keys-in-tools",
            json.dumps(
                {
                    **create,
                    "id": "keys",
                    "tools": [dict.fromkeys(_keys(40), 0) for _ in range(250)],
                },
                separators=(",", ":"),
            ),
            "field 'tools",
        ),
        # 60 KB of emoji where a short name is expected.
        Hostile(
            "emoji-type",
            json.dumps({"type": emoji * 16_000}, ensure_ascii=False),
            "unknown message type",
        ),
        Hostile(
            "emoji-type-b64",
            _b64(json.dumps({"type": emoji * 11_000}, ensure_ascii=False)),
            "unknown message type",
        ),
        Hostile(
            "emoji-id",
            json.dumps({**create, "id": emoji * 15_000}, ensure_ascii=False),
            "field 'id'",
        ),
        Hostile(
            "emoji-tools",
            json.dumps(
                {**create, "id": "emoji-tools", "tools": [emoji * 60 + f"{n}" for n in range(240)]},
                ensure_ascii=False,
            ),
            "unknown tool",
        ),
        Hostile("nul-in-id", json.dumps({**create, "id": "a\u0000b"}), "field 'id'"),
        Hostile(
            "raw-nul-b64",
            _b64('{"type":"assistantCreate","id":"a\x00b"}'),
            "not valid Base64-decoded JSON",
        ),
        Hostile(
            "inf-temperature",
            json.dumps(create)[:-1] + ',"id":"inf","temperature":1e999999}',
            "1e999999",
        ),
        Hostile(
            "inf-extra-field-b64",
            _b64(json.dumps(create)[:-1] + ',"id":"inf-extra","seed":1e999999}'),
            "1e999999",
        ),
        Hostile("nan", json.dumps(create)[:-1] + ',"id":"nan","seed":NaN}', "NaN"),
        Hostile(
            "5000-digits",
            json.dumps(create)[:-1] + ',"id":"digits","maxTokens":' + "9" * 5_000 + "}",
            "digits",
        ),
        Hostile(
            "5000-digits-b64",
            _b64(json.dumps(create)[:-1] + ',"id":"digits-b64","seed":-' + "7" * 5_000 + "}"),
            "digits",
        ),
        Hostile("300-char-id", json.dumps({**create, "id": "x" * 300}), "field 'id'"),
        Hostile(
            "unknown-tools",
            json.dumps({**create, "id": "tools", "tools": unknown_tools}, separators=(",", ":")),
            "unknown tool(s) 'a0', 'a1', 'a2', 'a3', 'a4' and 255 more;",
        ),
        Hostile(
            "unknown-tools-b64",
            _b64(
                json.dumps(
                    {**create, "id": "tools-b64", "tools": [f"{n:040d}" for n in range(1_100)]},
                    separators=(",", ":"),
                )
            ),
            "unknown tool",
        ),
        Hostile("small-invalid", json.dumps({"type": "assistantNope"}), "unknown message type"),
    ]
    for hostile in bodies:
        size = len(hostile.body.encode("utf-8"))
        assert size <= QUEUE_MESSAGE_BYTES, f"{hostile.label} is {size} bytes"
    return bodies


def valid_creates(storage: StorageEnv) -> dict[str, str]:
    """Chat id -> body: small valid creates, every third one Base64."""
    bodies = {}
    for n in range(VALID_CREATES):
        chat_id = f"valid-{n:02d}"
        body = json.dumps(
            {
                "type": "assistantCreate",
                "id": chat_id,
                "requestId": f"{storage.suffix}-{chat_id}",
                "collectionName": storage.table,
                "instructions": f"You are assistant {chat_id}.",
            }
        )
        bodies[chat_id] = _b64(body) if n % 3 == 2 else body
    return bodies


async def _send(storage: StorageEnv, bodies: list[str]) -> list[str]:
    """Send the bodies in order; their message ids."""
    async with storage.queues() as service:
        client = service.get_queue_client(storage.requests_queue)
        ids = []
        for body in bodies:
            sent = await client.send_message(body)
            ids.append(str(sent.id))
        return ids


async def _drain(storage: StorageEnv, queue: str) -> list[dict[str, Any]]:
    """Every message of a queue, read and deleted, as JSON (plain or Base64)."""
    letters: list[dict[str, Any]] = []
    async with storage.queues() as service:
        client = service.get_queue_client(queue)
        while True:
            page = [
                m
                async for m in client.receive_messages(
                    messages_per_page=32, max_messages=32, visibility_timeout=30
                )
            ]
            if not page:
                return letters
            for message in page:
                text = str(message.content)
                if not text.startswith("{"):
                    text = base64.b64decode(text).decode("utf-8")
                letters.append(json.loads(text))
                await client.delete_message(message)


@dataclass
class HealthProbe:
    """Polls ``/healthz`` from a thread until stopped; records each answer's latency."""

    url: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=HEALTH_BOUND * 3) as response:
                    status = response.status
            except (urllib.error.URLError, TimeoutError) as error:
                self.failures.append(f"{type(error).__name__}: {error}")
                status = 0
            took = time.monotonic() - started
            self.latencies.append(took)
            if status != 200 or took > HEALTH_BOUND:
                self.failures.append(f"/healthz {status} after {took:.2f} s")
            self._stop.wait(0.05)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._poll, name="healthz-probe", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=HEALTH_BOUND * 4)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False


def test_a_hostile_producer_cannot_stall_a_worker(storage: StorageEnv, tmp_path: Path) -> None:
    rng = random.Random(13)
    hostile = hostile_bodies(storage.table, rng)
    valid = valid_creates(storage)
    # Interleaved: a valid create between hostile bodies, the rest after them.
    entries: list[tuple[str, str]] = []
    valid_items = list(valid.items())
    for n, item in enumerate(hostile):
        entries.append((f"hostile:{item.label}", item.body))
        if n < len(valid_items):
            chat_id, body = valid_items[n]
            entries.append((f"valid:{chat_id}", body))
    entries.extend((f"valid:{c}", b) for c, b in valid_items[len(hostile) :])

    env = storage.env(
        WORKER_HTTP_PORT="0", WORKER_HTTP_HOST="127.0.0.1", WORKER_TOOLS="tests.support.runs"
    )
    with WorkerProcess(env, tmp_path / "worker.log") as worker:
        [started] = worker.wait_for_events("http.started", 1, timeout=30)
        base = f"http://127.0.0.1:{started['port']}"
        wait_until(lambda: _ready(base + "/readyz"), timeout=20, what="/readyz 200")
        probe = HealthProbe(base + "/healthz")
        with probe.running():
            ids = asyncio.run(_send(storage, [body for _, body in entries]))
            labels = dict(zip(ids, (label for label, _ in entries), strict=True))

            def settled() -> bool:
                if probe.failures:
                    raise AssertionError(
                        f"/healthz did not answer within {HEALTH_BOUND} s: {probe.failures[:5]}; "
                        f"log tail:\n{worker.tail()}"
                    )
                handled = worker.events("message.dead_lettered") + worker.events(
                    "message.completed"
                )
                return len({e.get("message_id") for e in handled}) >= len(entries)

            wait_until(settled, timeout=BATCH_TIMEOUT, what=lambda: f"the batch; {worker.tail()}")
            metrics = parse_metrics(_get(base + "/metrics"))
        assert not probe.failures, probe.failures[:5]
        events = worker.events()

    letters = asyncio.run(_drain(storage, storage.requests_poison))
    by_label = {labels[letter["deadLetter"]["messageId"]]: letter for letter in letters}
    problems = []
    for item in hostile:
        letter = by_label.get(f"hostile:{item.label}")
        if letter is None:
            problems.append(f"{item.label}: not dead-lettered")
            continue
        info = letter["deadLetter"]
        if item.fragment not in info["reason"]:
            problems.append(f"{item.label}: reason {info['reason'][:300]!r}")
        if len(info["reason"]) > MAX_REASON_CHARS:
            problems.append(f"{item.label}: a reason of {len(info['reason'])} characters")
        if info["dequeueCount"] != 1:
            problems.append(f"{item.label}: dead-lettered on attempt {info['dequeueCount']}")
    extra = sorted(label for label in by_label if not label.startswith("hostile:"))
    assert not extra, f"valid requests dead-lettered: {extra}"
    assert not problems, "\n".join(problems)
    # No retry and no failed ack: each hostile body was handled once.
    names = {event.get("event") for event in events}
    assert "message.retried" not in names and "message.ack_failed" not in names

    rows = table_rows(storage, storage.table)
    missing = sorted(set(valid) - set(rows))
    assert not missing, f"valid creates not applied: {missing}"
    assert set(rows) == set(valid), f"unexpected chats: {sorted(set(rows) - set(valid))}"

    # The event loop never lagged a second (the monitor's histogram).
    assert total(metrics, f"{LAG}_count") > 0
    assert total(metrics, f"{LAG}_bucket", le="1.0") == total(metrics, f"{LAG}_count")
    assert not [e for e in events if e.get("event") == "event_loop.lagging"]
    _report(events, labels, probe, metrics)


def _report(
    events: list[dict[str, Any]], labels: dict[str, str], probe: HealthProbe, metrics: Samples
) -> None:
    """Handling time per body (``duration_ms`` of its outcome line), the slowest /healthz
    answer and the event loop's largest lag (a bucket bound), for the record (-s)."""
    lines = []
    for event in events:
        if event.get("event") in ("message.dead_lettered", "message.completed"):
            label = labels.get(str(event.get("message_id")), "?")
            lines.append(f"{label:32} {event.get('duration_ms'):>8} ms")
    print("\n".join(sorted(lines)))
    count = total(metrics, f"{LAG}_count")
    bounds = sorted(
        float(dict(key)["le"])
        for (name, key), seen in metrics.items()
        if name == f"{LAG}_bucket" and seen == count
    )
    print(
        f"/healthz: {len(probe.latencies)} probes, slowest {max(probe.latencies) * 1000:.1f} ms; "
        f"event loop: {count:.0f} lag samples, all <= {bounds[0]:g} s"
    )
