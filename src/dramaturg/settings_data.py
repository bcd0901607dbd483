"""Settings as plain data, for worker processes: validated with pydantic, read without it.

pydantic, its core and pydantic-settings are ~10 MB of a worker process's ~45 (bare
Dramatiq's is ~30), and a worker needs them only to check its configuration once. So a
worker process reads its settings with :func:`load_worker_settings`: a short-lived
fork of it imports pydantic, runs :func:`~dramaturg.config.load_settings` (the same
checks, the same errors) and hands back the result as JSON; the worker builds
:class:`Section` records from it and never imports pydantic itself. ``dramaturg
worker`` loads them once in its main process (:func:`inherit`), and the worker
processes Dramatiq forks from it take them from there.

The conversion is generic: every section model (a pydantic model, wherever it sits: a
field, a dict's value, a list's item) becomes a :class:`Section` with the same
attribute names, values and properties (computed once), so a section added to
:class:`~dramaturg.config.Settings` needs no change here. What a section does not carry
are its methods: code run in a worker process reads settings, it does not call a
model's methods on them (``model_copy``, ``model_dump``). Values must be JSON's types
(or paths, or secrets: :class:`Secret`, masked when shown); settings holding anything
else are loaded in the worker itself, with pydantic, as before.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .errors import ConfigError
from .masking import mask_url

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["Secret", "Section", "SettingsData", "decode", "encode", "inherit", "load_worker_settings"]

#: The settings a process loaded for the worker processes it forks (see :func:`inherit`).
_inherited: SettingsData | None = None


class Secret:
    """A secret setting, as pydantic's ``SecretStr`` reads: masked when shown,
    ``get_secret_value()`` for its value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __eq__(self, other: object) -> bool:
        return callable(getattr(other, "get_secret_value", None)) and other.get_secret_value() == self._value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


class Section:
    """One settings section, read-only: ``section.threads``, as on the pydantic model."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy and pickle probing for their hooks
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} has no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only: {name!r}")

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._values.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Section) and type(other) is type(self) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:  # URLs masked, as the models' reprs do
        shown = ", ".join(
            f"{name}={(mask_url(value) if name.endswith('url') and isinstance(value, str) else value)!r}"
            for name, value in self._values.items()
        )
        return f"{type(self).__name__}({shown})"


class SettingsData(Section):
    """The whole configuration as :class:`Section` records, with ``source_of`` and
    ``config_file`` as on :class:`~dramaturg.config.Settings`. Already resolved
    (:func:`~dramaturg.config.resolve_broker`)."""

    __slots__ = ("_where",)

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        super().__init__(values)
        object.__setattr__(self, "_where", dict(sources))

    def source_of(self, key: str) -> str:
        """Where the value of a dotted ``key`` came from: a file, a variable, or "default"."""
        parts = key.split(".")
        for n in range(len(parts), 1, -1):
            source: str | None = self._where.get(".".join(parts[:n]))
            if source is not None:
                return source
        return "default"


def encode(settings: Settings) -> dict[str, Any]:
    """``settings`` as JSON-ready data that :func:`decode` reads back. Raises TypeError
    for a value that is not JSON's (nor a path)."""
    return {"settings": _encode(settings), "sources": dict(settings._sources)}


def decode(data: Mapping[str, Any]) -> Settings:
    """The settings :func:`encode` wrote, as a :class:`SettingsData` (typed as the
    :class:`~dramaturg.config.Settings` it stands for: it reads the same)."""
    values = data["settings"]["section"]
    plain = SettingsData({name: _decode(value) for name, value in values.items()}, data["sources"])
    return cast("Settings", plain)


def _encode(value: Any) -> Any:
    # Tagged, so that decoding knows a section from a dict: {"section": ...}, {"dict": ...}, {"path": ...}.
    fields = getattr(type(value), "model_fields", None)
    if fields is not None:  # a pydantic model: its fields, and the properties its class adds
        values = {name: _encode(getattr(value, name)) for name in fields}
        for klass in type(value).__mro__:
            if klass.__module__.startswith(("pydantic", "pydantic_settings")):
                break  # pydantic's own properties (model_extra, ...) are not settings
            for name, member in vars(klass).items():
                if isinstance(member, property) and name not in values and not name.startswith("_"):
                    values[name] = _encode(getattr(value, name))
        return {"section": values}
    if isinstance(value, dict):
        return {"dict": {str(key): _encode(item) for key, item in value.items()}}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    if isinstance(value, Path):
        return {"path": str(value)}
    if callable(getattr(value, "get_secret_value", None)):  # pydantic's SecretStr (the dashboard's token)
        return {"secret": value.get_secret_value()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a setting of type {type(value).__name__} cannot be handed over as JSON")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, dict):
        ((tag, inner),) = value.items()
        if tag == "section":
            return Section({name: _decode(item) for name, item in inner.items()})
        if tag == "dict":
            return {key: _decode(item) for key, item in inner.items()}
        if tag == "secret":
            return Secret(inner)
        return Path(inner)
    return value


def inherit(settings: Settings) -> None:
    """Keep ``settings`` for the worker processes this process forks next
    (:func:`load_worker_settings` returns them there, without loading them again)."""
    global _inherited
    _inherited = cast(SettingsData, settings)


def load_worker_settings() -> Settings:
    """The settings, as :func:`~dramaturg.config.load_settings` reads and checks them,
    without importing pydantic into this process (see the module's docstring).

    Raises :class:`ConfigError` as ``load_settings`` does. Where a fork cannot serve
    (no ``os.fork``, other threads running, pydantic already imported here, settings
    that are not JSON), the settings are loaded here, with pydantic.
    """
    if _inherited is not None:
        return cast("Settings", _inherited)
    if not hasattr(os, "fork") or threading.active_count() > 1 or "pydantic" in sys.modules:
        return _load_here()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which never returns (its coverage is not collected)
        _validate_and_exit(read_end, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reply = pipe.read()
    os.waitpid(pid, 0)
    answer = json.loads(reply) if reply else {}
    if "error" in answer:
        raise ConfigError(answer["error"], key=answer["key"], source=answer["source"])
    if "settings" not in answer:  # the fork failed otherwise: load them here, and see why if it fails here too
        return _load_here()
    return decode(answer["settings"])


def _load_here() -> Settings:
    from .config import load_settings

    return load_settings()


def _validate_and_exit(read_end: int, write_end: int) -> None:  # pragma: no cover - runs in the fork
    """The fork's work: load and check the settings, write them (or the error) as JSON, exit."""
    try:
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):  # a stop request ends the fork; the worker loads them itself
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.close(read_end)
        try:
            answer: dict[str, Any] = {"settings": encode(_load_here())}
        except ConfigError as error:
            answer = {"error": str(error), "key": error.key, "source": error.source}
        except Exception:  # the worker loads them itself, and reports what happens there
            answer = {}
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(json.dumps(answer).encode())
    finally:
        os._exit(0)  # no atexit handlers, no flushing of the worker's buffers: they are the worker's
