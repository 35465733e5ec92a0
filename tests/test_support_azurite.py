"""Tests of the test helpers: Azurite launcher, TCP fault proxy, Node producer script."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.data.tables import TableServiceClient
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient
from azure.storage.queue import QueueClient

from tests.support.azurite import (
    DEV_ACCOUNT_KEY,
    REPO_ROOT,
    Azurite,
    AzuriteNotInstalledError,
    find_azurite_binary,
)
from tests.support.tcp_proxy import TcpProxy

SEND_MESSAGE_JS = REPO_ROOT / "tests" / "node" / "send_message.mjs"
NODE_TIMEOUT = 60.0
# A connection error must surface well before the SDK's default 15 s+ retry waits.
FAST_FAILURE_S = 5.0
CONNECTION_ERRORS = (ServiceRequestError, ServiceResponseError)


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    with Azurite() as instance:
        yield instance


@pytest.fixture
def table_proxy(azurite: Azurite) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", azurite.table_port) as proxy:
        yield proxy


@pytest.fixture
def proxied_tables(azurite: Azurite, table_proxy: TcpProxy) -> Iterator[TableServiceClient]:
    with _fast_tables(azurite.connection_string_with(table_port=table_proxy.port)) as service:
        yield service


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _fast_tables(connection_string: str) -> TableServiceClient:
    # Short retries and timeouts: the SDK defaults would turn a failure into minutes.
    return TableServiceClient.from_connection_string(
        connection_string,
        retry_total=1,
        retry_backoff_factor=0.1,
        connection_timeout=5,
        read_timeout=20,
    )


def _send_with_node(
    connection_string: str, queue_name: str, body: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(SEND_MESSAGE_JS), queue_name, body],
        cwd=REPO_ROOT,
        env={**os.environ, "AzureWebJobsStorage": connection_string},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )


# -- Azurite -------------------------------------------------------------------------


def test_azurite_reports_ports_and_connection_string(azurite: Azurite) -> None:
    ports = {azurite.blob_port, azurite.queue_port, azurite.table_port}
    assert len(ports) == 3
    assert all(p > 0 for p in ports)
    assert azurite.running
    assert azurite.startup_seconds is not None
    assert azurite.startup_seconds < 30
    assert azurite.account_key == DEV_ACCOUNT_KEY
    assert azurite.connection_string == (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={DEV_ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{azurite.blob_port}/devstoreaccount1;"
        f"QueueEndpoint=http://127.0.0.1:{azurite.queue_port}/devstoreaccount1;"
        f"TableEndpoint=http://127.0.0.1:{azurite.table_port}/devstoreaccount1;"
    )
    moved = azurite.connection_string_with(table_port=1111)
    assert "TableEndpoint=http://127.0.0.1:1111/devstoreaccount1;" in moved
    assert f"QueueEndpoint=http://127.0.0.1:{azurite.queue_port}/" in moved
    moved = azurite.connection_string_with(queue_port=2222)
    assert "QueueEndpoint=http://127.0.0.1:2222/devstoreaccount1;" in moved
    assert f"TableEndpoint=http://127.0.0.1:{azurite.table_port}/" in moved


def test_azurite_uses_disk_location(azurite: Azurite) -> None:
    assert azurite.location.is_dir()
    assert any(azurite.location.iterdir())


def test_find_azurite_binary_missing_raises_with_hint(tmp_path: Path) -> None:
    with pytest.raises(AzuriteNotInstalledError, match="make test"):
        find_azurite_binary(tmp_path)
    assert find_azurite_binary().is_file()


def test_azurite_stop_kills_group_and_removes_location() -> None:
    instance = Azurite(stop_timeout=1.0).start()
    pid, location = instance.pid, instance.location
    # A stopped process leaves SIGTERM pending, like a frozen Azurite: SIGKILL must follow.
    os.killpg(pid, signal.SIGSTOP)
    began = time.monotonic()
    instance.stop()
    elapsed = time.monotonic() - began
    assert not instance.running
    assert 0.9 <= elapsed < 5.0
    assert not location.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    instance.stop()  # idempotent


# -- Node producer -> Python consumer ------------------------------------------------


def test_node_message_is_received_by_python_as_plain_text(azurite: Azurite) -> None:
    queue_name = _unique("nodeq")
    body = json.dumps({"kind": "test", "text": "héllo ✓", "n": 1})
    with QueueClient.from_connection_string(azurite.connection_string, queue_name) as queue:
        queue.create_queue()

        result = _send_with_node(azurite.connection_string, queue_name, body)

        assert result.returncode == 0, result.stderr
        message_id = json.loads(result.stdout)["messageId"]
        received = []
        for message in queue.receive_messages(max_messages=1, visibility_timeout=30):
            received.append(message)
            break  # the pager keeps leasing pages otherwise
        assert len(received) == 1
        assert received[0].id == message_id
        assert received[0].content == body  # plain text, no Base64
        queue.delete_message(received[0])


def test_node_script_creates_missing_queue(azurite: Azurite) -> None:
    queue_name = _unique("newq")
    result = _send_with_node(azurite.connection_string, queue_name, '{"a": 1}')
    assert result.returncode == 0, result.stderr
    with QueueClient.from_connection_string(azurite.connection_string, queue_name) as queue:
        assert queue.get_queue_properties().approximate_message_count == 1


def test_node_script_fails_readably(azurite: Azurite) -> None:
    with TcpProxy("127.0.0.1", azurite.queue_port) as proxy:
        proxy.set_down(True)
        began = time.monotonic()
        result = _send_with_node(
            azurite.connection_string_with(queue_port=proxy.port), _unique("downq"), "{}"
        )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("send_message: ")
    assert time.monotonic() - began < 20
    usage = subprocess.run(
        ["node", str(SEND_MESSAGE_JS)], capture_output=True, text=True, timeout=NODE_TIMEOUT
    )
    assert usage.returncode == 2
    assert "usage" in usage.stderr


# -- TcpProxy against the table service ----------------------------------------------


def test_table_entity_through_proxy(
    azurite: Azurite, table_proxy: TcpProxy, proxied_tables: TableServiceClient
) -> None:
    table_name = _unique("proxied")
    table = proxied_tables.create_table(table_name)
    table.create_entity({"PartitionKey": "p", "RowKey": "r", "value": 42})

    assert table.get_entity("p", "r")["value"] == 42
    assert table_proxy.connections_accepted >= 1
    with _fast_tables(azurite.connection_string) as direct:
        assert direct.get_table_client(table_name).get_entity("p", "r")["value"] == 42


def test_proxy_down_fails_fast_then_recovers(
    table_proxy: TcpProxy, proxied_tables: TableServiceClient
) -> None:
    table_name = _unique("downup")
    table = proxied_tables.create_table(table_name)
    table.create_entity({"PartitionKey": "p", "RowKey": "r"})

    table_proxy.set_down(True)
    began = time.monotonic()
    with pytest.raises(CONNECTION_ERRORS):
        table.get_entity("p", "r")
    assert time.monotonic() - began < FAST_FAILURE_S
    assert table_proxy.connections_rejected >= 1

    table_proxy.set_down(False)
    assert table.get_entity("p", "r")["RowKey"] == "r"


def test_proxy_down_cuts_request_in_flight(
    table_proxy: TcpProxy, proxied_tables: TableServiceClient
) -> None:
    table_name = _unique("inflight")
    table = proxied_tables.create_table(table_name)
    table.create_entity({"PartitionKey": "p", "RowKey": "r"})
    table_proxy.set_delay(10.0)  # holds the request inside the proxy
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            table.get_entity("p", "r")
            outcome.append(None)
        except BaseException as exc:  # handed to the main thread to assert on
            outcome.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    began = time.monotonic()
    worker.start()
    deadline = began + 5.0
    while table_proxy.active_connections == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert table_proxy.active_connections >= 1
    table_proxy.set_down(True)
    worker.join(timeout=FAST_FAILURE_S)

    assert not worker.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], CONNECTION_ERRORS)
    assert time.monotonic() - began < 10.0
    # The proxy forgets a cut connection on its own threads: give it a bounded moment.
    settle = time.monotonic() + 2.0
    while table_proxy.active_connections and time.monotonic() < settle:
        time.sleep(0.02)
    assert table_proxy.active_connections == 0


def test_proxy_delay_adds_latency(
    table_proxy: TcpProxy, proxied_tables: TableServiceClient
) -> None:
    table_name = _unique("slow")
    table = proxied_tables.create_table(table_name)
    table.create_entity({"PartitionKey": "p", "RowKey": "r"})

    table_proxy.set_delay(0.5)
    began = time.monotonic()
    table.get_entity("p", "r")
    slow = time.monotonic() - began
    table_proxy.set_delay(0)
    began = time.monotonic()
    table.get_entity("p", "r")
    fast = time.monotonic() - began

    assert slow >= 0.5  # at least one delayed chunk each way would make it >= 1.0
    assert fast < 0.5


def test_proxy_works_with_async_clients_across_event_loops(
    azurite: Azurite, table_proxy: TcpProxy
) -> None:
    connection_string = azurite.connection_string_with(table_port=table_proxy.port)
    table_name = _unique("async")

    async def create() -> None:
        async with AsyncTableServiceClient.from_connection_string(connection_string) as svc:
            table = await svc.create_table(table_name)
            await table.create_entity({"PartitionKey": "p", "RowKey": "r", "v": 1})

    async def read_while_down() -> None:
        async with AsyncTableServiceClient.from_connection_string(
            connection_string, retry_total=1, retry_backoff_factor=0.1
        ) as svc:
            with pytest.raises(CONNECTION_ERRORS):
                await svc.get_table_client(table_name).get_entity("p", "r")

    async def read() -> int:
        async with AsyncTableServiceClient.from_connection_string(connection_string) as svc:
            entity = await svc.get_table_client(table_name).get_entity("p", "r")
            return int(entity["v"])

    asyncio.run(asyncio.wait_for(create(), timeout=30))
    table_proxy.set_down(True)
    began = time.monotonic()
    asyncio.run(asyncio.wait_for(read_while_down(), timeout=30))
    assert time.monotonic() - began < FAST_FAILURE_S
    table_proxy.set_down(False)
    assert asyncio.run(asyncio.wait_for(read(), timeout=30)) == 1


def test_proxy_stop_is_bounded_with_open_connections(azurite: Azurite) -> None:
    proxy = TcpProxy("127.0.0.1", azurite.table_port).start()
    with _fast_tables(azurite.connection_string_with(table_port=proxy.port)) as service:
        service.create_table(_unique("stop"))  # leaves a keep-alive connection open
        assert proxy.active_connections >= 1
        began = time.monotonic()
        proxy.stop()
        assert time.monotonic() - began < 2.0
        assert proxy.active_connections == 0
