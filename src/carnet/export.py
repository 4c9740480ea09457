"""Export one practice's rows, decrypted, as JSON Lines: portability, and a practice that leaves.

The file is the export's own journal. Its first line names the practice and
the tables; then one line per row (``{"table", "pk", "row"}``), one line
closing each table (``{"table", "end": true, "rows"}``) and one closing the
export (``{"end": true, "rows"}``). Lines are flushed and fsync'ed per batch,
so a run killed at any point leaves whole lines plus at most one partial
line: started again, the export drops the partial line and continues after
the last row written, without a duplicate, and needs nothing in the database
(a read replica serves it).

The file holds the practice's notes in clear: it is created with mode 0600
(an existing file with looser permissions is refused, never written into)
and belongs where the operator's handover to the practice takes it.

Every value opened goes through :meth:`KeyManager.decrypt`, so the decrypt
hook of :mod:`carnet.audit` (an :class:`~carnet.audit.Auditor`) counts it
under the principal in scope; ``carnet export`` installs one when none is.

JSON of the values: text as is, an encrypted column's value as its text,
bytes as ``{"base64": …}``, dates and times in ISO 8601, decimals and UUIDs
as strings. Primary keys use the tagged form of ``carnet_jobs`` (exact
round trip). The format is versioned (``"carnet_export": 1``).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import os
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from . import envelope
from . import jobs as _jobs
from .batch import after_key, raw_type, resolve_table
from .errors import ConfigurationError, InvalidCiphertext
from .manager import KeyManager
from .schema import table_names
from .types import encrypted_type

FORMAT = 1


@dataclass(frozen=True)
class ExportTable:
    """A table to export: where the practice is, and its encrypted columns with their labels."""

    table: str  # name, or schema.name
    tenant_column: str  # the column holding the row's practice id
    encrypted: Mapping[str, str | None]  # column -> field label (None: table.column)


@dataclass
class ExportReport:
    path: str
    tenant: str
    tables: dict[str, int] = field(default_factory=dict)  # rows written, per table
    rows: int = 0  # rows written by this run
    resumed_after: int = 0  # rows already in the file when this run started
    already_complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tenant": self.tenant,
            "tables": dict(self.tables),
            "rows": self.rows,
            "resumed_after": self.resumed_after,
            "already_complete": self.already_complete,
        }


# -- which tables ----------------------------------------------------------------------------


def tables_from_metadata(md: sa.MetaData) -> list[ExportTable]:
    """Every table of the application's MetaData holding an encrypted column, with the
    practice column its encrypted types name (``EncryptedText(tenant="practice_id")``)."""
    out = []
    for tbl in md.sorted_tables:
        enc: dict[str, str | None] = {}
        tenants = set()
        for col in tbl.columns:
            typ = encrypted_type(col)
            if typ is None:
                continue
            enc[col.name] = typ.label
            if typ.tenant is not None:
                tenants.add(typ.tenant)
        if not enc:
            continue
        # The tenant is the mapped attribute's name: the column with that key.
        names = {tbl.c[t].name for t in tenants if t in tbl.c}
        if len(names) != 1 or len(tenants) != 1:
            raise ConfigurationError(
                f"{tbl.fullname}: its encrypted columns do not name one practice column of "
                "the table (a practice on a parent table): export it with --table and "
                "--tenant-column"
            )
        out.append(ExportTable(tbl.fullname, names.pop(), enc))
    return out


def tables_by_name(
    manager: KeyManager, names: Sequence[str], tenant_column: str
) -> list[ExportTable]:
    """Tables named by the operator; their encrypted columns are those holding carnet values."""
    out = []
    for name in names:
        if name.rpartition(".")[2] in table_names(manager.table.name):
            # Wrapped keys and job records are carnet's, not the practice's data.
            raise ConfigurationError(f"{name} is carnet's own table: it is not exported")
        tbl = resolve_table(manager.engine, name)
        if tenant_column not in tbl.c:
            raise ConfigurationError(f"table {name!r} has no column {tenant_column!r}")
        enc: dict[str, str | None] = {}
        for col in tbl.columns:
            if col.primary_key or col.name == tenant_column:
                continue
            try:
                py = raw_type(col, manager.engine.dialect).python_type
            except NotImplementedError:
                continue
            if py not in (bytes, str):
                continue
            if _holds_carnet_values(manager, tbl, col.name):
                enc[col.name] = None
        out.append(ExportTable(name, tenant_column, enc))
    return out


def _holds_carnet_values(manager: KeyManager, tbl: sa.Table, column: str) -> bool:
    # Unlike is_encrypted_column, an empty column is not taken for an encrypted one.
    from .lifecycle import _carnet_value

    col = sa.type_coerce(tbl.c[column], raw_type(tbl.c[column], manager.engine.dialect))
    with manager.engine.connect() as conn:
        values = conn.execute(sa.select(col).where(tbl.c[column].is_not(None)).limit(50))
        return any(_carnet_value(manager, v) for v in values.scalars())


# -- reading -----------------------------------------------------------------------------------


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (decimal.Decimal, uuid.UUID)):
        return str(v)
    if isinstance(v, (dict, list)):
        return v
    return str(v)


class _Decoy(Exception):
    """A decoy note met by an export: its row is left out."""


def _open(manager: KeyManager, value: Any, tenant: str, label: str) -> Any:
    from .lifecycle import PLAINTEXT, blob_of

    blob = blob_of(value)
    if blob is None:
        return None
    if blob == PLAINTEXT:
        return value  # legacy plaintext of a column being migrated: the data as it is
    if not isinstance(blob, bytes):
        raise InvalidCiphertext("value is not carnet ciphertext", label=label)
    if manager.is_decoy(envelope.key_id_of(blob)):
        raise _Decoy  # the row is left out, unopened (carnet.decoys)
    plain = manager.decrypt(blob, tenant=tenant, label=label)
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(plain).decode("ascii")}


def iter_rows(
    manager: KeyManager,
    spec: ExportTable,
    tenant: str,
    *,
    where: Mapping[str, Any] | None = None,
    after: Sequence[Any] | None = None,
    batch_size: int = 500,
) -> Iterator[list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Batches of ``(primary key, row)`` of ``tenant``'s rows of a table, encrypted columns
    opened, in primary-key order (after ``after``); ``where``: more column = value filters."""
    tbl = resolve_table(manager.engine, spec.table)
    pk = list(tbl.primary_key.columns)
    if not pk:
        raise ConfigurationError(f"table {spec.table!r} has no primary key: cannot page it")
    for c in [spec.tenant_column, *spec.encrypted, *(where or {})]:
        if c not in tbl.c:
            raise ConfigurationError(f"table {spec.table!r} has no column {c!r}")
    dialect = manager.engine.dialect
    # The stored bytes, below any type the reflection attached.
    cols = [sa.type_coerce(c, raw_type(c, dialect)).label(c.name) for c in tbl.columns]
    base = sa.select(*cols).where(tbl.c[spec.tenant_column] == tenant)
    for k, v in (where or {}).items():
        base = base.where(tbl.c[k] == v)
    base = base.order_by(*pk)
    table_name = spec.table.rpartition(".")[2]
    labels = {c: lab or f"{table_name}.{c}" for c, lab in spec.encrypted.items()}
    last = tuple(after) if after is not None else None
    while True:
        stmt = base if last is None else base.where(after_key(pk, last))
        with manager.engine.connect() as conn:
            rows = conn.execute(stmt.limit(batch_size)).mappings().all()
        if not rows:
            return
        batch = []
        for r in rows:
            key = tuple(r[c.name] for c in pk)
            last = key
            out: dict[str, Any] = {}
            try:
                for name, v in r.items():
                    if name in labels:
                        out[name] = _open(manager, v, tenant, labels[name])
                    else:
                        out[name] = _json_value(v)
            except _Decoy:
                continue  # a decoy row: not the practice's data, never opened
            batch.append((key, out))
        if batch:
            yield batch
        if len(rows) < batch_size:
            return


def patient_rows(
    manager: KeyManager,
    spec: ExportTable,
    tenant: str,
    where: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One patient's rows of a table, decrypted (a subject access or portability request):
    ``patient_rows(keys, ExportTable("notes", "practice_id", {"body": None}), "p1",
    {"patient_id": "pat-7"})``. Each value opened is counted by the decrypt hook."""
    return [row for batch in iter_rows(manager, spec, tenant, where=where) for _, row in batch]


def count_rows(manager: KeyManager, specs: Sequence[ExportTable], tenant: str) -> int:
    total = 0
    with manager.engine.connect() as conn:
        for spec in specs:
            tbl = resolve_table(manager.engine, spec.table)
            total += int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(tbl)
                    .where(tbl.c[spec.tenant_column] == tenant)
                ).scalar_one()
            )
    return total


# -- the file ----------------------------------------------------------------------------------


def _line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


@dataclass
class _Resume:
    done: dict[str, int]  # closed tables -> rows
    current: str | None  # table with rows but no end line
    current_rows: int
    last_pk: tuple[Any, ...] | None
    complete: bool


def _read_back(path: Path, header: Mapping[str, Any]) -> _Resume:
    """What an earlier run left in the file; drops a partial last line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:  # noqa: PTH123 - truncate in place
            f.truncate(cut)
        data = data[:cut]
    lines = data.splitlines()
    if not lines:
        raise ConfigurationError(f"{path} is empty: remove it, or pass --restart")
    try:
        first = json.loads(lines[0])
    except ValueError:
        first = None
    if not isinstance(first, dict) or first.get("carnet_export") != FORMAT:
        raise ConfigurationError(f"{path} is not a carnet export: refusing to write into it")
    if first.get("tenant") != header["tenant"] or first.get("tables") != header["tables"]:
        raise ConfigurationError(
            f"{path} is an export of another practice or other tables: pass --restart to "
            "replace it, or choose another --out"
        )
    st = _Resume({}, None, 0, None, False)
    for raw in lines[1:]:
        obj = json.loads(raw)
        if obj.get("end") and "table" not in obj:
            st.complete = True
        elif obj.get("end"):
            st.done[obj["table"]] = int(obj["rows"])
            st.current, st.current_rows, st.last_pk = None, 0, None
        else:
            st.current = obj["table"]
            st.current_rows += 1
            st.last_pk = _jobs.decode_pk(json.dumps(obj["pk"]))
    return st


def _open_private(path: Path, *, create: bool) -> int:
    if create:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    else:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"{path} is readable or writable by others (mode {mode:04o}): refusing to "
                "write decrypted notes to it"
            )
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.fchmod(fd, 0o600)  # whatever the umask did
    return fd


def export_tenant(
    manager: KeyManager,
    tenant: str,
    specs: Sequence[ExportTable],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 500,
    restart: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write ``tenant``'s rows of ``specs``, decrypted, to ``out`` (JSON Lines, mode 0600).

    Resumable: an unfinished file of the same practice and tables is continued
    after its last whole row; a finished one is left as it is
    (``already_complete``); ``restart`` replaces it.
    """
    if not specs:
        raise ConfigurationError("nothing to export: no table with an encrypted column")
    path = Path(out)
    names = [s.table for s in specs]
    header = {
        "carnet_export": FORMAT,
        "tenant": tenant,
        "tables": names,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    rep = ExportReport(path=str(path), tenant=tenant)
    if restart and path.exists():
        path.unlink()
    if path.exists():
        fd = _open_private(path, create=False)  # its mode checked before anything is read
        try:
            st = _read_back(path, header)
        except BaseException:
            os.close(fd)
            raise
    else:
        st = _Resume({}, None, 0, None, False)
        fd = _open_private(path, create=True)
        os.write(fd, _line(header))
    with os.fdopen(fd, "ab") as f:
        rep.tables = dict(st.done)
        rep.resumed_after = sum(st.done.values()) + st.current_rows
        if progress is not None and rep.resumed_after:
            progress(rep.resumed_after)
        if st.complete:
            rep.already_complete = True
            return rep
        for spec in specs:
            if spec.table in st.done:
                continue
            n, after = 0, None
            if spec.table == st.current:
                n, after = st.current_rows, st.last_pk
            for batch in iter_rows(manager, spec, tenant, after=after, batch_size=batch_size):
                f.write(
                    b"".join(
                        _line(
                            {
                                "table": spec.table,
                                "pk": json.loads(_jobs.encode_pk(key) or "[]"),
                                "row": row,
                            }
                        )
                        for key, row in batch
                    )
                )
                f.flush()
                os.fsync(f.fileno())  # a killed run resumes after these rows
                n += len(batch)
                rep.rows += len(batch)
                if progress is not None:
                    progress(len(batch))
            f.write(_line({"table": spec.table, "end": True, "rows": n}))
            rep.tables[spec.table] = n
        f.write(_line({"end": True, "rows": sum(rep.tables.values())}))
        f.flush()
        os.fsync(f.fileno())
    return rep


def read_export(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the row lines of a finished export (for checks and imports)."""
    lines = Path(path).read_bytes().splitlines()
    header = json.loads(lines[0])
    rows = [json.loads(ln) for ln in lines[1:]]
    if not rows or not (rows[-1].get("end") and "table" not in rows[-1]):
        raise ConfigurationError(f"{path} is not a finished carnet export")
    return header, [r for r in rows if "row" in r]


__all__ = [
    "ExportReport",
    "ExportTable",
    "count_rows",
    "export_tenant",
    "iter_rows",
    "patient_rows",
    "read_export",
    "tables_by_name",
    "tables_from_metadata",
]
