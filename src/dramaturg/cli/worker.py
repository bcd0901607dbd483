"""``dramaturg worker``: Dramatiq's worker CLI, fed from the configuration.

It checks the configuration and the broker first (a clear line and exit code 78 or 3
instead of a wall of tracebacks from every process), then hands over to Dramatiq's CLI
with ``dramaturg.worker`` as the broker module. Children read the same config file:
its absolute path is passed to them in ``DRAMATURG_CONFIG``. SIGTERM and SIGINT stop
the workers cleanly (running tasks finish within ``worker.shutdown_timeout``).
The log format (``dramaturg --log-format``) reaches the worker processes in
``DRAMATURG_LOG_FORMAT``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import brokers, logs
from ..config import CONFIG_ENV, load_settings


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run worker processes",
        description="Run worker processes for the configured broker and actor modules.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  $ dramaturg worker\n"
        "  $ dramaturg worker --processes 4 --threads 16 --queues imports emails\n"
        "  $ dramaturg worker shop.extra_tasks        # import one more actor module\n",
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help="more actor modules to import")
    parser.add_argument("--processes", "-p", type=int, help="worker processes (default: worker.processes)")
    parser.add_argument("--threads", "-t", type=int, help="threads per process (default: worker.threads)")
    parser.add_argument(
        "--queues", "-Q", nargs="+", metavar="QUEUE", help="queues to consume (default: worker.queues, else all)"
    )
    parser.add_argument(
        "--max-tasks-per-child",
        type=int,
        metavar="N",
        help="a worker process that has run N tasks starts afresh (default: worker.max_tasks_per_child, else never)",
    )
    parser.add_argument(
        "--max-memory-mb",
        type=int,
        metavar="MIB",
        help="a worker process using more than MIB MiB starts afresh (default: worker.max_memory_mb, else never)",
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
    ):
        if getattr(args, flag) is not None:
            os.environ[variable] = str(getattr(args, flag))
    os.environ[logs.LOG_FORMAT_ENV] = logs.current_format()  # --log-format wins over the config file there too
    settings = load_settings(args.config)
    if settings.broker.type == "eager":
        from ..brokers.eager import NO_WORKERS
        from ..errors import ConfigError

        raise ConfigError(f"broker.type: {NO_WORKERS}", key="broker.type")
    brokers.ping(settings.broker)
    if settings.config_file is not None:
        os.environ[CONFIG_ENV] = str(settings.config_file)

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
    logs.apply_to_dramatiq_cli()
    code: int = dramatiq_cli.main(dramatiq_cli.make_argument_parser().parse_args(argv))
    return code
