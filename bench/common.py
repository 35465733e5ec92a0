"""What the benchmarks share: quiet logs, the machine, percentiles, Markdown tables, /proc.

Every benchmark module has a ``measure(...)`` function returning a ``Report`` (its Markdown
tables and a few headline numbers) and a ``main()`` for ``python -m bench.NAME``;
``bench.all`` (``make bench``) runs them all and writes ``bench/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Prepended to the user-agent of every storage client a benchmark builds for itself, so that
# its requests can be told from the worker's in Azurite's request log (bench.requests).
BENCH_USER_AGENT = "aw-bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Report:
    """What one benchmark measured: Markdown sections and the numbers a test can check."""

    title: str
    sections: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def add(self, text: str) -> None:
        self.sections.append(text.rstrip())

    def markdown(self) -> str:
        return f"## {self.title}\n\n" + "\n\n".join(self.sections) + "\n"


def quiet_logs() -> None:
    """Only errors from the worker's structlog loggers (benchmarks print tables)."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned."""
    rows = [[_cell(value) for value in row] for row in rows]
    align = [
        "---:" if rows and all(_numeric(row[i]) for row in rows) else "---"
        for i in range(len(headers))
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("x%").replace(",", ""))
    except ValueError:
        return text in ("-", "")
    return True


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    """The machine, for RESULTS.md: cores, memory, Python, load, date."""
    memory = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return "\n".join(
        [
            f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- nproc: {os.cpu_count()}, load average at start: {load}",
            f"- Python {platform.python_version()} ({platform.platform()})",
            "- memory (`free -h`):",
            "",
            "```",
            memory.rstrip(),
            "```",
        ]
    )


# -- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (its reaped children not included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (Azurite is node under a shell)."""
    total = 0.0
    for child in [pid, *descendants(pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(child)
    return total


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return found
    for child in children:
        found.append(int(child))
        found.extend(descendants(int(child)))
    return found


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmHWM``: peak RSS, ``VmRSS``: RSS now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy so far (``/proc/stat``): the
    other sessions' load shows in it too."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLOCK_TICKS


class Stopwatch:
    """Wall and CPU time of this process over a block."""

    def __enter__(self) -> Stopwatch:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
