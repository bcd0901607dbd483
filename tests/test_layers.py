"""Imports point one way: cli -> features -> middleware -> brokers -> config/errors.

A broker never imports middleware; what both need lives in the module of its concept
(holding a poison message in ``held``, a message's priority in ``queues``, durations in
``durations``). Read from the source, so an import inside a function or under
``TYPE_CHECKING`` counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import dramaturg

PACKAGE = Path(dramaturg.__file__).parent


def module_name(path: Path) -> str:
    """``src/dramaturg/brokers/redis/held.py`` -> ``dramaturg.brokers.redis.held``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, *, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything the source of ``module`` imports, wherever the
    import stands: at the top, in a function, under ``TYPE_CHECKING``. Relative imports
    are resolved; ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a module);
    ``importlib.import_module("a")`` and ``__import__("a")`` with a literal give ``a``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    return imported(path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py")


def is_middleware(name: str) -> bool:
    return name == "dramaturg.middleware" or name.startswith("dramaturg.middleware.")


def test_no_broker_imports_middleware() -> None:
    # Given every module of dramaturg.brokers (the packages of each backend included)
    modules = sorted((PACKAGE / "brokers").rglob("*.py"))
    assert len(modules) > 10, "the brokers were not found where this test looks"

    # When their imports are read
    found: dict[str, str] = {}
    for path in modules:
        for line, name in imports_of(path):
            if is_middleware(name):
                found.setdefault(f"{path.relative_to(PACKAGE.parent)}:{line}", name)

    # Then none is of dramaturg.middleware
    assert not found, (
        "a broker imports middleware (imports point one way: middleware -> brokers); move what both need"
        " to the module of its concept:\n" + "\n".join(f"{where} imports {name}" for where, name in found.items())
    )


@pytest.mark.parametrize(
    "source",
    [
        "from ...middleware.outcomes import hold_poison",
        "from ... import middleware",
        "import dramaturg.middleware.priority",
        "from dramaturg.middleware import Priority",
        "def f():\n    from ...middleware import outcomes",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ...middleware.ttr import Deadline",
        "import importlib\nimportlib.import_module('dramaturg.middleware.recovery')",
    ],
)
def test_every_way_of_importing_middleware_is_seen(source: str) -> None:
    # Given a module of a broker package that imports middleware in one way or another
    # When its imports are read
    names = [name for _, name in imported(source, "dramaturg.brokers.redis.consumer")]

    # Then the middleware import is among them
    assert any(is_middleware(name) for name in names), names


def test_a_relative_import_resolves_from_its_package() -> None:
    assert [name for _, name in imported("from .. import held", "dramaturg.brokers.stub")] == [
        "dramaturg",
        "dramaturg.held",
    ]
    assert [name for _, name in imported("from .held import x", "dramaturg.brokers.redis", is_package=True)] == [
        "dramaturg.brokers.redis.held",
        "dramaturg.brokers.redis.held.x",
    ]
