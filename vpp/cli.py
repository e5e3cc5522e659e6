"""The ``vpp`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from vpp.errors import VppError


def _start_time(park, at: str | None) -> pd.Timestamp:
    """The cycle start: ``--at`` (park-local if no offset given) floored to the quarter hour."""
    tz = park.site.timezone
    if at is None:
        at = park.inputs.default_date
    if at is None:
        stamp = pd.Timestamp.now(tz=tz)
    else:
        try:
            stamp = pd.Timestamp(at)
        except ValueError:
            raise VppError(f"--at: {at!r} is not a date or time (e.g. 2025-01-15T17:00)") from None
        stamp = stamp.tz_localize(tz) if stamp.tzinfo is None else stamp.tz_convert(tz)
    step = pd.Timedelta(hours=park.settings.dt_h)
    return stamp.floor(step)


def cmd_dispatch(args) -> int:
    from vpp.dispatch.dispatcher import Dispatcher
    from vpp.inputs import synthetic_series
    from vpp.report import print_dispatch
    from vpp.site import load_park

    park = load_park(args.park)
    start = _start_time(park, args.at)
    series = synthetic_series(park, start.normalize(), days=1)
    inputs = series.horizon(park, start)
    state = {kind: fleet.initial_state() for kind, fleet in park.fleets.items()}
    dispatcher = Dispatcher(park)
    result = dispatcher.dispatch(inputs, state)
    print_dispatch(result, park, sys.stdout)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        result.plan_table().tz_convert(park.tz).to_csv(args.csv, float_format="%.4f")
        print(f"\nplan written to {args.csv}")
    if args.plot:
        from vpp.plot import plot_plan

        print(f"plot written to {plot_plan(result, park, args.plot)}")
    return 0 if result.ok else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vpp", description="Virtual power plant and park-microgrid dispatch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each dispatch cycle")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dispatch", help="plan a park's next 24 h and check it by AC power flow")
    d.add_argument("park", help="park TOML file, e.g. sim/scenarios/changping_science_park.toml")
    d.add_argument("--at", help="cycle start, park-local unless an offset is given (default: the park's default_date)")
    d.add_argument("--csv", help="write the whole plan to this CSV file")
    d.add_argument("--plot", help="write a plot of the plan to this PNG file")
    d.set_defaults(func=cmd_dispatch)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except VppError as error:
        print(f"vpp: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
