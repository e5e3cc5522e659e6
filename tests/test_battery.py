import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vpp.assets import parse_asset_spec
from vpp.assets.battery import BatteryFleet
from vpp.errors import SpecError

SPEC = {"id": "b1", "kind": "battery", "bus": "bus3", "e_kwh": 100, "p_charge_max_kw": 50, "p_discharge_max_kw": 40,
        "eta_charge": 0.9, "eta_discharge": 0.92, "soc_min_frac": 0.1, "soc_max_frac": 0.9}


def fleet(**changes):
    return BatteryFleet([parse_asset_spec({**SPEC, **changes})])


@settings(max_examples=200, deadline=None)
@given(e0=st.floats(10, 90), setpoint=st.floats(-1e4, 1e4, allow_nan=False), dt_h=st.sampled_from([0.25, 0.5, 1.0]))
def test_plant_never_leaves_power_or_soc_window(e0, setpoint, dt_h):
    f = fleet()
    state, p, extras = f.plant_step({"e_kwh": np.array([e0])}, np.array([setpoint]), {}, dt_h)
    e1 = state["e_kwh"][0]
    assert -50 - 1e-9 <= p[0] <= 40 + 1e-9
    # Control never takes it out of the window; only self-discharge may drift below the floor.
    assert min(10.0, e0 * (1 - 0.0001 * dt_h)) - 1e-9 <= e1 <= 90 + 1e-9
    # Energy balance with the efficiencies: what left the grid went into the cells, less losses.
    expected = e0 * (1 - 0.0001 * dt_h) + (-p[0] * 0.9 if p[0] < 0 else -p[0] / 0.92) * dt_h
    assert e1 == pytest.approx(expected, abs=1e-9)


def test_plant_discharge_clipped_at_empty():
    f = fleet()
    state, p, _ = f.plant_step({"e_kwh": np.array([12.0])}, np.array([40.0]), {}, 0.25)
    # Only (12 - 10) kWh above the floor: at most 2 kWh * 0.92 / 0.25 h can reach the grid.
    assert p[0] == pytest.approx((12.0 * (1 - 0.0001 * 0.25) - 10.0) * 0.92 / 0.25)
    assert state["e_kwh"][0] == pytest.approx(10.0)


def test_nan_setpoint_is_idle():
    f = fleet()
    state, p, _ = f.plant_step({"e_kwh": np.array([50.0])}, np.array([np.nan]), {}, 0.25)
    assert p[0] == 0.0


def test_fallback_is_idle():
    from vpp.assets import Horizon

    f = fleet()
    assert np.all(f.fallback_kw(f.initial_state(), {}, Horizon(8, 0.25)) == 0)


@pytest.mark.parametrize("field,value,reason", [
    ("e_kwh", 0, "greater than 0"),
    ("eta_charge", 1.5, "less than or equal to 1"),
    ("soc_min_frac", 0.95, "soc_min_frac must be below soc_max_frac"),
    ("p_charge_max_kw", "lots", "valid number"),
    ("colour", "red", "unknown field"),
])
def test_bad_spec_names_the_field(field, value, reason):
    with pytest.raises(SpecError) as error:
        parse_asset_spec({**SPEC, field: value}, "assets[0]")
    assert reason in str(error.value)
    if field != "soc_min_frac":
        assert error.value.field == f"assets[0].{field}"
