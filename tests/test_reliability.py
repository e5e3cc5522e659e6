"""Faults the service must survive, each injected on purpose.

What is tried here, in the small (the full campaigns and their figures:
``bench/fault_campaign.py`` and ``docs/reliability.md``):

- ``kill -9`` of a real ``vpp serve`` at random moments under concurrent enrollments and
  telemetry, restarted on the same data: every acknowledged write is still there;
- ``kill -9`` in the middle of a dispatch cycle (while solving, and inside the transaction
  that stores the cycle): after a restart the next cycle runs and no reader ever sees a
  half-written plan;
- a solver that hangs or fails: the cycle ends at its budget, fallbacks go out, the metric
  counts it, the next cycle is normal;
- telemetry that arrives late, out of order, duplicated, dated in the future or
  physically impossible;
- a full disk under SQLite: writes answer UNAVAILABLE, reads go on, nothing stored is lost,
  and writes work again once there is room;
- the demand charge's peak so far, and ramp limits on published setpoints.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pandas as pd
import pytest
from sqlalchemy import event, func, select

from test_service import BATTERY, START, _free_port, _start_server, bus_of, code_of, make_service, tokens
from vpp.client import Client
from vpp.service.store import CycleRow, SetpointRecord, SetpointRow, Store, TelemetryRow
from vpp.v1 import common_pb2

REPO = Path(__file__).resolve().parents[1]
UTC = timezone.utc


def load_campaign():
    """bench/fault_campaign.py as a module (bench/ is not a package)."""
    if "fault_campaign" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fault_campaign", REPO / "bench" / "fault_campaign.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fault_campaign"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["fault_campaign"]


# --- the demand charge's peak so far ------------------------------------------------------------


def _plan(cycle_start: datetime, first_import_kw: float) -> dict:
    return {"cycle_start": cycle_start.isoformat(), "grid": {"p_import_kw": [first_import_kw, 1.0, 1.0]}}


def test_peak_so_far_is_the_months_running_maximum_seeded_from_stored_cycles(tmp_path):
    """The highest first-step import of the local month so far, not the latest plan's, and
    not another year's January; seeded again after a restart."""
    first = make_service(tmp_path)
    beijing = timezone(timedelta(hours=8))
    stored = [
        (datetime(2025, 1, 1, 1, 0, tzinfo=beijing), 400.0),    # 2024-12-31 17:00 UTC, but January locally
        (datetime(2024, 12, 31, 23, 0, tzinfo=beijing), 800.0),  # December locally: another month
        (datetime(2024, 1, 20, 12, 0, tzinfo=beijing), 900.0),   # January of another year
        (datetime(2025, 1, 10, 12, 0, tzinfo=beijing), 350.0),
        (datetime(2025, 1, 14, 12, 0, tzinfo=beijing), 200.0),   # the latest plan
    ]
    for when, import_kw in stored:
        first.store.save_cycle("changping", when, "optimal", 0.1, 0.1, 1.0, 0, 0, None, [], _plan(when, import_kw))
    # A failed cycle's plan is not a plan: it is never counted.
    failed = datetime(2025, 1, 12, 12, 0, tzinfo=beijing)
    first.store.save_cycle("changping", failed, "failed", 0.0, 0.1, None, 0, 0, "x", [], _plan(failed, 5000.0))
    first.stop()

    second = make_service(tmp_path)  # a restart: nothing in memory
    try:
        site = second.sites["changping"]
        start = pd.Timestamp("2025-01-15 08:00", tz="Asia/Shanghai")
        assert second.engine._peak_so_far(site, start) == 400.0
        # The cycle plans against that peak, then its own first-step import joins the maximum.
        when = start.tz_convert("UTC").to_pydatetime()
        outcome = second.engine.run_cycle(when)[0]
        assert outcome.status == "optimal"
        assert site.dispatcher.problem.p["peak_so_far"].value == 400.0
        planned = second.store.latest_plan("changping")[1]["grid"]["p_import_kw"][0]
        assert second.engine._peak_so_far(site, start + pd.Timedelta(minutes=15)) == max(400.0, planned)
        # February starts from nothing; the same month of another year keeps its own peak.
        assert second.engine._peak_so_far(site, pd.Timestamp("2025-02-01 00:00", tz="Asia/Shanghai")) == 0.0
        assert second.engine._peak_so_far(site, pd.Timestamp("2024-01-31 00:00", tz="Asia/Shanghai")) == 900.0
    finally:
        second.stop()


# --- ramp limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, reason", [(-1.0, "greater than 0"), (0.0, "greater than 0"),
                                           (1e7, "less than or equal"), ("fast", "valid number")])
def test_a_bad_ramp_limit_is_refused_naming_the_field(service, agg, value, reason):
    code, details = code_of(lambda: agg.enroll("changping", "bess-bad-ramp", "battery", bus_of(service),
                                               {**BATTERY, "ramp_kw_per_min": value}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "ramp_kw_per_min" in details and reason in details


@pytest.mark.parametrize("kind, spec", [("battery", BATTERY), ("pv", {"p_kwp": 50.0, "inverter_kva": 45.0})])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_ramp_limit_must_be_finite(kind, spec, value):
    from vpp.assets import parse_asset_spec
    from vpp.errors import SpecError

    with pytest.raises(SpecError) as error:
        parse_asset_spec({"id": "x", "kind": kind, "bus": 1, **spec, "ramp_kw_per_min": value}, "spec")
    assert "spec.ramp_kw_per_min" in str(error.value) and "finite" in str(error.value)


def test_setpoints_keep_to_the_ramp_limit_whatever_the_plan_says(service, agg, monkeypatch):
    """Hostile plans (far beyond the ratings in both directions, NaN) move a ramp-limited
    battery by at most its rate per minute between published setpoints."""
    from vpp.dispatch.dispatcher import Dispatcher

    ramp_kw_per_min = 2.0  # 30 kW per 15-minute step, half the battery's rating
    a = agg.enroll("changping", "bess-ramp", "battery", bus_of(service), {**BATTERY, "ramp_kw_per_min": ramp_kw_per_min})
    free = agg.enroll("changping", "bess-no-ramp", "battery", bus_of(service), BATTERY)
    when = datetime(2025, 1, 20, 2, 0, tzinfo=UTC)
    # Minutes after `when`, and what the compromised optimizer asks of both batteries.
    script = [(0, 1e6), (15, -1e6), (30, -1e6), (45, -1e6), (60, float("nan")), (60, 1e6), (75, 1e6), (90, 1e6)]
    hostile_values = iter(value for _, value in script)
    real = Dispatcher.dispatch

    def hostile(self, inputs, state):
        result = real(self, inputs, state)
        result.p_kw.loc[result.p_kw.index[0], [a.asset_id, free.asset_id]] = next(hostile_values)
        return result

    monkeypatch.setattr(Dispatcher, "dispatch", hostile)
    sent, sent_free = [], []
    for minutes, _ in script:
        outcome = service.engine.run_cycle(when + timedelta(minutes=minutes))[0]
        mine = {s.asset_id: s.p_kw for s in outcome.setpoints}
        sent.append(mine[a.asset_id])
        sent_free.append(mine[free.asset_id])
    # No earlier setpoint: the rating; then 30 kW per quarter hour down, NaN read as 0 and
    # reached within the step, no change for a re-plan of the same quarter hour, then up again.
    assert sent == [60.0, 30.0, 0.0, -30.0, 0.0, 0.0, 30.0, 60.0]
    for k in range(1, len(script)):
        minutes = script[k][0] - script[k - 1][0]
        assert abs(sent[k] - sent[k - 1]) <= ramp_kw_per_min * minutes + 1e-9
    # The battery without a ramp limit is held to its ratings only.
    assert sent_free == [60.0, -60.0, -60.0, -60.0, 0.0, 60.0, 60.0, 60.0]
    assert agg.setpoint(a.asset_id).p_kw == 60.0


# --- solver hang and failure ---------------------------------------------------------------------


def test_a_hanging_solver_ends_the_cycle_at_its_budget_and_the_next_cycle_is_normal(service, agg, monkeypatch):
    site = service.sites["changping"]
    when = datetime(2025, 1, 21, 2, 0, tzinfo=UTC)
    assert service.engine.run_cycle(when)[0].status == "optimal"
    # A budget of 1 s for the hung cycle (the dispatcher and the watchdog both read it).
    monkeypatch.setattr(site.park, "settings", site.park.settings.model_copy(update={"time_budget_s": 1.0}))
    monkeypatch.setattr(service.engine, "dispatch_grace_s", 0.5)
    release, entered, left = threading.Event(), threading.Event(), threading.Event()

    def hang(*args, **kwargs):  # ignores the time limit it is given, as a stuck solver would
        entered.set()
        release.wait(120)
        left.set()
        raise RuntimeError("released")

    hung = site.dispatcher
    monkeypatch.setattr(hung.problem.problem, "solve", hang)
    counter = service.metrics.cycles.labels("changping", "fallback")
    before = counter._value.get()
    try:
        outcome = service.engine.run_cycle(when + timedelta(minutes=15))[0]
        # The cycle came back while the solve is still stuck.
        assert entered.is_set() and not left.is_set()
        assert outcome.status == "fallback" and "time budget" in outcome.reason
        assert outcome.setpoints and all(s.fallback for s in outcome.setpoints)
        assert counter._value.get() == before + 1
        assert service.engine.abandoned_dispatches >= 1
        status = service.store.last_cycles("changping", 1)[0]
        assert status.status == "fallback" and status.cycle_start == when + timedelta(minutes=15)
        sp = agg.setpoint(outcome.setpoints[-1].asset_id)
        assert sp.fallback
        # Batteries idle, PV uncurtailed: each asset's own fallback, within its ratings.
        for fleet in site.park.fleets.values():
            p_min, p_max, _ = fleet.power_range()
            for k, asset_id in enumerate(fleet.ids):
                p = next(s.p_kw for s in outcome.setpoints if s.asset_id == asset_id)
                assert p_min[k] <= p <= p_max[k]
                if fleet.kind == "battery":
                    assert p == 0.0
        # The next cycle plans with a new dispatcher, while the old solve is still stuck.
        after = service.engine.run_cycle(when + timedelta(minutes=30))[0]
        assert not left.is_set()
        assert after.status == "optimal" and site.dispatcher is not hung
        assert not any(s.fallback for s in after.setpoints)
    finally:
        release.set()
    assert left.wait(30)


def test_a_failing_solver_publishes_fallbacks_and_the_next_cycle_is_normal(service, monkeypatch):
    import cvxpy as cp

    site = service.sites["changping"]
    when = datetime(2025, 1, 22, 2, 0, tzinfo=UTC)
    service.engine.run_cycle(when)

    def broken(*args, **kwargs):
        raise cp.error.SolverError("injected failure")

    failed = service.metrics.cycles.labels("changping", "fallback")
    optimal = service.metrics.cycles.labels("changping", "optimal")
    before_failed, before_optimal = failed._value.get(), optimal._value.get()
    with monkeypatch.context() as patch:
        patch.setattr(site.dispatcher.problem.problem, "solve", broken)
        outcome = service.engine.run_cycle(when + timedelta(minutes=15))[0]
    assert outcome.status == "fallback" and "injected failure" in outcome.reason
    assert all(s.fallback for s in outcome.setpoints)
    assert failed._value.get() == before_failed + 1
    outcome = service.engine.run_cycle(when + timedelta(minutes=30))[0]
    assert outcome.status == "optimal" and not any(s.fallback for s in outcome.setpoints)
    assert optimal._value.get() == before_optimal + 1


# --- telemetry that is late, out of order, duplicated, from the future or impossible -------------


def _history(store: Store, asset_id: str) -> list[tuple[datetime, dict]]:
    with store._read() as s:
        rows = s.scalars(select(TelemetryRow).where(TelemetryRow.asset_id == asset_id).order_by(TelemetryRow.id))
        return [(r.time, dict(r.values)) for r in rows]


def test_out_of_order_and_duplicated_telemetry_never_replace_the_latest(service, agg):
    a = agg.enroll("changping", "bess-order", "battery", bus_of(service), BATTERY)
    t = datetime(2025, 1, 23, 9, 0, tzinfo=UTC)
    agg.report(a.asset_id, t, 5.0, soc_frac=0.8)
    agg.report(a.asset_id, t - timedelta(minutes=10), 1.0, soc_frac=0.2)  # arrives late, older: kept as history
    agg.report(a.asset_id, t, 5.0, soc_frac=0.8)                          # the same measurement again
    latest_time, latest = service.store.latest_telemetry([a.asset_id])[a.asset_id]
    assert latest_time == t and latest["soc_frac"] == 0.8
    assert [h[0] for h in _history(service.store, a.asset_id)] == [t, t - timedelta(minutes=10), t]
    # The cycle plans from the newest measurement: at 80 % it may discharge into the evening peak.
    outcome = service.engine.run_cycle(t + timedelta(minutes=15))[0]
    assert a.asset_id not in outcome.stale_assets


def test_telemetry_that_stopped_or_is_dated_ahead_is_stale_and_planned_conservatively(service, agg):
    when = datetime(2025, 1, 24, 10, 0, tzinfo=UTC)  # 18:00 local, peak prices: batteries would discharge
    stopped = agg.enroll("changping", "bess-stopped", "battery", bus_of(service), BATTERY)
    ahead = agg.enroll("changping", "bess-ahead", "battery", bus_of(service), BATTERY)
    agg.report(stopped.asset_id, when - timedelta(minutes=31), 0.0, soc_frac=0.9)  # just past the 30 min allowed
    agg.report(ahead.asset_id, when + timedelta(hours=6), 0.0, soc_frac=0.9)     # a device clock 6 h fast
    outcome = service.engine.run_cycle(when)[0]
    assert {stopped.asset_id, ahead.asset_id} <= set(outcome.stale_assets)
    sent = {s.asset_id: s.p_kw for s in outcome.setpoints}
    assert sent[stopped.asset_id] <= 1e-6 and sent[ahead.asset_id] <= 1e-6  # not asked to discharge


def test_physically_impossible_telemetry_is_refused_or_planned_as_stale(service, agg):
    when = datetime(2025, 1, 25, 10, 0, tzinfo=UTC)
    a = agg.enroll("changping", "bess-impossible", "battery", bus_of(service), BATTERY)
    # What the API refuses outright: NaN, infinities, negative energy, SoC above 1.
    for values in ({"e_kwh": -1.0}, {"soc_frac": 1.01}, {"e_kwh": float("inf")}, {"soc_frac": float("nan")}):
        code, details = code_of(lambda: agg.report(a.asset_id, when, 0.0, **values))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and next(iter(values)) in details
    # What only the asset's spec shows to be impossible: 10 times the nameplate energy.
    agg.report(a.asset_id, when - timedelta(minutes=1), 0.0, e_kwh=10 * BATTERY["e_kwh"])
    outcome = service.engine.run_cycle(when)[0]
    assert a.asset_id in outcome.stale_assets
    mine = next(s for s in outcome.setpoints if s.asset_id == a.asset_id)
    assert mine.p_kw <= 1e-6  # planned from the bottom of its window, as if it had not reported
    plan = service.store.latest_plan("changping")[1]
    assert max(plan["grid"]["max_loading_percent"]) <= 100.0 + 1e-6
    assert sum(plan["grid"]["violations"]) == 0


# --- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_answers_unavailable_keeps_reads_and_recovers(tmp_path):
    """SQLite's ``max_page_count`` caps the database file where it stands: the next write
    that needs a page fails with SQLITE_FULL, the error SQLite gives on a full disk."""
    s = make_service(tmp_path)
    cap = {"pages": None}

    @event.listens_for(s.store.engine, "connect")
    def _cap(connection, _record):
        if cap["pages"] is not None:
            connection.execute(f"PRAGMA max_page_count={cap['pages']}")

    try:
        t = tokens(s)
        address = f"127.0.0.1:{s.port}"
        with Client(address, t["aggregator"]) as agg, Client(address, t["operator"]) as op:
            a = agg.enroll("changping", "bess-before-full", "battery", bus_of(s), BATTERY)
            agg.report(a.asset_id, START, 1.0, soc_frac=0.5)
            when = datetime(2025, 1, 15, 2, 0, tzinfo=UTC)
            assert s.engine.run_cycle(when)[0].status == "optimal"
            before_assets = {x.asset_id for x in agg.list_assets()}
            before_setpoint = agg.setpoint(a.asset_id)
            with s.store.engine.connect() as connection:
                cap["pages"] = connection.exec_driver_sql("PRAGMA page_count").scalar_one()
            s.store.engine.dispose()  # every new connection is capped from here on

            # Writes go on while the last pages have room, then fail with UNAVAILABLE; a refused
            # write leaves nothing behind.
            enrolled, refused = [], None
            for k in range(500):
                try:
                    enrolled.append(agg.enroll("changping", f"bess-fill-{k}", "battery", bus_of(s), BATTERY).asset_id)
                except grpc.RpcError as error:
                    refused = error
                    break
            assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "storage" in refused.details()
            acked = 0
            for k in range(500):
                try:
                    agg.report(a.asset_id, START + timedelta(seconds=k + 1), 2.0, soc_frac=0.5)
                    acked += 1
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    break
            else:
                pytest.fail("500 measurements fitted into a full database")
            # A cycle cannot be stored: it fails, is counted, and the loop goes on.
            failed = s.metrics.cycles.labels("changping", "failed")
            before_failed = failed._value.get()
            assert s.engine.run_cycle(when + timedelta(minutes=15))[0].status == "failed"
            assert failed._value.get() == before_failed + 1
            # Reads go on and show everything stored before.
            assert {x.asset_id for x in agg.list_assets()} == before_assets | set(enrolled)
            assert agg.setpoint(a.asset_id) == before_setpoint
            assert op.plan("changping").status == common_pb2.CYCLE_OUTCOME_OPTIMAL
            assert len(_history(s.store, a.asset_id)) == 1 + acked
            print(f"disk full: {len(enrolled)} enrollments and {acked} measurements acknowledged into the last "
                  f"free space, then UNAVAILABLE; stored before and kept: {len(before_assets)} assets")

            cap["pages"] = None  # room again
            s.store.engine.dispose()
            b = agg.enroll("changping", "bess-after-full", "battery", bus_of(s), BATTERY)
            agg.report(b.asset_id, START, 0.0, soc_frac=0.5)
            assert s.engine.run_cycle(when + timedelta(minutes=30))[0].status == "optimal"
            assert {x.asset_id for x in agg.list_assets()} == before_assets | set(enrolled) | {b.asset_id}
    finally:
        s.stop()


# --- kill -9 under a stream of writes ------------------------------------------------------------


def _check_campaign(figures: dict) -> None:
    # The campaign did write (a run without acknowledged writes would prove nothing) ...
    assert figures["enrollments"] > 0 and figures["measurements"] > 0, figures
    # ... and every acknowledged write is there, and no stored cycle is incomplete.
    assert figures["missing"] == 0, figures
    assert figures["cycles_incomplete"] == 0, figures


def test_kill_9_under_concurrent_writes_loses_no_acknowledged_write(tmp_path):
    """The campaign of bench/fault_campaign.py in the small: 3 kills, 3 clients."""
    figures = load_campaign().run_campaign(tmp_path, kills=3, workers=3, seed=7, min_alive_s=0.5, max_alive_s=2.0,
                                           log=lambda _: None)
    _check_campaign(figures)
    assert figures["kills"] == 3


def test_kill_9_under_concurrent_writes_on_postgresql(tmp_path, postgres_url):
    figures = load_campaign().run_campaign(tmp_path, kills=2, workers=3, seed=8, min_alive_s=0.5, max_alive_s=2.0,
                                           database_url=postgres_url, log=lambda _: None)
    _check_campaign(figures)


@pytest.mark.skipif(os.environ.get("VPP_FULL_FAULT_CAMPAIGN") != "1",
                    reason="the full kill -9 campaign (20 kills, minutes) runs on demand: VPP_FULL_FAULT_CAMPAIGN=1")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_full_kill_9_campaign(tmp_path, request, backend, capsys):
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    figures = load_campaign().run_campaign(tmp_path, kills=20, workers=4, seed=0, database_url=url)
    with capsys.disabled():
        print(f"\n{backend}: {figures}")
    _check_campaign(figures)
    assert figures["acknowledged"] >= 1000


# --- kill -9 in the middle of a dispatch cycle ---------------------------------------------------

# `vpp serve` with one thing changed: the second dispatch cycle stops at a known point,
# says so on stdout and waits there to be killed.
MID_CYCLE_CHILD = r"""
import sys, threading
from sqlalchemy import event
from vpp import cli
from vpp.dispatch.dispatcher import Dispatcher
from vpp.service.store import SetpointRow, Store

point, data_dir, address = sys.argv[1:4]
calls = {"dispatch": 0, "save": 0}

def block(where):
    print(f"blocked in {where}", flush=True)
    threading.Event().wait()

real_dispatch = Dispatcher.dispatch
def dispatch(self, inputs, state):
    calls["dispatch"] += 1
    if point == "solve" and calls["dispatch"] == 2:
        block("the solve of the second cycle")
    return real_dispatch(self, inputs, state)
Dispatcher.dispatch = dispatch

real_save = Store.save_cycle
def save_cycle(self, *args, **kwargs):
    calls["save"] += 1
    return real_save(self, *args, **kwargs)
Store.save_cycle = save_cycle

@event.listens_for(SetpointRow, "after_insert")
def inserted(mapper, connection, target):
    # The cycle's row and its first setpoints are written, the transaction is not committed.
    if point == "save" and calls["save"] == 2:
        block("the transaction that stores the second cycle")

sys.exit(cli.main(["serve", "--data-dir", data_dir, "--address", address]))
"""


def _stored_cycles(url: str) -> list[tuple[int, str, int, int]]:
    """Every stored cycle: (cycle id, status, assets in its plan, setpoints stored)."""
    with Store(url) as store, store.engine.connect() as connection:
        counts = dict(connection.execute(select(SetpointRow.cycle_id, func.count())
                                         .group_by(SetpointRow.cycle_id)).all())
        rows = connection.execute(select(CycleRow.cycle_id, CycleRow.status, CycleRow.plan).order_by(CycleRow.cycle_id))
        return [(cid, status, len((plan or {}).get("p_kw", {})), counts.get(cid, 0)) for cid, status, plan in rows]


def _complete(cycles) -> bool:
    return all(stored == (0 if status == "failed" else planned) for _, status, planned, stored in cycles)


@pytest.mark.parametrize("point, backend", [("solve", "sqlite"), ("save", "sqlite"), ("save", "postgresql")])
def test_kill_9_in_the_middle_of_a_cycle_serves_no_half_written_plan(tmp_path, request, monkeypatch, point, backend):
    url = f"sqlite:///{tmp_path / 'vpp.db'}"
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("VPP_DATABASE_URL", url)  # for both the child and the restarted server
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "VPP_METRICS_PORT": "0", "VPP_CLOCK_MODE": "simulated", "VPP_CLOCK_SPEED": "900"}
    child = subprocess.Popen([sys.executable, "-c", MID_CYCLE_CHILD, point, str(tmp_path), address], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    try:
        for line in child.stdout:
            lines.append(line)
            if line.startswith("blocked in"):
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert lines and lines[-1].startswith("blocked in"), "".join(lines[-20:])
    # On disk: the first cycle, complete; nothing of the second.
    before = _stored_cycles(url)
    assert len(before) == 1 and before[0][1] == "optimal" and _complete(before), before

    proc = _start_server(tmp_path, port)
    try:
        t = tomllib.loads((tmp_path / "tokens.toml").read_text())
        with Client(address, t["aggregator"]["token"]) as agg, Client(address, t["operator"]["token"]) as op:
            asset_ids = {a.asset_id for a in agg.list_assets("changping")}
            batches = []
            stream = agg.watch("changping")

            def watch():
                for batch in stream:
                    batches.append(batch)
                    return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            # Until the restarted server publishes, and once after: every read is a whole cycle.
            reads = 0
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                done = bool(batches)
                plan = op.plan("changping")
                assert {p.asset_id for p in plan.asset_plans} == asset_ids
                assert all(len(p.p_kw) == 96 for p in plan.asset_plans)
                starts = {agg.setpoint(a).cycle_start.ToDatetime() for a in asset_ids}
                assert len(starts) == 1  # every asset's setpoint from the same cycle
                reads += 1
                if done:
                    break
                time.sleep(0.2)
            stream.cancel()
            assert batches, "the restarted server published no cycle"
            assert {s.asset_id for s in batches[0].setpoints} == asset_ids
            assert len({s.cycle_start.ToDatetime() for s in batches[0].setpoints}) == 1
            status = op.cycles("changping", 10)
            assert len(status) >= 2 and status[0].outcome == common_pb2.CYCLE_OUTCOME_OPTIMAL
            assert reads >= 2
            print(f"killed in {point} on {backend}: {reads} whole-plan reads after the restart, none half-written")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stdout.close()
    after = _stored_cycles(url)
    assert len(after) >= 2 and _complete(after), after


def test_read_only_storage_recovers_once_writable_and_the_loop_goes_on(tmp_path):
    """tests/test_service.py checks UNAVAILABLE and reads under a read-only database; here
    the dispatch loop during it, and everything after it."""
    s = make_service(tmp_path)
    read_only = {"on": False}

    @event.listens_for(s.store.engine, "connect")
    def _read_only(connection, _record):
        if read_only["on"]:
            connection.execute("PRAGMA query_only=ON")

    try:
        t = tokens(s)
        with Client(f"127.0.0.1:{s.port}", t["aggregator"]) as agg:
            a = agg.enroll("changping", "bess-ro-before", "battery", bus_of(s), BATTERY)
            when = datetime(2025, 1, 15, 2, 0, tzinfo=UTC)
            assert s.engine.run_cycle(when)[0].status == "optimal"
            before = agg.setpoint(a.asset_id)
            read_only["on"] = True
            s.store.engine.dispose()
            code, _ = code_of(lambda: agg.report(a.asset_id, START, 1.0, soc_frac=0.5))
            assert code == grpc.StatusCode.UNAVAILABLE
            failed = s.metrics.cycles.labels("changping", "failed")
            before_failed = failed._value.get()
            assert s.engine.run_cycle(when + timedelta(minutes=15))[0].status == "failed"
            assert failed._value.get() == before_failed + 1
            assert agg.setpoint(a.asset_id) == before  # the last stored setpoint is still served
            read_only["on"] = False
            s.store.engine.dispose()
            agg.report(a.asset_id, START, 1.0, soc_frac=0.5)
            b = agg.enroll("changping", "bess-ro-after", "battery", bus_of(s), BATTERY)
            outcome = s.engine.run_cycle(when + timedelta(minutes=30))[0]
            assert outcome.status == "optimal" and b.asset_id in {x.asset_id for x in outcome.setpoints}
            assert len(s.store.last_cycles("changping", 10)) == 2  # the failed cycle could not be stored
    finally:
        s.stop()
