"""The service end to end over a real gRPC channel on loopback."""

from __future__ import annotations

import math
import threading
import tomllib
import urllib.request
from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from vpp.client import Client, timestamp
from vpp.service.config import load_config
from vpp.service.server import Service
from vpp.v1 import assets_pb2, common_pb2, dispatch_pb2, grid_operator_pb2, telemetry_pb2

START = datetime(2025, 1, 15, 8, 0, tzinfo=timezone(timedelta(hours=8)))
BATTERY = {"e_kwh": 120.0, "p_charge_max_kw": 60.0, "p_discharge_max_kw": 60.0}


def make_service(data_dir, **clock) -> Service:
    config = load_config(None, environ={}, data_dir=str(data_dir), grpc_address="127.0.0.1:0", metrics_port=0,
                         clock={"mode": "simulated", "start": START.isoformat(), "speed": 600.0, **clock})
    return Service(config).start(run_loop=False)


def tokens(service) -> dict[str, str]:
    data = tomllib.loads(service.tokens_path.read_text())
    return {name: entry["token"] for name, entry in data.items()}


@pytest.fixture(scope="module")
def clients(service):
    t = tokens(service)
    address = f"127.0.0.1:{service.port}"
    other = "other-tenant-token-" + "x" * 20
    service.store.add_token("other", "aggregator", other, name="other")
    made = {"aggregator": Client(address, t["aggregator"]), "operator": Client(address, t["operator"]),
            "other": Client(address, other), "nobody": Client(address, "not-a-token")}
    yield made
    for c in made.values():
        c.close()


def bus_of(service) -> str:
    return service.sites["changping"].template.grid.bus_names[5]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def test_health_and_reflection(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vpp.v1.Dispatch"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"vpp.v1.AssetRegistry", "vpp.v1.Telemetry", "vpp.v1.Dispatch", "vpp.v1.GridOperator"} <= names
    channel.close()


def test_enroll_is_idempotent_and_conflicts_are_refused(service, clients):
    agg = clients["aggregator"]
    first = agg.enroll("changping", "bess-new", "battery", bus_of(service), BATTERY)
    again = agg.enroll("changping", "bess-new", "battery", bus_of(service), BATTERY)
    assert first.asset_id == again.asset_id and first.state == common_pb2.ASSET_STATE_ACTIVE
    code, _ = code_of(lambda: agg.enroll("changping", "bess-new", "battery", bus_of(service), {**BATTERY, "e_kwh": 99}))
    assert code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("change, code, field", [
    (dict(kind=0), grpc.StatusCode.INVALID_ARGUMENT, "kind"),
    (dict(spec={**BATTERY, "e_kwh": -5}), grpc.StatusCode.INVALID_ARGUMENT, "spec.e_kwh"),
    (dict(spec={**BATTERY, "colour": "red"}), grpc.StatusCode.INVALID_ARGUMENT, "spec.colour"),
    (dict(bus="no such bus"), grpc.StatusCode.INVALID_ARGUMENT, "bus"),
    (dict(site_id="atlantis"), grpc.StatusCode.NOT_FOUND, "atlantis"),
    (dict(external_id=""), grpc.StatusCode.INVALID_ARGUMENT, "external_id"),
])
def test_malformed_enrollments_get_the_right_code_and_store_nothing(service, clients, change, code, field):
    agg = clients["aggregator"]
    before = len(agg.list_assets())
    request = dict(site_id="changping", external_id="bad-one", kind=common_pb2.ASSET_KIND_BATTERY, bus=bus_of(service),
                   spec=BATTERY)
    request.update(change)
    spec = struct_pb2.Struct()
    spec.update(request.pop("spec"))
    got, details = code_of(lambda: agg.assets.EnrollAsset(assets_pb2.EnrollAssetRequest(spec=spec, **request),
                                                          metadata=agg.metadata))
    assert got == code and field in details
    assert len(agg.list_assets()) == before


def test_tokens_are_required_and_checked(clients):
    nobody = clients["nobody"]
    assert code_of(lambda: nobody.list_assets())[0] == grpc.StatusCode.UNAUTHENTICATED
    anonymous = assets_pb2_grpc_stub(clients)
    assert code_of(lambda: anonymous.ListAssets(assets_pb2.ListAssetsRequest()))[0] == grpc.StatusCode.UNAUTHENTICATED


def assets_pb2_grpc_stub(clients):
    from vpp.v1 import assets_pb2_grpc

    return assets_pb2_grpc.AssetRegistryStub(clients["nobody"].channel)


def test_tenants_are_isolated(service, clients):
    agg, other = clients["aggregator"], clients["other"]
    mine = agg.enroll("changping", "bess-iso", "battery", bus_of(service), BATTERY)
    theirs = other.enroll("changping", "bess-iso", "battery", bus_of(service), BATTERY)  # same external id, own tenant
    assert theirs.asset_id != mine.asset_id
    assert mine.asset_id not in {a.asset_id for a in other.list_assets()}
    denied = grpc.StatusCode.PERMISSION_DENIED
    calls = [
        lambda: other.assets.GetAsset(assets_pb2.GetAssetRequest(asset_id=mine.asset_id), metadata=other.metadata),
        lambda: other.assets.UpdateAsset(assets_pb2.UpdateAssetRequest(asset_id=mine.asset_id), metadata=other.metadata),
        lambda: other.assets.DecommissionAsset(assets_pb2.DecommissionAssetRequest(asset_id=mine.asset_id),
                                               metadata=other.metadata),
        lambda: other.report(mine.asset_id, START, 0.0, soc_frac=0.5),
        lambda: other.setpoint(mine.asset_id),
        lambda: other.flex_request("changping", START, START + timedelta(hours=1), max_import_kw=100),
        lambda: other.cycles("changping"),
    ]
    for call in calls:
        assert code_of(call)[0] == denied
    # A device token reads only its own asset.
    device = "device-token-" + "y" * 24
    service.store.add_token("demo", "device", device, asset_id=mine.asset_id)
    with Client(f"127.0.0.1:{service.port}", device) as dev:
        dev.report(mine.asset_id, START, 0.0, soc_frac=0.4)
        assert code_of(lambda: dev.report(theirs.asset_id, START, 0.0))[0] == denied
        assert code_of(lambda: dev.list_assets())[0] == denied


def test_bad_telemetry_is_refused_and_loses_nothing(service, clients):
    agg = clients["aggregator"]
    a = agg.enroll("changping", "bess-tel", "battery", bus_of(service), BATTERY)
    agg.report(a.asset_id, START, 5.0, soc_frac=0.6)
    assert code_of(lambda: agg.report(a.asset_id, START, math.nan))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: agg.report(a.asset_id, START, 1.0, soc_frac=1.5))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: agg.report("no-such-asset", START, 1.0))[0] == grpc.StatusCode.NOT_FOUND
    when, values = service.store.latest_telemetry([a.asset_id])[a.asset_id]
    assert values["soc_frac"] == 0.6 and values["p_kw"] == 5.0
    # A stream keeps the good measurements and reports the bad ones.
    good = telemetry_pb2.Measurement(asset_id=a.asset_id, time=timestamp(START + timedelta(minutes=5)), p_kw=1.0,
                                     soc_frac=0.55)
    bad = telemetry_pb2.Measurement(asset_id=a.asset_id, time=timestamp(START), p_kw=math.inf)
    summary = agg.telemetry.StreamTelemetry(iter([good, bad]), metadata=agg.metadata)
    assert summary.accepted == 1 and summary.rejected == 1 and "p_kw" in summary.errors[0]


def test_cycles_on_the_simulated_clock_publish_setpoints_within_limits(service, clients):
    agg, op = clients["aggregator"], clients["operator"]
    a = agg.enroll("changping", "bess-watch", "battery", bus_of(service), BATTERY)
    agg.report(a.asset_id, START, 0.0, soc_frac=0.5)
    batches = []
    stream = agg.watch("changping")

    def read():
        for batch in stream:
            batches.append(batch)
            if len(batches) == 2:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    import time

    time.sleep(0.5)  # the stream is open before the cycles run
    stop = threading.Event()
    loop = threading.Thread(target=service.engine.run, args=(stop, service.engine.cycles_run + 2), daemon=True)
    loop.start()
    loop.join(timeout=120)
    reader.join(timeout=30)
    stream.cancel()
    assert len(batches) == 2
    first, second = batches
    step = timedelta(minutes=15)
    # Cycles fall on quarter hours; one that overruns skips the boundaries it missed.
    gap = second.cycle_start.ToDatetime() - first.cycle_start.ToDatetime()
    assert gap >= step and gap % step == timedelta(0)
    assert first.cycle_start.seconds % 900 == 0
    mine = {s.asset_id: s for s in first.setpoints}
    assert a.asset_id in mine
    # An aggregator sees only its own tenant's setpoints.
    own = {x.asset_id for x in agg.list_assets()}
    assert set(mine) <= own
    s = mine[a.asset_id]
    assert s.valid_until.ToDatetime() > s.valid_from.ToDatetime() + step - timedelta(seconds=1)
    assert -BATTERY["p_charge_max_kw"] - 1e-6 <= s.p_kw <= BATTERY["p_discharge_max_kw"] + 1e-6
    plan = op.plan("changping")
    assert plan.status == common_pb2.CYCLE_OUTCOME_OPTIMAL
    assert max(g.max_loading_percent for g in plan.grid_steps) <= 100.0 + 1e-6
    assert all(g.violations == 0 for g in plan.grid_steps)
    status = op.cycles("changping", 2)
    assert len(status) == 2 and status[0].solve_seconds > 0


def test_flex_request_lowers_import_in_its_window(service, clients):
    op = clients["operator"]
    engine = service.engine
    when = datetime(2025, 1, 15, 18, 0, tzinfo=timezone.utc)  # 02:00 local: valley, batteries charge
    engine.run_cycle(when)
    before = op.plan("changping")
    window = [g for g in before.grid_steps if when + timedelta(hours=1) <= g.time.ToDatetime().replace(
        tzinfo=timezone.utc) < when + timedelta(hours=3)]
    planned = max(g.p_import_kw for g in window)
    target = planned - 30.0
    op.flex_request("changping", when + timedelta(hours=1), when + timedelta(hours=3), max_import_kw=target,
                    price_cny_per_kwh=1000.0)
    engine.run_cycle(when + timedelta(minutes=15))
    after = op.plan("changping")
    window = [g for g in after.grid_steps if when + timedelta(hours=1) <= g.time.ToDatetime().replace(
        tzinfo=timezone.utc) < when + timedelta(hours=3)]
    assert max(g.p_import_kw for g in window) <= target + 1.0


def test_failed_solve_publishes_fallback_and_counts_it(service, clients, monkeypatch):
    import cvxpy as cp

    site = service.sites["changping"]
    when = datetime(2025, 1, 16, 2, 0, tzinfo=timezone.utc)
    service.engine.run_cycle(when)  # build the site's dispatcher for the current assets

    def broken(*args, **kwargs):
        raise cp.error.SolverError("injected")

    monkeypatch.setattr(site.dispatcher.problem.problem, "solve", broken)
    counter = service.metrics.cycles.labels("changping", "fallback")
    before = counter._value.get()
    outcome = service.engine.run_cycle(when + timedelta(minutes=15))[0]
    assert outcome.status == "fallback" and "injected" in outcome.reason
    assert all(s.fallback for s in outcome.setpoints)
    assert counter._value.get() == before + 1
    sp = clients["operator"].setpoint(outcome.setpoints[0].asset_id)
    assert sp.fallback


def test_metrics_are_exposed(tmp_path):
    config = load_config(None, environ={}, data_dir=str(tmp_path), grpc_address="127.0.0.1:0", metrics_port=19108)
    s = Service(config).start(run_loop=False)
    try:
        s.engine.run_cycle(datetime(2025, 1, 15, 1, 0, tzinfo=timezone.utc))
        body = urllib.request.urlopen("http://127.0.0.1:19108/metrics", timeout=10).read().decode()
    finally:
        s.stop()
    for name in ("vpp_cycle_duration_seconds_bucket", "vpp_cycles_total", "vpp_assets", "vpp_portfolio_power_watts",
                 "vpp_stale_telemetry_assets", "vpp_grid_violations_remaining"):
        assert name in body, name


def test_restart_keeps_enrollments_tokens_and_cycles(tmp_path):
    first = make_service(tmp_path)
    t = tokens(first)
    with Client(f"127.0.0.1:{first.port}", t["aggregator"]) as agg:
        a = agg.enroll("changping", "bess-restart", "battery", bus_of(first), BATTERY)
    first.engine.run_cycle(datetime(2025, 1, 15, 1, 0, tzinfo=timezone.utc))
    first.stop()
    second = make_service(tmp_path)
    try:
        assert tokens(second) == t
        with Client(f"127.0.0.1:{second.port}", t["aggregator"]) as agg:
            assert agg.assets.GetAsset(assets_pb2.GetAssetRequest(asset_id=a.asset_id),
                                       metadata=agg.metadata).external_id == "bess-restart"
            assert agg.setpoint(a.asset_id).asset_id == a.asset_id
        with Client(f"127.0.0.1:{second.port}", t["operator"]) as op:
            assert len(op.cycles("changping")) == 1
    finally:
        second.stop()


def test_restart_keeps_state_on_postgresql(tmp_path, postgres_url):
    config = load_config(None, environ={}, data_dir=str(tmp_path), database_url=postgres_url,
                         grpc_address="127.0.0.1:0", metrics_port=0,
                         clock={"mode": "simulated", "start": START.isoformat(), "speed": 600.0})
    first = Service(config).start(run_loop=False)
    t = tokens(first)
    with Client(f"127.0.0.1:{first.port}", t["aggregator"]) as agg:
        a = agg.enroll("changping", "bess-pg", "battery", bus_of(first), BATTERY)
        agg.report(a.asset_id, START, 3.0, soc_frac=0.7)
    first.engine.run_cycle(datetime(2025, 1, 15, 1, 0, tzinfo=timezone.utc))
    first.stop()
    second = Service(config).start(run_loop=False)
    try:
        with Client(f"127.0.0.1:{second.port}", t["aggregator"]) as agg:
            assert agg.setpoint(a.asset_id).asset_id == a.asset_id
            assert a.asset_id in {x.asset_id for x in agg.list_assets()}
        assert second.store.latest_telemetry([a.asset_id])[a.asset_id][1]["soc_frac"] == 0.7
    finally:
        second.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(data_dir, port):
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "VPP_METRICS_PORT": "0", "VPP_CLOCK_MODE": "simulated"}
    proc = subprocess.Popen([sys.executable, "-m", "vpp.cli", "serve", "--data-dir", str(data_dir), "--address",
                             f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "vpp serving on" in line:
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the server did not start")


def test_kill_9_loses_no_acknowledged_enrollment(tmp_path):
    import os
    import signal

    port = _free_port()
    proc = _start_server(tmp_path, port)
    token = tomllib.loads((tmp_path / "tokens.toml").read_text())["aggregator"]["token"]
    acked = []
    try:
        with Client(f"127.0.0.1:{port}", token) as agg:
            bus = agg.list_assets()[0].bus
            for k in range(20):
                acked.append(agg.enroll("changping", f"bess-k{k}", "battery", bus, BATTERY).asset_id)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    proc = _start_server(tmp_path, port)
    try:
        with Client(f"127.0.0.1:{port}", token) as agg:
            stored = {a.asset_id for a in agg.list_assets()}
        assert set(acked) <= stored
    finally:
        proc.terminate()
        # A graceful stop may take up to 2 s for RPCs in flight and 30 s for a dispatch
        # cycle under way (Service.stop): wait past that bound, not at it.
        proc.wait(timeout=60)


def test_mutual_tls_example_works(tmp_path):
    """docs/make-certs.sh and docs/service-tls.toml, as the README describes them."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "site"
    (work / "docs").mkdir(parents=True)
    shutil.copy(root / "docs" / "service-tls.toml", work / "docs" / "service-tls.toml")
    subprocess.run(["sh", str(root / "docs" / "make-certs.sh"), str(work / "certs")], check=True, capture_output=True)
    config = load_config(work / "docs" / "service-tls.toml", environ={}, grpc_address="127.0.0.1:0", metrics_port=0)
    service = Service(config).start(run_loop=False)
    certs = work / "certs"
    token = tokens(service)["aggregator"]
    address = f"localhost:{service.port}"
    try:
        with Client(address, token, root_certificates=(certs / "ca.pem").read_bytes(),
                    private_key=(certs / "client.key").read_bytes(),
                    certificate_chain=(certs / "client.pem").read_bytes()) as c:
            assert len(c.list_assets()) == 12
        with Client(address, token, root_certificates=(certs / "ca.pem").read_bytes(), timeout_s=5) as c:
            with pytest.raises(grpc.RpcError) as error:
                c.list_assets()  # no client certificate: the handshake fails
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        with Client(address, token, timeout_s=5) as c:
            with pytest.raises(grpc.RpcError):
                c.list_assets()  # plaintext against a TLS port
    finally:
        service.stop()


def test_stale_telemetry_is_flagged_and_planned_conservatively(service, clients):
    agg = clients["aggregator"]
    a = agg.enroll("changping", "bess-stale", "battery", bus_of(service), BATTERY)
    when = datetime(2025, 1, 17, 10, 0, tzinfo=timezone.utc)  # 18:00 local: peak prices, batteries discharge
    agg.report(a.asset_id, when - timedelta(hours=3), 0.0, soc_frac=0.9)  # older than the 30 min allowed
    outcome = service.engine.run_cycle(when)[0]
    assert a.asset_id in outcome.stale_assets
    assert service.metrics.stale_telemetry.labels("changping")._value.get() == len(outcome.stale_assets)
    # A stale battery is taken to be at the bottom of its window: it is not asked to discharge.
    mine = next(s for s in outcome.setpoints if s.asset_id == a.asset_id)
    assert mine.p_kw <= 1e-6
    # Fresh telemetry at 90 % lets the same battery discharge into the evening peak.
    agg.report(a.asset_id, when + timedelta(minutes=14), 0.0, soc_frac=0.9)
    outcome = service.engine.run_cycle(when + timedelta(minutes=15))[0]
    assert a.asset_id not in outcome.stale_assets
    assert next(s for s in outcome.setpoints if s.asset_id == a.asset_id).p_kw > 1.0


def test_setpoints_stay_within_enrolled_ratings_whatever_the_plan_says(service, clients, monkeypatch):
    """Hostile optimizer output (far beyond ratings, NaN) never reaches a device."""
    agg = clients["aggregator"]
    a = agg.enroll("changping", "bess-bounded", "battery", bus_of(service), BATTERY)
    b = agg.enroll("changping", "bess-bounded-2", "battery", bus_of(service), BATTERY)
    site = service.sites["changping"]
    when = datetime(2025, 1, 18, 2, 0, tzinfo=timezone.utc)
    service.engine.run_cycle(when)  # the site's dispatcher now knows both batteries
    real = site.dispatcher.dispatch

    def hostile(inputs, state):
        result = real(inputs, state)
        result.p_kw.loc[result.p_kw.index[0], a.asset_id] = 1e6
        result.p_kw.loc[result.p_kw.index[0], b.asset_id] = float("nan")
        return result

    monkeypatch.setattr(site.dispatcher, "dispatch", hostile)
    outcome = service.engine.run_cycle(when + timedelta(minutes=15))[0]
    sent = {s.asset_id: s.p_kw for s in outcome.setpoints}
    assert sent[a.asset_id] == BATTERY["p_discharge_max_kw"]
    assert sent[b.asset_id] == 0.0
    assert clients["operator"].setpoint(a.asset_id).p_kw == BATTERY["p_discharge_max_kw"]
    park = site.park
    for fleet in park.fleets.values():
        lo, hi, _ = fleet.power_range()
        for k, asset_id in enumerate(fleet.ids):
            assert lo[k] - 1e-9 <= sent[asset_id] <= hi[k] + 1e-9


def test_read_only_storage_answers_unavailable_and_keeps_reads(tmp_path):
    from sqlalchemy import event

    s = make_service(tmp_path)
    try:
        t = tokens(s)
        with Client(f"127.0.0.1:{s.port}", t["aggregator"]) as agg:
            before = {a.asset_id for a in agg.list_assets()}

            @event.listens_for(s.store.engine, "connect")
            def _read_only(connection, _record):
                connection.execute("PRAGMA query_only=ON")

            s.store.engine.dispose()  # new connections: read-only from here on
            code, details = code_of(lambda: agg.enroll("changping", "bess-ro", "battery", bus_of(s), BATTERY))
            assert code == grpc.StatusCode.UNAVAILABLE and "storage" in details
            assert {a.asset_id for a in agg.list_assets()} == before  # reads go on, nothing lost
    finally:
        s.stop()


def test_fuzzed_telemetry_gets_a_defined_code_and_stores_only_finite_values(service, clients):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    agg = clients["aggregator"]
    a = agg.enroll("changping", "bess-fuzz", "battery", bus_of(service), BATTERY)
    numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -1.0]))
    allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}
    tried = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(asset=st.sampled_from([a.asset_id, "", "no-such", "x" * 300]), p=numbers, q=numbers,
           soc=st.none() | numbers, e=st.none() | numbers, seconds=st.integers(-2**40, 2**40))
    def one(asset, p, q, soc, e, seconds):
        m = telemetry_pb2.Measurement(asset_id=asset, p_kw=p, q_kvar=q)
        m.time.seconds = seconds
        if soc is not None:
            m.soc_frac = soc
        if e is not None:
            m.e_kwh = e
        tried.append(1)
        try:
            agg.telemetry.ReportTelemetry(m, metadata=agg.metadata, timeout=10)
        except grpc.RpcError as error:
            assert error.code() in allowed, (error.code(), error.details())

    one()
    assert len(tried) >= 100
    latest = service.store.latest_telemetry([a.asset_id]).get(a.asset_id)
    if latest is not None:
        assert all(math.isfinite(v) for v in latest[1].values() if isinstance(v, float))
