"""Receding-horizon simulation of a park over a period of 15-minute steps.

Each step: the controller decides setpoints (the optimizer from forecasts, re-planning
every ``replan_every`` steps), the plant models apply them against the *actual* series,
clipping what physics forbids, and the states advance.  The realised injections of all
steps then go through the AC power flow (batched), so grid violations are measured on
what really happened.  Everything is recorded in one wide table from which every KPI is
recomputed (:mod:`sim.kpis`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sim.controllers import StepCommand, make_controller
from sim.forecast import Forecaster
from vpp.dispatch.result import count_violations
from vpp.inputs import first_step_conditions


@dataclass
class SimResult:
    controller: str
    series: pd.DataFrame  # one row per step, park-local time index
    sessions: pd.DataFrame  # per EV session: requested, delivered, unmet
    stats: dict = field(default_factory=dict)


class Progress:
    """One status line on stderr: steps, simulated date, steps per second, time left."""

    def __init__(self, total: int, label: str, stream=None, every_s: float = 0.5):
        self.total, self.label, self.every_s = total, label, every_s
        self.stream = sys.stderr if stream is None else stream
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, when: pd.Timestamp, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * done / max(self.total, 1))
        eta = f"{int(left // 60):d}:{int(left % 60):02d}" if np.isfinite(left) else "--:--"
        self.stream.write(f"\r{self.label:<10} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} steps  "
                          f"{when:%Y-%m-%d %H:%M}  {rate:6.1f} steps/s  {eta} left ")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def simulate(park, series, n_steps: int, controller: str = "optimizer", forecaster: Forecaster | None = None,
             replan_every: int = 1, progress: bool = True, on_step=None) -> SimResult:
    """Simulate ``n_steps`` steps from the start of ``series`` under one controller.

    ``on_step(done)``, if given, is called after every step (progress of a worker).
    """
    forecaster = forecaster or Forecaster("perfect")
    ctrl = make_controller(controller, park, replan_every)
    dt = park.settings.dt_h
    state = {k: f.initial_state() for k, f in park.fleets.items()}
    fleets = park.fleets
    n_bus = park.grid.n_buses
    P = np.zeros((n_steps, n_bus))
    Q = np.zeros((n_steps, n_bus))
    records: dict[str, np.ndarray] = {}
    statuses = np.empty(n_steps, dtype=object)
    bar = Progress(n_steps, controller) if progress else None
    t_start = time.perf_counter()
    sessions = series.sessions
    for t in range(n_steps):
        now = series.index[t]
        cmd: StepCommand = ctrl.command(t, series, state, forecaster)
        statuses[t] = cmd.status
        actual = actual_conditions(series, park, t)
        if cmd.station_battery_kw is not None and "charging_station" in actual:
            actual["charging_station"]["battery_kw"] = cmd.station_battery_kw
        if cmd.station_ev_kw is not None and "charging_station" in actual:
            actual["charging_station"]["ev_kw"] = cmd.station_ev_kw
        p_step = 0.0
        for kind, fleet in fleets.items():
            new_state, p_kw, extras = fleet.plant_step(state[kind], cmd.setpoints_kw[kind], actual.get(kind, {}), dt)
            state[kind] = new_state
            buses = park.bus_positions(kind)
            np.add.at(P[t], buses, p_kw)
            q = cmd.q_kvar.get(kind)
            if kind == "load":
                q = fleet.reactive_kvar(p_kw)
            elif kind == "pv" and q is not None:
                # Reactive power stays within what the inverter has left beside p.
                room = np.sqrt(np.maximum(fleet.s_kva**2 - p_kw**2, 0.0))
                q = np.clip(q, -room, room)
            if q is not None:
                np.add.at(Q[t], buses, q)
            _record(records, fleet.ids, "p_kw", t, p_kw, n_steps)
            for name, values in extras.items():
                _record(records, fleet.ids, name, t, values, n_steps)
            p_step += p_kw.sum()
        if hasattr(ctrl, "observe_import"):
            # Losses are small against the peak; the AC import is measured after the run.
            ctrl.observe_import(now, -p_step)
        if bar:
            bar.update(t + 1, now, force=t + 1 == n_steps)
        if on_step is not None:
            on_step(t + 1)
    control_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    ac = park.grid.run_ac(P, Q)
    ac_s = time.perf_counter() - t0
    index = series.index[:n_steps]
    T_limits = np.repeat(park.grid.branch_limit_percent[:, None], n_steps, axis=1)
    violations = count_violations(ac, park.grid.v_min_pu, park.grid.v_max_pu, T_limits,
                                  np.full(n_steps, park.connection.import_limit_kw),
                                  np.full(n_steps, park.connection.export_limit_kw))
    trafo = [i for i, k in enumerate(park.grid.branch_kind) if k == "trafo"]
    columns = {
        "grid.p_import_kw": ac.p_slack_kw, "grid.q_import_kvar": ac.q_slack_kvar, "grid.losses_kw": ac.losses_kw,
        "grid.max_loading_percent": ac.loading_percent.max(axis=1),
        "grid.trafo_loading_percent": ac.loading_percent[:, trafo].max(axis=1) if trafo else np.nan,
        "grid.vm_min_pu": ac.vm_pu.min(axis=1), "grid.vm_max_pu": ac.vm_pu.max(axis=1),
        "grid.violations": violations, "grid.converged": ac.converged,
        "price.buy_cny_per_kwh": series.buy_price_cny_per_kwh[:n_steps],
        "price.sell_cny_per_kwh": series.sell_price_cny_per_kwh[:n_steps],
        "carbon.kg_per_kwh": series.carbon_kg_per_kwh[:n_steps],
        "weather.temp_air_c": series.weather["temp_air_c"].to_numpy()[:n_steps],
        "control.status": statuses,
    }
    frame = pd.DataFrame({**records, **columns}, index=index)
    frame.index.name = "time"
    stats = {"steps": n_steps, "control_s": control_s, "ac_s": ac_s, **getattr(ctrl, "stats", {})}
    return SimResult(controller, frame, _session_table(park, sessions, index, state, dt), stats)


def _record(records, ids, name, t, values, n_steps):
    for asset_id, value in zip(ids, np.asarray(values, float)):
        key = f"{asset_id}.{name}"
        if key not in records:
            records[key] = np.full(n_steps, np.nan)
        records[key][t] = value


def actual_conditions(series, park, t: int) -> dict[str, dict]:
    """The actual conditions of step ``t`` per kind, as the plant models read them."""
    return first_step_conditions(series.step_forecast(park, t, 1), series.index[t])


def _session_table(park, sessions: pd.DataFrame, index: pd.DatetimeIndex, state, dt_h: float) -> pd.DataFrame:
    """Per session that arrived within the period: requested, delivered and unmet energy."""
    if "charging_station" not in park.fleets or sessions is None or not len(sessions):
        return pd.DataFrame(columns=["session_id", "station_id", "charger_id", "arrival", "departure", "requested_kwh",
                                     "delivered_kwh", "unmet_kwh"])
    end = index[-1] + pd.Timedelta(hours=dt_h)
    done = sessions[(sessions["arrival"] >= index[0]) & (sessions["departure"] <= end)].copy()
    delivered = state["charging_station"].get("delivered_kwh", {})
    done["requested_kwh"] = done["energy_kwh"]
    done["delivered_kwh"] = done["session_id"].map(delivered).fillna(0.0)
    done["unmet_kwh"] = (done["requested_kwh"] - done["delivered_kwh"]).clip(lower=0.0)
    return done[["session_id", "station_id", "charger_id", "arrival", "departure", "requested_kwh", "delivered_kwh",
                 "unmet_kwh"]].reset_index(drop=True)
