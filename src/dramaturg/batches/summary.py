"""What a batch's status says: :class:`BatchStatus`, made from its stored fields."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BatchStatus", "MemberProgress", "from_fields"]

#: Running members' progress shown in a status, at most.
PROGRESS_SHOWN = 20


@dataclass(frozen=True)
class MemberProgress:
    """The last ``task.progress()`` of a member that has not ended."""

    message_id: str
    #: 0.0 to 1.0.
    fraction: float
    text: str


@dataclass(frozen=True)
class BatchStatus:
    """Where a batch stands. Counts are members; times are ms since the epoch.

    ``failed`` counts the members that ended in failure: held ones (``held`` says how
    many of them) and rejected ones; ``cancelled`` those cancelled (never counted as
    failed). ``pending`` are sent and not started (or
    waiting for a retry); ``running`` have started and not ended.
    """

    batch_id: str
    name: str
    #: open (members may still be added from outside), running (sealed, members left),
    #: complete (every member ended; ``on_complete`` fired).
    state: str
    total: int
    succeeded: int
    failed: int
    held: int
    running: int
    pending: int
    #: Ended members, plus the running members' progress fractions, over the total: 0 to 100.
    percent: float
    #: Members ended per second since the batch was made (None before the first end).
    rate: float | None
    #: Seconds until every member has ended at that rate (None when unknown).
    eta_s: float | None
    started_at: int
    finished_at: int | None
    #: Every member succeeded (``on_success`` fired); a kicked member may make it so later.
    succeeded_all: bool
    #: The batch this one is a member of, if any.
    parent: str | None = None
    progress: list[MemberProgress] = field(default_factory=list)
    #: Members cancelled (:func:`dramaturg.cancel`, or the batch's cancel).
    cancelled: int = 0
    #: Who asked for the batch to be cancelled, and when (ms since the epoch), if anyone did.
    cancel_requested_by: str | None = None
    cancel_requested_at: int | None = None

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    def to_dict(self) -> dict[str, Any]:
        """Its fields as JSON-ready values (``progress`` as a list of objects)."""
        return {**asdict(self), "ended": self.ended}


def from_fields(batch_id: str, meta: Mapping[str, str], progress: Mapping[str, str] | None = None) -> BatchStatus:
    """A :class:`BatchStatus` from a batch's stored fields and its running members' progress."""
    total, succeeded, failed = int(meta.get("total", 0)), int(meta.get("succeeded", 0)), int(meta.get("failed", 0))
    cancelled = int(meta.get("cancelled", 0))
    running = max(0, int(meta.get("running", 0)))
    ended = succeeded + failed + cancelled
    pending = max(0, total - ended - running)
    started_at = int(meta.get("created_at", 0))
    finished_at = int(meta["finished_at"]) if meta.get("finished_at") else None
    shown: list[MemberProgress] = []
    fractions = 0.0
    for message_id, value in (progress or {}).items():
        fraction_text, _, text = value.partition("|")
        fraction = min(1.0, max(0.0, float(fraction_text or 0)))
        fractions += fraction
        if len(shown) < PROGRESS_SHOWN:
            shown.append(MemberProgress(message_id, fraction, text))
    percent = 100.0 if total == 0 else min(100.0, 100.0 * (ended + fractions) / total)
    if "complete" in meta:
        state = "complete"
        percent = 100.0 if ended >= total else percent
    elif meta.get("sealed") == "1":
        state = "running"
    else:
        state = "open"
    until = finished_at if finished_at is not None else int(time.time() * 1000)
    elapsed_s = max(0.001, (until - started_at) / 1000)
    rate = ended / elapsed_s if ended else None
    eta_s = 0.0 if state == "complete" else ((total - ended) / rate if rate else None)
    return BatchStatus(
        batch_id=batch_id,
        name=meta.get("name", ""),
        state=state,
        total=total,
        succeeded=succeeded,
        failed=failed,
        held=int(meta.get("held", 0)),
        running=running,
        pending=pending,
        percent=round(percent, 2),
        rate=round(rate, 2) if rate is not None else None,
        eta_s=round(eta_s, 1) if eta_s is not None else None,
        started_at=started_at,
        finished_at=finished_at,
        succeeded_all="success" in meta,
        parent=meta.get("parent") or None,
        progress=sorted(shown, key=lambda p: p.message_id),
        cancelled=cancelled,
        cancel_requested_by=meta.get("cancel_requested_by") or None,
        cancel_requested_at=int(meta["cancel_requested_at"]) if meta.get("cancel_requested_at") else None,
    )
