"""Certificate expiry in the fleet store: a schema-2 database (before it) is upgraded on SQLite and on a
real PostgreSQL, the birth's dates are stored per device, and `fleet status` judges the nearer one."""

from __future__ import annotations

import pytest

from tests.fleet.test_fleet_store_backends import target  # noqa: F401  (the fixture: SQLite file or PostgreSQL URL)
from toolchain.fleet.cert_expiry import DAY_S, certificate_expiry
from toolchain.fleet.store import SCHEMA_VERSION, FleetStore


def test_a_schema_2_database_is_upgraded_and_keeps_its_devices(target: str) -> None:  # noqa: F811
    with FleetStore(target) as store:
        store.update_status("lab", "dev-1", "online", seen_at=1.0, model_version=3)
        with store._tx() as db:  # the database as schema 2 left it
            for column in ("cert_not_after", "ca_not_after"):
                db.execute(f"ALTER TABLE devices DROP COLUMN {column}")
            db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with FleetStore(target) as store:  # the monitor opens it: upgraded
        assert store._rows("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == str(SCHEMA_VERSION)
        before = store.device("lab", "dev-1")
        assert (before["model_version"], before["cert_not_after"], before["ca_not_after"]) == (3, None, None)
        store.update_status("lab", "dev-1", "online", model_version=3, cert_not_after=2e9, ca_not_after=3e9)
        after = store.device("lab", "dev-1")
    assert (after["cert_not_after"], after["ca_not_after"]) == (2e9, 3e9)


@pytest.mark.parametrize("client_days, ca_days, expected", [
    (None, None, None),
    (365, 3650, ("client", 365.0, "ok")),
    (29.5, 3650, ("client", 29.5, "expiring")),
    (400, 10, ("ca", 10.0, "expiring")),  # the CA is nearer: that is what ends the device's connections
    (-1, 3650, ("client", -1.0, "expired")),
])
def test_the_nearer_expiry_is_judged(client_days: float | None, ca_days: float | None, expected: tuple | None) -> None:
    now = 1.8e9
    row = {"cert_not_after": None if client_days is None else now + client_days * DAY_S,
           "ca_not_after": None if ca_days is None else now + ca_days * DAY_S}
    expiry = certificate_expiry(row, now)
    assert (expiry if expiry is None else (expiry["which"], expiry["days_left"], expiry["state"])) == expected
