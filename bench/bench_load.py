"""Load on a real ``vpp serve``: many telemetry reporters and setpoint watchers while the loop dispatches.

    .venv/bin/python bench/bench_load.py                       # 10,000 assets, 100 watchers
    .venv/bin/python bench/bench_load.py --assets 1000 --report-every-min 0.1 --load-s 60

What it does, on loopback, bounded in count and time:

1. starts ``vpp serve`` in a subprocess on a simulated clock (``--speed`` simulated seconds
   per real second) with a fresh data folder, and enrolls ``--assets`` small loads through
   the API (``--enroll-threads`` concurrent EnrollAsset calls);
2. idle: waits for ``--idle-cycles`` dispatch cycles of the full portfolio with no client
   traffic (the first one after enrollment, which builds the problem, is left out);
3. load, for ``--load-s`` seconds: ``--watchers`` WatchSetpoints streams stay open (on
   ``--watch-channels`` connections), and ``--reporters`` processes send every asset's
   measurement once every ``--report-every-min`` simulated minutes, in StreamTelemetry
   calls of ``--batch`` measurements (``--unary`` of the assets use one ReportTelemetry
   call each instead), at most ``--in-flight`` calls at a time per process;
4. prints requests and measurements per second, call latency p50/p99/max, errors,
   setpoint batches delivered to the watchers, and the cycle duration (from the engine's
   one line per cycle) idle and under load.

The 10,000 assets x every simulated minute at ``--speed 60`` is 10,000 measurements per
real second offered; the figures say how much of it the server sustained.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOCK_START = datetime(2025, 1, 15, 0, 0, tzinfo=timezone(timedelta(hours=8)))
CYCLE_LINE = re.compile(r"cycle site=(\S+) start=(\S+) status=(\S+) total_s=([\d.]+) solve_s=([\d.]+).*setpoints=(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Server:
    """``vpp serve`` with a config written for the bench; every output line kept with its arrival time."""

    def __init__(self, data_dir: Path, speed: float):
        self.port, self.metrics_port = free_port(), free_port()
        config = data_dir / "bench.toml"
        config.write_text(f'data_dir = "{data_dir}"\ngrpc_address = "127.0.0.1:{self.port}"\n'
                          f'metrics_port = {self.metrics_port}\n\n[clock]\nmode = "simulated"\n'
                          f'speed = {speed}\nstart = "{CLOCK_START.isoformat()}"\n')
        self.speed = speed
        self.proc = subprocess.Popen([sys.executable, "-m", "vpp.cli", "serve", str(config)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(180):
            self.proc.kill()
            raise SystemExit("the server did not start:\n" + "".join(line for _, line in self.lines[-20:]))
        # The simulated clock started before the server said it was ready: measurements
        # dated from this moment are at most the start-up time old, never in the future.
        self.clock_wall0 = time.time()
        self.tokens = {k: v["token"] for k, v in tomllib.loads((data_dir / "tokens.toml").read_text()).items()}
        self.address = f"127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))
            if "vpp serving on" in line:
                self.ready.set()

    def sim_now(self) -> datetime:
        return CLOCK_START + timedelta(seconds=(time.time() - self.clock_wall0) * self.speed)

    def cycles(self, since: float = 0.0, until: float = float("inf")) -> list[dict]:
        out = []
        for t, line in list(self.lines):
            m = CYCLE_LINE.search(line)
            if m and since <= t <= until:
                out.append(dict(wall=t, site=m[1], start=m[2], status=m[3], total_s=float(m[4]), solve_s=float(m[5]),
                                setpoints=int(m[6])))
        return out

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- clients -----------------------------------------------------------------------------------


def enroll(address: str, token: str, n: int, threads: int) -> tuple[list[str], list[float], int]:
    """Enroll n small loads; return (asset ids, latencies in s, errors)."""
    import grpc
    from google.protobuf import struct_pb2

    from vpp.v1 import assets_pb2, assets_pb2_grpc, common_pb2

    channel = grpc.insecure_channel(address)
    stub = assets_pb2_grpc.AssetRegistryStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    bus = stub.ListAssets(assets_pb2.ListAssetsRequest(page_size=1), metadata=metadata).assets[0].bus
    spec = struct_pb2.Struct()
    spec.update({"peak_kw": 0.01, "profile": "residential"})
    ids, latencies, errors = [None] * n, [], 0

    def one(k):
        nonlocal errors
        t0 = time.perf_counter()
        try:
            a = stub.EnrollAsset(assets_pb2.EnrollAssetRequest(site_id="changping", external_id=f"load-{k:05d}", bus=bus,
                                                               kind=common_pb2.ASSET_KIND_LOAD, spec=spec),
                                 metadata=metadata, timeout=60)
            ids[k] = a.asset_id
            latencies.append(time.perf_counter() - t0)
        except grpc.RpcError:
            errors += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    channel.close()
    return [a for a in ids if a], latencies, errors


def reporter(args: dict, results) -> None:
    """One reporting process: its assets' measurements every round, until the end time."""
    import grpc

    from vpp.client import timestamp
    from vpp.v1 import telemetry_pb2, telemetry_pb2_grpc

    channel = grpc.insecure_channel(args["address"])
    stub = telemetry_pb2_grpc.TelemetryStub(channel)
    metadata = (("authorization", f"Bearer {args['token']}"),)
    ids, batch, unary = args["ids"], args["batch"], args["unary"]
    stream_ids, unary_ids = ids[unary:], ids[:unary]
    out = dict(stream_s=[], unary_s=[], measurements=0, accepted=0, rejected=0, errors=0, error_kinds={},
               error_details=[], rejections=[], rounds=0, late_rounds=0, calls=0)

    def sim_now():
        return args["clock_start"] + timedelta(seconds=(time.time() - args["clock_wall0"]) * args["speed"])

    def deadline_s():  # a stalled server cannot stretch the run much past its end
        return max(5.0, args["t_end"] - time.time() + 30.0)

    def send_stream(chunk):
        when = timestamp(sim_now())
        messages = [telemetry_pb2.Measurement(asset_id=a, time=when, p_kw=-0.005) for a in chunk]
        t0 = time.perf_counter()
        try:
            summary = stub.StreamTelemetry(iter(messages), metadata=metadata, timeout=deadline_s())
            if summary.errors and len(out["rejections"]) < 3:
                out["rejections"].append(summary.errors[0])
            return "stream", time.perf_counter() - t0, len(chunk), summary.accepted, summary.rejected, None
        except grpc.RpcError as error:
            if len(out["error_details"]) < 5:
                out["error_details"].append(f"StreamTelemetry {error.code().name}: {error.details()}")
            return "stream", time.perf_counter() - t0, len(chunk), 0, 0, error.code().name

    def send_unary(asset_id):
        m = telemetry_pb2.Measurement(asset_id=asset_id, time=timestamp(sim_now()), p_kw=-0.005)
        t0 = time.perf_counter()
        try:
            stub.ReportTelemetry(m, metadata=metadata, timeout=deadline_s())
            return "unary", time.perf_counter() - t0, 1, 1, 0, None
        except grpc.RpcError as error:
            if len(out["error_details"]) < 5:
                out["error_details"].append(f"ReportTelemetry {error.code().name}: {error.details()}")
            return "unary", time.perf_counter() - t0, 1, 0, 0, error.code().name

    interval_s = args["interval_s"]
    # Spread the processes' rounds over the interval, as independent devices would be.
    next_round = args["t_start"] + interval_s * args["offset"]
    with ThreadPoolExecutor(args["in_flight"]) as pool:
        while True:
            now = time.time()
            if now >= args["t_end"]:
                break
            if now < next_round:
                time.sleep(min(next_round - now, args["t_end"] - now))
                continue
            jobs = [pool.submit(send_stream, stream_ids[k:k + batch]) for k in range(0, len(stream_ids), batch)]
            jobs += [pool.submit(send_unary, a) for a in unary_ids]
            for job in jobs:
                kind, seconds, n, accepted, rejected, error = job.result()
                out[f"{kind}_s"].append(seconds)
                out["calls"] += 1
                out["measurements"] += n
                out["accepted"] += accepted
                out["rejected"] += rejected
                if error:
                    out["errors"] += 1
                    out["error_kinds"][error] = out["error_kinds"].get(error, 0) + 1
            out["rounds"] += 1
            next_round += interval_s
            if time.time() > next_round:  # the round took longer than the interval: the offered rate is not met
                out["late_rounds"] += 1
                next_round = time.time()
    channel.close()
    results.put(out)


class Watchers:
    """WatchSetpoints streams counting the batches and setpoints they receive."""

    def __init__(self, address: str, token: str, n: int, channels: int):
        import grpc

        from vpp.v1 import dispatch_pb2, dispatch_pb2_grpc

        self.channels = [grpc.insecure_channel(address) for _ in range(max(1, channels))]
        self.batches = [0] * n
        self.setpoints = [0] * n
        self.errors: list[str] = []
        self.details: list[str] = []
        self.calls = []
        metadata = (("authorization", f"Bearer {token}"),)
        for k in range(n):
            stub = dispatch_pb2_grpc.DispatchStub(self.channels[k % len(self.channels)])
            call = stub.WatchSetpoints(dispatch_pb2.WatchSetpointsRequest(site_id="changping"), metadata=metadata)
            self.calls.append(call)
            threading.Thread(target=self._read, args=(k, call), daemon=True).start()

    def _read(self, k, call):
        import grpc

        try:
            for batch in call:
                self.batches[k] += 1
                self.setpoints[k] += len(batch.setpoints)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(error.code().name)
                self.details.append(f"WatchSetpoints {error.code().name}: {error.details()}")

    def stop(self):
        for call in self.calls:
            call.cancel()
        time.sleep(0.5)
        for channel in self.channels:
            channel.close()


# --- the run -----------------------------------------------------------------------------------


def wait_cycles(server: Server, n_assets: int, count: int, since: float, limit_s: float) -> list[dict]:
    """Cycles of the full portfolio logged after ``since``: wait for ``count`` of them after the first."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        full = [c for c in server.cycles(since) if c["setpoints"] >= n_assets]
        if len(full) >= count + 1:
            return full[1:count + 1]
        time.sleep(0.5)
    full = [c for c in server.cycles(since) if c["setpoints"] >= n_assets]
    return full[1:]


def summarize_cycles(cycles: list[dict]) -> str:
    if not cycles:
        return "none completed"
    totals = [c["total_s"] for c in cycles]
    statuses = {}
    for c in cycles:
        statuses[c["status"]] = statuses.get(c["status"], 0) + 1
    return (f"{len(cycles)} cycles, total_s median {statistics.median(totals):.2f} (min {min(totals):.2f}, max "
            f"{max(totals):.2f}), solve_s median {statistics.median(c['solve_s'] for c in cycles):.2f}; {statuses}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=int, default=10_000)
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--watch-channels", type=int, default=10)
    p.add_argument("--reporters", type=int, default=4, help="reporting processes")
    p.add_argument("--in-flight", type=int, default=4, help="concurrent calls per reporting process")
    p.add_argument("--batch", type=int, default=500, help="measurements per StreamTelemetry call")
    p.add_argument("--unary", type=int, default=200, help="assets reporting with one ReportTelemetry call each")
    p.add_argument("--report-every-min", type=float, default=1.0, help="simulated minutes between an asset's reports")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per real second")
    p.add_argument("--idle-cycles", type=int, default=2)
    p.add_argument("--load-s", type=float, default=120.0, help="real seconds of load")
    p.add_argument("--enroll-threads", type=int, default=8)
    p.add_argument("--max-wait-s", type=float, default=600.0, help="bound on each wait for cycles")
    p.add_argument("--keep", action="store_true", help="keep the data folder and print its path")
    p.add_argument("--server-log", help="write the server's output to this file at the end")
    args = p.parse_args(argv)

    data = Path(tempfile.mkdtemp(prefix="vpp-load-"))
    t_launch = time.time()
    server = Server(data, args.speed)
    print(f"server up in {time.time() - t_launch:.1f} s on {server.address}; data in {data}", flush=True)
    try:
        t0 = time.time()
        ids, enroll_s, enroll_errors = enroll(server.address, server.tokens["aggregator"], args.assets,
                                              args.enroll_threads)
        enroll_wall = time.time() - t0
        n_total = len(ids) + 12  # the reference park's own assets
        print(f"enrolled {len(ids)} assets in {enroll_wall:.1f} s ({len(ids) / enroll_wall:.0f}/s; latency p50 "
              f"{percentile(enroll_s, 50) * 1e3:.1f} ms p99 {percentile(enroll_s, 99) * 1e3:.1f} ms; "
              f"{enroll_errors} errors)", flush=True)
        idle = wait_cycles(server, n_total, args.idle_cycles, time.time(), args.max_wait_s)
        print(f"idle: {summarize_cycles(idle)}", flush=True)

        interval_s = args.report_every_min * 60.0 / args.speed
        offered = len(ids) / interval_s
        print(f"load: {len(ids)} assets every {args.report_every_min:g} simulated min = every {interval_s:.2f} s "
              f"real: {offered:.0f} measurements/s offered; {args.watchers} watchers; {args.load_s:.0f} s", flush=True)
        watchers = Watchers(server.address, server.tokens["aggregator"], args.watchers, args.watch_channels)
        time.sleep(1.0)
        t_start = time.time() + 1.0
        t_end = t_start + args.load_s
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        share = -(-len(ids) // args.reporters)
        unary_share = -(-args.unary // args.reporters)
        procs = []
        for k in range(args.reporters):
            chunk = ids[k * share:(k + 1) * share]
            job = dict(address=server.address, token=server.tokens["aggregator"], ids=chunk, batch=args.batch,
                       unary=min(unary_share, len(chunk)), interval_s=interval_s, t_start=t_start, t_end=t_end,
                       offset=k / args.reporters, in_flight=args.in_flight, speed=args.speed,
                       clock_start=CLOCK_START, clock_wall0=server.clock_wall0)
            proc = ctx.Process(target=reporter, args=(job, results))
            proc.start()
            procs.append(proc)
        outs = [results.get(timeout=args.load_s + 600) for _ in procs]
        for proc in procs:
            proc.join(60)
        t_done = time.time()
        watchers.stop()
        loaded = server.cycles(t_start, t_done)
        wall = t_done - t_start

        stream_s = [x for o in outs for x in o["stream_s"]]
        unary_s = [x for o in outs for x in o["unary_s"]]
        calls = sum(o["calls"] for o in outs)
        measurements = sum(o["measurements"] for o in outs)
        accepted = sum(o["accepted"] for o in outs)
        errors = sum(o["errors"] for o in outs)
        kinds: dict[str, int] = {}
        for o in outs:
            for k, v in o["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        rounds = sum(o["rounds"] for o in outs)
        late = sum(o["late_rounds"] for o in outs)
        print(f"\n--- results ({args.assets} assets, {args.watchers} watchers, speed {args.speed:g}, "
              f"{wall:.0f} s of load) ---")
        print(f"requests: {calls} calls in {wall:.1f} s = {calls / wall:.1f} calls/s "
              f"({len(stream_s)} StreamTelemetry of <= {args.batch}, {len(unary_s)} ReportTelemetry)")
        print(f"measurements: {measurements} sent, {accepted} stored = {accepted / wall:.0f}/s sustained "
              f"(offered {offered:.0f}/s); rejected {sum(o['rejected'] for o in outs)}")
        print(f"errors: {errors} {kinds or ''}; rounds {rounds}, late {late}")
        for line in sorted({d for o in outs for d in o["error_details"]})[:5]:
            print(f"  error: {line}")
        for line in sorted({d for o in outs for d in o["rejections"]})[:3]:
            print(f"  rejected: {line}")
        for name, values in (("StreamTelemetry", stream_s), ("ReportTelemetry", unary_s)):
            if values:
                print(f"latency {name}: p50 {percentile(values, 50) * 1e3:.1f} ms, p99 "
                      f"{percentile(values, 99) * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms")
        print(f"watchers: {sum(1 for b in watchers.batches if b)} of {args.watchers} got batches; batches per "
              f"watcher min {min(watchers.batches)} max {max(watchers.batches)}; setpoints delivered "
              f"{sum(watchers.setpoints)}; stream errors {len(watchers.errors)} {set(watchers.errors) or ''}")
        for line in sorted(set(watchers.details))[:3]:
            print(f"  watch error: {line}")
        print(f"cycles idle:       {summarize_cycles(idle)}")
        print(f"cycles under load: {summarize_cycles(loaded)}")
        body = server.metrics()
        for name in ("vpp_cycle_duration_seconds_sum", "vpp_cycle_duration_seconds_count"):
            values = [float(line.split()[-1]) for line in body.splitlines() if line.startswith(name)]
            print(f"/metrics {name}: {sum(values):.2f}")
    finally:
        server.stop()
        if args.server_log:
            time.sleep(0.5)
            Path(args.server_log).write_text("".join(line for _, line in server.lines))
        if not args.keep:
            import shutil

            shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
