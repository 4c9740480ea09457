"""What every ``carnet`` command shares: exit codes, errors, JSON, progress, engines, options.

One place maps an exception to its exit code (the table of
:mod:`carnet.exitcodes`, docs/cli.md) and prints it: ``carnet: error: …``
on stderr, one line, and under ``--json`` also one JSON object on stdout,
``{"error": {"code": 3, "kind": "MasterKeyUnavailable", "message": "…"}}``.
:class:`CarnetGroup` does it for the whole tree (``carnet`` and ``carnet
migrate`` alike), around click's own parsing, so click's ``Error:`` and
``Aborted!`` never show. An exception nobody expected is reported by its
class name only (its message could quote a value), exit 10, and its
traceback is printed only with ``CARNET_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
import sqlalchemy as sa

from . import lifecycle
from ._engines import make_engine
from .errors import (
    CarnetError,
    ConfigurationError,
    DatabaseError,
    KeyDestroyed,
    KeyInUse,
    MasterKeyMismatch,
    MasterKeyUnavailable,
    UnknownTenant,
    describe_db_error,
)
from .exitcodes import (
    EXIT_ABORTED,
    EXIT_DATABASE,
    EXIT_DESTROYED,
    EXIT_IN_USE,
    EXIT_INTERNAL,
    EXIT_MASTER_KEY,
    EXIT_UNKNOWN_TENANT,
    EXIT_USAGE,
)
from .manager import ENV_DATABASE_URL, ENV_MASTER_KEY, KeyManager

F = TypeVar("F", bound=Callable[..., Any])

NO_MASTER_KEY = "no master key: set CARNET_MASTER_KEY or pass --master-key"
NO_DATABASE = "no database: set CARNET_DATABASE_URL or pass --database-url"
EOF_ABORT = "aborted: no answer on standard input (pass --yes to confirm)"

# -- errors -> exit codes ---------------------------------------------------------------------

# The one mapping, most specific class first (KeyRetired is a KeyDestroyed,
# KeyUsageUnknown a KeyInUse, every carnet error a CarnetError).
ERROR_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (KeyInUse, EXIT_IN_USE),
    (UnknownTenant, EXIT_UNKNOWN_TENANT),
    (KeyDestroyed, EXIT_DESTROYED),
    (DatabaseError, EXIT_DATABASE),
    (MasterKeyUnavailable, EXIT_MASTER_KEY),
    (MasterKeyMismatch, EXIT_MASTER_KEY),
    (CarnetError, EXIT_USAGE),  # ConfigurationError and the rest: configuration
    (sa.exc.NoSuchTableError, EXIT_USAGE),
    (sa.exc.SQLAlchemyError, EXIT_DATABASE),
    (click.ClickException, EXIT_USAGE),
    (click.Abort, EXIT_ABORTED),
)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an exception (10, internal error, if none fits)."""
    if isinstance(exc, CommandFailed):
        return exc.code
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_INTERNAL


def _db_message(exc: sa.exc.SQLAlchemyError) -> str:
    # Never SQLAlchemy's rendering, which appends the statement's parameters
    # (a note, during a migration), nor the driver's text beyond what
    # describe_db_error keeps: some driver messages quote a stored value.
    orig = getattr(exc, "orig", None)
    if orig is None:
        return f"database error ({type(exc).__name__})"
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return f"database unreachable or failing: {describe_db_error(exc)}"
    return f"database error: {describe_db_error(exc)}"


def error_message(exc: BaseException) -> str:
    """The one line printed after ``carnet: error:``; never a stored value."""
    if isinstance(exc, CarnetError):
        return str(exc)
    if isinstance(exc, sa.exc.NoSuchTableError):
        return f"unknown table {str(exc)!r}"
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return _db_message(exc)
    if isinstance(exc, click.UsageError):
        msg = exc.format_message()
        ctx = exc.ctx
        if ctx is not None and ctx.command.get_help_option(ctx) is not None:
            msg = f"{msg.rstrip('.')} (see '{ctx.command_path} --help')"
        return msg
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    if isinstance(exc, click.Abort):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, KeyboardInterrupt):
            return "aborted: interrupted"
        if isinstance(cause, EOFError):
            return EOF_ABORT
        return "aborted: nothing done"
    # Unexpected: its class only, since its text could quote a value.
    return f"internal error ({type(exc).__name__}); rerun with CARNET_DEBUG=1 for the traceback"


def error_kind(exc: BaseException) -> str:
    """``kind`` of the JSON error object: the error's class, or the refusal's nature."""
    if isinstance(exc, CommandFailed):
        return "Aborted" if exc.code == EXIT_ABORTED else "Refused"
    if isinstance(exc, click.UsageError):
        return "UsageError"
    if isinstance(exc, click.Abort):
        return "Aborted"
    if isinstance(exc, sa.exc.SQLAlchemyError) and not isinstance(exc, sa.exc.NoSuchTableError):
        return "DatabaseError"
    return type(exc).__name__


def report_error(exc: BaseException, *, as_json: bool) -> int:
    """Print ``exc`` the one way (stderr line; JSON object on stdout with ``--json``)."""
    code = exit_code_for(exc)
    message = error_message(exc)
    if code == EXIT_INTERNAL and os.environ.get("CARNET_DEBUG") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    echo(f"carnet: error: {message}", err=True)
    if as_json:
        emit_json({"error": {"code": code, "kind": error_kind(exc), "message": message}})
    return code


def fail(code: int, message: str) -> NoReturn:
    """Stop the command: ``carnet: error: message`` and exit ``code``."""
    raise CommandFailed(code, message)


class CommandFailed(click.ClickException):
    """A refusal decided by the command itself, with its exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _require_utf8(argv: Sequence[str]) -> None:
    # Python hands bytes that are not UTF-8 over as lone surrogates, which
    # fail much later, far from the argument, as an internal error.
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise click.UsageError(f"argument {i} is not valid UTF-8") from None


def _wants_json(args: Sequence[str]) -> bool:
    for a in args:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


class CarnetGroup(click.Group):
    """The error handling of every command: one line, one exit code, JSON under ``--json``."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            _require_utf8(argv)
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except (SystemExit, click.exceptions.Exit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the last-resort guard
            no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)
            if no_args is not None and isinstance(exc, no_args):
                # `carnet` or `carnet keys` alone: the help, as click shows it.
                exc.show()
                code = exc.exit_code
                if standalone_mode:
                    sys.exit(code)
                return code
            if isinstance(exc, KeyboardInterrupt):
                exc = click.Abort()
                exc.__cause__ = KeyboardInterrupt()
            code = report_error(exc, as_json=_wants_json(argv))
            if standalone_mode:
                sys.exit(code)
            return code
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


# -- output ------------------------------------------------------------------------------------

# C0 controls, DEL, C1 controls, the line and paragraph separators, the bidi
# embeddings/overrides and isolates: what could end a line, move the cursor,
# colour the terminal or reorder what it shows.
_UNPRINTABLE = {
    **{c: None for c in range(0x20)},
    0x7F: None,
    **{c: None for c in range(0x80, 0xA0)},
    0x2028: None,
    0x2029: None,
    **{c: None for c in range(0x202A, 0x202F)},
    **{c: None for c in range(0x2066, 0x206A)},
}
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: int) -> str:
    ch = chr(c)
    if ch in _SHORT:
        return _SHORT[ch]
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


_ESCAPES = str.maketrans({c: _escape(c) for c in _UNPRINTABLE})


def printable(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u202e``).

    Values read from the database (a practice id, a table name, an error
    message quoting them) are printed through it, so none can forge a line
    of output, send a terminal escape sequence or reorder the line shown.
    A backslash is left as it is: the escapes are for the reader, not a
    format to parse back (``--json`` is that).
    """
    return text.translate(_ESCAPES)


def echo(text: Any = "", *, err: bool = False) -> None:
    """Print one line of text output, control characters escaped (see :func:`printable`).

    A newline inside ``text`` is escaped too: print several lines by calling
    it once per line.
    """
    click.echo(printable(str(text)), err=err)


def emit_json(data: Any) -> None:
    """The one JSON form of every ``--json`` output: indented, keys sorted, on stdout."""
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


def emit(as_json: bool, data: Any, text: Callable[[], None] | Sequence[str]) -> None:
    """``data`` as JSON with ``--json``, else the text (a printer, or lines)."""
    if as_json:
        emit_json(data)
    elif callable(text):
        text()
    else:
        for line in text:
            echo(line)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds + 0.5), 0)
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Position, rate and ETA: a bar on a terminal, a plain line every two seconds otherwise.

    ``set`` takes a position summed over workers (from ``carnet_jobs``), so
    several processes show as one job; ``finish`` brings it to its end.
    """

    def __init__(
        self, label: str, total: int | None, quiet: bool = False, unit: str = "rows"
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.quiet = quiet
        self.start = time.monotonic()
        self._last_line = self.start
        self._bar: Any = None
        if not quiet and sys.stderr.isatty():
            self._bar = click.progressbar(
                length=total or 0,
                label=printable(label),
                file=sys.stderr,
                show_eta=True,
                show_pos=True,
                item_show_func=lambda _: self._rate(),
            )
            self._bar.__enter__()

    def _rate(self) -> str:
        dt = max(time.monotonic() - self.start, 1e-6)
        return f"{self.done / dt:,.0f} {self.unit}/s"

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"{self.label}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({min(100 * self.done / self.total, 100):.0f} %)"
        else:
            text += f" {self.unit}"
        text += f", {self._rate()}"
        if self.total and 0 < self.done < self.total:
            eta = elapsed * (self.total - self.done) / self.done
            text += f", ETA {_duration(eta)}"
        return text

    def update(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        if self.total is not None and done > self.total:
            self.total = done  # rows inserted since the count
        step = done - self.done
        self.done = done
        if self.quiet:
            return
        if self._bar is not None:
            if self.total is not None and self._bar.length != self.total:
                self._bar.length = self.total
            self._bar.update(max(step, 0), None)
            return
        now = time.monotonic()
        if now - self._last_line >= 2.0:
            self._last_line = now
            echo(self.line(), err=True)

    def finish(self, done: int | None = None) -> None:
        """The work is over: show the final position (100 % when it all ran)."""
        if done is not None:
            self.set(done)
        if self.total is not None and self.done < self.total:
            # Fewer rows than counted (deleted meanwhile, or left to other workers):
            # the work is complete all the same.
            self.total = self.done
            if self._bar is not None:
                self._bar.length = max(self.done, 1)
                self._bar.update(0, None)
        if not self.quiet and self._bar is None:
            echo(self.line() + f" in {_duration(time.monotonic() - self.start)}", err=True)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


# -- engines and key managers -------------------------------------------------------------------


def lock_notice(message: str) -> None:
    """Where a command's engine tells of a wait for a SQLite lock: stderr
    (:func:`carnet._engines.make_engine`)."""
    echo(f"carnet: {message}", err=True)


def open_manager(
    engine: sa.Engine,
    master_key: str | None,
    previous: Sequence[str] = (),
    cache_ttl: float = 300.0,
) -> KeyManager:
    """:func:`carnet.lifecycle.open_manager`, with the command line's errors.

    No master key: exit 2 (one line). A master key that does not open: exit 3,
    naming the master key that wraps the stored data keys when there are some.
    """
    if not master_key:
        raise ConfigurationError(NO_MASTER_KEY)
    try:
        return lifecycle.open_manager(engine, master_key, previous, cache_ttl=cache_ttl)
    except ConfigurationError as exc:
        hint = lifecycle.wrapping_master_keys_hint(engine)
        if hint:
            # Creating a new master key (the provider's suggestion) would
            # leave every existing data key unopenable.
            raise MasterKeyUnavailable(f"{lifecycle.strip_create_hint(str(exc))}; {hint}") from None
        raise MasterKeyUnavailable(str(exc)) from None


# -- prompts -----------------------------------------------------------------------------------


def confirm(yes: bool, prompt: str, expected: str | None = None) -> None:
    """Ask before an irreversible step; ``--yes`` skips it. Declined or no answer: exit 6."""
    if yes:
        return
    if expected is not None:
        typed = click.prompt(prompt, default="", show_default=False, err=True)
        if typed != expected:
            fail(EXIT_ABORTED, "confirmation did not match: nothing done")
    elif not click.confirm(prompt, default=False, err=True):
        fail(EXIT_ABORTED, "aborted: nothing done")


# -- shared options ----------------------------------------------------------------------------


class AliasOption(click.Option):
    """An option whose older spellings still parse but are not shown in ``--help``."""

    def __init__(self, *args: Any, hidden_aliases: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts = self.opts
        self.opts = [o for o in opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts

    def get_error_hint(self, ctx: click.Context | None) -> str:
        opts = self.opts
        self.opts = [o for o in opts if o not in self.hidden_aliases]
        try:
            return super().get_error_hint(ctx)
        finally:
            self.opts = opts


def database_url_option(help: str | None = None) -> Callable[[F], F]:
    return click.option(
        "--database-url",
        envvar=ENV_DATABASE_URL,
        metavar="URL",
        help=help or "SQLAlchemy URL of the database [CARNET_DATABASE_URL].",
    )


def master_key_option(help: str | None = None) -> Callable[[F], F]:
    return click.option(
        "--master-key",
        envvar=ENV_MASTER_KEY,
        metavar="URI",
        help=help
        or "Master key URI: file://, keyring://, aws-kms://, pkcs11:// [CARNET_MASTER_KEY].",
    )


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(f)


def yes_option(help: str = "Do not ask for confirmation.") -> Callable[[F], F]:
    return click.option("--yes", is_flag=True, help=help)


def batch_size_option(default: int) -> Callable[[F], F]:
    """``--batch-size N`` (``--batch N``, the former spelling, still parses)."""
    return click.option(
        "--batch-size",
        "--batch",
        "batch_size",
        cls=AliasOption,
        hidden_aliases=("--batch",),
        type=click.IntRange(1),
        metavar="N",
        default=default,
        show_default=True,
        help="Rows (or keys) per transaction.",
    )


def workers_option(f: F) -> F:
    return click.option(
        "--workers",
        type=click.IntRange(1),
        default=1,
        show_default=True,
        help="Local worker processes, each on a disjoint key range.",
    )(f)


def worker_option(default: str | None = None) -> Callable[[F], F]:
    """``--worker I/N``: only the I-th of N slices (one per machine)."""
    return click.option(
        "--worker",
        "worker_spec",
        metavar="I/N",
        default=default,
        show_default=default is not None,
        help="Run only worker I of N (one per machine; the database coordinates).",
    )


def parse_worker(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("expected I/N, e.g. 0/4", param_hint="--worker") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter("need 0 <= I < N", param_hint="--worker")
    return i, n


class Config:
    """The root group's options, shared by every command: database, master keys, cache."""

    def __init__(
        self,
        database_url: str | None,
        master_key: str | None,
        previous: tuple[str, ...],
        cache_ttl: float,
    ) -> None:
        self.database_url = database_url
        self.master_key = master_key
        self.previous = previous
        self.cache_ttl = cache_ttl
        self._manager: KeyManager | None = None

    def need_url(self) -> str:
        if not self.database_url:
            raise ConfigurationError(NO_DATABASE)
        return self.database_url

    def need_master(self) -> str:
        if not self.master_key:
            raise ConfigurationError(NO_MASTER_KEY)
        return self.master_key

    def engine(self) -> sa.Engine:
        return make_engine(self.need_url(), lock_notice=lock_notice)

    def manager(self, *, open_master: bool = True) -> KeyManager:
        """The key manager; without ``open_master`` the master keys are not opened
        (nor needed): anything that would unwrap a key is refused."""
        if self._manager is None:
            engine = self.engine()
            if not open_master:
                self._manager = KeyManager(
                    engine,
                    master_key=lifecycle.UncheckedMasterKey(self.master_key),
                    cache_ttl=self.cache_ttl,
                )
                return self._manager
            try:
                self._manager = open_manager(
                    engine, self.need_master(), self.previous, self.cache_ttl
                )
            except BaseException:
                engine.dispose()
                raise
        return self._manager

    def close(self) -> None:
        """Close the key manager and its engine, if a command made them."""
        if self._manager is not None:
            self._manager.close()
            self._manager.engine.dispose()
            self._manager = None


# -- options and helpers shared by the top-level commands ------------------------------------

pass_config = click.make_pass_decorator(Config)


def column_options(f: F) -> F:
    f = click.option(
        "--column",
        "columns",
        multiple=True,
        metavar="C",
        help="Encrypted column of the preceding --table (repeatable).",
    )(f)
    return click.option(
        "--table",
        "tables",
        multiple=True,
        metavar="T",
        help="Table holding an encrypted column (repeatable; default: discover).",
    )(f)


def column_pairs(tables: tuple[str, ...], columns: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """``--table``/``--column`` given in pairs, or None (discover)."""
    if not tables and not columns:
        return None
    if len(tables) != len(columns):
        raise click.UsageError("give --table and --column in pairs (one --column per --table)")
    return list(zip(tables, columns, strict=True))


def app_option(f: F) -> F:
    return click.option(
        "--app",
        "app",
        metavar="MODULE:ATTR",
        help="The application's SQLAlchemy MetaData or declarative Base (module:attribute): "
        "its encrypted columns are checked even when they have no rows yet.",
    )(f)


def plural(count: int, what: str) -> str:
    """``1 row``, ``2 rows``: a count with its noun."""
    return f"{count:,} {what}" + ("" if count == 1 else "s")
