"""Start-up: ``assistant-worker run --burst`` on empty queues, and what importing the CLI costs.

- ``run --burst``: a fresh process against Azurite whose work queues exist and are empty, from
  exec to exit (median of ``--runs``; one untimed run first creates the queues). Scale-from-zero
  waits on this.
- ``import worker.cli.main``: wall time of ``python -c "import worker.cli.main"`` minus that of
  ``python -c pass`` (median); the CLI loads a subcommand's module only when it runs.
- What ``run`` imports (``import worker.cli.main, worker.cli.run``): the same, and the heaviest
  of those imports by cumulative time from ``python -X importtime``.
- Which heavy packages the ``run`` path loads at all (``sys.modules`` after ``--burst``).

"before" is the tree of ``--before`` (default: the main issue 7 started from, taken with
``git archive`` into a temp folder and put first on ``PYTHONPATH``), "after" the work tree; their
runs are interleaved so that the machine's load hits both alike. Run:
``python -m bench.startup``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, VENV_BIN, Report, median, table
from worker.devtools.azurite import Azurite

# The main that issue 7 started from: the "before" of the start-up figures.
BEFORE_COMMIT = "ffe155c"
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
# What the ``run`` subcommand imports before it starts (its module, loaded on dispatch).
RUN_IMPORTS = "import worker.cli.main, worker.cli.run"
MODULES_PROBE = (
    "import sys, runpy; sys.argv=['assistant-worker', 'run', '--burst'];\n"
    "from worker.cli.main import main\n"
    "code = main()\n"
    "import json; print('MODULES ' + json.dumps(sorted(m for m in sys.modules)))\n"
    "raise SystemExit(code)\n"
)


def _env(connection: str, suffix: str, tree: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "OTEL_"))}
    env.update(
        {
            "AzureWebJobsStorage": connection,
            "WORKER_REQUESTS_QUEUE": f"sreq-{suffix}",
            "WORKER_RUNS_QUEUE": f"sruns-{suffix}",
            "WORKER_DEADLINES_QUEUE": f"sdl-{suffix}",
            "WORKER_LOG_FORMAT": "json",
        }
    )
    for name in ("OPENAI_API_KEY", "PYTHONPATH", "AZURE_OPENAI_ENDPOINT"):
        env.pop(name, None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)  # ahead of the editable install of the work tree
    return env


def _timed(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0) -> float:
    began = time.perf_counter()
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} exited {done.returncode}: {done.stderr[-2000:]}")
    return elapsed


def import_profile(env: dict[str, str], cwd: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(module with its nesting, self ms, cumulative ms) of ``RUN_IMPORTS``, the heaviest
    ``top`` by cumulative time."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", RUN_IMPORTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
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


def loaded_on_run(env: dict[str, str], cwd: Path) -> dict[str, bool]:
    """Which of ``HEAVY`` are in ``sys.modules`` after ``run --burst`` on empty queues."""
    done = subprocess.run(
        [sys.executable, "-c", MODULES_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    modules: set[str] = set()
    for line in done.stdout.splitlines():
        if line.startswith("MODULES "):
            modules = set(json.loads(line[len("MODULES ") :]))
    return {name: name in modules for name in HEAVY}


@contextlib.contextmanager
def tree_of(commit: str | None) -> Iterator[Path | None]:
    """The source tree of ``commit`` (``git archive``, read-only) in a temp folder; None for
    the work tree."""
    if commit is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        archive = subprocess.run(
            ["git", "archive", commit, "worker", "handlers", "schemas"],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=60,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, timeout=60, check=True)
        yield Path(folder)


def measure(runs: int = 5, top: int = 15, before: str | None = BEFORE_COMMIT) -> dict[str, Any]:
    """The start-up figures of the work tree ("after") and of ``before`` (a commit; None:
    none), runs interleaved so that the machine's load hits both alike."""
    cli = str(VENV_BIN / "assistant-worker")
    python = sys.executable
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        trees: dict[str, Path | None] = {"after": None}
        if before is not None:
            # Not a git checkout, or the commit is unknown: no "before".
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                trees["before"] = stack.enter_context(tree_of(before))
        azurite = stack.enter_context(Azurite())
        samples: dict[str, dict[str, list[float]]] = {
            name: {"burst": [], "bare": [], "import": [], "run_import": []} for name in trees
        }
        envs = {
            name: _env(azurite.connection_string, uuid.uuid4().hex[:8], tree)
            for name, tree in trees.items()
        }
        cwds = {name: tree or REPO_ROOT for name, tree in trees.items()}
        for name in trees:
            _timed([cli, "run", "--burst"], envs[name], cwds[name])  # creates the queues
        for _ in range(runs):
            for name in trees:
                env, cwd = envs[name], cwds[name]
                samples[name]["burst"].append(_timed([cli, "run", "--burst"], env, cwd))
                samples[name]["bare"].append(_timed([python, "-c", "pass"], env, cwd))
                samples[name]["import"].append(
                    _timed([python, "-c", "import worker.cli.main"], env, cwd)
                )
                samples[name]["run_import"].append(_timed([python, "-c", RUN_IMPORTS], env, cwd))
        for name in trees:
            results[name] = {
                "run_burst_s": median(samples[name]["burst"]),
                "run_burst_all_s": samples[name]["burst"],
                "python_bare_s": median(samples[name]["bare"]),
                "import_cli_s": median(samples[name]["import"]) - median(samples[name]["bare"]),
                "import_run_s": median(samples[name]["run_import"]) - median(samples[name]["bare"]),
                "top_imports": import_profile(envs[name], cwds[name], top),
                "loaded_on_run": loaded_on_run(envs[name], cwds[name]),
            }
    results["before_commit"] = before if "before" in results else None
    return results


def report(results: dict[str, Any]) -> Report:
    current = results["after"]
    baseline = results.get("before")
    out = Report("Start-up (`run --burst` on empty queues, importing the CLI)")
    if baseline:
        out.add(
            f"before: commit `{results['before_commit']}` (extracted with `git archive`), after: "
            "the work tree; the runs of both are interleaved on the same Azurite."
        )
    rows = []
    for key, label in (
        ("run_burst_s", "`assistant-worker run --burst`, empty queues (median)"),
        ("import_cli_s", "`import worker.cli.main` (median, minus bare `python -c pass`)"),
        ("import_run_s", f"`{RUN_IMPORTS}` (median, minus bare `python -c pass`)"),
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
        rows = [
            (f"`{module}`", f"{self_ms:.1f}", f"{cumulative:.1f}")
            for module, self_ms, cumulative in profile["top_imports"]
        ]
        out.add(
            f"`python -X importtime -c '{RUN_IMPORTS}'`, heaviest by cumulative time "
            f"({name}):\n\n" + table(["module", "self ms", "cumulative ms"], rows)
        )
    out.numbers = {
        "run_burst_s": current["run_burst_s"],
        "import_cli_s": current["import_cli_s"],
        "import_run_s": current["import_run_s"],
        "before_run_burst_s": baseline["run_burst_s"] if baseline else None,
        "before_import_cli_s": baseline["import_cli_s"] if baseline else None,
    }
    return out


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (median)")
    parser.add_argument("--before", default=BEFORE_COMMIT, help="commit of the 'before' figures")
    parser.add_argument("--no-before", action="store_true", help="measure the work tree only")
    args = parser.parse_args()
    results = measure(args.runs, before=None if args.no_before else args.before)
    print(report(results).markdown())


if __name__ == "__main__":
    main()
