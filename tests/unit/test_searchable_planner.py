"""Sizing blind indexes: the planner's choice matches R / 2^L and warns where it leaks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import carnet
from carnet.errors import ConfigurationError


def test_typical_practice() -> None:
    plan = carnet.plan_bits(2_000, false_positives=2)
    assert plan.bits == 10  # 2000 / 2 = 1000 ~ 2^10
    assert plan.expected_false_positives == pytest.approx(2000 / 1024)
    assert plan.warnings == []
    assert "bits = 10" in str(plan) and "2,000" in str(plan)


@given(
    st.integers(min_value=1, max_value=10**9),
    st.floats(min_value=0.001, max_value=1000, allow_nan=False),
)
def test_expected_false_positives_within_a_factor_of_sqrt2(rows: int, fp: float) -> None:
    plan = carnet.plan_bits(rows, fp)
    assert 1 <= plan.bits <= 63
    assert plan.expected_false_positives == rows / 2**plan.bits
    if 1 < plan.bits < 63:
        ratio = plan.expected_false_positives / fp
        assert 2**-0.5 <= ratio <= 2**0.5 + 1e-9


def test_warnings() -> None:
    precise = carnet.plan_bits(10_000, false_positives=0.01)
    assert precise.bits == 20 and any("deterministic" in w for w in precise.warnings)
    dates = carnet.plan_bits(50_000, false_positives=2, distinct_values=36_500)
    assert dates.values_per_index_value is not None and dates.values_per_index_value < 2
    assert any("low-entropy" in w for w in dates.warnings)
    combined = carnet.plan_bits(5_000, 2, other_index_bits=[12, 8])
    assert combined.combined_rows_per_value is not None
    assert any("single out" in w for w in combined.warnings)


def test_print_helper(capsys: pytest.CaptureFixture[str]) -> None:
    plan = carnet.print_bits_plan(100_000, 4)
    out = capsys.readouterr().out
    assert out.startswith(f"bits = {plan.bits}") and "unrelated" in out


@pytest.mark.parametrize("rows, fp", [(0, 1.0), (-5, 1.0), (100, 0.0), (100, -1.0)])
def test_bad_inputs(rows: int, fp: float) -> None:
    with pytest.raises(ConfigurationError):
        carnet.plan_bits(rows, fp)
