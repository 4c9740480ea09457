"""Nothing happens at import: carnet attaches no listener to SQLAlchemy and no filter to
botocore's loggers until it is used (a KeyManager made, configured or bound)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_import_attaches_nothing_to_sqlalchemy_or_botocore() -> None:
    out = _run(
        """
        import logging
        import sqlalchemy as sa
        from sqlalchemy import event
        from sqlalchemy.orm import Mapper, Session
        import carnet, carnet.providers.aws_kms
        import carnet._hooks, carnet.orm, carnet.tenancy
        checks = [
            event.contains(sa.Engine, "before_execute", carnet._hooks._before_execute),
            event.contains(sa.Engine, "handle_error", carnet._hooks._handle_error),
            event.contains(Mapper, "mapper_configured", carnet.orm.setup_mapper),
            bool(logging.getLogger("botocore.endpoint").filters),
        ]
        print(any(checks))
        """
    )
    assert out == "False"


def test_a_key_manager_installs_the_hooks_and_sets_up_models_mapped_before(
    tmp_path: object,
) -> None:
    out = _run(
        f"""
        import sqlalchemy as sa
        from sqlalchemy import event
        from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
        from sqlalchemy.orm import configure_mappers
        import carnet, carnet.tenancy

        class Base(DeclarativeBase): ...
        class Note(Base):
            __tablename__ = "notes"
            id: Mapped[int] = mapped_column(primary_key=True)
            practice_id: Mapped[str] = mapped_column(sa.String(20))
            body: Mapped[str] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
        configure_mappers()  # before carnet is used at all

        engine = sa.create_engine("sqlite://")
        carnet.create_master_key("file://{tmp_path}/mk").close()
        keys = carnet.KeyManager(engine, master_key="file://{tmp_path}/mk")
        keys.create_schema(); Base.metadata.create_all(engine); carnet.configure(keys)
        with Session(engine) as s:
            s.add(Note(id=1, practice_id="p1", body="suivi")); s.commit()
        with Session(engine) as s:
            print(s.get(Note, 1).body, event.contains(sa.Engine, "before_execute",
                  carnet._hooks._before_execute))
        """
    )
    assert out == "suivi True"


def test_carnet_works_without_the_optional_asyncio_dependencies(tmp_path: object) -> None:
    # The core install has no greenlet: `make demo` and plain applications must
    # import carnet and use it without SQLAlchemy's asyncio extension.
    out = _run(
        f"""
        import sys
        sys.modules["greenlet"] = None  # as if not installed
        import sqlalchemy as sa
        import carnet
        assert "sqlalchemy.ext.asyncio" not in sys.modules
        carnet.create_master_key("file://{tmp_path}/mk2").close()
        keys = carnet.KeyManager(sa.create_engine("sqlite://"), master_key="file://{tmp_path}/mk2")
        keys.create_schema()
        blob = keys.encrypt(b"suivi", tenant="p1", label="notes.body")
        print(keys.decrypt(blob, tenant="p1", label="notes.body").decode())
        """
    )
    assert out == "suivi"


def test_import_carnet_loads_no_demo_code_cli_or_optional_dependency() -> None:
    # Demo-only code (the synthetic data generator, the demo's probes), the CLI
    # and the optional extras stay out of an application's process until asked for.
    out = _run(
        """
        import sys
        import carnet
        loaded = sorted(sys.modules)
        unwanted = ("carnet.demo", "carnet._synthetic", "carnet.cli", "carnet.doctor",
                    "carnet.migrate", "carnet.lifecycle", "click", "boto3", "botocore",
                    "pkcs11", "alembic", "keyring", "greenlet")
        inside = tuple(u + "." for u in unwanted)
        print(",".join(m for m in loaded if m in unwanted or m.startswith(inside)))
        """
    )
    assert out == ""
