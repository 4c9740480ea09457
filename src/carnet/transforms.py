"""Normalising transforms for blind indexes.

A blind index stores a keyed hash of a *normalised* value, so two spellings of
the same identifier ("06 12 34 56 78", "+33 6 12 34 56 78") must normalise to
the same string before hashing. Each transform here maps one plaintext (or,
for a compound, several) to that string, or raises
:class:`~carnet.errors.InvalidPlaintext` when the input is not what the
transform indexes (a phone index given a word). Messages never repeat the
input: it is plaintext.

The output is hashed as UTF-8, so changing what a transform returns for any
input changes stored index values: a transform's behaviour is part of the
index format and is pinned by ``tests/vectors/blind_index_v1.json``.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidPlaintext

__all__ = [
    "Transform",
    "date_iso",
    "exact",
    "folded",
    "initial_lastname",
    "last4",
    "phone_fr",
]


@dataclass(frozen=True)
class Transform:
    """A named normalisation of ``arity`` plaintext values to one string.

    ``name`` is stable: it is the default index name bound into the index key
    derivation (see docs/searchable.md), so renaming a transform's function
    does not change its index values.
    """

    name: str
    arity: int
    func: Callable[..., str]

    def __call__(self, *values: Any) -> str:
        if len(values) != self.arity:
            raise TypeError(f"transform {self.name} takes {self.arity} value(s)")
        return self.func(*values)

    def __repr__(self) -> str:
        return f"<carnet.transforms.{self.name}>"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidPlaintext(f"{what} indexes str values, not {type(value).__name__}")
    return value


def _exact(value: Any) -> str:
    return _text(value, "exact")


_WS = re.compile(r"\s+")


def _fold(value: str) -> str:
    # casefold is the Unicode caseless match ("ß" -> "ss"; it also maps some
    # combining marks to letters, e.g. U+0345 to "ι", so it runs first, while
    # they are still there). NFKD then splits "é" into "e" + U+0301 and maps
    # compatibility forms ("ﬁ" -> "fi", full-width letters -> ASCII);
    # dropping combining marks removes the accents. Decomposition can expose
    # letters casefold did not see, so the steps run again: the result is a
    # fixed point (folding it again changes nothing), which the tests check.
    s = value
    for _ in range(2):
        s = s.casefold()
        s = unicodedata.normalize("NFKD", s)
        s = "".join(c for c in s if not unicodedata.combining(c))
    return _WS.sub(" ", s).strip()


def _folded(value: Any) -> str:
    return _fold(_text(value, "folded"))


# French overseas departments have their own country codes in E.164 while
# sharing the national 10-digit plan: 0692 12 34 56 (Réunion mobile) is
# +262 692 12 34 56, not +33 6 92 ... Keyed by the national significant
# number's first three digits (ARCEP plan).
_DOM = {
    "262": "262",  # Réunion, fixed
    "263": "262",  # Réunion, fixed
    "269": "262",  # Mayotte, fixed
    "692": "262",  # Réunion, mobile
    "693": "262",  # Réunion, mobile
    "639": "262",  # Mayotte, mobile
    "590": "590",  # Guadeloupe, Saint-Martin, Saint-Barthélemy, fixed
    "690": "590",  # idem, mobile
    "691": "590",  # idem, mobile
    "594": "594",  # Guyane, fixed
    "694": "594",  # Guyane, mobile
    "596": "596",  # Martinique, fixed
    "696": "596",  # Martinique, mobile
    "697": "596",  # Martinique, mobile
}
_TRUNK = re.compile(r"^(\+|00)(33|262|590|594|596)\s*\(0\)")
_PHONE_CHARS = re.compile(r"[\s.\-/()\u00a0\u202f]")
_COUNTRY = ("33", "262", "590", "594", "596")


def _not_phone() -> InvalidPlaintext:
    return InvalidPlaintext("value is not a French phone number")


def _phone_fr(value: Any) -> str:
    s = _text(value, "phone_fr").strip()
    # "+33 (0)6 12 ..." is a common way of writing the trunk prefix: drop "(0)".
    s = _TRUNK.sub(r"\1\2", s)
    s = _PHONE_CHARS.sub("", s)
    if s.startswith("+"):
        rest = s[1:]
    elif s.startswith("00"):
        rest = s[2:]
    elif len(s) == 10 and s.startswith("0"):
        rest = None
    else:
        raise _not_phone()
    if rest is None:
        nsn = s[1:]
    else:
        for cc in _COUNTRY:
            if rest.startswith(cc) and len(rest) == len(cc) + 9:
                nsn = rest[len(cc) :]
                break
        else:
            raise _not_phone()
        if nsn.startswith("0"):
            raise _not_phone()
    if len(nsn) != 9 or not nsn.isascii() or not nsn.isdigit() or nsn[0] == "0":
        raise _not_phone()
    return "+" + _DOM.get(nsn[:3], "33") + nsn


def _last4(value: Any) -> str:
    digits = [c for c in _text(value, "last4") if c.isascii() and c.isdigit()]
    if len(digits) < 4:
        raise InvalidPlaintext("value has fewer than four digits")
    return "".join(digits[-4:])


def _date_iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        # A datetime's date depends on its time zone: refuse rather than guess.
        raise InvalidPlaintext("date_iso indexes datetime.date values, not datetime")
    if isinstance(value, dt.date):
        return value.isoformat()
    s = _text(value, "date_iso").strip()
    if len(s) != 10:
        raise InvalidPlaintext("value is not an ISO date (YYYY-MM-DD)")
    try:
        return dt.date.fromisoformat(s).isoformat()
    except ValueError:
        pass
    # Raised outside the except block: ``from None`` only hides the parser's
    # error, which quotes the value, and keeps it as ``__context__``.
    raise InvalidPlaintext("value is not an ISO date (YYYY-MM-DD)")


def _initial_lastname(first: Any, last: Any) -> str:
    f = _fold(_text(first, "initial_lastname"))
    ln = _fold(_text(last, "initial_lastname"))
    if not f or not ln:
        raise InvalidPlaintext("initial_lastname needs a non-empty first and last name")
    # The initial is exactly one character, so "initial + space + last name"
    # cannot be read two ways.
    return f[0] + " " + ln


exact = Transform("exact", 1, _exact)
"""The value itself: "Dupont" and "dupont" do not meet."""

folded = Transform("folded", 1, _folded)
"""Case- and accent-insensitive, whitespace collapsed: "Hélène  Dupont" meets "HELENE DUPONT"."""

phone_fr = Transform("phone_fr", 1, _phone_fr)
"""A French phone number in E.164 ("+33612345678"); overseas departments under their own code."""

last4 = Transform("last4", 1, _last4)
"""The last four digits of a value (any other characters ignored)."""

date_iso = Transform("date_iso", 1, _date_iso)
"""A ``datetime.date`` or ``YYYY-MM-DD`` string, as ``YYYY-MM-DD``."""

initial_lastname = Transform("initial_lastname", 2, _initial_lastname)
"""Compound over (first name, last name): folded initial, a space, folded last name."""
