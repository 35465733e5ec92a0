"""The command line as a user runs it: ``python -m worker ARGS`` in a process of its own."""

import asyncio
import os
import sys

from tests.support.azurite import REPO_ROOT


async def cli(env: dict[str, str], *args: str, within: float = 90) -> tuple[int, str, str]:
    """Run ``python -m worker ARGS`` with ``env``; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"{' '.join(args)} did not finish within {within} s:\n{out.decode()}\n{err.decode()}"
        ) from None
    return int(process.returncode or 0), out.decode(), err.decode()


def clean_env(**values: str) -> dict[str, str]:
    """The test process's environment without any model or storage configuration of its own."""
    drop = {"OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "AzureWebJobsStorage"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **values}
