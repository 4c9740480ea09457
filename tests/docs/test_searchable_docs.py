"""docs/searchable.md's examples, run as written."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from support.paths import ROOT

DOC = ROOT / "docs" / "searchable.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_model_and_lookup_examples_run(tmp_path: Path, master_key_uri: str) -> None:
    model, lookups = _blocks()[0], _blocks()[1]
    # A module of its own: declarative mapping resolves annotations in its globals.
    (tmp_path / "doc_models.py").write_text(model, encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        ns: dict[str, object] = dict(vars(importlib.import_module("doc_models")))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("doc_models", None)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'doc.db'}")
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    carnet.configure(keys)
    try:
        patient = ns["Patient"]
        ns["Base"].metadata.create_all(engine)  # type: ignore[attr-defined]
        with Session(engine) as s:
            s.add(
                patient(  # type: ignore[operator]
                    practice_id="cabinet-lyon-3",
                    first_name="Hélène",
                    last_name="Dupont",
                    phone="+33 6 12 34 56 78",
                )
            )
            s.commit()
        ns.update(engine=engine, Session=Session)
        exec(lookups, ns)  # noqa: S102
        assert [p.last_name for p in ns["found"]] == ["Dupont"]  # type: ignore[attr-defined]
        assert ns["same"] == ns["found"]
        assert len(ns["named"]) == 1  # type: ignore[arg-type]
    finally:
        carnet.configure(None)
        keys.close()
        engine.dispose()


def test_planner_output_in_the_docs_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    text = DOC.read_text(encoding="utf-8")
    shown = re.search(
        r">>> print\(carnet.plan_bits\(2_000, false_positives=2\)\)\n(.*?)```", text, re.S
    )
    assert shown is not None
    print(carnet.plan_bits(2_000, false_positives=2))
    assert capsys.readouterr().out == shown.group(1)
