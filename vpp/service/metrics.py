"""Prometheus metrics of the service, on their own registry and port.

Names follow the Prometheus conventions: base units (seconds, watts), ``_total`` for
counters, labels for the dimensions.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_CYCLE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)
_RPC_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cycle_seconds = Histogram("vpp_cycle_duration_seconds", "Wall time of a dispatch cycle of a site",
                                       ["site"], buckets=_CYCLE_BUCKETS_S, registry=r)
        self.solve_seconds = Histogram("vpp_solve_duration_seconds", "LP solve time within a dispatch cycle",
                                       ["site"], buckets=_CYCLE_BUCKETS_S, registry=r)
        self.cycles = Counter("vpp_cycles_total", "Dispatch cycles by outcome (optimal, fallback, failed)",
                              ["site", "outcome"], registry=r)
        self.assets = Gauge("vpp_assets", "Enrolled assets by kind and state", ["kind", "state"], registry=r)
        self.portfolio_power = Gauge("vpp_portfolio_power_watts",
                                     "Planned net injection of a site's assets for the current step (W, + = export)",
                                     ["site"], registry=r)
        self.violations_found = Counter("vpp_grid_violations_found_total",
                                        "Grid limit violations the AC check found in plans (step-elements)",
                                        ["site"], registry=r)
        self.violations_remaining = Gauge("vpp_grid_violations_remaining",
                                          "Grid limit violations left in the last published plan", ["site"],
                                          registry=r)
        self.stale_telemetry = Gauge("vpp_stale_telemetry_assets",
                                     "Assets planned without fresh telemetry in the last cycle", ["site"], registry=r)
        self.rpc_requests = Counter("vpp_grpc_requests_total", "gRPC requests by method and status code",
                                    ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("vpp_grpc_request_duration_seconds", "gRPC request latency by method",
                                     ["method"], buckets=_RPC_BUCKETS_S, registry=r)

    def observe_cycle(self, outcome) -> None:
        site = outcome.site_id
        self.cycle_seconds.labels(site).observe(outcome.total_s)
        self.solve_seconds.labels(site).observe(outcome.solve_s)
        self.cycles.labels(site, outcome.status).inc()
        self.portfolio_power.labels(site).set(outcome.portfolio_p_kw * 1000.0)
        self.violations_found.labels(site).inc(outcome.violations_found)
        self.violations_remaining.labels(site).set(outcome.violations_remaining)
        self.stale_telemetry.labels(site).set(len(outcome.stale_assets))

    def set_asset_counts(self, counts: dict[tuple[str, str], int]) -> None:
        self.assets.clear()
        for (kind, state), n in counts.items():
            self.assets.labels(kind, state).set(n)

    def asset_enrolled(self, kind: str) -> None:
        """One more active asset of ``kind`` (counted as it happens: recounting every
        asset at each enrollment made enrolling 10,000 assets quadratic)."""
        self.assets.labels(kind, "active").inc()

    def asset_decommissioned(self, kind: str) -> None:
        self.assets.labels(kind, "active").dec()
        self.assets.labels(kind, "decommissioned").inc()

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def serve(self, port: int, address: str = "127.0.0.1"):
        """Expose /metrics over HTTP; returns the server (``shutdown()`` to stop)."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server
