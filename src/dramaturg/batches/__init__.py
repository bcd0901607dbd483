"""Batches: many tasks as one job, with progress and callbacks when they have all ended.

::

    batch = dramaturg.batch("import users.csv", on_complete=report.message(), on_success=notify.message())
    with batch:                                  # messages sent inside belong to it
        import_user.send_many(rows)              # streamed: 100,000 members, one chunk in memory
    dramaturg.batch_status(batch.id)             # total, succeeded, failed, held, running, pending,
                                                 # percent, rate, eta_s, started_at, finished_at

- Members are counted **by message id**: a retried, redelivered or re-run member counts
  once. A member that ends held, or rejected into the dead-letter queue, counts as
  failed, so no member leaves the batch waiting; a held member that is kicked and then
  succeeds moves from failed to succeeded.
- A batch is **sealed** when its ``with`` block ends (or at :meth:`Batch.close`); no
  callback fires before. A member may send more members into its own batch (a task that
  fans out: the batch id travels in the message's options, and a message sent from a
  running member joins its batch); they join before that member ends, so the batch can
  never look finished early.
- ``on_complete`` is sent **once**, when the batch is sealed and every member has ended,
  whatever the outcomes; ``on_success`` once, when every member succeeded (possibly
  later, after kicks). Each is an ordinary message (outcomes, retries, context apply)
  with the batch's summary (:meth:`BatchStatus.to_dict`) appended to its arguments, and
  a message id derived from the batch id and the event.
- A batch made inside another batch's ``with`` block (or inside a member) is **one
  member** of it, ending when its own ``on_complete`` fires.
- ``dramaturg.current_task().progress(0.4, "row 4,000 of 10,000")`` in a member shows in
  the batch's status (and in the task's own, :func:`dramaturg.task_status`).
- A member whose send fails leaves the batch again (see
  :meth:`~dramaturg.batches.tracker.BatchTracker.forget_unsent`).

The state lives in the state store (``[state] url``, else the broker's own Redis; in
memory in eager mode) and expires ``[batch] ttl`` (default 7 days) after the batch
ends. How and when it is written: :mod:`dramaturg.batches.writer`. Cancelling a batch
(its members that have not ended): :func:`dramaturg.cancel_batch`; a cancelled member
counts as ``cancelled``, neither succeeded nor failed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

import dramatiq

from ..errors import BatchNotFound, BrokerUnreachable
from .summary import BatchStatus, MemberProgress, from_fields
from .tracker import _current, current_batch_id, tracker_of

if TYPE_CHECKING:
    from ..cancelling import BatchCancellation

__all__ = ["Batch", "BatchStatus", "MemberProgress", "batch", "batch_status", "batches"]


class Batch:
    """A batch of tasks; make one with :func:`batch`. ``id`` names it for its whole life."""

    def __init__(
        self,
        name: str,
        *,
        on_complete: dramatiq.Message[Any] | None = None,
        on_success: dramatiq.Message[Any] | None = None,
        broker: dramatiq.Broker | None = None,
    ) -> None:
        if broker is None:
            from ..app import get_broker

            broker = get_broker()
        self.broker = broker
        self.name = name
        self.id = str(uuid.uuid4())
        self._tracker = tracker_of(broker)
        self._tokens: list[Token[Batch | None]] = []
        self._closed = False
        fields = {"name": name, "created_at": str(int(time.time() * 1000))}
        for event, message in (("complete", on_complete), ("success", on_success)):
            if message is not None:
                fields[f"on_{event}"] = json.dumps(message.asdict(), separators=(",", ":"))
        parent = current_batch_id()
        if parent is not None:
            fields["parent"], fields["parent_member"] = parent, f"batch:{self.id}"
        state = self._tracker.state(broker)
        try:
            state.create(self.id, fields)
            if parent is not None:
                state.add(parent, [fields["parent_member"]])  # before anything can end: it counts as one member
        except BatchNotFound:
            raise
        except Exception as error:  # the store's client error, translated at the boundary
            raise BrokerUnreachable(
                f"the state store did not answer, so batch {name!r} was not made: {type(error).__name__}: {error}"
            ) from None

    def __enter__(self) -> Batch:
        if self._closed:
            raise RuntimeError(f"batch {self.id} is sealed: members can no longer be added from outside")
        self._tokens.append(_current.set(self))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        _current.reset(self._tokens.pop())
        if not self._tokens:
            self.close()

    def close(self) -> None:
        """Seal the batch: members can only be added by its own members from now on. Its
        callbacks fire once every member has ended (now, if they all have). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._tracker.seal(self.broker, self.id)

    def status(self) -> BatchStatus:
        """:func:`batch_status` of this batch."""
        return batch_status(self.id, self.broker)

    def cancel(self, *, by: str | None = None) -> BatchCancellation:
        """:func:`dramaturg.cancel_batch` of this batch: its members that have not ended are cancelled."""
        from ..cancelling import cancel_batch

        return cancel_batch(self.id, by=by, broker=self.broker)

    def __repr__(self) -> str:
        return f"<Batch {self.name!r} {self.id}>"


def batch(
    name: str,
    *,
    on_complete: dramatiq.Message[Any] | None = None,
    on_success: dramatiq.Message[Any] | None = None,
    broker: dramatiq.Broker | None = None,
) -> Batch:
    """A new, open batch called ``name`` (made in the state store at once, so ``batch.id``
    can be shown before anything is sent). ``on_complete``/``on_success``: messages
    (``actor.message(...)``) sent once, with the batch's summary as their last argument.

    Raises :class:`~dramaturg.StateUnavailable` when there is no state store (RabbitMQ
    without ``[state] url``), :class:`~dramaturg.BrokerUnreachable` when it does not
    answer, and :class:`~dramaturg.BatchNotFound` when the batch it would be a member of
    is gone.
    """
    return Batch(name, on_complete=on_complete, on_success=on_success, broker=broker)


def batch_status(batch_id: str, broker: dramatiq.Broker | None = None) -> BatchStatus:
    """Where the batch ``batch_id`` stands; raises :class:`~dramaturg.BatchNotFound` for an
    unknown (or expired) id."""
    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    read = tracker_of(broker).state(broker).read(batch_id)
    if read is None:
        raise BatchNotFound(batch_id)
    return from_fields(batch_id, *read)


def batches(limit: int = 50, broker: dramatiq.Broker | None = None) -> Iterator[BatchStatus]:
    """The newest ``limit`` batches whose state is kept, newest first."""
    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    state = tracker_of(broker).state(broker)
    for batch_id in state.ids(limit):
        read = state.read(batch_id)
        if read is not None:
            yield from_fields(batch_id, *read)
