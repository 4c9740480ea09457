"""A scraping worker for the shared-budget scenarios: one process, two engines, one principal.

    python -m support.budget_proc APP_URL MASTER STORE PRINCIPAL LIMIT WINDOW BLOCK LEASE \
        SECONDS STOP OUT

Reads notes in a loop through the ORM, alternating between two engines on
the application's database, as ``PRINCIPAL`` under a shared DecryptBudget in
``STORE``, for ``SECONDS`` seconds (or, with ``STOP`` = ``refused``, until
the first refusal). Each read it got is written to ``OUT`` as a line
``before after`` (time.time() around the read: the disclosure happened in
between), flushed at once so a SIGKILLed worker leaves what it read. A line
``ready`` is written after the first read.
"""

from __future__ import annotations

import sys
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet.audit import Auditor, DecryptBudget, principal_scope
from carnet.errors import DecryptBudgetExceeded
from support.models import Note


def main() -> None:
    (app_url, master, store, principal, limit, window, block, lease, seconds, stop, out) = sys.argv[
        1:12
    ]
    engines = [sa.create_engine(app_url), sa.create_engine(app_url)]
    keys = carnet.KeyManager(engines[0], master_key=master)
    carnet.configure(keys)
    budget = DecryptBudget(
        int(limit), float(window), store=store, block=int(block), lease=float(lease)
    )
    Auditor(budget=budget).install(keys)
    with Session(engines[0]) as s:
        ids = list(s.scalars(sa.select(Note.id)))
    end = time.time() + float(seconds)
    i = 0
    with open(out, "a", buffering=1) as f, principal_scope(principal):
        while time.time() < end:
            before = time.time()
            try:
                with Session(engines[i % 2]) as s:
                    note = s.get(Note, ids[i % len(ids)])
                    body = note.body if note is not None else None
            except DecryptBudgetExceeded:
                if stop == "refused":
                    break
                time.sleep(0.01)
                continue
            after = time.time()
            assert isinstance(body, str) and body.startswith("PLANTED")
            f.write(f"{before:.6f} {after:.6f}\n")
            if i == 0:
                f.write("ready\n")
            i += 1


if __name__ == "__main__":
    main()
