"""dramaturg: reliable background work on Dramatiq.

::

    import dramaturg

    @dramaturg.actor(queue_name="emails")
    def send_welcome(user_id: int) -> None: ...

    send_welcome.send(42)          # the broker comes from dramaturg.toml / DRAMATURG_*

Run workers with ``dramaturg worker`` or ``dramatiq dramaturg.worker``.
"""

from __future__ import annotations

from .__about__ import __version__
from .actors import Actor, actor
from .actors.builtin import echo
from .app import bootstrap, get_broker, shutdown
from .config import BrokerSettings, Settings, WorkerSettings, load_settings
from .errors import (
    ActorError,
    BrokerNotInstalled,
    BrokerUnreachable,
    ConfigError,
    DramaturgError,
    SendError,
)

__all__ = [
    "Actor",
    "ActorError",
    "BrokerNotInstalled",
    "BrokerSettings",
    "BrokerUnreachable",
    "ConfigError",
    "DramaturgError",
    "SendError",
    "Settings",
    "WorkerSettings",
    "__version__",
    "actor",
    "bootstrap",
    "echo",
    "get_broker",
    "load_settings",
    "shutdown",
]
