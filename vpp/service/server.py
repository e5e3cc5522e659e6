"""Assembling and running the service: store, sites, engine, gRPC server, metrics.

``serve(config)`` starts everything and blocks; ``Service`` is the same thing as an
object tests and embedding code can start and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from datetime import datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vpp.service.config import ServiceConfig
from vpp.service.engine import Clock, Engine, SimulatedClock, Site
from vpp.service.metrics import Metrics

log = logging.getLogger("vpp.service")

TOKENS_FILE = "tokens.toml"


def bootstrap_tokens(store, data_dir: Path) -> Path:
    """On the first start, create one token per role and write them to ``tokens.toml``
    (mode 0600) in the data folder; the store keeps only their hashes."""
    from vpp.service.store import generate_token

    path = data_dir / TOKENS_FILE
    if path.exists():
        return path
    tokens = {
        "aggregator": ("demo", "aggregator"),
        "operator": ("grid", "operator"),
    }
    lines = ["# Bearer tokens created on the first start; the database keeps only their SHA-256.",
             "# Use as gRPC metadata:  authorization: Bearer <token>"]
    for name, (tenant, role) in tokens.items():
        token = generate_token()
        store.add_token(tenant, role, token, name=name)
        lines += [f"[{name}]", f'tenant = "{tenant}"', f'role = "{role}"', f'token = "{token}"', ""]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines))
    return path


def enroll_park_assets(store, site_config, park) -> int:
    """Enroll the park file's assets for the site's demo tenant (idempotent)."""
    import json

    count = 0
    for fleet in park.fleets.values():
        for spec in fleet.specs:
            data = json.loads(spec.model_dump_json(exclude={"id", "kind", "bus", "name"}))
            if data.get("ramp_kw_per_min") is None:
                # Unset, it is left out, so the specs stored before the field existed still match.
                data.pop("ramp_kw_per_min", None)
            store.enroll_asset(site_config.demo_tenant, site_config.id, spec.id, spec.kind, str(spec.bus), data)
            count += 1
    return count


class Service:
    """The running service. ``start()`` returns once it listens; ``stop()`` shuts down."""

    def __init__(self, config: ServiceConfig, store=None, clock: Clock | None = None):
        from vpp.service.store import Store

        self.config = config
        data_dir = config.data_path
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or Store(config.db_url)
        self.tokens_path = bootstrap_tokens(self.store, data_dir)
        self.sites: dict[str, Site] = {}
        for sc in config.sites:
            site = Site(sc.id, config.site_park_path(sc))
            self.sites[sc.id] = site
            if sc.enroll_park_assets:
                enroll_park_assets(self.store, sc, site.template)
        if clock is None:
            if config.clock.mode == "simulated":
                clock = SimulatedClock(datetime.fromisoformat(config.clock.start), config.clock.speed)
            else:
                clock = Clock()
        self.metrics = Metrics()
        self.engine = Engine(self.store, self.sites, clock, config.loop.telemetry_max_age_s,
                             config.loop.setpoint_grace_s, self.metrics)
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self._metrics_server = None

    def start(self, run_loop: bool = True, max_cycles: int | None = None) -> "Service":
        from vpp.service.api import SERVER_THREADS, add_services

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS),
                                  options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
        names = add_services(self.server, self)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        for name in names + [""]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        tls = self.config.tls
        if tls.enabled:
            try:
                key = self.config.path(tls.key_file).read_bytes()
                cert = self.config.path(tls.cert_file).read_bytes()
                ca = self.config.path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
            except OSError as error:
                from vpp.errors import SpecError

                raise SpecError("tls", f"cannot read a certificate or key: {error}") from None
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                      require_client_auth=ca is not None)
            self.port = self.server.add_secure_port(self.config.grpc_address, credentials)
        else:
            self.port = self.server.add_insecure_port(self.config.grpc_address)
        self.server.start()
        if self.config.metrics_port:
            self._metrics_server = self.metrics.serve(self.config.metrics_port, self.config.metrics_address)
        self.refresh_asset_metrics()
        if run_loop:
            self._loop_thread = threading.Thread(target=self.engine.run, args=(self._stop, max_cycles),
                                                 name="dispatch-loop", daemon=True)
            self._loop_thread.start()
        log.info("serving gRPC on port %s (%s), metrics on %s, tokens in %s", self.port,
                 "TLS" if tls.enabled else "plaintext", self.config.metrics_port or "off", self.tokens_path)
        return self

    def refresh_asset_metrics(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for a in self.store.iter_assets(include_decommissioned=True):
            counts[(a.kind, a.state)] = counts.get((a.kind, a.state), 0) + 1
        self.metrics.set_asset_counts(counts)

    def envelope(self, site):
        """The site's power envelope per step of its latest plan: (start, step, p_min_kw,
        p_max_kw), net injection, or None before the first plan.

        The bounds are what the assets' ratings allow around the forecast: loads at
        their forecast, PV between off and its available output, batteries, heat pumps
        and charging stations across their power range.  Storage energy is not held
        against them, so a bound may not be sustainable for hours on end.
        """
        import numpy as np
        import pandas as pd

        latest = self.store.latest_plan(site.id)
        if latest is None or site.park is None:
            return None
        cycle, _ = latest
        park = site.park
        start = pd.Timestamp(cycle.cycle_start).tz_convert(park.site.timezone)
        series = site.series_for(start)
        T = park.settings.horizon_steps
        forecasts = series.step_forecast(park, series.position(start), T)
        lo, hi = np.zeros(T), np.zeros(T)
        for kind, fleet in park.fleets.items():
            if kind == "load":
                demand = np.asarray(forecasts["load"]["demand_kw"]).sum(axis=0)
                lo, hi = lo - demand, hi - demand
            elif kind == "pv":
                hi = hi + np.asarray(forecasts["pv"]["avail_kw"]).sum(axis=0)
            else:
                p_min, p_max, _ = fleet.power_range()
                lo, hi = lo + p_min.sum(), hi + p_max.sum()
        return cycle.cycle_start, site.dt, lo, hi

    def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop(grace_s).wait()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=30)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    def wait(self) -> None:
        """Block until SIGINT/SIGTERM, then stop."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()
