"""Questions asked of the audit trail: who read what, when; who opened a row; who reads unusually.

The rule for an unusual reader (docs/audit.md, "What to watch"): over the
report's window, a principal is flagged when it read notes of more
practices than in any of the :data:`HISTORY` previous windows of the same
length, or more than :data:`FACTOR` times the notes of its busiest previous
window, and at least :data:`MIN_NOTES` notes (a principal without history
is flagged from :data:`MIN_NOTES` notes on).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import defaultdict
from typing import Any

import click
import sqlalchemy as sa

from .audit_store import READ, RESERVE, ROWS, SEARCH, AuditStore, iso_of

HISTORY = 7
FACTOR = 3.0
MIN_NOTES = 50

_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(value: str, option: str) -> dt.datetime:
    """``24h``, ``7d``, ``90m`` (that long ago) or an ISO date/time (UTC unless it says)."""
    now = dt.datetime.now(dt.timezone.utc)
    m = _DURATION.match(value.strip())
    if m:
        return now - dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            "expected a duration (24h, 7d) or a date (2026-12-01, 2026-12-01T08:00)",
            param_hint=option,
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def _window(t: sa.Table, start: dt.datetime, end: dt.datetime | None) -> list[Any]:
    conds = [t.c.first_at >= iso_of(start)]
    if end is not None:
        conds.append(t.c.first_at < iso_of(end))
    return conds


def report(
    store: AuditStore,
    start: dt.datetime,
    end: dt.datetime | None,
    *,
    practice: str | None = None,
    principal: str | None = None,
    top: int = 10,
) -> dict[str, Any]:
    t = store.table
    end_ = end or dt.datetime.now(dt.timezone.utc)
    where = _window(t, start, end)
    if practice is not None:
        where.append(t.c.practice == practice)
    if principal is not None:
        where.append(t.c.principal == principal)
    hour = sa.func.substr(t.c.first_at, 1, 13)
    with store.engine.connect() as conn:
        hours = conn.execute(
            sa.select(
                hour.label("hour"),
                t.c.principal,
                t.c.practice,
                t.c.field,
                t.c.kind,
                sa.func.sum(t.c.count).label("count"),
                sa.func.sum(t.c.legacy).label("legacy"),
            )
            .where(*where, t.c.kind.in_((READ, RESERVE)))
            .group_by(hour, t.c.principal, t.c.practice, t.c.field, t.c.kind)
            .order_by(hour, t.c.principal, t.c.practice, t.c.field)
        ).all()
        per_writer = conn.execute(
            sa.select(
                t.c.process,
                t.c.principal,
                t.c.practice,
                t.c.field,
                t.c.kind,
                sa.func.sum(t.c.count).label("n"),
            )
            .where(*where, t.c.kind.in_((READ, RESERVE)))
            .group_by(t.c.process, t.c.principal, t.c.practice, t.c.field, t.c.kind)
        ).all()
        searches = conn.execute(
            sa.select(t.c.principal, t.c.practice, t.c.field, t.c.detail).where(
                *where, t.c.kind == SEARCH
            )
        ).all()
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for h in hours:
        k = (f"{h.hour}:00Z", h.principal, h.practice, h.field)
        r = rows.setdefault(
            k,
            {
                "hour": k[0],
                "principal": k[1],
                "practice": k[2],
                "field": k[3],
                "count": 0,
                "legacy": 0,
                "reserved": 0,
            },
        )
        if h.kind == READ:
            r["count"] += int(h._mapping["count"] or 0)
            r["legacy"] += int(h.legacy or 0)
        else:
            r["reserved"] += int(h._mapping["count"] or 0)
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "practices": set()})
    for r in rows.values():
        per[r["principal"]]["count"] += r["count"]
        if r["count"]:
            per[r["principal"]]["practices"].add(r["practice"])
    heaviest = sorted(
        (
            {"principal": p, "count": v["count"], "practices": len(v["practices"])}
            for p, v in per.items()
        ),
        key=lambda x: (-x["count"], x["principal"]),
    )[:top]
    srch: dict[tuple[str, str, str], dict[str, Any]] = {}
    for s in searches:
        d = json.loads(s.detail or "{}")
        r = srch.setdefault(
            (s.principal, s.practice, s.field),
            {
                "principal": s.principal,
                "practice": s.practice,
                "index": s.field,
                "searches": 0,
                "candidates": 0,
                "matches": 0,
            },
        )
        r["searches"] += 1
        r["candidates"] += int(d.get("candidates", 0))
        r["matches"] += int(d.get("matches", 0))
    return {
        "since": iso_of(start),
        "until": iso_of(end_),
        "total": sum(r["count"] for r in rows.values()),
        # required mode: a process that died before writing its counts leaves
        # its reservations, which bound what it disclosed (docs/audit.md).
        "total_at_most": _upper_bound(per_writer),
        "hours": list(rows.values()),
        "heaviest": heaviest,
        "unusual": unusual(store, start, end_, per),
        "rule": (
            f"more practices than in any of the {HISTORY} previous windows, or more than "
            f"{FACTOR:g}x the notes of the busiest, and at least {MIN_NOTES} notes"
        ),
        "searches": list(srch.values()),
    }


def _upper_bound(per_writer: Any) -> int:
    """Notes disclosed at most: per writing process and (principal, practice, field),
    the larger of the counts written and the blocks reserved."""
    got: dict[tuple[str, str, str, str], dict[str, int]] = defaultdict(dict)
    for r in per_writer:
        got[(r.process, r.principal, r.practice, r.field)][r.kind] = int(r.n or 0)
    return sum(max(v.get(READ, 0), v.get(RESERVE, 0)) for v in got.values())


def unusual(
    store: AuditStore, start: dt.datetime, end: dt.datetime, now: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The principals of ``now`` that break the module's rule against their own history."""
    t = store.table
    length = end - start
    hist_start = start - HISTORY * length
    with store.engine.connect() as conn:
        past = conn.execute(
            sa.select(t.c.principal, t.c.practice, t.c.first_at, t.c.count).where(
                t.c.kind == READ, t.c.first_at >= iso_of(hist_start), t.c.first_at < iso_of(start)
            )
        ).all()
    windows: dict[str, dict[int, dict[str, Any]]] = defaultdict(
        lambda: defaultdict(lambda: {"count": 0, "practices": set()})
    )
    secs = max(length.total_seconds(), 1.0)
    for p in past:
        at = dt.datetime.fromisoformat(p.first_at.replace("Z", "+00:00"))
        w = int((start - at).total_seconds() // secs)
        windows[p.principal][w]["count"] += int(p._mapping["count"] or 0)
        windows[p.principal][w]["practices"].add(p.practice)
    out = []
    for principal, cur in sorted(now.items()):
        if cur["count"] < MIN_NOTES:
            continue
        hist = windows.get(principal, {})
        max_notes = max((w["count"] for w in hist.values()), default=0)
        max_pr = max((len(w["practices"]) for w in hist.values()), default=0)
        why = []
        if not hist:
            why.append(f"no reads in the {HISTORY} previous windows, {cur['count']} now")
        else:
            if len(cur["practices"]) > max_pr:
                why.append(f"{len(cur['practices'])} practices (at most {max_pr} before)")
            if cur["count"] > FACTOR * max_notes:
                why.append(f"{cur['count']} notes (at most {max_notes} before)")
        if why:
            out.append({"principal": principal, "count": cur["count"], "why": "; ".join(why)})
    return out


def row_readers(
    store: AuditStore,
    row: str,
    start: dt.datetime,
    end: dt.datetime | None,
    *,
    practice: str | None = None,
) -> list[dict[str, Any]]:
    """Every recorded disclosure of row ``row`` (rows records, search results)."""
    t = store.table
    where = [*_window(t, start, end), t.c.kind.in_((ROWS, SEARCH))]
    if practice is not None:
        where.append(t.c.practice == practice)
    # The JSON holds the key as a string: a LIKE narrows, the exact test is below.
    needle = json.dumps(row)
    esc = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    where.append(t.c.detail.like(f"%{esc}%", escape="\\"))
    out = []
    with store.engine.connect() as conn:
        for r in conn.execute(sa.select(t).where(*where).order_by(t.c.seq)):
            d = json.loads(r.detail or "{}")
            if row not in d.get("rows", []):
                continue
            out.append(
                {
                    "at": r.first_at,
                    "principal": r.principal,
                    "practice": r.practice,
                    "field": r.field,
                    "how": "search" if r.kind == SEARCH else "read",
                    "process": r.process,
                    "host": r.host,
                    "request_id": r.request_id,
                    "route": r.route,
                    "seq": r.seq,
                }
            )
    return out
