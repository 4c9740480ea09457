"""Blind index and typed column configuration: mistakes fail at declaration or configuration."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column

import carnet
from carnet import transforms as tr
from carnet.errors import ConfigurationError, UnsupportedOperation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transform": tr.phone_fr, "bits": 0},
        {"transform": tr.phone_fr, "bits": 64},
        {"transform": tr.initial_lastname, "bits": 8},  # compound, one source
        {"transform": lambda v: v, "bits": 8},  # not a carnet Transform
    ],
)
def test_bad_declarations_fail_at_once(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        carnet.BlindIndex("phone", **kwargs)


def test_no_source_fails() -> None:
    with pytest.raises(ConfigurationError):
        carnet.BlindIndex(transform=tr.exact, bits=8)
    with pytest.raises(ConfigurationError):
        carnet.EncryptedString(0)


def test_unknown_source_fails_at_configuration() -> None:
    class B(DeclarativeBase):
        pass

    class Bad(B):
        __tablename__ = "bad_bidx"
        id: Mapped[int] = mapped_column(primary_key=True)
        practice_id: Mapped[str] = mapped_column(sa.String(64))
        phone: Mapped[str] = mapped_column(carnet.EncryptedString(32, tenant="practice_id"))
        phone_bidx = carnet.BlindIndex("telephone", transform=tr.phone_fr, bits=8)

    with pytest.raises(ConfigurationError, match="telephone"):
        configure_mappers()
    B.registry.dispose()


def test_cache_keys_hold_no_manager_spec_or_transform() -> None:
    md = sa.MetaData()
    t = sa.Table(
        "p",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant", sa.String(64)),
        sa.Column("phone", carnet.EncryptedString(32)),
        carnet.BlindIndex(
            "phone", transform=tr.phone_fr, bits=12, tenant="tenant", column_name="phone_bidx"
        ),
        carnet.BlindIndex("phone", transform=tr.last4, bits=4, column_name="phone_last4"),
    )
    for col in (t.c.phone, t.c.phone_bidx):
        key = repr(col.type._static_cache_key)
        assert "KeyManager" not in key and "Transform" not in key and "_Spec" not in key
    # The composite (tenant, index) database index is declared beside the column
    # when the tenant column is known, else an index on the value alone.
    assert {tuple(c.name for c in ix.columns) for ix in t.indexes} == {
        ("tenant", "phone_bidx"),
        ("phone_last4",),
    }


def test_typed_columns_refuse_sql_comparisons_like_encrypted_text() -> None:
    md = sa.MetaData()
    t = sa.Table(
        "q",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("phone", carnet.EncryptedString(32)),
        sa.Column("born", carnet.EncryptedDate()),
    )
    with pytest.raises(UnsupportedOperation):
        t.c.phone == "0612345678"  # noqa: B015
    with pytest.raises(UnsupportedOperation):
        t.c.born.like("1984%")
