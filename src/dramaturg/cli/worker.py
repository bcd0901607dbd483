"""``dramaturg worker``: Dramatiq's worker CLI, fed from the configuration.

It checks the configuration and the broker first (a clear line and exit code 78 or 3
instead of a wall of tracebacks from every process), then hands over to Dramatiq's CLI
with ``dramaturg.worker`` as the broker module, in a fresh process: it replaces itself
(same pid) with ``python -m dramaturg.worker_group``, so that the worker processes
Dramatiq forks do not carry what this one imported (see :mod:`dramaturg.worker_group`).
Children read the same config file: its absolute path is passed to them in
``DRAMATURG_CONFIG``. SIGTERM and SIGINT stop
the workers cleanly (running tasks finish within ``worker.shutdown_timeout``).

With ``--metrics-port`` (``worker.metrics_port``) the worker group serves Prometheus
metrics (see :mod:`dramaturg.middleware.metrics`): the port is checked before anything
starts, and the group counts in a fresh directory that is removed when it exits.
The log format (``dramaturg --log-format``) reaches the worker processes in
``DRAMATURG_LOG_FORMAT``.

With ``--scheduler`` a ``dramaturg scheduler`` process runs beside the worker processes
(its schedules checked here first: exit 78 before any worker starts); the worker group
starts it and stops it when it stops (:mod:`dramaturg.worker_group`). Any number of
worker groups may run one: each slot fires once (see :mod:`dramaturg.schedules`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, NoReturn

from .. import app, brokers, logs, worker_group
from ..config import CONFIG_ENV, load_settings
from ..errors import ConfigError
from ..exit_codes import EXIT_FAILURE
from ..middleware import metrics
from .common import complain, whole


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run worker processes",
        description="Run worker processes for the configured broker and actor modules.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  $ dramaturg worker\n"
        "  $ dramaturg worker --processes 4 --threads 16 --queues imports emails\n"
        "  $ dramaturg worker shop.extra_tasks        # import one more actor module\n"
        "  $ dramaturg worker --metrics-port 9191     # Prometheus metrics at http://127.0.0.1:9191/metrics\n",
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help="more actor modules to import")
    parser.add_argument("--processes", "-p", type=whole(1, 1024), help="worker processes (default: worker.processes)")
    parser.add_argument("--threads", "-t", type=whole(1, 1024), help="threads per process (default: worker.threads)")
    parser.add_argument(
        "--queues", "-Q", nargs="+", metavar="QUEUE", help="queues to consume (default: worker.queues, else all)"
    )
    parser.add_argument(
        "--max-tasks-per-child",
        type=whole(1, 10**12),
        metavar="N",
        help="a worker process that has run N tasks starts afresh (default: worker.max_tasks_per_child, else never)",
    )
    parser.add_argument(
        "--max-memory-mb",
        type=whole(1, 10**9),
        metavar="MIB",
        help="a worker process using more than MIB MiB starts afresh (default: worker.max_memory_mb, else never)",
    )
    parser.add_argument(
        "--metrics-port",
        type=whole(1, 65_535),
        metavar="PORT",
        help="serve Prometheus metrics of all worker processes at http://HOST:PORT/metrics"
        " (default: worker.metrics_port, else off)",
    )
    parser.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="the address the metrics server listens on (default: worker.metrics_host, else 127.0.0.1)",
    )
    parser.add_argument(
        "--scheduler",
        action="store_true",
        help="also run a scheduler process for @periodic and [[schedules]] (default: no)",
    )
    parser.add_argument("--pid-file", help="write the main process's pid here (default: none)")
    parser.add_argument("--log-file", help="write logs here (default: stderr)")
    parser.add_argument("--verbose", "-v", action="count", default=0, help="debug logging (default: info)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dramatiq import cli as dramatiq_cli

    # Flags reach the worker processes as the environment variables they stand for.
    for flag, variable in (
        ("max_tasks_per_child", "DRAMATURG_WORKER_MAX_TASKS_PER_CHILD"),
        ("max_memory_mb", "DRAMATURG_WORKER_MAX_MEMORY_MB"),
        ("metrics_port", "DRAMATURG_WORKER_METRICS_PORT"),
        ("metrics_host", "DRAMATURG_WORKER_METRICS_HOST"),
    ):
        if getattr(args, flag) is not None:
            os.environ[variable] = str(getattr(args, flag))
    os.environ[logs.LOG_FORMAT_ENV] = logs.current_format()  # --log-format wins over the config file there too
    settings = load_settings(args.config)
    if settings.broker.type == "eager":
        from ..brokers.eager import NO_WORKERS

        raise ConfigError(f"broker.type: {NO_WORKERS}", key="broker.type")
    port, host = settings.worker.metrics_port, settings.worker.metrics_host
    if port is not None:
        if not metrics.metrics_installed():
            raise ConfigError(f"worker.metrics_port: {metrics.INSTALL_HINT}", key="worker.metrics_port")
        problem = metrics.check_can_listen(host, port)
        if problem is not None:
            source = settings.source_of("worker.metrics_port")
            raise ConfigError(
                f"worker.metrics_port: {problem}; choose another port (from {source})", key="worker.metrics_port"
            )
    brokers.ping(settings.broker)
    if settings.config_file is not None:
        os.environ[CONFIG_ENV] = str(settings.config_file)
    failed = _check_modules(settings, args.modules)
    if failed is not None:
        return failed

    worker = settings.worker
    argv = [
        "dramaturg.worker",
        *args.modules,
        "--processes",
        str(args.processes or worker.processes),
        "--threads",
        str(args.threads or worker.threads),
        "--worker-shutdown-timeout",
        str(max(worker.shutdown_timeout, 1)),
    ]
    queues = args.queues or worker.queues
    if queues:
        argv += ["--queues", *queues]
    if args.pid_file:
        argv += ["--pid-file", args.pid_file]
    if args.log_file:
        argv += ["--log-file", args.log_file]
    argv += ["--verbose"] * args.verbose
    if args.scheduler:
        _check_schedules(args)
    # Made before the scheduler starts, so that it counts there too.
    directory = None if port is None else _metrics_directory()
    stop_s = settings.worker.shutdown_timeout / 1000 + 30  # a drain in progress ends within its budget and grace
    if os.name == "posix" and sys.executable:  # Dramatiq forks the worker processes from a fresh, smaller process
        exec_worker_group(argv, remove=directory, scheduler_stop_s=stop_s if args.scheduler else None)
    logs.apply_to_dramatiq_cli()
    scheduler = worker_group.start_scheduler() if args.scheduler else None
    try:
        code: int = dramatiq_cli.main(dramatiq_cli.make_argument_parser().parse_args(argv))
    finally:
        if scheduler is not None:
            worker_group.stop_scheduler(scheduler, stop_s)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    return code


class _ModuleRaised(Exception):
    """An actor module raised while it was imported (not a SyntaxError): the line to print."""


def _check_modules(settings: Any, modules: list[str]) -> int | None:
    """Import the actor modules here first, as each worker process imports them (after
    bootstrapping, so that a module that sends or bootstraps as it is imported finds these
    settings), then forget the broker: a failure is one masked line, not a traceback from
    every worker process with whatever its error holds in clear. A module that cannot be
    imported (ImportError, SyntaxError: the same at every try) is exit 78, or 2 for a MODULE
    argument, which the deployment recipes do not restart (see deploy/); one that raised
    anything else (a database not answering yet) is exit 1, which they restart. Returns
    that exit code, or None when every module was imported."""
    app.bootstrap(settings)
    try:
        app.import_actor_modules_or_explain(settings.worker.modules, raised=_ModuleRaised)
        app.import_actor_modules_or_explain(modules, given_as="a MODULE argument", raised=_ModuleRaised)
    except _ModuleRaised as error:
        complain(str(error), exit_code=EXIT_FAILURE)
        return EXIT_FAILURE
    finally:
        app.shutdown()
    return None


def _check_schedules(args: argparse.Namespace) -> None:
    """Refuse to start (ConfigError: exit 78) when a schedule is bad or has no ledger."""
    from .. import app
    from .scheduler import build

    build(args)
    app.shutdown()


def _metrics_directory() -> str:
    """A fresh directory for this worker group's counts (see dramaturg.middleware.metrics)."""
    directory = tempfile.mkdtemp(prefix="dramaturg-metrics-")
    os.environ[metrics.MULTIPROC_ENV] = directory
    return directory


def exec_worker_group(argv: list[str], *, remove: str | None, scheduler_stop_s: float | None = None) -> NoReturn:
    """Replace this process with ``python -m dramaturg.worker_group`` running Dramatiq's CLI
    with ``argv`` (see :mod:`dramaturg.worker_group`): the same pid, environment and
    interpreter flags, without this process's modules (pydantic among them), which
    Dramatiq's forked worker processes would otherwise carry. ``remove``: a directory
    the group removes when it exits; ``scheduler_stop_s``: the group runs a scheduler
    process, and waits this long for it to stop when it exits."""
    command = [sys.executable, *subprocess._args_from_interpreter_flags(), "-m", "dramaturg.worker_group"]  # type: ignore[attr-defined]
    command += [*(["--remove", remove] if remove is not None else [])]
    command += [*(["--scheduler", str(scheduler_stop_s)] if scheduler_stop_s is not None else []), "--", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
