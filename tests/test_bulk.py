"""send_many: many tasks in chunks, each one a full message; failures say what was not sent.
On RabbitMQ, Redis and embedded."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.bulk import BulkSendError, Call

from .apps.bulk_cut import CutAt, cut_the_confirm_window
from .conftest import Runs, pending_messages


def test_send_many_sends_each_item_as_its_own_task(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    # Given 2,500 rows, sent in chunks of 1,000 from the French store, urgently
    seen: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    all_done = threading.Event()

    @dramaturg.actor(queue_name="bulk")
    def import_user(row: dict[str, Any]) -> None:
        task = dramaturg.current_task()
        with lock:
            seen.append((row["id"], task.context["store"], task.message_id))
            if len(seen) == 2_500:
                all_done.set()

    rows = ({"id": n, "email": f"user{n}@example.com"} for n in range(2_500))  # a generator: streamed
    with dramaturg.context(store="fr"):
        result = import_user.send_many(rows, chunk_size=1_000, priority=0)

    # When a worker runs them
    assert result.sent == 2_500 and result.rate > 0
    worker = start_worker(threads=8)
    assert all_done.wait(60)
    worker.join()

    # Then each row ran once, in its own message, with the sender's context
    assert sorted(n for n, _, _ in seen) == list(range(2_500))
    assert {store for _, store, _ in seen} == {"fr"}
    assert len({message_id for _, _, message_id in seen}) == 2_500
    assert pending_messages(broker, "bulk") == 0


def test_items_can_be_argument_tuples_or_calls_and_options_apply(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="bulk")
    def notify(user_id: int, kind: str = "welcome") -> None:
        runs.record(user=user_id, kind=kind)

    notify.send_many([(1, "reset"), Call(2, kind="digest"), 3])
    result = notify.send_many([4, 5], delay=60_000)  # delayed: waiting, not run now
    assert result.sent == 2
    assert pending_messages(broker, "bulk") == 5

    start_worker()
    seen = runs.wait(3)  # (not worker.join(): that would wait out the delayed ones)
    assert sorted((run["user"], run["kind"]) for run in seen) == [(1, "reset"), (2, "digest"), (3, "welcome")]


def queued_ids(broker: Any, queue_name: str) -> set[str]:
    """The message ids of every message waiting on a RabbitMQ queue (taken off it)."""
    import pika

    connection = pika.BlockingConnection(broker.parameters)
    try:
        channel = connection.channel()
        ids = set()
        while True:
            method, properties, _ = channel.basic_get(queue_name, auto_ack=True)
            if method is None:
                return ids
            ids.add(properties.message_id)
    finally:
        connection.close()


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_rabbitmq_a_connection_cut_mid_chunk_never_reports_a_delivered_message_as_not_sent(
    broker: dramatiq.Broker, request: pytest.FixtureRequest
) -> None:
    # Given an actor, and RabbitMQ closing the sender's connection as the 2,500th message
    # of a 5,000-message chunk is about to be published
    @dramaturg.actor(queue_name="bulk")
    def import_user(n: int) -> None: ...

    management_url = request.getfixturevalue("rabbitmq_server").management_url
    broker.add_middleware(CutAt(2_500, cut_the_confirm_window(management_url)))

    # When the chunk is sent
    with pytest.raises(BulkSendError) as raised:
        import_user.send_many(range(5_000), chunk_size=5_000)

    # Then every message is sent, unknown or not sent, and what RabbitMQ has agrees:
    # all the confirmed ones, none of the "not sent" ones, and no more than the unknown besides
    error = raised.value
    on_queue = queued_ids(broker, "bulk")
    not_sent = {message.message_id for message in error.unsent}
    assert not on_queue & not_sent, f"{len(on_queue & not_sent)} messages on the queue were reported as not sent"
    unknown = {message.message_id for message in error.unknown}
    assert error.next_item == 5_000
    assert error.sent + len(error.unsent) + len(error.unknown) == 5_000
    assert "CONNECTION_FORCED" in error.reason, error.reason
    assert error.sent <= len(on_queue) <= error.sent + len(unknown)
    assert 0 < len(not_sent) <= 2_501  # the first 2,499 were published before the cut
    if unknown:
        assert f"{len(unknown)} messages of the failing chunk may or may not have been delivered" in str(error)


class ReplyDropper:
    """A loopback TCP proxy to a Redis server that can lose one reply (the request reached
    Redis and ran; its answer is discarded and the connection closed) or stop listening."""

    def __init__(self, upstream: tuple[str, int] | str) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.drop: bytes | None = None
        self.dropped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.stopped = False
        self.bypass: Callable[[], None] = lambda: None  # connects its client straight to Redis again
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next_reply(self, containing: bytes) -> None:
        self.drop = containing

    def stop(self) -> None:
        """Nothing listens on the port any more, and every connection is closed."""
        self.stopped = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone would not)
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.stopped:
                client.close()
                return
            if isinstance(self.upstream, str):
                server = socket.socket(socket.AF_UNIX)
                server.connect(self.upstream)
            else:
                server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self.drop is not None and self.drop in data:
                    self.drop = None
                    self.dropped.set()
                    break  # lost with the connection
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def redis_through_proxy(broker: dramatiq.Broker, broker_kind: str) -> Iterator[ReplyDropper]:
    """The broker's Redis client connected through a :class:`ReplyDropper`."""
    import redis

    if broker_kind == "rabbitmq":
        pytest.fail("a Redis test")
    kwargs = broker.client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    upstream = kwargs["path"] if "path" in kwargs else (kwargs["host"], kwargs["port"])
    proxy = ReplyDropper(upstream)
    client = broker.client  # type: ignore[attr-defined]
    direct = client.connection_pool
    client.connection_pool = redis.ConnectionPool(host="127.0.0.1", port=proxy.port)
    proxy.bypass = lambda: setattr(client, "connection_pool", direct)
    yield proxy
    proxy.stop()
    proxy.bypass()


@pytest.mark.parametrize("broker_kind", ["redis", "embedded"])
def test_redis_a_lost_reply_reports_its_chunk_as_unknown_never_as_not_sent(
    broker: dramatiq.Broker, redis_through_proxy: ReplyDropper
) -> None:
    # Given an actor, and the reply to the last chunk of a send lost on its way back
    @dramaturg.actor(queue_name="bulk")
    def import_user(n: int) -> None: ...

    redis_through_proxy.drop_next_reply(containing=b":200\r\n")  # chunks of 500, 500, 200

    # When 1,200 are sent in chunks of 500
    with pytest.raises(BulkSendError) as raised:
        import_user.send_many(range(1_200), chunk_size=500)

    # Then the first two chunks are sent and the third unknown (not "not sent")...
    error = raised.value
    assert redis_through_proxy.dropped.is_set()
    assert error.unsent == [], f"{len(error.unsent)} messages reported as not sent"
    assert (error.sent, len(error.unknown), error.next_item) == (1_000, 200, 1_200)
    assert [m.args for m in error.unknown] == [(n,) for n in range(1_000, 1_200)]
    assert "200 messages of the failing chunk may or may not have been delivered" in str(error)
    # ...and rightly so: Redis ran it, once (the client did not run it again)
    redis_through_proxy.bypass()
    assert pending_messages(broker, "bulk") == 1_200


@pytest.mark.parametrize("broker_kind", ["redis", "embedded"])
def test_redis_a_refused_connection_reports_its_chunk_as_not_sent(
    broker: dramatiq.Broker, redis_through_proxy: ReplyDropper
) -> None:
    # Given a first send that went through, then nothing listening any more
    @dramaturg.actor(queue_name="bulk")
    def import_user(n: int) -> None: ...

    assert import_user.send_many(range(100), chunk_size=100).sent == 100
    redis_through_proxy.stop()

    # When more are sent
    with pytest.raises(BulkSendError) as raised:
        import_user.send_many(range(300), chunk_size=100)

    # Then the first chunk is "not sent", certainly: no request was written
    error = raised.value
    assert (error.sent, len(error.unsent), error.unknown, error.next_item) == (0, 100, [], 100)
    assert "100 messages of the failing chunk were not sent" in str(error)
    assert "may or may not" not in str(error)
    redis_through_proxy.bypass()
    assert pending_messages(broker, "bulk") == 100


def test_bulk_ids_are_uuid4s_and_a_forked_sender_does_not_repeat_its_parents() -> None:
    import os
    import uuid

    from dramaturg.bulk import new_ids

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, " ".join(new_ids(100)).encode())
        os._exit(0)
    os.close(write)
    parent = new_ids(100)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    assert status == 0 and len(child) == 100
    assert not set(parent) & set(child)
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 for i in parent + child)
    assert all(str(uuid.UUID(i)) == i for i in parent)
