"""Queue statistics of the Redis and embedded brokers: one MULTI per refresh.

For a queue ``q`` (``<ns>`` is ``broker.namespace``), summed over its priority lanes
``q``, ``q.P1``, ``q.P2`` (always all three: a lane left over from when priorities were
on still holds the queue's messages):

- ready: ``LLEN <ns>:<lane>``, the ids waiting to be fetched;
- in flight: ``HLEN <ns>:<lane>.msgs`` minus ready. Dramatiq keeps a body there until it
  is acknowledged, and a fetch moves its id from the list into the fetching worker's
  claim set ``<ns>:__acks__.<worker id>.<lane>`` atomically, so the difference is what
  the claim sets hold, counted without a SCAN for them (a dead worker's claims count until
  they are recovered);
- delayed: ``HLEN <ns>:<lane>.DQ.msgs``: waiting in the delay queue, or claimed by a
  worker that holds them until they are due;
- dead: ``ZCARD <ns>:<lane>.XQ``, Dramatiq's dead letters (it expires them after a week);
- held: ``HLEN <ns>:__held__:<q>``, the held store;
- workers: the worker processes whose heartbeat under ``<ns>:__workers__:<q>`` is newer
  than ``broker.heartbeat_timeout`` (written by :class:`~dramaturg.middleware.RedisRecovery`
  in every dramaturg worker). Dramatiq's own ``__heartbeats__`` cannot say this: it does
  not record queues, and with Dramatiq a process that only sends writes a heartbeat there
  too.

All of it is read in one MULTI/EXEC, so the numbers are one consistent moment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from dramatiq.brokers.redis import RedisBroker as _DramatiqRedisBroker

from ...errors import BrokerUnreachable
from ...masking import mask_url
from ...queues import BANDS, canonical_queue
from ...stats import QueueStats, StatsReader
from .connection import glob_escape, text

if TYPE_CHECKING:
    from ...config import BrokerSettings

__all__ = ["RedisStatsReader"]

_LANE_SUFFIXES = [suffix for _, suffix in BANDS]
#: Keys of a queue, ``<ns>:<name><suffix>``, whose presence means the queue exists.
_PRESENCE_SUFFIXES = (".msgs", ".XQ")


class RedisStatsReader(StatsReader):
    """Reads queue statistics from the keys of a Redis broker (see the module docstring).

    ``broker`` is any Dramatiq Redis broker (its ``client``, ``namespace`` and
    ``heartbeat_timeout`` in ms are read); ``settings`` are its settings (for the URL an
    error names).
    """

    def __init__(self, broker: _DramatiqRedisBroker, settings: BrokerSettings) -> None:
        super().__init__(broker)
        self.client: redis.Redis = broker.client
        self.namespace: str = broker.namespace
        self.heartbeat_timeout_ms = int(broker.heartbeat_timeout)
        self.settings = settings

    def read(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        try:
            names = list(queues) if queues is not None else sorted(self.known_queues() | self._present())
            return self._read(names)
        except redis.RedisError as error:
            raise BrokerUnreachable(f"cannot reach Redis at {mask_url(self.settings.url)}: {error}") from None

    def _read(self, queues: Sequence[str]) -> list[QueueStats]:
        ns = self.namespace
        cutoff = int(time.time() * 1000) - self.heartbeat_timeout_ms
        with self.client.pipeline(transaction=True) as pipe:
            for queue in queues:
                for suffix in _LANE_SUFFIXES:
                    lane = f"{ns}:{queue}{suffix}"
                    pipe.llen(lane)
                    pipe.hlen(f"{lane}.msgs")
                    pipe.hlen(f"{lane}.DQ.msgs")
                    pipe.zcard(f"{lane}.XQ")
                pipe.hlen(f"{ns}:__held__:{queue}")
                pipe.zcount(f"{ns}:__workers__:{queue}", f"({cutoff}", "+inf")
            results: list[Any] = pipe.execute()
        rows = []
        per_queue = 4 * len(_LANE_SUFFIXES) + 2
        for index, queue in enumerate(queues):
            counts = [int(n) for n in results[index * per_queue : (index + 1) * per_queue]]
            lanes = [counts[i : i + 4] for i in range(0, 4 * len(_LANE_SUFFIXES), 4)]
            ready = sum(lane[0] for lane in lanes)
            rows.append(
                QueueStats(
                    queue=queue,
                    ready=ready,
                    delayed=sum(lane[2] for lane in lanes),
                    in_flight=max(sum(lane[1] for lane in lanes) - ready, 0),
                    held=counts[-2],
                    dead=sum(lane[3] for lane in lanes),
                    workers=counts[-1],
                )
            )
        return rows

    def _present(self) -> set[str]:
        """Queues that hold messages or dead letters, or have workers (SCAN, never KEYS)."""
        prefix = f"{self.namespace}:"
        found: set[str] = set()
        for key in self.client.scan_iter(match=glob_escape(prefix) + "*", count=1000):
            name = text(key)[len(prefix) :]
            if name.startswith("__workers__:"):
                found.add(name[len("__workers__:") :])
            elif not name.startswith("__") and name.endswith(_PRESENCE_SUFFIXES):
                found.add(canonical_queue(name.removesuffix(".msgs")))
        return found
