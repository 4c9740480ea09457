"""``carnet doctor``: check a deployment, in order, and say what to fix.

Each check returns a :class:`Check` (ok, warn or fail, a one-line finding, the
fix); a failing check that later checks depend on (no database, no key table,
no master key) stops the run there. Read-only: nothing is created, converted
or written. Like every report, no check holds a note or key material.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from . import jobs as _jobs
from . import lifecycle
from ._engines import make_engine
from ._loader import load
from .errors import (
    CarnetError,
    ConfigurationError,
    KeyStoreInconsistent,
    MasterKeyMismatch,
    MasterKeyUnavailable,
)
from .exitcodes import EXIT_DATABASE, EXIT_FAILED_ROWS, EXIT_MASTER_KEY, EXIT_OK, EXIT_USAGE
from .keystore import key_anomalies, keys_table
from .keystore_upgrade import inexact_practice_columns
from .manager import KeyManager
from .providers import open_master_key
from .types import encrypted_type

OK, WARN, FAIL = "ok", "warn", "fail"


DEFAULT_SAMPLE = 5  # data keys unwrapped per master key unless --all


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str | None = None
    # the exit code this finding maps to when it fails
    exit_code: int = EXIT_OK
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    stopped_after: str | None = None

    @property
    def exit_code(self) -> int:
        # The first failure in check order: the one to fix first.
        for c in self.checks:
            if c.status == FAIL:
                return c.exit_code
        return EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == EXIT_OK,
            "exit_code": self.exit_code,
            "stopped_after": self.stopped_after,
            "checks": [asdict(c) for c in self.checks],
        }


# -- the application (--app) -------------------------------------------------------------


@dataclass(frozen=True)
class DeclaredColumn:
    table: str
    column: str
    storage: str  # "binary" or "text"
    type_name: str
    label: str | None = None  # the field label, when the column sets one (else table.column)


def load_app(spec: str) -> Any:
    """The object named ``module:attribute`` (a MetaData or a declarative Base).

    The current directory is importable, as for ``python -m``.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return load(spec, what="--app", example="myapp.models:Base")


def app_metadata(obj: Any) -> sa.MetaData:
    if isinstance(obj, sa.MetaData):
        return obj
    md = getattr(obj, "metadata", None)
    if isinstance(md, sa.MetaData):
        return md
    raise ConfigurationError(
        f"--app must name a SQLAlchemy MetaData or a declarative Base (got {type(obj).__name__})"
    )


def declared_columns(obj: Any) -> list[DeclaredColumn]:
    """The application's encrypted columns (EncryptedText and its subclasses, also
    behind a TypeDecorator or ``with_variant``)."""
    out = []
    for tbl in app_metadata(obj).sorted_tables:
        for col in tbl.columns:
            typ = encrypted_type(col)
            if typ is not None:
                storage = getattr(typ, "storage", "binary")
                out.append(
                    DeclaredColumn(
                        tbl.fullname, col.name, str(storage), type(typ).__name__, typ.label
                    )
                )
    return out


def app_engines(obj: Any) -> list[sa.Engine]:
    """Engines defined beside the application's MetaData or Base (module globals)."""
    return _beside(obj, sa.Engine)


def app_managers(obj: Any) -> list[KeyManager]:
    """The key managers the application set up when its module was imported: the one
    given to :func:`carnet.configure`, and those defined beside it (module globals)."""
    from .context import default_manager

    found: list[KeyManager] = []
    default = default_manager()
    for m in [*([default] if default is not None else []), *_beside(obj, KeyManager)]:
        if all(m is not f for f in found):
            found.append(m)
    return found


def _beside(obj: Any, kind: type[Any]) -> list[Any]:
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    if isinstance(obj, sa.MetaData) or module is None:
        # A MetaData instance has no __module__ of its own: look where it was named.
        module = next(
            (
                m
                for m in list(sys.modules.values())
                if m is not None and any(v is obj for v in vars(m).values())
            ),
            None,
        )
    if module is None:
        return []
    seen: list[Any] = []
    for v in vars(module).values():
        if isinstance(v, kind) and all(v is not e for e in seen):
            seen.append(v)
    return seen


# -- the checks ----------------------------------------------------------------------------


def _database(url: str) -> tuple[Check, sa.Engine | None]:
    try:
        engine = make_engine(url)
    except ConfigurationError as exc:
        driver = "not installed" in str(exc)
        return Check(
            "database",
            FAIL,
            str(exc),
            fix=(
                "install the driver: pip install 'carnet[postgres]' (PostgreSQL) or "
                "'carnet[mysql]' (MariaDB, MySQL)"
            )
            if driver
            else "fix the URL (CARNET_DATABASE_URL or --database-url)",
            exit_code=EXIT_USAGE,
        ), None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        from .errors import describe_db_error

        engine.dispose()
        return Check(
            "database",
            FAIL,
            f"cannot connect: {describe_db_error(exc)}",
            fix="check the host, port, credentials and that the server runs",
            exit_code=EXIT_DATABASE,
        ), None
    return Check(
        "database",
        OK,
        f"{lifecycle.safe_url(engine)} reachable "
        f"({engine.dialect.name}, driver {engine.dialect.driver})",
    ), engine


def _tables(engine: sa.Engine) -> Check:
    insp = sa.inspect(engine)
    if not insp.has_table("carnet_keys"):
        return Check(
            "carnet_tables",
            FAIL,
            "carnet_keys is missing",
            fix="run carnet init",
            exit_code=EXIT_USAGE,
        )
    want = {c.name for c in keys_table(sa.MetaData()).columns}
    have = {c["name"] for c in insp.get_columns("carnet_keys")}
    missing = sorted(want - have)
    if missing:
        return Check(
            "carnet_tables",
            FAIL,
            f"carnet_keys was made by an earlier carnet (no {', '.join(missing)})",
            fix="run carnet init (it upgrades the table in place)",
            exit_code=EXIT_USAGE,
        )
    with engine.connect() as conn:
        folding = inexact_practice_columns(conn, keys_table(sa.MetaData()))
    if folding:
        return Check(
            "carnet_tables",
            FAIL,
            f"carnet_keys compares practice ids with a folding collation ({', '.join(folding)})",
            fix="run carnet init (converts them to exact ids)",
            exit_code=EXIT_USAGE,
        )
    if not insp.has_table(_jobs.JOBS_TABLE):
        return Check(
            "carnet_tables",
            WARN,
            "carnet_keys is current; carnet_jobs is missing",
            fix="run carnet init (else the first batch job creates it)",
        )
    return Check("carnet_tables", OK, "carnet_keys and carnet_jobs present and current")


def _master_keys(
    engine: sa.Engine, master: str | None, previous: Sequence[str], all_keys: bool
) -> tuple[list[Check], KeyManager | None]:
    in_use_hint = lifecycle.wrapping_master_keys_hint(engine)
    if not master:
        return [
            Check(
                "master_key",
                FAIL,
                "no master key configured",
                fix="set CARNET_MASTER_KEY (or --master-key)"
                + (
                    f"; {in_use_hint}"
                    if in_use_hint
                    else "; a new deployment creates one with carnet master new URI"
                ),
                exit_code=EXIT_USAGE,
            )
        ], None
    for uri in (master, *previous):
        try:
            open_master_key(uri).close()
        except (ConfigurationError, MasterKeyUnavailable) as exc:
            msg = str(exc)
            fix = (
                in_use_hint
                if in_use_hint
                else f"create it: carnet master new {uri}"
                if uri == master
                else "remove it from the previous master keys if no key needs it"
            )
            if in_use_hint:
                msg = lifecycle.strip_create_hint(msg)
            return [
                Check(
                    "master_key",
                    FAIL,
                    f"cannot open {uri}: {msg}",
                    fix=fix,
                    exit_code=EXIT_MASTER_KEY,
                )
            ], None
    manager = KeyManager(engine, master_key=master, previous_master_keys=tuple(previous))
    checks: list[Check] = []
    by_uri: dict[str, list[Any]] = {}
    for rec in manager.iter_keys():
        if rec.wrapped_key is not None:
            by_uri.setdefault(rec.master_key_uri, []).append(rec)
    configured = [master, *previous]
    # Unwrap: every key, or a sample per master key (each unwrap is a KMS or HSM call).
    failures: list[str] = []
    tried = 0
    rng = random.Random()  # noqa: S311 - picks which keys to test, not a secret
    for uri, recs in sorted(by_uri.items()):
        if uri not in configured:
            continue
        sample = recs if all_keys else rng.sample(recs, min(DEFAULT_SAMPLE, len(recs)))
        for rec in sample:
            tried += 1
            try:
                manager.check_unwrap(rec)
            except (MasterKeyMismatch, MasterKeyUnavailable, CarnetError) as exc:
                failures.append(f"{rec.key_id.hex()} ({rec.tenant}): {type(exc).__name__}")
    total = sum(len(r) for r in by_uri.values())
    scope = (
        f"all {total} data keys" if tried == total else f"a sample of {tried} of {total} data keys"
    )
    unconfigured = {u: len(r) for u, r in by_uri.items() if u not in configured}
    target = _rotation_target(by_uri, master)
    if unconfigured:
        which = ", ".join(f"{n} under {u}" for u, n in sorted(unconfigured.items()))
        if target == master:
            fix = (
                "pass it as --previous-master-key (CARNET_PREVIOUS_MASTER_KEYS) "
                "and finish carnet master rotate --to " + master
            )
        else:
            fix = _moved_on_fix(target, master, by_uri)
        checks.append(
            Check(
                "master_key",
                FAIL,
                f"data keys wrapped by a master key not configured: {which}",
                fix=fix,
                exit_code=EXIT_MASTER_KEY,
                details={"unconfigured": unconfigured},
            )
        )
    if failures:
        checks.append(
            Check(
                "master_key",
                FAIL,
                f"{len(failures)} of {tried} data keys tried do not unwrap: "
                + "; ".join(failures[:10]),
                fix="configure the master key that wrapped them (see carnet keys "
                "list, column MASTER KEY)",
                exit_code=EXIT_MASTER_KEY,
                details={"failed": failures},
            )
        )
    elif not unconfigured:
        checks.append(
            Check(
                "master_key",
                OK,
                f"{master} opens; {scope} unwrap"
                + ("" if tried == total else " (--all for every key)"),
                details={"tried": tried, "total": total},
            )
        )
    for uri in previous:
        n = len(by_uri.get(uri, []))
        if n:
            checks.append(
                Check(
                    "previous_master_keys",
                    WARN,
                    f"{uri} still wraps {n} data key(s): still needed",
                    fix=f"finish carnet master rotate --to {master}"
                    if target == master
                    else _moved_on_fix(target, master, by_uri),
                    details={"uri": uri, "keys": n},
                )
            )
        else:
            checks.append(
                Check(
                    "previous_master_keys",
                    OK,
                    f"{uri} wraps no data key any more: {lifecycle.OLD_MASTER_RULE}",
                    details={"uri": uri, "keys": 0},
                )
            )
    return checks, manager


def _rotation_target(by_uri: dict[str, list[Any]], master: str) -> str | None:
    """The master key the data keys are moving (or moved) to.

    Run with the previous master key after a rotation, the configured key is
    where the keys come from, not where they go: advising a rotation to it
    would rotate back. All keys under one master key: that one. Split between
    several (a rotation under way): the one holding the most recently
    rewritten key row (a rewrap stamps ``updated_at``); the configured key on a
    tie, None when two others tie (no direction to advise).
    """
    live = {u: recs for u, recs in by_uri.items() if recs}
    if not live:
        return master
    if len(live) == 1:
        return next(iter(live))
    latest = {u: max(_aware(r.updated_at) for r in recs) for u, recs in live.items()}
    newest = max(latest.values())
    top = sorted(u for u, t in latest.items() if t == newest)
    if master in top:
        return master
    return top[0] if len(top) == 1 else None


def _aware(value: Any) -> Any:
    # SQLite hands back naive datetimes (stored as UTC).
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _moved_on_fix(target: str | None, master: str, by_uri: dict[str, list[Any]]) -> str:
    """The fix when the data keys went (or are going) to another master key than the
    configured one: configure that one, never rotate back to this one."""
    if target is None:
        return (
            "configure the newest master key as CARNET_MASTER_KEY and the others as "
            "CARNET_PREVIOUS_MASTER_KEYS, then finish carnet master rotate --to it "
            "(carnet keys list shows each key's master key)"
        )
    fix = (
        f"the data keys were rewrapped under {target}: set CARNET_MASTER_KEY={target} "
        f"and keep {master} in CARNET_PREVIOUS_MASTER_KEYS ({lifecycle.OLD_MASTER_RULE})"
    )
    if by_uri.get(master):
        fix += f"; then finish carnet master rotate --to {target}"
    return fix


def _columns(manager: KeyManager, declared: Sequence[DeclaredColumn] | None) -> list[Check]:
    checks: list[Check] = []
    found = lifecycle.discover_columns(manager)
    insp = sa.inspect(manager.engine)
    declared_pairs = [(d.table, d.column) for d in declared or ()]
    missing = []
    for t, c in declared_pairs:
        if not insp.has_table(t) or c not in {x["name"] for x in insp.get_columns(t)}:
            missing.append(f"{t}.{c}")
    if missing:
        checks.append(
            Check(
                "declared_columns",
                FAIL,
                "declared encrypted but absent from the database: " + ", ".join(missing),
                fix="create them (Base.metadata.create_all, or your Alembic "
                "migration; see docs/alembic.md)",
                exit_code=EXIT_USAGE,
                details={"missing": missing},
            )
        )
    if declared is not None:
        undeclared = [f"{t}.{c}" for t, c in found if (t, c) not in declared_pairs]
        if undeclared:
            checks.append(
                Check(
                    "declared_columns",
                    WARN,
                    "hold carnet values but are not declared encrypted by the "
                    "application: " + ", ".join(undeclared),
                    fix="declare them EncryptedText, or the application reads ciphertext as text",
                    details={"undeclared": undeclared},
                )
            )
        elif not missing:
            checks.append(
                Check(
                    "declared_columns",
                    OK,
                    f"{len(declared_pairs)} declared encrypted column(s), all in the database",
                )
            )
    cols = list(found) + [
        tc for tc in declared_pairs if tc not in found and f"{tc[0]}.{tc[1]}" not in missing
    ]
    if not cols:
        checks.append(
            Check(
                "encrypted_columns",
                WARN,
                "no encrypted column found in the data"
                + ("" if declared is not None else " (columns with no rows yet show with --app)"),
                fix=None
                if declared is not None
                else "pass --app module:Base to check the declared ones",
            )
        )
        return checks
    keys = lifecycle._Keys(manager)
    for t, c in cols:
        st = lifecycle.column_status(manager, t, c, keys)
        detail = {
            "table": t,
            "column": c,
            "rows": st.rows,
            "plaintext": st.plaintext,
            "nulls": st.nulls,
            "not_on_active": st.not_on_active,
            "v1": st.v1,
            "unknown_key": st.unknown_key,
        }
        if st.plaintext:
            checks.append(
                Check(
                    "encrypted_columns",
                    WARN,
                    f"{t}.{c}: {st.plaintext} of {st.rows} rows still plaintext",
                    fix=f"carnet migrate run --table {t} --column {c} --tenant ... "
                    "(docs/migration.md)",
                    details=detail,
                )
            )
        elif st.unknown_key:
            checks.append(
                Check(
                    "encrypted_columns",
                    FAIL,
                    f"{t}.{c}: {st.unknown_key} rows under a key carnet_keys does not have",
                    fix=f"carnet verify --table {t} --column {c}",
                    exit_code=EXIT_FAILED_ROWS,
                    details=detail,
                )
            )
        else:
            checks.append(
                Check(
                    "encrypted_columns",
                    OK,
                    f"{t}.{c}: {st.rows} rows, no plaintext"
                    + (
                        f", {st.not_on_active} on older keys (carnet reencrypt)"
                        if st.not_on_active
                        else ""
                    )
                    + (f", {st.v1} in format v1 (carnet reencrypt)" if st.v1 else ""),
                    details=detail,
                )
            )
    return checks


def _database_checks(manager: KeyManager, app_obj: Any | None) -> list[Check]:
    """Each encrypted column's database checks: present, in force, as strict as its data allows.

    With ``--app`` every declared column, its practice checks included; without,
    the columns found holding carnet values, by their format check only.
    """
    from . import dbchecks
    from .verify import checks_spec

    engine = manager.engine
    if app_obj is not None:
        specs = dbchecks.specs_for_metadata(app_metadata(app_obj), engine.dialect.name)
    else:
        specs = [checks_spec(engine, t, c) for t, c in lifecycle.discover_columns(manager)]
    if not specs:
        return []
    with engine.connect() as conn:
        found = dbchecks.status(conn, specs)
        off = {c.spec.table: dbchecks.disabled(conn, c.spec.table) for c in found}
    checks: list[Check] = []
    for c in found:
        where = f"{c.spec.table}.{c.spec.column}"
        detail = c.as_dict()
        if c.ok:
            checks.append(
                Check(
                    "database_checks",
                    OK,
                    f"{where}: checks in force, mode {c.mode}",
                    details=detail,
                )
            )
            continue
        why = []
        gone = sorted(off.get(c.spec.table, set()) & set(c.missing))
        if gone:
            why.append("disabled or NOT VALID: " + ", ".join(gone))
        absent = [n for n in c.missing if n not in gone]
        if absent:
            why.append("missing: " + ", ".join(absent))
        if c.weaker:
            why.append(f"mode {c.mode} while its data allows {c.allowed}")
        checks.append(
            Check(
                "database_checks",
                FAIL,
                f"{where}: the database does not enforce the tenant invariant as it can "
                f"({'; '.join(why)})",
                fix=c.fix,
                exit_code=EXIT_USAGE,
                details=detail,
            )
        )
    return checks


def _key_table(manager: KeyManager) -> list[Check]:
    """Edits of carnet_keys that its rows betray (:func:`carnet.keystore.key_anomalies`).

    A rotation rolled back by moving the active marker to an older key, a
    destroyed or retired key given a state that needs key material: one
    failing check each, with the practice to look at.
    """
    checks: list[Check] = []
    store = manager.store
    for tenant in store.tenants():
        try:
            with store.engine.connect() as conn:
                found = key_anomalies(store.rows(conn, tenant))
        except KeyStoreInconsistent as exc:  # a row incoherent on its own
            found = [str(exc)]
        arg = shlex.quote(tenant)
        for message in found:
            fix = f"inspect the keys: carnet keys list --tenant {arg}"
            if "rolled back" in message:
                fix += f"; then make a newer key active again: carnet keys rotate --tenant {arg}"
            checks.append(
                Check(
                    "key_table",
                    FAIL,
                    message,
                    fix=fix,
                    exit_code=EXIT_FAILED_ROWS,
                    details={"tenant": tenant},
                )
            )
    if not checks:
        checks.append(Check("key_table", OK, "key table: no sign of an edit of carnet_keys"))
    return checks


def _journal(engine: sa.Engine) -> Check | None:
    if engine.dialect.name != "sqlite":
        return None
    with engine.connect() as conn:
        mode = str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()
    if mode == "wal":
        return Check(
            "sqlite_journal",
            OK,
            "journal_mode=wal: batch jobs and the application read while the other writes",
        )
    return Check(
        "sqlite_journal",
        WARN,
        f"journal_mode={mode}: a batch job's commit waits for every reader, and "
        "readers wait for it",
        fix="PRAGMA journal_mode=WAL once on the database file (it persists)",
        details={"journal_mode": mode},
    )


def _app_engines(obj: Any) -> list[Check]:
    checks: list[Check] = []
    engines = app_engines(obj)
    if not engines:
        return [
            Check(
                "app_engine",
                WARN,
                "no Engine found beside the --app object: its settings were not checked",
            )
        ]
    for eng in engines:
        where = lifecycle.safe_url(eng)
        if eng.echo == "debug":
            checks.append(
                Check(
                    "app_engine",
                    FAIL,
                    f"{where}: echo='debug' logs result rows, decrypted notes included",
                    fix="create_engine(..., echo=False)",
                    exit_code=EXIT_USAGE,
                )
            )
        else:
            checks.append(Check("app_engine", OK, f"{where}: echo is not 'debug'"))
        if eng.dialect.name == "sqlite":
            # Through the application's engine, so its connect hooks apply; with
            # its echo off meanwhile, so this check logs nothing on stdout.
            echo, eng.echo = eng.echo, False
            try:
                with eng.connect() as conn:
                    sd = int(conn.exec_driver_sql("PRAGMA secure_delete").scalar() or 0)
            except sa.exc.SQLAlchemyError:
                continue
            finally:
                eng.echo = echo
            if sd:
                checks.append(Check("app_engine", OK, f"{where}: secure_delete on"))
            else:
                checks.append(
                    Check(
                        "app_engine",
                        WARN,
                        f"{where}: secure_delete off: text the application "
                        "deletes or overwrites stays in free pages of the file",
                        fix="run PRAGMA secure_delete=ON on each connection "
                        "(an event.listens_for(engine, 'connect') hook)",
                    )
                )
    return checks


STRICT_WHY = (
    "a request whose practice scope was lost on the way (a framework running "
    "code in another context) then reads and writes under each row's own key, "
    "any practice's, instead of failing"
)
STRICT_FIX = (
    "start the application with carnet.configure(keys, require_scope=True) "
    "(or KeyManager(..., require_scope=True)), and enter carnet.tenant_scope per request"
)


def _app_strict_mode(obj: Any) -> Check:
    """Strict mode, as far as importing the application shows it."""
    managers = app_managers(obj)
    if not managers:
        return Check(
            "app_strict_mode",
            WARN,
            "strict mode not seen: importing the --app module configured no KeyManager "
            "(an application factory may configure it later)",
            fix=STRICT_FIX,
        )
    lax = [m for m in managers if not m.require_scope]
    if lax:
        return Check(
            "app_strict_mode",
            WARN,
            f"{len(lax)} of the application's key managers run without strict mode: {STRICT_WHY}",
            fix=STRICT_FIX,
        )
    return Check("app_strict_mode", OK, "the application's key managers run in strict mode")


def run(
    url: str | None,
    master: str | None,
    previous: Sequence[str],
    *,
    all_keys: bool = False,
    app: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> DoctorReport:
    """Every check in order; stops where the next ones cannot run."""
    rep = DoctorReport()

    def add(checks: Iterable[Check]) -> None:
        for c in checks:
            rep.checks.append(c)
            if progress is not None:
                progress(c.name)

    app_obj = None
    declared: list[DeclaredColumn] | None = None
    if app:
        try:
            app_obj = load_app(app)
            declared = declared_columns(app_obj)
        except ConfigurationError as exc:
            add(
                [
                    Check(
                        "app",
                        FAIL,
                        str(exc),
                        fix="give --app module:attribute naming the "
                        "application's MetaData or declarative Base",
                        exit_code=EXIT_USAGE,
                    )
                ]
            )
            rep.stopped_after = "app"
            return rep
    if not url:
        add(
            [
                Check(
                    "database",
                    FAIL,
                    "no database configured",
                    fix="set CARNET_DATABASE_URL (or --database-url)",
                    exit_code=EXIT_USAGE,
                )
            ]
        )
        rep.stopped_after = "database"
        return rep
    check, engine = _database(url)
    add([check])
    if engine is None:
        rep.stopped_after = "database"
        return rep
    manager: KeyManager | None = None
    try:
        tables = _tables(engine)
        add([tables])
        if tables.status == FAIL and tables.message.endswith("missing"):
            rep.stopped_after = "carnet_tables"
            return rep
        checks, manager = _master_keys(engine, master, previous, all_keys)
        add(checks)
        if manager is None:
            rep.stopped_after = "master_key"
            return rep
        add(_key_table(manager))
        add(_columns(manager, declared))
        add(_database_checks(manager, app_obj))
        journal = _journal(engine)
        if journal is not None:
            add([journal])
        if app_obj is not None:
            add(_app_engines(app_obj))
            add([_app_strict_mode(app_obj)])
    finally:
        if manager is not None:
            manager.close()
        engine.dispose()
    return rep
