"""Decoy notes: values no legitimate screen ever opens, that raise the alarm when one is.

An operator plants, in a practice's notes, a few values sealed under the
practice's *decoy key* (a key of kind ``decoy`` in ``carnet_keys``, wrapped
by the master key like a data key). In the application table a decoy is a
note like the others: the same format (v2 envelope, the column's label and
practice), a key id of the same shape (16 random bytes), a length drawn from
the lengths of the practice's own notes in that column, a plaintext written
like a note. What tells it apart is the key table: the decoy key's row says
``kind = 'decoy'``. So a holder of the key table and of the application
table can tell decoys from notes (docs/audit.md, "Decoy notes"); a reader
through the application, which shows notes and not key rows, cannot.

Opening one through any read path of the application (the ORM, Core, a
:class:`~carnet.Sealed` value, a search that opens candidates) reaches the
KeyManager's key lookup, which calls :func:`opened`: it logs at CRITICAL,
records an ``alert`` in the audit trail, calls the application's alert hook,
optionally stops the principal for the rest of its budget's window, and by
default refuses the read (:class:`~carnet.errors.DecoyOpened`). carnet's own
commands (reencrypt, verify, migrate, export, reindex; retire and status
never open values) recognise a decoy by its key id, with
:meth:`KeyManager.is_decoy`, and never open it.

Where to place them: in rows no screen lists, e.g. one decoy patient per
practice, hidden from every clinician's list by the application's own
query, whose notes are decoys. A query that reads "all notes of the practice"
(an export script, a scraper) meets them; a clinician's screen never does.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import envelope
from .errors import ConfigurationError, DecoyOpened
from .keystore import ACTIVE, DECOY, KeyRecord, practice_id_type
from .trail import current_principal

if TYPE_CHECKING:
    from .audit import DecryptBudget
    from .manager import KeyManager
    from .trail import AuditTrail

log = logging.getLogger("carnet.audit")

DECOYS_TABLE = "carnet_decoys"
# Plaintext lengths when the practice has no note in the column yet (bytes).
_DEFAULT_LENGTHS = (180, 240, 320, 410, 520, 640)
_RNG = random.SystemRandom()


def decoys_table(metadata: sa.MetaData, name: str = DECOYS_TABLE) -> sa.Table:
    """Where the decoys were planted (table, column, practice, row key): the operator's
    list, for ``carnet decoys list`` and ``remove``. It says where the decoys are:
    keep it as private as the key table (which says it anyway, by key kind)."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("table_name", sa.String(255), nullable=False),
        sa.Column("column_name", sa.String(255), nullable=False),
        sa.Column("practice", practice_id_type(), nullable=False),
        sa.Column("row_key", sa.Text, nullable=False),  # JSON of the primary key's values
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("planted_at", sa.String(32), nullable=False),
        sa.Index(f"ix_{name}_practice", "practice"),
    )


# -- the alarm ----------------------------------------------------------------------------


@dataclass
class Alert:
    """What the alert hook receives: who, which practice, which field. Never a value."""

    principal: str
    practice: str
    field: str
    key_id: str
    at: float


class DecoyAlarm:
    """What happens when a decoy is opened; ``install(keys)`` to use it.

    ``hook``: called with an :class:`Alert` (page someone). ``trail``: the
    :class:`~carnet.trail.AuditTrail` the alert is recorded in (default: the
    trail of the manager's decrypt hook, if any). ``refuse`` (default True):
    the read raises :class:`DecoyOpened`; False lets it through after the
    alarm (a honeypot that does not tip the reader off). ``stop``: a
    :class:`~carnet.audit.DecryptBudget` whose window the principal is
    stopped for (a shared budget stops it in every process).
    """

    def __init__(
        self,
        *,
        hook: Callable[[Alert], None] | None = None,
        trail: AuditTrail | None = None,
        refuse: bool = True,
        stop: DecryptBudget | None = None,
    ) -> None:
        self.hook = hook
        self.trail = trail
        self.refuse = refuse
        self.stop = stop
        self.alerts = 0

    def install(self, manager: KeyManager) -> DecoyAlarm:
        manager.decoy_alarm = self
        return self


def opened(manager: KeyManager, rec: KeyRecord, tenant: str, label: str) -> None:
    """A value under decoy key ``rec`` is about to be opened for ``tenant``: the alarm.

    Raises :class:`DecoyOpened` unless the manager's :class:`DecoyAlarm` says
    ``refuse=False``. Nothing here can stop the alarm from being logged.
    """
    principal = current_principal()
    alarm: DecoyAlarm | None = manager.decoy_alarm
    alert = Alert(principal, rec.tenant, label, rec.key_id.hex(), time.time())
    log.critical(
        "carnet: DECOY OPENED: principal %r opened a decoy note of practice %r (%s): "
        "no legitimate screen shows one; investigate this principal",
        principal,
        rec.tenant,
        label,
    )
    trail = alarm.trail if alarm is not None else None
    if trail is None:
        trail = getattr(manager.decrypt_hook, "trail", None)
    if trail is not None:
        trail.alert(principal, rec.tenant, label, {"alert": "decoy opened", "key_id": alert.key_id})
    if alarm is not None:
        alarm.alerts += 1
        if alarm.stop is not None:
            alarm.stop.stop(principal)
        if alarm.hook is not None:
            try:
                alarm.hook(alert)
            except Exception as exc:  # noqa: BLE001 - the alarm must not be silenced
                log.error("carnet: decoy alert hook failed (%s)", type(exc).__name__)
        if not alarm.refuse:
            return
    raise DecoyOpened(
        f"principal {principal!r} tried to open a decoy note of practice {rec.tenant!r} "
        f"({label}): refused, and the alarm was raised"
    )


# -- the decoy key and values -------------------------------------------------------------


def decoy_key(manager: KeyManager, practice: str) -> KeyRecord:
    """The active decoy key of ``practice``, created on first use."""
    store = manager.store
    for _attempt in range(5):
        recs = [r for r in store.decoy_keys(practice) if r.state == ACTIVE]
        if recs:
            return recs[0]
        manager._writable("create a decoy key", practice)
        if not [r for r in manager.list_keys(practice) if r.kind == "data" and r.state == ACTIVE]:
            # A decoy key of a practice with no note would itself be a tell, and
            # a destroyed practice must stay destroyed.
            raise ConfigurationError(
                f"practice {practice!r} has no active data key (none yet, or destroyed): "
                "decoys go among a practice's notes"
            )
        key_id, _secret, wrapped = manager._new_wrapped(practice, DECOY)
        store.insert_decoy_key(practice, key_id, wrapped, manager.master_key.uri)
    raise ConfigurationError(
        f"could not create the decoy key of practice {practice!r}: a key table made before "
        "decoys refuses it until 'carnet init' (or the Alembic op) upgrades it"
    )


def _plaintext(length: int) -> bytes:
    """A note-like text of ``length`` bytes (UTF-8, cut on a character boundary)."""
    from . import _synthetic

    rng = random.Random(_RNG.getrandbits(64))  # noqa: S311 - cover text, not a secret
    patient = _synthetic._patient(rng, rng.randint(1, 10**6), "decoy")
    when = dt.date.today() - dt.timedelta(days=rng.randint(1, 400))
    text = ""
    while len(text.encode("utf-8")) < length:
        topic = rng.choice(sorted(_synthetic._GENERATORS))
        text = (text + " " + _synthetic.note_text(rng, patient, topic, when)).strip()
    out = text.encode("utf-8")[:length].decode("utf-8", "ignore").encode("utf-8")
    # A multi-byte character cut at the end: made up with spaces, so the size is exact.
    return out + b" " * (length - len(out))


def seal_decoys(
    manager: KeyManager,
    practice: str,
    label: str,
    count: int,
    *,
    lengths: Sequence[int] = (),
    text: bool = False,
) -> list[Any]:
    """``count`` decoy values for ``practice`` and field ``label``, to store in rows the
    application makes (its other columns filled as it must). ``lengths``: plaintext
    lengths to draw from (:func:`note_lengths` of the column), so the decoys' sizes
    follow the practice's own notes. ``text``: values for a text column (``storage="text"``).
    """
    if count < 1:
        raise ConfigurationError("plant at least one decoy")
    rec = decoy_key(manager, practice)
    dek = manager._unwrap(rec)  # never cached: only data keys are
    sealer = envelope.Sealer(dek.cipher, rec.key_id, label, practice)
    pool = list(lengths) or list(_DEFAULT_LENGTHS)
    out: list[Any] = []
    for _ in range(count):
        blob = sealer.seal(_plaintext(_RNG.choice(pool)))
        out.append(envelope.to_text(blob) if text else blob)
    return out


def _is_text(column: sa.Column[Any]) -> bool:
    try:
        return column.type.python_type is not bytes
    except NotImplementedError:
        return True


def note_lengths(
    engine: sa.Engine, table: sa.Table, column: str, tenant_column: str, practice: str, label: str
) -> list[int]:
    """Plaintext lengths of up to 1,000 of ``practice``'s values in ``table.column``, read
    from their ciphertext sizes (nothing is opened)."""
    col = table.c[column]
    # The envelope's size around a plaintext, for this label and practice (any key).
    overhead = len(
        envelope.Sealer(bytes(32), bytes(envelope.KEY_ID_SIZE), label, practice).seal(b"")
    )
    out = []
    with engine.connect() as conn:
        q = sa.select(col).where(table.c[tenant_column] == practice, col.is_not(None)).limit(1000)
        for (v,) in conn.execute(q):
            if isinstance(v, str):
                if not envelope.looks_like_text_ciphertext(v):
                    continue  # legacy plaintext: not a note's size
                blob = envelope.from_text(v)
            else:
                blob = bytes(v)
            if len(blob) > overhead:
                out.append(len(blob) - overhead)
    return out


def _now() -> str:
    from .audit_store import iso

    return iso(time.time())


def plant(
    manager: KeyManager,
    engine: sa.Engine,
    table: str,
    column: str,
    practice: str,
    count: int,
    *,
    tenant_column: str = "practice_id",
    label: str | None = None,
    other: Callable[[int], Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Insert ``count`` decoy rows into ``table`` (``column`` a decoy note of
    ``practice``, ``tenant_column`` the practice, ``other(i)`` the row's other
    columns) and record where they are. Returns the planted rows' keys."""
    t = sa.Table(table, sa.MetaData(), autoload_with=engine)
    if column not in t.c or tenant_column not in t.c:
        raise ConfigurationError(f"{table} has no column {column!r} or {tenant_column!r}")
    lab = label or f"{table}.{column}"
    lengths = note_lengths(engine, t, column, tenant_column, practice, lab)
    values = seal_decoys(manager, practice, lab, count, lengths=lengths, text=_is_text(t.c[column]))
    rec = decoy_key(manager, practice)
    reg = ensure_table(engine)
    planted = []
    pk = [c.name for c in t.primary_key.columns]
    with engine.begin() as conn:
        for i, v in enumerate(values):
            row = {**(other(i) if other is not None else {}), tenant_column: practice, column: v}
            res = conn.execute(t.insert().values(**row))
            key = dict(zip(pk, res.inserted_primary_key or (), strict=False))
            conn.execute(
                reg.insert().values(
                    table_name=table,
                    column_name=column,
                    practice=practice,
                    row_key=json.dumps(key, default=str, sort_keys=True),
                    key_id=rec.key_id.hex(),
                    planted_at=_now(),
                )
            )
            planted.append(key)
    log.warning(
        "carnet: planted %d decoy note(s) in %s.%s for practice %r", count, table, column, practice
    )
    return planted


def record(
    engine: sa.Engine,
    manager: KeyManager,
    table: str,
    column: str,
    practice: str,
    row_key: Mapping[str, Any],
) -> None:
    """Record a decoy the application planted itself (after :func:`seal_decoys`)."""
    rec = decoy_key(manager, practice)
    reg = ensure_table(engine)
    with engine.begin() as conn:
        conn.execute(
            reg.insert().values(
                table_name=table,
                column_name=column,
                practice=practice,
                row_key=json.dumps(dict(row_key), default=str, sort_keys=True),
                key_id=rec.key_id.hex(),
                planted_at=_now(),
            )
        )


def ensure_table(engine: sa.Engine) -> sa.Table:
    reg = decoys_table(sa.MetaData())
    reg.create(engine, checkfirst=True)
    return reg


def list_decoys(engine: sa.Engine, practice: str | None = None) -> list[dict[str, Any]]:
    reg = decoys_table(sa.MetaData())
    if not sa.inspect(engine).has_table(reg.name):
        return []
    q = sa.select(reg).order_by(reg.c.id)
    if practice is not None:
        q = q.where(reg.c.practice == practice)
    with engine.connect() as conn:
        return [{**dict(r._mapping), "row_key": json.loads(r.row_key)} for r in conn.execute(q)]


def remove(engine: sa.Engine, *, practice: str | None = None, ids: Sequence[int] = ()) -> int:
    """Delete planted decoy rows (of ``practice``, or these ids, or all) and their records."""
    reg = decoys_table(sa.MetaData())
    chosen = [d for d in list_decoys(engine, practice) if not ids or d["id"] in set(ids)]
    tables: dict[str, sa.Table] = {}
    with engine.begin() as conn:
        for d in chosen:
            t = tables.get(d["table_name"])
            if t is None:
                t = tables[d["table_name"]] = sa.Table(
                    d["table_name"], sa.MetaData(), autoload_with=conn
                )
            key = d["row_key"]
            if key:
                conn.execute(t.delete().where(*(t.c[k] == v for k, v in key.items())))
            conn.execute(reg.delete().where(reg.c.id == d["id"]))
    return len(chosen)
