"""The exit codes of every ``carnet`` command, in one table (docs/cli.md).

    0  ok
    1  rows failed (verify, reencrypt, reindex)
    2  usage or configuration error
    3  master key unavailable or wrong
    4  database unreachable, or a database error
    5  refused: a key still (or possibly) in use
    6  aborted: a confirmation declined or unanswered, or interrupted
    7  unknown practice (it has no data key)
    8  refused: the practice was destroyed (``keys reenable`` first)
    9  not complete yet (``carnet migrate``: rows left, a decision needed,
       values still to migrate); rerun or decide, then run it again
    10 internal error (a bug: rerun with ``CARNET_DEBUG=1`` for the traceback)

:mod:`carnet._cli` maps each error class to its code, for every command.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_MASTER_KEY = 3
EXIT_DATABASE = 4
EXIT_IN_USE = 5
EXIT_ABORTED = 6
EXIT_UNKNOWN_TENANT = 7
EXIT_DESTROYED = 8
EXIT_INCOMPLETE = 9
EXIT_INTERNAL = 10
