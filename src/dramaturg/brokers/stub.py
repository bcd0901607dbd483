"""Dramatiq's in-memory stub broker, for unit tests of pure logic.

Nothing is durable and nothing crosses a process boundary: the behaviour suite runs on
real brokers, this one only tests code that does not depend on one.
"""

from __future__ import annotations

from dramatiq import Middleware
from dramatiq.brokers.stub import StubBroker as _DramatiqStubBroker

from ..config import BrokerSettings

__all__ = ["StubBroker", "create_broker", "ping"]


class StubBroker(_DramatiqStubBroker):
    def __init__(self, settings: BrokerSettings, *, middleware: list[Middleware]) -> None:
        super().__init__(middleware=middleware)
        self.settings = settings

    def __repr__(self) -> str:
        return "<StubBroker>"


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> StubBroker:
    return StubBroker(settings, middleware=middleware)


def ping(settings: BrokerSettings) -> float:
    return 0.0
