"""RabbitMQ through pika: Dramatiq's broker with publisher confirms on by default.

One module per concept: :mod:`.broker` (publishing, one message or many), :mod:`.consumer`,
:mod:`.confirms` (the confirm window of bulk sends), :mod:`.held` (the held store),
:mod:`.stats`, and :mod:`.connection` (pika's parameters, ``ping``). Only this package
imports pika.
"""

from .broker import RabbitmqBroker, create_broker
from .confirms import BatchOutcome, ConfirmWindow
from .connection import connection_parameters, ping, quiet_pika
from .consumer import CLOSE_WAIT_S, RabbitmqConsumer
from .held import MAX_QUEUE_BYTES, RabbitmqHeldStore, held_queue
from .stats import RabbitmqStatsReader, management_url

__all__ = [
    "CLOSE_WAIT_S",
    "MAX_QUEUE_BYTES",
    "BatchOutcome",
    "ConfirmWindow",
    "RabbitmqBroker",
    "RabbitmqConsumer",
    "RabbitmqHeldStore",
    "RabbitmqStatsReader",
    "connection_parameters",
    "create_broker",
    "held_queue",
    "management_url",
    "ping",
    "quiet_pika",
]
