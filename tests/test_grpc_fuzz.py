"""Fuzzing every gRPC method of a running ``vpp serve`` (a separate process).

Two kinds of cases per method:

* generated: messages drawn by hypothesis from the method's request descriptor (every
  field, nested messages, timestamps, free-form specs, open enums with unknown values,
  NaN and infinite numbers, ids of real and unknown assets, over-long and odd strings);
* mutated: valid requests serialized, then bit-flipped, truncated, spliced, with bytes
  inserted or repeated, and sent as raw bytes through a generic channel call.

For every case: the reply is OK or a defined refusal (INVALID_ARGUMENT, NOT_FOUND,
ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED; never UNKNOWN or INTERNAL), and a
refused call leaves the stored data as it was (a snapshot of the database before and after).
At the end the server still runs, answers its health check and has logged no internal error.

The test-suite run tries ``VPP_FUZZ_EXAMPLES`` cases (default 150) per method and kind,
about 4,500 in all, in under a minute; on demand, e.g. ``VPP_FUZZ_EXAMPLES=1000 pytest tests/test_grpc_fuzz.py -s``
tries more and prints the totals.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import tomllib
from collections import Counter

import grpc
import pytest
from google.protobuf import message_factory, struct_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_security import METHODS, call, requests_on
from test_service import BATTERY, _free_port, _start_server
from vpp.service.store import Store

EXAMPLES = int(os.environ.get("VPP_FUZZ_EXAMPLES", "150"))
DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
WATCH = "/vpp.v1.Dispatch/WatchSetpoints"
WATCH_TIMEOUT_S = 0.1  # a valid watch streams until its deadline: DEADLINE_EXCEEDED is then the client's doing
TABLES = ("assets", "tokens", "telemetry_latest", "limits", "flex_requests")
TALLY: Counter = Counter()
RAN: set = set()  # (kind, path) of the fuzz tests that ran in this session


class Server:
    """``vpp serve`` in a subprocess with its output drained (and kept) by a thread."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc = _start_server(data_dir, self.port)
        self.lines: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.db = data_dir / "vpp.db"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def healthy(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        if self.proc.poll() is not None:
            return False
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def snapshot(self):
        """What clients can change (the loop's cycles and setpoints are left out: it runs on)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}
            rows["telemetry"] = db.execute("SELECT count(*), max(id) FROM telemetry").fetchall()
        return rows

    def stop(self):
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    server = Server(data)
    tokens = {name: entry["token"] for name, entry in tomllib.loads((data / "tokens.toml").read_text()).items()}
    with Store(f"sqlite:///{data / 'vpp.db'}") as store:
        assets = list(store.iter_assets())
        bus = assets[0].bus
        own, _ = store.enroll_asset("demo", "changping", "fuzz-bess", "battery", bus, BATTERY)
        theirs, _ = store.enroll_asset("intruder", "changping", "fuzz-bess", "battery", bus, BATTERY)
        tokens["device"] = store.issue_token("demo", "device", asset_id=own.asset_id)[1]
        tokens["intruder"] = store.issue_token("intruder", "aggregator")[1]
        limit = store.add_limit("changping", "connection_import", "", assets[0].create_time,
                                assets[0].create_time.replace(year=2100), limit_kw=300)
    ids = [a.asset_id for a in assets] + [own.asset_id, theirs.asset_id]
    w = dict(server=server, tokens=tokens, ids=ids, own=own.asset_id, bus=bus, limit_id=str(limit.limit_id),
             channel=server.channel)
    yield w
    server.stop()


# --- strategies from descriptors ------------------------------------------------------------------

ODD_STRINGS = ["", " ", "changping", "atlantis", "x" * 129, "x" * 5000, "\x00", "é\u202e", "../../etc/passwd",
               "' OR 1=1 --", "%s%n", "0", "-1", "99999999999999999999", "9223372036854775808", "NaN", "v1:1",
               "djE6MA", "djE6LTE", "LV1.101 Bus 4"]
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1.0, 0.5, 1e308, -1e308, 5e-324, 2.0**53 + 1]))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                    max_leaves=12)
SPEC_KEYS = sorted(set(BATTERY) | {"p_kwp", "inverter_kva", "peak_kw", "chargers", "import_limit_kw", "p_el_max_kw",
                                    "design_heat_kw_th", "store_kwh_th", "soc_min_frac", "id", "kind", "bus"})


@st.composite
def specs(draw):
    """Free-form objects, and valid battery specs with one key changed or added."""
    if draw(st.booleans()):
        return draw(st.dictionaries(st.text(max_size=10), JSON, max_size=4))
    spec = dict(BATTERY)
    spec[draw(st.sampled_from(SPEC_KEYS))] = draw(JSON)
    return spec


@st.composite
def timestamps(draw):
    ts = timestamp_pb2.Timestamp()
    ts.seconds = draw(st.one_of(st.integers(1_700_000_000, 1_800_000_000), st.integers(-2**63, 2**63 - 1),
                                st.sampled_from([0, -62135596801, 253402300800, 253402300799])))
    ts.nanos = draw(st.one_of(st.just(0), st.integers(-2**31, 2**31 - 1)))
    return ts


def strings(w):
    return st.one_of(st.sampled_from(w["ids"] + [w["limit_id"], w["bus"]]), st.sampled_from(ODD_STRINGS),
                     st.text(max_size=40))


def _scalar(field, w):
    t = field.type
    if t in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return NUMBERS if t == field.TYPE_DOUBLE else st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t in (field.TYPE_INT32, field.TYPE_SINT32, field.TYPE_SFIXED32):
        return st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, -1, 1000, 1001, 2**31 - 1]))
    if t in (field.TYPE_INT64, field.TYPE_SINT64, field.TYPE_SFIXED64):
        return st.integers(-2**63, 2**63 - 1)
    if t in (field.TYPE_UINT32, field.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (field.TYPE_UINT64, field.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == field.TYPE_BOOL:
        return st.booleans()
    if t == field.TYPE_STRING:
        return strings(w)
    if t == field.TYPE_BYTES:
        return st.binary(max_size=32)
    if t == field.TYPE_ENUM:  # proto3 enums are open: unknown numbers arrive as they are
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 50))
    raise AssertionError(f"no strategy for field type {t} ({field.full_name})")


@st.composite
def messages(draw, descriptor, w, depth=0):
    """A message of ``descriptor``: each field left unset or set to a drawn value."""
    if descriptor.full_name == "google.protobuf.Timestamp":
        return draw(timestamps())
    if descriptor.full_name == "google.protobuf.Struct":
        s = struct_pb2.Struct()
        s.update(draw(specs()))
        return s
    m = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.integers(0, 3)):  # a quarter of the fields left unset
            continue
        if field.type == field.TYPE_MESSAGE:
            if depth >= 3:
                continue
            values = draw(st.lists(messages(field.message_type, w, depth + 1), min_size=1,
                                   max_size=3 if field.is_repeated else 1))
            if field.is_repeated:
                for v in values:
                    getattr(m, field.name).add().CopyFrom(v)
            else:
                getattr(m, field.name).CopyFrom(values[0])
        elif field.is_repeated:
            getattr(m, field.name).extend(draw(st.lists(_scalar(field, w), max_size=3)))
        else:
            setattr(m, field.name, draw(_scalar(field, w)))
    return m


@st.composite
def mutated(draw, seeds: list[bytes]):
    """A valid serialized request with a few random byte-level changes."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "repeat", "byte"]))
        n = len(data)
        if op == "flip" and n:
            k = draw(st.integers(0, n * 8 - 1))
            data[k // 8] ^= 1 << (k % 8)
        elif op == "truncate" and n:
            data = data[:draw(st.integers(0, n - 1))]
        elif op == "insert":
            k = draw(st.integers(0, n))
            data[k:k] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and n:
            k = draw(st.integers(0, n - 1))
            del data[k:k + draw(st.integers(1, 8))]
        elif op == "repeat" and n:
            k = draw(st.integers(0, n - 1))
            data[k:k] = data[k:k + draw(st.integers(1, 16))] * draw(st.integers(1, 4))
        elif op == "byte" and n:
            data[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x08]))
    return bytes(data)


def _roles(path: str) -> list[str]:
    """Tokens to draw from, weighted to the role that gets past authorisation to the checks."""
    preferred = "operator" if "GridOperator" in path else "aggregator"
    return [preferred] * 4 + ["aggregator", "operator", "device", "intruder", "not-a-token"]


def _metadata(w, role):
    token = w["tokens"].get(role, "definitely-not-a-valid-token-000")
    return (("authorization", f"Bearer {token}"),)


# --- one case ----------------------------------------------------------------------------------


def _raw(channel, path, data: bytes, metadata, timeout_s):
    method = METHODS[path]
    if method.client_streaming:
        return channel.stream_unary(path)(iter([data]), metadata=metadata, timeout=timeout_s)
    if method.server_streaming:
        return next(iter(channel.unary_stream(path)(data, metadata=metadata, timeout=timeout_s)))
    return channel.unary_unary(path)(data, metadata=metadata, timeout=timeout_s)


def _check_case(w, path, kind, send):
    """Send one case; check its status and, when refused, that nothing stored changed."""
    server = w["server"]
    before = server.snapshot()
    timeout_s = WATCH_TIMEOUT_S if path == WATCH else 30
    try:
        send(timeout_s)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        if path == WATCH and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            code = grpc.StatusCode.OK  # a valid watch: it streams until the client's deadline
        assert code in DEFINED, (path, kind, code, error.details())
    except StopIteration:  # a watch stream that ended without a batch: the server closed it OK
        code = grpc.StatusCode.OK
    TALLY[(kind, code.name)] += 1
    RAN.add((kind, path))
    if code != grpc.StatusCode.OK:
        assert server.snapshot() == before, (path, kind, code)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("path", sorted(METHODS))
def test_generated_messages_get_defined_codes_and_refusals_store_nothing(world, path):
    method = METHODS[path]
    examples = max(EXAMPLES // 4, 5) if path == WATCH else EXAMPLES

    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def one(data):
        role = data.draw(st.sampled_from(_roles(path)))
        if method.client_streaming:
            request = data.draw(st.lists(messages(method.input_type, world), max_size=4))
        else:
            request = data.draw(messages(method.input_type, world))
        _check_case(world, path, "generated",
                    lambda timeout_s: call(world["channel"], path, request, _metadata(world, role), timeout_s))

    one()
    assert world["server"].healthy()


@pytest.mark.parametrize("path", sorted(METHODS))
def test_mutated_bytes_get_defined_codes_and_refusals_store_nothing(world, path):
    method = METHODS[path]
    seeds = []
    for target in (world["own"], world["ids"][0]):
        request = requests_on(world, target)[path]
        for m in request if method.client_streaming else [request]:
            seeds.append(m.SerializeToString())
    seeds.append(b"")
    examples = max(EXAMPLES // 4, 5) if path == WATCH else EXAMPLES

    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def one(data):
        role = data.draw(st.sampled_from(_roles(path)))
        if method.client_streaming:
            chunks = data.draw(st.lists(mutated(seeds), min_size=1, max_size=4))
            send = lambda timeout_s: world["channel"].stream_unary(path)(  # noqa: E731
                iter(chunks), metadata=_metadata(world, role), timeout=timeout_s)
        else:
            raw = data.draw(mutated(seeds))
            send = lambda timeout_s: _raw(world["channel"], path, raw, _metadata(world, role), timeout_s)  # noqa: E731
        _check_case(world, path, "mutated", send)

    one()
    assert world["server"].healthy()


def test_the_server_survived_and_logged_no_internal_error(world):
    server = world["server"]
    assert server.healthy()
    time.sleep(0.5)  # the drain thread catches up with the log
    errors, inside = [], False
    for line in server.lines:  # an error line and the traceback lines after it
        # Errors, and failed cycles: an accepted request must not break the dispatch later.
        inside = ("level=ERROR" in line or "status=failed" in line
                  or (inside and not line.startswith("time=")))
        if inside:
            errors.append(line)
    assert not errors, "".join(errors[:60])
    total = sum(TALLY.values())
    by_kind = {kind: sum(n for (k, _), n in TALLY.items() if k == kind) for kind in ("generated", "mutated")}
    print(f"\nfuzz: {total} cases over {len(METHODS)} methods ({by_kind}); replies: "
          + ", ".join(f"{kind} {code} {n}" for (kind, code), n in sorted(TALLY.items())))
    if len(RAN) == 2 * len(METHODS):  # the whole module ran, not a selection
        assert by_kind["generated"] >= len(METHODS) * 5 and by_kind["mutated"] >= len(METHODS) * 5
        # The cases reach past the token check: many are refused by the field checks or go through.
        assert TALLY[("generated", "INVALID_ARGUMENT")] > 0 and TALLY[("mutated", "INVALID_ARGUMENT")] > 0
        assert TALLY[("generated", "OK")] > 0
