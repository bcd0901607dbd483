"""The main process of ``dramaturg worker``: Dramatiq's worker CLI, in a process of its own.

``dramaturg worker`` checks the configuration and the broker with the whole CLI loaded
(pydantic among it), then replaces itself with ``python -m dramaturg.worker_group``
(same pid, same signals): Dramatiq forks its worker processes from a process that holds
no more than they need, and they are ~10 MB smaller for it (see
:mod:`dramaturg.settings_data`). Here the settings are loaded once more, checked in a
short-lived fork as every worker process would, and kept for the worker processes
Dramatiq forks, which then do not load them again.

``python -m dramaturg.worker_group [--remove DIR] -- DRAMATIQ_ARGS...``: ``--remove``
names a directory to remove on exit (the worker group's metrics directory).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence

from . import logs
from .errors import ConfigError
from .exit_codes import EXIT_CONFIG
from .masking import install_log_masking, mask_text
from .settings_data import inherit, load_worker_settings

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """Run Dramatiq's CLI with ``argv`` (after ``[--remove DIR] --``); return its exit code."""
    from dramatiq import cli as dramatiq_cli

    install_log_masking()
    logs.apply(os.environ.get(logs.LOG_FORMAT_ENV))
    remove = None
    arguments = list(argv)
    if arguments[:1] == ["--remove"]:
        remove, arguments = arguments[1], arguments[2:]
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    try:
        try:
            inherit(load_worker_settings())
        except ConfigError as error:  # changed since `dramaturg worker` checked it: said as it says it
            message = f"configuration error: {error}"
            if logs.current_format() == "json":
                print(logs.json_line(logging.ERROR, "dramaturg.cli", message, exit_code=EXIT_CONFIG), file=sys.stderr)
            else:
                print(f"dramaturg: {mask_text(message)}", file=sys.stderr)
            return EXIT_CONFIG
        logs.apply_to_dramatiq_cli()
        code: int = dramatiq_cli.main(dramatiq_cli.make_argument_parser().parse_args(arguments))
        return code
    finally:
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
