"""``make bench``: every benchmark with its short defaults; writes ``bench/RESULTS.md``.

Each benchmark also runs alone (``python -m bench.NAME --help``). ``--only NAME,...`` runs a
few; ``--out FILE`` writes elsewhere. A benchmark that fails is reported in the file (with its
error) and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import REPO_ROOT, Report, machine

RESULTS = REPO_ROOT / "bench" / "RESULTS.md"


def _benchmarks() -> dict[str, Callable[[], Report]]:
    from bench import (
        approvals,
        creates,
        latency,
        mcp,
        memory,
        open_conversations,
        profile,
        requests_per_run,
        scaleout,
        startup,
        streaming,
        webhooks,
    )

    return {
        "requests_per_run": lambda: requests_per_run.measure(history=200, runs=2),
        "approvals": lambda: approvals.measure(runs=3),
        "latency": lambda: latency.measure(),
        "creates": lambda: creates.measure(messages=300),
        "open_conversations": lambda: open_conversations.measure(posts=300),
        "webhooks": lambda: webhooks.measure(posts=300),
        "scaleout": lambda: scaleout.measure(posts=200),
        "startup": lambda: startup.report(startup.measure(runs=5)),
        "profile": lambda: profile.measure(chats=40),
        "memory": lambda: memory.measure(),
        "mcp": lambda: mcp.measure(),
        "streaming": lambda: streaming.measure(),
        "throughput": lambda: _module("throughput", "Throughput (creates; loop only)"),
        "runs": lambda: _module("runs", "Runs through the worker against the same turns by hand"),
    }


def _module(name: str, title: str) -> Report:
    """An older benchmark that prints its own table."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return Report(title, [f"`python -m bench.{name}`:", done.stdout.strip()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="comma-separated benchmark names")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    benchmarks = _benchmarks()
    names = args.only.split(",") if args.only else list(benchmarks)
    parts = [
        "# Benchmark results\n",
        "Written by `make bench` (`python -m bench.all`); every ratio is measured in the same "
        "run as its baseline. The machine is shared (other sessions' load shows in the "
        "absolute figures; the ratios are what to compare).\n",
        "## Machine\n\n" + machine() + "\n",
    ]
    failed = False
    for name in names:
        began = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            report = benchmarks[name]()
            text = report.markdown()
        except Exception:
            failed = True
            text = f"## {name}\n\nFAILED:\n\n```\n{traceback.format_exc()}```\n"
        text += f"\n_{name}: {time.monotonic() - began:.0f} s_\n"
        print(text, flush=True)
        parts.append(text)
        args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
