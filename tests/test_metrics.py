"""The service's Prometheus metrics: asset counts kept as assets are enrolled and decommissioned."""

from __future__ import annotations

from test_service import BATTERY, bus_of, make_service, tokens
from vpp.client import Client
from vpp.v1 import assets_pb2


def _counts(service) -> dict[tuple[str, str], float]:
    return {(s.labels["kind"], s.labels["state"]): s.value for metric in service.metrics.assets.collect()
            for s in metric.samples if s.value}


def test_asset_gauges_follow_enrollments_and_decommissions(tmp_path):
    service = make_service(tmp_path)
    try:
        start = _counts(service)
        with Client(f"127.0.0.1:{service.port}", tokens(service)["aggregator"]) as agg:
            a = agg.enroll("changping", "m-bess-1", "battery", bus_of(service), BATTERY)
            agg.enroll("changping", "m-bess-1", "battery", bus_of(service), BATTERY)  # the same again: no new asset
            agg.enroll("changping", "m-bess-2", "battery", bus_of(service), BATTERY)
            for _ in range(2):  # decommissioning twice counts once
                agg.assets.DecommissionAsset(assets_pb2.DecommissionAssetRequest(asset_id=a.asset_id),
                                             metadata=agg.metadata)
        counts = _counts(service)
        assert counts[("battery", "active")] == start[("battery", "active")] + 1
        assert counts[("battery", "decommissioned")] == 1
        service.refresh_asset_metrics()  # a full recount agrees with the running counts
        assert _counts(service) == counts
    finally:
        service.stop()
