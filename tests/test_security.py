"""Who may call what: tokens (missing, malformed, wrong, expired, revoked), roles and
tenants on every gRPC method, and TLS client certificates.

The methods are enumerated from the service descriptors of ``vpp.v1``, so a method added
to a .proto file fails these tests until its authorisation is stated in the tables below.
"""

from __future__ import annotations

import importlib
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory

from test_service import BATTERY, START, bus_of, make_service, tokens
from vpp.client import Client, timestamp
from vpp.service import api
from vpp.service.store import Store, generate_token
from vpp.v1 import assets_pb2, common_pb2, dispatch_pb2, grid_operator_pb2, telemetry_pb2

PROTO_MODULES = ("common", "assets", "telemetry", "dispatch", "grid_operator")
ROOT = Path(__file__).resolve().parents[1]
DENIED, UNAUTHENTICATED = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


def all_methods():
    """Every RPC of every service in vpp.v1: (path, method descriptor)."""
    out = []
    for name in PROTO_MODULES:
        fd = importlib.import_module(f"vpp.v1.{name}_pb2").DESCRIPTOR
        for service in fd.services_by_name.values():
            for method in service.methods:
                out.append((f"/{service.full_name}/{method.name}", method))
    return out


METHODS = dict(all_methods())


def call(channel, path: str, request, metadata=(), timeout_s: float = 10.0):
    """Call any method with a request message (a list of them for client streams); return
    the response (the first message of a server stream)."""
    method = METHODS[path]
    response_class = message_factory.GetMessageClass(method.output_type)
    kwargs = dict(request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_class.FromString)
    if method.client_streaming:
        stub = channel.stream_unary(path, **kwargs)
        return stub(iter(request), metadata=metadata, timeout=timeout_s)
    if method.server_streaming:
        stub = channel.unary_stream(path, **kwargs)
        return next(iter(stub(request, metadata=metadata, timeout=timeout_s)))
    return channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=timeout_s)


def empty_request(path: str):
    method = METHODS[path]
    message = message_factory.GetMessageClass(method.input_type)()
    return [message] if method.client_streaming else message


def status_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        fn()
    return error.value.code()


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A running service with two tenants, an operator and a device token, and one cycle stored."""
    data = tmp_path_factory.mktemp("security")
    service = make_service(data)
    t = tokens(service)
    address = f"127.0.0.1:{service.port}"
    channel = grpc.insecure_channel(address)
    store = service.store
    _, intruder = store.issue_token("intruder", "aggregator", name="intruder")
    victim = {a.external_id: a for a in store.iter_assets(tenant="demo")}
    own = Client(address, t["aggregator"])
    a = own.enroll("changping", "sec-bess-a", "battery", bus_of(service), BATTERY)
    b = own.enroll("changping", "sec-bess-b", "battery", bus_of(service), BATTERY)
    own.close()
    _, device = store.issue_token("demo", "device", asset_id=a.asset_id, name="bess a")
    service.engine.run_cycle(datetime(2025, 1, 15, 2, 0, tzinfo=timezone.utc))  # setpoints and a plan exist
    limit = store.add_limit("changping", "connection_import", "", START, START + timedelta(hours=1), limit_kw=300)
    yield dict(service=service, channel=channel, data=data, aggregator=t["aggregator"], operator=t["operator"],
               intruder=intruder, device=device, a=a.asset_id, b=b.asset_id, victim_ids={x.asset_id for x in
                                                                                        victim.values()} | {a.asset_id, b.asset_id},
               limit_id=str(limit.limit_id), bus=bus_of(service))
    channel.close()
    service.stop()


def _measurement(asset_id):
    return telemetry_pb2.Measurement(asset_id=asset_id, time=timestamp(START), p_kw=1.0, soc_frac=0.5)


def _window():
    return common_pb2.TimeWindow(start=timestamp(START), end=timestamp(START + timedelta(hours=1)))


def requests_on(w, asset_id: str) -> dict:
    """A well-formed request for every method, aimed at ``asset_id`` where the method takes an asset."""
    return {
        "/vpp.v1.AssetRegistry/EnrollAsset": assets_pb2.EnrollAssetRequest(
            site_id="changping", external_id="sec-intruder-bess", bus=w["bus"], kind=common_pb2.ASSET_KIND_BATTERY,
            spec=_struct(BATTERY)),
        "/vpp.v1.AssetRegistry/GetAsset": assets_pb2.GetAssetRequest(asset_id=asset_id),
        "/vpp.v1.AssetRegistry/ListAssets": assets_pb2.ListAssetsRequest(include_decommissioned=True),
        "/vpp.v1.AssetRegistry/UpdateAsset": assets_pb2.UpdateAssetRequest(asset_id=asset_id,
                                                                           spec=_struct({**BATTERY, "e_kwh": 1.0})),
        "/vpp.v1.AssetRegistry/DecommissionAsset": assets_pb2.DecommissionAssetRequest(asset_id=asset_id),
        "/vpp.v1.Telemetry/ReportTelemetry": _measurement(asset_id),
        "/vpp.v1.Telemetry/StreamTelemetry": [_measurement(asset_id)],
        "/vpp.v1.Dispatch/GetSetpoint": dispatch_pb2.GetSetpointRequest(asset_id=asset_id),
        "/vpp.v1.Dispatch/WatchSetpoints": dispatch_pb2.WatchSetpointsRequest(site_id="changping"),
        "/vpp.v1.Dispatch/GetPlan": dispatch_pb2.GetPlanRequest(site_id="changping"),
        "/vpp.v1.GridOperator/SetLimit": grid_operator_pb2.SetLimitRequest(
            site_id="changping", element=grid_operator_pb2.GRID_ELEMENT_CONNECTION_IMPORT, limit_kw=1.0,
            window=_window()),
        "/vpp.v1.GridOperator/LiftLimit": grid_operator_pb2.LiftLimitRequest(limit_id=w["limit_id"]),
        "/vpp.v1.GridOperator/ListLimits": grid_operator_pb2.ListLimitsRequest(site_id="changping"),
        "/vpp.v1.GridOperator/SubmitFlexRequest": grid_operator_pb2.SubmitFlexRequestRequest(
            site_id="changping", window=_window(), max_import_kw=0.0),
        "/vpp.v1.GridOperator/GetFlexibilityEnvelope": grid_operator_pb2.GetFlexibilityEnvelopeRequest(
            site_id="changping"),
        "/vpp.v1.GridOperator/GetCycleStatus": grid_operator_pb2.GetCycleStatusRequest(site_id="changping"),
    }


def _struct(values):
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(values)
    return s


def snapshot(service) -> dict:
    """Everything a client can change, read straight from the database file."""
    path = service.config.data_path / "vpp.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("assets", "tokens", "telemetry", "telemetry_latest", "limits", "flex_requests")}


def test_the_tables_below_cover_every_method():
    assert len(METHODS) >= 16
    dummy = dict(bus="b", limit_id="1")
    assert set(requests_on(dummy, "x")) == set(METHODS)
    assert set(INTRUDER) == set(METHODS)
    assert set(DEVICE) == set(METHODS)


# --- authentication ------------------------------------------------------------------------------


def _bad_credentials(w) -> dict:
    valid = w["aggregator"]
    _, expired = w["service"].store.issue_token("demo", "aggregator", name="expired",
                                                expire_time=datetime.now(timezone.utc) - timedelta(seconds=1))
    revoked_id, revoked = w["service"].store.issue_token("demo", "aggregator", name="revoked")
    w["service"].store.revoke_token(revoked_id)
    return {
        "missing": (),
        "empty bearer": (("authorization", "Bearer "),),
        "no scheme": (("authorization", valid),),
        "basic scheme": (("authorization", f"Basic {valid}"),),
        "other header": (("x-authorization", f"Bearer {valid}"),),
        "truncated": bearer(valid[:-1]),
        "padded": bearer(valid + "A"),
        "too long": bearer("A" * 4000),
        "not ascii-safe": bearer("%00%ff" + valid),
        "wrong": bearer(generate_token()),
        "expired": bearer(expired),
        "revoked": bearer(revoked),
    }


def test_every_method_refuses_every_bad_token_and_changes_nothing(world):
    bad = _bad_credentials(world)
    before = snapshot(world["service"])
    tried = 0
    for path in METHODS:
        for label, metadata in bad.items():
            request = requests_on(world, world["a"])[path]
            got = status_of(lambda: call(world["channel"], path, request, metadata))
            assert got == UNAUTHENTICATED, (path, label, got)
            tried += 1
        # An empty request is refused for the token too, before any field is looked at.
        assert status_of(lambda: call(world["channel"], path, empty_request(path), bad["wrong"])) == UNAUTHENTICATED
    assert tried == len(METHODS) * len(bad)
    assert snapshot(world["service"]) == before


def test_a_token_that_expires_stops_working_without_restart(world):
    store = world["service"].store
    _, token = store.issue_token("demo", "operator", name="short-lived",
                                 expire_time=datetime.now(timezone.utc) + timedelta(seconds=1.5))
    path = "/vpp.v1.GridOperator/GetCycleStatus"
    request = requests_on(world, world["a"])[path]
    assert len(call(world["channel"], path, request, bearer(token)).cycles) >= 1
    time.sleep(1.6)
    assert status_of(lambda: call(world["channel"], path, request, bearer(token))) == UNAUTHENTICATED


def test_vpp_token_revoke_takes_effect_on_the_running_server(world):
    """Issue with `vpp token issue`, use it, revoke it with `vpp token revoke` from another process."""
    data = str(world["data"])
    issued = subprocess.run([sys.executable, "-m", "vpp.cli", "token", "issue", "--data-dir", data, "--tenant", "demo",
                             "--role", "aggregator", "--name", "cli", "--expires-in", "1h"],
                            capture_output=True, text=True, timeout=60)
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    token_id = issued.stderr.split("token_id=")[1].split()[0]
    path = "/vpp.v1.AssetRegistry/GetAsset"
    request = requests_on(world, world["a"])[path]
    assert call(world["channel"], path, request, bearer(token)).asset_id == world["a"]
    listed = subprocess.run([sys.executable, "-m", "vpp.cli", "token", "list", "--data-dir", data, "--tenant", "demo"],
                            capture_output=True, text=True, timeout=60)
    assert token_id in listed.stdout and token not in listed.stdout  # the list never shows a token
    revoked = subprocess.run([sys.executable, "-m", "vpp.cli", "token", "revoke", token_id, "--data-dir", data],
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    assert status_of(lambda: call(world["channel"], path, request, bearer(token))) == UNAUTHENTICATED
    line = next(x for x in subprocess.run([sys.executable, "-m", "vpp.cli", "token", "list", "--data-dir", data],
                                          capture_output=True, text=True, timeout=60).stdout.splitlines()
                if x.startswith(token_id))
    assert " revoked " in line


def test_revoking_a_token_ends_its_open_streams(world, monkeypatch):
    monkeypatch.setattr(api, "TOKEN_RECHECK_S", 0.2)
    store = world["service"].store
    token_id, token = store.issue_token("grid", "operator", name="watcher")
    stub = world["channel"].unary_stream("/vpp.v1.Dispatch/WatchSetpoints",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=dispatch_pb2.SetpointBatch.FromString)
    stream = stub(dispatch_pb2.WatchSetpointsRequest(), metadata=bearer(token), timeout=30)
    time.sleep(0.5)
    store.revoke_token(token_id)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        for _ in stream:
            pass
    assert error.value.code() == UNAUTHENTICATED and "revoked" in error.value.details()
    assert time.monotonic() - t0 < 10


def test_a_revoked_token_cannot_finish_a_telemetry_stream(world, monkeypatch):
    monkeypatch.setattr(api, "TOKEN_RECHECK_S", 0.0)
    store = world["service"].store
    token_id, token = store.issue_token("demo", "aggregator", name="streamer")
    sent = threading.Event()

    def measurements():
        yield _measurement(world["b"])
        sent.wait(10)
        yield _measurement(world["b"])

    stub = world["channel"].stream_unary("/vpp.v1.Telemetry/StreamTelemetry",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=telemetry_pb2.TelemetrySummary.FromString)
    future = stub.future(measurements(), metadata=bearer(token), timeout=30)
    time.sleep(0.5)
    store.revoke_token(token_id)
    sent.set()
    with pytest.raises(grpc.RpcError) as error:
        future.result()
    assert error.value.code() == UNAUTHENTICATED


def test_databases_from_before_expiry_and_revocation_keep_their_tokens(tmp_path):
    """A tokens table without the new columns gains them on open; its tokens still work."""
    path = tmp_path / "old.db"
    token = generate_token()
    with Store(f"sqlite:///{path}") as store:
        store.add_token("demo", "operator", token)
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE tokens DROP COLUMN expire_time")
        db.execute("ALTER TABLE tokens DROP COLUMN revoke_time")
    with Store(f"sqlite:///{path}") as store:
        principal = store.authenticate(token)
        assert principal is not None and principal.role == "operator"
        store.revoke_token(principal.token_id)
        assert store.authenticate(token) is None


# --- authorisation: tenants and roles ------------------------------------------------------------

# What an aggregator of another tenant gets when it aims each method at the victim tenant's
# asset (or at the site): DENIED, or "scoped" where the method cannot reach another
# tenant's data and answers from the caller's own (checked by the functions below).
INTRUDER = {
    "/vpp.v1.AssetRegistry/EnrollAsset": "scoped",
    "/vpp.v1.AssetRegistry/GetAsset": DENIED,
    "/vpp.v1.AssetRegistry/ListAssets": "scoped",
    "/vpp.v1.AssetRegistry/UpdateAsset": DENIED,
    "/vpp.v1.AssetRegistry/DecommissionAsset": DENIED,
    "/vpp.v1.Telemetry/ReportTelemetry": DENIED,
    "/vpp.v1.Telemetry/StreamTelemetry": "per measurement",
    "/vpp.v1.Dispatch/GetSetpoint": DENIED,
    "/vpp.v1.Dispatch/WatchSetpoints": "scoped",
    "/vpp.v1.Dispatch/GetPlan": "scoped",
    "/vpp.v1.GridOperator/SetLimit": DENIED,
    "/vpp.v1.GridOperator/LiftLimit": DENIED,
    "/vpp.v1.GridOperator/ListLimits": DENIED,
    "/vpp.v1.GridOperator/SubmitFlexRequest": DENIED,
    "/vpp.v1.GridOperator/GetFlexibilityEnvelope": DENIED,
    "/vpp.v1.GridOperator/GetCycleStatus": DENIED,
}

# A device token of asset A aimed at asset B of the same tenant (or at the site).
DEVICE = {**{path: DENIED for path in METHODS},
          "/vpp.v1.Telemetry/StreamTelemetry": "per measurement",
          "/vpp.v1.Dispatch/WatchSetpoints": "scoped"}


def _asset_ids(response) -> set[str]:
    if isinstance(response, assets_pb2.Asset):
        return {response.asset_id}
    if isinstance(response, assets_pb2.ListAssetsResponse):
        return {a.asset_id for a in response.assets}
    if isinstance(response, dispatch_pb2.SetpointBatch):
        return {s.asset_id for s in response.setpoints}
    if isinstance(response, dispatch_pb2.Plan):
        return {p.asset_id for p in response.asset_plans}
    raise AssertionError(type(response))


def _first_batch(w, path, request, metadata):
    """Open a watch stream, run a cycle, return the first batch it delivers."""
    result = {}

    def watch():
        try:
            result["batch"] = call(w["channel"], path, request, metadata, timeout_s=60)
        except grpc.RpcError as error:
            result["error"] = error

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    time.sleep(0.5)
    w["service"].engine.run_cycle(datetime(2025, 1, 15, 3, 0, tzinfo=timezone.utc))
    reader.join(60)
    assert "batch" in result, result.get("error")
    return result["batch"]


def _check_table(w, token, target, table, allowed_ids):
    before = snapshot(w["service"])
    requests = requests_on(w, target)
    for path, expected in table.items():
        request, metadata = requests[path], bearer(token)
        if expected == DENIED:
            assert status_of(lambda: call(w["channel"], path, request, metadata)) == DENIED, path
        elif expected == "per measurement":
            summary = call(w["channel"], path, request, metadata)
            assert summary.accepted == 0 and summary.rejected == 1, path
            assert summary.errors[0].startswith("measurement 0: PERMISSION_DENIED"), summary.errors[0]
        elif path.endswith("/WatchSetpoints"):
            ids = _asset_ids(_first_batch(w, path, request, metadata))
            assert ids and ids <= allowed_ids, path
        elif path.endswith("/EnrollAsset"):
            continue  # checked below: it writes, under the caller's own tenant
        else:
            assert _asset_ids(call(w["channel"], path, request, metadata)) <= allowed_ids, path
    assert snapshot(w["service"]) == before  # nothing the refused or scoped calls touched changed


def test_another_tenant_can_neither_read_nor_change_the_victims_assets(world):
    store = world["service"].store
    own = {x.asset_id for x in store.iter_assets(tenant="intruder", include_decommissioned=True)}
    mine = store.enroll_asset("intruder", "changping", "intruder-own", "battery", world["bus"], BATTERY)[0]
    _check_table(world, world["intruder"], world["a"], INTRUDER, own | {mine.asset_id})
    # Enrolling the victim's external id makes the intruder's own asset, never touches the victim's.
    victim = store.get_asset(world["a"])
    path = "/vpp.v1.AssetRegistry/EnrollAsset"
    request = requests_on(world, world["a"])[path]
    request.external_id = victim.external_id
    made = call(world["channel"], path, request, bearer(world["intruder"]))
    assert made.asset_id != victim.asset_id and store.get_asset(made.asset_id).tenant == "intruder"
    assert store.get_asset(world["a"]) == victim


def test_a_device_token_reaches_only_its_own_asset(world):
    _check_table(world, world["device"], world["b"], DEVICE, {world["a"]})
    # Its own asset: it reads the setpoint and the asset and reports telemetry...
    requests, metadata = requests_on(world, world["a"]), bearer(world["device"])
    assert call(world["channel"], "/vpp.v1.Dispatch/GetSetpoint", requests["/vpp.v1.Dispatch/GetSetpoint"],
                metadata).asset_id == world["a"]
    call(world["channel"], "/vpp.v1.Telemetry/ReportTelemetry", requests["/vpp.v1.Telemetry/ReportTelemetry"],
         metadata)
    # ...but may not change what the asset is, nor enroll, nor set limits.
    for path in ("/vpp.v1.AssetRegistry/UpdateAsset", "/vpp.v1.AssetRegistry/DecommissionAsset",
                 "/vpp.v1.AssetRegistry/EnrollAsset", "/vpp.v1.GridOperator/SetLimit",
                 "/vpp.v1.GridOperator/SubmitFlexRequest"):
        assert status_of(lambda: call(world["channel"], path, requests[path], metadata)) == DENIED, path


def test_operator_tokens_do_not_enroll_change_or_report(world):
    requests, metadata = requests_on(world, world["a"]), bearer(world["operator"])
    for path in ("/vpp.v1.AssetRegistry/EnrollAsset", "/vpp.v1.AssetRegistry/UpdateAsset",
                 "/vpp.v1.AssetRegistry/DecommissionAsset", "/vpp.v1.Telemetry/ReportTelemetry"):
        assert status_of(lambda: call(world["channel"], path, requests[path], metadata)) == DENIED, path


# --- hostile inputs -----------------------------------------------------------------------------


def test_far_dated_inputs_are_refused_and_cannot_stop_the_dispatch(world):
    """One EV session dated in 9999 (a device can send it) used to be stored and to fail
    every later cycle of the site; limits and flexibility windows likewise."""
    service, channel = world["service"], world["channel"]
    station = next(a for a in service.store.iter_assets(tenant="demo") if a.kind == "charging_station")
    _, station_token = service.store.issue_token("demo", "device", asset_id=station.asset_id)
    m = _measurement(station.asset_id)
    session = m.ev_sessions.add(session_id="s1", charger_id=station.spec["chargers"][0]["id"], energy_kwh=10.0)
    session.arrival.CopyFrom(timestamp(START))
    session.departure.seconds = 253402300799  # 9999-12-31, a valid protobuf Timestamp
    far = common_pb2.TimeWindow(start=timestamp(START))
    far.end.seconds = 253402300799
    hostile = [
        ("/vpp.v1.Telemetry/ReportTelemetry", m, station_token),
        ("/vpp.v1.GridOperator/SetLimit", grid_operator_pb2.SetLimitRequest(
            site_id="changping", element=grid_operator_pb2.GRID_ELEMENT_CONNECTION_IMPORT, limit_kw=300.0, window=far),
         world["operator"]),
        ("/vpp.v1.GridOperator/SubmitFlexRequest", grid_operator_pb2.SubmitFlexRequestRequest(
            site_id="changping", max_import_kw=100.0, window=far), world["operator"]),
    ]
    before = snapshot(service)
    for path, request, token in hostile:
        with pytest.raises(grpc.RpcError) as error:
            call(channel, path, request, bearer(token))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert "must lie in [1970-01-01, 2200-01-01)" in error.value.details()
    assert snapshot(service) == before
    outcome = service.engine.run_cycle(datetime(2025, 1, 15, 4, 0, tzinfo=timezone.utc))[0]
    assert outcome.status in ("optimal", "fallback") and outcome.setpoints


# --- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory):
    """docs/service-tls.toml with certificates from docs/make-certs.sh, and a second, unrelated CA."""
    import shutil

    from vpp.service.config import load_config
    from vpp.service.server import Service

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    work = tmp_path_factory.mktemp("tls")
    (work / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "service-tls.toml", work / "docs" / "service-tls.toml")
    for folder in ("certs", "stranger"):
        subprocess.run(["sh", str(ROOT / "docs" / "make-certs.sh"), str(work / folder)], check=True,
                       capture_output=True)
    config = load_config(work / "docs" / "service-tls.toml", environ={}, grpc_address="127.0.0.1:0", metrics_port=0)
    service = Service(config).start(run_loop=False)
    yield service, work
    service.stop()


def _pem(work, folder, name):
    return (work / folder / name).read_bytes()


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(tls_service):
    service, work = tls_service
    token = tokens(service)["aggregator"]
    address = f"localhost:{service.port}"
    with Client(address, token, root_certificates=_pem(work, "certs", "ca.pem"),
                private_key=_pem(work, "certs", "client.key"), certificate_chain=_pem(work, "certs", "client.pem")) as c:
        assert len(c.list_assets()) == 12  # the right certificate works
    with Client(address, token, root_certificates=_pem(work, "certs", "ca.pem"),
                private_key=_pem(work, "stranger", "client.key"),
                certificate_chain=_pem(work, "stranger", "client.pem"), timeout_s=5) as c:
        assert status_of(c.list_assets) == grpc.StatusCode.UNAVAILABLE
    # The server's own certificate used as a client certificate: signed by the CA, but not for clients.
    with Client(address, token, root_certificates=_pem(work, "certs", "ca.pem"),
                private_key=_pem(work, "certs", "server.key"),
                certificate_chain=_pem(work, "certs", "server.pem"), timeout_s=5) as c:
        assert status_of(c.list_assets) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate_or_trusting_another_server(tls_service):
    service, work = tls_service
    token = tokens(service)["aggregator"]
    address = f"localhost:{service.port}"
    with Client(address, token, root_certificates=_pem(work, "certs", "ca.pem"), timeout_s=5) as c:
        assert status_of(c.list_assets) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    # A client that trusts only another CA does not talk to this server (it could be an impostor).
    with Client(address, token, root_certificates=_pem(work, "stranger", "ca.pem"),
                private_key=_pem(work, "stranger", "client.key"),
                certificate_chain=_pem(work, "stranger", "client.pem"), timeout_s=5) as c:
        assert status_of(c.list_assets) == grpc.StatusCode.UNAVAILABLE
    with Client(address, token, timeout_s=5) as c:
        assert status_of(c.list_assets) == grpc.StatusCode.UNAVAILABLE  # plaintext against the TLS port
