"""Start-up (issue 7): ``assistant-worker run`` loads what a worker needs before its first
message and nothing else. The model SDK, Entra credentials, the metrics library, the tracing SDK
and aiohttp's web server load on first use (a model call, a credential, WORKER_HTTP_PORT, an
exporter), and no other subcommand's module is imported. Each check runs in a fresh
interpreter: this test process has imported everything already.
"""

import json
import os
import subprocess
import sys

from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv

# Packages that must not load before a worker needs them.
LAZY_PACKAGES = (
    "openai",
    "httpx",
    "azure.identity",
    "prometheus_client",
    "opentelemetry.sdk",
    "aiohttp.web",
    "schemas.export",
    # Loaded only when WORKER_MCP_SERVERS names a server.
    "mcp",
    "jsonschema",
    "redis",
)
# The modules of the other subcommands (and what only they use).
OTHER_COMMANDS = (
    "worker.cli.send",
    "worker.cli.state",
    "worker.cli.poison",
    "worker.cli.poison_commands",
    "worker.cli.chats",
    "worker.cli.demo",
    "worker.client.replies",
    "worker.client.stream",
    "worker.cli.watch",
    "worker.deadletters.operations",
    "worker.deadletters.reader",
    "worker.store.retention",
    "worker.devtools.demo",
)


def loaded_after(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter (no WORKER_*, OTEL_* or model settings from this
    one's environment: no exporter, no model endpoint); it prints one JSON object last."""
    unset = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "PYTHONPATH")
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("WORKER_", "OTEL_", "APPLICATIONINSIGHTS_")) and name not in unset
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _present(modules: object, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` are in ``modules`` (a list of module names)."""
    assert isinstance(modules, list)
    return [name for name in names if name in modules]


def test_parsing_run_imports_only_the_run_command() -> None:
    """Dispatching ``run`` imports its module and none of the other subcommands'."""
    out = loaded_after(
        "import json, sys\n"
        "from worker.cli.main import build_parser\n"
        "args = build_parser('run').parse_args(['run', '--burst'])\n"
        "print(json.dumps({'burst': args.burst, 'modules': sorted(sys.modules)}))\n"
    )
    assert out["burst"] is True
    assert _present(out["modules"], ("worker.cli.run",)) == ["worker.cli.run"]
    assert _present(out["modules"], OTHER_COMMANDS) == []
    assert _present(out["modules"], LAZY_PACKAGES) == []


def test_importing_the_cli_imports_no_subcommand() -> None:
    """``import worker.cli.main`` (the console script's first line) loads no SDK at all."""
    out = loaded_after(
        "import json, sys\n"
        "import worker.cli.main\n"
        "print(json.dumps({'modules': sorted(sys.modules)}))\n"
    )
    heavy = ("worker.cli.run", "azure.core", "pydantic", "aiohttp", *LAZY_PACKAGES)
    assert _present(out["modules"], heavy) == []
    assert _present(out["modules"], OTHER_COMMANDS) == []


def test_run_burst_on_empty_queues_loads_no_lazy_package(storage: StorageEnv) -> None:
    """The whole ``run --burst`` on empty queues, as the console script runs it (``main()`` on
    ``sys.argv``): exit 0, no lazy package nor other subcommand loaded, and the objects of the
    start-up imports frozen out of the cyclic GC (no final collections over them at exit)."""
    out = loaded_after(
        "import gc, json, sys\n"
        "sys.argv = ['assistant-worker', 'run', '--burst']\n"
        "from worker.cli.main import main\n"
        "code = main()\n"
        "print(json.dumps({'code': code, 'frozen': gc.get_freeze_count(),\n"
        "  'enabled': gc.isenabled(), 'modules': sorted(sys.modules)}))\n",
        storage.env(),
    )
    assert out["code"] == 0
    assert _present(out["modules"], LAZY_PACKAGES) == []
    assert _present(out["modules"], OTHER_COMMANDS) == []
    assert out["enabled"] is True
    assert isinstance(out["frozen"], int) and out["frozen"] > 10_000


def test_main_with_arguments_leaves_the_callers_gc_alone() -> None:
    """``main([...])`` (tests, embedding) neither disables nor freezes the caller's GC."""
    out = loaded_after(
        "import gc, json, sys\n"
        "from worker.cli.main import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps({'frozen': gc.get_freeze_count(), 'enabled': gc.isenabled()}))\n"
    )
    assert out == {"frozen": 0, "enabled": True}
