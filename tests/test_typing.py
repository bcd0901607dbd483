"""send() is checked against the handler's signature by a type checker."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api


def test_mypy_checks_send_against_the_handler(tmp_path: Path) -> None:
    # Given application code that sends with right and wrong arguments
    source = tmp_path / "shop_tasks.py"
    source.write_text(
        textwrap.dedent(
            """
            import dramaturg

            @dramaturg.actor(queue_name="imports", max_retries=3)
            def import_user(user_id: int, email: str) -> None: ...

            @dramaturg.actor
            async def notify(user_id: int) -> None: ...

            import_user.send(1, "ada@example.com")
            import_user.send(1, email="ada@example.com")
            notify.send(1)
            import_user.send("one", "ada@example.com")
            notify.send()
            """
        )
    )

    # When mypy checks it
    stdout, _, status = api.run([str(source), "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "c")])

    # Then exactly the two wrong sends are reported
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert status == 1, stdout
    assert len(errors) == 2, stdout
    assert 'Argument 1 to "send" of "Actor" has incompatible type "str"; expected "int"' in errors[0]
    assert 'Missing positional argument "user_id" in call to "send" of "Actor"' in errors[1]
