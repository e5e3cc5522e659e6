"""Property tests of the asset-spec validators: any value in any field either gives a
spec whose numbers are all finite, or a SpecError naming a field of that asset; never
another exception."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpp.assets import FLEETS, parse_asset_spec
from vpp.errors import SpecError

BASE = {
    "pv": {"id": "pv1", "kind": "pv", "bus": "b", "p_kwp": 100.0, "inverter_kva": 90.0},
    "battery": {"id": "b1", "kind": "battery", "bus": "b", "e_kwh": 200.0, "p_charge_max_kw": 100.0,
                "p_discharge_max_kw": 100.0},
    "heat_pump": {"id": "h1", "kind": "heat_pump", "bus": "b", "p_el_max_kw": 50.0, "design_heat_kw_th": 150.0,
                  "store_kwh_th": 300.0},
    "charging_station": {"id": "c1", "kind": "charging_station", "bus": "b", "import_limit_kw": 150.0,
                         "chargers": [{"id": "dc", "rating_kw": 120.0}]},
    "load": {"id": "l1", "kind": "load", "bus": "b", "peak_kw": 80.0},
}

SPECIAL = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300, -1e-300]
values = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True),
                   st.integers(-10**12, 10**12), st.text(max_size=8), st.none(), st.booleans(),
                   st.lists(st.integers(), max_size=2))


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)


def _field_names(kind):
    return [n for n in FLEETS[kind].Spec.model_fields if n not in ("id", "kind")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(BASE)), data=st.data(), value=values)
def test_any_field_value_is_validated_or_named(kind, data, value):
    field = data.draw(st.sampled_from(_field_names(kind)))
    spec = {**BASE[kind], field: value}
    try:
        parsed = parse_asset_spec(spec, "asset")
    except SpecError as error:
        assert error.field.startswith("asset"), error.field
        return
    dumped = parsed.model_dump()
    assert all(math.isfinite(x) for x in _numbers(dumped)), (field, value, dumped)


def test_infinite_and_nan_numbers_are_refused_in_every_numeric_field():
    checked = 0
    for kind, base in BASE.items():
        for name, info in FLEETS[kind].Spec.model_fields.items():
            if info.annotation not in (float, "float", float | None):
                continue
            for bad in (math.nan, math.inf):
                try:
                    parse_asset_spec({**base, name: bad}, "asset")
                except SpecError as error:
                    assert error.field == f"asset.{name}"
                else:
                    raise AssertionError(f"{kind}.{name} accepted {bad}")
                checked += 1
    assert checked >= 30  # every float field of every kind, NaN and inf


def test_the_base_specs_are_valid():
    for spec in BASE.values():
        parse_asset_spec(spec)
