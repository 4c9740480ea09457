"""The SQL of the checks, per dialect: CHECK constraints and triggers.

Pure: a :class:`~carnet.dbchecks.columns.ColumnSpec` and a dialect in, the
statements that create and drop each object out (:func:`ddl_objects`); nothing
here touches a database. :class:`Sql` holds the expressions each dialect
needs, also used by the census (:mod:`carnet.dbchecks.ops`), so that what is
counted is what is checked.
"""

# Every statement here is DDL built from identifiers quoted by the dialect and
# from constants of carnet's format: no value is ever interpolated.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from .. import envelope
from ..errors import ConfigurationError
from .columns import ColumnSpec, Mode

# Key kinds a value may be sealed under: a practice's data keys, and its decoy
# keys (carnet.decoys), whose notes must pass the same checks as real ones.
VALUE_KEY_KINDS = ("data", "decoy")
_COLON = "':'"
_V1_HEAD = "'carnet:A'"


@dataclass(frozen=True)
class DDLObject:
    """One object the database holds for a check: a CHECK constraint or a trigger."""

    kind: Literal["check", "trigger", "function"]
    name: str
    table: str
    schema: str | None
    create: tuple[str, ...]
    drop: tuple[str, ...]


def _ok(cond: str, dialect: str) -> str:
    # A CHECK whose expression is NULL passes, and a trigger's WHEN that is
    # NULL does not fire: every check is wrapped so that unknown means refused.
    if dialect == "postgresql":
        return f"(CASE WHEN {cond} THEN true ELSE false END)"
    return f"(CASE WHEN {cond} THEN 1 ELSE 0 END = 1)"


class Sql:
    """The expressions a dialect needs, over a value ``v`` and a practice ``p``."""

    def __init__(self, dialect: str) -> None:
        if dialect not in ("sqlite", "postgresql", "mysql", "mariadb"):
            raise ConfigurationError(f"carnet's database checks do not support {dialect}")
        self.d = "mysql" if dialect == "mariadb" else dialect

    def pbytes(self, p: str) -> str:
        if self.d == "sqlite":
            return f"CAST(CAST({p} AS TEXT) AS BLOB)"
        if self.d == "postgresql":
            return f"convert_to(CAST({p} AS text), 'UTF8')"
        return f"CAST(CONVERT({p} USING utf8mb4) AS BINARY)"

    def blen(self, b: str) -> str:
        return f"octet_length({b})" if self.d == "postgresql" else f"length({b})"

    def sub(self, v: str, start: int | str, n: int | str) -> str:
        if self.d == "postgresql":
            return f"substring({v} from {start} for {n})"
        return f"substr({v}, {start}, {n})"

    def byte(self, hex2: str) -> str:
        if self.d == "postgresql":
            return f"'\\x{hex2}'::bytea"
        return f"x'{hex2}'" if self.d == "sqlite" else f"X'{hex2}'"

    def lowhex(self, b: str) -> str:
        if self.d == "postgresql":
            return f"encode({b}, 'hex')"
        return f"lower(hex({b}))"

    def u16_is(self, two: str, n: str) -> str:
        # The header's u16be length compared as hex digits: no decoding of stored bytes.
        if self.d == "sqlite":
            return f"hex({two}) = printf('%04X', {n})"
        if self.d == "postgresql":
            return f"encode({two}, 'hex') = lpad(to_hex({n}), 4, '0')"
        return f"hex({two}) = lpad(hex({n}), 4, '0')"

    def text_eq(self, a: str, b: str) -> str:
        # Exact comparison of text, whatever the column's collation.
        if self.d == "sqlite":
            return f"{a} = {b} COLLATE BINARY"
        if self.d == "postgresql":
            return f'{a} COLLATE "C" = {b}'
        return f"CAST({a} AS BINARY) = {b}"

    def text_ne(self, a: str, b: str) -> str:
        return f"NOT ({self.text_eq(a, b)})"

    def length(self, v: str, storage: str) -> str:
        if self.d == "postgresql":
            return f"octet_length({v})" if storage == "binary" else f"char_length({v})"
        if self.d == "sqlite":
            return f"length({v})"  # characters for TEXT, bytes for a BLOB
        return f"length({v})" if storage == "binary" else f"char_length({v})"

    # -- the checks, over value v (and practice p) -----------------------------------

    def is_v2(self, v: str, storage: str) -> str:
        if storage == "binary":
            return f"{self.sub(v, 1, 1)} = {self.byte('02')}"
        return self.text_eq(self.sub(v, 1, len(envelope.TEXT_PREFIX_V2)), "'carnet:2:'")

    def format(self, v: str, storage: str, mode: Mode, labels: Sequence[str]) -> str:
        """A non-NULL ``v`` is a well-framed value of a version the mode accepts,
        and a v2 value names one of ``labels`` (its tag) in its header."""
        length = self.length(v, storage)
        tags = [envelope.label_tag(label).hex() for label in labels]
        if storage == "binary":
            at = self.sub(v, envelope.LABEL_TAG_AT + 1, envelope.LABEL_TAG_SIZE)
            tagged = " OR ".join(f"{at} = {self.byte(tag)}" for tag in tags)
            v2 = f"({length} >= {envelope.MIN_SIZE} AND {self.is_v2(v, storage)} AND ({tagged}))"
            v1 = f"({length} >= {envelope.V1_MIN_SIZE} AND {self.sub(v, 1, 1)} = {self.byte('01')})"
            typed = f"typeof({v}) = 'blob' AND " if self.d == "sqlite" else ""
        else:
            # "carnet:2:" + 32 hex + ":" + 8 hex (label tag) + ":" + at least 2 hex
            # (practice) + ":" + base64 of >= 28 bytes.
            colon = 1 + len(envelope.TEXT_PREFIX_V2) + 2 * envelope.KEY_ID_SIZE
            colon2 = colon + 1 + 2 * envelope.LABEL_TAG_SIZE
            at = self.sub(v, colon + 1, 2 * envelope.LABEL_TAG_SIZE)
            tagged = " OR ".join(self.text_eq(at, repr(tag)) for tag in tags)
            v2 = (
                f"({length} >= {colon2 + 3 + 40} AND {self.is_v2(v, storage)} "
                f"AND {self.text_eq(self.sub(v, colon, 1), _COLON)} "
                f"AND ({tagged}) "
                f"AND {self.text_eq(self.sub(v, colon2, 1), _COLON)})"
            )
            # v1's base64 starts with "A" (the version byte 0x01) and holds >= 45 bytes.
            v1 = f"({length} >= 67 AND {self.text_eq(self.sub(v, 1, 8), _V1_HEAD)})"
            typed = f"typeof({v}) = 'text' AND " if self.d == "sqlite" else ""
        if mode == "v2":
            cond = v2
        elif mode == "v1":
            cond = f"({v2} OR {v1})"
        else:
            legacy = self.text_ne(self.sub(v, 1, len(envelope.TEXT_PREFIX)), "'carnet:'")
            cond = f"({legacy} OR {v2} OR {v1})"
        return _ok(f"{typed}{cond}", self.d)

    def practice(self, v: str, storage: str, p: str) -> str:
        """A v2 value names exactly practice ``p`` (other values: the format check decides)."""
        pb = self.pbytes(p)
        n = self.blen(pb)
        if storage == "binary":
            start = envelope.PRACTICE_AT + 1
            fixed = envelope.PRACTICE_AT + envelope.NONCE_SIZE + envelope.TAG_SIZE
            same = (
                f"{p} IS NOT NULL AND {self.length(v, storage)} >= {fixed} + {n} "
                f"AND {self.u16_is(self.sub(v, envelope.PRACTICE_AT - 1, 2), n)} "
                f"AND {self.sub(v, start, n)} = {pb}"
            )
        else:
            # After "carnet:2:", the key id, ":", the label tag and ":".
            at = (
                len(envelope.TEXT_PREFIX_V2)
                + 2 * envelope.KEY_ID_SIZE
                + 2 * envelope.LABEL_TAG_SIZE
                + 3
            )
            same = (
                f"{p} IS NOT NULL "
                f"AND {self.text_eq(self.sub(v, at, f'2 * {n}'), self.lowhex(pb))} "
                f"AND {self.text_eq(self.sub(v, f'{at} + 2 * {n}', 1), _COLON)}"
            )
        return _ok(f"NOT ({self.is_v2(v, storage)}) OR ({same})", self.d)

    def key_id_hex(self, v: str, storage: str) -> str:
        if storage == "binary":
            return self.lowhex(self.sub(v, 2, envelope.KEY_ID_SIZE))
        return self.sub(v, len(envelope.TEXT_PREFIX_V2) + 1, 2 * envelope.KEY_ID_SIZE)

    def key_missing(self, v: str, storage: str, p: str, keys: str) -> str:
        """True when a v2 value's key id is not a value key of practice ``p``."""
        kinds = ", ".join(f"'{k}'" for k in VALUE_KEY_KINDS)
        return (
            f"{self.is_v2(v, storage)} AND NOT EXISTS (SELECT 1 FROM {keys} k "
            f"WHERE k.key_id = {self.key_id_hex(v, storage)} "
            f"AND {self.pbytes('k.tenant')} = {self.pbytes(p)} AND k.kind IN ({kinds}))"
        )


def quote(dialect: sa.Dialect, name: str, schema: str | None = None) -> str:
    q = dialect.identifier_preparer
    return (q.quote_schema(schema) + "." if schema else "") + q.quote(name)


def ddl_objects(
    spec: ColumnSpec, dialect: sa.Dialect, *, keys_table: str | None = None
) -> list[DDLObject]:
    """The CHECK constraints and triggers that enforce ``spec`` on ``dialect``.

    ``keys_table``: the name of the key table when it lives in the same
    database (the key check is installed only then).
    """
    s = Sql(dialect.name)
    tbl = quote(dialect, spec.table, spec.schema)
    col = quote(dialect, spec.column)
    st = spec.storage
    out: list[DDLObject] = []

    def row_check(kind: str, expr_of: Any, also: Sequence[str] = ()) -> None:
        name = spec.name(kind)
        if s.d == "sqlite":
            # SQLite: no ALTER TABLE ... ADD CONSTRAINT, so the row's checks are triggers.
            cond = expr_of(f"NEW.{col}")
            out.extend(_sqlite_triggers(name, spec, tbl, col, cond, dialect, also=also))
            return
        expr = expr_of(col)
        qn = quote(dialect, name)
        drop = f"ALTER TABLE {tbl} DROP CONSTRAINT IF EXISTS {qn}"
        out.append(
            DDLObject(
                "check",
                name,
                spec.table,
                spec.schema,
                (f"ALTER TABLE {tbl} ADD CONSTRAINT {qn} CHECK ({col} IS NULL OR {expr})",),
                (drop,),
            )
        )

    labels = (spec.field_label, *spec.also_labels)
    row_check("f", lambda v: s.format(v, st, spec.mode, labels))
    if spec.practice is not None:
        pcol = quote(dialect, spec.practice)
        prefix = "NEW." if s.d == "sqlite" else ""
        row_check("p", lambda v: s.practice(v, st, f"{prefix}{pcol}"), also=(pcol,))
        if keys_table is not None:
            out.extend(_key_triggers(spec, dialect, s, tbl, col, keys_table, local=pcol))
    elif spec.parent is not None:
        out.extend(_parent_triggers(spec, dialect, s, tbl, col, keys_table))
    elif keys_table is not None:
        pass  # no practice in the row: the key check has nothing to compare with
    return out


def _sqlite_triggers(
    name: str,
    spec: ColumnSpec,
    tbl: str,
    col: str,
    ok: str,
    dialect: sa.Dialect,
    also: Sequence[str] = (),
) -> list[DDLObject]:
    objs = []
    of = ", ".join([col, *also])
    for suffix, event in (("_i", "INSERT"), ("_u", f"UPDATE OF {of}")):
        tname = quote(dialect, name + suffix)
        objs.append(
            DDLObject(
                "trigger",
                name + suffix,
                spec.table,
                spec.schema,
                (
                    f"CREATE TRIGGER {tname} BEFORE {event} ON {tbl} FOR EACH ROW "
                    f"WHEN NEW.{col} IS NOT NULL AND NOT {ok} "
                    f"BEGIN SELECT RAISE(ABORT, '{name}'); END",
                ),
                (f"DROP TRIGGER IF EXISTS {tname}",),
            )
        )
    return objs


def _key_triggers(
    spec: ColumnSpec,
    dialect: sa.Dialect,
    s: Sql,
    tbl: str,
    col: str,
    keys_table: str,
    *,
    local: str,
) -> list[DDLObject]:
    name = spec.name("k")
    keys = quote(dialect, keys_table, spec.schema)
    # Checked only for a value that names its row's practice: any other is
    # the practice check's to refuse, which says so more precisely.
    matches = s.practice(f"NEW.{col}", spec.storage, f"NEW.{local}")
    missing = s.key_missing(f"NEW.{col}", spec.storage, f"NEW.{local}", keys)
    if s.d == "sqlite":
        return _sqlite_triggers(
            name,
            spec,
            tbl,
            col,
            f"NOT ({matches} AND COALESCE({missing}, 1))",
            dialect,
            also=(local,),
        )
    body = (
        f"IF NEW.{col} IS NOT NULL AND {matches} AND COALESCE({missing}, true) "
        f"THEN {_raise(s, name)} END IF;"
    )
    return _procedural(spec, dialect, s, name, tbl, [col, local], body, declare="")


def _raise(s: Sql, name: str) -> str:
    if s.d == "postgresql":
        return f"RAISE EXCEPTION '{name}' USING ERRCODE = '23514', CONSTRAINT = '{name}';"
    return f"SIGNAL SQLSTATE '23000' SET MESSAGE_TEXT = '{name}';"


def _procedural(
    spec: ColumnSpec,
    dialect: sa.Dialect,
    s: Sql,
    name: str,
    tbl: str,
    of: Sequence[str],
    body: str,
    *,
    declare: str,
    table: str | None = None,
    schema: str | None = None,
    events: Sequence[str] = ("INSERT", "UPDATE"),
) -> list[DDLObject]:
    """A BEFORE trigger running ``body`` (PL/pgSQL or MariaDB SQL) for each row."""
    table = table or spec.table
    schema = schema if table != spec.table else spec.schema
    if s.d == "postgresql":
        fn = quote(dialect, name, schema)
        evs = " OR ".join(e if e != "UPDATE" else f"UPDATE OF {', '.join(of)}" for e in events)
        return [
            DDLObject(
                "function",
                name,
                table,
                schema,
                (
                    f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql "
                    f"AS $carnet$ DECLARE {declare} BEGIN {body} RETURN NEW; END $carnet$",
                ),
                (f"DROP FUNCTION IF EXISTS {fn}()",),
            ),
            DDLObject(
                "trigger",
                name,
                table,
                schema,
                (
                    f"CREATE TRIGGER {quote(dialect, name)} BEFORE {evs} ON {tbl} "
                    f"FOR EACH ROW EXECUTE FUNCTION {fn}()",
                ),
                (f"DROP TRIGGER IF EXISTS {quote(dialect, name)} ON {tbl}",),
            ),
        ]
    objs = []
    for ev in events:
        suffix = "_i" if ev == "INSERT" else "_u"
        tname = quote(dialect, name + suffix, schema)
        objs.append(
            DDLObject(
                "trigger",
                name + suffix,
                table,
                schema,
                (
                    f"CREATE TRIGGER {tname} BEFORE {ev} ON {tbl} FOR EACH ROW "
                    f"BEGIN {declare} {body} END",
                ),
                (f"DROP TRIGGER IF EXISTS {tname}",),
            )
        )
    return objs


def _parent_triggers(
    spec: ColumnSpec,
    dialect: sa.Dialect,
    s: Sql,
    tbl: str,
    col: str,
    keys_table: str | None,
) -> list[DDLObject]:
    parent = spec.parent
    assert parent is not None  # noqa: S101 - only called for a parent spec
    ptbl = quote(dialect, parent.table, parent.schema)
    pkey = quote(dialect, parent.key)
    pprac = quote(dialect, parent.practice)
    fk = quote(dialect, parent.fk)
    st = spec.storage
    pname = spec.name("p")
    kname = spec.name("k")
    mname = spec.name("m")
    keys = quote(dialect, keys_table, spec.schema) if keys_table else None
    out: list[DDLObject] = []
    if s.d == "sqlite":
        # SQLite serialises writers: a plain read of the parent is current.
        pp = f"(SELECT {pprac} FROM {ptbl} WHERE {pkey} = NEW.{fk})"
        out.extend(
            _sqlite_triggers(
                pname, spec, tbl, col, s.practice(f"NEW.{col}", st, pp), dialect, also=(fk,)
            )
        )
        if keys is not None:
            # As for a practice in the row: a value naming another practice is
            # the practice check's to refuse.
            matches = s.practice(f"NEW.{col}", st, pp)
            missing = s.key_missing(f"NEW.{col}", st, pp, keys)
            out.extend(
                _sqlite_triggers(
                    kname,
                    spec,
                    tbl,
                    col,
                    f"NOT ({matches} AND COALESCE({missing}, 1))",
                    dialect,
                    also=(fk,),
                )
            )
        moved = (
            f"{s.pbytes('OLD.' + pprac)} IS NOT {s.pbytes('NEW.' + pprac)} "
            f"AND EXISTS (SELECT 1 FROM {tbl} c WHERE c.{fk} = OLD.{pkey} AND c.{col} IS NOT NULL)"
        )
        tname = quote(dialect, mname + "_u")
        out.append(
            DDLObject(
                "trigger",
                mname + "_u",
                parent.table,
                parent.schema,
                (
                    f"CREATE TRIGGER {tname} BEFORE UPDATE OF {pprac} ON {ptbl} FOR EACH ROW "
                    f"WHEN {moved} BEGIN SELECT RAISE(ABORT, '{mname}'); END",
                ),
                (f"DROP TRIGGER IF EXISTS {tname}",),
            )
        )
        return out
    practice_ok = s.practice(f"NEW.{col}", st, "pp")
    key_check = ""
    if keys is not None:
        missing = s.key_missing(f"NEW.{col}", st, "pp", keys)
        true = "true" if s.d == "postgresql" else "1"
        key_check = f"IF COALESCE({missing}, {true}) THEN {_raise(s, kname)} END IF;"
    if s.d == "postgresql":
        # The child writes its parent row (a no-op UPDATE) at every isolation
        # level, and reads the practice from what it wrote:
        # - parent moved first, uncommitted: the UPDATE waits for the mover;
        #   at READ COMMITTED it then returns the moved row's new practice
        #   (refused here), at REPEATABLE READ and above it fails to serialize.
        # - child first, uncommitted: the mover waits for the child's row lock
        #   and, since the child *updated* the row, a REPEATABLE READ (or
        #   SERIALIZABLE) mover fails to serialize, a READ COMMITTED one
        #   re-reads and its trigger below sees the committed child.
        # A READ COMMITTED child used to take only FOR SHARE: a lock that
        # commits leaves no trace a REPEATABLE READ mover can see, whose trigger
        # reads its older snapshot without the child, so both committed and
        # the value stayed sealed for the old practice (tests/scenarios/
        # test_db_interleave.py, insert first, mover REPEATABLE READ, inserter
        # READ COMMITTED). The price: each child write makes a (HOT) version of
        # its parent row and fires the parent's UPDATE triggers, and two
        # transactions writing children of one parent queue on it (REPEATABLE
        # READ: the second fails to serialize) until the first ends.
        read = (
            f"UPDATE {ptbl} SET {pprac} = {pprac} WHERE {pkey} = NEW.{fk} "
            f"RETURNING CAST({pprac} AS text) INTO pp;"
        )
        declare = "pp text;"
        # Nested, so that the children are read (and locked) only on a real move,
        # not on the no-op write of the parent above.
        moved_body = (
            f"IF {s.pbytes('OLD.' + pprac)} IS DISTINCT FROM {s.pbytes('NEW.' + pprac)} THEN "
            f"IF EXISTS (SELECT 1 FROM {tbl} c WHERE c.{fk} = OLD.{pkey} "
            f"AND c.{col} IS NOT NULL FOR SHARE) THEN {_raise(s, mname)} END IF; END IF;"
        )
        mdeclare = ""
    else:
        # InnoDB: a locking read sees the newest committed row, not the snapshot.
        read = (
            f"SELECT CAST(CONVERT({pprac} USING utf8mb4) AS BINARY) INTO pp FROM {ptbl} "
            f"WHERE {pkey} = NEW.{fk} LOCK IN SHARE MODE;"
        )
        declare = (
            "DECLARE pp LONGBLOB DEFAULT NULL; "
            "DECLARE CONTINUE HANDLER FOR NOT FOUND SET pp = NULL;"
        )
        moved_body = (
            f"IF NOT ({s.pbytes('OLD.' + pprac)} <=> {s.pbytes('NEW.' + pprac)}) THEN "
            f"SELECT COUNT(*) INTO n FROM {tbl} c WHERE c.{fk} = OLD.{pkey} "
            f"AND c.{col} IS NOT NULL LOCK IN SHARE MODE; "
            f"IF n > 0 THEN {_raise(s, mname)} END IF; END IF;"
        )
        mdeclare = "DECLARE n INT DEFAULT 0;"
    body = (
        f"IF NEW.{col} IS NOT NULL THEN {read} "
        f"IF NOT {practice_ok} THEN {_raise(s, pname)} END IF; {key_check} END IF;"
    )
    out.extend(_procedural(spec, dialect, s, pname, tbl, [col, fk], body, declare=declare))
    out.extend(
        _procedural(
            spec,
            dialect,
            s,
            mname,
            ptbl,
            [pprac],
            moved_body,
            declare=mdeclare,
            table=parent.table,
            schema=parent.schema,
            events=("UPDATE",),
        )
    )
    return out
