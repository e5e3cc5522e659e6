"""Dispatch at portfolio scale: the aggregate (virtual-asset) method against the monolithic LP.

    .venv/bin/python bench/bench_portfolio.py [--parts compare large ac] [--sizes 100 300 1000]
        [--group-by bus feeder] [--large 10000] [--large-feeder 30 4 6 6] [--large-group-by feeder]
        [--large-horizon coarse] [--strict-hours 2] [--rehearse] [--forecast-error 0.05] [--cycles 3]
        [--seed 1] [--start 2025-01-15]

Parts (each seeded, so two runs build the same portfolios):

``compare``  per size, on the 141-bus feeder: the monolithic ``Dispatcher`` on the park and
             the ``AggregateDispatcher`` (once per ``--group-by``) in the same run, all
             judged on the individual assets by ``evaluate_plan``: seconds (first cycle,
             cvxpy compile included), cost of each, cost ratio fast / monolithic, member
             limit violations and AC grid violations of each.  Every plan here is at
             15-minute steps, so the ratio measures the aggregation alone.
``large``    the fast method on ``--large`` assets on a generated feeder of
             ``--large-feeder`` substations, LV feeders per substation, buses per LV feeder
             and MV cables (30 4 6 6: 781 buses, 720 street buses, 18.9 MVA of
             transformers on six 10 kV cables of five substations each):
             ``--cycles`` consecutive full cycles (forecast update, solve, AC check of the
             planning steps, member setpoints out, then every member's 96 setpoints
             checked against its limits and by AC power flow; then every member carries
             out its first setpoint through its plant model, so the next cycle starts
             from the state this one left), seconds per phase, LP size, violations, peak
             memory.
             ``--large-horizon coarse`` plans in 15-minute steps for 2 h, half hours to 6 h
             and hours to 24 h (34 planning steps; setpoints stay per 15 minutes).
             ``--strict-hours`` (default 2; 0 for the whole horizon): a cycle re-plans
             only for grid violations in its first hours, those further out tighten the
             next cycle (``DispatchSettings.strict_hours``); both counts are printed.
             ``--rehearse``: after each cycle's setpoints, the next cycle is rehearsed
             (``AggregateDispatcher.rehearse``; its time is printed apart, it is not part
             of the cycle).  ``--forecast-error 0.05``: each cycle's base load, heat and
             PV forecasts are off by a seeded 5 % (standard deviation) per asset and step,
             while the members carry out their setpoints under the true series.
``ac``       the 96-step AC check of the 141-bus feeder: ``GridModel.run_ac`` against 96
             calls of ``pandapower.runpp`` (ratio) and the largest voltage difference.

Peak memory is the process's peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
after each part, so it covers every part run before; run ``--parts large`` alone for the
large portfolio's own peak.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.simulator import actual_conditions  # noqa: E402
from vpp.dispatch.aggregate import AggregateDispatcher, evaluate_plan  # noqa: E402
from vpp.dispatch.dispatcher import Dispatcher  # noqa: E402
from vpp.dispatch.grid import GridModel  # noqa: E402
from vpp.dispatch.rehearsal import plant_after  # noqa: E402
from vpp.portfolio import FeederSize, portfolio_series, synthetic_feeder, synthetic_portfolio  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


COARSE = [[2, 0.25], [6, 0.5], [24, 1.0]]
# Quarter hours for the 2 hours a cycle carries out before the next ones, then hours and two-hour blocks.
COARSER = [[2, 0.25], [6, 1.0], [24, 2.0]]
HORIZONS = {"uniform": None, "coarse": COARSE, "coarser": COARSER}


def _portfolio(n: int, seed: int, start: str, size: FeederSize = FeederSize(), settings: dict | None = None):
    t0 = time.perf_counter()
    park = synthetic_portfolio(n, seed=seed, size=size, settings=settings)
    at = pd.Timestamp(start, tz=park.site.timezone)
    series = portfolio_series(park, at)
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    counts = ", ".join(f"{k} {f.n}" for k, f in park.fleets.items())
    print(f"  portfolio of {n} assets built in {time.perf_counter() - t0:.1f} s: {park.grid.n_buses} buses, {counts}",
          flush=True)
    return park, at, series, state


def compare(sizes: list[int], seed: int, start: str, group_by: list[str]) -> None:
    print("== compare: monolithic LP vs aggregate method, same portfolio, same cycle ==")
    rows = []
    for n in sizes:
        park, at, series, state = _portfolio(n, seed, start)
        inputs = series.horizon(park, at)
        t0 = time.perf_counter()
        mono = Dispatcher(park).dispatch(inputs, state)
        mono_s = time.perf_counter() - t0
        p_mono = {k: mono.p_kw[f.ids].to_numpy().T for k, f in park.fleets.items()}
        q_mono = {k: mono.q_kvar[f.ids].to_numpy().T for k, f in park.fleets.items()}
        print(f"  monolithic: {mono.status} in {mono_s:.2f} s (solve {mono.solve_s:.2f} s, "
              f"{mono.grid_iterations} grid iteration(s)){'' if mono.ok else ': ' + str(mono.reason)[:160]}",
              flush=True)
        cm = evaluate_plan(park, inputs, state, p_mono, q_mono)
        for group in group_by:
            t0 = time.perf_counter()
            agg = AggregateDispatcher(park, group_by=group)
            fast = agg.dispatch(inputs, state)
            fast_s = time.perf_counter() - t0
            plans = sum(getattr(f, "n_groups", f.n) for f in agg.dispatcher.problem.fleets.values())
            print(f"  aggregate ({group}): {fast.virtual.status} in {fast_s:.2f} s (solve {fast.solve_s:.2f} s, "
                  f"{fast.n_virtual} virtual assets, {plans} plans, {fast.virtual.grid_iterations} grid iteration(s))",
                  flush=True)
            cf = evaluate_plan(park, inputs, state, fast.p_kw)
            # The ratio only means something against the monolithic optimum, not its fallback.
            ratio = cf.total_cny / cm.total_cny if mono.ok and fast.ok else float("nan")
            print(f"  n={n} {group}: cost monolithic {cm.total_cny:.2f} CNY, aggregate {cf.total_cny:.2f} CNY, "
                  f"ratio {ratio:.5f}; limit violations {cm.limit_violations} / {cf.limit_violations}; "
                  f"grid violations {cm.grid_violations} / {cf.grid_violations}; "
                  f"EV unmet {cm.ev_unmet_kwh:.2f} / {cf.ev_unmet_kwh:.2f} kWh; "
                  f"comfort shortfall {cm.comfort_shortfall_kwh_th:.2f} / {cf.comfort_shortfall_kwh_th:.2f} kWh_th",
                  flush=True)
            rows.append((n, group, mono_s, fast_s, plans, cm.total_cny, cf.total_cny, ratio, cm.limit_violations,
                         cf.limit_violations, cm.grid_violations, cf.grid_violations))
    print("  assets  group      mono_s  fast_s  plans  mono_cny    fast_cny    ratio    viol(m/f)  grid(m/f)")
    for r in rows:
        print(f"  {r[0]:6d}  {r[1]:9s}  {r[2]:6.2f}  {r[3]:6.2f}  {r[4]:5d}  {r[5]:10.2f}  {r[6]:10.2f}  {r[7]:.5f}  "
              f"{r[8]:4d}/{r[9]:<4d}  {r[10]:4d}/{r[11]:<4d}")
    print(f"  peak RSS so far {peak_rss_mib():.0f} MiB", flush=True)


def large(n: int, cycles: int, seed: int, start: str, feeder: list[int], group_by: str, horizon: str,
          strict_hours: float | None, rehearse: bool = False, forecast_error: float = 0.0) -> None:
    size = FeederSize(n_substations=feeder[0], lv_feeders=feeder[1], buses_per_feeder=feeder[2], mv_feeders=feeder[3])
    window = "the whole horizon" if strict_hours is None else f"the first {strict_hours:g} h"
    print(f"== large: aggregate method ({group_by}, {horizon} horizon, re-planning for violations in {window}"
          f"{', rehearsing each next cycle' if rehearse else ''}, forecast error {forecast_error:g}) on "
          f"{n} assets, {size.n_buses} buses, {cycles} consecutive cycles ==")
    rng = np.random.default_rng(seed + 17)
    settings = {} if HORIZONS[horizon] is None else {"horizon_resolution": HORIZONS[horizon]}
    if strict_hours is not None:
        settings["strict_hours"] = strict_hours
    park, at, series, state = _portfolio(n, seed, start, size, settings)
    t0 = time.perf_counter()
    fast = AggregateDispatcher(park, group_by=group_by)
    problem = fast.dispatcher.problem
    size_lp = problem.problem.size_metrics
    print(f"  clustering, problem build and cvxpy compile {time.perf_counter() - t0:.2f} s (compile "
          f"{fast.compile_s:.2f} s): {problem.horizon.n_steps} planning steps, "
          f"{sum(f.n for f in problem.fleets.values())} virtual assets, "
          f"{sum(getattr(f, 'n_groups', f.n) for f in problem.fleets.values())} plans, grid rows {problem.grid_form}, "
          f"{size_lp.num_scalar_variables} variables, {size_lp.num_scalar_eq_constr + size_lp.num_scalar_leq_constr} "
          f"constraints", flush=True)
    for k in range(cycles):
        when = at + pd.Timedelta(minutes=15 * k)
        t_cycle = time.perf_counter()
        inputs = _forecast_error(series.horizon(park, when), forecast_error, rng)  # forecast update
        forecast_s = time.perf_counter() - t_cycle
        result = fast.dispatch(inputs, state)                      # solve, AC check, split
        t0 = time.perf_counter()
        first = {kind: p[:, 0] for kind, p in result.p_kw.items()}  # setpoints out: every member's next step
        setpoints = dict(zip(park.asset_ids, np.concatenate([first[k] for k in park.fleets])))
        setpoints_s = time.perf_counter() - t0
        # Judge the plan as in --parts compare: every member's limits, the AC flow of its
        # 96 quarter hours (as the cycle's own check), and its cost.
        t0 = time.perf_counter()
        check = evaluate_plan(park, inputs, state, result.p_kw)
        check_s = time.perf_counter() - t0
        total = time.perf_counter() - t_cycle
        print(f"  cycle {k + 1}/{cycles} {when:%H:%M} {result.virtual.status}: total {total:.2f} s = forecast "
              f"{forecast_s:.2f} + aggregate/update {result.aggregate_s:.2f} + solve {result.solve_s:.2f} "
              f"(inside HiGHS {result.solver_s:.2f}) + AC check {result.ac_check_s:.2f} + disaggregate "
              f"{result.disaggregate_s:.2f} + 96-step AC check {result.base_check_s:.2f} + setpoints "
              f"{setpoints_s:.3f} + the benchmark's own member and AC evaluation {check_s:.2f} s; {result.rounds} plan(s), "
              f"{result.virtual.grid_iterations} grid iteration(s), {result.virtual.lazy_rounds} lazy round(s) and "
              f"{result.virtual.lp_solves} LP solve(s) in the last, {len(setpoints)} members; violations: planning steps "
              f"{result.virtual.violations_remaining}, 96 steps AC {check.grid_violations} ({result.strict_violations} "
              f"in {window}), members "
              f"{check.limit_violations} (worst {_worst(check)}); peak RSS {peak_rss_mib():.0f} MiB", flush=True)
        if not result.ok:
            print(f"    reason: {str(result.virtual.reason)[:300]}", flush=True)
        if rehearse and k + 1 < cycles:
            # After the setpoints are out: the next cycle as this one expects it.
            t0 = time.perf_counter()
            rehearsal = fast.rehearse(inputs, state, result)
            print(f"    rehearsal of the next cycle (after the setpoints): {time.perf_counter() - t0:.2f} s, "
                  f"{rehearsal.rounds} plan(s), {rehearsal.virtual.grid_iterations} grid iteration(s), "
                  f"{rehearsal.virtual.lazy_rounds} lazy round(s), {rehearsal.virtual.lp_solves} LP solve(s)", flush=True)
        state = _carry_out(park, series, state, first, when)


def _carry_out(park, series, state: dict, setpoints_kw: dict[str, np.ndarray], when: pd.Timestamp) -> dict:
    """Every member's state after it carried out its first setpoint for a quarter hour,
    through its own plant model under the true series (as the simulator does): the next
    cycle starts where this one's plan left the assets, not from the same state 15
    minutes later."""
    return plant_after(park, state, setpoints_kw, actual_conditions(series, park, series.position(when)))


def _forecast_error(inputs, frac: float, rng):
    """``inputs`` with every base load, heat demand and PV forecast off by a seeded error of
    ``frac`` (standard deviation, relative, per asset and step): the plan no longer sees
    exactly what the members then meet, and no two cycles see the same forecast."""
    if not frac:
        return inputs
    forecasts = {kind: dict(f) for kind, f in inputs.forecasts.items()}
    for kind, name in (("load", "demand_kw"), ("heat_pump", "heat_kw_th"), ("pv", "avail_kw")):
        if kind in forecasts:
            values = forecasts[kind][name]
            forecasts[kind][name] = values * np.clip(1.0 + frac * rng.standard_normal(values.shape), 0.0, None)
    return dataclasses.replace(inputs, forecasts=forecasts)


def _worst(check) -> str:
    named = {k: v for k, v in check.worst.items() if check.violations.get(k)}
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(named.items(), key=lambda kv: -kv[1])[:2]) or "-"


def ac(seed: int, repeats: int = 5) -> None:
    print("== ac: 96-step AC check of the generated feeder, run_ac vs pandapower.runpp ==")
    grid = GridModel(synthetic_feeder(FeederSize(), seed), 0.95, 1.05, 100.0)
    rng = np.random.default_rng(seed)
    T = 96
    # Per street bus a few dozen homes: mostly consumption, some PV export.
    p = rng.uniform(-60.0, 20.0, (T, grid.n_buses))
    q = rng.uniform(-12.0, 4.0, (T, grid.n_buses))
    grid.run_ac(p, q)  # warm the caches once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = grid.run_ac(p, q)
        times.append(time.perf_counter() - t0)
    fast_s = min(times)
    t0 = time.perf_counter()
    ref = [grid.run_pandapower(p[t], q[t]) for t in range(T)]
    pp_s = time.perf_counter() - t0
    vm_ref = np.vstack([r.vm_pu for r in ref])
    dv = float(np.max(np.abs(res.vm_pu - vm_ref)))
    print(f"  {grid.n_buses} buses, {T} steps, all converged: {bool(res.converged.all())}; vm range "
          f"{np.nanmin(res.vm_pu):.4f}-{np.nanmax(res.vm_pu):.4f} p.u.")
    print(f"  run_ac {fast_s * 1000:.1f} ms (best of {repeats}; median {np.median(times) * 1000:.1f} ms), "
          f"96 x runpp {pp_s:.2f} s: ratio runpp/run_ac {pp_s / fast_s:.0f}; max |dV| {dv:.2e} p.u.", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("compare", "large", "ac"), default=["ac", "compare", "large"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 300, 1000])
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--group-by", nargs="+", choices=("bus", "feeder", "portfolio"), default=["bus", "feeder"],
                        help="plan groups of the aggregate method in --parts compare")
    parser.add_argument("--large-feeder", nargs=4, type=int, default=[30, 4, 6, 6],
                        metavar=("SUBSTATIONS", "LV", "BUSES", "MV"),
                        help="the large portfolio's feeder: substations, LV feeders each, buses per LV feeder, "
                             "MV cables from the source the substations are spread over")
    parser.add_argument("--large-group-by", choices=("bus", "feeder", "portfolio"), default="feeder")
    parser.add_argument("--large-horizon", choices=tuple(HORIZONS), default="coarse")
    parser.add_argument("--strict-hours", type=float, default=2.0,
                        help="large portfolio: re-plan within a cycle only for violations in these first hours "
                             "(0: anywhere in the horizon)")
    parser.add_argument("--rehearse", action="store_true",
                        help="large portfolio: after each cycle's setpoints, rehearse the next cycle "
                             "(AggregateDispatcher.rehearse) so that it starts with the grid rows it will need")
    parser.add_argument("--forecast-error", type=float, default=0.0,
                        help="large portfolio: relative error (standard deviation) on each cycle's base load, heat "
                             "demand and PV forecasts; the members carry out their setpoints under the true series")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", default="2025-01-15")
    args = parser.parse_args()
    if "ac" in args.parts:
        ac(args.seed)
    if "compare" in args.parts:
        compare(args.sizes, args.seed, args.start, args.group_by)
    if "large" in args.parts:
        large(args.large, args.cycles, args.seed, args.start, args.large_feeder, args.large_group_by, args.large_horizon,
              args.strict_hours or None, args.rehearse, args.forecast_error)
    print(f"peak RSS (ru_maxrss) {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
