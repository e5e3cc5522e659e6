"""One dispatch cycle: solve, check the plan by AC power flow, tighten, re-solve.

The cycle never raises for a bad solve: an infeasible problem, a solver failure or an
exhausted time budget returns a fallback plan (the previous plan shifted to the new
horizon where it reaches, each asset's safe fallback elsewhere) with the reason.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import cvxpy as cp
import numpy as np
import pandas as pd

from vpp.assets import Horizon
from vpp.dispatch.highs import HighsArrays
from vpp.dispatch.problem import UNREACHABLE_RHS, DispatchProblem, HorizonInputs
from vpp.dispatch.rehearsal import next_cycle
from vpp.dispatch.result import DispatchResult, count_violations

log = logging.getLogger(__name__)
# A flexibility deviation below this [kW] counts as keeping the request.
_KEPT_KW = 1e-3


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS prints a copyright banner to stdout the first time a solver is created in a
    process, whatever its options; create that first one with stdout pointed elsewhere so
    the command's output stays the report."""
    import highspy

    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def base_limits(grid, inputs: HorizonInputs):
    """The grid limits of every base step of ``inputs``, in :func:`count_violations`'s order:
    voltage band (n_buses,) x 2, branch limits [%] (n_branches, n_steps), import and export
    limits [kW] (n_steps,)."""
    T = len(inputs.index)
    branch = (np.repeat(grid.branch_limit_percent[:, None], T, axis=1) if inputs.branch_limit_percent is None
              else np.asarray(inputs.branch_limit_percent, float))
    return (grid.v_min_pu if inputs.v_min_pu is None else np.asarray(inputs.v_min_pu, float),
            grid.v_max_pu if inputs.v_max_pu is None else np.asarray(inputs.v_max_pu, float),
            branch, inputs.import_limit_kw, inputs.export_limit_kw)


class Dispatcher:
    """Plans a park cycle after cycle, reusing one compiled problem."""

    def __init__(self, park, problem: DispatchProblem | None = None, strict_hours: float | None = None):
        """``strict_hours`` (None: ``settings.strict_hours``; None there too: the whole
        horizon): re-solve only for grid-limit violations (AC, or relaxed grid rows the
        plan breaks) in the planning steps that start within these first hours.
        Violations further out are folded into the linear model for the next cycle
        instead, since only the first steps of a receding plan are ever carried out."""
        self.park = park
        self.problem = problem or DispatchProblem(park)
        self.previous: DispatchResult | None = None
        hours = park.settings.strict_hours if strict_hours is None else strict_hours
        self.strict_steps = None if hours is None else max(self.problem.horizon.steps_within(hours), 1)
        self.solver_s = 0.0  # time inside the solver during the last cycle
        self.lp_solves = 0  # LP solves during the last cycle
        self._last_ac = None  # the last AC check, the start of the next
        # HiGHS through cvxpy, with the LP handed over as arrays (vpp/dispatch/highs.py);
        # its simplex starts each solve from this dispatcher's last optimal basis, and its
        # interior point leaves out the relaxed grid rows; the dispatch reads no duals.
        self.solvers = {"HIGHS": HighsArrays(keep_basis=True, unreachable_rhs=UNREACHABLE_RHS, duals=False),
                        "CLARABEL": cp.CLARABEL}

    def compile(self) -> float:
        """Canonicalise the LP for the configured solver now, so that the first cycle does
        not pay cvxpy's compile (about 10 s for a 10,000-asset portfolio; later cycles
        only write parameter values).  Returns the seconds it took."""
        t0 = time.perf_counter()
        self.problem.problem.get_problem_data(self.solvers[self.park.settings.solver])
        return time.perf_counter() - t0

    def dispatch(self, inputs: HorizonInputs, state: dict[str, dict[str, Any]]) -> DispatchResult:
        """Plan the horizon in ``inputs`` from ``state``.

        Raises
        ------
        SpecError
            Only for malformed inputs (shapes, NaN), never for a failed solve.
        """
        t_start = time.perf_counter()
        settings, grid, problem = self.park.settings, self.park.grid, self.problem
        problem.update(inputs, state)
        solve_s = ac_s = 0.0
        self.solver_s = 0.0
        self.lp_solves = 0
        if not problem.warm:
            # Cold start: linearise around the AC state of the assets' fallback setpoints,
            # which is closer to any plan than an empty network.
            t0 = time.perf_counter()
            p_kw, q_kvar = self._fallback_injections(inputs, state)
            hz = problem.horizon
            P, Q = problem.bus_injections({k: hz.coarsen(v) for k, v in p_kw.items()},
                                          {k: hz.coarsen(v) for k, v in q_kvar.items()})
            problem.correct(self.park.grid.run_ac(P, Q), P, Q, tighten=False)
            ac_s += time.perf_counter() - t0
        result = None
        for iteration in range(1, settings.max_grid_iterations + 1):
            remaining_s = settings.time_budget_s - (time.perf_counter() - t_start)
            if remaining_s <= 0:
                result = self._fallback(inputs, state, f"time budget of {settings.time_budget_s:g} s spent after "
                                        f"{iteration - 1} grid iteration(s)")
                break
            t0 = time.perf_counter()
            failure = self._solve(remaining_s)
            # Lazy grid rows: re-solve while the plan breaks rows left out of the LP.
            while not failure and problem.activate_broken_rows(self.strict_steps):
                remaining_s = settings.time_budget_s - (time.perf_counter() - t_start)
                failure = (self._solve(remaining_s) if remaining_s > 0
                           else f"time budget of {settings.time_budget_s:g} s spent activating grid rows")
            solve_s += time.perf_counter() - t0
            if failure:
                result = None
                if failure.startswith("problem infeasible"):
                    t0 = time.perf_counter()
                    result = self._least_excess(inputs, state, failure, t_start)
                    solve_s += time.perf_counter() - t0
                result = result or self._fallback(inputs, state, failure)
                break
            p_kw, q_kvar = problem.injections()
            t0 = time.perf_counter()
            ac, violations = self._check(p_kw, q_kvar)
            ac_s += time.perf_counter() - t0
            # A grid operator's request the plan keeps must hold in the AC flow too: the
            # losses it was planned with are the last check's, and a moved plan has others.
            missed = violations + self._requests_missed(ac)
            strict = missed if self.strict_steps is None else missed[:self.strict_steps]
            if strict.sum() == 0 or iteration == settings.max_grid_iterations:
                if violations.sum() and strict.sum() == 0:
                    problem.correct(ac, *problem.bus_injections(p_kw, q_kvar))
                reason = None if violations.sum() == 0 else (
                    f"{int(violations.sum())} grid limit violation(s) remain after {iteration} iteration(s)")
                result = self._plan(inputs, p_kw, q_kvar, ac, violations, reason, iteration)
                break
            problem.correct(ac, *problem.bus_injections(p_kw, q_kvar))
        result.solve_s, result.ac_check_s = solve_s, ac_s + result.ac_check_s
        result.solver_s = self.solver_s
        result.total_s = time.perf_counter() - t_start
        if result.ok:
            self.previous = result
            # The window rule pays where a re-solve is a cold interior-point run and every
            # active voltage row keeps its step's network equations in it; the hot-started
            # simplex re-solves in milliseconds, and on the reference park's year the rule
            # cost 1.10x the time and a 390 kW import peak (docs/performance.md).
            problem.relax_slack_rows(self.strict_steps if self.lp_method == "ipm" else None)
        result.lazy_rounds, result.lp_solves = problem.lazy_rounds, self.lp_solves
        log.info("dispatch %s status=%s objective_cny=%.2f iterations=%d lazy_rounds=%d solve_s=%.3f ac_s=%.3f "
                 "violations=%d%s", inputs.index[0].isoformat(), result.status, result.objective_cny,
                 result.grid_iterations, result.lazy_rounds,
                 result.solve_s, result.ac_check_s, result.violations_remaining,
                 f" reason={result.reason!r}" if result.reason else "")
        return result

    def _requests_missed(self, ac) -> np.ndarray:
        """Per planning step, 1 where the plan keeps a flexibility request (no priced
        deviation) but its AC check's import leaves the requested range by more than
        the connection's tolerance (0.5 %, at least 1 kW), else 0."""
        problem = self.problem
        if problem.flex_dev.value is None:
            return np.zeros(len(ac.converged), int)
        kept = problem.flex_dev.value <= _KEPT_KW
        high, low = problem.p["flex_max"].value, problem.p["flex_min"].value
        imp = ac.p_slack_kw
        tol = np.maximum(0.005 * np.abs(imp), 1.0)
        return (kept & ac.converged & ((imp > high + tol) | (imp < low - tol))).astype(int)

    def rehearse(self, inputs: HorizonInputs, state: dict[str, dict[str, Any]],
                 result: DispatchResult) -> DispatchResult:
        """Plan the next cycle ahead, as the cycle just planned (its ``inputs``, ``state``
        and ``result``) expects it, and publish nothing (see :mod:`vpp.dispatch.rehearsal`).

        The grid rows and block margins the rehearsed plan needs stay in the problem for
        the real next cycle; the plan a fallback would shift stays this cycle's.  Returns
        the rehearsal's result, for its figures.
        """
        first = {kind: result.p_kw[fleet.ids].to_numpy()[0] for kind, fleet in self.park.fleets.items()}
        previous = self.previous
        try:
            return self.dispatch(*next_cycle(self.park, inputs, state, first, result.grid))
        finally:
            self.previous = previous

    def _least_excess(self, inputs: HorizonInputs, state, failure: str, t_start: float) -> DispatchResult | None:
        """When the limits cannot all be met, the plan that exceeds them least.

        Solves the elastic twin of the problem (built on first need), whose grid limits
        may be exceeded at a steep price: assets then do all they can to stay within the
        limits and the result, still a fallback, says by how much they are exceeded.
        Returns None if that fails too (the caller falls back to the previous plan).
        """
        remaining_s = self.park.settings.time_budget_s - (time.perf_counter() - t_start)
        if remaining_s <= 0:
            return None
        firm = self.problem
        try:
            if getattr(self, "_elastic", None) is None:
                self._elastic = DispatchProblem(self.park, elastic=True)
            elastic = self._elastic
            elastic.update(inputs, state)
            # Start from the firm problem's grid corrections, which describe this network state.
            elastic.adopt_corrections(firm)
            self.problem = elastic
            failure_elastic = self._solve(remaining_s)
            if failure_elastic:
                log.warning("least-excess plan failed too: %s", failure_elastic)
                return None
            p_kw, q_kvar = elastic.injections()
            ac, violations = self._check(p_kw, q_kvar)
            excess_kw = float(np.max(elastic.excess_kw.value, initial=0.0))
            excess_pu = float(np.max(elastic.excess_pu.value, initial=0.0))
            reason = (f"{failure}; published the plan that exceeds the grid limits least "
                      f"(by up to {excess_kw:.1f} kW and {excess_pu:.4f} p.u. in the linear model)")
            result = self._plan(inputs, p_kw, q_kvar, ac, violations, reason, 1)
            result.status = "fallback"
            log.warning("dispatch fallback: %s", reason)
            return result
        except Exception:  # the elastic path must never take the cycle down
            log.exception("least-excess plan raised")
            return None
        finally:
            self.problem = firm

    def _solve(self, time_limit_s: float) -> str | None:
        """Solve the compiled problem; return why it failed, or None.

        A numerical failure of the configured solver (an exception or an unknown status,
        which HiGHS's simplex occasionally returns on degenerate plans) is retried once
        with the other solver in the time left; infeasibility and time limits are not.
        """
        deadline = time.perf_counter() + time_limit_s
        solver = self.park.settings.solver
        self.lp_solves += 1
        failure, numerical = self._solve_with(solver, time_limit_s)
        remaining_s = deadline - time.perf_counter()
        if numerical and remaining_s > 0:
            alternate = "CLARABEL" if solver == "HIGHS" else "HIGHS"
            log.warning("%s; retrying with %s", failure, alternate)
            second, _ = self._solve_with(alternate, remaining_s)
            if second is None:
                return None
            failure = f"{failure}; {alternate} retry: {second}"
        return failure

    def _solve_with(self, solver: str, time_limit_s: float) -> tuple[str | None, bool]:
        """One solve: (why it failed or None, whether the failure was numerical)."""
        options = {"time_limit": float(time_limit_s)}
        try:
            if solver == "HIGHS":
                if self.lp_method == "ipm":
                    # Nested: cvxpy's solve() has a "solver" argument of its own.
                    options["highs_options"] = {"solver": "ipm", "run_crossover": "off"}
                _silence_highs_banner()
                # cvxpy's warm start hands HiGHS primal values, not a basis (and made
                # re-solves slower); HighsArrays keeps the basis itself.
                self.problem.problem.solve(solver=self.solvers[solver], warm_start=False, **options)
            else:
                self.problem.problem.solve(solver=self.solvers[solver], **options)
        except cp.error.SolverError as error:
            return f"solver {solver} failed: {error}", True
        except Exception as error:  # a solver crash must not take the dispatch loop down
            log.exception("solver raised")
            return f"solver {solver} raised {type(error).__name__}: {error}", True
        stats = self.problem.problem.solver_stats
        self.solver_s += float(stats.solve_time or 0.0) if stats is not None else 0.0
        status = self.problem.problem.status
        if status == cp.OPTIMAL:
            return None, False
        if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            return "problem infeasible: the limits, requests and asset states cannot all be met", False
        if status in (cp.UNBOUNDED, cp.UNBOUNDED_INACCURATE):
            return "problem unbounded: check prices and limits", False
        if status == cp.USER_LIMIT:
            return f"solver {solver} hit its time limit of {time_limit_s:.1f} s", False
        return f"solver {solver} ended with status {status}", True

    @property
    def lp_method(self) -> str:
        """HiGHS's method for this problem: ``lp_method``, where ``auto`` takes interior
        point (no crossover) when the grid rows go through the sparse network equations
        (large feeders), dual simplex otherwise.

        Measured (docs/performance.md): on the 10,000-asset portfolio's LP (781 buses,
        233,000 columns) with a few hundred grid rows active, dual simplex took minutes and
        interior point about 10 s; on the 1,000-asset monolithic LP (141 buses, dense grid
        rows, 280,000 columns) simplex took 34.6 s and interior point 44.5 s, and simplex
        re-solves the reference park in milliseconds."""
        method = self.park.settings.lp_method
        if method == "auto":
            method = "ipm" if self.problem.grid_form == "sparse" else "simplex"
        return method

    def _check(self, p_kw, q_kvar, inputs: HorizonInputs | None = None):
        """AC check of a plan: at the problem's planning steps against its (block-tightest)
        limits, or, given ``inputs``, of a base-resolution plan against theirs."""
        grid, problem = self.park.grid, self.problem
        P, Q = problem.bus_injections(p_kw, q_kvar)
        ac = grid.run_ac(P, Q, start=self._ac_start(inputs))
        if inputs is None:
            self._last_ac = (problem.index, ac)
            branch, imp, exp = problem.branch_limit_percent, problem.import_limit_kw, problem.export_limit_kw
            bands = (problem.v_band_min_pu, problem.v_band_max_pu)
        else:
            *bands, branch, imp, exp = base_limits(grid, inputs)
        violations = count_violations(ac, bands[0], bands[1], branch, imp, exp)
        return ac, violations

    def _ac_start(self, inputs: HorizonInputs | None):
        """Where the AC check of a plan at the planning steps starts: each step from the
        voltages the last such check found at the step under way at its start time (a
        re-solve's plan, or the next cycle's, is close to the last one there)."""
        if inputs is not None or self._last_ac is None:
            return None
        last_index, ac = self._last_ac
        index = self.problem.index
        if index[0] < last_index[0]:
            return None
        steps = np.clip(last_index.asi8.searchsorted(index.asi8, side="right") - 1, 0, len(last_index) - 1)
        return ac.take(steps)

    def _grid_table(self, index, ac, violations) -> pd.DataFrame:
        return pd.DataFrame({
            "p_import_kw": ac.p_slack_kw, "max_loading_percent": ac.loading_percent.max(axis=1),
            "vm_min_pu": ac.vm_pu.min(axis=1), "vm_max_pu": ac.vm_pu.max(axis=1),
            "losses_kw": ac.losses_kw, "violations": violations, "converged": ac.converged,
        }, index=index)

    def _frames(self, index, per_kind: dict[str, np.ndarray]) -> pd.DataFrame:
        columns, blocks = [], []
        for kind, values in per_kind.items():
            columns += self.park.fleets[kind].ids
            blocks.append(values)
        return pd.DataFrame(np.vstack(blocks).T, index=index, columns=columns)

    def _plan(self, inputs, p_kw, q_kvar, ac, violations, reason, iterations) -> DispatchResult:
        """The solved plan as tables at the base resolution (a coarse planning step's
        values held over its base steps)."""
        index, hz = inputs.index, self.problem.horizon
        details: dict[str, dict[str, np.ndarray]] = {}
        sessions = pd.DataFrame()
        for kind, fleet in self.problem.fleets.items():
            for name, values in fleet.plan_details().items():
                details.setdefault(name, {})[kind] = values
            if hasattr(fleet, "session_report"):
                sessions = fleet.session_report()
        co2_t = float(np.sum(np.clip(ac.p_slack_kw, 0, None) * self.problem.carbon_kg_per_kwh * hz.step_h) / 1000.0)
        expand = {k: hz.expand(v) for k, v in p_kw.items()}, {k: hz.expand(v) for k, v in q_kvar.items()}
        grid = self._grid_table(self.problem.index, ac, violations)
        if not hz.uniform:
            grid = grid.iloc[np.repeat(np.arange(hz.n_steps), hz.block_steps)].set_axis(index)
        return DispatchResult(
            status="optimal", reason=reason, p_kw=self._frames(index, expand[0]), q_kvar=self._frames(index, expand[1]),
            costs_cny=self.problem.cost_breakdown(), grid=grid,
            details={name: self._frames(index, {k: hz.expand(v) for k, v in d.items()}) for name, d in details.items()},
            ev_sessions=sessions, grid_iterations=iterations, co2_t=co2_t,
        )

    def _fallback_injections(self, inputs: HorizonInputs, state):
        """Each asset's fallback setpoints over the horizon, with the loads' reactive power."""
        horizon = Horizon(len(inputs.index), self.problem.horizon.dt_h)
        p_kw = {k: f.fallback_kw(state[k], inputs.forecasts.get(k, {}), horizon) for k, f in self.park.fleets.items()}
        q_kvar = {k: np.zeros_like(v) for k, v in p_kw.items()}
        if "load" in self.park.fleets:
            q_kvar["load"] = self.park.fleets["load"].reactive_kvar(p_kw["load"])
        return p_kw, q_kvar

    def _fallback(self, inputs: HorizonInputs, state, reason: str) -> DispatchResult:
        """Previous plan shifted onto this horizon where it reaches, asset fallbacks elsewhere."""
        index = inputs.index
        p_kw, q_kvar = self._fallback_injections(inputs, state)
        source = "asset fallback setpoints"
        if self.previous is not None:
            shifted = self.previous.shifted(index)
            if shifted is not None:
                for kind, fleet in self.park.fleets.items():
                    # Inflexible loads follow their forecast, not an old plan.
                    if kind == "load":
                        continue
                    old = shifted[fleet.ids].to_numpy().T
                    p_kw[kind] = np.where(np.isnan(old), p_kw[kind], old)
                source = "previous plan shifted, asset fallbacks after its end"
        t0 = time.perf_counter()
        ac, violations = self._check(p_kw, q_kvar, inputs)
        log.warning("dispatch fallback (%s): %s", source, reason)
        result = DispatchResult(
            status="fallback", reason=f"{reason}; using {source}", p_kw=self._frames(index, p_kw),
            q_kvar=self._frames(index, q_kvar), costs_cny={}, grid=self._grid_table(index, ac, violations),
        )
        result.ac_check_s = time.perf_counter() - t0
        return result
