"""kill -9 campaign: acknowledged writes must survive a server killed at random moments.

Several client threads stream writes to a real ``vpp serve`` subprocess: enrollments of
small batteries, telemetry for them, and decommissions (so the number of assets the
dispatch loop plans stays small while enrollments keep coming).  At a random moment the
server is killed with SIGKILL, then restarted on the same data directory, and the clients
go on.  At the end every write the server acknowledged is looked up: enrollments and
decommissions through the restarted server's API, measurements in the telemetry history.
Every stored cycle is checked too: one setpoint per planned asset, or none for a failed
cycle (a kill that lands while a cycle is stored must not leave half of it).

    .venv/bin/python bench/fault_campaign.py --kills 20 --seed 0
    .venv/bin/python bench/fault_campaign.py --kills 20 --seed 0 --database-url postgresql+psycopg://...

Prints the figures and exits 1 if any acknowledged write is missing or a cycle is
incomplete.  ``tests/test_reliability.py`` runs the same campaign with 3 kills.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import random
import signal
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = "changping"
SPEC = {"e_kwh": 10.0, "p_charge_max_kw": 5.0, "p_discharge_max_kw": 5.0}
T0 = datetime(2025, 1, 15, 0, 0, tzinfo=timezone.utc)
MAX_ACTIVE_PER_WORKER = 3


def server_helpers():
    """``_start_server`` and ``_free_port`` of tests/test_service.py: the one way the tests
    start a real ``vpp serve`` subprocess (waits for its "vpp serving on" line)."""
    spec = importlib.util.spec_from_file_location("vpp_service_tests", REPO / "tests" / "test_service.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._start_server, module._free_port


@dataclass
class Ledger:
    """Writes the server acknowledged, shared by the client threads."""

    enrolled: dict[str, str] = field(default_factory=dict)   # asset_id -> external_id
    decommissioned: set[str] = field(default_factory=set)
    measured: list[tuple[str, datetime, float]] = field(default_factory=list)  # (asset_id, time, p_kw)
    errors: Counter = field(default_factory=Counter)            # status code name -> calls
    lock: threading.Lock = field(default_factory=threading.Lock)
    ticks: itertools.count = field(default_factory=itertools.count)

    @property
    def acknowledged(self) -> int:
        return len(self.enrolled) + len(self.decommissioned) + len(self.measured)


class Worker(threading.Thread):
    """One client: enrolls, reports and decommissions until told to stop."""

    def __init__(self, index: int, address: str, token: str, bus: str, ledger: Ledger, seed: int,
                 active: list[str], stop: threading.Event):
        super().__init__(name=f"campaign-client-{index}", daemon=True)
        self.index, self.address, self.token, self.bus = index, address, token, bus
        self.ledger, self.rng, self.active, self.stop = ledger, random.Random(seed), active, stop

    def run(self) -> None:
        import grpc

        from vpp.client import Client

        ledger = self.ledger
        with Client(self.address, self.token, timeout_s=10) as client:
            while not self.stop.is_set():
                roll = self.rng.random()
                asset_id = None
                try:
                    if not self.active or (roll < 0.08 and len(self.active) < MAX_ACTIVE_PER_WORKER):
                        with ledger.lock:
                            external_id = f"campaign-{self.index}-{next(ledger.ticks)}"
                        asset = client.enroll(SITE, external_id, "battery", self.bus, SPEC)
                        with ledger.lock:
                            ledger.enrolled[asset.asset_id] = external_id
                        self.active.append(asset.asset_id)
                    elif roll < 0.14 and len(self.active) > 1:
                        asset_id = self.active[0]
                        decommission(client, asset_id)
                        with ledger.lock:
                            ledger.decommissioned.add(asset_id)
                        self.active.remove(asset_id)
                    else:
                        asset_id = self.rng.choice(self.active)
                        with ledger.lock:
                            when = T0 + timedelta(seconds=next(ledger.ticks))
                        p_kw = round(self.rng.uniform(-5.0, 5.0), 3)
                        client.report(asset_id, when, p_kw, soc_frac=0.5)
                        with ledger.lock:
                            ledger.measured.append((asset_id, when, p_kw))
                except grpc.RpcError as error:
                    with ledger.lock:
                        ledger.errors[error.code().name] += 1
                    if error.code() == grpc.StatusCode.INVALID_ARGUMENT and asset_id in self.active:
                        # A decommission the server stored but could not acknowledge before the kill.
                        self.active.remove(asset_id)
                    self.stop.wait(0.05)


def decommission(client, asset_id: str):
    from vpp.v1 import assets_pb2

    return client._call(client.assets.DecommissionAsset, assets_pb2.DecommissionAssetRequest(asset_id=asset_id))


def run_campaign(data_dir: Path, kills: int = 20, workers: int = 4, seed: int = 0, min_alive_s: float = 0.3,
                 max_alive_s: float = 6.0, database_url: str | None = None, log=print) -> dict:
    """Run the campaign; return its figures (see ``main`` for what each means)."""
    start_server, free_port = server_helpers()
    saved_url = os.environ.get("VPP_DATABASE_URL")
    if database_url:  # the server subprocesses take it from their environment
        os.environ["VPP_DATABASE_URL"] = database_url
    try:
        return _campaign(data_dir, kills, workers, seed, min_alive_s, max_alive_s, database_url, log, start_server,
                         free_port)
    finally:
        if saved_url is None:
            os.environ.pop("VPP_DATABASE_URL", None)
        else:
            os.environ["VPP_DATABASE_URL"] = saved_url


def _campaign(data_dir, kills, workers, seed, min_alive_s, max_alive_s, database_url, log, start_server,
              free_port) -> dict:
    from vpp.client import Client

    rng = random.Random(seed)
    port = free_port()
    address = f"127.0.0.1:{port}"
    ledger = Ledger()
    active: list[list[str]] = [[] for _ in range(workers)]
    token = bus = None
    killed_mid_cycle = 0
    alive_s = []
    t_start = time.monotonic()
    start_s = []
    for kill in range(kills):
        t0 = time.monotonic()
        proc = start_server(data_dir, port)
        start_s.append(time.monotonic() - t0)
        if token is None:
            token = tomllib.loads((Path(data_dir) / "tokens.toml").read_text())["aggregator"]["token"]
            with Client(address, token) as client:
                bus = client.list_assets(SITE)[0].bus
        stop = threading.Event()
        threads = [Worker(k, address, token, bus, ledger, seed * 1000 + kill * 100 + k, active[k], stop)
                   for k in range(workers)]
        for t in threads:
            t.start()
        alive = rng.uniform(min_alive_s, max_alive_s)
        time.sleep(alive)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        output = proc.stdout.read()
        proc.stdout.close()
        # The server plans the quarter hour under way as soon as it starts: no cycle line
        # in its log means the kill landed before that cycle was stored.
        if "cycle site=" not in output:
            killed_mid_cycle += 1
        stop.set()
        for t in threads:
            t.join(timeout=60)
        alive_s.append(alive)
        log(f"kill {kill + 1}/{kills}: started in {start_s[-1]:.1f} s, killed after {alive:.2f} s; "
            f"acknowledged so far {ledger.acknowledged}")
    t0 = time.monotonic()
    figures = verify(data_dir, port, token, ledger, database_url, start_server)
    log(f"verified in {time.monotonic() - t0:.1f} s")
    figures.update(kills=kills, workers=workers, seed=seed, killed_before_first_cycle_stored=killed_mid_cycle,
                   alive_s_min=min(alive_s), alive_s_max=max(alive_s), start_s_median=sorted(start_s)[len(start_s) // 2], wall_s=time.monotonic() - t_start,
                   refused_calls=dict(ledger.errors))
    return figures


def verify(data_dir: Path, port: int, token: str, ledger: Ledger, database_url: str | None, start_server) -> dict:
    """Restart the server once more and look up every acknowledged write."""
    import grpc
    from sqlalchemy import func, select

    from vpp.client import Client
    from vpp.service.store import CycleRow, SetpointRow, Store, TelemetryRow
    from vpp.v1 import assets_pb2, common_pb2

    proc = start_server(data_dir, port)
    try:
        missing_enrollments = missing_decommissions = 0
        with Client(f"127.0.0.1:{port}", token) as client:
            for asset_id, external_id in ledger.enrolled.items():
                try:
                    a = client.assets.GetAsset(assets_pb2.GetAssetRequest(asset_id=asset_id), metadata=client.metadata)
                except grpc.RpcError:
                    missing_enrollments += 1
                    continue
                if a.external_id != external_id:
                    missing_enrollments += 1
                elif asset_id in ledger.decommissioned and a.state != common_pb2.ASSET_STATE_DECOMMISSIONED:
                    missing_decommissions += 1
        url = database_url or f"sqlite:///{Path(data_dir) / 'vpp.db'}"
        with Store(url) as store, store.engine.connect() as connection:
            stored = set()
            for asset_id, when, values in connection.execute(
                    select(TelemetryRow.asset_id, TelemetryRow.time, TelemetryRow.values)):
                stored.add((asset_id, when, round(float(values.get("p_kw", "nan")), 3)))
            missing_measurements = sum((a, t, p) not in stored for a, t, p in ledger.measured)
            setpoints = dict(connection.execute(select(SetpointRow.cycle_id, func.count())
                                                .group_by(SetpointRow.cycle_id)).all())
            cycles = incomplete = 0
            for cycle_id, status, plan in connection.execute(select(CycleRow.cycle_id, CycleRow.status,
                                                                    CycleRow.plan)):
                cycles += 1
                planned = len((plan or {}).get("p_kw", {})) if status != "failed" else 0
                if setpoints.get(cycle_id, 0) != planned:
                    incomplete += 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stdout.close()
    return dict(acknowledged=ledger.acknowledged, enrollments=len(ledger.enrolled),
                decommissions=len(ledger.decommissioned), measurements=len(ledger.measured),
                missing_enrollments=missing_enrollments, missing_decommissions=missing_decommissions,
                missing_measurements=missing_measurements,
                missing=missing_enrollments + missing_decommissions + missing_measurements,
                cycles_stored=cycles, cycles_incomplete=incomplete)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments and the clients' choices")
    parser.add_argument("--min-alive-s", type=float, default=0.3, help="shortest life of a server before its kill")
    parser.add_argument("--max-alive-s", type=float, default=6.0, help="longest life of a server before its kill")
    parser.add_argument("--data-dir", help="server data directory (default: a new temporary one)")
    parser.add_argument("--database-url", help="PostgreSQL URL instead of SQLite in the data directory")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="vpp-kill-"))
    print(f"data directory {data_dir}; database {args.database_url or 'SQLite'}; seed {args.seed}", flush=True)
    f = run_campaign(data_dir, args.kills, args.workers, args.seed, args.min_alive_s, args.max_alive_s,
                     args.database_url, log=lambda line: print(line, flush=True))
    print(f"\nkills (SIGKILL): {f['kills']}, server lives {f['alive_s_min']:.2f}-{f['alive_s_max']:.2f} s, "
          f"{f['killed_before_first_cycle_stored']} before the first cycle after a start was stored")
    print(f"acknowledged writes: {f['acknowledged']} ({f['enrollments']} enrollments, {f['decommissions']} "
          f"decommissions, {f['measurements']} measurements) from {f['workers']} concurrent clients")
    print(f"calls refused or cut by the kills: {sum(f['refused_calls'].values())} {f['refused_calls']}")
    print(f"missing after restart: {f['missing']} (enrollments {f['missing_enrollments']}, decommissions "
          f"{f['missing_decommissions']}, measurements {f['missing_measurements']})")
    print(f"cycles stored: {f['cycles_stored']}, incomplete: {f['cycles_incomplete']}")
    print(f"wall time: {f['wall_s']:.1f} s")
    return 1 if f["missing"] or f["cycles_incomplete"] else 0


if __name__ == "__main__":
    sys.exit(main())
