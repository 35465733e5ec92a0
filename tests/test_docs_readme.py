"""The README is a quick start a newcomer reads in five minutes, and everything it shows works:
``make run`` is run as printed and the conversation commands against the worker it leaves
serving; its JSON is what the worker reads and writes; its tool registers; its links lead
somewhere. (``make test`` is the command CI runs: ``.ci/run`` calls it.)
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from handlers.tools import load_tools
from schemas import parse_message
from schemas.decode import decode_body
from tests.support.azurite import REPO_ROOT
from tests.support.cli import clean_env
from tests.test_docs_getting_started import background, shell, wait_for
from tests.test_docs_producers import EVENTS, fenced_blocks

README = REPO_ROOT / "README.md"
MAX_WORDS = 1_500


def blocks(language: str) -> list[tuple[str, str]]:
    """The README's fenced blocks of ``language``: (info, code)."""
    return [
        (info.strip(), code)
        for lang, info, code in fenced_blocks(README.read_text())
        if lang == language
    ]


def test_the_readme_is_a_five_minute_read() -> None:
    """At most 1,500 words, code included: the rest lives in docs/ and ARCHITECTURE.md."""
    words = len(README.read_text().split())
    assert words <= MAX_WORDS, f"README.md has {words} words"


def test_every_link_of_the_readme_leads_somewhere() -> None:
    """Each relative link names a file or folder of the repository."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links to the docs"
    missing = [link for link in local if not (REPO_ROOT / link).exists()]
    assert missing == []


def test_the_json_of_the_readme_is_what_the_worker_reads_or_writes() -> None:
    """Requests parse as the worker parses them; events validate with every field present."""
    found = blocks("json")
    assert len(found) >= 3
    for _, code in found:
        payload = decode_body(code)
        event = EVENTS.get(str(payload.get("type")))
        if event is not None:
            assert set(payload) == set(event.model_validate(payload).to_wire())
        else:
            parse_message(payload)


def test_the_tool_of_the_readme_registers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tool module, as printed, is a WORKER_TOOLS module: its tool waits for approval and
    its parameters come from the type hints."""
    [(_, code)] = [(info, code) for info, code in blocks("python") if info == "tool"]
    (tmp_path / "readme_tools.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_tools(["readme_tools"])
    spec = registry.get("send_email")
    assert spec is not None and spec.approval
    [definition] = registry.definitions(["send_email"])
    assert set(definition["function"]["parameters"]["properties"]) == {"to", "subject"}
    sys.modules.pop("readme_tools", None)


@pytest.mark.slow
def test_make_run_then_the_conversation_commands(tmp_path: Path) -> None:
    """``make run`` as printed: the demo answers, then keeps serving; the README's commands,
    run from a second shell, reach that worker (with the ``export`` line the demo printed, if
    it had to take other ports)."""
    [(_, commands)] = [(info, code) for info, code in blocks("sh") if info == "conversation"]
    env = clean_env()
    env.pop("AzureWebJobsStorage", None)
    assert (
        subprocess.run(["make", "-n", "test"], cwd=REPO_ROOT, capture_output=True).returncode == 0
    )
    with background("make run", env, tmp_path / "make-run.log") as output:
        wait_for(output, "Ctrl-C stops it", within=240)
        demo = output()
        assert "status completed" in demo, demo
        exports = re.findall(r"^\s*(export AzureWebJobsStorage=.*)$", demo, re.MULTILINE)
        prefix = f"{exports[0]}\n" if exports else ""
        results = []
        for line in commands.strip().splitlines():
            done = shell(prefix + line, env)
            results.append(done)
            assert done.returncode == 0, f"{line}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    reply = json.loads(results[1].stdout)
    assert reply["status"] == "completed" and "70 degrees" in reply["content"]
    state = json.loads(results[2].stdout)
    assert state["id"] == "my-chat" and state["exists"] is True
