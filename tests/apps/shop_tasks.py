"""An application's actor module, imported by workers in the CLI tests (worker.modules)."""

from __future__ import annotations

import dramaturg


@dramaturg.actor(queue_name="imports")
def import_user(row: dict[str, object], *, notify: bool = False) -> None:
    print(f"imported {row.get('id')} notify={notify}", flush=True)
