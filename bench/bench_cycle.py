"""Time the reference park's dispatch cycle: compile once, then re-solve cycle after cycle.

    .venv/bin/python bench/bench_cycle.py [--park PARK.toml] [--cycles 12] [--start 2025-01-15]
                                          [--every-steps 4] [--no-uniform]

Prints the one-off build/compile time and, per cycle, the solve time (all grid
iterations and lazy-row re-solves, of which the time inside HiGHS), the AC check time and
the total, then medians.  Cycles step through the day as the live loop does.  Unless
``--no-uniform``, the same cycles are then planned with 15-minute steps over the whole
horizon (``horizon_resolution = []``, the exact LP the park's coarser far end
approximates), and the ratios of the medians and of the objectives are printed: both
measured in this one run, on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpp.dispatch.dispatcher import Dispatcher  # noqa: E402
from vpp.inputs import synthetic_series  # noqa: E402
from vpp.site import load_park  # noqa: E402

DEFAULT_PARK = Path(__file__).resolve().parents[1] / "sim" / "scenarios" / "changping_science_park.toml"


def run(label: str, park, series, start, cycles: int, every_steps: int) -> dict:
    t0 = time.perf_counter()
    dispatcher = Dispatcher(park)
    t_build = time.perf_counter() - t0
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    size = dispatcher.problem.problem.size_metrics
    print(f"\n{label}: {park.grid.n_buses} buses, {sum(f.n for f in park.fleets.values())} assets, "
          f"{dispatcher.problem.horizon.n_steps} planning steps over {park.settings.horizon_steps} quarter hours, "
          f"{size.num_scalar_variables} variables, solver {park.settings.solver}; problem build {t_build:.2f} s")
    rows = []
    for k in range(cycles):
        at = start + pd.Timedelta(minutes=15 * every_steps * k)
        result = dispatcher.dispatch(series.horizon(park, at), state)
        rows.append({"solve_s": result.solve_s, "solver_s": result.solver_s, "ac_s": result.ac_check_s,
                     "total_s": result.total_s, "iterations": result.grid_iterations,
                     "lazy": result.lazy_rounds, "objective_cny": result.objective_cny, "ok": result.ok})
        print(f"  cycle {k + 1:2d}/{cycles} {at:%H:%M}  {result.status:<8} iterations {result.grid_iterations} "
              f"lazy {result.lazy_rounds}  solve {result.solve_s:.3f} s (HiGHS {result.solver_s:.3f} s)  "
              f"AC {result.ac_check_s:.3f} s  cycle {result.total_s:.3f} s  violations {result.violations_remaining}",
              flush=True)
    warm = rows[1:] or rows
    med = {key: statistics.median(r[key] for r in warm) for key in ("solve_s", "solver_s", "ac_s", "total_s")}
    print(f"  first cycle (includes cvxpy compile): {rows[0]['total_s']:.3f} s")
    print(f"  median warm cycle: {med['total_s']:.3f} s  (solve {med['solve_s']:.3f} s of which HiGHS "
          f"{med['solver_s']:.3f} s, AC check {med['ac_s']:.3f} s)")
    return {"rows": rows, "median": med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--park", default=str(DEFAULT_PARK))
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--start", default="2025-01-15")
    parser.add_argument("--every-steps", type=int, default=4, help="steps between benchmarked cycles")
    parser.add_argument("--no-uniform", action="store_true", help="skip the 15-minute-everywhere comparison")
    args = parser.parse_args()

    park = load_park(args.park)
    start = pd.Timestamp(args.start, tz=park.site.timezone)
    series = synthetic_series(park, start, days=2)
    configured = run("as configured", park, series, start, args.cycles, args.every_steps)
    if args.no_uniform or not park.settings.horizon_resolution:
        return
    uniform = run("15-minute steps everywhere", load_park(args.park, {"horizon_resolution": []}), series, start,
                  args.cycles, args.every_steps)
    ratio = uniform["median"]["total_s"] / configured["median"]["total_s"]
    both = [(c["objective_cny"], u["objective_cny"]) for c, u in zip(configured["rows"], uniform["rows"])
            if c["ok"] and u["ok"]]
    gaps = [100 * (c - u) / abs(u) for c, u in both if u]
    print(f"\nmedian warm cycle: 15-minute-everywhere / as configured = {ratio:.1f}x")
    if gaps:
        print(f"plan objective, as configured vs 15-minute everywhere: {statistics.median(gaps):+.2f} % median, "
              f"{min(gaps):+.2f} % .. {max(gaps):+.2f} % over {len(gaps)} cycles")


if __name__ == "__main__":
    main()
