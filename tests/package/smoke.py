"""Smoke test of an installed carnet wheel (run by pkgtest.py smoke, outside the checkout).

    python smoke.py VECTORS_DIR

Checks that the installed copy is the one imported, that it carries its
type marker and licence, that the sdist's known-answer vectors open with it,
and runs the README's path end to end on SQLite: a master key, a practice's
note and phone written, the database file holding neither, a blind-index
search finding the patient.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import sysconfig
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
import carnet.types_binary
from carnet import envelope, transforms

NOTE = "Patiente anxieuse, suivi dépression (smoke)"
PHONE = "06 12 34 56 78"


def installed() -> None:
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    here = Path(carnet.__file__).resolve().parent
    assert here == site / "carnet", f"carnet imported from {here}, not {site}"
    assert (here / "py.typed").is_file(), "py.typed missing"
    meta = importlib.metadata.metadata("carnet")
    assert meta["Version"] == carnet.__version__, (meta["Version"], carnet.__version__)
    assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
    dist = importlib.metadata.distribution("carnet")
    assert any(str(f).endswith("licenses/LICENSE") for f in dist.files or []), "no LICENSE"
    # The test suite's helpers are not part of the package.
    for name in ("tests", "support"):
        assert importlib.util.find_spec(name) is None, f"{name} importable from the wheel"


def vectors(folder: Path) -> int:
    n = 0
    for name in ("carnet_v2.json", "carnet_v1.json"):
        for v in json.loads((folder / name).read_text("utf-8"))["vectors"]:
            blob = bytes.fromhex(v["blob"])
            opener = envelope.Opener(
                bytes.fromhex(v["dek"]), bytes.fromhex(v["key_id"]), v["label"], v["tenant"]
            )
            assert opener.open(blob).decode("utf-8") == v["plaintext"], v["name"]
            assert envelope.from_text(v["text_form"]) == blob, v["name"]
            n += 1
    # EncryptedBytes and EncryptedJSON: the wheel's types encode each value
    # as the plaintext recorded, which opens from the value recorded.
    for v in json.loads((folder / "carnet_types_v2.json").read_text("utf-8"))["vectors"]:
        blob = bytes.fromhex(v["blob"])
        opener = envelope.Opener(
            bytes.fromhex(v["dek"]), bytes.fromhex(v["key_id"]), v["label"], v["tenant"]
        )
        plain = opener.open(blob)
        assert plain.hex() == v["plaintext_hex"], v["name"]
        if v["type"] == "EncryptedBytes":
            assert plain == bytes.fromhex(v["value_hex"]), v["name"]
        else:
            assert carnet.types_binary.canonical_json(v["value"]).encode() == plain, v["name"]
        n += 1
    return n


class Base(DeclarativeBase): ...


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    note: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    phone: Mapped[str | None] = mapped_column(carnet.EncryptedString(32, tenant="practice_id"))
    phone_bidx = carnet.BlindIndex("phone", transform=transforms.phone_fr, bits=10)


def end_to_end() -> None:
    key = Path("smoke-master.key").absolute()
    carnet.create_master_key(f"file://{key}").close()
    db = Path("smoke.db").absolute()
    engine = sa.create_engine(f"sqlite:///{db}")
    keys = carnet.KeyManager(engine, master_key=f"file://{key}")
    keys.create_schema()
    carnet.configure(keys)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add(Patient(practice_id="cabinet-lyon-3", note=NOTE, phone=PHONE))
            s.add(Patient(practice_id="cabinet-nantes", note="autre", phone=PHONE))
            s.commit()
        with Session(engine) as s:
            found = carnet.search(s, Patient.phone_bidx, "+33612345678", tenant="cabinet-lyon-3")
            assert [p.note for p in found] == [NOTE], found
        engine.dispose()
        raw = db.read_bytes()
        assert NOTE.encode() not in raw and b"0612345678" not in raw, "plaintext in the file"
    finally:
        carnet.configure(None)
        keys.close()


if __name__ == "__main__":
    installed()
    n = vectors(Path(sys.argv[1]))
    end_to_end()
    print(f"smoke: carnet {carnet.__version__} from the wheel: {n} vectors open, end to end ok")
