import numpy as np
import pandas as pd
import pytest

from vpp.assets import Horizon, parse_asset_spec
from vpp.assets.pv import PVFleet
from vpp.weather import load_period_index, synthetic_weather

SPEC = {"id": "pv", "kind": "pv", "bus": "bus3", "p_kwp": 100, "inverter_kva": 90, "tilt_deg": 30,
        "azimuth_deg": 180}


class Site:
    latitude_deg, longitude_deg, altitude_m = 40.2, 116.2, 50.0


@pytest.fixture(scope="module")
def year_output():
    index = load_period_index("2025-01-01", 365, "Asia/Shanghai")
    wx = synthetic_weather(index, 40.2, 116.2, 50.0, seed=3)
    fleet = PVFleet([parse_asset_spec(SPEC)])
    return index, fleet.available_kw(wx, Site())[0]


def test_specific_yield_in_beijing_range(year_output):
    # Published specific yields for optimally tilted PV around Beijing: ~1,200-1,450 kWh/kWp/yr
    # (e.g. PVGIS / NREL estimates for North China); our losses of 14 % sit mid-range.
    index, p = year_output
    assert 1100 <= p.sum() * 0.25 / 100 <= 1500


def test_output_never_exceeds_inverter_and_is_zero_at_night(year_output):
    index, p = year_output
    assert p.max() <= 90 + 1e-9 and p.min() >= 0
    assert np.all(p[(index.hour >= 22) | (index.hour < 4)] == 0)


def test_plant_step_caps_at_setpoint_and_sun():
    fleet = PVFleet([parse_asset_spec(SPEC)])
    _, p, extras = fleet.plant_step({}, np.array([30.0]), {"avail_kw": np.array([50.0])}, 0.25)
    assert p[0] == 30.0 and extras["curtailed_kw"][0] == 20.0
    _, p, _ = fleet.plant_step({}, np.array([80.0]), {"avail_kw": np.array([50.0])}, 0.25)
    assert p[0] == 50.0


def test_fallback_cap():
    fleet = PVFleet([parse_asset_spec({**SPEC, "fallback_p_max_kw": 40})])
    out = fleet.fallback_kw({}, {"avail_kw": np.array([[10.0, 60.0]])}, Horizon(2, 0.25))
    assert out.tolist() == [[10.0, 40.0]]
