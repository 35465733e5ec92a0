"""The deployment files (deploy/) agree with the code.

There is no Docker daemon, Bicep compiler or cluster here (NOTES.md), so: the Kubernetes
manifests are parsed and checked field by field; the Bicep is read textually (its parameters,
variables, env entries and blocks); the Dockerfile is parsed into instructions. Values are
compared with what the code reads and defaults to (``worker.config.settings``), never with copies of
them. The slow test builds the wheel from exactly what the Dockerfile copies, installs it into
a fresh virtualenv as the image does, and runs the image's command as an unprivileged user
against Azurite.
"""

import ast
import asyncio
import fnmatch
import http.server
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.names import poison_queue_name
from tests.support.env import StorageEnv
from tests.support.processes import create_request
from worker.config.settings import SPECS, Settings, storage_connection

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KEDA = DEPLOY / "keda"
BICEP = DEPLOY / "containerapp.bicep"
BICEP_PARAMETERS = DEPLOY / "containerapp.parameters.json"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

DEFAULTS = Settings.from_env({})
# The settings naming the queues the worker consumes (requests, run steps, run deadlines),
# found from the code: a queue added to ``Settings.work_queues`` is checked here too.
QUEUE_SPECS = tuple(spec for spec in SPECS if getattr(DEFAULTS, spec.field) in DEFAULTS.work_queues)
# What each work queue's scale rule must count: requests every message (in flight too, so
# that a busy replica is not scaled away), the worker's own delayed messages only the visible
# ones (so that a delayed poll or deadline does not keep replicas awake).
QUEUE_LENGTH_STRATEGY = {
    DEFAULTS.requests_queue: "all",
    DEFAULTS.runs_queue: "visibleonly",
    DEFAULTS.deadlines_queue: "visibleonly",
}
HTTP_PORT = 8080
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
# Seconds a container needs beyond WORKER_SHUTDOWN_GRACE: release the unfinished leases, exit.
MIN_DRAIN_MARGIN = 5

ROLES: dict[str, str | tuple[str, ...]] = {
    # Built-in role definition ids (the same in every tenant) and the resources they are on.
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "storage",  # Storage Queue Data Contributor
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "storage",  # Storage Table Data Contributor
    "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd": "openAi",  # Cognitive Services OpenAI User
    # Key Vault Secrets User: on the query keys' secret alone, on the vault for MCP tokens, and
    # on the webhooks' vault for their signing secrets.
    "4633458b-17de-408a-b874-0445c86b69e6": ("queryKeysSecret", "vault", "keyVault"),
}

# Read by libraries or the Functions host rather than by Settings.from_env:
# DefaultAzureCredential (AZURE_CLIENT_ID), OpenTelemetry / Azure Monitor, and the Functions
# host's name for the user-assigned identity of identity-based storage.
LIBRARY_SETTINGS = {
    "AZURE_CLIENT_ID",
    "AzureWebJobsStorage__clientId",
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
}
# Injected into AKS pods by the workload identity webhook, from the service account.
WORKLOAD_IDENTITY_INJECTED = {"AZURE_CLIENT_ID", "AzureWebJobsStorage__clientId"}
SECRET_SETTINGS = {
    "AzureWebJobsStorage",
    "OPENAI_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_KEY",
    "WORKER_QUERY_KEYS",
    "WORKER_WEBHOOK_SECRETS",
}
# Secrets the manifests do pass, from a secret store: the query API's keys.
REFERENCED_SECRETS = {"WORKER_QUERY_KEYS"}
# Key Vault Secrets User: the identity reads the webhook signing secrets (with webhooks).
KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"


class _RecordingEnv(dict[str, str]):
    """An environment that remembers which names were asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def settings_read_by_worker() -> set[str]:
    """Every environment name ``Settings.from_env`` reads (besides named connections)."""
    names = {spec.env for spec in SPECS}
    recording = _RecordingEnv()
    storage_connection("AzureWebJobsStorage", recording)
    names |= recording.asked
    # The literal names from_env itself asks for (the API keys).
    tree = ast.parse(textwrap.dedent(inspect.getsource(Settings.from_env)))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "env"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def test_the_worker_reads_the_names_the_manifests_rely_on() -> None:
    """The reader of ``from_env`` above finds what it must (so the checks below mean something)."""
    names = settings_read_by_worker()
    assert {
        "AzureWebJobsStorage",
        "AzureWebJobsStorage__accountName",
        "WORKER_REQUESTS_QUEUE",
        "WORKER_RUNS_QUEUE",
        "WORKER_DEADLINES_QUEUE",
        "WORKER_SHUTDOWN_GRACE",
        "WORKER_HTTP_PORT",
        "AZURE_OPENAI_ENDPOINT",
        "OPENAI_API_KEY",
        "AZURE_OPENAI_API_KEY",
    } <= names
    assert len(QUEUE_SPECS) == len(DEFAULTS.work_queues) == 3, "one setting per work queue"
    assert set(QUEUE_LENGTH_STRATEGY) == set(DEFAULTS.work_queues), "a strategy per work queue"


def check_environment(env: Mapping[str, str], where: str) -> Settings:
    """The worker accepts ``env`` as it is, reads every name in it, and no secret is in it."""
    unknown = set(env) - settings_read_by_worker() - LIBRARY_SETTINGS
    assert not unknown, f"{where} sets names the worker never reads: {sorted(unknown)}"
    secrets = set(env) & SECRET_SETTINGS
    assert not secrets, f"{where} passes secrets as settings: {sorted(secrets)} (use identities)"
    listed = {spec.env for spec in QUEUE_SPECS} & set(env)
    assert listed in (set(), {spec.env for spec in QUEUE_SPECS}), (
        f"{where} names some work queues and not others: {sorted(listed)} "
        "(a replica would consume a queue the others do not)"
    )
    settings = Settings.from_env(env)
    connection = settings.default_storage
    assert connection.connection_string is None, f"{where}: storage must be identity-based"
    assert connection.account_name, f"{where}: AzureWebJobsStorage__accountName is not set"
    return settings


def check_settings_match_defaults(settings: Settings, where: str) -> None:
    for spec in QUEUE_SPECS:
        assert getattr(settings, spec.field) == getattr(DEFAULTS, spec.field), (
            f"{where}: {spec.env}"
        )
    assert settings.work_queues == DEFAULTS.work_queues, where
    assert settings.shutdown_grace == DEFAULTS.shutdown_grace, where
    assert settings.http_port == HTTP_PORT, f"{where}: WORKER_HTTP_PORT"
    assert settings.log_format == "json", f"{where}: logs must be JSON off a terminal"


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} must use the exec (JSON) form"
        return [str(part) for part in value]


def dockerfile() -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    instructions = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def build_stage_sources() -> list[str]:
    """What the build stage copies from the build context (the repository root)."""
    sources = []
    for instruction in dockerfile():
        if instruction.stage == 0 and instruction.keyword == "COPY":
            assert not instruction.args.startswith("--from"), "the build stage copies sources"
            *parts, _destination = shlex.split(instruction.args)
            sources.extend(parts)
    return sources


def docker_env(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for part in shlex.split(instruction.args):
                key, _, value = part.partition("=")
                env[key] = value
    return env


def test_dockerfile_is_multi_stage_on_slim_python_311() -> None:
    froms = [i for i in dockerfile() if i.keyword == "FROM"]
    assert len(froms) >= 2, "build the wheel in one stage, run it in another"
    assert re.search(r"\bAS build\b", froms[0].args, re.IGNORECASE)
    default_image = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert default_image and re.fullmatch(r"python:3\.11-slim(-\w+)?", default_image.group(1))
    final = final_stage()
    copies = [i for i in final if i.keyword == "COPY"]
    assert copies and all(i.args.startswith("--from=build") for i in copies), (
        "the final stage takes the built virtualenv only, no sources"
    )
    assert not any("curl" in i.args for i in final), "slim images have no curl"


def test_dockerfile_runs_the_entrypoint_as_a_non_root_user() -> None:
    final = final_stage()
    user = only(final, "USER").args.split(":")[0]
    assert user not in {"root", "0"}, "the image must not run as root"
    assert user.isdigit() and int(user) >= 1000, "a numeric uid lets Kubernetes check runAsNonRoot"
    entrypoint = only(final, "ENTRYPOINT").exec_form()
    assert entrypoint == ["assistant-worker"]
    assert entrypoint[0] in pyproject()["project"]["scripts"]
    assert only(final, "CMD").exec_form() == ["run"]
    assert only(final, "STOPSIGNAL").args == "SIGTERM"


def test_dockerfile_serves_health_on_the_worker_port() -> None:
    final = final_stage()
    env = docker_env(final)
    settings = Settings.from_env(env)
    assert settings.http_port == HTTP_PORT
    assert settings.http_host == "0.0.0.0", "probes reach the pod's address, not 127.0.0.1"
    assert only(final, "EXPOSE").args == str(HTTP_PORT)
    healthcheck = only(final, "HEALTHCHECK").args
    assert "127.0.0.1" in healthcheck and LIVENESS_PATH in healthcheck


def healthcheck_command(python: str = sys.executable) -> list[str]:
    """The HEALTHCHECK's command, with ``python`` for the image's ``python`` on PATH."""
    args = only(final_stage(), "HEALTHCHECK").args
    _options, _, command = args.partition("CMD ")
    argv = json.loads(command)
    assert isinstance(argv, list) and argv[0] == "python"
    return [python, *[str(part) for part in argv[1:]]]


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_dockerfile_healthcheck_command_asks_healthz(status: int, healthy: bool) -> None:
    """The HEALTHCHECK's python one-liner, run against a server that answers ``status``."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(status)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        result = subprocess.run(
            healthcheck_command(),
            env={**os.environ, "WORKER_HTTP_PORT": port},
            capture_output=True,
            timeout=30,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert asked == [LIVENESS_PATH]
    assert (result.returncode == 0) is healthy, result.stderr.decode(errors="replace")


def test_dockerfile_copies_everything_the_wheel_is_built_from() -> None:
    sources = set(build_stage_sources())
    project = pyproject()
    packages = {
        name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= sources, f"packages not copied: {sorted(packages - sources)}"
    assert {"pyproject.toml", project["project"]["readme"]} <= sources


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            result = not negated
    return result


def test_dockerignore_keeps_the_build_inputs_and_drops_local_state() -> None:
    patterns = dockerignore_patterns()
    for source in [*build_stage_sources(), "deploy/Dockerfile"]:
        assert not ignored(source, patterns), f".dockerignore drops {source}, which the build needs"
    for local in [".git", ".venv", ".venv-lint", "node_modules", ".azurite", "tests", ".env"]:
        assert ignored(local, patterns), f".dockerignore should drop {local}"


# --- Bicep (read textually: no compiler here) ----------------------------------------------


def bicep_text() -> str:
    return BICEP.read_text()


def bicep_block(text: str, start: str) -> str:
    """The ``{...}`` (or ``[...]``) that follows the first ``start`` in ``text``."""
    # ``start`` may end with the opening bracket itself ("scale: {").
    index = text.index(start) + len(start.rstrip("{[ "))
    opening = min((i for i in (text.find("{", index), text.find("[", index)) if i >= 0), default=-1)
    assert opening >= 0, f"no block after {start!r}"
    pairs = {"{": "}", "[": "]"}
    stack: list[str] = []
    for position in range(opening, len(text)):
        char = text[position]
        if char in pairs:
            stack.append(pairs[char])
        elif stack and char == stack[-1]:
            stack.pop()
            if not stack:
                return text[opening : position + 1]
    raise AssertionError(f"unbalanced block after {start!r}")


def bicep_blocks(text: str, start: str) -> list[str]:
    blocks = []
    offset = 0
    while (index := text.find(start, offset)) >= 0:
        block = bicep_block(text[index:], start)
        blocks.append(block)
        offset = index + len(start)
    return blocks


def bicep_parameter_file() -> dict[str, Any]:
    parameters = json.loads(BICEP_PARAMETERS.read_text())["parameters"]
    return {name: entry["value"] for name, entry in parameters.items()}


def bicep_literal(expression: str) -> Any:
    expression = expression.strip()
    if re.fullmatch(r"'[^']*'", expression):
        return expression[1:-1]
    if re.fullmatch(r"-?\d+", expression):
        return int(expression)
    if expression in {"true", "false"}:
        return expression == "true"
    if expression in {"{}", "[]"}:
        return json.loads(expression)
    return None


@dataclass
class Bicep:
    """Parameters (their defaults, or the parameters file's values), variables, resolution."""

    text: str
    defaults: dict[str, Any]
    values: dict[str, Any]
    variables: dict[str, str]

    @classmethod
    def read(cls, with_parameter_file: bool = True) -> "Bicep":
        text = bicep_text()
        defaults: dict[str, Any] = {}
        for match in re.finditer(r"^param (\w+) \w+(?: = (.+))?$", text, re.MULTILINE):
            defaults[match.group(1)] = bicep_literal(match.group(2) or "")
        values = dict(defaults)
        if with_parameter_file:
            values.update(bicep_parameter_file())
        variables = {
            m.group(1): m.group(2) for m in re.finditer(r"^var (\w+) = (.+)$", text, re.MULTILINE)
        }
        return cls(text, defaults, values, variables)

    def resolve(self, expression: str) -> Any:
        """A literal, a parameter, a variable, ``string(...)`` or ``a + b``; None otherwise."""
        expression = expression.strip()
        literal = bicep_literal(expression)
        if literal is not None:
            return literal
        if match := re.fullmatch(r"string\((.+)\)", expression):
            inner = self.resolve(match.group(1))
            return None if inner is None else str(inner)
        if "+" in expression:
            terms = [self.resolve(term) for term in expression.split("+")]
            if all(isinstance(term, int) for term in terms):
                return sum(terms)
            return None
        if expression in self.values:
            return self.values[expression]
        if expression in self.variables:
            return self.resolve(self.variables[expression])
        return None

    def env(self) -> dict[str, str]:
        """The container's env entries; unresolvable values (resource properties) as markers."""
        env = {}
        block = bicep_block(self.text, "var baseEnv =")
        for match in re.finditer(r"name: '([^']+)'\s*\n\s*value: (.+)", block):
            value = self.resolve(match.group(2))
            env[match.group(1)] = str(value) if value is not None else f"<{match.group(2)}>"
        return env


def test_bicep_parameter_file_names_only_template_parameters() -> None:
    bicep = Bicep.read()
    unknown = set(bicep_parameter_file()) - set(bicep.defaults)
    assert not unknown, f"parameters not declared in the template: {sorted(unknown)}"
    required = set(re.findall(r"^param (\w+) \w+$", bicep.text, re.MULTILINE))
    assert {"image", "storageAccountName", "openAiAccountName"} <= required
    assert required <= set(bicep_parameter_file()), "a required parameter has no value"


@pytest.mark.parametrize("with_parameter_file", [False, True], ids=["defaults", "parameters"])
def test_bicep_environment_is_what_the_worker_reads(with_parameter_file: bool) -> None:
    bicep = Bicep.read(with_parameter_file)
    env = bicep.env()
    if not with_parameter_file:
        # A required parameter: no default to resolve.
        assert env["AzureWebJobsStorage__accountName"] == "<storageAccountName>"
        env["AzureWebJobsStorage__accountName"] = "account"
    resolved = {name: value for name, value in env.items() if not value.startswith("<")}
    settings = check_environment(resolved, "containerapp.bicep")
    check_settings_match_defaults(settings, "containerapp.bicep")
    assert (
        env["AZURE_CLIENT_ID"]
        == env["AzureWebJobsStorage__clientId"]
        == ("<identity.properties.clientId>")
    ), "the user-assigned identity's client id"
    assert env["AZURE_OPENAI_ENDPOINT"] == "<openAi.properties.endpoint>"


def bicep_scale_rules(bicep: Bicep) -> dict[str, str]:
    """The queue scale rules of the app, by the queue each one reads (its ``queueName``
    resolved); the app's rules are these and, with webhooks, the HTTP rule."""
    scale = bicep_block(bicep.text, "scale: {")
    assert re.search(r"^\s*rules: concat\(queueScaleRules, webhookScaleRules\)$", scale, re.M)
    rules_block = bicep_block(bicep.text, "var queueScaleRules =")
    rules: list[str] = []
    depth = 0
    for position, char in enumerate(rules_block[1:-1], start=1):
        if char == "{":
            if depth == 0:
                rules.append(bicep_block(rules_block[position:], "{"))
            depth += 1
        elif char == "}":
            depth -= 1
    by_queue = {}
    for rule in rules:
        name = re.search(r"queueName: (\S+)", rule)
        assert name, f"a scale rule reads no queue:\n{rule}"
        queue = bicep.resolve(name.group(1))
        assert isinstance(queue, str), f"unresolvable queueName {name.group(1)}"
        assert queue not in by_queue, f"two scale rules read {queue}"
        by_queue[queue] = rule
    return by_queue


@pytest.mark.parametrize("with_parameter_file", [False, True], ids=["defaults", "parameters"])
def test_bicep_names_the_default_queues_and_scales_on_each(with_parameter_file: bool) -> None:
    bicep = Bicep.read(with_parameter_file)
    env = bicep.env()
    for spec in QUEUE_SPECS:
        assert spec.env in env, f"the app's env does not name {spec.env}"
        assert env[spec.env] == getattr(DEFAULTS, spec.field), spec.env

    scale = bicep_block(bicep.text, "scale: {")
    assert re.search(r"^\s*minReplicas: minReplicas$", scale, re.MULTILINE)
    assert bicep.defaults["minReplicas"] == 0 and bicep.values["minReplicas"] == 0
    assert "auth:" not in scale, "no secrets in scale rules"

    rules = bicep_scale_rules(bicep)
    assert set(rules) == set(DEFAULTS.work_queues), "one scale rule per work queue"
    for queue, rule in rules.items():
        assert "accountName: storageAccountName" in rule, queue
        assert "identity: identity.id" in rule, (
            f"{queue}: the scaler authenticates with the identity"
        )
        # The rule reads the parameter the app's env passes to the worker.
        [parameter] = re.findall(r"queueName: (\w+)", rule)
        assert re.search(rf"value: {parameter}\n", bicep_block(bicep.text, "var baseEnv =")), queue
        if QUEUE_LENGTH_STRATEGY[queue] == "all":
            # The built-in rule counts every message, in flight too.
            block = bicep_block(rule, "azureQueue:")
            assert "queueLengthStrategy" not in block, queue
            assert re.search(r"queueLength: \w+QueueLength\n", block), queue
        else:
            # Only a custom rule takes KEDA's metadata, where visibleonly is set.
            custom = bicep_block(rule, "custom:")
            assert "type: 'azure-queue'" in custom, queue
            metadata = bicep_block(custom, "metadata:")
            assert f"queueLengthStrategy: '{QUEUE_LENGTH_STRATEGY[queue]}'" in metadata, queue
            length = re.search(r"queueLength: string\((\w+)\)", metadata)
            assert length, f"{queue}: metadata values are strings"
            assert isinstance(bicep.values[length.group(1)], int), queue


def test_bicep_uses_an_api_version_with_identity_on_scale_rules() -> None:
    # 2024-03-01 has no ``identity`` on QueueScaleRule/CustomScaleRule; 2025-01-01 has.
    versions = re.findall(
        r"'Microsoft\.App/(?:containerApps|managedEnvironments)@([\d-]+)'", bicep_text()
    )
    assert versions and all(version >= "2025-01-01" for version in versions), versions


def test_bicep_assigns_the_data_roles_to_the_identity() -> None:
    text = bicep_text()
    assignments = bicep_blocks(text, "'Microsoft.Authorization/roleAssignments@2022-04-01' =")
    for role_id, scope in ROLES.items():
        variable = re.search(rf"^var (\w+) = '{role_id}'$", text, re.MULTILINE)
        assert variable, f"role {role_id} is not declared"
        matching = [
            block
            for block in assignments
            if f"'Microsoft.Authorization/roleDefinitions', {variable.group(1)})" in block
        ]
        scopes = (scope,) if isinstance(scope, str) else scope
        assert len(matching) == len(scopes), f"role {variable.group(1)}: one assignment a scope"
        for block, expected in zip(matching, scopes, strict=True):
            assert f"scope: {expected}\n" in block
            assert "principalId: identity.properties.principalId" in block
            assert "principalType: 'ServicePrincipal'" in block
    identity = bicep_block(text, "identity: {")
    assert "type: 'UserAssigned'" in identity and "'${identity.id}': {}" in identity


def test_bicep_reads_no_keys() -> None:
    text = bicep_text()
    for forbidden in ["listKeys", "listkeys", "AccountKey", "sharedKey", "SharedAccessSignature"]:
        assert forbidden not in text, f"containerapp.bicep uses {forbidden}"
    assert not re.search(r"name: '(?:AzureWebJobsStorage|\w*API_KEY|AZURE_OPENAI_KEY)'", text)
    assert "destination: 'azure-monitor'" in text, "logs through a diagnostic setting, no key"
    assert "identity: identity.id" in bicep_block(
        text, "var registries = empty(containerRegistryName) ? [] :"
    ), "AcrPull, no password"


def test_bicep_mcp_servers_are_allow_listed_and_their_tokens_are_key_vault_references() -> None:
    """``mcpServers`` become WORKER_MCP_SERVERS and each server's ``N__url``; a token is a
    Container Apps secret that is a Key Vault reference read with the app's identity (which
    may read the vault's secrets, and nothing else of it): never a value in the template, its
    parameters or the environment. The names are those the worker reads."""
    bicep = Bicep.read()
    assert bicep.defaults["mcpServers"] == [] and bicep.defaults["keyVaultName"] == ""
    text = bicep.text
    env = text[text.index("var mcpEnv =") : text.index("var mcpSecrets =")]
    assert "name: 'WORKER_MCP_SERVERS'" in env
    assert "value: join(map(mcpServers, server => server.name), ',')" in env
    assert "name: '${server.name}__url'\n    value: server.url" in env
    token = bicep_block(env[env.index("map(mcpServersWithToken") :], "server => {")
    assert "name: '${server.name}__token'" in token
    assert "secretRef: 'mcp-token-" in token and "value:" not in token
    secrets = bicep_block(text, "var mcpSecrets =")
    assert "keyVaultUrl: 'https://${keyVaultName}" in secrets
    assert "/secrets/${server.tokenSecretName}'" in secrets
    assert "identity: identity.id" in secrets and "value:" not in secrets
    assert re.search(
        r"name: 'mcp-token-\$\{toLower\(replace\(server\.name, '_', '-'\)\)\}'", secrets
    )
    app = bicep_block(text, "resource app 'Microsoft.App/containerApps@")
    assert (
        "secrets: concat(appInsightsSecrets, queryKeysSecrets, mcpSecrets, webhookSecrets)" in app
    )
    assert "env: concat(baseEnv, appInsightsEnv, queryKeysEnv, mcpEnv, webhookEnv)" in app
    assert "vaultSecretsRole" in bicep_block(app, "dependsOn: [")
    # What the template writes for a server with a token is what the worker reads.
    settings = Settings.from_env(
        {
            "WORKER_MCP_SERVERS": "weather,mail_1",
            "weather__url": "https://weather.example.com/mcp",
            "mail_1__url": "https://mail.example.com/mcp",
            "mail_1__token": "from-key-vault",
        }
    )
    assert settings.mcp_servers["mail_1"].token == "from-key-vault"
    assert settings.mcp_servers["weather"].token is None


def test_bicep_probes_fit_the_worker() -> None:
    bicep = Bicep.read()
    assert bicep.resolve("httpPort") == HTTP_PORT
    probes = bicep_block(bicep.text, "probes: [")
    liveness = bicep_block(probes[probes.index("type: 'Liveness'") :], "httpGet:")
    readiness = bicep_block(probes[probes.index("type: 'Readiness'") :], "httpGet:")
    assert f"path: '{LIVENESS_PATH}'" in liveness and "port: httpPort" in liveness
    assert f"path: '{READINESS_PATH}'" in readiness and "port: httpPort" in readiness

    assert "terminationGracePeriodSeconds: terminationGracePeriodSeconds" in bicep.text


@pytest.mark.parametrize("with_parameter_file", [False, True], ids=["defaults", "parameters"])
def test_bicep_grace_period_covers_the_drain(with_parameter_file: bool) -> None:
    bicep = Bicep.read(with_parameter_file)
    assert bicep.values["shutdownGraceSeconds"] == DEFAULTS.shutdown_grace
    assert bicep.env()["WORKER_SHUTDOWN_GRACE"] == str(bicep.values["shutdownGraceSeconds"])
    grace = bicep.resolve("terminationGracePeriodSeconds")
    assert isinstance(grace, int) and grace >= DEFAULTS.shutdown_grace + MIN_DRAIN_MARGIN


def env_entries(block: str) -> dict[str, tuple[str, str]]:
    """The env entries of a Bicep array: name -> ("value" or "secretRef", expression)."""
    return {
        match.group(1): (match.group(2), match.group(3))
        for match in re.finditer(
            r"name: '([^']+)'\s*\n(?:\s*//.*\n)*\s*(value|secretRef): (.+)", block
        )
    }


def test_bicep_webhooks_are_optional_and_expose_the_webhook_port_alone() -> None:
    """Off by default (no ingress at all). With webhooks, the external ingress targets the
    worker's webhook port, which serves POST /webhooks/openai and nothing else; the port of the
    probes, /metrics and the query stays internal; the worker accepts the environment it gets,
    the signing secrets as a Key Vault reference, never a value."""
    bicep = Bicep.read()
    text = bicep.text
    assert bicep.defaults["webhooks"] is False and bicep.values["webhooks"] is False
    assert "ingress: webhooks ? webhookIngress : null" in text
    ingress = bicep_block(text, "var webhookIngress =")
    mappings = bicep_block(ingress, "additionalPortMappings:")
    outer = ingress.replace(mappings, "")
    assert "external: true" in outer and "targetPort: webhookPort" in outer
    assert "allowInsecure: false" in outer
    assert "external: false" in mappings and "targetPort: httpPort" in mappings
    assert "external: true" not in mappings, "the query, probes and metrics stay internal"
    assert bicep.resolve("webhookPort") != bicep.resolve("httpPort") == HTTP_PORT

    entries = env_entries(bicep_block(text, "var webhookEnv = webhooks ?"))
    assert set(entries) == {"WORKER_WEBHOOK_PORT", "WORKER_WEBHOOK_SECRETS"}
    kind, port = entries["WORKER_WEBHOOK_PORT"]
    assert kind == "value" and bicep.resolve(port) == str(bicep.resolve("webhookPort"))
    kind, reference = entries["WORKER_WEBHOOK_SECRETS"]
    assert kind == "secretRef"
    secrets = bicep_block(text, "var webhookSecrets = webhooks ?")
    assert f"name: {reference}" in secrets
    assert "keyVaultUrl: 'https://${webhookKeyVaultName}" in secrets
    assert "identity: identity.id" in secrets
    assert "value:" not in secrets, "the secrets come from Key Vault, never as a value"
    assert "env: concat(baseEnv, appInsightsEnv, queryKeysEnv, mcpEnv, webhookEnv)" in text
    assert (
        "secrets: concat(appInsightsSecrets, queryKeysSecrets, mcpSecrets, webhookSecrets)" in text
    )

    env = {name: value for name, value in bicep.env().items() if not value.startswith("<")}
    env["WORKER_WEBHOOK_PORT"] = str(bicep.resolve("webhookPort"))
    settings = check_environment(env, "containerapp.bicep with webhooks")
    with_secret = Settings.from_env({**env, "WORKER_WEBHOOK_SECRETS": "whsec_c2VjcmV0"})
    assert with_secret.webhooks and with_secret.webhook_port == bicep.resolve("webhookPort")
    assert settings.http_port == HTTP_PORT


def test_bicep_webhooks_wake_an_idle_app_and_read_their_secret_with_the_identity() -> None:
    bicep = Bicep.read()
    text = bicep.text
    rules = bicep_block(text, "var webhookScaleRules = webhooks ?")
    assert "http: {" in rules
    assert "concurrentRequests: string(webhookConcurrentRequests)" in rules
    assert isinstance(bicep.values["webhookConcurrentRequests"], int)
    variable = re.search(rf"^var (\w+) = '{KEY_VAULT_SECRETS_USER}'$", text, re.MULTILINE)
    assert variable, "the Key Vault Secrets User role is not declared"
    [assignment] = [
        block
        for block in bicep_blocks(text, "'Microsoft.Authorization/roleAssignments@2022-04-01' =")
        if f"roleDefinitions', {variable.group(1)})" in block and "scope: keyVault\n" in block
    ]  # the webhooks' vault (the query keys and MCP tokens have assignments of their own)
    assert "principalId: identity.properties.principalId" in assignment
    assert re.search(r"resource keyVault '[^']+' existing = if \(webhooks\)", text)
    assert "webhookSecretRole" in bicep_block(text, "dependsOn: [")


# --- Kubernetes manifests (KEDA on AKS) -------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every document in deploy/keda/, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KEDA.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path.name}: not a mapping"
            for field in ("apiVersion", "kind", "metadata"):
                assert field in document, f"{path.name}: no {field}"
            assert document["metadata"].get("name"), f"{path.name}: no metadata.name"
            assert document["kind"] not in found, f"two {document['kind']} documents"
            found[document["kind"]] = document
    return found


def test_keda_folder_holds_the_five_manifests() -> None:
    assert {p.name for p in KEDA.glob("*.yaml")} == {
        "deployment.yaml",
        "serviceaccount.yaml",
        "scaledobject.yaml",
        "triggerauthentication.yaml",
        "networkpolicy.yaml",
    }
    kinds = manifests()
    assert set(kinds) == {
        "Deployment",
        "ServiceAccount",
        "ScaledObject",
        "TriggerAuthentication",
        "NetworkPolicy",
    }
    assert kinds["ScaledObject"]["apiVersion"] == "keda.sh/v1alpha1"
    assert kinds["TriggerAuthentication"]["apiVersion"] == "keda.sh/v1alpha1"


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def worker_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def deployment_env() -> dict[str, str]:
    """The container's plain settings (those taken from a Secret: ``deployment_secret_env``)."""
    env = {}
    for entry in worker_container()["env"]:
        if "valueFrom" in entry:
            continue
        assert isinstance(entry["value"], str), f"{entry['name']}: env values must be strings"
        env[entry["name"]] = entry["value"]
    return env


def deployment_secret_env() -> dict[str, dict[str, Any]]:
    """The container's settings taken from a Kubernetes Secret: name -> its secretKeyRef."""
    found = {}
    for entry in worker_container()["env"]:
        if "valueFrom" in entry:
            assert "value" not in entry, entry["name"]
            assert set(entry["valueFrom"]) == {"secretKeyRef"}, f"{entry['name']}: from a Secret"
            found[entry["name"]] = entry["valueFrom"]["secretKeyRef"]
    return found


def test_deployment_environment_is_what_the_worker_reads() -> None:
    env = deployment_env()
    settings = check_environment(env, "deployment.yaml")
    check_settings_match_defaults(settings, "deployment.yaml")
    assert not set(env) & WORKLOAD_IDENTITY_INJECTED, "the webhook injects the client id"


def test_deployment_and_container_app_set_the_same_settings() -> None:
    container_app = Bicep.read().env()
    deployment = deployment_env()
    assert set(deployment) == set(container_app) - WORKLOAD_IDENTITY_INJECTED
    for name, value in deployment.items():
        if not container_app[name].startswith("<"):
            assert value == container_app[name], name


def test_deployment_uses_workload_identity() -> None:
    kinds = manifests()
    template = kinds["Deployment"]["spec"]["template"]
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    account = kinds["ServiceAccount"]
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    client_id = account["metadata"]["annotations"]["azure.workload.identity/client-id"]
    uuid.UUID(client_id)
    assert "replicas" not in kinds["Deployment"]["spec"], "KEDA owns the replica count"


def test_deployment_probes_grace_and_user_fit_the_image() -> None:
    container = worker_container()
    port = Settings.from_env(deployment_env()).http_port
    assert port == HTTP_PORT
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert container["livenessProbe"]["httpGet"] == {"path": LIVENESS_PATH, "port": port}
    assert container["readinessProbe"]["httpGet"] == {"path": READINESS_PATH, "port": port}
    spec = pod_spec()
    grace = Settings.from_env(deployment_env()).shutdown_grace
    assert spec["terminationGracePeriodSeconds"] >= grace + MIN_DRAIN_MARGIN
    assert "command" not in container, "the image's ENTRYPOINT runs"
    assert container["args"] == only(final_stage(), "CMD").exec_form()
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == only(final_stage(), "USER").args.split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def triggers() -> dict[str, dict[str, Any]]:
    found = {}
    for trigger in manifests()["ScaledObject"]["spec"]["triggers"]:
        assert trigger["type"] == "azure-queue"
        found[trigger["metadata"]["queueName"]] = trigger
    return found


def test_scaled_object_scales_the_deployment_on_each_queue_from_zero() -> None:
    kinds = manifests()
    spec = kinds["ScaledObject"]["spec"]
    assert spec["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert spec["minReplicaCount"] == 0
    by_queue = triggers()
    assert set(by_queue) == set(DEFAULTS.work_queues), "one trigger per work queue"
    assert set(by_queue) == set(Settings.from_env(deployment_env()).work_queues)
    account = deployment_env()["AzureWebJobsStorage__accountName"]
    auth = kinds["TriggerAuthentication"]
    for trigger in by_queue.values():
        metadata = trigger["metadata"]
        assert all(isinstance(value, str) for value in metadata.values()), "KEDA wants strings"
        assert metadata["accountName"] == account
        assert int(metadata["queueLength"]) >= 1
        assert not {"connection", "connectionFromEnv"} & set(metadata), "identity, no secrets"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    for queue, strategy in QUEUE_LENGTH_STRATEGY.items():
        metadata = by_queue[queue]["metadata"]
        assert metadata.get("queueLengthStrategy", "all") == strategy, queue
    assert auth["spec"]["podIdentity"]["provider"] == "azure-workload"


def test_scaled_object_and_container_app_scale_alike() -> None:
    bicep = Bicep.read()
    by_queue = triggers()
    spec = manifests()["ScaledObject"]["spec"]
    rules = bicep_scale_rules(bicep)
    for queue, trigger in by_queue.items():
        length = re.search(r"queueLength: (?:string\()?(\w+)", rules[queue])
        assert length, queue
        assert int(trigger["metadata"]["queueLength"]) == bicep.values[length.group(1)], queue
    assert spec["maxReplicaCount"] == bicep.values["maxReplicas"]
    scale = bicep_block(bicep.text, "scale: {")
    for field, value in [
        ("pollingInterval", spec["pollingInterval"]),
        ("cooldownPeriod", spec["cooldownPeriod"]),
    ]:
        assert f"{field}: {value}\n" in scale


def test_probe_paths_are_the_ones_the_worker_serves() -> None:
    sources = "\n".join(p.read_text() for p in (REPO / "worker").rglob("*.py"))
    if '"/metrics"' not in sources:
        pytest.skip("the HTTP server of WORKER_HTTP_PORT is not in this tree yet")
    assert f'"{LIVENESS_PATH}"' in sources and f'"{READINESS_PATH}"' in sources


# --- The image, simulated: the wheel in a fresh virtualenv, run as an unprivileged user ------

UNPRIVILEGED = 65534  # nobody


def world_usable(path: Path) -> bool:
    """Whether any user may run ``path``: every folder above it searchable, itself r-x."""
    real = path.resolve()
    if not real.exists() or real.stat().st_mode & 0o005 != 0o005:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)


def python_for_everyone() -> Path | None:
    """A Python ≥ 3.11 that an unprivileged user can run (pyenv's may sit under /root)."""
    candidates = [Path(sys.executable), Path(sys.base_prefix) / "bin" / "python3"]
    for name in ("python3.11", "python3.12", "python3.13", "python3"):
        if found := shutil.which(name, path="/usr/local/bin:/usr/bin:/bin"):
            candidates.append(Path(found))
    for candidate in candidates:
        if not world_usable(candidate):
            continue
        probe = subprocess.run(
            [
                str(candidate),
                "-c",
                "import ensurepip, sys, venv; print(sys.version_info >= (3, 11))",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


def unprivileged_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    if setpriv := shutil.which("setpriv"):
        ids = str(UNPRIVILEGED)
        return [setpriv, f"--reuid={ids}", f"--regid={ids}", "--clear-groups"]
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", "nobody", "--"]
    pytest.skip("running as root with neither setpriv nor runuser to drop privileges")


@dataclass(frozen=True)
class Image:
    """The image, simulated: its virtualenv, a home folder, and how to run as its user."""

    root: Path
    venv: Path
    home: Path
    demote: list[str]

    def env(self, storage: StorageEnv, **extra: str) -> dict[str, str]:
        image_env = docker_env(final_stage())
        return {
            "PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(self.home),
            **{k: v for k, v in image_env.items() if k != "PATH"},
            **storage.env(),
            **extra,
        }

    def command(self) -> list[str]:
        """The image's ENTRYPOINT and CMD, run as the unprivileged user."""
        final = final_stage()
        entrypoint = only(final, "ENTRYPOINT").exec_form()
        return [*self.demote, *entrypoint, *only(final, "CMD").exec_form()]


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    """Built once per module in a world-readable folder (pytest's tmp_path is root's only)."""
    root = Path(tempfile.mkdtemp(prefix="assistant-worker-image-"))
    root.chmod(0o755)
    try:
        venv = build_image_venv(root)
        home = root / "home"
        home.mkdir()
        demote = unprivileged_prefix()
        if demote:
            os.chown(home, UNPRIVILEGED, UNPRIVILEGED)
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(
                    path.stat().st_mode
                    | stat.S_IRUSR
                    | stat.S_IRGRP
                    | stat.S_IROTH
                    | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0)
                )
        yield Image(root, venv, home, demote)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_checked(argv: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{argv[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def build_image_venv(root: Path) -> Path:
    """The Dockerfile's build stage, here: wheel from the copied sources, venv, install."""
    context = root / "context"
    context.mkdir()
    for source in build_stage_sources():
        origin = REPO / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, context / source)
    wheels = root / "wheels"
    run_checked(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            str(context),
        ],
        timeout=300,
    )
    (wheel,) = wheels.glob("assistant_worker-*.whl")

    python = python_for_everyone()
    if python is None:
        pytest.skip("no Python 3.11+ here that an unprivileged user can run")
    venv = root / "venv"
    run_checked([str(python), "-m", "venv", str(venv)], timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    run_checked([*pip, "install", "--quiet", str(wheel)], timeout=300)
    run_checked([*pip, "uninstall", "--quiet", "--yes", "pip", "setuptools"], timeout=120)
    return venv


async def _queue_names(storage: StorageEnv) -> set[str]:
    async with storage.queues() as service:
        return {queue.name async for queue in service.list_queues()}


@pytest.mark.slow
def test_image_entrypoint_runs_from_the_wheel_as_an_unprivileged_user(
    storage: StorageEnv, image: Image
) -> None:
    # The image's fixed port 8080 might be taken on a shared machine: no HTTP server here.
    env = image.env(storage)
    env.pop("WORKER_HTTP_PORT")
    identity = subprocess.run(
        [
            *image.demote,
            str(image.venv / "bin" / "python"),
            "-c",
            "import os, worker; print(os.geteuid(), worker.__file__)",
        ],
        env=env,
        cwd=image.home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert identity.returncode == 0, identity.stderr
    uid, module = identity.stdout.split()
    assert uid != "0", "the entrypoint must run as a non-root user"
    assert module.startswith(str(image.venv)), f"worker imported from {module}, not the wheel"

    chat_id = f"image-{storage.suffix}"
    asyncio.run(storage.send(create_request(chat_id, f"create-{chat_id}", storage.table)))
    result = subprocess.run(
        [*image.command(), "--burst"],
        env=env,
        cwd=image.home,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    work_queues = set(Settings.from_env(env).work_queues)
    assert storage.deadlines_queue in work_queues
    expected = work_queues | {poison_queue_name(name) for name in work_queues}
    assert expected <= asyncio.run(_queue_names(storage))
    rows = asyncio.run(storage.partition(chat_id, storage.table))
    assert "state" in rows, f"the create was not applied:\n{result.stdout[-3000:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.mark.slow
def test_image_serves_its_probes_and_stops_on_its_stop_signal(
    storage: StorageEnv, image: Image
) -> None:
    """Ready on /readyz, healthy by the HEALTHCHECK, then STOPSIGNAL: exit 0 within the grace."""
    port = free_port()
    env = image.env(storage, WORKER_HTTP_PORT=str(port), WORKER_HTTP_HOST="127.0.0.1")
    log = image.root / f"serve-{storage.suffix}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            image.command(), env=env, cwd=image.home, stdout=output, stderr=output
        )
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}{READINESS_PATH}") != 200:
            assert process.poll() is None, f"the worker exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"never ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

        health = subprocess.run(
            [*image.demote, *healthcheck_command(python=str(image.venv / "bin" / "python"))],
            env=env,
            cwd=image.home,
            capture_output=True,
            timeout=30,
        )
        assert health.returncode == 0, health.stderr.decode(errors="replace")

        stop = getattr(signal, only(final_stage(), "STOPSIGNAL").args)
        process.send_signal(stop)
        grace = Settings.from_env(env).shutdown_grace + MIN_DRAIN_MARGIN
        assert process.wait(timeout=grace) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# --- The query API's keys: a secret reference on both platforms -------------------------------


def test_deployment_reads_the_query_keys_from_an_optional_secret() -> None:
    """WORKER_QUERY_KEYS comes from a Kubernetes Secret, never as a value; the Secret is
    optional (without it the query is off), and the worker reads that name as a secret."""
    secret_env = deployment_secret_env()
    assert set(secret_env) == REFERENCED_SECRETS
    assert REFERENCED_SECRETS.issubset(settings_read_by_worker() & SECRET_SETTINGS)
    reference = secret_env["WORKER_QUERY_KEYS"]
    assert reference["name"] and reference["key"] == "WORKER_QUERY_KEYS"
    assert reference["optional"] is True, "without the Secret the pods start, the query is off"
    assert "WORKER_QUERY_KEYS" not in {spec.env for spec in SPECS}, "a secret has no CLI flag"


def bicep_secret_env(bicep: Bicep) -> dict[str, str]:
    """The container's env entries taken from the app's secrets: name -> secret name."""
    return {
        name: secret
        for name, secret in re.findall(
            r"name: '([^']+)'\s*\n(?:\s*//.*\n)*\s*secretRef: '([^']+)'", bicep.text
        )
    }


def test_bicep_takes_the_query_keys_from_key_vault() -> None:
    """WORKER_QUERY_KEYS is a Key Vault reference: a `secrets` entry with a versionless
    `keyVaultUrl` and the app's identity (no value), an env `secretRef` to it, and that
    identity may read that one secret; off (no entry) unless a vault is named."""
    bicep = Bicep.read()
    assert bicep.defaults["keyVaultName"] == "", "the query is off unless a vault is named"
    secret_env = bicep_secret_env(bicep)
    worker_secrets = {name for name in secret_env if name in settings_read_by_worker()}
    # The Bicep also references the webhooks' signing secrets (AKS takes no webhooks).
    assert worker_secrets == {*REFERENCED_SECRETS, "WORKER_WEBHOOK_SECRETS"}
    assert set(deployment_secret_env()) == REFERENCED_SECRETS

    assert "var queryKeysOn = !empty(keyVaultName) && !empty(queryKeysSecretName)" in bicep.text
    entries = bicep_block(bicep.text, "var queryKeysSecrets = queryKeysOn ? ")
    assert f"name: '{secret_env['WORKER_QUERY_KEYS']}'" in entries
    url = re.search(r"keyVaultUrl: '([^']+)'", entries)
    assert url, "a Key Vault reference"
    assert url.group(1).endswith("/secrets/${queryKeysSecretName}"), "versionless: rotations apply"
    assert "identity: identity.id" in entries
    assert "value:" not in entries, "the value stays in Key Vault"
    assert (
        "secrets: concat(appInsightsSecrets, queryKeysSecrets, mcpSecrets, webhookSecrets)"
        in bicep.text
    )
    assert "env: concat(baseEnv, appInsightsEnv, queryKeysEnv, mcpEnv, webhookEnv)" in bicep.text
    env_entries = bicep_block(bicep.text, "var queryKeysEnv = queryKeysOn ? ")
    assert "name: 'WORKER_QUERY_KEYS'" in env_entries

    role = re.search(r"^var (\w+) = '4633458b-17de-408a-b874-0445c86b69e6'$", bicep.text, re.M)
    assert role, "Key Vault Secrets User is declared"
    [assignment] = [
        block
        for block in bicep_blocks(
            bicep.text, "'Microsoft.Authorization/roleAssignments@2022-04-01' ="
        )
        if f"roleDefinitions', {role.group(1)})" in block and "scope: queryKeysSecret\n" in block
    ]  # the one secret, not the whole vault (the vault's role is for MCP tokens alone)
    assert "principalId: identity.properties.principalId" in assignment
    assert "queryKeysRole" in bicep_block(bicep.text, "dependsOn: [")


# --- What the linters of deploy/ ask for (make lint-deploy) ------------------------------------


def test_network_policy_admits_only_the_scraper_to_the_http_port() -> None:
    """The worker's pods take connections from one peer (the scraper's pods, by namespace AND
    pod labels, both set) on the HTTP port only; the policy selects exactly those pods."""
    kinds = manifests()
    policy = kinds["NetworkPolicy"]["spec"]
    template_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selected = policy["podSelector"]["matchLabels"]
    assert selected and selected.items() <= template_labels.items()
    assert selected == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    [peer] = rule["from"]
    assert set(peer) == {"namespaceSelector", "podSelector"}, "one peer with both selectors"
    assert peer["namespaceSelector"]["matchLabels"] and peer["podSelector"]["matchLabels"]
    [port] = rule["ports"]
    assert port == {"protocol": "TCP", "port": HTTP_PORT}
    assert worker_container()["ports"] == [{"name": "http", "containerPort": HTTP_PORT}]


def test_pods_mount_no_kubernetes_api_token() -> None:
    """Neither the pods nor their service account mount an API token: the worker never calls
    the Kubernetes API, and workload identity's webhook projects a token of its own."""
    kinds = manifests()
    assert pod_spec()["automountServiceAccountToken"] is False
    assert kinds["ServiceAccount"]["automountServiceAccountToken"] is False
    for volume in pod_spec().get("volumes", []):
        assert "projected" not in volume, "the webhook adds the token volume, not the manifest"


def test_container_has_cpu_and_memory_limits_and_a_digest() -> None:
    container = worker_container()
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["limits"]) and {"cpu", "memory"} <= set(
        resources["requests"]
    )
    assert re.fullmatch(r"\S+@sha256:[0-9a-f]{64}", container["image"]), "pinned by digest"


def checkov_skips() -> dict[str, list[str]]:
    """Every check of checkov skipped in deploy/ (check id -> where), with its reason."""
    skips: dict[str, list[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        for match in re.finditer(r"checkov:skip=(CKV\w+):(.*)", path.read_text()):
            assert match.group(2).strip(), f"{path.name}: skip {match.group(1)} without a reason"
            skips.setdefault(match.group(1), []).append(path.name)
    for kind, document in manifests().items():
        for key, value in document["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert reason.strip() and "=" not in reason, f"{kind} {key}: one reason, no '='"
                skips.setdefault(check, []).append(kind)
    return skips


def test_every_skipped_lint_check_is_explained_in_the_deploy_readme() -> None:
    skips = checkov_skips()
    assert skips, "the skips were not found (so this test means nothing)"
    readme = (DEPLOY / "README.md").read_text()
    missing = sorted(check for check in skips if f"`{check}`" not in readme)
    assert missing == [], "deploy/README.md does not explain these skips"
