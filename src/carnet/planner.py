"""Choosing ``bits`` for a blind index (docs/searchable.md, "Sizing").

A blind index keeps the leftmost L bits of a keyed hash. Among a practice's
R rows, an unrelated value shares the looked-up index value with probability
2^-L, so a lookup reads about R / 2^L unrelated rows besides the real
matches (carnet decrypts them and drops them). Fewer bits: more rows read per
lookup, and each stored index value stands for more distinct plaintexts, which
is what blunts frequency analysis of a stolen table. More bits: faster
lookups, and an index value that names its plaintext as surely as
deterministic encryption would.

``plan_bits`` picks L so that R / 2^L is close to a target number of false
positives per lookup, and says why, with warnings where the choice leaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ConfigurationError
from .indexkeys import MAX_BITS

__all__ = ["BitsPlan", "plan_bits", "print_bits_plan"]


@dataclass(frozen=True)
class BitsPlan:
    """The chosen ``bits`` and the reasoning behind it."""

    bits: int
    rows: int
    target_false_positives: float
    expected_false_positives: float
    values_per_index_value: float | None
    combined_rows_per_value: float | None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"bits = {self.bits}"]
        lines += [f"  - {r}" for r in self.reasons]
        lines += [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)


def plan_bits(
    rows: int,
    false_positives: float = 2.0,
    *,
    distinct_values: int | None = None,
    other_index_bits: Sequence[int] = (),
) -> BitsPlan:
    """Pick the bits of a blind index for ``rows`` rows per practice.

    ``false_positives``: the number of unrelated rows a lookup may read and
    discard (default 2: every index value stays ambiguous, lookups stay
    cheap). ``distinct_values``: how many different normalised values the
    field can take (e.g. about 36,500 birth dates, 10,000 "last four
    digits"), when known. ``other_index_bits``: the bits of the table's other
    blind indexes; together they narrow rows down, so the plan checks that the
    combination still leaves several rows per combined value.
    """
    if not isinstance(rows, int) or rows < 1:
        raise ConfigurationError("rows must be a positive integer (rows per practice)")
    if not false_positives > 0:
        raise ConfigurationError("false_positives must be positive")
    ideal = math.log2(rows / false_positives)
    bits = min(MAX_BITS, max(1, round(ideal)))
    expected = rows / 2**bits
    reasons = [
        f"{rows:,} rows per practice; target {false_positives:g} unrelated row(s) per lookup",
        f"log2({rows:,} / {false_positives:g}) = {ideal:.2f}, rounded to {bits} "
        f"(between 1 and {MAX_BITS})",
        f"a lookup then reads about {rows:,} / 2^{bits} = {expected:.2f} unrelated row(s), "
        "decrypted and dropped by carnet.search",
    ]
    warnings: list[str] = []
    if expected < 1:
        warnings.append(
            f"fewer than one unrelated row per index value ({expected:.2f}): an index value "
            "almost always names one plaintext, so a stolen table shows exactly which rows "
            "share a value, as deterministic encryption would"
        )
    per_value: float | None = None
    if distinct_values is not None:
        if distinct_values < 1:
            raise ConfigurationError("distinct_values must be positive")
        per_value = distinct_values / 2**bits
        reasons.append(
            f"{distinct_values:,} possible values over 2^{bits} index values: about "
            f"{per_value:.2f} plaintext value(s) behind each index value"
        )
        if per_value < 2:
            warnings.append(
                "low-entropy field: each index value stands for fewer than two possible "
                "values, so counting rows per index value (frequency analysis) reveals the "
                "common values. Do not index it alone; use a compound index with a "
                "higher-entropy field, or fewer bits"
            )
    combined: float | None = None
    if other_index_bits:
        total = bits + sum(other_index_bits)
        combined = rows / 2**total
        reasons.append(
            f"with the table's other indexes ({', '.join(map(str, other_index_bits))} bits) "
            f"the combined index values split {rows:,} rows into 2^{total} groups: about "
            f"{combined:.3g} row(s) each"
        )
        if combined < 2:
            warnings.append(
                "together the indexes single out rows: someone holding the table can link a "
                "row's index values across fields; lower the bits of some index"
            )
    return BitsPlan(
        bits=bits,
        rows=rows,
        target_false_positives=false_positives,
        expected_false_positives=expected,
        values_per_index_value=per_value,
        combined_rows_per_value=combined,
        reasons=reasons,
        warnings=warnings,
    )


def print_bits_plan(
    rows: int,
    false_positives: float = 2.0,
    *,
    distinct_values: int | None = None,
    other_index_bits: Sequence[int] = (),
) -> BitsPlan:
    """:func:`plan_bits`, printing the choice and its reasoning; returns the plan."""
    plan = plan_bits(
        rows,
        false_positives,
        distinct_values=distinct_values,
        other_index_bits=other_index_bits,
    )
    print(plan)  # noqa: T201 - this helper's purpose
    return plan
