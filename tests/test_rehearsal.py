"""Rehearsing the next cycle: the inputs and state it expects, and what it leaves behind."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from vpp.dispatch.aggregate import AggregateDispatcher
from vpp.dispatch.dispatcher import Dispatcher
from vpp.dispatch.grid import GridModel
from vpp.dispatch.rehearsal import advance, expected_state, next_cycle
from vpp.portfolio import FeederSize, portfolio_series, synthetic_feeder, synthetic_portfolio

warnings.filterwarnings("ignore", category=FutureWarning)

SMALL = FeederSize(n_substations=2, lv_feeders=2, buses_per_feeder=3)


def _tight_park(n: int):
    """A small portfolio on a feeder with a narrow voltage band and low loading limits, so
    that its plans run into grid rows the LP leaves out until they are broken."""
    park = synthetic_portfolio(n, seed=2, size=SMALL, import_limit_kw=60.0)
    return dataclasses.replace(park, grid=GridModel(synthetic_feeder(SMALL, 2), 0.99, 1.022, 15.0))


def _cycle(park, at: str = "2025-01-15 00:00"):
    start = pd.Timestamp(at, tz=park.site.timezone)
    inputs = portfolio_series(park, start).horizon(park, start)
    return inputs, {k: f.initial_state() for k, f in park.fleets.items()}


def test_advance_moves_every_per_step_series_one_step_on_and_holds_the_last():
    park = synthetic_portfolio(40, seed=4, size=SMALL)
    inputs, _ = _cycle(park)
    n_buses = park.grid.n_buses
    inputs = dataclasses.replace(inputs, v_min_pu=np.full(n_buses, 0.94), peak_import_so_far_kw=50.0)
    before = copy.deepcopy(inputs.forecasts["load"]["demand_kw"])
    nxt = advance(inputs, planned_import_kw=80.0)

    assert (nxt.index == inputs.index + pd.Timedelta(minutes=15)).all()
    for name in ("buy_price_cny_per_kwh", "sell_price_cny_per_kwh", "carbon_kg_per_kwh", "import_limit_kw"):
        old, new = np.asarray(getattr(inputs, name)), getattr(nxt, name)
        np.testing.assert_array_equal(new[:-1], old[1:])
        assert new[-1] == old[-1]
    demand = nxt.forecasts["load"]["demand_kw"]
    np.testing.assert_array_equal(demand[:, :-1], before[:, 1:])
    np.testing.assert_array_equal(demand[:, -1], before[:, -1])
    ev = nxt.forecasts["charging_station"]
    assert ev["sessions"] is inputs.forecasts["charging_station"]["sessions"]
    assert ev["index"][0] == inputs.index[1]
    # Per-bus values are not steps, and the caller's inputs are left as they were.
    np.testing.assert_array_equal(nxt.v_min_pu, inputs.v_min_pu)
    np.testing.assert_array_equal(inputs.forecasts["load"]["demand_kw"], before)
    # The month's peak so far is at least what the plan's first step imports.
    assert nxt.peak_import_so_far_kw == 80.0
    assert advance(inputs, planned_import_kw=20.0).peak_import_so_far_kw == 50.0


def test_expected_state_carries_out_the_first_setpoints_through_the_plant_models():
    park = synthetic_portfolio(40, seed=4, size=SMALL)
    inputs, state = _cycle(park)
    kept = copy.deepcopy(state)
    bat = park.fleets["battery"].storage
    first = {k: np.zeros(f.n) for k, f in park.fleets.items()}
    first["battery"] = -0.5 * bat.p_ch_max_kw  # charging at half power
    after = expected_state(park, state, first, inputs)

    assert set(after) == set(park.fleets)
    dt_h = park.settings.dt_h
    e0 = np.asarray(state["battery"]["e_kwh"], float)
    expected = e0 * (1.0 - bat.sd_per_h * dt_h) + 0.5 * bat.p_ch_max_kw * bat.eta_ch * dt_h
    np.testing.assert_allclose(after["battery"]["e_kwh"], np.minimum(expected, bat.e_max_kwh), rtol=1e-12)
    # The heat stores meet the forecast heat demand of the first step with the heat pumps off.
    assert np.all(np.asarray(after["heat_pump"]["e_th_kwh"]) <= np.asarray(state["heat_pump"]["e_th_kwh"]) + 1e-12)
    # The cycle's own state is untouched.
    np.testing.assert_array_equal(state["battery"]["e_kwh"], kept["battery"]["e_kwh"])
    np.testing.assert_array_equal(state["heat_pump"]["e_th_kwh"], kept["heat_pump"]["e_th_kwh"])


def _plan(result):
    """The plan's own figures: a portfolio result's virtual plan, or the result itself."""
    return getattr(result, "virtual", result)


def _first_setpoints(park, result) -> dict:
    """A cycle's first setpoints per kind [kW]."""
    if isinstance(result.p_kw, dict):  # members' setpoints (kind -> (n, T)) of a portfolio result
        return {k: p[:, 0] for k, p in result.p_kw.items()}
    return {k: result.p_kw[f.ids].to_numpy()[0] for k, f in park.fleets.items()}


@pytest.mark.parametrize("make", [Dispatcher, AggregateDispatcher], ids=["monolithic", "aggregate"])
def test_a_rehearsed_cycle_starts_with_the_grid_rows_its_plan_needs(make):
    """Without a rehearsal, the next cycle's plan can break grid rows no plan of this
    cycle came near and must be solved again.  The rehearsal plans that cycle as this one
    expects it and takes those rows in; the real cycle, on those inputs, then solves once
    and finds the rehearsal's optimum.  The plan a fallback would shift stays this cycle's.

    Which evening hour's next cycle breaks a new row depends on the optimal vertex the
    solver ends on (the LPs are degenerate), so the cycles from 17:00, 18:00 and 19:00
    are all planned: the rehearsal's claims must hold for each, and at least one must
    have needed it."""
    park = _tight_park(80)
    needed = []
    for start in ("2025-01-15 17:00", "2025-01-15 18:00", "2025-01-15 19:00"):
        inputs, state = _cycle(park, start)
        runs = {}
        for rehearse in (False, True):
            dispatcher = make(park)
            result = dispatcher.dispatch(inputs, state)
            assert result.ok and _plan(result).lazy_rounds >= 1  # the feeder is tight enough to need lazy rows
            if rehearse:
                rehearsal = dispatcher.rehearse(inputs, state, result)
                assert rehearsal.ok
                if isinstance(dispatcher, Dispatcher):
                    assert dispatcher.previous is result
            expected = next_cycle(park, inputs, state, _first_setpoints(park, result), _plan(result).grid)
            runs[rehearse] = _plan(dispatcher.dispatch(*expected))
        assert runs[False].ok
        needed.append(runs[False].lazy_rounds >= 1)
        real = runs[True]
        assert real.ok and real.lazy_rounds == 0 and real.violations_remaining == 0, start
        assert real.objective_cny == pytest.approx(_plan(rehearsal).objective_cny, rel=1e-6), start
    assert any(needed), "no evening cycle needed a rehearsal: the test premise no longer holds"


def test_a_strict_window_holds_the_next_windows_near_rows_and_relaxes_voltage_rows_beyond():
    """With a strict window, a row the next cycle breaks inside it costs a re-solve and one
    it breaks further out does not.  After a cycle, the rows of the next cycle's window
    (the strict steps and one more) are active exactly where the plan came near their
    limits (within 0.03 pu, or 60 % of a branch's capped rating), whether they were
    active before or not; beyond it, voltage rows with 0.01 pu of slack or more are
    relaxed.  Without a window, or with the hot-started simplex, rows are only relaxed
    (from 0.04 pu, below 30 %)."""
    park = _tight_park(80)
    inputs, state = _cycle(park, "2025-01-15 18:00")
    simplex = Dispatcher(dataclasses.replace(park, settings=park.settings.model_copy(update={"lp_method": "simplex"})),
                         strict_hours=1.0)
    with mock.patch.object(simplex.problem, "relax_slack_rows", wraps=simplex.problem.relax_slack_rows) as relax:
        assert simplex.dispatch(inputs, state).ok
    relax.assert_called_once_with(None)

    park = dataclasses.replace(park, settings=park.settings.model_copy(update={"lp_method": "ipm"}))
    dispatcher = Dispatcher(park, strict_hours=1.0)
    problem = dispatcher.problem
    result = dispatcher.dispatch(inputs, state)
    assert result.ok and result.lazy_rounds >= 1  # the plan ran into rows left out
    util, vm = problem.grid_rows(*problem.bus_injections(*problem.injections()))
    slack_pu = np.minimum(vm - problem.v_min_pu, problem.v_max_pu - vm)
    w = dispatcher.strict_steps + 1
    # The cycle left its next window's rows as its plan asks.
    np.testing.assert_array_equal(problem.active_vm[:, :w], slack_pu[:, :w] < 0.03)
    np.testing.assert_array_equal(problem.active_flow[:, :w], util[:, :w] >= 0.6)
    assert not (problem.active_vm[:, w:] & (slack_pu[:, w:] >= 0.01)).any()

    # The rule itself, on voltages and loadings spread across every threshold (the tight
    # feeder's band is too narrow for slacks of 0.04 pu), rows active or not at random.
    rng = np.random.default_rng(3)
    problem.v_min_pu, problem.v_max_pu = np.full(slack_pu.shape, 0.92), np.full(slack_pu.shape, 1.08)
    vm, util = rng.uniform(0.91, 1.09, slack_pu.shape), rng.uniform(0.0, 1.2, util.shape)
    problem.grid_rows = lambda p_bus_kw, q_bus_kvar: (util, vm)
    slack_pu = np.minimum(vm - problem.v_min_pu, problem.v_max_pu - vm)
    before_vm, before_flow = rng.random(slack_pu.shape) < 0.5, rng.random(util.shape) < 0.5
    for limit in (0.01, 0.03, 0.04):
        assert 0 < np.count_nonzero(slack_pu < limit) < slack_pu.size
    for within in (dispatcher.strict_steps, None):
        problem.active_vm, problem.active_flow = before_vm.copy(), before_flow.copy()
        problem.relax_slack_rows(within)
        if within is None:
            np.testing.assert_array_equal(problem.active_vm, before_vm & (slack_pu < 0.04))
            np.testing.assert_array_equal(problem.active_flow, before_flow & (util >= 0.3))
            continue
        np.testing.assert_array_equal(problem.active_vm[:, :w], slack_pu[:, :w] < 0.03)
        np.testing.assert_array_equal(problem.active_flow[:, :w], util[:, :w] >= 0.6)
        np.testing.assert_array_equal(problem.active_vm[:, w:], before_vm[:, w:] & (slack_pu[:, w:] < 0.01))
        np.testing.assert_array_equal(problem.active_flow[:, w:], before_flow[:, w:] & (util[:, w:] >= 0.3))
