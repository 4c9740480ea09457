"""The exit codes of every ``carnet`` command, in one table (docs/cli.md).

    0  ok
    1  rows failed (verify, reencrypt)
    2  usage or configuration error
    3  master key unavailable or wrong
    4  database unreachable, or a database error
    5  refused: a key still (or possibly) in use
    6  aborted at a confirmation prompt
    7  unknown practice (it has no data key)
    8  refused: the practice was destroyed (``keys reenable`` first)

``carnet migrate`` still reports "not complete yet" (rows left to migrate, a
decision needed, a verification that found work) as 3, which collides with
the master-key code above: :data:`MIGRATE_INCOMPLETE` names it so that one
change can move it to a code of its own.
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

MIGRATE_INCOMPLETE = 3
