"""Time the reference park's dispatch cycle: compile once, then re-solve cycle after cycle.

    .venv/bin/python bench/bench_cycle.py [--park PARK.toml] [--cycles 12] [--start 2025-01-15]

Prints the one-off build/compile time and, per cycle, the solve time (all grid
iterations), the AC check time and the total, then medians.  Cycles step 15 minutes
through the day, as the live loop does.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--park", default=str(DEFAULT_PARK))
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--start", default="2025-01-15")
    parser.add_argument("--every-steps", type=int, default=4, help="steps between benchmarked cycles")
    args = parser.parse_args()

    t0 = time.perf_counter()
    park = load_park(args.park)
    t_load = time.perf_counter() - t0
    start = pd.Timestamp(args.start, tz=park.site.timezone)
    series = synthetic_series(park, start, days=2)
    t0 = time.perf_counter()
    dispatcher = Dispatcher(park)
    t_build = time.perf_counter() - t0
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    print(f"park load {t_load:.2f} s, problem build {t_build:.2f} s "
          f"({park.grid.n_buses} buses, {sum(f.n for f in park.fleets.values())} assets, "
          f"{park.settings.horizon_steps} steps, solver {park.settings.solver})")
    rows = []
    for k in range(args.cycles):
        at = start + pd.Timedelta(minutes=15 * args.every_steps * k)
        result = dispatcher.dispatch(series.horizon(park, at), state)
        rows.append((result.solve_s, result.ac_check_s, result.total_s, result.grid_iterations))
        print(f"cycle {k + 1:2d}/{args.cycles} {at:%H:%M}  {result.status:<8} iterations {result.grid_iterations}  "
              f"solve {result.solve_s:.3f} s  AC {result.ac_check_s:.3f} s  cycle {result.total_s:.3f} s  "
              f"violations {result.violations_remaining}", flush=True)
    warm = rows[1:] or rows
    print(f"first cycle (includes cvxpy compile): {rows[0][2]:.3f} s")
    print(f"median warm cycle: {statistics.median(r[2] for r in warm):.3f} s  "
          f"(solve {statistics.median(r[0] for r in warm):.3f} s, AC check {statistics.median(r[1] for r in warm):.3f} s, "
          f"{statistics.median(r[3] for r in warm):.0f} grid iteration(s))")
    print(f"solve per LP: {sum(r[0] for r in warm) / sum(r[3] for r in warm):.3f} s")


if __name__ == "__main__":
    main()
