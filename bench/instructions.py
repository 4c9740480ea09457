"""Instructions per row of carnet and of the minimal AES-GCM type (valgrind's callgrind).

    python -m bench.instructions [--rows N]

Wall-clock ratios move by ±5-10 % between processes and machines; the number
of instructions a process executes does not (with ``PYTHONHASHSEED`` fixed).
For each operation of ``bench_core`` (ORM insert and select of notes of 20
practices, Core executemany insert and select of one practice in a scope, on a
SQLite file), a child process runs it under callgrind once and then five more
times; the difference, divided by the rows, is what one row costs. The models
and data are ``bench_core``'s. An instruction count weighs a memory copy, a
system call (the nonce's ``getrandom``, the clock) and an AES round alike: it
is the Python-side work this measures, and the wall-clock figures stay the
reference (docs/performance.md). Needs valgrind (Debian's ``valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

OPERATIONS = ("ORM insert", "ORM select", "Core insert", "Core select")
KINDS = ("minimal", "carnet")
_MINIMAL_KEY = bytes(range(32))  # a benchmark's fixed key, so every child reads the rows
_WARM, _MORE = 1, 5


def _child(op: str, kind: str, directory: Path, repeats: int, rows: int) -> None:
    """Run ``op`` on ``kind``'s table once, then ``repeats`` more times."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    import carnet
    from bench.bench_core import _Models
    from carnet import _synthetic

    engine = sa.create_engine(f"sqlite:///{directory}/bench.db")
    keys = carnet.KeyManager(engine, master_key=f"file://{directory}/master.key")
    m = _Models(keys, minimal_key=_MINIMAL_KEY)
    cls: Any = {"minimal": m.minimal, "carnet": m.carnet}[kind]
    table: Any = {"minimal": m.core_minimal, "carnet": m.core_carnet}[kind]
    data = _synthetic.generate_notes(rows, seed=7, tenants=20)
    tenant = data[0].practice_id
    params = [{"practice_id": tenant, "patient_id": n.patient_id, "body": n.text} for n in data]

    def orm_insert() -> None:
        with engine.begin() as conn:
            conn.execute(cls.__table__.delete())
        with Session(engine) as session:
            session.add_all(
                cls(practice_id=n.practice_id, patient_id=n.patient_id, body=n.text) for n in data
            )
            session.commit()

    def orm_select() -> None:
        with Session(engine) as session:
            notes = session.scalars(sa.select(cls)).all()
            if len(notes) != rows or not sum(len(n.body) for n in notes):
                raise RuntimeError("the ORM select read the wrong rows")

    def core_insert() -> None:
        with engine.begin() as conn:
            conn.execute(table.delete())
        with carnet.tenant_scope(tenant), engine.begin() as conn:
            conn.execute(table.insert(), params)

    def core_select() -> None:
        with carnet.tenant_scope(tenant), engine.connect() as conn:
            got = conn.execute(sa.select(table)).all()
        if len(got) != rows or not isinstance(got[0].body, str):
            raise RuntimeError("the Core select read the wrong rows")

    fn = {
        "ORM insert": orm_insert,
        "ORM select": orm_select,
        "Core insert": core_insert,
        "Core select": core_select,
    }[op]
    for _ in range(repeats):
        fn()
    keys.close()
    engine.dispose()


def _prepare(directory: Path, rows: int) -> None:
    """The database the children read: the key table, the tables, every practice's key and
    the ORM and Core tables filled (each insert then empties its own first)."""
    import sqlalchemy as sa

    import carnet
    from bench.bench_core import _Models
    from bench.common import master_key_uri
    from carnet import _synthetic

    engine = sa.create_engine(f"sqlite:///{directory}/bench.db")
    keys = carnet.KeyManager(engine, master_key=master_key_uri(directory))
    keys.create_schema()
    m = _Models(keys, minimal_key=_MINIMAL_KEY)
    m.metadata.create_all(engine)
    for t in sorted({n.practice_id for n in _synthetic.generate_notes(rows, seed=7, tenants=20)}):
        keys.ensure_key(t)
    keys.close()
    engine.dispose()
    for kind in KINDS:
        for op in ("ORM insert", "Core insert"):
            _child(op, kind, directory, 1, rows)


_COLLECTED = re.compile(r"Collected : (\d+)")


def _instructions(op: str, kind: str, directory: Path, repeats: int, rows: int) -> int:
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
    }
    args = [sys.executable, "-m", "bench.instructions", "--child", op, kind, str(directory)]
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            *args,
            "--repeats",
            str(repeats),
            "--rows",
            str(rows),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    found = _COLLECTED.search(out)
    if found is None:
        raise RuntimeError(f"callgrind printed no count for {op}, {kind}")
    return int(found.group(1))


def per_row(op: str, kind: str, directory: Path, rows: int) -> float:
    warm = _instructions(op, kind, directory, _WARM, rows)
    more = _instructions(op, kind, directory, _WARM + _MORE, rows)
    return (more - warm) / (_MORE * rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--child", nargs=3, metavar=("OP", "KIND", "DIR"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if args.child:
        op, kind, directory = args.child
        _child(op, kind, Path(directory), args.repeats, args.rows)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    from bench.common import temp_dir

    with temp_dir() as directory:
        _prepare(directory, args.rows)
        print(f"instructions per row, {args.rows:,} rows, SQLite file")
        print("| | minimal type | carnet | carnet / minimal |")
        print("|---|--:|--:|--:|")
        for op in OPERATIONS:
            got = {kind: per_row(op, kind, directory, args.rows) for kind in KINDS}
            print(
                f"| {op} | {got['minimal']:,.0f} | {got['carnet']:,.0f} "
                f"| {got['carnet'] / got['minimal']:.3f}× |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
