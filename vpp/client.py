"""A small Python client of the vpp service.

    from vpp.client import Client
    with Client("127.0.0.1:50051", token) as c:
        c.enroll("changping", "my-battery", "battery", "LV1.101 Bus 4",
                 {"e_kwh": 200, "p_charge_max_kw": 100, "p_discharge_max_kw": 100})
        for batch in c.watch("changping"):
            print(batch.cycle_start.ToDatetime(), [(s.asset_id, s.p_kw) for s in batch.setpoints])

TLS: pass ``root_certificates`` (PEM bytes of the server's CA) and, for mutual TLS,
``private_key`` and ``certificate_chain`` of the client.
"""

from __future__ import annotations

from datetime import datetime, timezone

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from vpp.v1 import (assets_pb2, assets_pb2_grpc, common_pb2, dispatch_pb2, dispatch_pb2_grpc, grid_operator_pb2,
                    grid_operator_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc)

KIND_ENUM = {"pv": common_pb2.ASSET_KIND_PV, "battery": common_pb2.ASSET_KIND_BATTERY,
             "heat_pump": common_pb2.ASSET_KIND_HEAT_PUMP, "charging_station": common_pb2.ASSET_KIND_CHARGING_STATION,
             "load": common_pb2.ASSET_KIND_LOAD}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(timezone.utc))
    return ts


class Client:
    def __init__(self, address: str, token: str, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None, timeout_s: float = 30.0):
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(address, credentials)
        else:
            self.channel = grpc.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout_s = timeout_s
        self.assets = assets_pb2_grpc.AssetRegistryStub(self.channel)
        self.telemetry = telemetry_pb2_grpc.TelemetryStub(self.channel)
        self.dispatch = dispatch_pb2_grpc.DispatchStub(self.channel)
        self.operator = grid_operator_pb2_grpc.GridOperatorStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        return method(request, metadata=self.metadata, timeout=self.timeout_s)

    # --- aggregators ---------------------------------------------------------------------------

    def enroll(self, site_id: str, external_id: str, kind: str, bus: str, spec: dict) -> assets_pb2.Asset:
        struct = struct_pb2.Struct()
        struct.update(spec)
        return self._call(self.assets.EnrollAsset, assets_pb2.EnrollAssetRequest(
            site_id=site_id, external_id=external_id, kind=KIND_ENUM[kind], bus=str(bus), spec=struct))

    def list_assets(self, site_id: str = "", kind: str | None = None) -> list[assets_pb2.Asset]:
        out, token = [], ""
        while True:
            response = self._call(self.assets.ListAssets, assets_pb2.ListAssetsRequest(
                site_id=site_id, kind=KIND_ENUM[kind] if kind else 0, page_token=token, page_size=500))
            out += list(response.assets)
            token = response.next_page_token
            if not token:
                return out

    def report(self, asset_id: str, when: datetime, p_kw: float, **values) -> None:
        m = telemetry_pb2.Measurement(asset_id=asset_id, time=timestamp(when), p_kw=p_kw)
        for name, value in values.items():
            setattr(m, name, value)
        self._call(self.telemetry.ReportTelemetry, m)

    # --- assets, gateways, aggregators ---------------------------------------------------------

    def setpoint(self, asset_id: str) -> common_pb2.Setpoint:
        return self._call(self.dispatch.GetSetpoint, dispatch_pb2.GetSetpointRequest(asset_id=asset_id))

    def watch(self, site_id: str = ""):
        """Setpoint batches as the cycles publish them (a server stream; no timeout)."""
        return self.dispatch.WatchSetpoints(dispatch_pb2.WatchSetpointsRequest(site_id=site_id),
                                            metadata=self.metadata)

    def plan(self, site_id: str) -> dispatch_pb2.Plan:
        return self._call(self.dispatch.GetPlan, dispatch_pb2.GetPlanRequest(site_id=site_id))

    # --- grid operators ------------------------------------------------------------------------

    def flex_request(self, site_id: str, start: datetime, end: datetime, max_import_kw: float | None = None,
                     min_import_kw: float | None = None, price_cny_per_kwh: float | None = None):
        r = grid_operator_pb2.SubmitFlexRequestRequest(
            site_id=site_id, window=common_pb2.TimeWindow(start=timestamp(start), end=timestamp(end)))
        for name, value in (("max_import_kw", max_import_kw), ("min_import_kw", min_import_kw),
                            ("price_cny_per_kwh", price_cny_per_kwh)):
            if value is not None:
                setattr(r, name, value)
        return self._call(self.operator.SubmitFlexRequest, r)

    def cycles(self, site_id: str, limit: int = 10):
        return self._call(self.operator.GetCycleStatus,
                          grid_operator_pb2.GetCycleStatusRequest(site_id=site_id, limit=limit)).cycles
