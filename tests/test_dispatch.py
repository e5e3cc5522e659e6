"""The dispatch cycle: optimality against an independent LP, bounds, grid limits, fallbacks."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linprog

from conftest import day_index, office_load_kw
from vpp.dispatch.dispatcher import Dispatcher
from vpp.dispatch.problem import FlexRequest, HorizonInputs

BATTERY = {"id": "bess", "kind": "battery", "bus": "bus4", "e_kwh": 200, "p_charge_max_kw": 50,
           "p_discharge_max_kw": 50, "eta_charge": 0.95, "eta_discharge": 0.95, "soc_min_frac": 0.1,
           "soc_max_frac": 0.9, "soc_initial_frac": 0.5, "degradation_cny_per_kwh": 0.02,
           "self_discharge_frac_per_h": 0.0}
LOAD = {"id": "office", "kind": "load", "bus": "bus3", "peak_kw": 100, "power_factor": 1.0}


def inputs_for(park, load_kw, **overrides):
    index = day_index(park.settings.horizon_steps)
    T = len(index)
    forecasts = {}
    if "load" in park.fleets:
        forecasts["load"] = {"demand_kw": np.tile(load_kw, (park.fleets["load"].n, 1))}
    fields = dict(
        index=index, forecasts=forecasts, buy_price_cny_per_kwh=park.tariff.buy_price_cny_per_kwh(index),
        sell_price_cny_per_kwh=park.tariff.sell_price_cny_per_kwh(index), carbon_kg_per_kwh=park.carbon.intensity(index),
        import_limit_kw=np.full(T, park.connection.import_limit_kw),
        export_limit_kw=np.full(T, park.connection.export_limit_kw),
    )
    fields.update(overrides)
    return HorizonInputs(**fields)


def initial_state(park):
    return {k: f.initial_state() for k, f in park.fleets.items()}


def linprog_battery_cost(load_kw, buy, sell, dt_h, b, carbon_cny_per_kwh):
    """The same day solved by scipy's linprog from scratch: x = [ch, dis, e(T+1), imp, exp]."""
    T = len(load_kw)
    n = 5 * T + 1
    ich, idis, ie, iimp, iexp = 0, T, 2 * T, 3 * T + 1, 4 * T + 1
    c = np.zeros(n)
    c[ich:ich + T] = b["degradation_cny_per_kwh"] * dt_h
    c[idis:idis + T] = b["degradation_cny_per_kwh"] * dt_h
    c[iimp:iimp + T] = (buy + carbon_cny_per_kwh) * dt_h
    c[iexp:iexp + T] = -sell * dt_h
    A_eq, b_eq = [], []
    e0 = b["soc_initial_frac"] * b["e_kwh"]
    row = np.zeros(n); row[ie] = 1; A_eq.append(row); b_eq.append(e0)
    for t in range(T):
        row = np.zeros(n)
        row[ie + t + 1], row[ie + t] = 1, -1
        row[ich + t], row[idis + t] = -b["eta_charge"] * dt_h, dt_h / b["eta_discharge"]
        A_eq.append(row); b_eq.append(0.0)
        row = np.zeros(n)  # imp - exp - ch + dis = load
        row[iimp + t], row[iexp + t], row[ich + t], row[idis + t] = 1, -1, -1, 1
        A_eq.append(row); b_eq.append(load_kw[t])
    bounds = ([(0, b["p_charge_max_kw"])] * T + [(0, b["p_discharge_max_kw"])] * T
              + [(None, None)] + [(b["soc_min_frac"] * b["e_kwh"], b["soc_max_frac"] * b["e_kwh"])] * T
              + [(0, None)] * 2 * T)
    bounds[ie + T] = (max(e0, bounds[ie + T][0]), bounds[ie + T][1])  # end no lower than the start
    res = linprog(c, A_eq=np.array(A_eq), b_eq=np.array(b_eq), bounds=bounds, method="highs")
    assert res.status == 0
    return res.fun, res.x[ich:ich + T], res.x[idis:idis + T]


def test_battery_arbitrage_matches_independent_lp(make_park):
    park = make_park([BATTERY, LOAD], carbon={"intensity_kg_per_kwh": 0.6, "price_cny_per_t": 100.0})
    index = day_index()
    load = office_load_kw(index, 100.0)
    d = Dispatcher(park)
    result = d.dispatch(inputs_for(park, load), initial_state(park))
    assert result.status == "optimal", result.reason
    assert 0 < result.solver_s <= result.solve_s <= result.total_s  # the time split the benchmarks print
    buy = park.tariff.buy_price_cny_per_kwh(index)
    # The optimizer buys the feeder's losses too (estimated by the AC check); so does the check.
    losses = d.problem.p["losses"].value
    assert 0 < losses.max() < 5
    expected, ch, dis = linprog_battery_cost(load + losses, buy, park.tariff.sell_price_cny_per_kwh(index), 0.25, BATTERY,
                                             0.6 * 100.0 / 1000)
    assert result.objective_cny == pytest.approx(expected, rel=1e-6, abs=1e-4)
    p = result.p_kw["bess"].to_numpy()
    bands = park.tariff.bands(index)
    # Charges in the valley, discharges at the peak.
    assert p[bands == "valley"].sum() < -50 and np.all(p[bands == "valley"] <= 1e-6)
    assert p[bands == "peak"].sum() > 50 and np.all(p[bands == "peak"] >= -1e-6)


def test_plan_respects_soc_and_power_bounds(make_park):
    park = make_park([BATTERY, LOAD])
    result = Dispatcher(park).dispatch(inputs_for(park, office_load_kw(day_index())), initial_state(park))
    soc = result.details["soc_frac"]["bess"]
    assert soc.min() >= 0.1 - 1e-7 and soc.max() <= 0.9 + 1e-7
    p = result.p_kw["bess"]
    assert p.min() >= -50 - 1e-6 and p.max() <= 50 + 1e-6
    # End-of-horizon SoC is no lower than the start (no free energy from the battery).
    assert soc.iloc[-1] >= 0.5 - 1e-6


def test_ac_balance_at_every_bus(make_park):
    """The plan's AC solution balances power at every bus (checked with pandapower itself)."""
    import pandapower as pp

    park = make_park([BATTERY, LOAD])
    d = Dispatcher(park)
    result = d.dispatch(inputs_for(park, office_load_kw(day_index())), initial_state(park))
    p_kw, q_kvar = d.problem.injections()
    P, Q = d.problem.bus_injections(p_kw, q_kvar)
    grid = park.grid
    for t in (0, 40, 72):
        ac = grid.run_pandapower(P[t], Q[t])
        assert ac.converged[0]
        # pandapower's res_bus.p_mw is the net consumption at each bus: minus our injection.
        net = grid.net
        res_p_kw = net.res_bus.p_mw.loc[grid.bus_index].to_numpy() * 1000
        mask = np.arange(grid.n_buses) != grid.slack_position
        np.testing.assert_allclose(-res_p_kw[mask], P[t][mask], atol=1e-6)
        # And the park's import equals consumption plus losses.
        assert result.grid["p_import_kw"].iloc[t] == pytest.approx(-P[t].sum() + result.grid["losses_kw"].iloc[t],
                                                                   abs=1e-3)
        assert result.grid["losses_kw"].iloc[t] >= 0


def test_binding_transformer_limit_holds_in_ac(make_park):
    # 0.25 MVA transformer; the battery would like to charge 200 kW in the valley on top of the load.
    big = {**BATTERY, "e_kwh": 1000, "p_charge_max_kw": 200, "p_discharge_max_kw": 200}
    park = make_park([big, {**LOAD, "peak_kw": 150}])
    index = day_index()
    load = np.where(index.hour < 8, 120.0, 150.0)
    result = Dispatcher(park).dispatch(inputs_for(park, load), initial_state(park))
    assert result.status == "optimal", result.reason
    loading = result.grid["max_loading_percent"]
    assert loading.max() <= 100.0 + 1e-6
    assert loading.max() >= 97.0  # the limit really binds
    assert result.violations_remaining == 0


def test_infeasible_request_falls_back_with_reason(make_park):
    park = make_park([BATTERY, LOAD], connection={"import_limit_kw": 20, "export_limit_kw": 0})
    d = Dispatcher(park)
    result = d.dispatch(inputs_for(park, office_load_kw(day_index())), initial_state(park))
    assert result.status == "fallback"
    assert "infeasible" in result.reason and "least" in result.reason
    load = office_load_kw(day_index())
    assert np.allclose(result.p_kw["office"], -load)
    # The published plan exceeds the 20 kW limit as little as the battery allows: it
    # discharges against the office peak, flattening the overload.
    imp = result.grid["p_import_kw"].to_numpy()
    assert result.p_kw["bess"].max() > 10.0
    assert imp.max() < load.max() - 10.0
    # The battery's energy comes back at night, below the flattened peak.
    assert result.p_kw["bess"].min() < -5.0


def test_infeasible_with_no_elastic_way_out_falls_back_to_asset_fallbacks(make_park, monkeypatch):
    park = make_park([BATTERY, LOAD], connection={"import_limit_kw": 20, "export_limit_kw": 0})
    d = Dispatcher(park)
    monkeypatch.setattr(d, "_least_excess", lambda *args: None)
    result = d.dispatch(inputs_for(park, office_load_kw(day_index())), initial_state(park))
    assert result.status == "fallback" and "infeasible" in result.reason
    assert np.all(result.p_kw["bess"] == 0)  # battery fallback: idle


def test_fallback_reuses_the_previous_plan_shifted(make_park, monkeypatch):
    import cvxpy as cp

    park = make_park([BATTERY, LOAD])
    d = Dispatcher(park)
    first = d.dispatch(inputs_for(park, office_load_kw(day_index())), initial_state(park))
    assert first.ok
    later = day_index(start="2025-01-15 04:00")
    inputs = inputs_for(park, office_load_kw(later), index=later,
                        buy_price_cny_per_kwh=park.tariff.buy_price_cny_per_kwh(later))

    def broken(*args, **kwargs):
        raise cp.error.SolverError("injected failure")

    monkeypatch.setattr(d.problem.problem, "solve", broken)
    result = d.dispatch(inputs, initial_state(park))
    assert result.status == "fallback" and "previous plan" in result.reason
    overlap = first.p_kw["bess"].loc[later[0]:]
    np.testing.assert_allclose(result.p_kw["bess"].loc[overlap.index], overlap)
    assert np.all(result.p_kw["bess"].loc[later[later > first.index[-1]]] == 0)


def test_flex_request_lowers_import_in_its_window(make_park):
    park = make_park([BATTERY, LOAD])
    index = day_index()
    load = office_load_kw(index)
    base = Dispatcher(park).dispatch(inputs_for(park, load), initial_state(park))
    window = (index >= pd.Timestamp("2025-01-15 09:00", tz="Asia/Shanghai")) & (
        index < pd.Timestamp("2025-01-15 11:00", tz="Asia/Shanghai"))
    request = FlexRequest(index[window][0], index[window][-1] + pd.Timedelta("15min"), max_import_kw=60.0,
                          price_cny_per_kwh=20.0)
    flexed = Dispatcher(park).dispatch(inputs_for(park, load, flex_requests=[request]), initial_state(park))
    assert flexed.ok
    net = -flexed.p_kw.sum(axis=1).to_numpy()
    assert np.all(net[window] <= 60.0 + 1e-6)
    assert (-base.p_kw.sum(axis=1).to_numpy()[window]).max() > 60.0  # the request changed the plan
    assert flexed.costs_cny["flex_deviation"] == pytest.approx(0.0, abs=1e-6)


def test_resolve_with_new_parameters_matches_a_fresh_build(make_park):
    """DPP: updating parameters of a compiled problem gives the fresh problem's optimum."""
    import cvxpy as cp

    from vpp.dispatch.problem import DispatchProblem

    park = make_park([BATTERY, LOAD])
    index = day_index()
    reused = DispatchProblem(park)
    reused.update(inputs_for(park, office_load_kw(index, 80.0)), initial_state(park))
    reused.problem.solve(solver=cp.HIGHS)
    reused.update(inputs_for(park, office_load_kw(index, 120.0)), initial_state(park))
    reused.problem.solve(solver=cp.HIGHS)
    fresh = DispatchProblem(make_park([BATTERY, LOAD]))
    fresh.update(inputs_for(park, office_load_kw(index, 120.0)), initial_state(park))
    fresh.problem.solve(solver=cp.HIGHS)
    assert reused.problem.value == pytest.approx(fresh.problem.value, rel=1e-7)


def test_highs_through_arrays_gives_cvxpys_highs_solution(make_park):
    """The array hand-over to HiGHS changes the copy, not the LP: same optimum, same primal
    and dual values, same statuses as cvxpy's own HiGHS interface."""
    import cvxpy as cp

    from vpp.dispatch.highs import HighsArrays
    from vpp.dispatch.problem import DispatchProblem

    park = make_park([BATTERY, LOAD])
    index = day_index()
    problem = DispatchProblem(park)
    problem.update(inputs_for(park, office_load_kw(index, 120.0)), initial_state(park))
    solved = {}
    for solver in (cp.HIGHS, HighsArrays()):
        problem.problem.solve(solver=solver)
        assert problem.problem.status == cp.OPTIMAL
        solved[solver if isinstance(solver, str) else "arrays"] = (
            problem.problem.value, np.concatenate([v.value.ravel() for v in problem.problem.variables()]),
            np.concatenate([np.ravel(c.dual_value) for c in problem.problem.constraints]))
    (obj_a, x_a, y_a), (obj_b, x_b, y_b) = solved[cp.HIGHS], solved["arrays"]
    assert obj_b == pytest.approx(obj_a, rel=1e-9)
    assert np.allclose(x_b, x_a, atol=1e-6) and np.allclose(y_b, y_a, atol=1e-6)
    # Without duals (the dispatcher's solver): the same optimum and primal values, and
    # no constraint keeps a dual from an earlier solve.
    for c in problem.problem.constraints:
        c.dual_variables[0].save_value(None)
    problem.problem.solve(solver=HighsArrays(duals=False))
    assert problem.problem.status == cp.OPTIMAL
    assert problem.problem.value == pytest.approx(obj_a, rel=1e-9)
    assert np.allclose(np.concatenate([v.value.ravel() for v in problem.problem.variables()]), x_a, atol=1e-6)
    assert all(c.dual_value is None for c in problem.problem.constraints)
    # An infeasible LP maps to cvxpy's INFEASIBLE through either path.
    x = cp.Variable(2)
    infeasible = cp.Problem(cp.Minimize(cp.sum(x)), [x >= 1, cp.sum(x) <= 1])
    for solver in (cp.HIGHS, HighsArrays()):
        infeasible.solve(solver=solver)
        assert infeasible.status == cp.INFEASIBLE


def test_interior_point_without_the_switched_off_rows_solves_the_same_lp():
    """For interior point, HighsArrays leaves out rows whose coefficients a 0/1
    parameter has zeroed (lazy grid rows switched off): the optimum, the primal values
    and the duals (zero for the left-out rows) are those of the whole LP, and a
    switched-off row that cannot hold (0 <= -1) still makes the LP infeasible."""
    import cvxpy as cp

    from vpp.dispatch.highs import HighsArrays

    x = cp.Variable(3, nonneg=True)
    on = cp.Parameter(2, nonneg=True)
    cap = cp.Parameter(2)
    rows = [cp.multiply(on, x[:2]) <= cap]
    problem = cp.Problem(cp.Minimize(np.array([-1.0, -2.0, 2.0]) @ x), rows + [cp.sum(x) <= 10, x[2] >= 1])
    ipm = {"solver": "ipm", "run_crossover": "off"}
    for on_value, cap_value in (([1.0, 0.0], [3.0, 5.0]), ([0.0, 0.0], [4.0, 5.0]), ([1.0, 1.0], [2.0, 2.5])):
        on.value, cap.value = np.array(on_value), np.array(cap_value)
        problem.solve(solver=cp.HIGHS)
        whole = problem.value, x.value.copy(), rows[0].dual_value.copy()
        problem.solve(solver=HighsArrays(), highs_options=ipm)
        assert problem.status == cp.OPTIMAL and problem.value == pytest.approx(whole[0], abs=1e-6)
        assert np.allclose(x.value, whole[1], atol=1e-5) and np.allclose(rows[0].dual_value, whole[2], atol=1e-5)
        assert np.all(rows[0].dual_value[np.array(on_value) == 0.0] == 0.0)
    on.value, cap.value = np.array([0.0, 1.0]), np.array([-1.0, 5.0])
    problem.solve(solver=HighsArrays(), highs_options=ipm)
    assert problem.status == cp.INFEASIBLE


def test_interior_point_leaves_out_unreachable_rows_and_checks_them():
    """With ``unreachable_rhs``, an interior-point solve leaves out the rows ``a x <= b``
    with ``b`` at or above it (vpp's relaxed grid rows).  Where the solution keeps them
    the answer is the whole LP's without a second solve; where it breaks one, or the LP
    without them is unbounded, HighsArrays solves the whole LP again and returns its
    optimum.  An LP infeasible without them is infeasible with them: no second solve."""
    import cvxpy as cp

    from vpp.dispatch.highs import HighsArrays

    x = cp.Variable(2, nonneg=True)
    cap = cp.Parameter(2)
    reachable = cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(-x[0] - 2.0 * x[1]), [x <= cap, 0.5 * x[1] <= reachable])
    ipm = {"solver": "ipm", "run_crossover": "off"}
    cases = (
        ([5.0, 1e6], 10.0, 0),   # the 1e6 row is slack at the reduced optimum: one solve
        ([5.0, 1.5e5], 9e4, 1),  # reduced optimum x1 = 1.8e5 breaks x1 <= 1.5e5: whole LP again
        ([5.0, 2e5], 2e5, 1),    # both rows on x1 left out: unbounded without them
    )
    for cap_value, reachable_value, resolves in cases:
        cap.value, reachable.value = np.array(cap_value), reachable_value
        problem.solve(solver=cp.HIGHS)
        whole = problem.value, x.value.copy()
        solver = HighsArrays(unreachable_rhs=1e5)
        problem.solve(solver=solver, highs_options=ipm)
        assert problem.status == cp.OPTIMAL and solver.whole_lp_resolves == resolves
        assert problem.value == pytest.approx(whole[0], rel=1e-7)
        assert np.allclose(x.value, whole[1], rtol=1e-7, atol=1e-5)
    # Infeasible without the left-out rows, so infeasible with them: no second solve.
    cap.value, reachable.value = np.array([5.0, 1e6]), 10.0
    problem_x0 = cp.Problem(problem.objective, problem.constraints + [x[0] >= 6.0])
    solver = HighsArrays(unreachable_rhs=1e5)
    problem_x0.solve(solver=solver, highs_options=ipm)
    assert problem_x0.status == cp.INFEASIBLE and solver.whole_lp_resolves == 0 and solver.rows_left_out == 1


def _next_cycle_after_a_hot_solve(make_park):
    """A battery-and-load park's LP solved once through a basis-keeping HighsArrays,
    then updated to the next cycle's data (load and prices two hours on), unsolved:
    (problem, solver, status of the first solve)."""
    from vpp.dispatch.highs import HighsArrays
    from vpp.dispatch.problem import DispatchProblem

    park = make_park([BATTERY, LOAD])
    load = office_load_kw(day_index(), 120.0)
    problem = DispatchProblem(park)
    hot = HighsArrays(keep_basis=True)
    problem.update(inputs_for(park, load), initial_state(park))
    problem.problem.solve(solver=hot)
    first_status = problem.problem.status
    later = inputs_for(park, np.roll(load, -8),
                       buy_price_cny_per_kwh=np.roll(inputs_for(park, load).buy_price_cny_per_kwh, -8))
    problem.update(later, initial_state(park))
    return problem, hot, first_status


def test_hot_started_simplex_reaches_the_cold_optimum(make_park):
    """A solve that starts from the last optimal basis (the next cycle's LP, prices and
    load moved on) ends at the optimum a cold solve of the same LP finds, in fewer
    simplex iterations; a basis of another LP shape is never handed over."""
    import cvxpy as cp

    from vpp.dispatch.highs import HighsArrays

    problem, hot, first_status = _next_cycle_after_a_hot_solve(make_park)
    assert first_status == cp.OPTIMAL and hot.hot_starts == 0
    problem.problem.solve(solver=hot)
    hot_value, hot_iterations = problem.problem.value, problem.problem.solver_stats.num_iters
    assert hot.hot_starts == 1
    problem.problem.solve(solver=HighsArrays())
    assert problem.problem.status == cp.OPTIMAL
    assert hot_value == pytest.approx(problem.problem.value, rel=1e-9)
    assert hot_iterations < problem.problem.solver_stats.num_iters
    # Another LP through the same instance starts cold.
    x = cp.Variable(3)
    other = cp.Problem(cp.Minimize(cp.sum(x)), [x >= 1])
    other.solve(solver=hot)
    assert other.status == cp.OPTIMAL and hot.hot_starts == 1 and other.value == pytest.approx(3.0)


def test_hot_starts_follow_grid_rows_switched_on_and_off():
    """Rows a 0/1 parameter has zeroed (lazy grid rows switched off) stay out of HiGHS's
    LP, and the kept basis follows the rows as they are switched on and off between
    solves: every hot start ends at the optimum a cold solve of the same LP finds,
    against scipy's linprog as the independent reference."""
    import cvxpy as cp

    from vpp.dispatch.highs import HighsArrays, _rows_for_hot_start

    cost = np.array([-3.0, -2.0, -1.0, -0.5])
    x = cp.Variable(4)
    gate = cp.Parameter(4, nonneg=True)  # 1: the row x_i <= cap_i is in the LP
    cap = np.array([1.0, 2.0, 0.5, 3.0])
    problem = cp.Problem(cp.Minimize(cost @ x),
                         [x >= 0, x <= 5, cp.sum(x) <= 6, cp.multiply(gate, x) <= cap])
    hot = HighsArrays(keep_basis=True)
    for step, on in enumerate(([0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0])):
        gate.value = np.array(on, float)
        problem.solve(solver=hot)
        assert problem.status == cp.OPTIMAL
        upper = np.where(np.array(on) == 1, np.minimum(cap, 5.0), 5.0)
        reference = linprog(cost, A_ub=np.ones((1, 4)), b_ub=[6.0], bounds=list(zip(np.zeros(4), upper)))
        assert problem.value == pytest.approx(reference.fun, abs=1e-9), on
        assert np.allclose(x.value, reference.x, atol=1e-7), on
        assert hot.hot_starts == step
    # The rows of a hot start: the kept ones while they hold the live ones and few stale,
    # grown by the rows gone live, the live ones alone once too many are stale.
    kept = np.arange(8)
    assert np.array_equal(_rows_for_hot_start(kept, np.arange(7)), kept)
    assert np.array_equal(_rows_for_hot_start(kept, np.array([0, 1, 2, 3, 4, 5, 6, 9])), np.r_[np.arange(8), 9])
    assert np.array_equal(_rows_for_hot_start(kept, np.array([0, 9])), [0, 9])


def test_rows_on_one_column_become_that_columns_bounds():
    """Without duals, HighsArrays hands HiGHS's simplex the rows with a single non-zero
    coefficient as column bounds: equalities fix the column, a positive coefficient
    bounds it above, a negative one below, the tightest bound wins, and bounds that
    cross make the LP infeasible, as the rows did.  scipy's linprog solves the same LP
    with the rows as rows."""
    import cvxpy as cp

    from vpp.dispatch.highs import HighsArrays

    x = cp.Variable(4)
    scale = cp.Parameter(nonneg=True, value=2.0)  # a parameter coefficient, as the dispatch's limits
    cost = np.array([-1.0, -2.0, 1.0, 0.5])
    constraints = [scale * x[0] <= 6.0, x[0] <= 5.0, -3.0 * x[2] <= -1.5, x[1] == 2.5,
                   x[3] >= -1.0, x <= 10.0, cp.sum(x) <= 9.0, x[2] + x[3] >= 1.0]
    problem = cp.Problem(cp.Minimize(cost @ x), constraints)
    solver = HighsArrays(duals=False)
    problem.solve(solver=solver)
    bounds = [(None, 3.0), (2.5, 2.5), (0.5, 10.0), (-1.0, 10.0)]
    reference = linprog(cost, A_ub=np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, -1.0, -1.0]]), b_ub=[9.0, -1.0],
                        bounds=bounds)
    assert problem.status == cp.OPTIMAL and reference.status == 0
    assert problem.value == pytest.approx(reference.fun, abs=1e-9)
    assert np.allclose(x.value, reference.x, atol=1e-7)
    # The same LP keeps its rows when duals are asked for: the same optimum.
    problem.solve(solver=HighsArrays())
    assert problem.value == pytest.approx(reference.fun, abs=1e-9)
    # Crossing bounds from two rows on one column: infeasible.
    crossing = cp.Problem(cp.Minimize(cost @ x), constraints + [x[0] >= 4.0])
    crossing.solve(solver=HighsArrays(duals=False))
    assert crossing.status == cp.INFEASIBLE


def test_a_hot_start_that_does_not_end_optimal_is_solved_again_cold(make_park, monkeypatch):
    """If the simplex stops short from a kept basis (here: an iteration limit of zero
    set with the basis), the same LP is solved again from scratch and its optimum, not
    the stuck one, is the result."""
    import cvxpy as cp
    import highspy

    from vpp.dispatch.highs import HighsArrays

    cleared = []

    class StuckWhenHot(highspy.Highs):
        def setBasis(self, *args):
            status = super().setBasis(*args)
            self.setOptionValue("simplex_iteration_limit", 0)
            return status

        def clearSolver(self):
            cleared.append(True)
            self.setOptionValue("simplex_iteration_limit", 2**31 - 1)
            return super().clearSolver()

    problem, hot, _ = _next_cycle_after_a_hot_solve(make_park)
    monkeypatch.setattr(highspy, "Highs", StuckWhenHot)
    problem.problem.solve(solver=hot)
    assert hot.hot_starts == 1 and cleared == [True]
    assert problem.problem.status == cp.OPTIMAL
    value = problem.problem.value
    monkeypatch.undo()
    problem.problem.solve(solver=HighsArrays())
    assert value == pytest.approx(problem.problem.value, rel=1e-9)


def test_interior_point_reaches_the_simplex_optimum(make_park, monkeypatch):
    """lp_method "ipm" (HiGHS's interior point without crossover, chosen automatically
    for large LPs) publishes a plan as good as simplex's, within the battery's limits."""
    from vpp.dispatch.highs import HighsArrays

    methods = []
    solve = HighsArrays.solve_via_data

    def recording(self, data, warm_start, verbose, solver_opts, solver_cache=None):
        methods.append(solver_opts.get("highs_options", {}).get("solver", "simplex"))
        return solve(self, data, warm_start, verbose, solver_opts, solver_cache)

    monkeypatch.setattr(HighsArrays, "solve_via_data", recording)
    load = office_load_kw(day_index(), 120.0)
    plans = {}
    for method in ("simplex", "ipm"):
        park = make_park([BATTERY, LOAD], dispatch={"lp_method": method})
        methods.clear()
        plans[method] = Dispatcher(park).dispatch(inputs_for(park, load), initial_state(park))
        assert plans[method].ok and set(methods) == {method}
    assert plans["ipm"].objective_cny == pytest.approx(plans["simplex"].objective_cny, rel=1e-6)
    soc = plans["ipm"].details["soc_frac"]["bess"]
    assert soc.min() >= 0.1 - 1e-6 and soc.max() <= 0.9 + 1e-6
    auto = Dispatcher(make_park([BATTERY, LOAD]))
    assert auto.problem.grid_form == "dense" and auto.lp_method == "simplex"
    auto.problem.grid_form = "sparse"  # as on a large feeder
    assert auto.lp_method == "ipm"


def test_nan_forecast_is_rejected_naming_the_field(make_park):
    from vpp.errors import SpecError

    park = make_park([BATTERY, LOAD])
    load = office_load_kw(day_index())
    load[5] = np.nan
    with pytest.raises(SpecError, match="load.demand_kw"):
        Dispatcher(park).dispatch(inputs_for(park, load), initial_state(park))


def test_solver_failure_falls_back_and_next_cycle_recovers(make_park, monkeypatch):
    import cvxpy as cp

    park = make_park([BATTERY, LOAD])
    d = Dispatcher(park)
    inputs = inputs_for(park, office_load_kw(day_index()))

    def broken(*args, **kwargs):
        raise cp.error.SolverError("injected failure")

    monkeypatch.setattr(d.problem.problem, "solve", broken)
    result = d.dispatch(inputs, initial_state(park))
    assert result.status == "fallback" and "injected failure" in result.reason
    assert result.grid["converged"].all()  # the fallback plan is still checked by AC power flow
    monkeypatch.undo()
    assert d.dispatch(inputs, initial_state(park)).status == "optimal"


def test_numerical_failure_is_retried_with_the_other_solver(make_park, monkeypatch):
    park = make_park([BATTERY, LOAD])
    d = Dispatcher(park)
    inputs = inputs_for(park, office_load_kw(day_index()))
    reference = Dispatcher(park).dispatch(inputs, initial_state(park))
    real_solve = d.problem.problem.solve
    used = []

    def flaky(*args, **kwargs):
        solver = kwargs["solver"]
        used.append(solver if isinstance(solver, str) else "HIGHS")  # HiGHS is a custom cvxpy solver
        if used[-1] == "HIGHS":
            raise ValueError("Cannot unpack invalid solution: status=UNKNOWN")
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(d.problem.problem, "solve", flaky)
    result = d.dispatch(inputs, initial_state(park))
    assert used[:2] == ["HIGHS", "CLARABEL"]
    assert result.status == "optimal"
    assert result.objective_cny == pytest.approx(reference.objective_cny, rel=1e-4)


def test_time_budget_exhausted_falls_back(make_park):
    park = make_park([BATTERY, LOAD], dispatch={"time_budget_s": 1e-6})
    result = Dispatcher(park).dispatch(inputs_for(park, office_load_kw(day_index())), initial_state(park))
    assert result.status == "fallback"
    assert "time" in result.reason


def test_receding_cycles_reuse_grid_corrections(reference_park):
    """A cycle 15 minutes after the last starts from its corrections and needs fewer AC rounds."""
    from vpp.inputs import synthetic_series

    start = pd.Timestamp("2025-01-15 06:00", tz=reference_park.site.timezone)
    series = synthetic_series(reference_park, start.normalize(), days=1)
    d = Dispatcher(reference_park)
    state = initial_state(reference_park)
    first = d.dispatch(series.horizon(reference_park, start), state)
    second = d.dispatch(series.horizon(reference_park, start + pd.Timedelta("15min")), state)
    assert first.ok and second.ok and second.violations_remaining == 0
    assert second.grid_iterations <= first.grid_iterations
