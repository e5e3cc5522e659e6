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


def cmd_sim(args) -> int:
    import json
    import time

    from sim.controllers import CONTROLLERS
    from sim.data import apply_measured
    from sim.forecast import Forecaster
    from sim.report import print_kpis, write_outputs
    from sim.simulator import simulate
    from vpp.inputs import synthetic_series
    from vpp.site import load_park

    park = load_park(args.park)
    if args.days < 1:
        raise VppError("--days: must be at least 1")
    if args.workers < 1:
        raise VppError("--workers: must be at least 1")
    if args.replan_every < 1:
        raise VppError("--replan-every: must be at least 1")
    start = _start_time(park, args.start or park.inputs.default_date).normalize()
    seed = park.inputs.seed if args.seed is None else args.seed
    forecaster = Forecaster(args.forecast, args.forecast_spread, seed)
    controllers = list(CONTROLLERS) if args.controller == "all" else [args.controller]
    t0 = time.perf_counter()
    series = synthetic_series(park, start, args.days, seed=seed)
    n_steps = int(round(args.days * 24 / park.settings.dt_h))
    series = apply_measured(series, park, args.data, args.sessions, n_steps)
    inputs_s = time.perf_counter() - t0
    results = {}
    for name in controllers:
        if name == "optimizer" and args.workers > 1:
            from sim.parallel import simulate_parallel

            results[name] = simulate_parallel(park, series, n_steps, name, forecaster, args.replan_every,
                                              workers=args.workers, progress=not args.quiet)
        else:
            results[name] = simulate(park, series, n_steps, name, forecaster, args.replan_every,
                                     progress=not args.quiet)
    meta = {
        "park": str(args.park), "start": str(start), "days": args.days, "steps": n_steps, "seed": seed,
        "forecast": args.forecast, "forecast_spread": args.forecast_spread if args.forecast == "noise" else None,
        "replan_every": args.replan_every, "workers": args.workers, "data": args.data, "sessions": args.sessions,
        "inputs_s": round(inputs_s, 3),
    }
    kpis = write_outputs(results, park, args.out, meta)
    print_kpis(kpis, sys.stdout)
    for name, r in results.items():
        s = r.stats
        if s.get("cycles"):
            other = s["control_s"] - s["cycle_s"]
            wall = s.get("wall_s", s["control_s"] + s["ac_s"])
            workers = f" on {s['workers']} workers (times below add up the workers')" if s.get("workers") else ""
            print(f"\n{name}: {s['steps']} steps in {wall:.1f} s{workers} "
                  f"({s['steps'] / max(wall, 1e-9):.1f} steps/s); {s['cycles']} dispatch cycles, "
                  f"{s['fallbacks']} fell back; time in LP solves {s['solve_s']:.1f} s, plan AC checks "
                  f"{s['ac_check_s']:.1f} s, rest of the cycles {s['cycle_s'] - s['solve_s'] - s['ac_check_s']:.1f} s, "
                  f"plant models and recording {other:.1f} s, realised AC power flow {s['ac_s']:.1f} s")
    print(f"\nreport: {Path(args.out) / 'index.html'}")
    if args.json:
        print(json.dumps(kpis, default=float))
    return 0


def cmd_serve(args) -> int:
    from vpp.service.config import load_config
    from vpp.service.server import Service

    overrides = {}
    if args.clock:
        overrides["clock"] = {"mode": args.clock, **({"speed": args.speed} if args.speed else {})}
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    config = load_config(args.config, data_dir=data_dir, grpc_address=args.address, **overrides)
    service = Service(config).start()
    print(f"vpp serving on {config.grpc_address} (port {service.port}); metrics on "
          f"{config.metrics_address}:{config.metrics_port or 'off'}; clock {config.clock.mode}"
          f"{f' x{config.clock.speed:g}' if config.clock.mode == 'simulated' else ''}; tokens in {service.tokens_path}",
          flush=True)
    service.wait()
    return 0


def _token(args) -> str:
    import os
    import tomllib

    if args.token:
        return args.token
    if os.environ.get("VPP_TOKEN"):
        return os.environ["VPP_TOKEN"]
    path = Path(args.tokens)
    if not path.exists():
        raise VppError(f"no token: pass --token, set VPP_TOKEN or point --tokens at the server's tokens.toml ({path})")
    tokens = tomllib.loads(path.read_text())
    if args.role not in tokens:
        raise VppError(f"{path} has no [{args.role}] token")
    return tokens[args.role]["token"]


def cmd_enroll(args) -> int:
    import tomllib

    import grpc

    from vpp.client import Client

    try:
        data = tomllib.loads(Path(args.file).read_text())
    except OSError as error:
        raise VppError(f"{args.file}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise VppError(f"{args.file}: not valid TOML: {error}") from None
    assets = data.get("assets", [])
    if not assets:
        raise VppError(f"{args.file}: no [[assets]] tables")
    failed = 0
    with Client(args.address, _token(args)) as client:
        for i, asset in enumerate(assets):
            spec = {k: v for k, v in asset.items() if k not in ("id", "kind", "bus", "name")}
            try:
                a = client.enroll(args.site, asset["id"], asset["kind"], str(asset["bus"]), spec)
                print(f"{asset['id']}: enrolled as {a.asset_id}")
            except grpc.RpcError as error:
                failed += 1
                print(f"assets[{i}] {asset.get('id')!r}: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1 if failed else 0


def cmd_watch(args) -> int:
    import grpc

    from vpp.client import Client

    with Client(args.address, _token(args)) as client:
        try:
            names = {a.asset_id: a.external_id for a in client.list_assets(args.site)}
        except grpc.RpcError:  # a device token may not list assets
            names = {}
        try:
            for batch in client.watch(args.site):
                when = batch.cycle_start.ToDatetime().isoformat(timespec="minutes")
                total = sum(s.p_kw for s in batch.setpoints)
                print(f"{when}Z {batch.site_id}: {len(batch.setpoints)} setpoints, net {total:+.1f} kW "
                      f"(valid until {batch.setpoints[0].valid_until.ToDatetime().isoformat(timespec='seconds')}Z)")
                for s in batch.setpoints:
                    print(f"    {names.get(s.asset_id, s.asset_id):<24} {s.asset_id}  {s.p_kw:+9.2f} kW"
                          f"{'  fallback' if s.fallback else ''}")
                sys.stdout.flush()
                if args.count:
                    args.count -= 1
                    if args.count == 0:
                        return 0
        except grpc.RpcError as error:
            print(f"vpp: error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0
    return 0


def _expiry(args):
    """--expires-in (e.g. 90d, 12h, 30m) or --expires-at (ISO 8601 with an offset) as a UTC time, or None."""
    from datetime import datetime, timedelta, timezone

    if args.expires_in and args.expires_at:
        raise VppError("--expires-in, --expires-at: give one of them")
    if args.expires_in:
        text = args.expires_in.strip().lower()
        units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
        try:
            seconds = float(text[:-1]) * units[text[-1]]
        except (KeyError, ValueError, IndexError):
            raise VppError(f"--expires-in: {args.expires_in!r} is not a duration like 90d, 12h, 30m or 45s") from None
        if not 0 < seconds < 100 * 365 * 86400:
            raise VppError("--expires-in: must be positive and under 100 years")
        return datetime.now(timezone.utc) + timedelta(seconds=seconds)
    if args.expires_at:
        try:
            when = datetime.fromisoformat(args.expires_at)
        except ValueError:
            raise VppError(f"--expires-at: {args.expires_at!r} is not an ISO 8601 time") from None
        if when.tzinfo is None:
            raise VppError("--expires-at: give a UTC offset, e.g. 2026-12-31T00:00:00+00:00")
        return when
    return None


def cmd_token(args) -> int:
    """Issue, revoke and list bearer tokens in the service's database (a running server sees
    the change at its next call: tokens are read at every request)."""
    from vpp.service.config import load_config
    from vpp.service.store import Store

    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    config = load_config(args.config, data_dir=data_dir)
    with Store(config.db_url) as store:
        if args.action == "issue":
            token_id, token = store.issue_token(args.tenant, args.role, name=args.name or "",
                                                asset_id=args.asset_id, expire_time=_expiry(args))
            record = next(r for r in store.list_tokens(args.tenant) if r.token_id == token_id)
            expires = record.expire_time.isoformat() if record.expire_time else "never"
            print(f"token_id={token_id} tenant={record.tenant} role={record.role} expires={expires}", file=sys.stderr)
            print("the token is shown once; the database keeps only its SHA-256:", file=sys.stderr)
            print(token)
        elif args.action == "revoke":
            record = store.revoke_token(args.token_id)
            print(f"token_id={record.token_id} revoked={record.revoke_time.isoformat()}")
        else:
            from datetime import datetime, timezone

            now = datetime.now(timezone.utc)
            print(f"{'token_id':<32}  {'tenant':<12} {'role':<10} {'state':<8} {'expires':<25} name / asset")
            for r in store.list_tokens(args.tenant):
                state = "revoked" if r.revoke_time else ("valid" if r.usable(now) else "expired")
                expires = r.expire_time.isoformat(timespec="seconds") if r.expire_time else "never"
                print(f"{r.token_id:<32}  {r.tenant:<12} {r.role:<10} {state:<8} {expires:<25} "
                      f"{r.name}{' ' + r.asset_id if r.asset_id else ''}")
    return 0


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
    m = sub.add_parser("sim", help="simulate a park over a period of 15-minute steps and report KPIs")
    m.add_argument("park", help="park TOML file")
    m.add_argument("--start", help="first day, park-local (default: the park's default_date)")
    m.add_argument("--days", type=int, default=7, help="days to simulate (default 7; 365 for a year)")
    m.add_argument("--out", default="out/sim", help="directory for KPIs, time series, plots and index.html")
    m.add_argument("--controller", choices=["all", "optimizer", "rules", "none"], default="all",
                   help="controller(s) to simulate side by side (default all)")
    m.add_argument("--forecast", choices=["perfect", "persistence", "noise"], default="perfect",
                   help="what the optimizer is told about the future (default perfect)")
    m.add_argument("--forecast-spread", type=float, default=0.15,
                   help="for --forecast noise: relative error at 24 h lead time (default 0.15)")
    m.add_argument("--replan-every", type=int, default=1, help="steps between re-plans (default 1: every step)")
    m.add_argument("--data", help="measured time series (CSV or Parquet; columns in sim/data.py)")
    m.add_argument("--sessions", help="measured EV sessions (CSV or Parquet; columns in sim/data.py)")
    m.add_argument("--seed", type=int, help="seed of the synthetic inputs and forecast noise (default: the park's)")
    m.add_argument("--workers", type=int, default=1,
                   help="processes for the optimizer run, each taking whole months of the period (default 1: "
                        "sequential; see sim/parallel.py)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--json", action="store_true", help="also print the KPIs as one JSON line")
    m.set_defaults(func=cmd_sim)
    v = sub.add_parser("serve", help="run the dispatch service (gRPC, 15-minute loop, metrics)")
    v.add_argument("config", nargs="?", help="service TOML (see vpp/service/config.py); default: the reference park "
                                             "site with SQLite in ./data")
    v.add_argument("--data-dir", help="database and tokens folder (default ./data)")
    v.add_argument("--address", help="gRPC listen address (default 127.0.0.1:50051)")
    v.add_argument("--clock", choices=["real", "simulated"], help="real quarter hours or a faster simulated clock")
    v.add_argument("--speed", type=float, help="simulated seconds per real second (default 60)")
    v.set_defaults(func=cmd_serve)
    for name, helptext, func in (("enroll", "enroll the [[assets]] of a TOML file at a site", cmd_enroll),
                                 ("watch", "print setpoints as the service publishes them", cmd_watch)):
        c = sub.add_parser(name, help=helptext)
        if name == "enroll":
            c.add_argument("file", help="TOML with [[assets]] tables (id, kind, bus and the kind's fields)")
        c.add_argument("--site", default="changping" if name == "enroll" else "", help="site id")
        c.add_argument("--address", default="127.0.0.1:50051")
        c.add_argument("--token", help="bearer token (or VPP_TOKEN, or --tokens)")
        c.add_argument("--tokens", default="data/tokens.toml", help="the server's tokens file")
        c.add_argument("--role", default="aggregator" if name == "enroll" else "operator",
                       help="which token of --tokens to use")
        if name == "watch":
            c.add_argument("--count", type=int, default=0, help="stop after this many batches (0: run on)")
        c.set_defaults(func=func)
    k = sub.add_parser("token", help="issue, revoke or list the service's bearer tokens (in its database)")
    k.add_argument("action", choices=["issue", "revoke", "list"])
    k.add_argument("token_id", nargs="?", help="for revoke: the token's id (see `vpp token list`)")
    k.add_argument("--config", help="service TOML, as for `vpp serve` (default: the embedded defaults)")
    k.add_argument("--data-dir", help="the server's data folder (default ./data)")
    k.add_argument("--tenant", help="issue: the token's tenant; list: only this tenant's tokens")
    k.add_argument("--role", choices=["aggregator", "device", "operator"], help="issue: the token's role")
    k.add_argument("--asset-id", help="issue: the asset a device token belongs to")
    k.add_argument("--name", help="issue: a label for the token")
    k.add_argument("--expires-in", help="issue: validity from now, e.g. 90d, 12h, 30m (default: until revoked)")
    k.add_argument("--expires-at", help="issue: expiry time, ISO 8601 with an offset")
    k.set_defaults(func=cmd_token)
    args = parser.parse_args(argv)
    if args.command == "token":
        if args.action == "issue" and not (args.tenant and args.role):
            parser.error("token issue: --tenant and --role are required")
        if args.action == "revoke" and not args.token_id:
            parser.error("token revoke: give the token id")
    # The service logs one key=value line per cycle (and per start/stop) by default.
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
                        format="time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        return args.func(args)
    except VppError as error:
        print(f"vpp: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
