"""Blind-index transforms: which spellings meet, which inputs are refused, no echo."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from carnet import transforms as tr
from carnet.errors import InvalidPlaintext

# -- exact -----------------------------------------------------------------------------


def test_exact_keeps_the_value() -> None:
    assert tr.exact("Dupont") == "Dupont"
    assert tr.exact("Dupont") != tr.exact("dupont")
    with pytest.raises(InvalidPlaintext):
        tr.exact(42)


@given(st.text())
def test_exact_is_identity(s: str) -> None:
    assert tr.exact(s) == s


# -- folded ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b",
    [
        ("Hélène", "HELENE"),
        ("  Hélène   Dupont ", "helene dupont"),
        ("Straße", "STRASSE"),
        ("Çédric\tN'Guessan", "cedric n'guessan"),
        ("Ｄｕｐｏｎｔ", "dupont"),  # full-width letters (NFKD compatibility forms)
        ("Chloé", "Chloe\u0301"),  # precomposed and combining accent
        ("ÆSA", "æsa"),
        ("\u0345", "\u0399"),  # a combining mark that casefolds to a letter, and its capital
    ],
)
def test_folded_meets(a: str, b: str) -> None:
    assert tr.folded(a) == tr.folded(b)


def test_folded_keeps_distinct_names_apart() -> None:
    assert tr.folded("Dupont") != tr.folded("Dupond")
    assert tr.folded("Jean Marie") != tr.folded("Jean-Marie")
    assert tr.folded("Hélène") == "helene"


@given(st.text())
@example("\u0345")  # found by this test: casefold must run before marks are dropped
def test_folded_is_idempotent_and_case_blind(s: str) -> None:
    f = tr.folded(s)
    assert tr.folded(f) == f
    assert tr.folded(s.upper()) == tr.folded(f.upper())
    assert "  " not in f and f == f.strip()


# -- phone_fr --------------------------------------------------------------------------

SAME_MOBILE = [
    "06 12 34 56 78",
    "+33 6 12 34 56 78",
    "0033612345678",
    "0612345678",
    "06.12.34.56.78",
    "06-12-34-56-78",
    "+33 (0)6 12 34 56 78",
    "+33612345678",
    "\u00a006\u202f12 34 56 78 ",
]


@pytest.mark.parametrize("spelling", SAME_MOBILE)
def test_phone_fr_spellings_meet_in_e164(spelling: str) -> None:
    assert tr.phone_fr(spelling) == "+33612345678"


@pytest.mark.parametrize(
    "value, e164",
    [
        ("01 42 68 53 00", "+33142685300"),
        ("09 70 80 90 10", "+33970809010"),
        ("0692 12 34 56", "+262692123456"),  # Réunion mobile
        ("+262 692 12 34 56", "+262692123456"),
        ("+33 692 12 34 56", "+262692123456"),
        ("0596 61 23 45", "+596596612345"),  # Martinique fixed
        ("0694 20 30 40", "+594694203040"),  # Guyane mobile
        ("0590 81 00 00", "+590590810000"),  # Guadeloupe fixed
    ],
)
def test_phone_fr_known_numbers(value: str, e164: str) -> None:
    assert tr.phone_fr(value) == e164


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "06 12 34 56",  # too short
        "06 12 34 56 78 9",  # too long
        "6 12 34 56 78",  # no trunk prefix, no country code
        "00 12 34 56 78",  # 0 after the trunk prefix
        "+44 20 7946 0958",  # a UK number
        "+33 0 6 12 34 56 78",  # trunk prefix inside the international form
        "06 12 34 56 7٨",  # a non-ASCII digit
        "Dupont",
    ],
)
def test_phone_fr_refuses_non_phones_without_echoing_them(bad: str) -> None:
    with pytest.raises(InvalidPlaintext) as info:
        tr.phone_fr(bad)
    if bad.strip():
        assert bad not in str(info.value) and bad not in repr(info.value)


@given(
    st.integers(min_value=100_000_000, max_value=999_999_999),
    st.sampled_from(["+33 ", "0033", "0"]),
)
def test_phone_fr_every_national_number_has_one_e164_form(nsn: int, prefix: str) -> None:
    digits = str(nsn)
    e164 = tr.phone_fr(prefix + digits)
    assert e164 == tr.phone_fr("0" + " ".join(digits[i : i + 2] for i in range(0, 9, 2)))
    assert e164.startswith("+") and e164.endswith(digits)


@given(st.text())
def test_phone_fr_returns_e164_or_refuses(s: str) -> None:
    try:
        out = tr.phone_fr(s)
    except InvalidPlaintext:
        return
    assert out.startswith("+") and out[1:].isdigit() and len(out) in (12, 13)
    assert tr.phone_fr(out) == out


# -- last4 -----------------------------------------------------------------------------


def test_last4() -> None:
    assert tr.last4("06 12 34 56 78") == "5678"
    assert tr.last4("+33 6 12 34 56 78") == tr.last4("0612345678")
    assert tr.last4("FR76 3000 6000 0112 3456 7890 189") == "0189"
    with pytest.raises(InvalidPlaintext):
        tr.last4("12 3")


@given(st.text(alphabet="0123456789 -.", min_size=0, max_size=30))
def test_last4_is_the_last_four_digits(s: str) -> None:
    digits = "".join(c for c in s if c.isdigit())
    if len(digits) < 4:
        with pytest.raises(InvalidPlaintext):
            tr.last4(s)
    else:
        assert tr.last4(s) == digits[-4:]


# -- date_iso --------------------------------------------------------------------------


def test_date_iso() -> None:
    assert tr.date_iso(dt.date(1984, 2, 29)) == "1984-02-29"
    assert tr.date_iso("1984-02-29") == "1984-02-29"
    assert tr.date_iso(" 1984-02-29 ") == "1984-02-29"
    for bad in ("1984-02-30", "29/02/1984", "19840229", "1984-2-9", "", "x"):
        with pytest.raises(InvalidPlaintext):
            tr.date_iso(bad)
    with pytest.raises(InvalidPlaintext):
        tr.date_iso(dt.datetime(1984, 2, 29, 12, 0))


@given(st.dates())
def test_date_iso_round_trips(d: dt.date) -> None:
    assert dt.date.fromisoformat(tr.date_iso(d)) == d
    assert tr.date_iso(tr.date_iso(d)) == tr.date_iso(d)


# -- initial_lastname (compound) -------------------------------------------------------


def test_initial_lastname_meets_across_spellings() -> None:
    assert tr.initial_lastname("Hélène", "Dupont") == "h dupont"
    assert tr.initial_lastname("hector", "DUPONT") == tr.initial_lastname("Hélène", "Dupont")
    assert tr.initial_lastname("Élodie", "Le  Gall") == "e le gall"
    assert tr.initial_lastname("Hélène", "Dupont") != tr.initial_lastname("Marie", "Dupont")
    with pytest.raises(InvalidPlaintext):
        tr.initial_lastname("", "Dupont")
    with pytest.raises(InvalidPlaintext):
        tr.initial_lastname("Marie", "  ")
    with pytest.raises(TypeError):
        tr.initial_lastname("Marie")


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_initial_lastname_is_unambiguous(f1: str, l1: str, f2: str, l2: str) -> None:
    try:
        a = tr.initial_lastname(f1, l1)
        b = tr.initial_lastname(f2, l2)
    except InvalidPlaintext:
        return
    same_parts = tr.folded(f1)[0] == tr.folded(f2)[0] and tr.folded(l1) == tr.folded(l2)
    assert (a == b) == same_parts


def test_transforms_have_stable_names() -> None:
    names = {t.name for t in (tr.exact, tr.folded, tr.phone_fr, tr.last4, tr.date_iso)}
    assert names == {"exact", "folded", "phone_fr", "last4", "date_iso"}
    assert tr.initial_lastname.arity == 2 and "initial_lastname" in repr(tr.initial_lastname)
