"""Exact key lifecycle: exact practice ids, destroyed stays destroyed, no silent typos,
and a retire that has read every place the key could be used. On all three backends."""

from __future__ import annotations

import secrets
import threading
import unicodedata
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import carnet
from carnet import envelope, lifecycle
from carnet.cli import cli
from carnet.errors import (
    KeyDestroyed,
    KeyInUse,
    KeyStoreInconsistent,
    KeyUsageUnknown,
    UnknownTenant,
)
from support.schemas import old_keys_table

NOTE = "PLANTED-NOTE-5e1d"
NFC_CAFE = unicodedata.normalize("NFC", "cabinet-café")
NFD_CAFE = unicodedata.normalize("NFD", "cabinet-café")
# Pairs a folding collation (MariaDB's default) merges.
LOOKALIKES = [
    "Cabinet-Lyon",
    "cabinet-lyon",
    "lyon-3",
    "lyon-3 ",
    "ACME",
    "acme",
    NFC_CAFE,
    NFD_CAFE,
]


@pytest.fixture
def initialised_keys(unconfigured_keys: carnet.KeyManager) -> carnet.KeyManager:
    """As after ``carnet init``: the key table and the job table, no default manager."""
    lifecycle.init(unconfigured_keys)
    return unconfigured_keys


def _cold(keys: carnet.KeyManager) -> carnet.KeyManager:
    """A manager with an empty cache, as another process would have."""
    return carnet.KeyManager(keys.engine, master_key=keys.master_key)


def _cli(db_url: str, master: str, *args: str, input: str | None = None) -> Result:
    res = CliRunner().invoke(
        cli,
        list(args),
        input=input,
        env={"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master},
    )
    assert NOTE not in res.output and "Traceback" not in res.output
    return res


# -- practice ids are exact strings ------------------------------------------------------


def test_ids_differing_by_case_trailing_space_or_normalisation_get_their_own_keys(
    initialised_keys: carnet.KeyManager,
) -> None:
    assert NFC_CAFE != NFD_CAFE
    sealed = {
        t: initialised_keys.encrypt(f"{NOTE} of {t}".encode(), tenant=t, label="notes.body")
        for t in LOOKALIKES
    }
    key_ids = {t: envelope.key_id_of(b) for t, b in sealed.items()}
    assert len(set(key_ids.values())) == len(LOOKALIKES)
    assert sorted(r.tenant for r in initialised_keys.list_keys()) == sorted(LOOKALIKES)
    for t in LOOKALIKES:
        assert [r.key_id for r in initialised_keys.list_keys(t)] == [key_ids[t]]

    # Destroying one of each pair leaves its look-alike readable, from a cold process too.
    for gone in ("cabinet-lyon", "lyon-3 ", NFD_CAFE, "acme"):
        assert initialised_keys.destroy(gone) == 1
    cold = _cold(initialised_keys)
    for t, blob in sealed.items():
        if t in ("cabinet-lyon", "lyon-3 ", NFD_CAFE, "acme"):
            with pytest.raises(KeyDestroyed):
                cold.decrypt(blob, tenant=t, label="notes.body")
        else:
            assert cold.decrypt(blob, tenant=t, label="notes.body") == f"{NOTE} of {t}".encode()
    assert {r.tenant for r in initialised_keys.list_keys() if r.state == "active"} == {
        "Cabinet-Lyon",
        "lyon-3",
        "ACME",
        NFC_CAFE,
    }


_id_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_ids = st.one_of(
    st.text(_id_chars, min_size=1, max_size=30),
    st.sampled_from(["café", "Cabinet-Lyon", "lyon-3", "ACME", "Straße", "İzmir"]),
)


@st.composite
def _distinct_pairs(draw: st.DrawFn) -> tuple[str, str]:
    a = draw(_ids)
    how = draw(
        st.sampled_from(["swapcase", "upper", "lower", "space", "nfd", "nfc", "nfkc", "other"])
    )
    b = {
        "swapcase": a.swapcase(),
        "upper": a.upper(),
        "lower": a.lower(),
        "space": a + " ",
        "nfd": unicodedata.normalize("NFD", a),
        "nfc": unicodedata.normalize("NFC", a),
        "nfkc": unicodedata.normalize("NFKC", a),
    }.get(how) or draw(_ids)
    assume(a != b and len(b) <= 255)
    return a, b


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pair=_distinct_pairs())
def test_any_two_distinct_practice_ids_never_share_a_key(
    initialised_keys: carnet.KeyManager, pair: tuple[str, str]
) -> None:
    a, b = pair
    ka = initialised_keys.ensure_key(a)
    kb = initialised_keys.ensure_key(b)
    assert ka.key_id != kb.key_id
    assert (ka.tenant, kb.tenant) == (a, b)
    initialised_keys.clear_cache()  # looked up again from the database, not the cache
    assert (
        initialised_keys.ensure_key(a).key_id == ka.key_id
        and initialised_keys.ensure_key(b).key_id == kb.key_id
    )


def _collations(engine: sa.Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'carnet_keys' "
                "AND COLUMN_NAME IN ('tenant', 'active_tenant')"
            )
        )
        return {str(name): collation for name, collation in rows}


def test_init_converts_a_key_table_that_folds_practice_ids(
    engine: sa.Engine, db_url: str, master_key_uri: str, db_kind: str
) -> None:
    old_keys_table(sa.MetaData()).create(engine)
    if db_kind == "mariadb":
        assert set(_collations(engine).values()) == {"utf8mb4_general_ci"}
    old = carnet.KeyManager(engine, master_key=master_key_uri)  # no create_schema: as before
    sealed = {
        t: old.encrypt(f"{NOTE} {t}".encode(), tenant=t, label="l")
        for t in ("ACME", "lyon-3", "Cabinet-Lyon")
    }
    if db_kind == "mariadb":
        # Before conversion a look-alike fails closed instead of getting ACME's key.
        with pytest.raises(KeyStoreInconsistent, match="carnet init"):
            old.encrypt(b"x", tenant="acme", label="l")
        with pytest.raises(KeyStoreInconsistent, match="carnet init"):
            old.destroy("cabinet-lyon")
    old.close()

    res = _cli(db_url, master_key_uri, "init", "--json")
    assert res.exit_code == 0, res.output
    if db_kind == "mariadb":
        assert '"converted_to_exact_practice_ids": [' in res.output
        assert _collations(engine) == {
            "tenant": "utf8mb4_nopad_bin",
            "active_tenant": "utf8mb4_nopad_bin",
        }
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    for t, blob in sealed.items():  # the keys made before still work
        assert keys.decrypt(blob, tenant=t, label="l") == f"{NOTE} {t}".encode()
    assert keys.ensure_key("acme").key_id != keys.ensure_key("ACME").key_id
    assert keys.ensure_key("lyon-3 ").key_id != keys.ensure_key("lyon-3").key_id
    keys.ensure_key("cabinet-lyon")
    assert keys.destroy("cabinet-lyon") == 1
    assert _cold(keys).decrypt(sealed["Cabinet-Lyon"], tenant="Cabinet-Lyon", label="l")
    assert _cli(db_url, master_key_uri, "init").exit_code == 0  # idempotent
    keys.close()


def test_key_row_whose_practice_and_active_marker_disagree_fails_closed(
    initialised_keys: carnet.KeyManager,
) -> None:
    initialised_keys.ensure_key("a")
    t = initialised_keys.table
    with initialised_keys.engine.begin() as conn:  # a's active row now claims to be b's active key
        conn.execute(t.update().where(t.c.tenant == "a").values(active_tenant="b"))
    for tenant in ("b", "a"):
        with pytest.raises(KeyStoreInconsistent):
            _cold(initialised_keys).encrypt(b"x", tenant=tenant, label="l")
    assert [r.tenant for r in initialised_keys.list_keys()] == ["a"]  # nothing created for b


# -- a destroyed practice stays destroyed --------------------------------------------------


def test_first_key_creation_racing_a_destroy_does_not_bring_the_practice_back(
    initialised_keys: carnet.KeyManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _cold(initialised_keys)
    real = writer.store.active
    stale = iter([True])

    def read_before_the_others(conn: sa.Connection, tenant: str):  # type: ignore[no-untyped-def]
        # The writer read "no key yet" just before another process created
        # the practice's key and an operator destroyed it.
        if next(stale, False):
            initialised_keys.encrypt(b"first", tenant=tenant, label="l")
            initialised_keys.destroy(tenant)
            return None, set()
        return real(conn, tenant)

    monkeypatch.setattr(writer.store, "active", read_before_the_others)
    with pytest.raises(KeyDestroyed):
        writer.encrypt(f"{NOTE}".encode(), tenant="leaving", label="l")
    assert {r.state for r in initialised_keys.list_keys("leaving")} == {"destroyed"}
    with pytest.raises(KeyDestroyed):  # and any later write
        _cold(initialised_keys).encrypt(b"later", tenant="leaving", label="l")


def test_rotate_of_a_destroyed_practice_refuses_until_reenabled(
    initialised_keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    before = initialised_keys.encrypt(NOTE.encode(), tenant="gone", label="l")
    initialised_keys.rotate("gone")
    initialised_keys.destroy("gone")
    with pytest.raises(KeyDestroyed, match="reenable"):
        initialised_keys.rotate("gone")
    r = _cli(db_url, master_key_uri, "keys", "rotate", "--tenant", "gone")
    assert r.exit_code == 8 and "reenable" in r.output
    with pytest.raises(KeyDestroyed, match="reenable"):
        _cold(initialised_keys).encrypt(b"new", tenant="gone", label="l")
    assert {r.state for r in initialised_keys.list_keys("gone")} == {"destroyed"}

    r = _cli(db_url, master_key_uri, "keys", "reenable", "--tenant", "gone", input="gon\n")
    assert r.exit_code == 6
    r = _cli(db_url, master_key_uri, "keys", "reenable", "--tenant", "gone", input="gone\n")
    assert r.exit_code == 0 and "new active key v3" in r.output, r.output
    writer = _cold(initialised_keys)
    after = writer.encrypt(b"after", tenant="gone", label="l")
    assert writer.decrypt(after, tenant="gone", label="l") == b"after"
    with pytest.raises(KeyDestroyed):  # re-enabling restores nothing
        writer.decrypt(before, tenant="gone", label="l")
    r = _cli(db_url, master_key_uri, "keys", "reenable", "--tenant", "gone", "--yes")
    assert r.exit_code == 2 and "not destroyed" in r.output
    assert initialised_keys.rotate("gone").version == 4


def test_reenable_in_the_library_gives_a_new_key(initialised_keys: carnet.KeyManager) -> None:
    with pytest.raises(UnknownTenant):
        initialised_keys.reenable("never-existed")
    initialised_keys.ensure_key("p")
    initialised_keys.destroy("p")
    rec = initialised_keys.reenable("p")
    assert (rec.version, rec.state, rec.tenant) == (2, "active", "p")
    assert initialised_keys.ensure_key("p").key_id == rec.key_id


# -- a typo is not a successful erasure ---------------------------------------------------------


def test_destroy_or_rotate_of_a_practice_with_no_key_is_an_error(
    initialised_keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    initialised_keys.ensure_key("cabinet-lyon")
    with pytest.raises(UnknownTenant):
        initialised_keys.destroy("cabinet-lyom")
    with pytest.raises(UnknownTenant):
        initialised_keys.rotate("cabinet-lyom")
    r = _cli(db_url, master_key_uri, "keys", "destroy", "--tenant", "cabinet-lyom", "--yes")
    assert r.exit_code == 7 and "cabinet-lyom" in r.output and "no data key" in r.output
    r = _cli(db_url, master_key_uri, "keys", "destroy", "--tenant", "cabinet-lyom")
    assert r.exit_code == 7 and "Type the practice id" not in r.output  # before any prompt
    r = _cli(db_url, master_key_uri, "keys", "reenable", "--tenant", "cabinet-lyom", "--yes")
    assert r.exit_code == 7
    r = _cli(db_url, master_key_uri, "keys", "rotate", "--tenant", "cabinet-lyom")
    assert r.exit_code == 7 and "--create" in r.output
    assert [r.tenant for r in initialised_keys.list_keys()] == ["cabinet-lyon"]  # nothing created
    assert initialised_keys.list_keys("cabinet-lyon")[0].state == "active"  # nothing destroyed

    r = _cli(db_url, master_key_uri, "keys", "rotate", "--all", "--create")
    assert r.exit_code == 2
    r = _cli(db_url, master_key_uri, "keys", "rotate", "--tenant", "new-practice", "--create")
    assert r.exit_code == 0 and "new-practice: now v1" in r.output
    assert initialised_keys.rotate("other", create=True).version == 1
    initialised_keys.destroy("other")
    r = _cli(db_url, master_key_uri, "keys", "destroy", "--tenant", "other", "--yes")
    assert r.exit_code == 0 and "already destroyed" in r.output


# -- retire sees every place the key could be used ---------------------------------------------


def _old_key_with_hidden_rows(keys: carnet.KeyManager) -> bytes:
    """Rows under p1's first key in places a sample of PK tables misses; then rotate."""
    md = sa.MetaData()
    plain_first = sa.Table(
        "plain_first",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", sa.Text),
    )
    no_pk = sa.Table(
        "no_pk", md, sa.Column("practice", sa.String(20)), sa.Column("blob", sa.LargeBinary)
    )
    md.create_all(keys.engine)
    old = keys.ensure_key("p1").key_id
    seal = lambda: keys.encrypt(NOTE.encode(), tenant="p1", label="x")  # noqa: E731
    with keys.engine.begin() as conn:
        conn.execute(
            plain_first.insert(), [{"id": i, "note": f"legacy text {i}"} for i in range(80)]
        )
        conn.execute(
            plain_first.insert(),
            [{"id": 100 + i, "note": envelope.to_text(seal())} for i in range(3)],
        )
        conn.execute(no_pk.insert(), [{"practice": "p1", "blob": seal()} for _ in range(2)])
    keys.rotate("p1")
    return old


def test_retire_without_table_finds_rows_in_a_table_without_primary_key_or_behind_plaintext(
    initialised_keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    old = _old_key_with_hidden_rows(initialised_keys)
    with pytest.raises(KeyInUse) as exc:
        lifecycle.retire_key(initialised_keys, old)
    assert "5 row(s)" in str(exc.value)
    assert "3 row(s) in plain_first.note" in str(exc.value)
    assert "2 row(s) in no_pk.blob" in str(exc.value)
    r = _cli(db_url, master_key_uri, "keys", "retire", old.hex())
    assert r.exit_code == 5 and "no_pk.blob" in r.output and "plain_first.note" in r.output
    assert initialised_keys.get_key(old).state == "inactive"  # type: ignore[union-attr]

    with initialised_keys.engine.begin() as conn:  # once those rows are gone, it retires
        conn.execute(sa.text("DELETE FROM no_pk"))
        conn.execute(sa.text("DELETE FROM plain_first WHERE id >= 100"))
    r = _cli(db_url, master_key_uri, "keys", "retire", old.hex(), "--json")
    assert r.exit_code == 0, r.output
    assert '"rows_under_key": 0' in r.output and '"rows_scanned": 80' in r.output


def _unreadable_column(engine: sa.Engine, db_kind: str, db_url: str) -> Iterator[str]:
    """Make a column the CLI cannot read; yield the database URL the CLI should use."""
    if db_kind == "sqlite":
        # A TEXT value that is not UTF-8: the driver cannot return it.
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE odd (id INTEGER PRIMARY KEY, txt TEXT)"))
            # The driver's error quotes the value: it must not reach the output.
            bad = (NOTE.encode() + b"\xff\xfe").hex()
            conn.execute(sa.text(f"INSERT INTO odd VALUES (1, CAST(X'{bad}' AS TEXT))"))
        yield db_url
        return
    # A role that may see the table but not read it.
    user, password = f"carnet_t_u{secrets.token_hex(4)}", secrets.token_hex(8)
    url = sa.engine.make_url(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE odd (id INTEGER PRIMARY KEY, txt TEXT)"))
        conn.execute(sa.text("INSERT INTO odd VALUES (1, :note)"), {"note": NOTE})
        if db_kind == "postgresql":
            conn.execute(sa.text(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'"))
            conn.execute(
                sa.text(f"GRANT SELECT, UPDATE ON carnet_keys, plain_first, no_pk TO {user}")
            )
        else:
            conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
            for tbl, priv in (
                ("carnet_keys", "SELECT, UPDATE"),
                ("plain_first", "SELECT"),
                ("no_pk", "SELECT"),
                ("odd", "INSERT"),
            ):
                conn.execute(sa.text(f"GRANT {priv} ON {url.database}.{tbl} TO '{user}'@'%'"))
    try:
        yield url.set(username=user, password=password).render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            if db_kind == "postgresql":
                conn.execute(sa.text(f"DROP OWNED BY {user}"))
                conn.execute(sa.text(f"DROP ROLE {user}"))
            else:
                conn.execute(sa.text(f"DROP USER '{user}'@'%'"))


def test_retire_refuses_and_names_a_table_or_column_it_cannot_read(
    initialised_keys: carnet.KeyManager,
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    db_kind: str,
) -> None:
    old = _old_key_with_hidden_rows(initialised_keys)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM no_pk"))
        conn.execute(sa.text("DELETE FROM plain_first WHERE id >= 100"))
    gen = _unreadable_column(engine, db_kind, db_url)
    url = next(gen)
    try:
        r = _cli(url, master_key_uri, "keys", "retire", old.hex())
        assert r.exit_code == 5, r.output
        assert "could not read odd.txt" in r.output and "\n" not in r.output.strip()
        assert initialised_keys.get_key(old).state == "inactive"  # type: ignore[union-attr]
        limited = carnet.KeyManager(url, master_key=master_key_uri)
        with pytest.raises(KeyUsageUnknown, match="odd.txt"):
            lifecycle.retire_key(limited, old)
        limited.close()
        limited.engine.dispose()
        r = _cli(url, master_key_uri, "keys", "retire", old.hex(), "--force", "--yes")
        assert r.exit_code == 0 and "not read: odd.txt" in r.output, r.output
        assert initialised_keys.get_key(old).state == "retired"  # type: ignore[union-attr]
    finally:
        for _ in gen:
            pass


def test_destroy_racing_rotations_and_first_writes_leaves_no_live_key(
    initialised_keys: carnet.KeyManager,
) -> None:
    """Whatever interleaving: once destroy returns, the practice has no live key, and
    every later write and rotation refuses."""
    for round_ in range(4):
        tenant = f"race-{round_}"
        initialised_keys.ensure_key(tenant)
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn(
            tenant: str = tenant,
            stop: threading.Event = stop,
            errors: list[BaseException] = errors,
        ) -> None:
            # Another process: rotations and first writes, until it sees the destruction.
            other = carnet.KeyManager(
                initialised_keys.engine, master_key=initialised_keys.master_key, cache_ttl=0.01
            )
            try:
                while not stop.is_set():
                    try:
                        other.rotate(tenant)
                        other.encrypt(b"x", tenant=tenant, label="l")
                    except KeyDestroyed:
                        return
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                errors.append(exc)
            finally:
                other.close()

        workers = [threading.Thread(target=churn) for _ in range(2)]
        for w in workers:
            w.start()
        initialised_keys.destroy(tenant)
        stop.set()
        for w in workers:
            w.join(60)
        assert not errors, [type(e).__name__ for e in errors]
        assert {r.state for r in initialised_keys.list_keys(tenant)} == {"destroyed"}
        with pytest.raises(KeyDestroyed):
            _cold(initialised_keys).encrypt(b"later", tenant=tenant, label="l")
