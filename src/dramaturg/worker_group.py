"""The main process of ``dramaturg worker``: Dramatiq's worker CLI, in a process of its own.

``dramaturg worker`` checks the configuration and the broker with the whole CLI loaded
(pydantic among it), then replaces itself with ``python -m dramaturg.worker_group``
(same pid, same signals): Dramatiq forks its worker processes from a process that holds
no more than they need, and they are ~10 MB smaller for it (see
:mod:`dramaturg.settings_data`). Here the settings are loaded once more, checked in a
short-lived fork as every worker process would, and kept for the worker processes
Dramatiq forks, which then do not load them again.

``python -m dramaturg.worker_group [--remove DIR] [--scheduler STOP_S] -- DRAMATIQ_ARGS...``:
``--remove`` names a directory to remove on exit (the worker group's metrics directory);
``--scheduler`` runs a ``dramaturg scheduler`` process beside the workers (``dramaturg
worker --scheduler``, which checked its schedules), stopped with SIGTERM when the group
exits and waited for up to ``STOP_S`` seconds (a drain it runs ends within its budget).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

from . import logs
from .errors import ConfigError
from .exit_codes import EXIT_CONFIG
from .masking import install_log_masking, mask_text
from .settings_data import inherit, load_worker_settings

__all__ = ["main", "start_scheduler", "stop_scheduler"]


def main(argv: Sequence[str]) -> int:
    """Run Dramatiq's CLI with ``argv`` (after ``[--remove DIR] --``); return its exit code."""
    from dramatiq import cli as dramatiq_cli

    install_log_masking()
    logs.apply(os.environ.get(logs.LOG_FORMAT_ENV))
    remove = None
    scheduler_stop_s: float | None = None
    arguments = list(argv)
    if arguments[:1] == ["--remove"]:
        remove, arguments = arguments[1], arguments[2:]
    if arguments[:1] == ["--scheduler"]:
        scheduler_stop_s, arguments = float(arguments[1]), arguments[2:]
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    scheduler = start_scheduler() if scheduler_stop_s is not None else None
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
        if scheduler is not None and scheduler_stop_s is not None:
            stop_scheduler(scheduler, scheduler_stop_s)
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)


def start_scheduler() -> subprocess.Popen[bytes]:
    """A ``dramaturg scheduler`` process with this process's environment (its config file,
    log format and metrics directory)."""
    code = "import sys; from dramaturg.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, "scheduler"])


def stop_scheduler(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then wait up to ``timeout_s`` (a drain in progress ends within its budget
    and grace), then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
