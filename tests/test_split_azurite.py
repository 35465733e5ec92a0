"""SplitAzurite: the table service can be stopped and restarted alone, on its data."""

import asyncio
import contextlib

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue.aio import QueueServiceClient

from worker.devtools.azurite import SplitAzurite


async def _put_row(conn: str, table: str, row_key: str) -> None:
    async with TableServiceClient.from_connection_string(conn) as service:
        with contextlib.suppress(ResourceExistsError):
            await service.create_table(table)
        await service.get_table_client(table).create_entity(
            {"PartitionKey": "chat", "RowKey": row_key, "Content": f"value {row_key}"}
        )


async def _get_row(conn: str, table: str, row_key: str) -> str:
    async with TableServiceClient.from_connection_string(conn) as service:
        entity = await service.get_table_client(table).get_entity("chat", row_key)
        return str(entity["Content"])


async def _table_reachable(conn: str) -> bool:
    async with TableServiceClient.from_connection_string(
        conn, retry_total=0, connection_timeout=2, read_timeout=2
    ) as service:
        try:
            async for _ in service.list_tables():
                break
        except AzureError:
            return False
    return True


async def _send_and_receive(conn: str, queue: str, body: str) -> list[str]:
    async with QueueServiceClient.from_connection_string(
        conn, initial_backoff=0.2, increment_base=1, retry_total=2
    ) as service:
        client = service.get_queue_client(queue)
        with contextlib.suppress(ResourceExistsError):
            await client.create_queue()
        await client.send_message(body)
        return [
            str(m.content)
            async for m in client.receive_messages(messages_per_page=32, max_messages=32)
        ]


def test_table_data_survives_a_restart_and_queues_work_meanwhile(
    split_azurite: SplitAzurite,
) -> None:
    conn = split_azurite.connection_string
    port = split_azurite.table_port
    asyncio.run(_put_row(conn, "SplitTest", "before"))

    split_azurite.stop_table()
    assert not split_azurite.table_running
    assert split_azurite.queue_running
    assert asyncio.run(_table_reachable(conn)) is False
    # The queue service keeps answering while the table service is down.
    assert asyncio.run(_send_and_receive(conn, "split-test", "during the outage")) == [
        "during the outage"
    ]

    split_azurite.start_table()
    assert split_azurite.table_port == port
    assert asyncio.run(_get_row(conn, "SplitTest", "before")) == "value before"
    asyncio.run(_put_row(conn, "SplitTest", "after"))
    assert asyncio.run(_get_row(conn, "SplitTest", "after")) == "value after"


def test_queue_data_survives_a_queue_restart(split_azurite: SplitAzurite) -> None:
    conn = split_azurite.connection_string
    asyncio.run(_put_row(conn, "SplitQueue", "row"))

    async def send(body: str) -> None:
        async with QueueServiceClient.from_connection_string(conn) as service:
            client = service.get_queue_client("split-restart")
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()
            await client.send_message(body)

    asyncio.run(send("kept"))
    split_azurite.stop_queue()
    # Tables keep answering while the queue service is down.
    assert asyncio.run(_get_row(conn, "SplitQueue", "row")) == "value row"
    split_azurite.start_queue()
    assert asyncio.run(_send_and_receive(conn, "split-restart", "second")) == ["kept", "second"]


def test_a_killed_table_service_restarts_on_its_port(split_azurite: SplitAzurite) -> None:
    """SIGKILL (a crash) and restart: the port is kept, data saved by a graceful stop survives.

    (Azurite saves every 5 s and on a graceful stop; a SIGKILL can lose the last seconds.)
    """
    conn = split_azurite.connection_string
    port = split_azurite.table_port
    asyncio.run(_put_row(conn, "SplitKill", "early"))
    split_azurite.stop_table()
    split_azurite.start_table()
    split_azurite.stop_table(kill=True)
    assert not split_azurite.table_running
    split_azurite.start_table()
    assert split_azurite.table_port == port
    assert asyncio.run(_get_row(conn, "SplitKill", "early")) == "value early"
