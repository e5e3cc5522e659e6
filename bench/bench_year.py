"""How fast the simulator runs the reference park, and where the time goes.

    .venv/bin/python bench/bench_year.py [--park PARK.toml] [--days 7] [--starts 2025-01-13,2025-04-14,...]
                                         [--forecast perfect] [--replan-every 1]

Simulates ``--days`` days from each start (default: one week in each season, so the
figure stands for a year) under the optimizer, re-planning every step, with a progress
bar.  Prints steps per second, the extrapolated seconds per 365-day year, and the split
of the time between LP solves (HiGHS through cvxpy, all grid iterations and lazy-row
re-solves), AC power flow (plan checks and the realised flow), the rest of the dispatch
cycle (parameter updates, plan tables) and the simulator's own Python (plant models,
recording).  LP solves are split into the time inside HiGHS (as HiGHS reports it) and
cvxpy's share around it (writing parameters into the compiled matrices, unpacking the
solution).  Shares are ratios within this one run.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.forecast import Forecaster  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from vpp.inputs import synthetic_series  # noqa: E402
from vpp.site import load_park  # noqa: E402

DEFAULT_PARK = Path(__file__).resolve().parents[1] / "sim" / "scenarios" / "changping_science_park.toml"
SEASONS = "2025-01-13,2025-04-14,2025-07-14,2025-10-13"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--park", default=str(DEFAULT_PARK))
    parser.add_argument("--days", type=int, default=7, help="days per start (default 7)")
    parser.add_argument("--starts", default=SEASONS, help="comma-separated first days (default: a week per season)")
    parser.add_argument("--forecast", default="perfect", choices=["perfect", "persistence", "noise"])
    parser.add_argument("--replan-every", type=int, default=1)
    args = parser.parse_args()

    park = load_park(args.park)
    totals = {"steps": 0, "wall_s": 0.0, "solve_s": 0.0, "solver_s": 0.0, "ac_check_s": 0.0, "cycle_s": 0.0, "control_s": 0.0,
              "ac_s": 0.0, "cycles": 0, "fallbacks": 0}
    for start in args.starts.split(","):
        series = synthetic_series(park, pd.Timestamp(start, tz=park.site.timezone), args.days)
        n = int(round(args.days * 24 / park.settings.dt_h))
        t0 = time.perf_counter()
        result = simulate(park, series, n, "optimizer", Forecaster(args.forecast), args.replan_every)
        wall = time.perf_counter() - t0
        s = result.stats
        print(f"  {start}: {n} steps in {wall:.1f} s = {n / wall:.2f} steps/s, {s['cycles']} cycles, "
              f"{s['fallbacks']} fallbacks", flush=True)
        totals["steps"] += n
        totals["wall_s"] += wall
        for key in ("solve_s", "solver_s", "ac_check_s", "cycle_s", "control_s", "ac_s", "cycles", "fallbacks"):
            totals[key] += s[key]

    t = totals
    rate = t["steps"] / t["wall_s"]
    year_steps = 365 * 24 / park.settings.dt_h
    cycle_other = t["cycle_s"] - t["solve_s"] - t["ac_check_s"]
    ac = t["ac_check_s"] + t["ac_s"]
    python = t["wall_s"] - t["cycle_s"] - t["ac_s"]
    print(f"\n{t['steps']} steps, {t['cycles']} dispatch cycles, {t['fallbacks']} fallbacks")
    print(f"steps per second      {rate:8.2f}")
    print(f"seconds per year      {year_steps / rate:8.0f}   ({year_steps / rate / 60:.1f} min for {year_steps:.0f} steps)")
    print("where the time goes (share of wall time):")
    for label, value in (("LP solves: inside HiGHS", t["solver_s"]),
                         ("LP solves: cvxpy around HiGHS", t["solve_s"] - t["solver_s"]), ("AC power flow", ac),
                         ("rest of the dispatch cycle", cycle_other), ("simulator Python (plant, recording)", python)):
        print(f"  {label:<38} {value:8.1f} s  {100 * value / t['wall_s']:5.1f} %")


if __name__ == "__main__":
    main()
