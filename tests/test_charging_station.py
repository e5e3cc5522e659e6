import cvxpy as cp
import numpy as np
import pandas as pd
import pytest

from vpp.assets import Horizon, Penalties, parse_asset_spec
from vpp.assets.charging_station import ChargingStationFleet
from vpp.errors import SpecError

TZ = "Asia/Shanghai"
SPEC = {"id": "hub", "kind": "charging_station", "bus": "bus3", "import_limit_kw": 100,
        "chargers": [{"id": "dc", "rating_kw": 120, "type": "dc"}, {"id": "ac", "rating_kw": 7}],
        "battery": {"e_kwh": 50, "p_charge_max_kw": 25, "p_discharge_max_kw": 25}}


def sessions(*rows):
    return pd.DataFrame(rows, columns=["session_id", "station_id", "charger_id", "arrival", "departure", "energy_kwh",
                                       "max_kw"])


def ts(hhmm):
    return pd.Timestamp(f"2025-01-15 {hhmm}", tz=TZ)


def test_charger_ratings_from_ac_to_liquid_cooled():
    spec = parse_asset_spec({**SPEC, "chargers": [{"id": "lc", "rating_kw": 480, "type": "dc_liquid_cooled"}]})
    assert spec.chargers[0].rating_kw == 480
    with pytest.raises(SpecError) as error:
        parse_asset_spec({**SPEC, "chargers": [{"id": "x", "rating_kw": 7}, {"id": "x", "rating_kw": 7}]}, "assets[1]")
    assert "unique" in str(error.value)


def test_plant_respects_car_limits_and_import_limit():
    f = ChargingStationFleet([parse_asset_spec(SPEC)])
    s = sessions(("a", "hub", "dc", ts("08:00"), ts("09:00"), 60.0, 150.0),
                 ("b", "hub", "ac", ts("08:00"), ts("12:00"), 20.0, 11.0))
    state = f.initial_state()
    actual = {"sessions": s, "time": ts("08:00"), "battery_kw": np.array([0.0])}
    state, p, extras = f.plant_step(state, np.array([-1000.0]), actual, 0.25)
    # Station import limit 100 kW binds; the DC car takes up to its charger's 120 kW first.
    assert p[0] == pytest.approx(-100.0)
    assert state["delivered_kwh"]["a"] == pytest.approx(100.0 * 0.95 * 0.25)


def test_unknown_charger_is_an_error():
    f = ChargingStationFleet([parse_asset_spec(SPEC)])
    index = pd.date_range(ts("00:00"), periods=96, freq="15min")
    with pytest.raises(SpecError, match="no charger 'zz'"):
        f._slot_bounds(sessions(("a", "hub", "zz", ts("08:00"), ts("09:00"), 10.0, 50.0)), {}, index, 0.25)


def test_session_past_horizon_needs_only_what_cannot_come_later():
    f = ChargingStationFleet([parse_asset_spec(SPEC)])
    index = pd.date_range(ts("00:00"), periods=8, freq="15min")  # 00:00-02:00
    ub, req, names = f._slot_bounds(sessions(("a", "hub", "ac", ts("01:00"), ts("03:00"), 20.0, 7.0)), {}, index, 0.25)
    # After 02:00 the car still gets 1 h x 7 kW x 0.95; the horizon must deliver the rest.
    assert req.max() == pytest.approx(20.0 - 7.0 * 0.95 * 1.0)
    slot = names.index("a")
    assert ub[slot, :4].sum() == 0 and np.all(ub[slot, 4:] == 7.0)


def test_sessions_beyond_the_chargers_slots_wait_for_a_later_cycle():
    f = ChargingStationFleet([parse_asset_spec({**SPEC, "slots_per_charger": 2})])
    s = sessions(("a", "hub", "dc", ts("08:00"), ts("09:00"), 30.0, 120.0),
                 ("b", "hub", "dc", ts("10:00"), ts("11:00"), 30.0, 120.0),
                 ("c", "hub", "dc", ts("12:00"), ts("13:00"), 30.0, 120.0))
    index = pd.date_range(ts("08:00"), periods=96, freq="15min")
    ub, req, names = f._slot_bounds(s, {}, index, 0.25)
    assert [n for n in names if n] == ["a", "b"] and f.deferred_sessions == ["c"]
    # Once the first car has left the horizon, the late one gets its slot.
    later = pd.date_range(ts("09:00"), periods=96, freq="15min")
    _, _, names = f._slot_bounds(s, {}, later, 0.25)
    assert sorted(n for n in names if n) == ["b", "c"]


def test_plant_serves_the_least_laxity_car_first_and_at_least_the_plan():
    f = ChargingStationFleet([parse_asset_spec(SPEC)])
    # "relaxed" is listed first but can wait; "urgent" must take 7 kW now to leave full.
    s = sessions(("relaxed", "hub", "dc", ts("08:00"), ts("12:00"), 20.0, 120.0),
                 ("urgent", "hub", "ac", ts("08:00"), ts("08:30"), 3.4, 7.0))
    actual = {"sessions": s, "time": ts("08:00"), "battery_kw": np.array([0.0])}
    state, p, extras = f.plant_step(f.initial_state(), np.array([-7.0]), actual, 0.25)
    assert state["delivered_kwh"].get("urgent", 0.0) > 0 and "relaxed" not in state["delivered_kwh"]
    # The setpoint leaves cars 0 kW, but the plan gave them 20 kW: they get the plan.
    actual["ev_kw"] = np.array([20.0])
    _, p, extras = f.plant_step(f.initial_state(), np.array([0.0]), actual, 0.25)
    assert extras["ev_kw"][0] == pytest.approx(20.0) and p[0] == pytest.approx(-20.0)


def test_slot_energy_is_its_share_of_its_charger_on_a_coarse_step():
    # The per-charger parameters must give the LP of one (n_slots, T) mask, also on a
    # coarse step that holds the end of one session and the start of the next.
    depot = {**SPEC, "id": "depot", "slots_per_charger": 3, "battery": None, "chargers": [{"id": "ac", "rating_kw": 11}]}
    f = ChargingStationFleet([parse_asset_spec(SPEC), parse_asset_spec(depot)])
    horizon = Horizon.with_resolution(8, 0.25, [(0.5, 0.25), (2, 1.0)])  # steps of 1, 1, 4 and 2 quarter hours
    contribution = f.build(horizon)
    index = pd.date_range(ts("00:00"), periods=8, freq="15min")
    s = sessions(("a", "hub", "dc", ts("00:00"), ts("00:45"), 20.0, 50.0),
                 ("b", "hub", "dc", ts("01:00"), ts("03:00"), 30.0, 100.0),
                 ("c", "hub", "ac", ts("00:15"), ts("01:30"), 5.0, 7.0),
                 ("d", "depot", "ac", ts("00:30"), ts("02:00"), 8.0, 11.0))
    f.update(f.initial_state(), {"index": index, "sessions": s, "pv_avail_kw": np.zeros((0, 8))}, Penalties())
    ub = horizon.coarsen(f._slot_bounds(s, {}, index, 0.25)[0])
    charger_ub = np.zeros((f.n_chargers, horizon.n_steps))
    np.add.at(charger_ub, f.slot_ch, ub)
    mask = np.divide(ub, charger_ub[f.slot_ch], out=np.zeros_like(ub), where=charger_ub[f.slot_ch] > 0)
    assert np.sum((mask > 0) & (mask < 1)) == 2  # "a" and "b" share the hour-long step on "dc"
    cost = 0.5 * cp.sum(-contribution.p_kw) + sum(contribution.costs_cny.values())
    cp.Problem(cp.Minimize(cost), contribution.constraints).solve(solver=cp.HIGHS)
    expected_kwh = f.slot_eff * ((mask * f.charger_p.value[f.slot_ch]) @ horizon.step_h)
    np.testing.assert_allclose(f.slot_car_kwh.value, expected_kwh, atol=1e-9)
    report = f.session_report().set_index("session_id")
    slot = [f.slot_sessions.index(sid) for sid in report.index]
    np.testing.assert_allclose(report["planned_kwh"], expected_kwh[slot], atol=1e-9)
    assert report.loc["c", "planned_kwh"] + report.loc["c", "unmet_kwh"] == pytest.approx(5.0, abs=1e-6)


def test_sessions_are_read_afresh_from_a_new_table_and_net_of_delivered_energy():
    # The fleet keeps one table's sessions as arrays; a new table (the service builds one
    # per cycle) must replace them, and the state's delivered energy must always count.
    f = ChargingStationFleet([parse_asset_spec(SPEC)])
    index = pd.date_range(ts("08:00"), periods=8, freq="15min")
    first = sessions(("a", "hub", "ac", ts("08:00"), ts("10:00"), 10.0, 7.0))
    _, req, names = f._slot_bounds(first, {}, index, 0.25)
    assert [n for n in names if n] == ["a"] and req.sum() == pytest.approx(10.0)
    _, req, _ = f._slot_bounds(first, {"delivered_kwh": {"a": 4.0}}, index, 0.25)
    assert req.sum() == pytest.approx(6.0)
    _, req, names = f._slot_bounds(first, {"delivered_kwh": {"a": 10.0}}, index, 0.25)
    assert not any(names) and req.sum() == 0.0
    second = sessions(("b", "hub", "dc", ts("08:30"), ts("10:00"), 25.0, 60.0))
    _, req, names = f._slot_bounds(second, {"delivered_kwh": {"a": 4.0}}, index, 0.25)
    assert [n for n in names if n] == ["b"] and req.sum() == pytest.approx(25.0)
