"""Middleware hooks are called as Dramatiq calls them, on the middleware that has them.

:class:`dramaturg.brokers.hooks.HookDispatch` (every dramaturg broker) skips the
middleware whose hook is Dramatiq's no-op; what a middleware sees must not change: the
order, before-hooks first to last and after-hooks last to first, ``SkipMessage`` going to
the caller, any other error logged and the next hook called, and a stack changed after
the first message (``add_middleware``, or the list changed in place) taken into account.
Pure dispatch logic: the stub broker.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import SkipMessage

from dramaturg.brokers.stub import StubBroker
from dramaturg.config import BrokerSettings


class Noting(dramatiq.Middleware):
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    def before_process_message(self, broker: Any, message: Any) -> None:
        self.seen.append(f"before {self.name}")

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        self.seen.append(f"after {self.name}")


class Failing(dramatiq.Middleware):
    def before_process_message(self, broker: Any, message: Any) -> None:
        raise RuntimeError("test: a broken middleware")


class Skipping(dramatiq.Middleware):
    def before_process_message(self, broker: Any, message: Any) -> None:
        raise SkipMessage("test: skipped")


@pytest.fixture
def broker() -> Any:
    broker = StubBroker(BrokerSettings(type="stub"), middleware=[])
    yield broker
    broker.close()


def test_hooks_run_in_dramatiqs_order_and_see_the_stack_change(broker: Any) -> None:
    seen: list[str] = []
    broker.add_middleware(Noting("a", seen))
    broker.add_middleware(Noting("b", seen))
    broker.emit_before("process_message", None)
    broker.emit_after("process_message", None)
    assert seen == ["before a", "before b", "after b", "after a"]

    # A middleware added later, and one put into the list in place, are called too
    seen.clear()
    broker.add_middleware(Noting("c", seen))
    broker.middleware.insert(0, Noting("z", seen))
    broker.emit_before("process_message", None)
    broker.emit_after("process_message", None)
    assert seen == ["before z", "before a", "before b", "before c", "after c", "after b", "after a", "after z"]

    # and one taken out in place is not
    seen.clear()
    del broker.middleware[1]
    broker.emit_before("process_message", None)
    assert seen == ["before z", "before b", "before c"]


def test_a_hook_set_on_an_instance_is_called(broker: Any) -> None:
    seen: list[str] = []
    plain = dramatiq.Middleware()
    plain.before_ack = lambda broker, message: seen.append("ack")  # type: ignore[method-assign]
    broker.add_middleware(plain)
    broker.emit_before("ack", None)
    assert seen == ["ack"]


def test_a_failing_hook_is_logged_and_the_next_runs_but_skip_goes_to_the_caller(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    broker.add_middleware(Failing())
    broker.add_middleware(Noting("a", seen))
    with caplog.at_level(logging.CRITICAL):
        broker.emit_before("process_message", None)
    assert seen == ["before a"]
    assert any("Unexpected failure in before_process_message" in r.getMessage() for r in caplog.records)

    broker.middleware.insert(0, Skipping())
    with pytest.raises(SkipMessage):
        broker.emit_before("process_message", None)
