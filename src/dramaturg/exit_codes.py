"""The exit codes of the ``dramaturg`` commands and of ``dramatiq dramaturg.worker``.

One table for both, so that a script or a supervisor reads the same number for the same
cause whichever way the worker was started. 2 and 3 are the codes Dramatiq's own CLI
uses for a module that cannot be imported and a broker that cannot be reached.
"""

from __future__ import annotations

__all__ = [
    "EXIT_ALREADY_ENDED",
    "EXIT_BROKER_UNREACHABLE",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
]

EXIT_OK = 0
#: Something failed that is none of the below.
EXIT_FAILURE = 1
#: Bad command line or input (argparse's own code): unknown actor, invalid JSON, ...
EXIT_USAGE = 2
#: The broker did not answer (the same code Dramatiq's worker uses).
EXIT_BROKER_UNREACHABLE = 3
#: ``dramaturg cancel`` / ``batch cancel``: the task (or batch) had already ended; nothing changed.
EXIT_ALREADY_ENDED = 4
#: sysexits.h EX_CONFIG: the configuration is invalid.
EXIT_CONFIG = 78
#: Stopped by Ctrl-C (SIGINT): 128 + 2, as a shell reports it.
EXIT_INTERRUPTED = 130
