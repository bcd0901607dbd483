"""An actor module that reports, from inside a worker process, what its settings say and
whether the process imported pydantic (worker processes read their settings without it)."""

from __future__ import annotations

import sys

import dramaturg
from dramaturg import app


@dramaturg.actor(queue_name="probes")
def report_settings() -> None:
    settings = app.current_settings()
    print(
        f"pydantic imported: {'pydantic' in sys.modules};"
        f" tasks.ttr {settings.tasks.ttr} from {settings.source_of('tasks.ttr')};"
        f" queues.imports.ttr {settings.queues['imports'].ttr};"
        f" retries.max_retries {settings.retries.max_retries} from {settings.source_of('retries.max_retries')}",
        flush=True,
    )
