"""After the rewrite: compact what can be compacted safely, name what cannot.

An UPDATE does not erase the old text. Where it survives, per backend:

- SQLite: free pages of the database file (unless ``secure_delete``), the
  ``-wal`` file until a checkpoint truncates it, a rollback journal in
  PERSIST mode.
- PostgreSQL: dead tuples in the heap and the TOAST table until VACUUM; even
  after a plain VACUUM the freed bytes stay inside the pages until
  overwritten, only a rewrite (VACUUM FULL) drops them; the column's
  statistics in ``pg_statistic`` (histogram bounds are sample values); WAL
  segments, WAL archives, replicas, backups.
- MariaDB / InnoDB: old row versions in undo logs until purge; the redo log;
  the table's pages until a rebuild (OPTIMIZE TABLE); row images in the
  binary log, on replicas, in backups; the general and slow query logs if on.

``compact`` runs the steps carnet can take itself and returns a
:class:`ResidueReport`: what was cleaned, and what remains with the steps to
take (docs/migration.md, "Plaintext left behind").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..errors import ConfigurationError
from .plan import backend_of

log = logging.getLogger("carnet")

CLEANED = "cleaned"
REMAINS = "remains"
UNKNOWN = "unknown"


@dataclass
class Item:
    where: str
    status: str
    detail: str
    steps: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "where": self.where,
            "status": self.status,
            "detail": self.detail,
            "steps": self.steps,
        }


@dataclass
class ResidueReport:
    backend: str
    table: str
    actions: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, where: str, status: str, detail: str, steps: str = "") -> None:
        self.items.append(Item(where, status, detail, steps))

    @property
    def cleaned(self) -> list[Item]:
        return [i for i in self.items if i.status == CLEANED]

    @property
    def remaining(self) -> list[Item]:
        return [i for i in self.items if i.status != CLEANED]

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "table": self.table,
            "actions": self.actions,
            "cleaned": [i.as_dict() for i in self.cleaned],
            "remaining": [i.as_dict() for i in self.remaining],
            "warnings": self.warnings,
        }


_BACKUPS = Item(
    "backups and copies",
    REMAINS,
    "every backup, dump or file copy taken before the migration holds the notes in clear",
    "replace them with post-migration backups and destroy the old ones by your retention "
    "procedure; until then they stay as sensitive as the original database",
)
_DISK = Item(
    "storage blocks",
    UNKNOWN,
    "files that were rewritten or truncated leave their old blocks on the disk until reused "
    "(SSD wear levelling, file-system snapshots, cloud volume snapshots)",
    "rely on full-disk / volume encryption; delete volume snapshots taken before the migration",
)


def compact(
    engine: sa.Engine, table: str, *, full: bool = False, columns: tuple[str, ...] = ()
) -> ResidueReport:
    """Compact ``table`` after a migration and report what plaintext may remain.

    ``full`` (PostgreSQL) rewrites the table with VACUUM FULL, which holds an
    ACCESS EXCLUSIVE lock for its whole duration: reads and writes of the
    table wait. Without it a plain VACUUM runs, which does not remove the old
    bytes from the table's files.
    """
    backend = backend_of(engine)
    report = ResidueReport(backend, table)
    if backend == "sqlite":
        _sqlite(engine, table, report)
    elif backend == "postgresql":
        _postgresql(engine, table, full, columns, report)
    elif backend == "mariadb":
        _mariadb(engine, table, report)
    else:
        report.add(
            f"{backend} database",
            UNKNOWN,
            "carnet knows no compaction for this backend",
            "rebuild the table and check the server's logs and backups by hand",
        )
    report.items.extend([_BACKUPS, _DISK])
    return report


def _sqlite(engine: sa.Engine, table: str, report: ResidueReport) -> None:
    path = engine.url.database or ""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        mode = str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()
        # VACUUM copies the live rows into a fresh file: the free pages that
        # held the old text do not survive it, secure_delete or not.
        conn.exec_driver_sql("PRAGMA secure_delete=ON")
        conn.exec_driver_sql("VACUUM")
        report.actions.append("PRAGMA secure_delete=ON; VACUUM")
        report.add(
            f"database file {path}", CLEANED, "rebuilt by VACUUM: no free page keeps old values"
        )
        if mode == "wal":
            busy, _log, _done = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
            report.actions.append("PRAGMA wal_checkpoint(TRUNCATE)")
            if busy:
                report.add(
                    f"{path}-wal",
                    REMAINS,
                    "the checkpoint could not truncate the WAL: another connection was "
                    "reading or writing",
                    "close the application's connections and rerun `carnet migrate compact`",
                )
            else:
                report.add(f"{path}-wal", CLEANED, "checkpointed and truncated to zero bytes")
        elif mode == "persist":
            report.add(
                f"{path}-journal",
                REMAINS,
                "journal_mode=PERSIST keeps old pages in the rollback journal",
                "switch to journal_mode=DELETE or WAL, then delete the -journal file",
            )
        else:
            report.add(
                f"{path}-journal",
                CLEANED if mode in ("delete", "truncate") else UNKNOWN,
                f"journal_mode={mode}: the rollback journal is removed or emptied after "
                "each transaction (its blocks: see storage blocks)",
            )
    report.warnings.append(
        "set PRAGMA secure_delete=ON on the application's connections so that later deletes "
        "and updates overwrite freed space"
    )


def _pg_setting(conn: sa.Connection, name: str) -> str:
    return str(conn.execute(sa.text("SELECT current_setting(:n)"), {"n": name}).scalar())


def _postgresql(
    engine: sa.Engine, table: str, full: bool, columns: tuple[str, ...], report: ResidueReport
) -> None:
    q = engine.dialect.identifier_preparer.quote
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        superuser, owner = conn.execute(
            sa.text(
                "SELECT r.rolsuper, pg_has_role(current_user, c.relowner, 'USAGE') "
                "FROM pg_roles r, pg_class c "
                "WHERE r.rolname = current_user AND c.oid = CAST(:t AS regclass)"
            ),
            {"t": q(table)},
        ).one()
        if not (superuser or owner):
            # PostgreSQL only warns and skips a VACUUM of a table one does not
            # own: carnet would then report as clean what was never touched.
            raise ConfigurationError(
                f"compaction of {table} needs its owner or a superuser (VACUUM skips it otherwise)"
            )
        if full:
            report.warnings.append(
                f"VACUUM FULL holds an ACCESS EXCLUSIVE lock on {table} until it ends: the "
                "application cannot read or write the table meanwhile, and it needs free disk "
                "space for a full copy of the table"
            )
            conn.exec_driver_sql(f"VACUUM (FULL, ANALYZE) {q(table)}")
            report.actions.append(f"VACUUM (FULL, ANALYZE) {table}")
            report.add(
                f"table {table}: heap, TOAST and indexes",
                CLEANED,
                "rewritten into new files; dead tuples and freed space were not copied",
            )
        else:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {q(table)}")
            report.actions.append(f"VACUUM (ANALYZE) {table}")
            files = conn.execute(
                sa.text(
                    "SELECT pg_relation_filepath(c.oid), pg_relation_filepath(c.reltoastrelid) "
                    "FROM pg_class c WHERE c.oid = CAST(:t AS regclass)"
                ),
                {"t": q(table)},
            ).one()
            report.add(
                f"table {table}: heap and TOAST ({', '.join(f for f in files if f)})",
                REMAINS,
                "plain VACUUM marks dead tuples free but leaves their bytes in the pages until "
                "new rows overwrite them",
                "rerun `carnet migrate compact --vacuum-full` in a maintenance window (ACCESS "
                "EXCLUSIVE lock), or rebuild online with pg_repack",
            )
        # ANALYZE replaced the column's statistics (histogram bounds and most
        # common values are sample values of the column: plaintext notes);
        # the old pg_statistic rows are dead tuples until that catalog is vacuumed.
        if superuser:
            full_kw = " FULL" if full else ""
            conn.exec_driver_sql(f"VACUUM{full_kw} pg_catalog.pg_statistic")
            report.actions.append(f"VACUUM{full_kw} pg_catalog.pg_statistic")
            report.add(
                "column statistics (pg_statistic)",
                CLEANED if full else REMAINS,
                "refreshed by ANALYZE; old sample values "
                + ("removed by the rewrite" if full else "left as freed bytes"),
                "" if full else "VACUUM FULL pg_catalog.pg_statistic as a superuser",
            )
        else:
            report.add(
                "column statistics (pg_statistic)",
                REMAINS,
                "refreshed by ANALYZE, but the old rows holding sample notes could not be "
                "vacuumed by this user",
                "as a superuser: VACUUM FULL pg_catalog.pg_statistic",
            )
        archive = _pg_setting(conn, "archive_mode")
        report.add(
            "WAL (pg_wal)",
            REMAINS,
            "segments written before and during the migration hold the old rows (full-page "
            "images, inserted tuples) until recycled"
            + (
                f"; archive_mode={archive}: archived segments keep them" if archive != "off" else ""
            ),
            "after the migration: CHECKPOINT, let segments recycle; "
            + (
                "purge the WAL archive of segments older than the migration, and "
                if archive != "off"
                else ""
            )
            + "take a new base backup and drop older ones (point-in-time recovery would "
            "bring the plaintext back)",
        )
        replicas = conn.execute(sa.text("SELECT count(*) FROM pg_stat_replication")).scalar()
        slots = conn.execute(sa.text("SELECT count(*) FROM pg_replication_slots")).scalar()
        report.add(
            "replicas and replication slots",
            REMAINS if (replicas or slots) else UNKNOWN,
            f"{replicas} streaming replica(s), {slots} replication slot(s) seen from here; each "
            "replica holds its own copy of the old pages and WAL, and logical subscribers their "
            "own tables",
            "run the same compaction on every replica's side (physical replicas follow VACUUM "
            "FULL through WAL; logical subscribers need their own VACUUM FULL)",
        )
        log_statement = _pg_setting(conn, "log_statement")
        min_dur = _pg_setting(conn, "log_min_duration_statement")
        if log_statement in ("all", "mod") or min_dur not in ("-1",):
            report.add(
                "server log",
                REMAINS,
                f"log_statement={log_statement}, log_min_duration_statement={min_dur}: "
                "statements and their parameters (legacy notes) may be in the server log",
                "rotate and destroy server logs from before and during the migration",
            )
        if columns:
            indexed = [
                str(r[0])
                for r in conn.execute(
                    sa.text(
                        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                        "JOIN pg_attribute a ON a.attrelid = x.indrelid "
                        "AND a.attnum = ANY(x.indkey) "
                        "WHERE x.indrelid = CAST(:t AS regclass) AND a.attname = ANY(:cols)"
                    ),
                    {"t": q(table), "cols": list(columns)},
                )
            ]
            if indexed:
                report.warnings.append(
                    f"index(es) on the migrated column: {', '.join(indexed)}; drop them"
                )


def _mariadb(engine: sa.Engine, table: str, report: ResidueReport) -> None:
    q = engine.dialect.identifier_preparer.quote
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        per_table = conn.exec_driver_sql("SELECT @@innodb_file_per_table").scalar()
        datadir = str(conn.exec_driver_sql("SELECT @@datadir").scalar())
        db = str(conn.exec_driver_sql("SELECT DATABASE()").scalar())
        # InnoDB maps OPTIMIZE to a rebuild (ALTER TABLE ... FORCE), online:
        # concurrent reads and writes continue, with short metadata locks.
        rows = conn.exec_driver_sql(f"OPTIMIZE TABLE {q(table)}").all()
        report.actions.append(f"OPTIMIZE TABLE {table}")
        errors = [str(r[3]) for r in rows if str(r[2]).lower() == "error"]
        if errors:
            report.add(
                f"table {table}",
                REMAINS,
                f"OPTIMIZE failed: {errors[0]}",
                "rerun `carnet migrate compact` when the table is not locked",
            )
        elif per_table:
            report.add(
                f"table {table} ({Path(datadir) / db / (table + '.ibd')})",
                CLEANED,
                "rebuilt into a new tablespace file; old pages were not copied",
            )
        else:
            report.add(
                "system tablespace (ibdata1)",
                REMAINS,
                "innodb_file_per_table=OFF: the table lived in ibdata1, whose freed "
                "pages keep old rows and never shrink",
                "dump, recreate the instance with innodb_file_per_table=ON, reload",
            )
        history = None
        for r in conn.exec_driver_sql("SHOW ENGINE INNODB STATUS").all():
            for line in str(r[2]).splitlines():
                if line.startswith("History list length"):
                    history = line.split()[-1]
        report.add(
            "undo logs",
            REMAINS,
            f"old row versions stay in undo logs until purged (history list length "
            f"{history}); purged pages are reused, not erased",
            "let purge catch up (the history list length falls near 0); undo tablespaces "
            "are truncated only with innodb_undo_log_truncate=ON and separate undo "
            "tablespaces",
        )
        report.add(
            "redo log (ib_logfile0)",
            REMAINS,
            "circular; holds changes made before and during the migration until "
            "overwritten by later writes",
            "nothing to run; it cycles with write volume",
        )
        log_bin = conn.exec_driver_sql("SELECT @@log_bin").scalar()
        if log_bin:
            fmt = conn.exec_driver_sql("SELECT @@binlog_format").scalar()
            image = conn.exec_driver_sql("SELECT @@binlog_row_image").scalar()
            report.add(
                "binary log",
                REMAINS,
                f"binlog_format={fmt}, binlog_row_image={image}: the binary log holds "
                "every statement or row image of the migration, old values included",
                "once replicas have applied them: PURGE BINARY LOGS BEFORE '<end of "
                "migration>'; treat archived binlogs as backups",
            )
        else:
            report.add("binary log", CLEANED, "log_bin is OFF: no binary log")
        general = conn.exec_driver_sql("SELECT @@general_log").scalar()
        slow = conn.exec_driver_sql("SELECT @@slow_query_log").scalar()
        if general or slow:
            report.add(
                "general / slow query log",
                REMAINS,
                "statement logs record literal values, legacy notes included",
                "rotate and destroy these logs from before and during the migration",
            )
        report.add(
            "replicas",
            UNKNOWN,
            "each replica applied the migration from the binary log and has its own undo "
            "logs, redo log, relay logs and binary log",
            "OPTIMIZE TABLE reaches replicas through the binary log; on each replica "
            "wait for purge, purge its relay and binary logs",
        )
