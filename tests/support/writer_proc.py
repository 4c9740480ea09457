"""An application process for the crash tests: keeps rewriting its own notes.

Usage: python writer_proc.py URL MASTER_URI LEDGER INDEX COUNT NROWS STOPFILE

Writer INDEX owns the rows whose id % COUNT == INDEX, so each row has one
writer and the ledger's last line for a row is the row's last committed value.
Writes go through EncryptedText (Core, tenant from the row's practice).
"""

from __future__ import annotations

import os
import random
import sys
import time

import sqlalchemy as sa

import carnet
from support.lifecycleutil import SECRET, notes_table


def main() -> None:
    url, master, ledger, index, count, nrows, stop = sys.argv[1:8]
    idx, cnt, n = int(index), int(count), int(nrows)
    connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    keys = carnet.KeyManager(engine, master_key=master)
    carnet.configure(keys)
    notes = notes_table(sa.MetaData())
    mine = [i for i in range(n) if i % cnt == idx]
    rng = random.Random(idx)  # noqa: S311 - picks rows, not keys
    k = 0
    with open(ledger, "a", encoding="utf-8") as led:
        while not os.path.exists(stop):
            i = rng.choice(mine)
            tenant = f"p{i % 3}"
            value = f"{SECRET} w{idx} n{k} row {i}"
            k += 1
            try:
                with carnet.tenant_scope(tenant), engine.begin() as conn:
                    conn.execute(notes.update().where(notes.c.id == i).values(body=value))
            except sa.exc.OperationalError:
                time.sleep(0.01)  # lock wait under the batch: the application retries
                continue
            led.write(f"{i}\t{value}\n")
            led.flush()
            time.sleep(0.002)
    keys.close()


if __name__ == "__main__":
    main()
