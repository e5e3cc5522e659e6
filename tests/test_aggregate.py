"""The aggregate (virtual-asset) dispatch against the monolithic one, on small portfolios.

Parks here sit on a 17-bus generated feeder so that each test solves in seconds; the
portfolio-scale figures come from ``bench/bench_portfolio.py``.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest

from vpp.dispatch.aggregate import AggregateDispatcher, cluster_assets, evaluate_plan, with_ev_orders
from vpp.dispatch.dispatcher import Dispatcher
from vpp.dispatch.grid import GridModel
from vpp.errors import SpecError
from vpp.portfolio import (FeederSize, portfolio_park, portfolio_series, street_buses, synthetic_feeder,
                           synthetic_portfolio)

warnings.filterwarnings("ignore", category=FutureWarning)

SMALL = FeederSize(n_substations=2, lv_feeders=2, buses_per_feeder=3)
START = "2025-01-15"
# One grid iteration: both methods then solve their LP with the same grid corrections
# (those of the assets' fallback setpoints), so the inner-approximation bound is exact.
ONE_ITERATION = {"max_grid_iterations": 1}


def _start(park) -> pd.Timestamp:
    return pd.Timestamp(START, tz=park.site.timezone)


def _both(park):
    """Monolithic and aggregate plans of the park's first cycle, with their inputs and state."""
    series = portfolio_series(park, _start(park))
    inputs = series.horizon(park, _start(park))
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    mono = Dispatcher(park).dispatch(inputs, state)
    fast = AggregateDispatcher(park).dispatch(inputs, state)
    return inputs, state, mono, fast


def _member_plan(park, result):
    return ({k: result.p_kw[f.ids].to_numpy().T for k, f in park.fleets.items()},
            {k: result.q_kvar[f.ids].to_numpy().T for k, f in park.fleets.items()})


def _scaled_copies() -> list[dict]:
    """Assets that are scaled copies of one another in the same normalised state, at two buses."""
    buses = street_buses(SMALL)
    out = []
    for b, bus in enumerate((buses[2], buses[7])):
        for k, e_kwh in enumerate((5.0, 10.0, 13.5)):
            out.append({"id": f"bat-{b}-{k}", "kind": "battery", "bus": bus, "e_kwh": e_kwh,
                        "p_charge_max_kw": 0.5 * e_kwh, "p_discharge_max_kw": 0.5 * e_kwh,
                        "soc_initial_frac": 0.4 + 0.1 * b, "degradation_cny_per_kwh": 0.05})
        for k, design in enumerate((4.0, 6.0, 9.0)):
            out.append({"id": f"hp-{b}-{k}", "kind": "heat_pump", "bus": bus, "source": "air",
                        "p_el_max_kw": 0.54 * design, "t_supply_c": 35.0, "carnot_efficiency": 0.45,
                        "store_kwh_th": 3.5 * design, "soc_initial_frac": 0.6, "design_heat_kw_th": design})
        for k, kwp in enumerate((4.0, 8.0)):
            out.append({"id": f"pv-{b}-{k}", "kind": "pv", "bus": bus, "p_kwp": kwp, "inverter_kva": 0.9 * kwp,
                        "tilt_deg": 15.0 + 20.0 * k, "reactive_power": False})
        out.append({"id": f"homes-{b}", "kind": "load", "bus": bus, "profile": "residential", "peak_kw": 6.0})
    return out


def test_same_seed_same_portfolio():
    a, b = synthetic_portfolio(24, seed=3, size=SMALL), synthetic_portfolio(24, seed=3, size=SMALL)
    assert a.asset_ids == b.asset_ids and a.asset_bus == b.asset_bus
    assert all(fa.specs == fb.specs for fa, fb in zip(a.fleets.values(), b.fleets.values()))
    assert a.grid.bus_names == b.grid.bus_names
    np.testing.assert_array_equal(a.grid.branch_rating_kva, b.grid.branch_rating_kva)
    sa, sb = portfolio_series(a, _start(a)), portfolio_series(b, _start(b))
    for name in ("pv_avail_kw", "load_demand_kw", "heat_kw_th", "cop", "buy_price_cny_per_kwh"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name))
    pd.testing.assert_frame_equal(sa.sessions, sb.sessions)
    other = synthetic_portfolio(24, seed=4, size=SMALL)
    assert [s.model_dump() for s in other.fleets["battery"].specs] != [s.model_dump() for s in a.fleets["battery"].specs]


def test_scaled_copies_in_equal_state_plan_the_monolithic_optimum():
    park = portfolio_park(_scaled_copies(), SMALL, seed=5, settings=ONE_ITERATION)
    clusters = cluster_assets(park)
    assert all(int(cluster.max()) + 1 == 2 for cluster, _, _ in clusters.values())  # one virtual asset per bus
    inputs, state, mono, fast = _both(park)
    assert mono.status == fast.virtual.status == "optimal"
    assert fast.window_conflicts == 0
    assert fast.virtual.objective_cny == pytest.approx(mono.objective_cny, rel=1e-6)
    p_mono, q_mono = _member_plan(park, mono)
    checked_mono = evaluate_plan(park, inputs, state, p_mono, q_mono)
    checked_fast = evaluate_plan(park, inputs, state, fast.p_kw)
    assert checked_fast.limit_violations == checked_mono.limit_violations == 0


@pytest.fixture(scope="module")
def mixed():
    park = synthetic_portfolio(48, seed=2, size=SMALL, import_limit_kw=60.0, settings=ONE_ITERATION)
    return (park, *_both(park))


def test_mixed_portfolio_keeps_every_member_limit_within_the_bound(mixed):
    park, inputs, state, mono, fast = mixed
    assert mono.status == fast.virtual.status == "optimal"
    p_mono, q_mono = _member_plan(park, mono)
    checked_mono = evaluate_plan(park, inputs, state, p_mono, q_mono)
    checked_fast = evaluate_plan(park, inputs, state, fast.p_kw)
    assert checked_mono.limit_violations == 0
    assert checked_fast.limit_violations == 0, checked_fast.worst
    # An inner approximation of the members' flexibility: never below the optimum ...
    assert fast.virtual.objective_cny >= mono.objective_cny * (1 - 1e-6)
    # ... and, on this portfolio, within 1 % of it, judged on the members' setpoints.
    assert checked_fast.total_cny <= 1.01 * checked_mono.total_cny
    assert checked_fast.ev_unmet_kwh <= checked_mono.ev_unmet_kwh + 1e-3


def _battery_skip_bound_kw(fleet) -> np.ndarray:
    """Per virtual battery and planning step, the most its members may inject beyond its
    plan: (1 / (eta_ch eta_dis) - 1) times the smaller of each member's charge and
    discharge flows, the round trip its net setpoint skips."""
    st, share, c = fleet.members.storage, fleet.share[:, None], fleet.member_group
    end_per_h = fleet.end_moved.value[c] / fleet.horizon.step_h[None, :]
    charge = share * fleet.p_ch.value[c] + fleet.off_ch_kw + np.maximum(fleet.end_kwh, 0.0)[:, None] * end_per_h / st.eta_ch[:, None]
    discharge = (share * fleet.p_dis.value[c] + fleet.off_dis_kw
                 + np.maximum(-fleet.end_kwh, 0.0)[:, None] * end_per_h * st.eta_dis[:, None])
    return fleet.total((1.0 / (st.eta_ch * st.eta_dis) - 1.0)[:, None] * np.minimum(charge, discharge))


def _assert_members_match_the_plan(kind, virtual_fleet, members_kw, planned_kw):
    """Per virtual asset: members add up to the plan, batteries within the losses they skip."""
    excess = virtual_fleet.total(members_kw) - planned_kw
    if kind != "battery":
        np.testing.assert_allclose(excess, 0.0, rtol=0, atol=1e-6, err_msg=kind)
        return 0.0
    assert excess.min() >= -1e-6
    assert np.all(excess <= _battery_skip_bound_kw(virtual_fleet) + 1e-6)
    return float(excess.max())


def test_members_add_up_to_the_virtual_plan_per_bus(mixed):
    park, inputs, state, _, _ = mixed
    agg = AggregateDispatcher(park)
    fast = agg.dispatch(inputs, state)
    problem = agg.dispatcher.problem
    plan = fast.virtual.p_kw
    skipped_kw = 0.0
    for kind, fleet in park.fleets.items():
        assert fast.p_kw[kind].shape == (fleet.n, plan.shape[0])
        virtual = problem.fleets[kind]
        skipped_kw = max(skipped_kw, _assert_members_match_the_plan(kind, virtual, fast.p_kw[kind],
                                                                    plan[virtual.ids].to_numpy().T))
    # The batteries start at spread states, so some offsets net against their share ...
    assert 1e-3 < skipped_kw <= fast.bus_mismatch_kw + 1e-9
    # ... and their setpoints then had an AC check of their own.
    assert fast.base_check_s > 0 and fast.base_violations == 0 and fast.virtual.reason is None
    # Members follow their planned energy: their share of the virtual energy plus offset.
    batteries, st = problem.fleets["battery"], park.fleets["battery"].storage
    p = fast.p_kw["battery"]
    e = np.empty((st.n, p.shape[1] + 1))
    e[:, 0] = state["battery"]["e_kwh"]
    for t in range(p.shape[1]):
        flow = np.where(p[:, t] < 0, -p[:, t] * st.eta_ch, -p[:, t] / st.eta_dis) * park.settings.dt_h
        e[:, t + 1] = e[:, t] * (1.0 - st.sd_per_h * park.settings.dt_h) + flow
    planned = batteries.share[:, None] * batteries.e.value[batteries.member_group] + batteries.offsets_kwh()
    np.testing.assert_allclose(e, planned, rtol=0, atol=1e-5)


def test_battery_end_offsets_move_where_the_lp_places_them(mixed):
    """The end part of the offsets: one profile per group, 0 until the start part is
    gone and outside the last END_WINDOW_H hours, rising to 1 at the end, so every
    member ends at its own target (here its start: no end targets are set)."""
    from vpp.dispatch.virtual import END_WINDOW_H

    park, inputs, state, _, _ = mixed
    agg = AggregateDispatcher(park)
    fast = agg.dispatch(inputs, state)
    batteries = agg.dispatcher.problem.fleets["battery"]
    b, T = batteries.end_b.value, batteries.horizon.n_steps
    assert np.abs(batteries.end_kwh).max() > 0.1   # spread states: the members do part again
    np.testing.assert_allclose(b[:, -1], 1.0, atol=1e-7)
    assert np.all(np.diff(b, axis=1) >= -1e-7)
    window = int(round(END_WINDOW_H / park.settings.dt_h))
    assert np.all(b[:, : T - window] <= 1e-7)
    assert np.all(b <= batteries.end_allowed.value + 1e-7)
    st, p = park.fleets["battery"].storage, fast.p_kw["battery"]
    e = np.array(state["battery"]["e_kwh"], float)
    for t in range(T):
        e = e * (1.0 - st.sd_per_h * park.settings.dt_h) + np.where(
            p[:, t] < 0, -p[:, t] * st.eta_ch, -p[:, t] / st.eta_dis) * park.settings.dt_h
    assert np.all(e >= np.clip(state["battery"]["e_kwh"], st.e_min_kwh, st.e_max_kwh) - 1e-5)


def test_a_fallback_cycle_gives_members_their_own_fallbacks():
    park = synthetic_portfolio(24, seed=6, size=SMALL, settings={"time_budget_s": 1e-9})
    inputs = portfolio_series(park, _start(park)).horizon(park, _start(park))
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    fast = AggregateDispatcher(park).dispatch(inputs, state)
    assert not fast.ok and fast.virtual.status == "fallback"
    horizon = Dispatcher(park).problem.horizon
    for kind, fleet in park.fleets.items():
        own = fleet.fallback_kw(state[kind], inputs.forecasts.get(kind, {}), horizon)
        np.testing.assert_allclose(fast.p_kw[kind], own, rtol=0, atol=1e-9, err_msg=kind)
    # The virtual fallback the dispatcher checked on the grid is the members' sum.
    assert fast.bus_mismatch_kw < 1e-9


def test_a_station_with_a_battery_cannot_be_aggregated():
    buses = street_buses(SMALL)
    assets = [{"id": "st-1", "kind": "charging_station", "bus": buses[0], "import_limit_kw": 11.0,
               "chargers": [{"id": "c", "rating_kw": 11.0}],
               "battery": {"e_kwh": 10.0, "p_charge_max_kw": 5.0, "p_discharge_max_kw": 5.0}}]
    park = portfolio_park(assets, SMALL)
    with pytest.raises(SpecError) as error:
        AggregateDispatcher(park)
    assert error.value.field == "aggregate.charging_station[st-1]"


def test_plan_groups_follow_the_lv_feeders():
    park = synthetic_portfolio(48, seed=2, size=SMALL)
    feeder = park.grid.feeder_of_bus()
    # 2 substations: one label for the MV side, one per substation's LV network.
    assert len(set(feeder)) == 3
    names = park.grid.bus_names
    assert len({feeder[names.index(b)] for b in street_buses(SMALL)[:6]}) == 1
    assert feeder[names.index("source")] == feeder[names.index("mv0")] != feeder[names.index("lv0")]
    for group_by, most in (("bus", None), ("feeder", 2 * 3), ("portfolio", 3)):
        clusters = cluster_assets(park, group_by)
        cluster, ids, group = clusters["heat_pump"]
        if most is None:
            np.testing.assert_array_equal(group, np.arange(len(ids)))
        else:
            assert int(group.max()) + 1 <= most < len(ids)
        bus = park.bus_positions("heat_pump")
        for g in np.unique(group):   # a group holds one product, on one LV feeder unless portfolio-wide
            rows = np.flatnonzero(group == g)
            members = np.flatnonzero(np.isin(cluster, rows))
            assert len({park.fleets["heat_pump"].specs[i].t_supply_c for i in members}) == 1
            if group_by == "feeder":
                assert len(set(feeder[bus[members]])) == 1
    with pytest.raises(SpecError) as error:
        cluster_assets(park, "street")
    assert error.value.field == "aggregate.group_by"


def test_grouped_plans_stay_within_one_percent_and_keep_every_limit(mixed):
    park, inputs, state, mono, _ = mixed
    p_mono, q_mono = _member_plan(park, mono)
    checked_mono = evaluate_plan(park, inputs, state, p_mono, q_mono)
    for group_by in ("bus", "portfolio"):
        fast = AggregateDispatcher(park, group_by=group_by).dispatch(inputs, state)
        assert fast.ok and fast.base_violations == 0
        checked = evaluate_plan(park, inputs, state, fast.p_kw)
        assert checked.limit_violations == 0, (group_by, checked.worst)
        assert fast.virtual.objective_cny >= mono.objective_cny * (1 - 1e-6)
        assert checked.total_cny <= 1.01 * checked_mono.total_cny, group_by


def test_a_coarse_horizon_gives_base_step_setpoints_within_the_members_power_limits():
    coarse = [(2, 0.25), (6, 0.5), (24, 1.0)]
    park = synthetic_portfolio(48, seed=2, size=SMALL, import_limit_kw=60.0, settings={"horizon_resolution": coarse})
    inputs = portfolio_series(park, _start(park)).horizon(park, _start(park))
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    agg = AggregateDispatcher(park)
    fast = agg.dispatch(inputs, state)
    hz = agg.dispatcher.problem.horizon
    assert fast.ok and hz.n_steps < hz.n_base_steps
    for kind, fleet in park.fleets.items():
        assert fast.p_kw[kind].shape == (fleet.n, hz.n_base_steps)
    # Every planning step's block mean of the members is the virtual plan (batteries'
    # within the losses they skip).
    virtual_fleets = agg.dispatcher.problem.fleets
    for kind, c in agg.dispatcher.problem.contributions.items():
        _assert_members_match_the_plan(kind, virtual_fleets[kind], hz.coarsen(fast.p_kw[kind]), c.p_kw.value)
    # Power limits hold in every base step, not only on block averages.
    checked = evaluate_plan(park, inputs, state, fast.p_kw)
    for name in ("pv.p_avail_kw", "pv.p_negative_kw", "battery.p_charge_kw", "battery.p_discharge_kw",
                 "heat_pump.p_max_kw", "heat_pump.p_min_kw", "charging_station.p_car_max_kw",
                 "charging_station.p_export_kw"):
        assert checked.violations.get(name, 0) == 0, (name, checked.worst[name])
    # Stores are planned at block ends: inside a block they drift by at most what the
    # block's own demand variation moves them (here well under 0.1 kWh).
    assert max(checked.worst.values()) < 0.1, checked.worst
    assert checked.ev_unmet_kwh < 1e-3


def test_sparse_and_dense_grid_rows_plan_the_same_optimum():
    """Both forms state one linear grid model: a tight feeder gives equal optima and
    equal grid-row activity, whichever the LP carries.  With lazy rows the sparse form's
    interior-point solves leave the relaxed rows out (HighsArrays' unreachable rows) and
    still end at the whole LP's optimum."""
    results, solvers = {}, {}
    for form, lazy in (("dense", False), ("sparse", False), ("sparse", True)):
        park = synthetic_portfolio(48, seed=2, size=SMALL, import_limit_kw=60.0,
                                   settings={**ONE_ITERATION, "grid_model": form, "lazy_grid_rows": lazy})
        # A narrow voltage band and low loading limits, so that grid rows are in the LP and bind.
        park = dataclasses.replace(park, grid=GridModel(synthetic_feeder(SMALL, 2), 0.99, 1.022, 15.0))
        inputs = portfolio_series(park, _start(park)).horizon(park, _start(park))
        state = {k: f.initial_state() for k, f in park.fleets.items()}
        agg = AggregateDispatcher(park)
        results[form, lazy] = agg.dispatch(inputs, state)
        solvers[form, lazy] = agg.dispatcher.solvers["HIGHS"]
        assert agg.dispatcher.problem.grid_form == form
        problem = agg.dispatcher.problem
        assert problem.watched_buses.size > 0 and problem.group_rep.size > 0
    dense = results["dense", False]
    assert all(r.ok for r in results.values())
    for lazy in (False, True):
        assert results["sparse", lazy].virtual.objective_cny == pytest.approx(dense.virtual.objective_cny, rel=1e-6)
    lazy_solver = solvers["sparse", True]
    assert lazy_solver.rows_left_out > 0 and lazy_solver.whole_lp_resolves == 0


def test_coarse_plan_quarter_hours_keep_the_grid_limits(monkeypatch):
    """A coarse planning step's limits hold for its block's mean; its quarter hours (cars
    charging in part of a 2-hour block, the base load's shape) can break them.  The cycle
    AC-checks every quarter hour of the members' setpoints and re-plans with each block's
    spread as a margin: no violation is left, as evaluate_plan confirms independently."""
    from vpp.dispatch import aggregate

    park = synthetic_portfolio(100, seed=3, import_limit_kw=150.0,
                               settings={"horizon_resolution": [[1, 0.25], [24, 2.0]]})
    at = pd.Timestamp("2025-01-15 12:00", tz=park.site.timezone)
    inputs = portfolio_series(park, at).horizon(park, at)
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    results, spread = {}, {}
    for rounds in (0, 1):
        monkeypatch.setattr(aggregate, "_BASE_ROUNDS", rounds)
        fast = AggregateDispatcher(park)
        result = fast.dispatch(inputs, state)
        spread[rounds] = fast.dispatcher.problem.block_spread
        check = evaluate_plan(park, inputs, state, result.p_kw)
        assert result.ok and result.rounds == rounds + 1
        assert result.base_violations == check.grid_violations
        results[rounds] = result
    # The planning steps alone looked fine; their quarter hours did not.
    assert results[0].virtual.violations_remaining == 0 and results[0].base_violations > 0
    assert "quarter hours" in results[0].virtual.reason
    assert results[1].base_violations == 0
    # The margins came from the blocks' spread: some block's import limit was lowered.
    assert spread[1]["import"].max() > 0


def test_strict_window_replans_only_for_quarter_hours_it_covers(monkeypatch):
    """With ``strict_hours`` a cycle plans again only for quarter-hour violations inside
    that window; one just outside it is left (and reported) for the next cycle, one just
    inside it triggers the second plan."""
    from vpp.dispatch import aggregate
    from vpp.dispatch.dispatcher import base_limits
    from vpp.dispatch.result import count_violations

    resolution = {"horizon_resolution": [[1, 0.25], [24, 2.0]]}
    park = synthetic_portfolio(100, seed=3, import_limit_kw=150.0, settings=resolution)
    at = pd.Timestamp("2025-01-15 12:00", tz=park.site.timezone)
    inputs = portfolio_series(park, at).horizon(park, at)
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    # The first quarter hour the single plan breaks.
    with monkeypatch.context() as patch:
        patch.setattr(aggregate, "_BASE_ROUNDS", 0)
        one = AggregateDispatcher(park).dispatch(inputs, state)
    ac = park.grid.run_ac(*aggregate.member_bus_injections(park, one.p_kw))
    k = int(np.flatnonzero(count_violations(ac, *base_limits(park.grid, inputs)))[0])
    assert k >= 1
    for hours, rounds in ((k * 0.25, 1), ((k + 1) * 0.25, 2)):
        strict = synthetic_portfolio(100, seed=3, import_limit_kw=150.0, settings={**resolution, "strict_hours": hours})
        result = AggregateDispatcher(strict).dispatch(inputs, state)
        assert result.ok and result.rounds == rounds, hours
        check = evaluate_plan(strict, inputs, state, result.p_kw)
        assert result.base_violations == check.grid_violations
        if rounds == 1:
            # Left for the next cycle, and said so: none of them inside the window.
            assert result.base_violations > 0 and result.strict_violations == 0
            assert f"0 of them in the first {hours:g} h" in result.virtual.reason


def test_portfolio_lp_is_compiled_at_start_up_and_reused_by_the_first_cycle():
    """AggregateDispatcher compiles its LP when it is built; the first cycle writes
    parameter values into that compiled program instead of compiling again."""
    park = synthetic_portfolio(40, seed=4, size=SMALL)
    fast = AggregateDispatcher(park)
    compiled = fast.dispatcher.problem.problem._cache.param_prog
    assert compiled is not None and fast.compile_s > 0
    inputs = portfolio_series(park, _start(park)).horizon(park, _start(park))
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    assert fast.dispatch(inputs, state).ok
    assert fast.dispatcher.problem.problem._cache.param_prog is compiled


COARSE_HOURS = {"horizon_resolution": [[2, 0.25], [6, 0.5], [24, 1.0]]}


def _plan_at(park, when: str, state: dict):
    at = pd.Timestamp(when, tz=park.site.timezone)
    inputs = portfolio_series(park, at).horizon(park, at)
    return inputs, AggregateDispatcher(park).dispatch(inputs, state)


def test_heat_pump_offsets_fall_no_faster_than_the_members_demand():
    """On a summer morning the heat pumps have almost no heat to deliver.  A member whose
    store is fuller than its share of the group cannot shed heat faster than its own
    demand and losses take it, so its offset may not fall faster either; before that
    bound, the even-out ramp made every group heat into a full store and the LP had no
    solution (the whole portfolio fell back).  The plan now exists and every member's
    store stays within its limits."""
    park = synthetic_portfolio(60, seed=1, settings=COARSE_HOURS)
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    inputs, result = _plan_at(park, "2025-07-15 10:00", state)
    assert result.ok, result.virtual.reason
    checked = evaluate_plan(park, inputs, state, result.p_kw)
    for name in ("heat_pump.store_max_kwh_th", "heat_pump.p_max_kw", "heat_pump.p_min_kw"):
        assert checked.violations.get(name, 0) == 0, (name, checked.worst.get(name))


def test_members_that_start_full_end_where_they_started():
    """Without end targets, every member should end where it starts.  Half the members
    start full: their offsets fall while the group charges at noon, so the plant skips
    losses the plan counts.  Members follow their planned energy, so no margin for that
    narrows their window and each one still ends at its start (before, the window lost
    the margin, the group could not end as full as it started and, earlier still, half
    the members full at 11:00 sent the whole portfolio to its fallback)."""
    park = synthetic_portfolio(60, seed=1, settings=COARSE_HOURS)
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    storage = park.fleets["battery"].storage
    e_kwh = 0.3 * storage.e_kwh
    e_kwh[::2] = storage.e_max_kwh[::2]
    state["battery"] = dict(state["battery"], e_kwh=e_kwh)
    inputs, result = _plan_at(park, "2025-01-15 11:00", state)
    assert result.ok, result.virtual.reason
    checked = evaluate_plan(park, inputs, state, result.p_kw)
    for name in ("battery.soc_max_kwh", "battery.soc_min_kwh", "battery.p_charge_kw", "battery.p_discharge_kw",
                 "battery.end_kwh"):
        assert checked.violations.get(name, 0) == 0, (name, checked.worst.get(name))


def test_valley_schedule_fills_the_cars_in_turn_where_the_rest_of_the_portfolio_draws_least():
    from vpp.dispatch.virtual import reference_schedules

    cap = np.zeros((2, 10))
    cap[0, 0:8] = 2.0   # car 0 plugged in for steps 0-7, car 1 for steps 2-9, 2 kWh per step
    cap[1, 2:10] = 2.0
    table = {"cap_kwh": cap, "need_kwh": np.array([6.0, 3.0])}
    others_kw = np.array([9, 8, 1, 7, 2, 6, 3, 5, 4, 0], float)
    refs = reference_schedules(table, np.full(10, 0.5), others_kw, dt_h=0.25)
    assert refs.shape == (7, 2, 10)
    np.testing.assert_allclose(refs.sum(axis=2), np.tile([6.0, 3.0], (7, 1)))  # each meets the need ...
    assert np.all(refs >= 0.0) and np.all(refs <= cap + 1e-12)                 # ... while plugged in, within rate
    # Car 0 has less slack and goes first, into the others' lowest steps it is plugged in
    # for (2, 4, 6); car 1 then fills step 9 and, step 2 now being taken, step 8.
    np.testing.assert_allclose(refs[-1], [[0, 0, 2, 0, 2, 0, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 2]])
    # The aggregate dispatcher sorts by the others' forecast draw: loads and heat over COP less PV.
    park = synthetic_portfolio(48, seed=2, size=SMALL)
    inputs = portfolio_series(park, _start(park)).horizon(park, _start(park))
    f = inputs.forecasts
    expected = (f["load"]["demand_kw"].sum(axis=0) - f["pv"]["avail_kw"].sum(axis=0)
                + (f["heat_pump"]["heat_kw_th"] / f["heat_pump"]["cop"]).sum(axis=0))
    np.testing.assert_allclose(with_ev_orders(park, inputs).forecasts["charging_station"]["others_kw"], expected)
