import cvxpy as cp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vpp.assets import Horizon, Penalties, parse_asset_spec
from vpp.assets.heat_pump import HeatPumpFleet, carnot_cop

SPEC = {"id": "hp", "kind": "heat_pump", "bus": "bus3", "p_el_max_kw": 20, "store_kwh_th": 100,
        "design_heat_kw_th": 60, "t_supply_c": 35, "carnot_efficiency": 0.5, "cop_max": 8}


def test_carnot_cop_against_hand_values():
    # 0 C source, 35 C supply: Carnot COP = 308.15 / 35 = 8.804; half of it = 4.402.
    assert carnot_cop(0.0, 35.0, 0.5, 10.0) == pytest.approx(4.402, abs=1e-3)
    # -10 C source: 308.15 / 45 * 0.5 = 3.424.
    assert carnot_cop(-10.0, 35.0, 0.5, 10.0) == pytest.approx(3.424, abs=1e-3)
    # A source warmer than the supply is floored at a 5 K lift and capped.
    assert carnot_cop(40.0, 35.0, 0.5, 6.0) == 6.0


def test_ground_source_cop_is_constant_and_air_source_follows_weather():
    ground = HeatPumpFleet([parse_asset_spec({**SPEC, "source": "ground", "t_ground_c": 10})])
    air = HeatPumpFleet([parse_asset_spec({**SPEC, "source": "air"})])
    temps = np.array([-10.0, 0.0, 10.0])
    assert np.ptp(ground.cop(temps)) == 0
    assert np.all(np.diff(air.cop(temps)[0]) > 0)


@settings(max_examples=200, deadline=None)
@given(e0=st.floats(-20, 100), setpoint=st.floats(-100, 10), heat=st.floats(0, 80), cop=st.floats(1.5, 6))
def test_plant_energy_balance_and_bounds(e0, setpoint, heat, cop):
    f = HeatPumpFleet([parse_asset_spec(SPEC)])
    state, p, extras = f.plant_step({"e_th_kwh": np.array([e0])}, np.array([setpoint]),
                                    {"cop": np.array([cop]), "heat_kw_th": np.array([heat])}, 0.25)
    p_el = -p[0]
    assert 0 <= p_el <= 20 + 1e-9
    e1 = state["e_th_kwh"][0]
    assert e1 <= 100 + 1e-9
    assert e1 == pytest.approx(e0 * (1 - 0.01 * 0.25) + (cop * p_el - heat) * 0.25, abs=1e-9)
    # Comfort violation is reported, in kelvin-hours, whenever the store ends below its band.
    assert extras["comfort_violation_k_h"][0] == pytest.approx(max(-e1, 0) / (100 / 2.0) * 0.25)


def test_fallback_meets_demand_when_it_can():
    f = HeatPumpFleet([parse_asset_spec(SPEC)])
    T = 16
    forecast = {"cop": np.full((1, T), 4.0), "heat_kw_th": np.full((1, T), 40.0)}
    p = f.fallback_kw({"e_th_kwh": np.array([60.0])}, forecast, Horizon(T, 0.25))
    assert np.all(p <= 0) and np.all(-p <= 20 + 1e-9)
    e = 60.0
    for t in range(T):
        e = e * (1 - 0.01 * 0.25) + (4.0 * -p[0, t] - 40.0) * 0.25
        assert e >= -1e-9


def test_plan_follows_each_heat_pumps_own_cop():
    # One COP parameter per heat pump: each row of the plan must use its own COP row.
    f = HeatPumpFleet([parse_asset_spec(SPEC), parse_asset_spec({**SPEC, "id": "hp2", "store_kwh_th": 50})])
    horizon = Horizon.with_resolution(8, 0.25, [(1, 0.25), (2, 0.5)])
    contribution = f.build(horizon)
    cop = np.array([[3.0, 3.2, 3.4, 3.6, 3.8, 4.0, 4.2, 4.4], [2.0, 2.0, 2.5, 2.5, 5.0, 5.0, 6.0, 6.0]])
    heat = np.full((2, 8), 30.0)
    f.update(f.initial_state(), {"cop": cop, "heat_kw_th": heat}, Penalties())
    cost = cp.sum(-contribution.p_kw) + sum(contribution.costs_cny.values())
    cp.Problem(cp.Minimize(cost), contribution.constraints).solve(solver=cp.HIGHS)
    e, p_el = f.e.value, f.p_el.value
    keep = 1.0 - horizon.per_step(f.loss_per_h)
    heat_out = horizon.coarsen(cop) * p_el
    np.testing.assert_allclose(e[:, 1:], keep * e[:, :-1] + (heat_out - horizon.coarsen(heat)) * horizon.step_h,
                               atol=1e-6)
    # Cheapest heat where the COP is highest: the second unit runs hardest in its last steps.
    assert p_el[1, -1] > p_el[1, 0]
