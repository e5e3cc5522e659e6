"""The 15-minute dispatch loop of the service: sites, clock, one cycle, publishing.

A *site* is a park file's network, connection, tariff and carbon settings with the assets
enrolled for it in the store (not the park file's ``[[assets]]``, which only seed the
demo tenant).  Each cycle, per site: read the active assets, their latest telemetry and
the operators' limits and requests; plan with the same :class:`Dispatcher` as
``vpp dispatch``; store the cycle with every asset's setpoint for the coming step and its
validity window in one transaction; then publish to the setpoint streams.

Telemetry older than ``telemetry_max_age_s`` (or none) is missing: the asset is planned
from a conservative state (a battery at the bottom of its window, so it is never asked to
discharge energy it may not have; a heat store at the bottom of its comfort band) and the
cycle lists it as stale.  So is telemetry dated more than ``telemetry_max_ahead_s`` after
the cycle start (a device clock running ahead must not keep an old state "fresh" for ever)
and telemetry no asset of that kind can produce (a battery holding more than its nameplate
energy, a heat store above its capacity).  A cycle that fails is stored as such, publishes
the fallback setpoints, is counted, and the loop goes on.

The optimizer runs in a worker thread under a watchdog: if it has not returned
``dispatch_grace_s`` after the park's ``time_budget_s`` (a solver that hangs and ignores
its own time limit), the cycle publishes each asset's safe fallback setpoint, is counted
as a fallback, and the next cycle plans with a freshly built dispatcher.

Before setpoints leave, each is clipped to the asset's enrolled power range and, for assets
enrolled with ``ramp_kw_per_min``, to within that rate of the asset's previous published
setpoint, whatever the plan says.  The month's peak import so far (for the demand charge)
is a running maximum per site of each cycle's planned first-step import, seeded from the
cycles stored for that month when the service starts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd

from vpp.assets import FLEETS, parse_asset_spec
from vpp.assets.base import Horizon
from vpp.dispatch.dispatcher import Dispatcher
from vpp.dispatch.problem import FlexRequest
from vpp.dispatch.result import DispatchResult
from vpp.errors import SpecError, VppError
from vpp.inputs import synthetic_series
from vpp.site import Park, load_park

log = logging.getLogger("vpp.service")

CYCLE_OUTCOMES = ("optimal", "fallback", "failed")

# A stored state more than this far above an asset's capacity cannot be a measurement.
_CAPACITY_TOLERANCE_FRAC = 0.01


class Clock:
    """Wall-clock time; cycles start on the quarter hour."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep_until(self, when: datetime, stop: threading.Event) -> bool:
        """Wait until ``when``; False if ``stop`` was set first."""
        while not stop.is_set():
            left = (when - self.now()).total_seconds()
            if left <= 0:
                return True
            stop.wait(min(left, 1.0))
        return False


class SimulatedClock(Clock):
    """Time that runs ``speed`` times faster than the wall clock from ``start``."""

    def __init__(self, start: datetime, speed: float):
        self.start, self.speed = start, float(speed)
        self._t0 = time.monotonic()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(time.monotonic() - self._t0) * self.speed)

    def sleep_until(self, when: datetime, stop: threading.Event) -> bool:
        while not stop.is_set():
            left = (when - self.now()).total_seconds() / self.speed
            if left <= 0:
                return True
            stop.wait(min(left, 0.5))
        return False


def next_cycle_start(now: datetime, step: timedelta) -> datetime:
    """The first step boundary at or after ``now`` (UTC-aligned quarter hours)."""
    epoch = datetime(2000, 1, 1, tzinfo=timezone.utc)
    steps = -(-(now - epoch) // step)  # ceiling division of timedeltas
    return epoch + steps * step


@dataclass
class CycleOutcome:
    site_id: str
    cycle_start: datetime
    status: str  # optimal | fallback | failed
    reason: str | None
    total_s: float
    solve_s: float = 0.0
    objective_cny: float | None = None
    violations_found: int = 0
    violations_remaining: int = 0
    setpoints: list = field(default_factory=list)  # SetpointRecord
    stale_assets: list[str] = field(default_factory=list)
    portfolio_p_kw: float = 0.0
    cycle_id: int | None = None


class Site:
    """A site's park template (grid, tariff, settings) and its current fleets."""

    def __init__(self, site_id: str, park_path):
        self.id = site_id
        self.template: Park = load_park(park_path)
        self._key: tuple | None = None
        self.park: Park | None = None
        self.dispatcher: Dispatcher | None = None
        self.series = None

    @property
    def dt(self) -> timedelta:
        return timedelta(hours=self.template.settings.dt_h)

    def validate_asset(self, kind: str, bus: str, spec: dict, where: str = "spec") -> None:
        """Raise SpecError naming the field if this asset cannot be placed on this site."""
        if kind not in FLEETS:
            raise SpecError("kind", f"unknown asset kind {kind!r}; expected one of {sorted(FLEETS)}")
        for reserved in ("id", "kind", "bus"):
            if reserved in spec:
                raise SpecError(f"{where}.{reserved}", "is set by the request, not inside the spec")
        parsed = parse_asset_spec({"id": "new", "kind": kind, "bus": bus, **spec}, where)
        try:
            self.template.grid.bus_position(parsed.bus)
        except SpecError as error:
            raise SpecError("bus", error.reason) from None

    def park_for(self, assets: list) -> Park:
        """The site's park with these asset records (rebuilt only when they change)."""
        key = tuple((a.asset_id, a.update_time) for a in assets)
        if key != self._key:
            specs = [parse_asset_spec({"id": a.asset_id, "kind": a.kind, "bus": a.bus, **a.spec}, a.asset_id)
                     for a in assets]
            by_kind: dict[str, list] = {}
            for s in specs:
                by_kind.setdefault(s.kind, []).append(s)
            t = self.template
            fleets = {kind: FLEETS[kind](by_kind[kind]) for kind in FLEETS if kind in by_kind}
            asset_bus = {s.id: t.grid.bus_position(s.bus) for s in specs}
            self.park = Park(t.site, t.network, t.connection, t.tariff, t.carbon, t.settings, t.inputs, t.grid,
                             fleets, asset_bus, t.path)
            self.dispatcher = Dispatcher(self.park) if fleets else None
            self.series = None
            self._key = key
        return self.park

    def discard_dispatcher(self) -> None:
        """Forget the park and dispatcher: the next :meth:`park_for` builds fresh ones.

        Used when a dispatch did not return in time: its thread may still be working on
        the old dispatcher's problem, which must not be solved from two threads.
        """
        self._key = None
        self.dispatcher = None

    def series_for(self, start: pd.Timestamp):
        """Synthetic forecasts covering the horizon from ``start`` (regenerated per day)."""
        park = self.park
        horizon_end = start + pd.Timedelta(hours=park.settings.dt_h * park.settings.horizon_steps)
        if self.series is None or start < self.series.index[0] or horizon_end > self.series.index[-1]:
            self.series = synthetic_series(park, start.normalize(), days=1)
        return self.series


class Engine:
    """Runs cycles for every site and publishes setpoints to subscribers."""

    def __init__(self, store, sites: dict[str, Site], clock: Clock, telemetry_max_age_s: float = 1800.0,
                 setpoint_grace_s: float = 120.0, metrics=None, telemetry_max_ahead_s: float = 300.0,
                 dispatch_grace_s: float = 5.0):
        self.store, self.sites, self.clock = store, sites, clock
        self.telemetry_max_age = timedelta(seconds=telemetry_max_age_s)
        self.telemetry_max_ahead = timedelta(seconds=telemetry_max_ahead_s)
        self.grace = timedelta(seconds=setpoint_grace_s)
        self.dispatch_grace_s = float(dispatch_grace_s)
        self.metrics = metrics
        self._subscribers: list = []
        self._lock = threading.Lock()
        self.cycles_run = 0
        # Per site, per (local year, month): the highest planned first-step import so far [kW].
        self._month_peaks: dict[str, dict[tuple[int, int], float]] = {}
        self.abandoned_dispatches = 0  # dispatch threads left running past their budget

    # --- publishing -------------------------------------------------------------------------

    def subscribe(self):
        """A queue that receives every CycleOutcome; call :meth:`unsubscribe` when done."""
        import queue

        q: queue.Queue = queue.Queue(maxsize=64)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def _publish(self, outcome: CycleOutcome) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            try:
                q.put_nowait(outcome)
            except Exception:  # a slow watcher loses old batches, never blocks the loop
                try:
                    q.get_nowait()
                    q.put_nowait(outcome)
                except Exception:
                    pass

    # --- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, max_cycles: int | None = None) -> None:
        """Cycle on every step boundary of the clock until ``stop`` is set."""
        step = min(site.dt for site in self.sites.values())
        now = self.clock.now()
        # On start, plan the quarter hour under way at once (devices should not wait up to
        # 15 minutes for setpoints after a restart); then cycle on the boundaries.
        when = next_cycle_start(now, step)
        if when > now:
            when -= step
        while not stop.is_set():
            if not self.clock.sleep_until(when, stop):
                return
            self.run_cycle(when)
            if max_cycles is not None and self.cycles_run >= max_cycles:
                return
            # An overrun skips the boundaries it missed rather than piling up cycles.
            when = max(when + step, next_cycle_start(self.clock.now(), step))

    def run_cycle(self, when: datetime) -> list[CycleOutcome]:
        outcomes = []
        for site in self.sites.values():
            t0 = time.perf_counter()
            try:
                outcome = self._site_cycle(site, when)
            except Exception as error:  # one site's bad cycle must not stop the service
                log.exception("cycle failed site=%s", site.id)
                outcome = CycleOutcome(site.id, when, "failed", f"{type(error).__name__}: {error}",
                                       time.perf_counter() - t0)
                try:
                    outcome.cycle_id = self.store.save_cycle(site.id, when, "failed", 0.0, outcome.total_s, None, 0, 0,
                                                             outcome.reason, [], {})
                except Exception:
                    log.exception("could not store the failed cycle site=%s", site.id)
            outcomes.append(outcome)
            if self.metrics is not None:
                self.metrics.observe_cycle(outcome)
            log.info("cycle site=%s start=%s status=%s total_s=%.3f solve_s=%.3f objective_cny=%s "
                     "violations_found=%d violations_remaining=%d stale=%d setpoints=%d%s",
                     site.id, when.isoformat(), outcome.status, outcome.total_s, outcome.solve_s,
                     "-" if outcome.objective_cny is None else f"{outcome.objective_cny:.2f}",
                     outcome.violations_found, outcome.violations_remaining, len(outcome.stale_assets),
                     len(outcome.setpoints), f" reason={outcome.reason!r}" if outcome.reason else "")
            self._publish(outcome)
        self.cycles_run += 1
        return outcomes

    def _site_cycle(self, site: Site, when: datetime) -> CycleOutcome:
        from vpp.service.store import SetpointRecord

        t0 = time.perf_counter()
        assets = list(self.store.iter_assets(site_id=site.id))
        if not assets:
            return CycleOutcome(site.id, when, "optimal", "no active assets", time.perf_counter() - t0)
        park = site.park_for(assets)
        start = pd.Timestamp(when).tz_convert(park.site.timezone)
        series = site.series_for(start)
        inputs = series.horizon(park, start, peak_import_so_far_kw=self._peak_so_far(site, start))
        state, stale = self._state(park, assets, when, inputs)
        self._apply_limits(site, park, inputs, when)
        result = self._dispatch_in_time(site, inputs, state)
        valid_until = when + site.dt + self.grace
        p_first, q_first = self._bounded(park, result.p_kw.iloc[0], result.q_kvar.iloc[0],
                                         self._previous_setpoints(park), when)
        setpoints = [SetpointRecord(asset_id=a, valid_from=when, valid_until=valid_until, p_kw=p_first[a],
                                    q_kvar=q_first[a], fallback=not result.ok) for a in park.asset_ids]
        status = "optimal" if result.ok else "fallback"
        found = int(result.grid["violations"].sum()) if len(result.grid) else 0
        plan = {
            "cycle_start": when.isoformat(), "step_seconds": site.dt.total_seconds(), "status": status,
            "reason": result.reason, "objective_cny": result.objective_cny if result.ok else None,
            "p_kw": {a: [float(v) for v in result.p_kw[a].to_numpy()] for a in park.asset_ids},
            "grid": {"time": [t.isoformat() for t in result.grid.index],
                     **{c: [float(v) for v in result.grid[c].to_numpy()]
                        for c in ("max_loading_percent", "vm_min_pu", "vm_max_pu", "p_import_kw", "violations")}},
            "stale_assets": stale,
        }
        total_s = time.perf_counter() - t0
        outcome = CycleOutcome(site.id, when, status, result.reason, total_s, result.solve_s,
                               result.objective_cny if result.ok else None, found, result.violations_remaining,
                               setpoints, stale, float(sum(s.p_kw for s in setpoints)))
        outcome.cycle_id = self.store.save_cycle(site.id, when, status, result.solve_s, total_s, outcome.objective_cny,
                                                 found, result.violations_remaining, result.reason, setpoints, plan)
        if len(result.grid):
            self._observe_import(site, start, float(result.grid["p_import_kw"].iloc[0]))
        return outcome

    # --- the optimizer under a watchdog -------------------------------------------------------

    def _dispatch_in_time(self, site: Site, inputs, state) -> DispatchResult:
        """The dispatcher's plan, or each asset's fallback if it does not return in time.

        The dispatcher keeps to ``time_budget_s`` itself between solves and passes the
        time left to the solver; this bounds the cycle even when a solve does not return
        at all.  A thread cannot be stopped from outside, so a late one is left to finish
        on its own, its result unused, and the site gets a new dispatcher.
        """
        dispatcher, park = site.dispatcher, site.park
        limit_s = park.settings.time_budget_s + self.dispatch_grace_s
        done, box = threading.Event(), {}

        def work():
            try:
                box["result"] = dispatcher.dispatch(inputs, state)
            except BaseException as error:  # handed to the cycle, which records it as failed
                box["error"] = error
            finally:
                done.set()

        t0 = time.perf_counter()
        threading.Thread(target=work, name=f"dispatch-{site.id}", daemon=True).start()
        if not done.wait(limit_s):
            site.discard_dispatcher()
            self.abandoned_dispatches += 1
            log.error("dispatch site=%s did not return within %.1f s; publishing asset fallbacks "
                      "(abandoned dispatch threads: %d)", site.id, limit_s, self.abandoned_dispatches)
            result = self._asset_fallbacks(park, inputs, state,
                                           f"dispatch did not return within the time budget of "
                                           f"{park.settings.time_budget_s:g} s (+{self.dispatch_grace_s:g} s grace); "
                                           "using asset fallback setpoints")
            result.solve_s = time.perf_counter() - t0
            return result
        if "error" in box:
            raise box["error"]
        return box["result"]

    @staticmethod
    def _asset_fallbacks(park: Park, inputs, state, reason: str) -> DispatchResult:
        """Each asset's own safe setpoints over the horizon, without an AC check.

        Built from the site's fleets alone: the dispatcher, its problem and its grid
        corrections may still be in use by a dispatch that overran.
        """
        horizon = Horizon(len(inputs.index), park.settings.dt_h)
        columns, p_blocks = [], []
        for kind, fleet in park.fleets.items():
            p_blocks.append(np.asarray(fleet.fallback_kw(state[kind], inputs.forecasts.get(kind, {}), horizon), float))
            columns += fleet.ids
        p_kw = pd.DataFrame(np.vstack(p_blocks).T, index=inputs.index, columns=columns)
        grid = pd.DataFrame(columns=["p_import_kw", "max_loading_percent", "vm_min_pu", "vm_max_pu", "violations"],
                            dtype=float)
        return DispatchResult(status="fallback", reason=reason, p_kw=p_kw, q_kvar=p_kw * 0.0, costs_cny={}, grid=grid)

    # --- limits on what leaves the service -----------------------------------------------------

    def _previous_setpoints(self, park: Park) -> dict:
        """The last published setpoint of every asset that has a ramp limit."""
        ramped = [s.id for kind, fleet in park.fleets.items() if kind != "load"
                  for s in fleet.specs if s.ramp_kw_per_min is not None]
        return self.store.latest_setpoints(ramped) if ramped else {}

    @staticmethod
    def _bounded(park: Park, p_row, q_row, previous: dict | None = None,
                 when: datetime | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """Setpoints clipped to each asset's enrolled power range and ramp limit, NaN to zero.

        Whatever the optimizer's inputs said, nothing outside an asset's ratings is ever
        sent to it: this is the last check before setpoints leave the service.  An asset
        enrolled with ``ramp_kw_per_min`` moves at most that many kW per minute from its
        previous published setpoint (``previous``, SetpointRecords by asset id), counted
        from that setpoint's ``valid_from`` to ``when``; the power range wins if the two
        disagree (a spec changed under an old setpoint).
        """
        previous = previous or {}
        p_out, q_out = {}, {}
        for kind, fleet in park.fleets.items():
            p_min, p_max, q_max = fleet.power_range()
            for k, asset_id in enumerate(fleet.ids):
                p = float(np.clip(np.nan_to_num(p_row[asset_id]), p_min[k], p_max[k]))
                q = float(np.nan_to_num(q_row[asset_id]))
                ramp_kw_per_min = fleet.specs[k].ramp_kw_per_min
                last = previous.get(asset_id)
                if kind != "load" and ramp_kw_per_min is not None and last is not None and when is not None:
                    minutes = max((when - last.valid_from).total_seconds() / 60.0, 0.0)
                    step_kw = ramp_kw_per_min * minutes
                    p = float(np.clip(np.clip(p, last.p_kw - step_kw, last.p_kw + step_kw), p_min[k], p_max[k]))
                p_out[asset_id] = p
                q_out[asset_id] = float(np.clip(q, -q_max[k], q_max[k]))
        return p_out, q_out

    # --- the demand charge's peak so far -------------------------------------------------------

    def _peak_so_far(self, site: Site, start: pd.Timestamp) -> float:
        """The highest planned first-step import of this local month so far at the site [kW].

        A running maximum kept per site and (year, month); the first time a month is
        asked for, it is seeded from the cycles stored for that month before ``start``.
        """
        key = (start.year, start.month)
        peaks = self._month_peaks.setdefault(site.id, {})
        if key not in peaks:
            peaks[key] = self._stored_month_peak(site.id, start)
        return peaks[key]

    def _observe_import(self, site: Site, start: pd.Timestamp, p_import_kw: float) -> None:
        if not np.isfinite(p_import_kw):
            return
        peaks = self._month_peaks.setdefault(site.id, {})
        key = (start.year, start.month)
        peaks[key] = max(peaks.get(key, 0.0), p_import_kw)

    def _stored_month_peak(self, site_id: str, start: pd.Timestamp) -> float:
        """The highest first-step import of the site's stored plans from the start of the
        local month of ``start`` up to ``start`` [kW]; 0 when there are none."""
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from vpp.service.store import CycleRow

        month_start = pd.Timestamp(year=start.year, month=start.month, day=1, tz=start.tz)
        query = (select(CycleRow.plan)
                 .where(CycleRow.site_id == site_id, CycleRow.status != "failed",
                        CycleRow.cycle_start >= month_start.to_pydatetime(), CycleRow.cycle_start < start.to_pydatetime())
                 .execution_options(yield_per=64))
        peak = 0.0
        with Session(self.store.engine) as session:
            for plan in session.scalars(query):
                imports = ((plan or {}).get("grid") or {}).get("p_import_kw") or []
                if imports and imports[0] is not None and np.isfinite(imports[0]):
                    peak = max(peak, float(imports[0]))
        return peak

    def _state(self, park: Park, assets: list, when: datetime, inputs) -> tuple[dict, list[str]]:
        """Fleet states from fresh telemetry; conservative where it is stale or missing."""
        latest = self.store.latest_telemetry([a.asset_id for a in assets])
        fresh = {a: v for a, (t, v) in latest.items()
                 if -self.telemetry_max_ahead <= when - t <= self.telemetry_max_age}
        for asset_id in self._impossible(park, fresh):
            log.warning("telemetry of asset=%s is physically impossible for its spec; planning it as stale", asset_id)
            del fresh[asset_id]
        stale = [a.asset_id for a in assets if a.asset_id not in fresh and a.kind != "load"]
        state = {k: f.initial_state() for k, f in park.fleets.items()}
        if "battery" in park.fleets:
            f = park.fleets["battery"]
            e = state["battery"]["e_kwh"]
            for i, spec in enumerate(f.specs):
                v = fresh.get(spec.id)
                if v is None:
                    e[i] = spec.soc_min_frac * spec.e_kwh
                elif v.get("e_kwh") is not None:
                    e[i] = v["e_kwh"]
                elif v.get("soc_frac") is not None:
                    e[i] = v["soc_frac"] * spec.e_kwh
        if "heat_pump" in park.fleets:
            f = park.fleets["heat_pump"]
            e = state["heat_pump"]["e_th_kwh"]
            for i, spec in enumerate(f.specs):
                v = fresh.get(spec.id)
                e[i] = 0.0 if v is None or v.get("e_th_kwh") is None else v["e_th_kwh"]
        if "charging_station" in park.fleets:
            f = park.fleets["charging_station"]
            rows, delivered = [], {}
            e = state["charging_station"]["e_kwh"]
            for j, i in enumerate(f.bat_owner):
                v = fresh.get(f.ids[i])
                spec = f.specs[i].battery
                e[j] = (spec.soc_min_frac * spec.e_kwh if v is None
                        else v.get("e_kwh", v.get("soc_frac", spec.soc_min_frac) * spec.e_kwh))
            for station_id in f.ids:
                for s in (fresh.get(station_id) or {}).get("ev_sessions", []):
                    rows.append({"session_id": s["session_id"], "station_id": station_id, "charger_id": s["charger_id"],
                                 "arrival": pd.Timestamp(s["arrival"]), "departure": pd.Timestamp(s["departure"]),
                                 "energy_kwh": s["energy_kwh"], "max_kw": s.get("max_kw") or 1e6})
                    delivered[s["session_id"]] = s.get("delivered_kwh", 0.0)
            # Only sessions the stations report are planned: the live service knows a car once it plugs in.
            inputs.forecasts["charging_station"]["sessions"] = pd.DataFrame(
                rows, columns=["session_id", "station_id", "charger_id", "arrival", "departure", "energy_kwh", "max_kw"])
            state["charging_station"]["delivered_kwh"] = delivered
        return state, stale

    @staticmethod
    def _impossible(park: Park, fresh: dict) -> list[str]:
        """Assets whose latest telemetry no asset of their spec can produce: stored energy
        above the nameplate (battery, a charging station's battery) or the heat store's
        capacity.  The API refuses NaN, infinities and negative energies already."""
        def above(value, capacity):
            return value is not None and value > capacity * (1 + _CAPACITY_TOLERANCE_FRAC)

        out = []
        for kind, fleet in park.fleets.items():
            for spec in fleet.specs:
                v = fresh.get(spec.id)
                if v is None:
                    continue
                if kind == "battery" or (kind == "charging_station" and spec.battery is not None):
                    e_kwh = spec.e_kwh if kind == "battery" else spec.battery.e_kwh
                    if above(v.get("e_kwh"), e_kwh):
                        out.append(spec.id)
                elif kind == "heat_pump" and above(v.get("e_th_kwh"), fleet.cap_kwh[fleet.ids.index(spec.id)]):
                    out.append(spec.id)
        return out

    def _apply_limits(self, site: Site, park: Park, inputs, when: datetime) -> None:
        """Operators' limits and flexibility requests for the horizon, into the inputs."""
        index = inputs.index
        end = (index[-1] + pd.Timedelta(hours=park.settings.dt_h)).to_pydatetime()
        T = len(index)
        names = park.grid.branch_names
        branch = None
        for limit in self.store.active_limits(site.id, when, end):
            in_window = np.asarray((index >= pd.Timestamp(limit.start)) & (index < pd.Timestamp(limit.end)))
            if limit.element in ("connection_import", "connection_export"):
                target = inputs.import_limit_kw if limit.element == "connection_import" else inputs.export_limit_kw
                if limit.limit_kw is not None:
                    target[in_window] = np.minimum(target[in_window], limit.limit_kw)
            else:
                if branch is None:
                    branch = np.repeat(park.grid.branch_limit_percent[:, None], T, axis=1)
                rows = [k for k, n in enumerate(names) if n == limit.element_name]
                for k in rows:
                    if limit.limit_percent is not None:
                        value = limit.limit_percent
                    else:  # a kW limit on a branch, as a share of its rating
                        value = 100.0 * limit.limit_kw / park.grid.branch_rating_kva[k]
                    branch[k, in_window] = np.minimum(branch[k, in_window], value)
        if branch is not None:
            inputs.branch_limit_percent = branch
        requests = [r for r in self.store.flex_requests(site.id, when, end)]
        requests += [r for r in self.store.flex_requests("", when, end)]
        inputs.flex_requests = [
            FlexRequest(pd.Timestamp(r.start), pd.Timestamp(r.end), r.max_import_kw, r.min_import_kw,
                        r.price_cny_per_kwh) for r in requests]
