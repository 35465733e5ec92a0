"""Start-up: ``assistant-worker run --burst`` on empty queues, and what importing the CLI costs.

- ``run --burst``: a fresh process against Azurite whose work queues exist and are empty, from
  exec to exit (median of ``--runs``; one untimed run first creates the queues). Scale-from-zero
  waits on this.
- ``import worker.cli.main``: wall time of ``python -c "import worker.cli.main"`` minus that of
  ``python -c pass`` (median), and the heaviest imports by cumulative time from
  ``python -X importtime``.
- Which heavy packages the ``run`` path loads at all (``sys.modules`` after ``--burst``).

``--save-baseline FILE`` writes the figures as JSON; ``--baseline FILE`` prints them beside the
current ones ("before" and "after"). Run: ``python -m bench.startup``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, VENV_BIN, Report, median, table
from worker.devtools.azurite import Azurite

BASELINE = REPO_ROOT / "bench" / "startup_baseline.json"
# Packages a worker needs only on some paths (a backend's first call, Entra credentials,
# WORKER_HTTP_PORT, an OTLP exporter): they should not load before the first message.
HEAVY = (
    "openai",
    "openai.types.responses",
    "openai.types.beta",
    "azure.identity",
    "prometheus_client",
    "opentelemetry",
    "opentelemetry.sdk",
    "aiohttp.web",
    "pydantic",
    "azure.storage.queue",
    "azure.data.tables",
)
MODULES_PROBE = (
    "import sys, runpy; sys.argv=['assistant-worker', 'run', '--burst'];\n"
    "from worker.cli.main import main\n"
    "code = main()\n"
    "import json; print('MODULES ' + json.dumps(sorted(m for m in sys.modules)))\n"
    "raise SystemExit(code)\n"
)


def _env(connection: str, suffix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "OTEL_"))}
    env.update(
        {
            "AzureWebJobsStorage": connection,
            "WORKER_REQUESTS_QUEUE": f"sreq-{suffix}",
            "WORKER_RUNS_QUEUE": f"sruns-{suffix}",
            "WORKER_DEADLINES_QUEUE": f"sdl-{suffix}",
            "WORKER_LOG_FORMAT": "json",
            "PYTHONDONTWRITEBYTECODE": "",
        }
    )
    env.pop("OPENAI_API_KEY", None)
    return env


def _timed(cmd: list[str], env: dict[str, str], timeout: float = 60.0) -> float:
    began = time.perf_counter()
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False
    )
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} exited {done.returncode}: {done.stderr[-2000:]}")
    return elapsed


def import_profile(top: int = 15) -> list[tuple[str, float, float]]:
    """(module with its nesting, self ms, cumulative ms) of ``import worker.cli.main``, the
    heaviest ``top`` by cumulative time."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import worker.cli.main"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=True,
    )
    rows: list[tuple[str, float, float]] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append(("  " * depth + name.strip(), int(self_us) / 1000, int(cumulative_us) / 1000))
    rows.sort(key=lambda row: row[2], reverse=True)
    return rows[:top]


def loaded_on_run(env: dict[str, str]) -> dict[str, bool]:
    """Which of ``HEAVY`` are in ``sys.modules`` after ``run --burst`` on empty queues."""
    done = subprocess.run(
        [sys.executable, "-c", MODULES_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    modules: set[str] = set()
    for line in done.stdout.splitlines():
        if line.startswith("MODULES "):
            modules = set(json.loads(line[len("MODULES ") :]))
    return {name: name in modules for name in HEAVY}


def measure(runs: int = 5, top: int = 15) -> dict[str, Any]:
    """The start-up figures of the current tree."""
    cli = str(VENV_BIN / "assistant-worker")
    python = sys.executable
    suffix = uuid.uuid4().hex[:8]
    with Azurite() as azurite:
        env = _env(azurite.connection_string, suffix)
        _timed([cli, "run", "--burst"], env)  # creates the queues; not timed
        burst = [_timed([cli, "run", "--burst"], env) for _ in range(runs)]
        loaded = loaded_on_run(env)
    bare = [_timed([python, "-c", "pass"], os.environ.copy()) for _ in range(runs)]
    imports = [_timed([python, "-c", "import worker.cli.main"], os.environ.copy()) for _ in range(runs)]  # fmt: skip
    return {
        "run_burst_s": median(burst),
        "run_burst_all_s": burst,
        "python_bare_s": median(bare),
        "import_cli_s": median(imports) - median(bare),
        "top_imports": import_profile(top),
        "loaded_on_run": loaded,
    }


def report(current: dict[str, Any], baseline: dict[str, Any] | None) -> Report:
    out = Report("Start-up (`run --burst` on empty queues, importing the CLI)")
    rows = []
    for key, label in (
        ("run_burst_s", "`assistant-worker run --burst`, empty queues (median)"),
        ("import_cli_s", "`import worker.cli.main` (median, minus bare `python -c pass`)"),
        ("python_bare_s", "bare `python -c pass`"),
    ):
        before = f"{baseline[key]:.2f}" if baseline else "-"
        rows.append((label, before, f"{current[key]:.2f}"))
    out.add(table(["seconds", "before", "after"], rows))
    loaded_rows = [
        (f"`{name}`", _yes(baseline["loaded_on_run"].get(name)) if baseline else "-", _yes(on))
        for name, on in current["loaded_on_run"].items()
    ]
    out.add(
        "Loaded by `run --burst` on empty queues (no model call, no HTTP port, no exporter):\n\n"
        + table(["package", "before", "after"], loaded_rows)
    )
    for name, profile in (("before", baseline), ("after", current)):
        if profile is None:
            continue
        rows = [(f"`{module}`", f"{self_ms:.1f}", f"{cumulative:.1f}")
                for module, self_ms, cumulative in profile["top_imports"]]  # fmt: skip
        out.add(
            f"`python -X importtime -c 'import worker.cli.main'`, heaviest by cumulative time "
            f"({name}):\n\n" + table(["module", "self ms", "cumulative ms"], rows)
        )
    out.numbers = {
        "run_burst_s": current["run_burst_s"],
        "import_cli_s": current["import_cli_s"],
        "before_run_burst_s": baseline["run_burst_s"] if baseline else None,
    }
    return out


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--save-baseline", type=Path, help="write the figures as JSON here")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="'before' figures (JSON)")
    args = parser.parse_args()
    current = measure(args.runs)
    if args.save_baseline:
        args.save_baseline.write_text(json.dumps(current, indent=1) + "\n")
    baseline = json.loads(args.baseline.read_text()) if args.baseline.is_file() else None
    print(report(current, baseline if not args.save_baseline else None).markdown())


if __name__ == "__main__":
    main()
