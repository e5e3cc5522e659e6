"""Controllers the simulator compares: the optimizer and two baselines.

Each controller returns, for the current step, a setpoint per asset of every kind
(kW, injection positive) and the charging stations' battery setpoints; the plant models
then clip what physics forbids.

- ``optimizer``: the receding-horizon dispatch (the same code as the live service).
- ``none``: no control: batteries idle, heat pumps thermostatic, PV uncurtailed, cars
  charged at full power on arrival.
- ``rules``: PV self-consumption first: batteries charge from the park's PV surplus and
  discharge at the tariff's peak and critical bands to cover the park's net load; heat
  pumps thermostatic; cars at full power.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vpp.assets import Horizon
from vpp.dispatch.dispatcher import Dispatcher

CONTROLLERS = ("optimizer", "rules", "none")
_PEAK_BANDS = ("peak", "critical")


@dataclass
class StepCommand:
    setpoints_kw: dict[str, np.ndarray]
    q_kvar: dict[str, np.ndarray]
    station_battery_kw: np.ndarray | None = None
    status: str = "none"
    station_ev_kw: np.ndarray | None = None


class NoController:
    name = "none"

    def __init__(self, park):
        self.park = park

    def command(self, step: int, series, state, forecaster) -> StepCommand:
        forecasts = series.step_forecast(self.park, step, 1)
        setpoints = {k: f.fallback_kw(state[k], forecasts.get(k, {}), Horizon(1, self.park.settings.dt_h))[:, 0]
                     for k, f in self.park.fleets.items()}
        return StepCommand(setpoints, {}, None, "none")


class RulesController(NoController):
    name = "rules"

    def command(self, step: int, series, state, forecaster) -> StepCommand:
        cmd = super().command(step, series, state, forecaster)
        park = self.park
        band = park.tariff.bands(series.index[step:step + 1])[0]
        # The park's net injection with batteries idle: PV surplus is positive.
        surplus_kw = sum(v.sum() for k, v in cmd.setpoints_kw.items())
        if "battery" in park.fleets:
            bat = park.fleets["battery"].storage
            share = bat.p_dis_max_kw / bat.p_dis_max_kw.sum()
            if surplus_kw > 0:
                cmd.setpoints_kw["battery"] = -np.minimum(surplus_kw * bat.p_ch_max_kw / bat.p_ch_max_kw.sum(),
                                                          bat.p_ch_max_kw)
            elif band in _PEAK_BANDS:
                cmd.setpoints_kw["battery"] = np.minimum(-surplus_kw * share, bat.p_dis_max_kw)
        if "charging_station" in park.fleets:
            st = park.fleets["charging_station"]
            if st.bat_owner.size:
                pv = np.zeros(st.n)
                if st.pv_owner.size:
                    np.add.at(pv, st.pv_owner, series.station_pv_avail_kw[:, step])
                own = pv[st.bat_owner]
                cmd.station_battery_kw = np.where(own > 0, -np.minimum(own, st.storage.p_ch_max_kw),
                                                  st.storage.p_dis_max_kw if band in _PEAK_BANDS else 0.0)
        cmd.status = "rules"
        return cmd


class OptimizerController:
    name = "optimizer"

    # Plans must pass the grid checks over the steps carried out before the next re-plans;
    # violations further out tighten the next cycle's linear model instead.  The park's
    # own dispatch.strict_hours wins where it is set.
    STRICT_HOURS = 2.0

    def __init__(self, park, replan_every: int = 1):
        self.park = park
        hours = park.settings.strict_hours or self.STRICT_HOURS
        self.dispatcher = Dispatcher(park, strict_hours=max(hours, replan_every * park.settings.dt_h))
        self.replan_every = max(int(replan_every), 1)
        self.plan = None
        self.plan_step = 0
        self._position_cache: dict[tuple, tuple] = {}
        self.peak_import_kw: dict[tuple[int, int], float] = {}
        self.stats = {"cycles": 0, "fallbacks": 0, "solve_s": 0.0, "solver_s": 0.0, "ac_check_s": 0.0,
                      "cycle_s": 0.0}

    def observe_import(self, time, p_import_kw: float) -> None:
        """Record realised import so the demand charge sees this month's peak so far."""
        key = (time.year, time.month)
        self.peak_import_kw[key] = max(self.peak_import_kw.get(key, 0.0), p_import_kw)

    def command(self, step: int, series, state, forecaster) -> StepCommand:
        park = self.park
        if self.plan is None or step - self.plan_step >= self.replan_every:
            inputs = series.horizon(park, series.index[step],
                                    peak_import_so_far_kw=self.peak_import_kw.get(
                                        (series.index[step].year, series.index[step].month), 0.0))
            inputs.forecasts = forecaster.forecast(series, park, step, park.settings.horizon_steps)
            self.plan = self.dispatcher.dispatch(inputs, state)
            self.plan_step = step
            s = self.stats
            s["cycles"] += 1
            s["fallbacks"] += not self.plan.ok
            s["solve_s"] += self.plan.solve_s
            s["solver_s"] += self.plan.solver_s
            s["ac_check_s"] += self.plan.ac_check_s
            s["cycle_s"] += self.plan.total_s
            self._rows = self._plan_arrays(self.plan)
        k = step - self.plan_step
        p_kw, q_kvar, details = self._rows
        setpoints = {kind: p[:, k].copy() for kind, p in p_kw.items()}
        q = {kind: v[:, k].copy() for kind, v in q_kvar.items()}
        station_bat = details["station_battery_kw"][:, k].copy() if "station_battery_kw" in details else None
        station_ev = details["ev_kw"][:, k].copy() if "ev_kw" in details else None
        return StepCommand(setpoints, q, station_bat, self.plan.status, station_ev)

    def _plan_arrays(self, plan):
        """A plan's frames as per-kind arrays (assets x steps): one lookup per plan, not per step."""
        p_all, q_all = plan.p_kw.to_numpy(float), plan.q_kvar.to_numpy(float)
        p_kw, q_kvar, details = {}, {}, {}
        for kind, fleet in self.park.fleets.items():
            cols = self._cached_positions("p_kw", plan.p_kw.columns, fleet.ids)
            p_kw[kind], q_kvar[kind] = p_all[:, cols].T, q_all[:, cols].T
        if "charging_station" in self.park.fleets:
            st = self.park.fleets["charging_station"]
            for name in ("station_battery_kw", "ev_kw"):
                if name in plan.details:
                    frame = plan.details[name]
                    values = frame.to_numpy(float)[:, self._cached_positions(name, frame.columns, st.ids)].T
                    details[name] = values[st.bat_owner] if name == "station_battery_kw" else values
        return p_kw, q_kvar, details

    def _cached_positions(self, table: str, columns, ids) -> np.ndarray:
        """Positions of ``ids`` in the columns of a plan's ``table``; every plan has the
        same columns, so the answer is kept for as long as they stay the same."""
        key = (table, tuple(ids))
        hit = self._position_cache.get(key)
        if hit is not None and hit[0].equals(columns):
            return hit[1]
        cols = _positions(columns, ids)
        self._position_cache[key] = (columns, cols)
        return cols


def _positions(columns, ids) -> np.ndarray:
    cols = columns.get_indexer(ids)
    if (cols < 0).any():
        raise KeyError(f"plan has no column for {[i for i, c in zip(ids, cols) if c < 0]}")
    return cols


def make_controller(name: str, park, replan_every: int = 1):
    from vpp.errors import SpecError

    if name == "optimizer":
        return OptimizerController(park, replan_every)
    if name == "rules":
        return RulesController(park)
    if name == "none":
        return NoController(park)
    raise SpecError("controller", f"unknown controller {name!r}; expected one of {list(CONTROLLERS)}")
