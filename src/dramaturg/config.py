"""Typed settings, read from a config file and ``DRAMATURG_*`` environment variables.

Precedence, lowest first:

1. defaults (below);
2. the config file: ``DRAMATURG_CONFIG`` or ``--config`` when given, else the nearest
   ``dramaturg.toml``, or ``[tool.dramaturg]`` of a ``pyproject.toml``, found from the
   working directory upward (the search stops at the first directory holding a
   ``pyproject.toml`` or ``.git``: the project root; after the home directory; and before
   a directory others can write to, such as ``/tmp``: see :func:`find_config_file`);
3. environment variables: ``DRAMATURG_<SECTION>_<KEY>``, e.g. ``DRAMATURG_BROKER_URL``,
   ``DRAMATURG_WORKER_THREADS``; lists as JSON or comma-separated
   (``DRAMATURG_WORKER_MODULES=shop.tasks,shop.mail``).

Example ``dramaturg.toml``::

    [broker]
    url = "redis://:secret@127.0.0.1:6379/0"   # the scheme picks the broker type

    [worker]
    modules = ["shop.tasks"]
    threads = 8

Durations are milliseconds in code (``*_ms`` properties) and may be written ``"30s"``,
``"5m"``, ``"250ms"`` in files and variables (see :mod:`dramaturg.durations`). Relative embedded paths are resolved
against the directory of the config file (or the project root when there is none).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from .durations import parse_ms
from .errors import ConfigError, did_you_mean, quoted
from .masking import MASK, mask_text, mask_url, maskable, userinfo_end

__all__ = [
    "BROKER_TYPES",
    "BatchSettings",
    "BrokerSettings",
    "DashboardSettings",
    "DrainScheduleSettings",
    "LogSettings",
    "QueueSettings",
    "RetrySettings",
    "ScheduleSettings",
    "Settings",
    "StateSettings",
    "TaskSettings",
    "WorkerSettings",
    "find_config_file",
    "load_settings",
    "parse_duration_ms",
]

BrokerType = Literal["rabbitmq", "redis", "embedded", "stub", "eager"]
BROKER_TYPES: tuple[str, ...] = ("rabbitmq", "redis", "embedded", "stub", "eager")

#: URL scheme -> broker type.
SCHEMES: dict[str, str] = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "embedded": "embedded",
    "stub": "stub",
    "eager": "eager",
}

#: The URL used when only the broker type is configured.
DEFAULT_URLS: dict[str, str] = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "redis": "redis://127.0.0.1:6379/0",
    "embedded": "embedded://.dramaturg/embedded.db",
    "stub": "stub://",
    "eager": "eager://",
}

ENV_PREFIX = "DRAMATURG_"
CONFIG_ENV = "DRAMATURG_CONFIG"
CONFIG_FILENAME = "dramaturg.toml"

#: The former name of :func:`dramaturg.durations.parse_ms`, the one duration parser.
parse_duration_ms = parse_ms


def _split_list(value: Any) -> Any:
    """Environment variables may give lists as JSON or as comma-separated text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                return json.loads(text)
            except RecursionError:  # json.JSONDecodeError is a ValueError, which pydantic reports already
                raise ValueError("a JSON list nested too deeply") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


#: Settings that are URLs, and may hold a password: masked wherever they are shown.
_URL_KEYS = frozenset({"url", "management_url"})

DurationMs = Annotated[int, BeforeValidator(parse_ms), Field(ge=0)]
StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


class BrokerSettings(BaseModel):
    """``[broker]``: which broker, where, and its tuning.

    ``type`` may be left out when the URL's scheme says it (``amqp://``, ``amqps://``
    -> rabbitmq; ``redis://``, ``rediss://``, ``unix://`` -> redis; ``embedded://PATH``
    -> embedded; ``stub://`` -> stub; ``eager://`` -> eager, the queue switched off: tasks run
    inline in ``send()``). With neither, the embedded broker is used, so a
    fresh project runs with no server.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The kind of broker; leave it out to let the URL's scheme say it.
    #: Default: from the URL
    type: BrokerType | None = None
    #: Where the broker is: ``amqp://``, ``amqps://``, ``redis://``, ``rediss://``, ``unix://``,
    #: ``embedded://PATH``, ``stub://``, ``eager://``; its scheme picks the type.
    #: Default: embedded, ``.dramaturg/embedded.db``
    url: str | None = None
    #: Messages each worker process holds beyond those running.
    #: Default: Dramatiq's ``dramatiq_queue_prefetch`` when set, else tuned per broker
    #: (Redis and embedded 64, RabbitMQ 128)
    prefetch: int | None = Field(default=None, ge=1, le=65535)
    #: How long to wait for a connection before saying the broker is unreachable.
    connect_timeout: DurationMs = Field(default=5_000, gt=0)
    # RabbitMQ
    #: RabbitMQ publisher confirms: ``send()`` returns once RabbitMQ has the message.
    confirm_delivery: bool = True
    #: Three priority bands on the broker (RabbitMQ queue priorities, Redis lanes); see dramaturg.queues.
    priorities: bool = True
    #: RabbitMQ: the AMQP heartbeat (0 turns it off).
    #: Default: pika's
    heartbeat: DurationMs | None = None
    #: The RabbitMQ server's consumer_timeout, as it is configured there (dramaturg cannot
    #: change it): workers warn about ttrs and delays that exceed it.
    consumer_timeout: DurationMs = Field(default=1_800_000, gt=0)
    #: RabbitMQ's management HTTP API, for ``dramaturg stats`` (in-flight counts).
    #: Default: ``http://<the AMQP host>:15672`` (``https://<the AMQP host>:15671`` for
    #: ``amqps://``), with the AMQP URL's user and password
    management_url: str | None = None
    # Redis and embedded
    #: Redis and embedded: the prefix of every key.
    namespace: str = "dramaturg"
    #: Redis and embedded: a worker silent this long is dead, and what it had taken goes
    #: back to its queues (within 1.2x of it); the client waits half of it (at most 10 s)
    #: for Redis to answer.
    heartbeat_timeout: DurationMs = Field(default=60_000, ge=100)
    #: Embedded: how often the server writes its append-only file to disk (Redis's ``appendfsync``).
    fsync: Literal["always", "everysec", "no"] = "everysec"

    @field_validator("management_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith(("http://", "https://")):
            raise ValueError("write an http:// or https:// URL, e.g. 'http://mq.internal:15672'")
        return value

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name in _URL_KEYS else value)


class WorkerSettings(BaseModel):
    """``[worker]``: what a worker imports and how much it runs at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Modules holding the application's actors, imported by every worker process.
    modules: StrList = []
    #: Worker processes that ``dramaturg worker`` starts.
    #: Default: the CPU count
    processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    #: Threads per worker process.
    threads: int = Field(default=8, ge=1)
    #: Queues to consume; empty means every declared queue.
    queues: StrList = []
    #: How long a stopping worker waits for running tasks before it gives up on them.
    shutdown_timeout: DurationMs = 600_000
    #: How long a task for an actor no worker declares is given back to its queue (for a
    #: worker that knows it: a rolling deploy) before it is held; 0 holds it at once.
    unknown_actor_grace: DurationMs = 300_000
    #: A worker process that has run this many tasks starts afresh (None: never).
    max_tasks_per_child: int | None = Field(default=None, ge=1)
    #: A worker process whose resident memory is over this many MiB starts afresh (None: never).
    max_memory_mb: int | None = Field(default=None, ge=1)
    #: Serve Prometheus metrics at ``http://<metrics_host>:<metrics_port>/metrics`` (None: off).
    #: Needs the ``metrics`` extra: ``pip install 'dramaturg[metrics]'``.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    #: The address the metrics server listens on: loopback unless you mean to expose it
    #: (``0.0.0.0`` for every interface, e.g. in a container scraped from outside).
    metrics_host: str = Field(default="127.0.0.1", min_length=1)


class RetrySettings(BaseModel):
    """``[retries]``: what happens to a failing task, for actors that do not say.

    A failed task runs again after an exponential backoff with jitter between
    ``min_backoff`` and ``max_backoff``; after ``max_retries`` retries it is held with
    the reason "retries exhausted". Actors override each with the option of the same name.
    The default ``max_backoff`` stays under RabbitMQ's default ``consumer_timeout`` (30 min),
    because a delayed message waits unacknowledged in a worker until it is due.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Retries before a failing task is held ("retries exhausted").
    max_retries: int = Field(default=20, ge=0)
    #: The shortest wait before a retry.
    min_backoff: DurationMs = 15_000
    #: The longest wait before a retry.
    max_backoff: DurationMs = 600_000


class TaskSettings(BaseModel):
    """``[tasks]``: defaults for every task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Time to run: how long a task may run (without ``touch()``) before it is interrupted.
    ttr: DurationMs = Field(default=600_000, gt=0)
    #: How long a task's checkpoint is kept after it was last written (see
    #: :mod:`dramaturg.checkpoints`); a task that succeeds deletes its own at once.
    checkpoint_ttl: DurationMs = Field(default=7 * 86_400_000, gt=0)


class ContextSettings(BaseModel):
    """``[context]``: the context tasks carry (see :mod:`dramaturg.task_context`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Values for tasks sent without them: ``default = { store = "default" }``.
    default: dict[str, Any] = {}
    #: ``module:function`` names of providers, called at send time.
    providers: StrList = []
    #: ``module:function`` names of restorers, called around each handler.
    restorers: StrList = []


class StateSettings(BaseModel):
    """``[state]``: the task status store (see :mod:`dramaturg.status`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Record task states and per-minute counts (needs a store: the broker's Redis, or ``url``).
    enabled: bool = True
    #: A Redis URL for the store (needed on RabbitMQ); unset: the broker's own Redis (Redis
    #: and embedded brokers).
    url: str | None = None
    #: How long a task's record is kept after its last change.
    ttl: DurationMs = Field(default=86_400_000, gt=0)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name == "url" else value)


class BatchSettings(BaseModel):
    """``[batch]``: batches of tasks (see :mod:`dramaturg.batches`); their state lives in the
    state store (``[state] url``, else the broker's own Redis)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: How long a batch's state is kept once every member has ended (its ``on_complete``
    #: fired); a batch that never ends is kept until it does.
    ttl: DurationMs = Field(default=7 * 86_400_000, gt=0)


class LogSettings(BaseModel):
    """``[log]``: how every dramaturg command and worker process writes its log lines.

    A section of its own, not a worker key: it applies to every command (``send``,
    ``held``, ``drain``, ...) as well as to workers. ``dramaturg --log-format`` overrides it;
    ``DRAMATURG_LOG_FORMAT`` sets it from the environment (see :mod:`dramaturg.logs`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``text`` (readable lines) or ``json`` (one JSON object per line).
    format: Literal["text", "json"] = "text"


class DashboardSettings(BaseModel):
    """``[dashboard]``: the web dashboard (``dramaturg dashboard``, see :mod:`dramaturg.dashboard`).

    Without ``token`` the dashboard is read-only: it shows queues, held tasks, task
    status and batches, and kicks or purges nothing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The admin token: whoever signs in with it may kick and purge held tasks. Unset:
    #: read-only. Prefer ``DRAMATURG_DASHBOARD_TOKEN`` to writing it in a file.
    token: SecretStr | None = None
    #: Where ``dramaturg dashboard`` listens, ``host:port``; an address other than loopback
    #: also needs ``--allow-remote``.
    bind: str = Field(default="127.0.0.1:8700", min_length=1)


class QueueSettings(BaseModel):
    """``[queues.<name>]``: defaults for the tasks of one queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The time to run of this queue's tasks; a message's or an actor's ``ttr`` wins over it.
    #: Default: ``[tasks] ttr``
    ttr: DurationMs | None = Field(default=None, gt=0)


class DrainScheduleSettings(BaseModel):
    """``drain = { queues = [...], budget = "50s" }`` in a ``[[schedules]]`` table: at each
    slot one scheduler works the queues for the budget (Drupal's cron queues; see
    :func:`dramaturg.drain`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The queues to work.
    queues: StrList = Field(min_length=1)
    #: How long to take tasks at each slot (keep it under the interval).
    budget: DurationMs = Field(gt=0)
    #: Tasks run at once.
    threads: int = Field(default=8, ge=1)


class ScheduleSettings(BaseModel):
    """``[[schedules]]``: periodic tasks, each slot fired once (see :mod:`dramaturg.schedules`).

    One table per schedule::

        [[schedules]]
        id = "nightly-cleanup"
        cron = "0 3 * * *"                 # or every = "30s"
        timezone = "Europe/Paris"
        actor = "shop.tasks:cleanup"
        args = [30]

    Only the shape is checked here; the expression, the time zone, the actor and its
    arguments are checked when a scheduler starts (``dramaturg schedule list`` checks them too).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The schedule's name, unique among all schedules (code and file): its ledger is kept by it.
    id: str = Field(min_length=1)
    #: A cron expression (five fields), read in ``timezone``.
    cron: str | None = None
    #: Or a fixed interval (``"30s"``, ``"5m"``), slots aligned on the Unix epoch.
    every: DurationMs | None = None
    #: The actor to send: ``"module:attribute"`` (``"shop.tasks:cleanup"``); or give ``drain``.
    actor: str | None = Field(default=None, min_length=1)
    #: Instead of an actor: work queues for a budget at each slot, ``{ queues = ["imports"], budget = "50s" }``.
    drain: DrainScheduleSettings | None = None
    #: Its positional arguments (JSON).
    args: list[Any] = []
    #: Its keyword arguments (JSON).
    kwargs: dict[str, Any] = {}
    #: The IANA time zone the cron expression is read in.
    timezone: str = "UTC"
    #: While the previous firing has not ended: ``queue`` (send anyway), ``skip`` (leave the
    #: slot out) or ``cancel-previous`` (cancel that firing, then send the slot).
    overlap: Literal["queue", "skip", "cancel-previous"] = "queue"
    #: After a time with no scheduler running, fire the missed slots of this last window, each
    #: once, oldest first. Default: none (a slot fires at most a minute late)
    catch_up: DurationMs | None = None


class Settings(BaseSettings):
    """The whole configuration. Frozen; build it with :func:`load_settings`.

    ``Settings()`` alone reads only defaults and ``DRAMATURG_*`` variables; keyword
    arguments (or a mapping from a file) sit below the environment.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
    )

    broker: BrokerSettings = BrokerSettings()
    worker: WorkerSettings = WorkerSettings()
    retries: RetrySettings = RetrySettings()
    tasks: TaskSettings = TaskSettings()
    context: ContextSettings = ContextSettings()
    state: StateSettings = StateSettings()
    batch: BatchSettings = BatchSettings()
    log: LogSettings = LogSettings()
    dashboard: DashboardSettings = DashboardSettings()
    #: Per-queue defaults: ``[queues.imports] ttr = "30m"``.
    queues: dict[str, QueueSettings] = {}
    #: Periodic tasks: ``[[schedules]]`` tables (see :class:`ScheduleSettings`).
    schedules: list[ScheduleSettings] = []

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _config_file: Path | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides what a file (passed as init kwargs) says.
        return (env_settings, init_settings)

    @property
    def config_file(self) -> Path | None:
        """The file these settings were read from, if any."""
        return self._config_file

    def source_of(self, key: str) -> str:
        """Where the value of a dotted ``key`` came from: a file, a variable, or "default"."""
        parts = key.split(".")
        # queues.imports.ttr falls back to queues.imports; a whole section ([[schedules]]) is its own
        for n in range(len(parts), 1 if len(parts) > 1 else 0, -1):
            source = self._sources.get(".".join(parts[:n]))
            if source is not None:
                return source
        return "default"

    def flat(self) -> dict[str, Any]:
        """Every setting as ``{"section.key": value}`` (``queues.<name>.key`` too), URLs masked."""
        flat: dict[str, Any] = {}
        for section_name in type(self).model_fields:
            section = getattr(self, section_name)
            if isinstance(section, list):  # [[schedules]]: ``dramaturg schedule list`` shows them
                flat[section_name] = [item.model_dump(exclude_defaults=True) for item in section]
                continue
            tables = (
                {f"{section_name}.{name}": table for name, table in section.items()}
                if isinstance(section, dict)
                else {section_name: section}
            )
            for prefix, table in tables.items():
                for key in type(table).model_fields:
                    value = getattr(table, key)
                    if isinstance(value, SecretStr):  # shown as set or not, never in clear
                        value = MASK
                    flat[f"{prefix}.{key}"] = mask_url(value) if key in _URL_KEYS else value
        return flat


def known_keys() -> list[str]:
    """Every dotted settings key, e.g. ``broker.url`` (``queues`` as a whole: it is a table of tables)."""
    keys = []
    for section, field in Settings.model_fields.items():
        fields = getattr(field.annotation, "model_fields", None)
        keys += [f"{section}.{key}" for key in fields] if fields else [section]
    return keys


def find_config_file(start: Path | None = None) -> tuple[Path | None, Path]:
    """Find the nearest config file from ``start`` (the working directory) upward.

    Returns ``(config_file or None, project_root)``. In each directory a
    ``dramaturg.toml`` wins over a ``pyproject.toml`` with ``[tool.dramaturg]``. The
    search stops at the project root (a directory with ``pyproject.toml`` or ``.git``),
    after the user's home directory, and before a directory someone else could have put
    a file in: one writable by everybody (``/tmp``) or owned by another user than you or
    root. A file found is read only if no one else can have written it: owned by you or
    root, not writable by others, nor by a group other than your own private one (else
    :class:`ConfigError`; ``--config`` reads a file whatever its mode).
    """
    here = (start or Path.cwd()).resolve()
    home = _home()
    for directory in (here, *here.parents):
        if not _trusted(directory):
            break
        candidate = directory / CONFIG_FILENAME
        if candidate.is_file():
            return _checked(candidate), directory
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file():
            if "dramaturg" in _tool_table(_read_toml(pyproject), pyproject):
                return _checked(pyproject), directory
            return None, directory
        if (directory / ".git").exists() or directory == home:
            return None, directory
    return None, here


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no HOME and no password entry
        return None


def _owners() -> tuple[int, ...]:
    """The users whose files and directories the search trusts: you, and root."""
    geteuid = getattr(os, "geteuid", None)
    return () if geteuid is None else (geteuid(), 0)


def _trusted(directory: Path) -> bool:
    """Whether only you (or root) can have put a file in ``directory``."""
    owners = _owners()
    if not owners:  # no owners to check (Windows)
        return True
    try:
        status = directory.stat()
    except OSError:
        return False
    return _owner(directory, status) in owners and not status.st_mode & stat.S_IWOTH


def _owner(path: Path, status: os.stat_result) -> int:
    """The uid owning ``path`` (a seam for the tests, which cannot chown without root)."""
    return status.st_uid


def group_is_yours_alone(gid: int) -> bool:
    """Whether group ``gid`` is your user-private group (your primary group, with no other
    member), as umask 002 set-ups make every file group-writable: harmless there, as
    OpenSSH allows in Debian. False where groups cannot be looked up."""
    try:
        import grp
        import pwd

        you = pwd.getpwuid(os.geteuid())
        if gid != you.pw_gid or any(member != you.pw_name for member in grp.getgrgid(gid).gr_mem):
            return False
        return not any(user.pw_gid == gid and user.pw_name != you.pw_name for user in pwd.getpwall())
    except (ImportError, KeyError, AttributeError):
        return False


def _checked(path: Path) -> Path:
    """``path``, a config file found by the search, if no one else can have written it."""
    owners = _owners()
    if not owners:
        return path
    status = path.stat()
    owner = _owner(path, status)
    if owner not in owners:
        problem = f"owned by another user (uid {owner})"
    elif status.st_mode & stat.S_IWOTH:
        problem = "writable by everybody"
    elif status.st_mode & stat.S_IWGRP and not group_is_yours_alone(status.st_gid):
        problem = "writable by its group"
    else:
        return path
    raise ConfigError(
        f"{path}: not read: the config file is {problem}, so someone else may have written it;"
        f" make it yours and only yours (chown, chmod go-w {path}), or name it with --config or {CONFIG_ENV}"
    )


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    cwd: Path | None = None,
) -> Settings:
    """Read the settings: defaults < config file < ``DRAMATURG_*`` variables.

    ``config_file`` (or ``DRAMATURG_CONFIG``) names the file; without either the nearest
    one is searched from ``cwd`` upward. Raises :class:`ConfigError` naming the key, the
    bad value, where it came from and how to fix it.
    """
    env = os.environ
    path: Path | None
    explicit = config_file or env.get(CONFIG_ENV)
    if explicit:
        how = f"{CONFIG_ENV}={explicit}" if not config_file else f"--config {explicit}"
        try:
            path = Path(explicit).expanduser()
            if not path.is_absolute():
                path = (cwd or Path.cwd()) / path
            if path.exists() and not path.is_file():
                raise ConfigError(f"config file is not a file: {path} (from {how})")
            if not path.is_file():
                raise ConfigError(f"config file not found: {path} (from {how})")
            path = path.resolve()
        except (RuntimeError, OSError) as error:  # ~nosuchuser; a name too long for the system
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ConfigError(f"config file cannot be used: {reason} (from {how})") from None
        root = path.parent
    else:
        found, root = find_config_file(cwd)
        path = found

    file_data: dict[str, Any] = {}
    if path is not None:
        document = _read_toml(path)
        file_data = _tool_table(document, path).get("dramaturg", {}) if path.name == "pyproject.toml" else document
        if not isinstance(file_data, dict):
            raise ConfigError(f"{path}: [tool.dramaturg] must be a table")

    env_keys = _check_environment(env)
    sources = _sources(file_data, path, env_keys)

    try:
        settings = Settings(**file_data)
    except ValidationError as error:
        raise _translate(error, sources) from None

    settings = resolve_broker(settings, root, sources)
    settings._config_file = path
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError as error:  # TOML is UTF-8; say where the bad byte is, never what surrounds it
        line = _line_of(path, error.start)
        raise ConfigError(
            f"{path}: not valid TOML: byte 0x{error.object[error.start]:02x} on line {line} is not UTF-8"
            " (save the file as UTF-8)"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read: {error.strerror}") from None


def _tool_table(document: dict[str, Any], path: Path) -> dict[str, Any]:
    """A pyproject.toml's ``[tool]`` table (empty when it has none)."""
    tool = document.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigError(f"{path}: [tool] must be a table, not {type(tool).__name__}")
    return tool


def _line_of(path: Path, offset: int) -> int:
    with path.open("rb") as handle:
        return handle.read(offset).count(b"\n") + 1


def _check_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Map dotted keys to the ``DRAMATURG_*`` variables that set them; reject unknown ones."""
    names = {f"{ENV_PREFIX}{key.replace('.', '_').upper()}": key for key in known_keys()}
    found: dict[str, str] = {}
    for variable in env:
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV:
            continue
        if upper not in names:
            hint = did_you_mean(upper, [*names, CONFIG_ENV])
            raise ConfigError(
                f"environment variable {variable}: not a dramaturg setting{hint}"
                + ("" if hint else f" (settings: {', '.join(sorted(names))})"),
                source=f"env {variable}",
            )
        found[names[upper]] = f"env {variable}"
    return found


def _sources(file_data: dict[str, Any], path: Path | None, env_keys: dict[str, str]) -> dict[str, str]:
    sources: dict[str, str] = {}
    for section, table in file_data.items():
        sources[section] = str(path)
        if isinstance(table, dict):
            for key in table:
                sources[f"{section}.{key}"] = str(path)
    sources.update(env_keys)
    return sources


def _translate(error: ValidationError, sources: dict[str, str]) -> ConfigError:
    """The first problem, said the way a user can act on it."""
    problem = error.errors()[0]
    loc = [str(part) for part in problem["loc"]]
    key = ".".join(loc)
    # worker.modules.1 -> worker.modules -> worker: the most precise key with a known source
    source = next((sources[".".join(loc[:n])] for n in range(len(loc), 0, -1) if ".".join(loc[:n]) in sources), None)
    where = f" (from {source})" if source else ""
    value = problem.get("input")
    kind = problem["type"]

    if kind == "extra_forbidden":
        if len(loc) == 1:
            hint = did_you_mean(loc[0], Settings.model_fields)
            sections = ", ".join(Settings.model_fields)
            message = f"unknown section [{loc[0]}]" + (hint or f" (sections: {sections})")
        else:
            section_keys = [k.split(".", 1)[1] for k in known_keys() if k.startswith(loc[0] + ".")]
            if loc[0] == "schedules":  # [[schedules]]: a list of tables, its keys are the model's
                section_keys = list(ScheduleSettings.model_fields)
            hint = did_you_mean(loc[-1], section_keys)
            listed = ", ".join(section_keys)
            message = f"{key}: unknown key" + (hint or f" (keys: {listed})")
        return ConfigError(message + where, key=key, source=source)

    if kind == "literal_error":
        choices = [c.strip(" '") for c in re.split(r",| or ", problem.get("ctx", {}).get("expected", ""))]
        choices = [c for c in choices if c]
        hint = did_you_mean(str(value), choices)
        listed = ", ".join(choices)
        return ConfigError(
            f"{key}: unknown {quoted(value)}" + (hint or f"; choose one of {listed}") + where,
            key=key,
            source=source,
        )

    reason = problem["msg"]
    if reason.startswith("Value error, "):
        reason = reason[len("Value error, ") :]
    # Never quoted: a token, a secret whatever its form, and a URL without a scheme, in
    # which masking cannot find the password (a URL with one is shown masked).
    leaf = loc[-1] if loc else ""
    if leaf == "token" or (leaf in _URL_KEYS and not maskable(value)):
        return ConfigError(
            mask_text(f"{key}: its value (not shown: it may hold a secret) is not valid: {reason}{where}"),
            key=key,
            source=source,
        )
    return ConfigError(mask_text(f"{key}: {quoted(value)} is not valid: {reason}{where}"), key=key, source=source)


def resolve_broker(settings: Settings, root: Path | None = None, sources: dict[str, str] | None = None) -> Settings:
    """Fill in ``broker.type`` and ``broker.url`` from each other; make embedded paths
    absolute (relative to ``root``, default the working directory).

    :func:`load_settings` does this; :func:`dramaturg.bootstrap` does it for settings
    built directly with ``Settings(...)``. Idempotent.
    """
    sources = dict(settings._sources if sources is None else sources)
    broker = settings.broker
    url, kind = broker.url, broker.type
    if url is not None:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        implied = SCHEMES.get(scheme)
        if implied is None:
            hint = did_you_mean(scheme, SCHEMES)
            raise ConfigError(
                # Never the URL itself: without a scheme, masking cannot find its password.
                f"broker.url: {'unknown scheme ' + scheme + '://' if scheme else 'no scheme (scheme://...)'}"
                f"{hint or '; use one of ' + ', '.join(s + '://' for s in SCHEMES)}"
                f" (from {sources.get('broker.url', 'default')})",
                key="broker.url",
                source=sources.get("broker.url"),
            )
        if kind is not None and kind != implied:
            raise ConfigError(
                f"broker.type {kind!r} does not match broker.url {mask_url(url)!r}, which is a {implied} URL;"
                f" drop broker.type or change the URL (from {sources.get('broker.type', 'default')})",
                key="broker.type",
                source=sources.get("broker.type"),
            )
        if kind is None:
            kind = implied  # type: ignore[assignment]
            sources.setdefault("broker.type", "derived from broker.url")
    else:
        if kind is None:
            kind = "embedded"
        url = DEFAULT_URLS[kind]
        sources.setdefault("broker.url", f"default for {kind}")

    if kind == "embedded":
        url = "embedded://" + str(embedded_path(url, root))
    elif kind in {"rabbitmq", "redis"}:
        for each in url.split(";") if kind == "rabbitmq" else [url]:
            if each.strip():
                check_url("broker.url", each.strip(), sources, redis_url=kind == "redis")
    if broker.management_url is not None:
        check_url("broker.management_url", broker.management_url, sources)
    if settings.state.url is not None:
        check_url("state.url", settings.state.url, sources, redis_url=True)
    resolved = settings.model_copy(update={"broker": broker.model_copy(update={"type": kind, "url": url})})
    resolved._sources = sources
    resolved._config_file = settings._config_file
    return resolved


#: What a user or password must percent-encode in a URL, and its code.
_RESERVED = "'/' (%2F), '?' (%3F), '#' (%23), '@' (%40)"
REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_url(key: str, url: str, sources: Mapping[str, str] | None = None, *, redis_url: bool = False) -> None:
    """Raise :class:`ConfigError` when ``url`` does not parse, or when a parser would read
    it otherwise than :func:`~dramaturg.masking.mask_text` does: a password holding an
    unencoded ``/``, ``?`` or ``#`` ends the URL's authority for a parser, which then takes
    part of the password for a port, a path or a query (and may show it in an error).

    The message never quotes the URL: one that does not parse cannot be masked reliably.
    ``redis_url``: it must also be a Redis URL (``redis://``, ``rediss://``, ``unix://``).
    """
    where = f" (from {(sources or {}).get(key, 'default')})"
    scheme, sep, rest = url.partition("://")
    if redis_url and (not sep or scheme.lower() not in REDIS_SCHEMES):
        raise ConfigError(
            f"{key}: not a Redis URL; write a redis://, rediss:// or unix:// URL{where}",
            key=key,
        )
    if not sep:
        return
    start = len(scheme) + 3
    authority_end = start + next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    at = userinfo_end(url, start, len(url))
    if at is not None and at >= authority_end:
        raise ConfigError(
            f"{key}: not a valid URL: its user or password holds a character that a URL must"
            f" percent-encode there: {_RESERVED}{where}",
            key=key,
        )
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ConfigError(
            f"{key}: not a valid URL: its host or port does not parse (a port is a number from 0 to 65535;"
            f" percent-encode {_RESERVED} in a user or password){where}",
            key=key,
        ) from None
    if redis_url:
        try:
            from redis.connection import parse_url
        except ImportError:  # the state store will say that redis is missing
            return
        try:
            parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError as error:
            raise ConfigError(f"{key}: not a valid Redis URL: {error}{where}", key=key) from None


def embedded_path(url: str, root: Path | None = None) -> Path:
    """The data file named by an ``embedded://`` URL; relative paths are under ``root``.

    ``embedded:///var/lib/shop/queue.db`` is absolute; ``embedded://.dramaturg/q.db`` and
    ``embedded://`` (the default ``.dramaturg/embedded.db``) are relative to the project.
    """
    rest = url.split("://", 1)[1] if "://" in url else url
    path = Path(rest or ".dramaturg/embedded.db")
    if not path.is_absolute():
        path = (root or Path.cwd()) / path
    return path.resolve()
