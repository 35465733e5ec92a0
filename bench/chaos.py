"""``make chaos``: a soak of the worker under crashes, model faults and a storage outage.

Azurite's queue and table services run as separate processes (``SplitAzurite``); the fake
model server runs as its own process with the stateless script of ``bench.chaos_model`` and
seeded random faults (429 with Retry-After, 500, dropped connections) on a share of the model
calls, streaming its answers word by word; several ``assistant-worker run`` processes share the queues, with the tools of
``bench.chaos_tools``; a producer process (``bench.chaos_producer``) creates chats and posts to
them back to back across the three model APIs (half of the chats with ``stream: true``: their
deltas go to the reply queues, or with ``--stream-sink redis`` to a Redis server the soak
starts), answers external tool calls (partial, concurrent and duplicated submits) and decides
the calls that wait for approval (approved or denied at random; sent once, twice, one call at a
time, or by two approvers who disagree). Meanwhile a random worker is SIGKILLed every few
seconds and restarted, the table service is stopped once for a while and restarted on its
data, and the MCP server the chats use (``tests/support/mcp_server.py``, its own process) is
killed once for a few seconds and started again on its port.
Webhooks are on (``--no-webhooks`` turns them off): each worker serves ``POST
/webhooks/openai`` on a port of its own, and the fake model sends a signed webhook to them in
turn (as a load balancer would) when a background response ends, dropping and duplicating a
seeded share of them (``--webhook-faults``); a delivery to a killed worker is retried on
another.

When the faults stop the soak waits (bounded) until every post has its final reply and the
work queues are empty, stops everything and audits every chat (``bench.chaos_audit``): the
table it prints says what held; the exit code is 1 when any line failed.

    python -m bench.chaos --chats 100 --posts 2000 --workers 3 --kill-every 5 \\
        --fault-rate 0.2 --outage 60 --mcp-outage 8 --seed 1
    python -m bench.chaos --short          # about 2 minutes (the version in `make test`)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue.aio import QueueServiceClient

from bench.chaos_audit import Collected, Line, audit, failed, render
from bench.chaos_model import (
    APPROVAL_TOOL,
    EXTERNAL_DEFINITION,
    LOCAL_TOOL,
    MCP_SERVER,
    pick_approval_mode,
    pick_plan,
)
from bench.chaos_tools import TOOL_LOG_ENV
from tests.support.mcp_server import McpServerProcess
from worker.devtools.azurite import REPO_ROOT, SplitAzurite, die_with_parent
from worker.devtools.redis_server import RedisServer
from worker.streaming.redis_streams import RedisReader, stream_key

APIS = ("chat", "responses", "assistants")
REQUESTS_QUEUE = "chaos-requests"
RUNS_QUEUE = "chaos-runs"
DEADLINES_QUEUE = "chaos-deadlines"
TABLE = "ChaosChats"
REPLY_QUEUES = 4
MODEL = "chaos-bot"
AUDIT_USER_AGENT = "chaos-audit"
# Seconds the chaos goes on after the schedule for the strict chats' last posts.
STRICT_GRACE = 120.0
# The MCP server's bearer token (a secret of the workers: it must never reach their logs).
MCP_TOKEN = "chaos-mcp-token-0123456789"
# The workers' webhook signing secret (a test value, not a secret).
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"the chaos soak's webhook signing key").decode()


@dataclass(frozen=True)
class Options:
    chats: int
    posts: int
    workers: int
    kill_every: float
    fault_rate: float
    outage: float
    mcp_outage: float
    seed: int
    rate: float
    run_timeout: float
    visibility: float
    quiet_timeout: float
    strict_share: float
    max_outstanding: int
    out: Path | None
    keep: bool
    stream_sink: str = "queue"
    webhooks: bool = True
    # Share of webhooks dropped, and share duplicated (each).
    webhook_faults: float = 0.1

    @property
    def soak_deadline(self) -> float:
        """The longest the chaos phase may take (sending, outage): bounded whatever happens
        (the producer slows down to what the workers answer, assumed at least 1 post/s)."""
        return max(self.posts / self.rate * 3, self.posts / 1.0) + self.outage + 120


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--short", action="store_true", help="the ~2 minute version")
    parser.add_argument("--chats", type=int)
    parser.add_argument("--posts", type=int)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, metavar="SECONDS")
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--outage", type=float, metavar="SECONDS")
    parser.add_argument(
        "--mcp-outage", type=float, metavar="SECONDS", help="how long the MCP server is down"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, metavar="POSTS_PER_S", help="producer's send rate")
    parser.add_argument("--run-timeout", type=float, metavar="SECONDS", help="WORKER_RUN_TIMEOUT")
    parser.add_argument(
        "--visibility", type=float, metavar="SECONDS", help="WORKER_VISIBILITY_TIMEOUT"
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for quiet once the faults stop",
    )
    parser.add_argument(
        "--strict-share",
        type=float,
        default=0.2,
        help="share of chats whose posts wait for the reply before",
    )
    parser.add_argument(
        "--max-outstanding",
        type=int,
        help="the producer waits while this many posts have no final reply (0: never)",
    )
    parser.add_argument(
        "--stream-sink",
        choices=["queue", "redis"],
        help="where streamed chats' deltas go (default: queue with --short, else redis)",
    )
    parser.add_argument(
        "--no-webhooks", action="store_true", help="poll background responses, no webhooks"
    )
    parser.add_argument(
        "--webhook-faults",
        type=float,
        default=0.1,
        help="share of webhooks the fake drops, and share it duplicates (default 0.1)",
    )
    parser.add_argument("--out", type=Path, help="folder for logs and data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the folder even on success")
    args = parser.parse_args(argv)
    short = args.short
    defaults = {
        "chats": (20, 100),
        "posts": (150, 2000),
        "kill_every": (4.0, 5.0),
        "outage": (15.0, 60.0),
        "mcp_outage": (4.0, 8.0),
        "rate": (3.0, 8.0),
        "run_timeout": (120.0, 300.0),
        "visibility": (10.0, 20.0),
        "quiet_timeout": (150.0, 420.0),
        "max_outstanding": (40, 80),
    }
    values = {
        name: getattr(args, name) if getattr(args, name) is not None else pair[0 if short else 1]
        for name, pair in defaults.items()
    }
    if values["posts"] < values["chats"]:
        parser.error("--posts must be at least --chats (every chat gets a first post)")
    return Options(
        chats=int(values["chats"]),
        posts=int(values["posts"]),
        workers=args.workers,
        kill_every=float(values["kill_every"]),
        fault_rate=args.fault_rate,
        outage=float(values["outage"]),
        mcp_outage=float(values["mcp_outage"]),
        seed=args.seed,
        rate=float(values["rate"]),
        run_timeout=float(values["run_timeout"]),
        visibility=float(values["visibility"]),
        quiet_timeout=float(values["quiet_timeout"]),
        strict_share=args.strict_share,
        max_outstanding=int(values["max_outstanding"]),
        out=args.out,
        keep=args.keep,
        stream_sink=args.stream_sink or ("queue" if short else "redis"),
        webhooks=not args.no_webhooks,
        webhook_faults=args.webhook_faults,
    )


# -- the plan ------------------------------------------------------------------------------


def make_plan(options: Options) -> dict[str, Any]:
    """Chats, their posts (plan, submit mode and approval mode each) and the order the
    producer sends them."""
    rng = random.Random(options.seed)
    counts = [1] * options.chats
    for _ in range(options.posts - options.chats):
        counts[rng.randrange(options.chats)] += 1
    strict_every = round(1 / options.strict_share) if options.strict_share > 0 else 0
    chats = []
    positions: list[tuple[float, str, int]] = []
    for i in range(options.chats):
        chat_id = f"chaos{options.seed}-{i:03d}"
        strict = bool(strict_every) and i % strict_every == strict_every - 1
        posts = []
        for n in range(counts[i]):
            plan, mode = pick_plan(rng)
            posts.append(
                {
                    "requestId": f"post-{chat_id}-{n:03d}",
                    "tag": f"c{i:03d}p{n:03d}",
                    "plan": plan,
                    "mode": mode,
                    "approval_mode": pick_approval_mode(rng, plan),
                }
            )
        chats.append(
            {
                "id": chat_id,
                "api": APIS[i % len(APIS)],
                # Half the chats of each API stream (the assistants API answers them with the
                # reply alone).
                "stream": (i // len(APIS)) % 2 == 0,
                "strict": strict,
                "together": rng.random() < 0.5,
                "reply_queue": f"chaos-replies-{i % REPLY_QUEUES}",
                "tools": [LOCAL_TOOL, APPROVAL_TOOL, EXTERNAL_DEFINITION],
                "mcp_servers": [MCP_SERVER],
                "approval_required": [APPROVAL_TOOL],
                "posts": posts,
            }
        )
        # New chats keep arriving during the first 60 % of the sending; strict chats send their
        # later posts themselves, one after another.
        start = rng.uniform(0, 0.6)
        positions.append((start, chat_id, 0))
        if not strict:
            later = sorted(rng.uniform(start, 1.0) for _ in range(counts[i] - 1))
            positions.extend((t, chat_id, n) for n, t in enumerate(later, start=1))
    positions.sort()
    return {
        "table": TABLE,
        "requests_queue": REQUESTS_QUEUE,
        "reply_queues": [f"chaos-replies-{n}" for n in range(min(REPLY_QUEUES, options.chats))],
        "rate": options.rate,
        "max_outstanding": options.max_outstanding,
        "chats": chats,
        "schedule": [[chat_id, n] for _, chat_id, n in positions],
    }


# -- processes -----------------------------------------------------------------------------


class Child:
    """A child process in its own session, its output in a log file; killed for sure."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeModel:
    """``python -m worker.testing.fake_openai`` with the chaos script and seeded faults."""

    def __init__(self, options: Options, log: Path, webhook_urls: Sequence[str] = ()) -> None:
        rate = options.fault_rate
        rules: list[dict[str, Any]] = []
        if rate > 0:
            # Three rules drawing independently: together about `rate` of the model calls.
            for kind, share, extra in (
                ("429", 0.4, {"retry_after": 1}),
                ("500", 0.35, {}),
                ("drop", 0.25, {}),
            ):
                rules.append(
                    {
                        "kind": kind,
                        "rate": rate * share,
                        "seed": options.seed * 10 + len(rules),
                        **extra,
                    }
                )
        cmd = [
            sys.executable,
            "-m",
            "worker.testing.fake_openai",
            "--port",
            "0",
            "--scenario-callable",
            "bench.chaos_model:chaos_scenario",
            "--background-delay",
            "0.2",
            # Streamed answers come a word every 30 ms: a kill can land in the middle of one.
            "--chunk-delay",
            "0.03",
        ]
        for rule in rules:
            cmd += ["--fault", json.dumps(rule)]
        for url in webhook_urls:
            cmd += ["--webhook-url", url]
        if webhook_urls:
            cmd += [
                "--webhook-secret",
                WEBHOOK_SECRET,
                "--webhook-drop-rate",
                str(options.webhook_faults),
                "--webhook-duplicate-rate",
                str(options.webhook_faults),
                "--webhook-seed",
                str(options.seed),
            ]
        self.log = log
        self._log_file: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.url = self._read_url(timeout=30)

    def _read_url(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        found: list[str] = []
        stdout = self.proc.stdout

        def read() -> None:
            line = stdout.readline()
            if line:
                found.append(line.decode())
            # Drain the rest so the pipe never fills up.
            for _ in stdout:
                pass

        threading.Thread(target=read, name="fake-openai-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the fake model did not start; see {self.log}")
            time.sleep(0.05)
        return str(json.loads(found[0])["url"])

    def admin(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log_file.close()


@dataclass
class Soak:
    options: Options
    folder: Path
    azurite: SplitAzurite | None = None
    fake: FakeModel | None = None
    mcp: McpServerProcess | None = None
    mcp_down_seconds: float = 0.0
    redis: RedisServer | None = None
    workers: list[Child | None] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    producer: Child | None = None
    kills: int = 0
    outage_seconds: float = 0.0
    began: float = field(default_factory=time.monotonic)
    # Each worker slot's webhook port (kept across its restarts: the fake sends to them).
    webhook_ports: list[int] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[chaos {time.monotonic() - self.began:6.1f}s] {text}", flush=True)

    # -- set-up ----------------------------------------------------------------------

    def worker_env(self, slot: int) -> dict[str, str]:
        assert self.azurite is not None and self.fake is not None and self.mcp is not None
        webhooks = (
            {
                "WORKER_WEBHOOK_SECRETS": WEBHOOK_SECRET,
                "WORKER_HTTP_PORT": str(self.webhook_ports[slot]),
                "WORKER_HTTP_HOST": "127.0.0.1",
            }
            if self.options.webhooks
            else {}
        )
        return {
            **webhooks,
            **self.mcp.env(MCP_SERVER),
            "AzureWebJobsStorage": self.azurite.connection_string,
            "WORKER_REQUESTS_QUEUE": REQUESTS_QUEUE,
            "WORKER_RUNS_QUEUE": RUNS_QUEUE,
            "WORKER_DEADLINES_QUEUE": DEADLINES_QUEUE,
            "OPENAI_BASE_URL": self.fake.url + "/v1",
            "OPENAI_API_KEY": "sk-chaos",
            "CHAT_MODEL_DEPLOYMENT_NAME": MODEL,
            "WORKER_TOOLS": "bench.chaos_tools",
            TOOL_LOG_ENV: str(self.folder / "tools.jsonl"),
            "WORKER_RUN_TIMEOUT": str(self.options.run_timeout),
            "WORKER_VISIBILITY_TIMEOUT": str(self.options.visibility),
            "WORKER_MAX_POLLING_INTERVAL": "1",
            "WORKER_SHUTDOWN_GRACE": "5",
            "WORKER_LOG_FORMAT": "json",
            "WORKER_STREAM_INTERVAL_MS": "100",
            **({"WORKER_STREAM_REDIS_URL": self.redis.url} if self.redis is not None else {}),
        }

    def start_worker(self, slot: int) -> None:
        self.generations[slot] += 1
        name = f"worker-{slot}-{self.generations[slot]:03d}"
        self.workers[slot] = Child(
            name,
            [sys.executable, "-m", "worker", "run"],
            self.worker_env(slot),
            self.folder / f"{name}.log",
        )

    def set_up(self, plan: dict[str, Any]) -> None:
        self.azurite = SplitAzurite(location=self.folder / "azurite", die_with_parent=True).start()
        self.say(
            f"azurite queue :{self.azurite.queue_port}, table :{self.azurite.table_port} "
            f"(separate processes)"
        )
        self.fake = FakeModel(self.options, self.folder / "fake-openai.log")
        if self.options.stream_sink == "redis":
            self.redis = RedisServer().start()
            self.say(f"streamed chats' deltas go to Redis at {self.redis.url}")
        self.say(f"fake model at {self.fake.url}, faults on {self.options.fault_rate:.0%} of calls")
        # Its executions go to the tool log of the local tools: the audit counts them alike.
        self.mcp = McpServerProcess(
            self.folder, token=MCP_TOKEN, tool_log=self.folder / "tools.jsonl"
        ).start()
        self.say(f"MCP server '{MCP_SERVER}' at {self.mcp.url}")
        if self.options.webhooks:
            self.webhook_ports = [free_port() for _ in range(self.options.workers)]
        urls = [f"http://127.0.0.1:{port}/webhooks/openai" for port in self.webhook_ports]
        self.fake = FakeModel(self.options, self.folder / "fake-openai.log", urls)
        self.say(f"fake model at {self.fake.url}, faults on {self.options.fault_rate:.0%} of calls")
        if urls:
            self.say(
                f"webhooks to {len(urls)} workers in turn, "
                f"{self.options.webhook_faults:.0%} dropped and {self.options.webhook_faults:.0%} "
                "duplicated"
            )
        self.workers = [None] * self.options.workers
        self.generations = [0] * self.options.workers
        for slot in range(self.options.workers):
            self.start_worker(slot)
        config = {
            **plan,
            "connection_string": self.azurite.connection_string,
            "journal": str(self.folder / "producer.jsonl"),
            "status": str(self.folder / "producer-status.json"),
            "deadline": time.time() + self.options.soak_deadline + self.options.quiet_timeout + 60,
        }
        config_path = self.folder / "producer-config.json"
        config_path.write_text(json.dumps(config, indent=1))
        self.producer = Child(
            "producer",
            [sys.executable, "-m", "bench.chaos_producer", str(config_path)],
            {},
            self.folder / "producer.log",
        )
        self.say(
            f"{self.options.workers} workers, producer: {self.options.chats} chats, "
            f"{self.options.posts} posts at {self.options.rate:g}/s"
        )

    # -- the chaos -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        path = self.folder / "producer-status.json"
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def kill_one(self, rng: random.Random) -> None:
        slot = rng.randrange(len(self.workers))
        worker = self.workers[slot]
        if worker is not None:
            killed_at = time.time()
            worker.kill()
            self.kills += 1
            with (self.folder / "kills.jsonl").open("a") as journal:
                journal.write(json.dumps({"t": killed_at, "pid": worker.proc.pid, "slot": slot}))
                journal.write("\n")
        self.start_worker(slot)

    def chaos(self, rng: random.Random) -> None:
        """Kills and the outage while the producer sends; returns when both are over."""
        assert self.azurite is not None and self.producer is not None
        deadline = time.monotonic() + self.options.soak_deadline
        next_kill = time.monotonic() + self.options.kill_every
        outage: str = "pending" if self.options.outage > 0 else "done"
        mcp_outage: str = "pending" if self.options.mcp_outage > 0 else "done"
        mcp_down_at = 0.0
        down_at = 0.0
        posts = self.options.posts
        last_report = 0.0
        schedule_done_at = 0.0
        while True:
            now = time.monotonic()
            status = self.status()
            if not self.producer.running:
                self.say(f"the producer exited ({self.producer.proc.returncode}); see producer.log")
                break
            if self.options.kill_every > 0 and now >= next_kill:
                self.kill_one(rng)
                next_kill = now + self.options.kill_every * rng.uniform(0.6, 1.4)
            if mcp_outage == "pending" and int(status.get("sent_posts", 0)) >= posts // 4:
                assert self.mcp is not None
                self.mcp.kill()
                self.say(f"MCP server killed for {self.options.mcp_outage:g} s")
                mcp_down_at = now
                mcp_outage = "down"
            elif mcp_outage == "down" and now - mcp_down_at >= self.options.mcp_outage:
                assert self.mcp is not None
                self.mcp.launch()  # its start-up takes seconds: the chaos goes on meanwhile
                mcp_outage = "starting"
            elif mcp_outage == "starting" and self.mcp is not None and self.mcp.answers():
                self.mcp_down_seconds = time.monotonic() - mcp_down_at
                self.say(f"MCP server back after {self.mcp_down_seconds:.1f} s")
                mcp_outage = "done"
            if outage == "pending" and int(status.get("sent_posts", 0)) >= posts // 2:
                self.say(f"table service stopped for {self.options.outage:g} s")
                stopping = time.monotonic()
                self.azurite.stop_table()
                self.say(
                    f"table service stopped ({self.azurite.table_last_stop}, "
                    f"{time.monotonic() - stopping:.1f} s)"
                )
                down_at = now
                outage = "down"
            elif outage == "down" and now - down_at >= self.options.outage:
                self.azurite.start_table()
                self.outage_seconds = time.monotonic() - down_at
                self.say(f"table service back after {self.outage_seconds:.0f} s")
                outage = "done"
            if now - last_report >= 10:
                last_report = now
                self.say(
                    f"sent {status.get('sent_posts', 0)}/{posts} posts, "
                    f"{status.get('replied', 0)} replied, {status.get('submits', 0)} submits, "
                    f"{self.kills} kills"
                )
            if status.get("schedule_done") and not schedule_done_at:
                schedule_done_at = now
            # The strict chats send their last posts after the schedule: chaos goes on for
            # them a while (a strict chat whose reply never comes would wait forever).
            sending_over = status.get("done_sending") or (
                schedule_done_at and now - schedule_done_at > STRICT_GRACE
            )
            if outage == "done" and mcp_outage == "done" and sending_over:
                break
            if now > deadline:
                self.say("the chaos phase ran past its deadline: going on to the audit")
                break
            time.sleep(0.1)
        if self.azurite is not None and not self.azurite.table_running:
            self.azurite.start_table()
            self.outage_seconds = time.monotonic() - down_at
        if mcp_outage != "done" and self.mcp is not None:
            if not self.mcp.running:
                self.mcp.start()
            self.mcp_down_seconds = time.monotonic() - mcp_down_at

    def stop_faults(self) -> list[dict[str, Any]]:
        """Model faults off; returns the rules with their counters."""
        assert self.fake is not None
        rules = list(self.fake.admin("GET", "/admin/faults").get("faults", []))
        self.fake.admin("DELETE", "/admin/faults")
        for slot, worker in enumerate(self.workers):
            if worker is None or not worker.running:
                self.start_worker(slot)
        return rules

    def wait_quiet(self) -> bool:
        """Until every post sent has its final reply, no request waits and no run is active.

        (The runs and deadlines queues may still hold delayed messages: watchdogs due at
        deadlines, steps of runs that moved on. They are counted in the audit, not awaited.)
        """
        deadline = time.monotonic() + self.options.quiet_timeout
        last_report = 0.0
        quiet_checks = 0
        while time.monotonic() < deadline:
            status = self.status()
            sent, replied = int(status.get("sent_posts", 0)), int(status.get("replied", 0))
            if status.get("done_sending") and replied >= sent:
                busy = asyncio.run(self.busy())
                quiet_checks = 0 if busy else quiet_checks + 1
                if quiet_checks >= 3:
                    return True
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                self.say(f"waiting for quiet: {replied}/{sent} posts replied")
            time.sleep(1.0)
        return False

    async def busy(self) -> str:
        """What still goes on: requests queued, runs active (empty when quiet)."""
        assert self.azurite is not None
        conn = self.azurite.connection_string
        async with QueueServiceClient.from_connection_string(
            conn, user_agent=AUDIT_USER_AGENT, retry_total=1
        ) as service:
            try:
                client = service.get_queue_client(REQUESTS_QUEUE)
                props = await client.get_queue_properties()
                queued = int(props.approximate_message_count or 0)
            except AzureError as error:
                return f"requests queue unreadable: {type(error).__name__}"
        if queued:
            return f"{queued} requests queued"
        async with TableServiceClient.from_connection_string(
            conn, user_agent=AUDIT_USER_AGENT, retry_total=1
        ) as tables:
            try:
                active = [
                    row
                    async for row in tables.get_table_client(TABLE).query_entities(
                        "RowKey eq @key and ActiveRunId ne @none",
                        parameters={"key": "state", "none": ""},
                    )
                ]
            except AzureError as error:
                return f"table unreadable: {type(error).__name__}"
        return f"{len(active)} runs active" if active else ""

    async def queue_depths(self) -> dict[str, int]:
        """Messages left on the worker's own queues (visible or delayed)."""
        assert self.azurite is not None
        depths = {}
        async with QueueServiceClient.from_connection_string(
            self.azurite.connection_string, user_agent=AUDIT_USER_AGENT, retry_total=1
        ) as service:
            for name in (REQUESTS_QUEUE, RUNS_QUEUE, DEADLINES_QUEUE):
                try:
                    props = await service.get_queue_client(name).get_queue_properties()
                    depths[name] = int(props.approximate_message_count or 0)
                except ResourceNotFoundError:
                    depths[name] = 0
                except AzureError:
                    depths[name] = -1
        return depths

    async def redis_events(
        self, plan: dict[str, Any], journal: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The deltas of the streamed chats' posts, read from their Redis streams (the
        replies are on the reply queues, in the journal)."""
        assert self.redis is not None
        reader = RedisReader(self.redis.url)
        events: list[dict[str, Any]] = []
        try:
            for chat in plan["chats"]:
                if not chat.get("stream"):
                    continue
                for post in chat["posts"]:
                    key = stream_key(chat["id"], post["requestId"])
                    for _, event in await reader.read(key, block=0.01, count=100_000):
                        if event.get("type") == "assistantDelta":
                            events.append(event)
        finally:
            await reader.close()
        return events

    def stop_all(self) -> None:
        for child in [self.producer, *self.workers]:
            if child is not None:
                child.kill()
        if self.fake is not None:
            self.fake.kill()
        if self.mcp is not None:
            self.mcp.kill()
        if self.redis is not None:
            self.redis.stop()
        if self.azurite is not None:
            self.azurite.stop()

    # -- the audit -------------------------------------------------------------------

    async def collect(self, plan: dict[str, Any], faults: list[dict[str, Any]]) -> Collected:
        assert self.azurite is not None
        conn = self.azurite.connection_string
        problems: list[str] = []
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        async with TableServiceClient.from_connection_string(
            conn, user_agent=AUDIT_USER_AGENT
        ) as tables:
            try:
                async for row in tables.get_table_client(TABLE).list_entities():
                    rows.setdefault(str(row["PartitionKey"]), {})[str(row["RowKey"])] = dict(row)
            except AzureError as error:
                problems.append(f"reading table {TABLE}: {type(error).__name__}: {error}")
        letters: list[dict[str, Any]] = []
        leftovers: list[dict[str, Any]] = []
        async with QueueServiceClient.from_connection_string(
            conn, user_agent=AUDIT_USER_AGENT
        ) as queues:
            names = [q.name async for q in queues.list_queues()]
            for name in names:
                into = letters if name.endswith("-poison") else leftovers
                if not (name.endswith("-poison") or name in plan["reply_queues"]):
                    continue
                for body in await drain(queues, name):
                    value = decode(body)
                    into.append(value if value is not None else {"raw": body[:500]})
        journal = read_jsonl(self.folder / "producer.jsonl")
        tool_log = read_jsonl(self.folder / "tools.jsonl")
        events = Counter[str]()
        delays: dict[str, set[str]] = {}
        token_leaks = 0
        for log in self.folder.glob("worker-*.log"):
            token_leaks += sum(
                1 for line in log.read_text(errors="replace").splitlines() if MCP_TOKEN in line
            )
            for entry in read_jsonl(log):
                name = str(entry.get("event"))
                events[name] += 1
                if name == "webhook.received":
                    events[f"webhook:{entry.get('outcome')}"] += 1
                request_id = entry.get("request_id")
                if entry.get("type") != "assistantPost" or not isinstance(request_id, str):
                    continue
                cause = None
                reason = str(entry.get("reason") or "")
                if name == "message.retried" and "does not exist" in reason:
                    cause = "create wait"
                elif name in ("message.parked", "storage.unavailable"):
                    cause = "outage"
                elif name == "message.retried":
                    cause = "retry"
                elif int(entry.get("attempt") or 1) > 1 and name == "message.completed":
                    cause = "redelivered"
                if cause:
                    delays.setdefault(request_id, set()).add(cause)
        depths = await self.queue_depths()
        streamed = await self.redis_events(plan, journal) if self.redis is not None else []
        calls = 0
        webhooks: dict[str, int] = {}
        if self.fake is not None:
            with contextlib.suppress(OSError, ValueError):
                calls = int(self.fake.admin("GET", "/admin/calls").get("calls", 0))
            with contextlib.suppress(OSError, ValueError):
                webhooks = webhook_summary(self.fake.admin("GET", "/admin/webhooks"))
        return Collected(
            plan=plan,
            rows=rows,
            journal=journal,
            leftover_events=[*leftovers, *streamed],
            tool_log=tool_log,
            dead_letters=letters,
            worker_events=events,
            faults=faults,
            model_calls=calls,
            kills=self.kills,
            outage_seconds=self.outage_seconds,
            mcp_down_seconds=self.mcp_down_seconds,
            token_leaks=token_leaks,
            wall_seconds=time.monotonic() - self.began,
            reads_failed=problems,
            queue_depths=depths,
            delays={key: frozenset(value) for key, value in delays.items()},
            killed={int(k["pid"]): float(k["t"]) for k in read_jsonl(self.folder / "kills.jsonl")},
            webhooks=webhooks,
        )


def webhook_summary(answer: Any) -> dict[str, int]:
    """What the fake's webhooks came to (``GET /admin/webhooks``)."""
    deliveries = [d for d in answer.get("deliveries", []) if isinstance(d, dict)]
    return {
        "events": len(deliveries),
        "dropped": sum(1 for d in deliveries if d.get("dropped")),
        "duplicated": sum(1 for d in deliveries if d.get("duplicated") and not d.get("dropped")),
        "delivered": sum(1 for d in deliveries if d.get("delivered")),
        "retried": sum(1 for d in deliveries if len(d.get("attempts") or []) > 1),
        "lost": sum(1 for d in deliveries if not d.get("dropped") and not d.get("delivered")),
    }


async def drain(service: QueueServiceClient, name: str) -> list[str]:
    """Every message of a queue (received and deleted: nothing else reads it any more)."""
    client = service.get_queue_client(name)
    bodies: list[str] = []
    for _ in range(1000):  # bounded: 32,000 messages at most
        page = [
            m
            async for m in client.receive_messages(
                messages_per_page=32, max_messages=32, visibility_timeout=300
            )
        ]
        if not page:
            break
        for message in page:
            bodies.append(str(message.content))
            with contextlib.suppress(AzureError):
                await client.delete_message(message)
    return bodies


def decode(body: str) -> dict[str, Any] | None:
    text = body.strip()
    if not text.startswith("{"):
        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            text = base64.b64decode(text, validate=True).decode("utf-8")
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            entries.append(value)
    return entries


@contextlib.contextmanager
def terminating_on_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt (SIGINT too when the shell started
    the soak with it ignored, as a background job), so that every child is cleaned up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signals = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_soak(options: Options) -> tuple[list[Line], Path]:
    """The whole soak; returns the audit lines and the folder holding the logs."""
    folder = options.out or Path(tempfile.mkdtemp(prefix="chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    plan = make_plan(options)
    soak = Soak(options, folder)
    rng = random.Random(options.seed + 1)
    with terminating_on_signals():
        try:
            soak.set_up(plan)
            soak.chaos(rng)
            faults = soak.stop_faults()
            soak.say("faults stopped; waiting for every post to be answered")
            quiet = soak.wait_quiet()
            soak.say("quiet" if quiet else "not quiet by the deadline: auditing anyway")
            assert soak.producer is not None
            soak.producer.terminate(grace=10)
            for worker in soak.workers:
                if worker is not None:
                    worker.terminate(grace=10)
            collected = asyncio.run(soak.collect(plan, faults))
        finally:
            soak.stop_all()
    lines = audit(collected)
    summary = [
        {
            "check": line.name,
            "value": line.value,
            "expected": line.expected,
            "result": line.result,
            "failures": line.failures,
        }
        for line in lines
    ]
    (folder / "audit.json").write_text(json.dumps(summary, indent=1))
    return lines, folder


def audit_only(folder: Path) -> list[Line]:
    """The audit of an earlier soak's folder (its Azurite data, journal and logs)."""
    plan = json.loads((folder / "producer-config.json").read_text())
    options = parse_args(["--out", str(folder)])
    soak = Soak(options, folder)
    # On a copy: reading the queues takes their messages off.
    with tempfile.TemporaryDirectory(prefix="chaos-audit-") as scratch:
        data = Path(scratch) / "azurite"
        shutil.copytree(folder / "azurite", data)
        with terminating_on_signals():
            try:
                soak.azurite = SplitAzurite(location=data, die_with_parent=True).start()
                collected = asyncio.run(soak.collect(plan, []))
            finally:
                soak.stop_all()
    return audit(collected)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--audit-only"]:
        if len(args) != 2:
            print("usage: python -m bench.chaos --audit-only FOLDER", file=sys.stderr)
            return 2
        lines = audit_only(Path(args[1]))
        print(render(lines))
        return 1 if failed(lines) else 0
    options = parse_args(args)
    try:
        lines, folder = run_soak(options)
    except KeyboardInterrupt:
        print("chaos: interrupted; every process stopped", file=sys.stderr)
        return 130
    print()
    print(render(lines))
    bad = failed(lines)
    print()
    print(f"logs and data: {folder}")
    if not bad and not options.keep and options.out is None:
        shutil.rmtree(folder, ignore_errors=True)
        print("(removed: the audit passed; --keep keeps them)")
    print("chaos: audit FAILED" if bad else "chaos: audit passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
