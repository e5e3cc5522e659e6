"""The service's store: idempotent enrollment, paging, tokens, windows, atomic cycles, durability.

The core tests run on SQLite files under tmp_path and, when a PostgreSQL server binary
(``initdb``/``pg_ctl``) and the psycopg driver are on this machine, on a throwaway
PostgreSQL cluster too (skipped with the reason otherwise).
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from vpp.errors import SpecError, UnknownAssetError
from vpp.service.store import (ConflictError, CycleRow, NotFoundError, SetpointRecord, SetpointRow, Store,
                               TelemetryRow, generate_token)

REPO = Path(__file__).resolve().parents[1]
BEIJING = timezone(timedelta(hours=8))
T0 = datetime(2025, 1, 15, 8, 0, tzinfo=BEIJING)  # 00:00 UTC
BATTERY = {"e_kwh": 120.0, "p_charge_max_kw": 60.0, "p_discharge_max_kw": 60.0}


# --- backends ----------------------------------------------------------------------------------


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'data' / 'vpp.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url):
    with Store(store_url) as s:
        yield s


@pytest.fixture
def sqlite_store(tmp_path):
    with Store(sqlite_url(tmp_path)) as s:
        yield s


def count(store: Store, table) -> int:
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar_one()


def enroll(store: Store, external_id: str, tenant: str = "demo", site_id: str = "changping", kind: str = "battery",
           spec: dict | None = None):
    return store.enroll_asset(tenant, site_id, external_id, kind, "bus 5", spec or BATTERY)[0]


# --- assets ------------------------------------------------------------------------------------


def test_enroll_is_idempotent_and_conflicts_are_refused(store):
    record, created = store.enroll_asset("demo", "changping", "bess-1", "battery", "bus 5", BATTERY)
    assert created and record.state == "active" and record.spec == BATTERY
    again, created = store.enroll_asset("demo", "changping", "bess-1", "battery", "bus 5", dict(BATTERY))
    assert not created and again == record
    for change in ({"site_id": "huairou"}, {"kind": "pv"}, {"bus": "bus 6"}, {"spec": {**BATTERY, "e_kwh": 1.0}}):
        args = {"tenant": "demo", "site_id": "changping", "external_id": "bess-1", "kind": "battery",
                "bus": "bus 5", "spec": BATTERY, **change}
        with pytest.raises(ConflictError):
            store.enroll_asset(**args)
    # The same external id under another tenant is another asset.
    theirs, created = store.enroll_asset("other", "changping", "bess-1", "battery", "bus 5", BATTERY)
    assert created and theirs.asset_id != record.asset_id
    assert store.get_asset(record.asset_id) == record
    page, _ = store.list_assets(include_decommissioned=True)
    assert len(page) == 2
    # A decommissioned asset's external id is not silently re-activated.
    store.decommission_asset(record.asset_id)
    with pytest.raises(ConflictError):
        store.enroll_asset("demo", "changping", "bess-1", "battery", "bus 5", BATTERY)


def test_update_replaces_the_spec_and_bumps_update_time(store):
    record = enroll(store, "bess-1")
    updated = store.update_asset(record.asset_id, {**BATTERY, "e_kwh": 200.0})
    assert updated.spec["e_kwh"] == 200.0 and updated.update_time > record.update_time
    assert updated.create_time == record.create_time
    assert store.get_asset(record.asset_id).spec["e_kwh"] == 200.0
    with pytest.raises(SpecError) as error:
        store.update_asset(record.asset_id, {"e_kwh": math.nan})
    assert error.value.field == "spec"
    with pytest.raises(UnknownAssetError):
        store.update_asset("no-such-asset", BATTERY)
    assert store.get_asset(record.asset_id).spec["e_kwh"] == 200.0


def test_paging_covers_every_asset_exactly_once_in_creation_order(store):
    made = [enroll(store, f"a{k:02d}", tenant="demo" if k % 3 else "other").asset_id for k in range(23)]
    seen, token, pages = [], "", 0
    while True:
        page, token = store.list_assets(page_size=5, page_token=token)
        assert len(page) <= 5
        seen += [a.asset_id for a in page]
        pages += 1
        if not token:
            break
    assert seen == made and pages == 5
    # A page size that divides the count exactly ends on a full page and an empty token.
    page, token = store.list_assets(page_size=23)
    assert len(page) == 23 and token == ""
    for bad in (0, 1001):
        with pytest.raises(SpecError) as error:
            store.list_assets(page_size=bad)
        assert error.value.field == "page_size"
    with pytest.raises(SpecError) as error:
        store.list_assets(page_token="not-a-token")
    assert error.value.field == "page_token"


def test_filters_by_tenant_site_and_kind(store):
    mine = {enroll(store, f"m{k}").asset_id for k in range(4)}
    pv = enroll(store, "pv-1", kind="pv", spec={"p_peak_kw": 50.0}).asset_id
    theirs = {enroll(store, f"t{k}", tenant="other").asset_id for k in range(3)}
    elsewhere = enroll(store, "h1", site_id="huairou").asset_id
    assert {a.asset_id for a in store.list_assets(tenant="demo")[0]} == mine | {pv, elsewhere}
    assert {a.asset_id for a in store.list_assets(tenant="other")[0]} == theirs
    assert store.list_assets(tenant="")[0] == []  # an empty tenant matches nothing, not everything
    assert len(store.list_assets()[0]) == 9
    assert {a.asset_id for a in store.list_assets(site_id="huairou")[0]} == {elsewhere}
    assert {a.asset_id for a in store.list_assets(tenant="demo", kind="pv")[0]} == {pv}
    # Paging under a filter still returns only that tenant's assets.
    page, token = store.list_assets(tenant="other", page_size=2)
    rest, last = store.list_assets(tenant="other", page_size=2, page_token=token)
    assert {a.asset_id for a in page + rest} == theirs and last == ""


def test_decommissioned_assets_are_kept_and_listed_only_when_asked(store):
    keep, gone = enroll(store, "keep"), enroll(store, "gone")
    record = store.decommission_asset(gone.asset_id)
    assert record.state == "decommissioned" and record.update_time >= gone.update_time
    assert store.decommission_asset(gone.asset_id) == record  # a second call changes nothing
    assert [a.asset_id for a in store.list_assets()[0]] == [keep.asset_id]
    listed = store.list_assets(include_decommissioned=True)[0]
    assert [(a.asset_id, a.state) for a in listed] == [(keep.asset_id, "active"), (gone.asset_id, "decommissioned")]
    assert store.get_asset(gone.asset_id).state == "decommissioned"
    with pytest.raises(SpecError):
        store.record_telemetry(gone.asset_id, T0, {"p_kw": 1.0})
    with pytest.raises(SpecError):
        store.update_asset(gone.asset_id, BATTERY)
    with pytest.raises(UnknownAssetError):
        store.decommission_asset("no-such-asset")


def test_times_are_stored_and_returned_in_utc(store):
    record = enroll(store, "bess-1")
    assert record.create_time.tzinfo == timezone.utc
    limit = store.add_limit("changping", "connection_import", "", T0, T0 + timedelta(hours=2), limit_kw=300.0)
    assert limit.start == T0 and limit.start.utcoffset() == timedelta(0)
    assert limit.start.hour == 0  # 08:00 in Beijing is 00:00 UTC
    for call, field in [(lambda: store.record_telemetry(record.asset_id, datetime(2025, 1, 15, 8), {}), "time"),
                        (lambda: store.add_limit("changping", "connection_import", "", datetime(2025, 1, 15),
                                                 T0, limit_kw=1.0), "start"),
                        (lambda: store.active_limits("changping", T0, datetime(2025, 1, 16)), "end")]:
        with pytest.raises(SpecError) as error:
            call()
        assert error.value.field == field


# --- tokens ------------------------------------------------------------------------------------


def test_a_token_authenticates_and_a_wrong_one_does_not(store):
    token = generate_token()
    assert len(token) >= 43 and token != generate_token()
    token_id = store.add_token("demo", "aggregator", token, name="demo aggregator")
    assert isinstance(token_id, str) and token_id
    principal = store.authenticate(token)
    assert (principal.tenant, principal.role, principal.asset_id) == ("demo", "aggregator", None)
    assert store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.authenticate("") is None
    with pytest.raises(ConflictError):
        store.add_token("other", "operator", token)
    # A device token is bound to one enrolled asset of its own tenant.
    asset = enroll(store, "bess-1")
    device = generate_token()
    store.add_token("demo", "device", device, asset_id=asset.asset_id)
    assert store.authenticate(device).asset_id == asset.asset_id
    with pytest.raises(SpecError):
        store.add_token("demo", "device", generate_token())
    with pytest.raises(SpecError):
        store.add_token("other", "device", generate_token(), asset_id=asset.asset_id)
    with pytest.raises(UnknownAssetError):
        store.add_token("demo", "device", generate_token(), asset_id="no-such-asset")
    with pytest.raises(SpecError):
        store.add_token("demo", "admin", generate_token())
    with pytest.raises(SpecError):
        store.add_token("demo", "operator", "short")


def test_the_database_files_hold_only_the_token_digest(tmp_path):
    token = generate_token()
    with Store(sqlite_url(tmp_path)) as store:
        store.add_token("demo", "operator", token, name="ops")
        assert store.authenticate(token) is not None
        files = sorted((tmp_path / "data").glob("vpp.db*"))  # the database, its WAL and shared memory
        raw = b"".join(f.read_bytes() for f in files)
    assert token.encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw  # we read the right bytes


# --- telemetry ---------------------------------------------------------------------------------


def test_telemetry_for_an_unknown_asset_raises_and_stores_nothing(store):
    with pytest.raises(UnknownAssetError):
        store.record_telemetry("no-such-asset", T0, {"p_kw": 1.0})
    assert store.latest_telemetry(["no-such-asset"]) == {}
    assert count(store, TelemetryRow) == 0


def test_latest_telemetry_is_the_latest_measurement_and_history_keeps_all(store):
    a, b = enroll(store, "a"), enroll(store, "b")
    store.record_telemetry(a.asset_id, T0, {"p_kw": 5.0, "soc_frac": 0.6})
    store.record_telemetry(a.asset_id, T0 + timedelta(minutes=5), {"p_kw": 4.0, "soc_frac": 0.55})
    store.record_telemetry(a.asset_id, T0 - timedelta(minutes=5), {"p_kw": 9.0})  # arrives late: history only
    latest = store.latest_telemetry([a.asset_id, b.asset_id, "no-such-asset"])
    assert list(latest) == [a.asset_id]
    when, values = latest[a.asset_id]
    assert when == T0 + timedelta(minutes=5) and when.tzinfo == timezone.utc
    assert values == {"p_kw": 4.0, "soc_frac": 0.55}
    assert count(store, TelemetryRow) == 3
    with pytest.raises(SpecError) as error:
        store.record_telemetry(a.asset_id, T0 + timedelta(hours=1), {"p_kw": math.inf})
    assert error.value.field == "values"
    assert store.latest_telemetry([a.asset_id])[a.asset_id][1]["p_kw"] == 4.0 and count(store, TelemetryRow) == 3


# --- limits and flexibility requests -------------------------------------------------------------


def test_limits_overlapping_a_window_until_lifted(store):
    h = timedelta(hours=1)
    early = store.add_limit("changping", "connection_import", "", T0, T0 + 2 * h, limit_kw=300.0, created_by="grid")
    late = store.add_limit("changping", "transformer", "trafo 1", T0 + 4 * h, T0 + 6 * h, limit_percent=80.0)
    store.add_limit("huairou", "connection_export", "", T0, T0 + 6 * h, limit_kw=0.0)
    ids = lambda records: [r.limit_id for r in records]  # noqa: E731
    assert ids(store.active_limits("changping", T0, T0 + 24 * h)) == [early.limit_id, late.limit_id]
    assert ids(store.active_limits("changping", T0 + h, T0 + 3 * h)) == [early.limit_id]
    # Windows are half-open: a limit ending at 10:00 does not touch a window from 10:00.
    assert ids(store.active_limits("changping", T0 + 2 * h, T0 + 4 * h)) == []
    lifted = store.lift_limit(str(early.limit_id))
    assert lifted.lifted_time is not None and lifted.created_by == "grid"
    assert store.lift_limit(early.limit_id) == lifted
    assert ids(store.active_limits("changping", T0, T0 + 24 * h)) == [late.limit_id]
    with pytest.raises(NotFoundError):
        store.lift_limit(999999)
    base = dict(site_id="changping", element="connection_import", element_name="", start=T0, end=T0 + h,
                limit_kw=100.0)
    bad = [dict(element="fence"), dict(end=T0), dict(start=datetime(2025, 1, 15)), dict(limit_kw=None),
           dict(limit_percent=50.0),  # both given
           dict(limit_kw=None, limit_percent=50.0),  # a connection limit in percent
           dict(limit_kw=math.nan), dict(limit_kw=-1.0), dict(element="line", element_name="")]
    for change in bad:
        with pytest.raises(SpecError):
            store.add_limit(**{**base, **change})
    assert len(store.active_limits("changping", T0 - 24 * h, T0 + 24 * h)) == 1


def test_flex_requests_by_site_and_window(store):
    h = timedelta(hours=1)
    low = store.add_flex_request("changping", T0, T0 + 2 * h, max_import_kw=200.0, priority=1)
    high = store.add_flex_request("changping", T0 + h, T0 + 3 * h, min_import_kw=-50.0, max_import_kw=100.0,
                                  price_cny_per_kwh=1.5, priority=5, created_by="grid")
    everywhere = store.add_flex_request("", T0, T0 + 24 * h, max_import_kw=1000.0)
    store.add_flex_request("huairou", T0, T0 + 24 * h, max_import_kw=10.0)
    ids = lambda records: [r.request_id for r in records]  # noqa: E731
    assert ids(store.flex_requests("changping", T0, T0 + 24 * h)) == [high.request_id, low.request_id]
    assert ids(store.flex_requests("changping", T0 + 2 * h, T0 + 4 * h)) == [high.request_id]
    assert ids(store.flex_requests("changping", T0 + 3 * h, T0 + 4 * h)) == []
    assert ids(store.flex_requests("", T0 + 12 * h, T0 + 13 * h)) == [everywhere.request_id]
    assert (high.min_import_kw, high.max_import_kw, high.price_cny_per_kwh) == (-50.0, 100.0, 1.5)
    for bad in [dict(), dict(min_import_kw=10.0, max_import_kw=5.0), dict(max_import_kw=math.inf),
                dict(max_import_kw=1.0, price_cny_per_kwh=-1.0), dict(max_import_kw=1.0, end=T0)]:
        with pytest.raises(SpecError):
            store.add_flex_request("changping", **{"start": T0, "end": T0 + h, **bad})
    assert len(store.flex_requests("changping", T0 - 24 * h, T0 + 24 * h)) == 2


# --- cycles and setpoints ----------------------------------------------------------------------


def setpoint(asset_id: str, when: datetime, p_kw: float, fallback: bool = False) -> SetpointRecord:
    return SetpointRecord(asset_id, when, when + timedelta(minutes=20), p_kw, 0.0, fallback)


def test_latest_setpoints_come_from_the_newest_cycle_that_has_one(store):
    a, b = enroll(store, "a").asset_id, enroll(store, "b").asset_id
    t1, t2 = T0, T0 + timedelta(minutes=15)
    plan1 = {"p_kw": {a: [10.0, 11.0], b: [-5.0, -5.0]}, "grid": {"max_loading_percent": [math.nan, 40.0]}}
    c1 = store.save_cycle("changping", t1, "optimal", 0.5, 1.2, 123.4, 2, 0, None,
                          [setpoint(a, t1, 10.0), setpoint(b, t1, -5.0)], plan1)
    c2 = store.save_cycle("changping", t2, "fallback", 0.1, 0.3, None, 1, 1, "solver time limit",
                          [setpoint(a, t2, 3.0, fallback=True)], {"p_kw": {a: [3.0]}})
    latest = store.latest_setpoints([a, b, "no-such-asset"])
    assert set(latest) == {a, b}
    assert (latest[a].p_kw, latest[a].fallback, latest[a].valid_from) == (3.0, True, t2)
    assert latest[a].valid_from.tzinfo == timezone.utc
    assert latest[b].p_kw == -5.0 and latest[b].valid_from == t1
    cycles = store.last_cycles("changping")
    assert [c.cycle_id for c in cycles] == [c2, c1]
    assert (cycles[0].status, cycles[0].reason, cycles[0].objective_cny) == ("fallback", "solver time limit", None)
    assert (cycles[1].objective_cny, cycles[1].violations_found, cycles[1].solve_s) == (123.4, 2, 0.5)
    assert [c.cycle_id for c in store.last_cycles("changping", limit=1)] == [c2]
    assert store.last_cycles("huairou") == []
    # A failed cycle is listed but does not replace the latest plan.
    c3 = store.save_cycle("changping", t2 + timedelta(minutes=15), "failed", 0.0, 0.1, None, 0, 0, "boom", [], {})
    assert store.last_cycles("changping")[0].cycle_id == c3
    cycle, plan = store.latest_plan("changping")
    assert cycle.cycle_id == c2 and plan == {"p_kw": {a: [3.0]}}
    assert store.latest_plan("huairou") is None
    # Plans round-trip as the caller gave them, NaN included (a failed power flow step).
    store.save_cycle("changping", t2 + timedelta(minutes=30), "optimal", 0.1, 0.2, 1.0, 0, 0, None, [], plan1)
    _, plan = store.latest_plan("changping")
    assert math.isnan(plan["grid"]["max_loading_percent"][0]) and plan["p_kw"] == plan1["p_kw"]


def test_a_failed_save_cycle_leaves_no_partial_cycle(store):
    a = enroll(store, "a").asset_id
    good = store.save_cycle("changping", T0, "optimal", 0.1, 0.2, 1.0, 0, 0, None, [setpoint(a, T0, 7.0)], {"x": 1})
    t = T0 + timedelta(minutes=15)
    attempts = [
        ([setpoint(a, t, 8.0), setpoint("no-such-asset", t, 1.0)], UnknownAssetError),  # fails after the cycle row
        ([setpoint(a, t, math.nan)], SpecError),
        ([setpoint(a, t, 8.0), setpoint(a, t, 9.0)], SpecError),
        ([SetpointRecord(a, datetime(2025, 1, 15), datetime(2025, 1, 15, 1), 8.0, 0.0, False)], SpecError),
    ]
    for setpoints, error in attempts:
        with pytest.raises(error):
            store.save_cycle("changping", t, "optimal", 0.1, 0.2, 2.0, 0, 0, None, setpoints, {"x": 2})
    with pytest.raises(SpecError):
        store.save_cycle("changping", t, "optimal", math.nan, 0.2, 2.0, 0, 0, None, [setpoint(a, t, 8.0)], {})
    assert [c.cycle_id for c in store.last_cycles("changping")] == [good]
    assert count(store, CycleRow) == 1 and count(store, SetpointRow) == 1
    assert store.latest_setpoints([a])[a].p_kw == 7.0
    assert store.latest_plan("changping")[1] == {"x": 1}


# --- concurrency, SQLite settings and durability -------------------------------------------------


def test_concurrent_writers_from_a_thread_pool(store):
    """Eight threads enroll the same ten assets and report telemetry at once."""
    barrier = threading.Barrier(8)

    def work(worker: int) -> list[bool]:
        barrier.wait()
        created = []
        for k in range(10):
            record, made = store.enroll_asset("demo", "changping", f"bess-{k}", "battery", "bus 5", BATTERY)
            created.append(made)
            store.record_telemetry(record.asset_id, T0 + timedelta(seconds=worker), {"p_kw": float(worker)})
        return created

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert [sum(r[k] for r in results) for k in range(10)] == [1] * 10  # each asset created exactly once
    assets = store.list_assets()[0]
    assert len(assets) == 10
    latest = store.latest_telemetry([a.asset_id for a in assets])
    assert all(when == T0 + timedelta(seconds=7) for when, _ in latest.values())
    assert count(store, TelemetryRow) == 80


def test_sqlite_settings_hold_on_every_connection(sqlite_store):
    connections = [sqlite_store.engine.connect() for _ in range(3)]  # three distinct pooled connections
    try:
        for connection in connections:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        for connection in connections:
            connection.close()
    # The database itself refuses a setpoint for an asset that is not enrolled.
    cycle = sqlite_store.save_cycle("changping", T0, "failed", 0.0, 0.0, None, 0, 0, None, [], {})
    with pytest.raises(IntegrityError), sqlite_store.engine.begin() as connection:
        connection.execute(text("INSERT INTO setpoints (cycle_id, asset_id, valid_from, valid_until, p_kw, q_kvar, "
                                "fallback) VALUES (:c, 'ghost', '2025-01-15 00:00:00', '2025-01-15 00:15:00', "
                                "1, 0, 0)"), {"c": cycle})
    assert count(sqlite_store, SetpointRow) == 0


def test_unsupported_urls_are_refused(tmp_path):
    for url in ("sqlite://", "sqlite:///:memory:", f"mysql://u@localhost/{tmp_path.name}"):
        with pytest.raises(SpecError):
            Store(url)


CHILD = """
import sys, time
from vpp.service.store import Store
store = Store(sys.argv[1])
record, created = store.enroll_asset("demo", "changping", "bess-durable", "battery", "bus 5", {"e_kwh": 120.0})
print("acked", record.asset_id, flush=True)
time.sleep(60)
"""


def test_an_acknowledged_enroll_survives_sigkill(tmp_path):
    """A write acknowledged by a process killed right after is there on reopening.

    This shows the commit happens before the method returns (nothing is held back in the
    process); surviving a power cut also relies on synchronous=FULL, checked above.
    """
    url = sqlite_url(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO, env=env)
    try:
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)  # right after the acknowledgement: no clean shutdown
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        stderr = child.stderr.read()
        child.stderr.close()
    assert line.startswith("acked "), stderr
    assert child.returncode == -signal.SIGKILL
    asset_id = line.split()[1]
    with Store(url) as store:
        record = store.get_asset(asset_id)
        assert (record.external_id, record.state, record.spec) == ("bess-durable", "active", {"e_kwh": 120.0})
        assert [a.asset_id for a in store.list_assets()[0]] == [asset_id]
