"""The helpers Dramatiq's test files import from ``tests/common.py``, which its sdist lacks.

Written for dramaturg's compatibility run (``compat/run.py`` copies this file over the
sdist's ``tests/``): the same names, meaning what Dramatiq's tests expect of them. The
tests that use ``RABBITMQ_*`` or ``skip_unless_rabbit_mq`` build Dramatiq's broker
classes on the default ports themselves; the run leaves them out (see
``compat/differences.toml``), so none of these ever reaches the machine's own brokers.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
import pytest
from dramatiq import Worker


@contextmanager
def worker(*args: Any, **kwargs: Any) -> Iterator[Worker]:
    """A started Dramatiq worker, stopped on leaving the block."""
    started = Worker(*args, **kwargs)
    try:
        started.start()
        yield started
    finally:
        started.stop()


# Timing-sensitive tests of Dramatiq's rate limiters, which Dramatiq skips on its own CI too.
skip_in_ci = pytest.mark.skipif(os.environ.get("CI", "").lower() in {"1", "true", "yes"}, reason="test skipped in CI")
skip_on_windows = pytest.mark.skipif(platform.system() == "Windows", reason="test skipped on Windows")
skip_on_pypy = pytest.mark.skipif(
    platform.python_implementation() == "PyPy", reason="Time limits are not supported under PyPy."
)
skip_unless_rabbit_mq = pytest.mark.skipif(False, reason="the tests marked so are left out of the run")

RABBITMQ_USERNAME = "guest"
RABBITMQ_PASSWORD = "guest"
RABBITMQ_CREDENTIALS = pika.credentials.PlainCredentials(RABBITMQ_USERNAME, RABBITMQ_PASSWORD)
