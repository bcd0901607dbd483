"""Redis through redis-py: Dramatiq's Redis broker, keys under ``broker.namespace``.

One module per concept: :mod:`.broker` (enqueueing, acknowledging), :mod:`.consumer`,
:mod:`.placement` (where a message goes: its lane, its Redis id), :mod:`.claims` (what a
live worker holds of what it claimed), :mod:`.recovery` (the messages of dead workers),
:mod:`.held` (the held store), :mod:`.stats`, and
:mod:`.connection` (the client, ``ping``); the Lua scripts in ``*.lua`` beside them.
"""

from .broker import RedisBroker, create_broker
from .claims import FetchedBodies, RedisClaims
from .connection import MAX_READ_TIMEOUT_MS, make_client, no_retry, ping, ping_client, read_timeout_ms, socket_options
from .consumer import RedisConsumer
from .held import KICK_LEASE_MS, STALE_KICK_MS, RedisHeldStore
from .placement import copy_id
from .recovery import DeadWorker, RecoveredWorker, RedisRecoverer
from .stats import RedisStatsReader

__all__ = [
    "KICK_LEASE_MS",
    "MAX_READ_TIMEOUT_MS",
    "STALE_KICK_MS",
    "DeadWorker",
    "FetchedBodies",
    "RecoveredWorker",
    "RedisBroker",
    "RedisClaims",
    "RedisConsumer",
    "RedisHeldStore",
    "RedisRecoverer",
    "RedisStatsReader",
    "copy_id",
    "create_broker",
    "make_client",
    "no_retry",
    "ping",
    "ping_client",
    "read_timeout_ms",
    "socket_options",
]
