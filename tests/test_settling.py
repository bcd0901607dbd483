"""Redis and embedded: the acknowledgements of a worker's threads go to Redis together.

:class:`dramaturg.brokers.redis.settling.Settler` sends the messages its threads settle
while a call is out as one group; each thread still returns only once Redis has settled
its message, with its own answer, or raises the error of the call that carried it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest

import dramaturg

from .conftest import poll_until

pytestmark = pytest.mark.parametrize("broker_kind", ["redis", "embedded"])


def claimed_ids(broker: Any, queue: str, count: int) -> list[str]:
    """Send ``count`` tasks to ``queue`` and claim them as a worker's fetch does: their Redis ids."""

    @dramaturg.actor(queue_name=queue)
    def task(n: int) -> None:
        pass

    for n in range(count):
        task.send(n)
    bodies = broker.do_fetch(queue, count)
    assert len(bodies) == count
    return [dramatiq.Message.decode(body).options["redis_message_id"] for body in bodies]


def calls_of(broker: Any, gate: threading.Event | None = None) -> list[int]:
    """Patch the settler so that each script call records how many messages it carries
    (and the first waits for ``gate``); the list of those counts."""
    settler, calls = broker.settler, []
    call = settler._call

    def counted(args: list[Any]) -> Any:
        calls.append(messages_in(args))
        if gate is not None and len(calls) == 1:
            assert gate.wait(10)
        return call(args)

    settler._call = counted
    return calls


def batch_actors() -> tuple[Any, Any]:
    """A member actor on "settle" and one for a batch's ``on_complete``, for the test's broker."""

    @dramaturg.actor(queue_name="settle")
    def member(n: int) -> None:
        pass

    @dramaturg.actor(queue_name="settle-done")
    def report(summary: dict[str, Any]) -> None:
        pass

    return member, report


def claimed_ends(broker: Any, count: int) -> dict[str, tuple[Any, ...] | None]:
    """Claim ``count`` messages of "settle" as a worker's fetch does: each one's Redis id, in
    the queue's order, and for a batch member its end as the tracker leaves it on the message."""
    from dramaturg.batches.tracker import BATCH_OPTION, tracker_of

    state: Any = tracker_of(broker).state(broker)
    ends: dict[str, tuple[Any, ...] | None] = {}
    for body in broker.do_fetch("settle", count):
        message = dramatiq.Message.decode(body)
        batch_id = message.options.get(BATCH_OPTION)
        end = None if batch_id is None else (state.prefix, state.ttl_ms, batch_id, message.message_id, "s")
        ends[message.options["redis_message_id"]] = end
    assert len(ends) == count
    return ends


def claimed_batch(broker: Any, name: str, count: int) -> tuple[Any, dict[str, tuple[Any, ...]]]:
    """A batch of ``count`` claimed members, with an ``on_complete``: the batch, and each
    member's entry in settle.lua's call (as Settler.settle makes it), by Redis id."""
    member, report = batch_actors()
    batch = dramaturg.batch(name, on_complete=report.message())
    with batch:
        member.send_many(range(count))
    ends = claimed_ends(broker, count)
    return batch, {redis_id: ("A", "settle", redis_id, *end) for redis_id, end in ends.items() if end}


def messages_in(args: list[Any]) -> int:
    """How many messages a call of settle.lua carries (its entries: see the script)."""
    count, i = 0, 2
    while i < len(args):
        kind = args[i]
        count += kind != "B"
        i += {"B": 5, "AM": 4, "NM": 4, "m": 6}.get(kind, 3)
    return count


def in_threads(work: Callable[[str], Any], ids: list[str]) -> tuple[dict[str, Any], list[threading.Thread]]:
    results: dict[str, Any] = {}

    def run(redis_id: str) -> None:
        try:
            results[redis_id] = work(redis_id)
        except Exception as error:
            results[redis_id] = error

    threads = [threading.Thread(target=run, args=(redis_id,)) for redis_id in ids]
    for thread in threads:
        thread.start()
    return results, threads


def test_acknowledgements_that_come_while_one_is_out_go_together(broker: Any) -> None:
    # Given 8 claimed messages, and a first acknowledgement whose call is slow to come back
    ids = claimed_ids(broker, "settle", 8)
    gate = threading.Event()
    calls = calls_of(broker, gate)
    first, threads = in_threads(lambda redis_id: broker.do_ack("settle", redis_id), ids[:1])
    poll_until(lambda: calls == [1], "the first call out")

    # When 7 more threads acknowledge theirs meanwhile
    results, more = in_threads(lambda redis_id: broker.do_ack("settle", redis_id), ids[1:])
    poll_until(lambda: broker.settler.waiting == 7, "7 acknowledgements waiting")
    assert not results, "a thread returned before Redis had settled its message"
    gate.set()
    for thread in threads + more:
        thread.join(10)

    # Then they went in one call, after the first, and each got its own answer
    assert calls == [1, 7]
    assert {**first, **results} == dict.fromkeys(ids, 1)
    # and Redis settled them all: no body, no claim left
    assert broker.client.hlen(f"{broker.namespace}:settle.msgs") == 0
    assert broker.client.scard(f"{broker.namespace}:__acks__.{broker.broker_id}.settle") == 0


def test_each_message_of_a_group_gets_its_own_answer(broker: Any) -> None:
    # Given a claimed message, one whose claim another worker took (recovered while this
    # one was taken for dead), one settled already, and one to reject
    mine, recovered, settled, rejected = claimed_ids(broker, "settle", 4)
    broker.client.srem(f"{broker.namespace}:__acks__.{broker.broker_id}.settle", recovered)
    assert broker.do_ack("settle", settled) == 1

    # When they are settled in one group
    gate = threading.Event()
    calls = calls_of(broker, gate)
    first, threads = in_threads(lambda redis_id: broker.do_ack("settle", redis_id), [mine])
    poll_until(lambda: calls == [1], "the first call out")
    acks, more = in_threads(lambda redis_id: broker.do_ack("settle", redis_id), [recovered, settled])
    nacks, last = in_threads(lambda redis_id: broker.do_nack("settle", redis_id), [rejected])
    poll_until(lambda: broker.settler.waiting == 3, "3 waiting")
    gate.set()
    for thread in threads + more + last:
        thread.join(10)

    # Then each answer is its own: settled, another worker's (left alone), gone already
    assert calls == [1, 3]
    assert (first[mine], acks[recovered], acks[settled], nacks[rejected]) == (1, 0, -1, 1)
    assert broker.client.hexists(f"{broker.namespace}:settle.msgs", recovered)
    # and the rejected one is among the dead letters, with its body
    assert broker.client.zscore(f"{broker.namespace}:settle.XQ", rejected) is not None
    assert broker.client.hexists(f"{broker.namespace}:settle.XQ.msgs", rejected)


def test_a_failed_call_fails_every_message_it_carried_and_the_next_group_goes_on(broker: Any) -> None:
    # Given a call that fails (Redis did not answer) while 3 threads wait behind it
    ids = claimed_ids(broker, "settle", 5)
    gate = threading.Event()
    settler, sizes = broker.settler, []
    call = settler._call

    def failing_second(args: list[Any]) -> Any:
        sizes.append((len(args) - 2) // 3)
        if len(sizes) == 1:
            assert gate.wait(10)
        if len(sizes) == 2:
            raise ConnectionError("test: no answer")
        return call(args)

    settler._call = failing_second
    first, threads = in_threads(lambda redis_id: broker.do_ack("settle", redis_id), ids[:1])
    poll_until(lambda: sizes == [1], "the first call out")
    group, more = in_threads(lambda redis_id: broker.do_ack("settle", redis_id), ids[1:4])
    poll_until(lambda: settler.waiting == 3, "3 waiting")
    gate.set()
    for thread in threads + more:
        thread.join(10)

    # Then each of the 3 raised the error, as its own call would have, and they are still claimed
    assert first == {ids[0]: 1}
    assert all(isinstance(group[redis_id], ConnectionError) for redis_id in ids[1:4]), group
    assert broker.client.scard(f"{broker.namespace}:__acks__.{broker.broker_id}.settle") == 4
    # and the next acknowledgement is sent at once (no thread is left marked as sending)
    assert broker.do_ack("settle", ids[4]) == 1
    # and the 3 are settled when tried again, as Dramatiq's worker tries again
    assert [broker.do_ack("settle", redis_id) for redis_id in ids[1:4]] == [1, 1, 1]


def test_a_worker_settles_every_task_through_it(broker: Any, start_worker: Callable[..., dramatiq.Worker]) -> None:
    # Given 200 tasks and a worker of 8 threads
    ran: list[int] = []

    @dramaturg.actor(queue_name="settle")
    def task(n: int) -> None:
        ran.append(n)

    for n in range(200):
        task.send(n)
    calls = calls_of(broker)

    # When it runs them
    start_worker(threads=8)
    poll_until(lambda: len(ran) >= 200, "the 200 tasks ran")
    poll_until(lambda: sum(calls) >= 200, "the 200 acknowledged")

    # Then each ran once, and none is left claimed or queued
    assert sorted(ran) == list(range(200))
    assert sum(calls) == 200
    assert broker.client.hlen(f"{broker.namespace}:settle.msgs") == 0
    assert broker.client.scard(f"{broker.namespace}:__acks__.{broker.broker_id}.settle") == 0


def test_a_batch_members_end_goes_with_its_acknowledgement_and_one_that_fires_leaves_it_claimed(broker: Any) -> None:
    # Given a sealed batch of two claimed members
    member, report = batch_actors()
    batch = dramaturg.batch("settle", on_complete=report.message())
    with batch:
        member.send_many(range(2))
    acks = f"{broker.namespace}:__acks__.{broker.broker_id}.settle"
    first, last = claimed_ends(broker, 2).items()

    # When the first is acknowledged with its end
    # Then it is settled and counted, in that one call
    assert broker.do_ack("settle", *first) == 1
    assert not broker.client.sismember(acks, first[0])
    assert (batch.status().succeeded, batch.status().state) == (1, "running")

    # When the last is acknowledged with its end, which completes the batch
    # Then the end is counted and its events are the answer, but the message stays claimed
    # (its callbacks are published before it is settled)
    assert broker.do_ack("settle", *last) == ["complete", "success"]
    assert broker.client.sismember(acks, last[0])
    assert broker.client.hexists(f"{broker.namespace}:settle.msgs", last[0])
    assert (batch.status().succeeded, batch.status().state) == (2, "complete")

    # When the worker died before publishing them and the member's end comes again
    # Then it is counted once and fires again (the callback's message id is the same)
    assert broker.do_ack("settle", *last) == ["complete", "success"]
    assert batch.status().succeeded == 2

    # When the message is then acknowledged alone, it is settled
    assert broker.do_ack("settle", last[0]) == 1
    assert not broker.client.sismember(acks, last[0])


def test_the_batch_ends_of_one_group_are_written_together_and_what_they_fire_keeps_one_member_claimed(
    broker: Any,
) -> None:
    # Given a batch of three claimed members, two claimed members of a batch of three (its
    # third waits in another queue), and a claimed task of no batch
    member, report = batch_actors()

    @dramaturg.actor(queue_name="settle-later")
    def later(n: int) -> None:
        pass

    sealed = dramaturg.batch("three", on_complete=report.message())
    with sealed:
        member.send_many(range(3))
    waiting = dramaturg.batch("waits for one", on_complete=report.message())
    with waiting:
        member.send_many(range(2))
        later.send(2)
    member.send(9)
    ends = claimed_ends(broker, 6)

    # When the six are acknowledged in one group (after a first call out alone)
    gate = threading.Event()
    calls = calls_of(broker, gate)
    alone = claimed_ids(broker, "other", 1)
    first, threads = in_threads(lambda redis_id: broker.do_ack("other", redis_id), alone)
    poll_until(lambda: len(calls) == 1, "the first call out")
    results, more = in_threads(lambda redis_id: broker.do_ack("settle", redis_id, ends[redis_id]), list(ends))
    poll_until(lambda: broker.settler.waiting == 6, "6 waiting")
    gate.set()
    for thread in threads + more:
        thread.join(10)

    # Then they went in one call, and every end is counted
    assert calls == [1, 6]
    assert first == {alone[0]: 1}
    assert (sealed.status().succeeded, sealed.status().state) == (3, "complete")
    assert (waiting.status().succeeded, waiting.status().state) == (2, "running")
    # and the ends that completed the sealed batch fired its events once, on one message of
    # it (left claimed, to be settled once they are published): the others are settled
    fired = [redis_id for redis_id, answer in results.items() if answer != 1]
    assert len(fired) == 1, results
    assert results[fired[0]] == ["complete", "success"]
    assert ends[fired[0]] is not None and ends[fired[0]][2] == sealed.id
    acks = f"{broker.namespace}:__acks__.{broker.broker_id}.settle"
    assert broker.client.smembers(acks) == {fired[0].encode()}


def test_a_call_tried_again_keeps_what_fires_on_a_member_still_claimed(broker: Any) -> None:
    # Given a batch of three claimed members, one of them acknowledged with its end
    batch, entry = claimed_batch(broker, "tried again", 3)
    first, second, third = entry
    settler = broker.settler
    assert settler._send_group([entry[first]]) == [1]

    # When the other two go in one call that completes the batch (its reply lost: the worker
    # does not publish), and the worker tries both again in one call, in the other order
    answers = settler._send_group([entry[second], entry[third]])
    assert sorted(answers, key=str) == [1, ["complete", "success"]]
    held = (second, third)[answers.index(["complete", "success"])]
    settled = third if held == second else second
    again = settler._send_group([entry[held], entry[settled]])

    # Then the member still claimed keeps the events (it is not settled), though it comes
    # first now; the one settled by the first try answers "gone"
    assert again == [["complete", "success"], -1]
    acks = f"{broker.namespace}:__acks__.{broker.broker_id}.settle"
    assert broker.client.smembers(acks) == {held.encode()}
    assert (batch.status().succeeded, batch.status().state) == (3, "complete")
    # and, as a message keeps them, the batch is not in the firing index (the workers' sweep)
    firing = f"{entry[held][3]}~firing"  # the batch keys' prefix
    assert broker.client.zscore(firing, batch.id) is None

    # When that member is settled without publishing them, and a stray end of a settled one
    # comes again (a message recovered by another worker, say): no message holds what it
    # fires, so the batch goes to the firing index, for the workers' sweep
    assert settler._send_group([("a", "settle", held)]) == [1]
    assert settler._send_group([entry[settled]]) == [["complete", "success"]]
    assert broker.client.zscore(firing, batch.id) is not None


def test_a_message_twice_in_a_call_is_left_claimed_for_the_entry_that_keeps_what_fires(broker: Any) -> None:
    # Given a batch of two claimed members, the first acknowledged with its end
    batch, entry = claimed_batch(broker, "twice", 2)
    first, second = entry
    assert broker.settler._send_group([entry[first]]) == [1]

    # When the second is acknowledged twice in one call (it ran twice on this worker: taken
    # for dead meanwhile, it fetched the message again), and its end completes the batch
    answers = broker.settler._send_group([entry[second], entry[second]])

    # Then one entry keeps the events and the other leaves the message claimed for it
    assert answers == [0, ["complete", "success"]]
    acks = f"{broker.namespace}:__acks__.{broker.broker_id}.settle"
    assert broker.client.smembers(acks) == {second.encode()}
    assert broker.client.hexists(f"{broker.namespace}:settle.msgs", second)
    assert batch.status().succeeded == 2


def test_a_put_back_enqueues_its_copy_with_its_acknowledgement_and_only_while_it_is_claimed(broker: Any) -> None:
    from dramatiq.broker import MessageProxy

    from dramaturg.brokers.redis.consumer import PUT_BACK

    # Given two claimed messages, the second's claim taken by another worker (it was
    # recovered while this one was taken for dead), each put back to wait 1 s
    ids = claimed_ids(broker, "settle", 2)
    bodies = broker.client.hmget(f"{broker.namespace}:settle.msgs", ids)
    proxies = [MessageProxy(dramatiq.Message.decode(body)) for body in bodies]
    for proxy in proxies:
        assert broker.put_back_with_ack(proxy, proxy.copy(options={"dramaturg_waiting": "x"}), delay=1_000)
    broker.client.srem(f"{broker.namespace}:__acks__.{broker.broker_id}.settle", ids[1])

    # When their acknowledgements are sent (the first's twice, as after a lost reply)
    hooked: list[str] = []
    emit_after = broker.emit_after
    broker.emit_after = lambda signal, *args, **kw: (
        hooked.append(args[0].message_id) if signal == "enqueue" else None,
        emit_after(signal, *args, **kw),
    )
    answers = [
        broker.do_put_back("settle", redis_id, p.__dict__[PUT_BACK]) for redis_id, p in zip(ids, proxies, strict=True)
    ]
    again = broker.do_put_back("settle", ids[0], proxies[0].__dict__[PUT_BACK])

    # Then the first is settled and its copy is on the delay queue once, with its options;
    # the try after the lost reply finds it settled with its copy waiting, and the enqueue
    # hooks (the task's status: waiting) run for that copy as for the first try; the
    # second is left to the worker that recovered it, and no copy of it is made
    assert (answers, again) == ([1, 0], 1)
    assert hooked == [proxies[0].message_id, proxies[0].message_id]
    delayed = broker.client.lrange(f"{broker.namespace}:settle.DQ", 0, -1)
    assert len(delayed) == 1
    copy = dramatiq.Message.decode(broker.client.hget(f"{broker.namespace}:settle.DQ.msgs", delayed[0]))
    assert (copy.message_id, copy.options["dramaturg_waiting"]) == (proxies[0].message_id, "x")
    assert copy.options["eta"] > 0
    assert not broker.client.hexists(f"{broker.namespace}:settle.msgs", ids[0])
    assert broker.client.hexists(f"{broker.namespace}:settle.msgs", ids[1])


def test_a_delayed_message_now_due_is_moved_by_its_acknowledgement(
    broker: Any, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a task sent with a delay
    ran: list[int] = []

    @dramaturg.actor(queue_name="moved")
    def task(n: int) -> None:
        ran.append(n)

    task.send_with_options(args=(1,), delay=200)
    calls = calls_of(broker)
    enqueued: list[str] = []
    enqueue_once = broker._enqueue_once
    broker._enqueue_once = lambda **kw: enqueued.append(kw["keys"][0]) or enqueue_once(**kw)

    # When a worker moves it to its queue and runs it
    start_worker(threads=1)
    poll_until(lambda: ran == [1], "the delayed task ran")

    # Then the move was no write of its own: its acknowledgement from the delay queue carried it
    assert enqueued == []
    assert len(calls) >= 2  # the move, then the task's own acknowledgement


def test_one_call_settles_members_by_redis_id_or_member_id_and_ends_of_a_gone_batch(broker: Any) -> None:
    # Given a sealed batch of three claimed members, and two claimed tasks of another queue:
    # one whose end names a member id other than its Redis id (as a member sent again under
    # a new Redis id), the other an end of a batch that is gone
    from dramaturg.batches.tracker import tracker_of

    batch, entries = claimed_batch(broker, "by id", 3)
    state: Any = tracker_of(broker).state(broker)
    other, gone = claimed_ids(broker, "other", 2)
    group = [
        *entries.values(),
        ("A", "other", other, state.prefix, state.ttl_ms, batch.id, "sent-again", "s"),
        ("A", "other", gone, state.prefix, state.ttl_ms, "gone-batch", gone, "s"),
    ]

    # When they are settled in one call
    answers = broker.settler._send_group(group)

    # Then the member named by its member id counts (a member the batch did not know, as
    # an end it does not know counts), and as the batch's last end in the call whose
    # message is held here it keeps what fired; every other message is settled, the gone
    # batch's included, and nothing of that batch is made again
    assert answers == [1, 1, 1, ["complete", "success"], 1]
    status = batch.status()
    assert (status.total, status.succeeded, status.state) == (4, 4, "complete")
    members = state.members(batch.id)
    assert members["sent-again"] == "s" and sorted(members.values()) == ["s"] * 4
    assert broker.client.exists(f"{state.prefix}gone-batch", f"{state.prefix}gone-batch:m") == 0
    acks = f"{broker.namespace}:__acks__.{broker.broker_id}.other"
    assert broker.client.smembers(acks) == {other.encode()}
