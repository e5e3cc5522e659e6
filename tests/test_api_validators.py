"""Property tests of the request checks in ``vpp.service.api``.

Each check is compared with an independent statement of what a valid request is: a
request the statement calls valid comes back as exactly the values sent, and any other
raises SpecError naming a field of that message.  (Asset specs: tests/test_fuzz_specs.py.)
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from vpp.errors import SpecError
from vpp.service import api
from vpp.v1 import assets_pb2, common_pb2, grid_operator_pb2, telemetry_pb2

EARLIEST_S = int(api.EARLIEST.timestamp())
LATEST_S = int(api.LATEST.timestamp())
SETTINGS = settings(max_examples=400, deadline=None)

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 0.5, 1.0, 1.5, 1e6, 1e6 + 1,
                                     1e7, -1e6 - 1, 1e4, 1e4 + 0.5]),
                    st.floats(-2e6, 2e6))
seconds = st.one_of(st.integers(EARLIEST_S - 10, LATEST_S + 10), st.sampled_from(
    [0, EARLIEST_S, EARLIEST_S - 1, LATEST_S - 1, LATEST_S, -62135596800, 253402300799, 2**40]))
nanos = st.one_of(st.just(0), st.integers(0, 999_999_999), st.sampled_from([-1, 1_000_000_000]))


def set_time(ts, s, n):
    ts.seconds, ts.nanos = s, n


def time_ok(s: int, n: int, required: bool = True) -> bool:
    """The statement: a timestamp is valid when set, well-formed and in [1970, 2200)."""
    if s == 0 and n == 0:
        return not required
    return 0 <= n <= 999_999_999 and EARLIEST_S <= s < LATEST_S


def as_datetime(s: int, n: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=s, microseconds=n // 1000)


def in_bounds(x: float, bound: float, nonneg: bool = False) -> bool:
    return math.isfinite(x) and abs(x) <= bound and (x >= 0 or not nonneg)


def field_of(error: SpecError) -> str:
    return error.field.split(".")[0].split("[")[0]


# --- telemetry ---------------------------------------------------------------------------------

sessions = st.fixed_dictionaries({
    "session_id": st.sampled_from(["", "s1"]), "charger_id": st.sampled_from(["", "dc1"]),
    "arrival": st.tuples(seconds, nanos), "departure": st.tuples(seconds, nanos),
    "energy_kwh": numbers, "delivered_kwh": numbers, "max_kw": st.none() | numbers})


@SETTINGS
@given(asset_id=st.sampled_from(["", "a1"]), time=st.tuples(seconds, nanos), p=numbers, q=numbers,
       e=st.none() | numbers, soc=st.none() | numbers, e_th=st.none() | numbers,
       evs=st.lists(sessions, max_size=2))
def test_measurements_are_accepted_exactly_when_valid(asset_id, time, p, q, e, soc, e_th, evs):
    m = telemetry_pb2.Measurement(asset_id=asset_id, p_kw=p, q_kvar=q)
    set_time(m.time, *time)
    for name, value in (("e_kwh", e), ("soc_frac", soc), ("e_th_kwh", e_th)):
        if value is not None:
            setattr(m, name, value)
    for s in evs:
        x = m.ev_sessions.add(session_id=s["session_id"], charger_id=s["charger_id"], energy_kwh=s["energy_kwh"],
                              delivered_kwh=s["delivered_kwh"])
        set_time(x.arrival, *s["arrival"])
        set_time(x.departure, *s["departure"])
        if s["max_kw"] is not None:
            x.max_kw = s["max_kw"]

    def session_ok(s):
        return (s["session_id"] and s["charger_id"] and time_ok(*s["arrival"]) and time_ok(*s["departure"])
                and as_datetime(*s["departure"]) > as_datetime(*s["arrival"])
                and in_bounds(s["energy_kwh"], 1e4, True) and in_bounds(s["delivered_kwh"], 1e4, True)
                and (s["max_kw"] is None or in_bounds(s["max_kw"], 1e6, True)))

    valid = (asset_id != "" and time_ok(*time) and in_bounds(p, 1e6) and in_bounds(q, 1e6)
             and (e is None or in_bounds(e, 1e7, True)) and (soc is None or (in_bounds(soc, 1e7, True) and soc <= 1))
             and (e_th is None or in_bounds(e_th, 1e7)) and all(session_ok(s) for s in evs))
    try:
        got_id, when, values = api.measurement_values(m)
    except SpecError as error:
        assert not valid, error
        assert field_of(error) in telemetry_pb2.Measurement.DESCRIPTOR.fields_by_name, error.field
        return
    assert valid, (m, values)
    assert got_id == asset_id and when == as_datetime(*time)
    assert values["p_kw"] == p and values["q_kvar"] == q
    for name, value in (("e_kwh", e), ("soc_frac", soc), ("e_th_kwh", e_th)):
        assert values.get(name) == value
    assert len(values.get("ev_sessions", [])) == len(evs)
    for got, sent in zip(values.get("ev_sessions", []), evs):
        assert got["energy_kwh"] == sent["energy_kwh"] and got["max_kw"] == sent["max_kw"]
        assert datetime.fromisoformat(got["departure"]) == as_datetime(*sent["departure"])


# --- grid operators ----------------------------------------------------------------------------

BRANCHES = {"transformer": ["trafo 1"], "line": ["line a", "line b"]}


@SETTINGS
@given(element=st.integers(-1, 6), name=st.sampled_from(["", "trafo 1", "line a", "nope"]),
       which=st.sampled_from([None, "limit_kw", "limit_percent"]), value=numbers,
       start=st.tuples(seconds, nanos), end=st.tuples(seconds, nanos))
def test_limits_are_accepted_exactly_when_valid(element, name, which, value, start, end):
    r = grid_operator_pb2.SetLimitRequest(site_id="s", element=element, element_name=name)
    set_time(r.window.start, *start)
    set_time(r.window.end, *end)
    if which:
        setattr(r, which, value)
    kind = api.ELEMENTS.get(element)
    valid = (kind is not None and time_ok(*start) and time_ok(*end) and as_datetime(*end) > as_datetime(*start)
             and which is not None
             and in_bounds(value, 1e6 if which == "limit_kw" else 1e4, True)
             and (which == "limit_kw" if kind.startswith("connection") else name in BRANCHES[kind]))
    try:
        got = api.limit_values(r, BRANCHES)
    except SpecError as error:
        assert not valid, error
        assert field_of(error) in grid_operator_pb2.SetLimitRequest.DESCRIPTOR.fields_by_name, error.field
        return
    assert valid, r
    assert got["element"] == kind and got["element_name"] == name
    assert got["start"] == as_datetime(*start) and got["end"] == as_datetime(*end)
    assert got[which] == value and got["limit_percent" if which == "limit_kw" else "limit_kw"] is None


@SETTINGS
@given(hi=st.none() | numbers, lo=st.none() | numbers, price=st.none() | numbers,
       priority=st.integers(-2**31, 2**31 - 1), start=st.tuples(seconds, nanos), end=st.tuples(seconds, nanos))
def test_flex_requests_are_accepted_exactly_when_valid(hi, lo, price, priority, start, end):
    r = grid_operator_pb2.SubmitFlexRequestRequest(site_id="s", priority=priority)
    set_time(r.window.start, *start)
    set_time(r.window.end, *end)
    for name, value in (("max_import_kw", hi), ("min_import_kw", lo), ("price_cny_per_kwh", price)):
        if value is not None:
            setattr(r, name, value)
    valid = (time_ok(*start) and time_ok(*end) and as_datetime(*end) > as_datetime(*start)
             and (hi is not None or lo is not None)
             and (hi is None or in_bounds(hi, 1e6)) and (lo is None or in_bounds(lo, 1e6))
             and (price is None or in_bounds(price, 1e6, True))
             and (hi is None or lo is None or lo <= hi))
    try:
        got = api.flex_values(r)
    except SpecError as error:
        assert not valid, error
        assert field_of(error) in grid_operator_pb2.SubmitFlexRequestRequest.DESCRIPTOR.fields_by_name, error.field
        return
    assert valid, r
    assert got.get("max_import_kw") == hi and got.get("min_import_kw") == lo
    assert got.get("price_cny_per_kwh") == price and got["priority"] == priority


@given(limit=st.integers(-2**31, 2**31 - 1))
def test_cycle_status_limit(limit):
    r = grid_operator_pb2.GetCycleStatusRequest(site_id="s", limit=limit)
    if limit == 0 or 1 <= limit <= 1000:
        assert api.cycle_limit(r) == (limit or 10)
    else:
        with pytest.raises(SpecError) as error:
            api.cycle_limit(r)
        assert error.value.field == "limit"


@given(text=st.one_of(st.text(max_size=25), st.integers(-5, 2**64).map(str),
                      st.sampled_from(["", " 7", "٣", "1e3", "0x10", "9223372036854775807", "9223372036854775808"])))
def test_limit_ids(text):
    r = grid_operator_pb2.LiftLimitRequest(limit_id=text)
    stripped = text.strip()
    valid = stripped.isascii() and stripped.isdigit() and 1 <= int(stripped) <= 2**63 - 1
    if valid:
        assert api.limit_id(r) == int(stripped)
    else:
        with pytest.raises(SpecError) as error:
            api.limit_id(r)
        assert error.value.field == "limit_id"


@given(kind=st.integers(-3, 10), page_size=st.integers(-2**31, 2**31 - 1), site=st.sampled_from(["", "s"]),
       decommissioned=st.booleans())
def test_asset_filters(kind, page_size, site, decommissioned):
    r = assets_pb2.ListAssetsRequest(kind=kind, page_size=page_size, site_id=site,
                                     include_decommissioned=decommissioned, page_token="t")
    valid = (kind == 0 or kind in api.KINDS) and (page_size == 0 or 1 <= page_size <= 1000)
    try:
        got = api.asset_filter(r)
    except SpecError as error:
        assert not valid and error.field in ("kind", "page_size")
        return
    assert valid
    assert got == dict(site_id=site or None, kind=api.KINDS.get(kind), include_decommissioned=decommissioned,
                       page_size=page_size or 100, page_token="t")


# --- free-form specs -----------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3),
                           max_leaves=10)


def _finite_everywhere(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_everywhere(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_everywhere(v) for v in value)
    return True


@SETTINGS
@given(spec=st.dictionaries(st.text(max_size=6), json_values, max_size=4))
def test_specs_come_back_as_sent_or_name_the_non_finite_key(spec):
    s = struct_pb2.Struct()
    s.update(spec)
    try:
        got = api.spec_values(s)
    except SpecError as error:
        assert not _finite_everywhere(spec)
        assert error.field.startswith("spec.")
        return
    assert _finite_everywhere(spec)
    # A Struct keeps numbers as doubles: compare after the same conversion.
    expected = struct_pb2.Struct()
    expected.update(got)
    assert expected == s
