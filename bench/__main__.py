"""Run the benchmarks and record them in docs/performance.md.

    python -m bench                 # every bench/bench_*.py module
    python -m bench core migrate    # only bench_core and bench_migrate
    python -m bench --no-write core # print only

Each module's rows replace only that module's section of the document
(between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``), so
prose written outside the markers and sections of modules not run stay as
they are.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import Row, machine_info

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOC = ROOT / "docs" / "performance.md"
COLUMNS = ("name", "baseline", "value", "ratio", "unit", "notes")

DOC_HEADER = """\
# Performance

carnet's costs measured against baselines run side by side on the same
machine, database and data (`make bench`, or `python -m bench [module ...]`).
Ratios are carnet / baseline: below 1 is faster than the baseline. Timings are
medians of several interleaved repeats, in process CPU time unless
CARNET_BENCH_CLOCK=wall. The tables between the `bench:` markers
are generated; edit the prose outside them.

"""


def discover() -> list[str]:
    here = str(Path(__file__).resolve().parent)
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_")
    )


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.2f}"
        return f"{v:.2g}"
    return str(v)


def fmt_ratio(v: Any) -> str:
    return "—" if v is None else f"{v:.2f}×"


def cells(r: Row) -> list[str]:
    return [
        str(r.get("name", "")),
        fmt(r.get("baseline")),
        fmt(r.get("value")),
        fmt_ratio(r.get("ratio")),
        str(r.get("unit", "")),
        str(r.get("notes", "")),
    ]


def print_table(module: str, rows: list[Row]) -> None:
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    print(f"\n== {module} ==")
    for line in table:
        print(
            "  ".join(
                c.rjust(w) if 0 < i < 4 else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=False))
            )
            + "  "
            + line[-1]
        )


def markdown_section(
    module: str, rows: list[Row], info: dict[str, str], seconds: float, error: str | None
) -> str:
    lines = [f"<!-- bench:{module}:begin -->", f"### {module}", ""]
    lines.append(
        f"Measured {info['date']} in {seconds:.0f} s on {info['cpu']} ({info['cores']} cores), "
        f"{info['os']}, Python {info['python']}, SQLAlchemy {info['sqlalchemy']}, "
        f"cryptography {info['cryptography']}, sqlalchemy-utils {info['sqlalchemy-utils']}; "
        f"load average at the end {info['load']}. Timings in {info['clock']}."
    )
    lines.append("")
    if error is not None:
        lines += [f"This module failed: `{error}`", ""]
    if rows:
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join(["---", "--:", "--:", "--:", "---", "---"]) + "|")
        for r in rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |")
        lines.append("")
    lines.append(f"<!-- bench:{module}:end -->")
    return "\n".join(lines)


def write_sections(doc: Path, sections: dict[str, str]) -> None:
    text = doc.read_text(encoding="utf-8") if doc.exists() else DOC_HEADER + "## Results\n"
    for module, body in sections.items():
        begin, end = f"<!-- bench:{module}:begin -->", f"<!-- bench:{module}:end -->"
        i, j = text.find(begin), text.find(end)
        if i != -1 and j > i:
            text = text[:i] + body + text[j + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "modules",
        nargs="*",
        metavar="MODULE",
        help=f"modules to run (default: all of {', '.join(available)})",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave the doc alone")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="document to update")
    args = parser.parse_args(argv)
    chosen = [m.removeprefix("bench_") for m in args.modules] or available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        parser.error(f"no module bench_{unknown[0]}.py; available: {', '.join(available)}")

    sections: dict[str, str] = {}
    failed = False
    for module in chosen:
        print(f"running bench_{module} …", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rows: list[Row] = []
        error: str | None = None
        try:
            mod = importlib.import_module(f"bench.bench_{module}")
            rows = list(mod.run())
        except Exception as exc:  # noqa: BLE001 - report and run the other modules
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            failed = True
        seconds = time.perf_counter() - t0
        print_table(module, rows)
        if error is not None:
            print(f"  FAILED: {error}")
        sections[module] = markdown_section(module, rows, machine_info(), seconds, error)
    if not args.no_write:
        write_sections(args.doc, sections)
        print(f"\nwrote {', '.join(sections)} to {args.doc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
