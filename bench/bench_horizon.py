"""What the coarser far end of the horizon costs and saves: the park as configured against
15-minute planning steps over the whole horizon, simulated on the same inputs.

    .venv/bin/python bench/bench_horizon.py [--park PARK.toml] [--days 3] [--starts 2025-01-14,2025-07-15]

For each start, simulates ``--days`` days under the optimizer (re-planning every step,
perfect forecasts) twice: with the park's ``horizon_resolution`` and with
``horizon_resolution = []``.  Prints the realised KPIs of both (computed from the
simulated series, as ``vpp sim`` does) and the ratios of wall time and cost, all measured
in this one run.
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
from sim.kpis import compute_kpis  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from vpp.inputs import synthetic_series  # noqa: E402
from vpp.site import load_park  # noqa: E402

DEFAULT_PARK = Path(__file__).resolve().parents[1] / "sim" / "scenarios" / "changping_science_park.toml"
SHOWN = ("energy_cost_cny", "demand_charge_cny", "total_cost_cny", "peak_import_kw", "ev_unmet_kwh",
         "comfort_violation_k_h", "grid_violations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--park", default=str(DEFAULT_PARK))
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--starts", default="2025-01-14,2025-07-15")
    args = parser.parse_args()

    configured = load_park(args.park)
    uniform = load_park(args.park, {"horizon_resolution": []})
    print(f"as configured: horizon_resolution = {configured.settings.horizon_resolution}; "
          f"uniform: 15-minute steps over {uniform.settings.horizon_steps} steps")
    n = int(round(args.days * 24 / configured.settings.dt_h))
    for start in args.starts.split(","):
        series = synthetic_series(configured, pd.Timestamp(start, tz=configured.site.timezone), args.days)
        figures = {}
        for label, park in (("configured", configured), ("uniform", uniform)):
            t0 = time.perf_counter()
            result = simulate(park, series, n, "optimizer", Forecaster("perfect"), 1)
            wall_s = time.perf_counter() - t0
            figures[label] = {**compute_kpis(result.series, result.sessions, park), "wall_s": wall_s}
        c, u = figures["configured"], figures["uniform"]
        print(f"\n{start}, {args.days} days ({n} steps, re-planned every step):")
        print(f"  {'':<24} {'configured':>12} {'uniform':>12} {'ratio':>8}")
        for key in (*SHOWN, "wall_s"):
            # A ratio of two figures that round to zero says nothing.
            ratio = f"{c[key] / u[key]:8.3f}" if abs(u[key]) >= 0.05 else f"{'-':>8}"
            print(f"  {key:<24} {c[key]:12.1f} {u[key]:12.1f} {ratio}")


if __name__ == "__main__":
    main()
