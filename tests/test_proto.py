"""The vpp.v1 gRPC API: generated modules import, style-guide enums, expected services."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto" / "vpp" / "v1"
NAMES = ("common", "assets", "telemetry", "dispatch", "grid_operator")

EXPECTED_SERVICES = {
    "vpp.v1.AssetRegistry": {"EnrollAsset", "GetAsset", "ListAssets", "UpdateAsset", "DecommissionAsset"},
    "vpp.v1.Telemetry": {"ReportTelemetry", "StreamTelemetry"},
    "vpp.v1.Dispatch": {"GetSetpoint", "WatchSetpoints", "GetPlan"},
    "vpp.v1.GridOperator": {"SetLimit", "LiftLimit", "ListLimits", "SubmitFlexRequest",
                            "GetFlexibilityEnvelope", "GetCycleStatus"},
}


def _upper_snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.upper())
    return "".join(out)


def _pb2(name):
    return importlib.import_module(f"vpp.v1.{name}_pb2")


def _file_descriptors():
    return [_pb2(name).DESCRIPTOR for name in NAMES]


def _all_enums():
    def nested(message):
        yield from message.enum_types
        for inner in message.nested_types:
            yield from nested(inner)

    for fd in _file_descriptors():
        yield from fd.enum_types_by_name.values()
        for message in fd.message_types_by_name.values():
            yield from nested(message)


def test_every_proto_file_has_generated_modules():
    assert sorted(p.stem for p in PROTO_DIR.glob("*.proto")) == sorted(NAMES)
    for name in NAMES:
        assert _pb2(name).DESCRIPTOR.package == "vpp.v1"
        importlib.import_module(f"vpp.v1.{name}_pb2_grpc")


def test_enum_zero_values_are_unspecified_and_values_prefixed():
    enums = list(_all_enums())
    assert {e.name for e in enums} >= {"AssetKind", "AssetState", "CycleOutcome", "GridElement"}
    for enum in enums:
        prefix = _upper_snake(enum.name)
        zero = [v for v in enum.values if v.number == 0]
        assert [v.name for v in zero] == [f"{prefix}_UNSPECIFIED"], enum.full_name
        assert enum.values[0].number == 0, enum.full_name
        for value in enum.values:
            assert value.name.startswith(prefix + "_"), value.name


@pytest.mark.parametrize("service", sorted(EXPECTED_SERVICES))
def test_services_and_methods(service):
    found = {s.full_name: s for fd in _file_descriptors() for s in fd.services_by_name.values()}
    assert set(found) == set(EXPECTED_SERVICES)
    assert {m.name for m in found[service].methods} == EXPECTED_SERVICES[service]


def test_streaming_shapes():
    from vpp.v1 import dispatch_pb2, telemetry_pb2

    stream = telemetry_pb2.DESCRIPTOR.services_by_name["Telemetry"].methods_by_name["StreamTelemetry"]
    assert stream.client_streaming and not stream.server_streaming
    watch = dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"].methods_by_name["WatchSetpoints"]
    assert watch.server_streaming and not watch.client_streaming


def test_stubs_and_servicers_exist():
    for name, services in (("assets", ["AssetRegistry"]), ("telemetry", ["Telemetry"]),
                           ("dispatch", ["Dispatch"]), ("grid_operator", ["GridOperator"])):
        grpc_module = importlib.import_module(f"vpp.v1.{name}_pb2_grpc")
        for service in services:
            assert hasattr(grpc_module, f"{service}Stub")
            assert hasattr(grpc_module, f"{service}Servicer")
            assert hasattr(grpc_module, f"add_{service}Servicer_to_server")


def test_optional_fields_track_presence():
    from vpp.v1 import telemetry_pb2

    m = telemetry_pb2.Measurement(asset_id="bat-1", p_kw=-5.0)
    assert not m.HasField("soc_frac")
    m.soc_frac = 0.0
    assert m.HasField("soc_frac")
    copy = telemetry_pb2.Measurement.FromString(m.SerializeToString())
    assert copy.HasField("soc_frac") and not copy.HasField("e_kwh")
