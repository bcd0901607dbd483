"""Queue statistics of the RabbitMQ broker: the management API, else AMQP.

AMQP tells only how many messages of a queue are ready and how many consumers it has
(a passive ``queue.declare``). What consumers hold unacknowledged (in flight, and the
delayed messages a worker keeps from ``<queue>.DQ`` until they are due) is known only
to the management plugin's HTTP API, ``GET /api/queues/<vhost>``: one request per refresh
gives ``messages_ready``, ``messages_unacknowledged`` and ``consumers`` of every queue of
the virtual host. Its numbers are those of the last statistics emission
(``collect_statistics_interval``, 5 s by default), so they lag by up to that.

``broker.management_url`` says where the API is; by default ``http://<the AMQP host>:15672``
with the AMQP URL's user and password, and for an ``amqps://`` broker
``https://<the AMQP host>:15671`` (the management plugin's TLS port): credentials that
travel encrypted over AMQP never travel in clear over HTTP. Redirects are not followed
(they would carry the credentials elsewhere, perhaps in clear). When it does not
answer, the AMQP numbers are used and one WARNING says how to enable it; then in flight
is ``None`` unless the queue has no consumer (nothing can be unacknowledged), and so is
delayed unless its delay queue has none.

For a queue ``q``: ready is ``q``'s ready messages; in flight ``q``'s unacknowledged;
delayed ``q.DQ``'s messages, ready and unacknowledged; held ``q.HQ``'s (the held store);
dead ``q.XQ``'s (Dramatiq's dead letters); workers ``q``'s consumers (one per worker
process that consumes it).
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker as _DramatiqRabbitmqBroker

from ...errors import BrokerUnreachable
from ...masking import mask_url
from ...queues import canonical_queue
from ...stats import QueueStats, StatsReader
from .connection import error_text, quiet_pika, unreachable
from .held import held_queue

if TYPE_CHECKING:
    from ...config import BrokerSettings

__all__ = ["RabbitmqStatsReader", "management_url"]

logger = logging.getLogger("dramaturg.stats")

#: The management plugin's default port, and its default TLS port (for ``amqps://`` brokers).
MANAGEMENT_PORT = 15672
MANAGEMENT_TLS_PORT = 15671
_COLUMNS = "name,messages_ready,messages_unacknowledged,consumers"


def management_url(settings: Any) -> str:
    """``broker.management_url``, or the default derived from ``broker.url`` (credentials kept).

    >>> management_url(BrokerSettings(url="amqp://shop:pw@mq:5672/prod"))
    'http://shop:pw@mq:15672'
    >>> management_url(BrokerSettings(url="amqps://shop:pw@mq:5671/prod"))
    'https://shop:pw@mq:15671'
    """
    if settings.management_url:
        return str(settings.management_url)
    amqp = urllib.parse.urlsplit(settings.url.split(";")[0].strip())
    user = amqp.username if amqp.username is not None else "guest"
    password = amqp.password if amqp.password is not None else "guest"
    host = amqp.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    if amqp.scheme.lower() == "amqps":  # TLS to the broker: TLS to its management API too
        return f"https://{user}:{password}@{host}:{MANAGEMENT_TLS_PORT}"
    return f"http://{user}:{password}@{host}:{MANAGEMENT_PORT}"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would send the Authorization header on to wherever they point."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


class RabbitmqStatsReader(StatsReader):
    """Reads queue statistics from RabbitMQ (see the module docstring).

    ``broker`` is any Dramatiq RabbitmqBroker (its ``parameters`` are read); ``settings``
    are its settings (the management API's URL, the timeouts, the URL an error names).
    """

    def __init__(self, broker: _DramatiqRabbitmqBroker, settings: BrokerSettings) -> None:
        super().__init__(broker)
        self.settings = settings
        self.parameters = broker.parameters
        self.management_url = management_url(settings)
        amqp = urllib.parse.urlsplit((settings.url or "").split(";")[0].strip())
        self.vhost = urllib.parse.unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
        self._warned = False

    def read(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        found = self._from_management()
        if found is not None:
            names = list(queues) if queues is not None else sorted(self.known_queues() | _canonical(found))
            return [_management_row(name, found) for name in names]
        names = list(queues) if queues is not None else sorted(self.known_queues())
        return self._from_amqp(names)

    # -- the management API -------------------------------------------------------------

    def _from_management(self) -> dict[str, dict[str, Any]] | None:
        """Every queue of the virtual host by name, or None (and a WARNING, once) if unavailable."""
        parts = urllib.parse.urlsplit(self.management_url)
        netloc = parts.hostname or ""
        netloc = f"[{netloc}]" if ":" in netloc else netloc
        if parts.port is not None:
            netloc += f":{parts.port}"
        path = f"{parts.path.rstrip('/')}/api/queues/{urllib.parse.quote(self.vhost, safe='')}"
        url = urllib.parse.urlunsplit((parts.scheme, netloc, path, f"columns={_COLUMNS}", ""))
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        try:
            with _opener.open(request, timeout=self.settings.connect_timeout / 1000) as response:
                rows = json.load(response)
        except urllib.error.HTTPError as error:
            if error.code == 401:
                reason = "the user and password were refused"
            elif 300 <= error.code < 400:
                reason = f"it answers with a redirect (HTTP {error.code}), not followed: name its target instead"
            else:
                reason = f"HTTP {error.code} {error.reason}"
            self._unavailable(reason)
            return None
        except urllib.error.URLError as error:
            cause = error.reason
            self._unavailable(error_text(cause) if isinstance(cause, BaseException) else str(cause))
            return None
        except (OSError, ValueError) as error:  # timeouts, a reply that is not JSON
            self._unavailable(error_text(error))
            return None
        return {str(row["name"]): row for row in rows if isinstance(row, dict) and "name" in row}

    def _unavailable(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "in flight unknown (-): RabbitMQ's management API at %s: %s; enable it on the server with"
                " `rabbitmq-plugins enable rabbitmq_management`, or set broker.management_url",
                mask_url(self.management_url),
                reason,
            )

    # -- AMQP ---------------------------------------------------------------------------

    def _from_amqp(self, queues: Sequence[str]) -> list[QueueStats]:
        try:
            with quiet_pika():
                connection = pika.BlockingConnection(self.parameters)
        except pika.exceptions.ProbableAuthenticationError:
            raise unreachable(self.settings, "authentication failed (check the user and password)") from None
        except (pika.exceptions.AMQPError, OSError) as error:
            raise unreachable(self.settings, error_text(error)) from None
        try:
            channel = connection.channel()
            rows = []
            for queue in queues:
                counts: dict[str, tuple[int, int]] = {}
                for name in (queue, f"{queue}.DQ", f"{queue}.XQ", held_queue(queue)):
                    try:
                        method = channel.queue_declare(name, passive=True).method
                        counts[name] = (int(method.message_count), int(method.consumer_count))
                    except pika.exceptions.ChannelClosedByBroker as error:
                        if error.reply_code != 404:
                            raise
                        counts[name] = (0, 0)  # no such queue: nothing in it
                        channel = connection.channel()
                ready, consumers = counts[queue]
                delayed, delay_consumers = counts[f"{queue}.DQ"]
                rows.append(
                    QueueStats(
                        queue=queue,
                        ready=ready,
                        # Only a consumer can hold messages unacknowledged.
                        delayed=delayed if delay_consumers == 0 else None,
                        in_flight=0 if consumers == 0 else None,
                        held=counts[held_queue(queue)][0],
                        dead=counts[f"{queue}.XQ"][0],
                        workers=consumers,
                    )
                )
            return rows
        except (pika.exceptions.AMQPError, OSError) as error:
            raise BrokerUnreachable(
                f"lost RabbitMQ at {mask_url(self.settings.url)} while reading: {error_text(error)}"
            ) from None
        finally:
            if connection.is_open:
                connection.close()


def _canonical(found: dict[str, dict[str, Any]]) -> set[str]:
    return {canonical_queue(name) for name in found}


def _management_row(queue: str, found: dict[str, dict[str, Any]]) -> QueueStats:
    def count(name: str, *fields: str) -> int:
        row = found.get(name, {})
        return sum(int(row.get(field) or 0) for field in fields)

    both = ("messages_ready", "messages_unacknowledged")
    return QueueStats(
        queue=queue,
        ready=count(queue, "messages_ready"),
        delayed=count(f"{queue}.DQ", *both),
        in_flight=count(queue, "messages_unacknowledged"),
        held=count(held_queue(queue), *both),
        dead=count(f"{queue}.XQ", *both),
        workers=count(queue, "consumers"),
    )
