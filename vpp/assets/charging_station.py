"""PV-storage-charging stations: PV, a battery and EV chargers behind one connection.

Chargers range from 7 kW AC wallboxes to 480 kW liquid-cooled DC units.  Each EV session
(arrival, departure, requested kWh, the vehicle's max kW) is planned on its charger;
energy a session cannot get before it leaves is *unmet*, priced by a penalty and reported
per session, never dropped.  The station's connection has its own import/export limit.

Each charger has one power variable per step, bounded by the max kW of the car plugged in
at that step (zero when free), and a fixed number of session slots over the horizon, so
the problem's shape does not change as sessions come and go: a slot is a mask of the
steps its session is plugged in, over which the car's energy is counted.
"""

from __future__ import annotations

from typing import Any, Literal

import cvxpy as cp
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vpp.assets.base import AssetSpec, Contribution, Fleet, Horizon, Penalties, nonneg_param, require_shape, steps_array
from vpp.assets.battery import StorageArrays, StorageParams
from vpp.assets.pv import PVParams, pv_params_ac_kw
from vpp.errors import SpecError

SESSION_COLUMNS = ("session_id", "station_id", "charger_id", "arrival", "departure", "energy_kwh", "max_kw")


class ChargerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=64)
    rating_kw: float = Field(gt=0, le=1000, description="7 kW AC up to 480 kW liquid-cooled DC")
    type: Literal["ac", "dc", "dc_liquid_cooled"] = "ac"
    efficiency: float = Field(0.95, gt=0, le=1, description="grid-to-vehicle efficiency")


class ChargingStationSpec(AssetSpec):
    kind: Literal["charging_station"] = "charging_station"
    import_limit_kw: float = Field(gt=0, le=1e5, description="station connection import limit [kW]")
    export_limit_kw: float = Field(0.0, ge=0, le=1e5, description="station connection export limit [kW]")
    chargers: list[ChargerSpec] = Field(min_length=1)
    pv: PVParams | None = None
    battery: StorageParams | None = None
    slots_per_charger: int = Field(12, ge=1, le=96, description="sessions one charger can hold within a horizon")

    @model_validator(mode="after")
    def _unique_chargers(self):
        ids = [c.id for c in self.chargers]
        if len(set(ids)) != len(ids):
            raise ValueError("charger ids must be unique within a station")
        return self


class ChargingStationFleet(Fleet):
    kind = "charging_station"
    Spec = ChargingStationSpec

    def __init__(self, specs):
        super().__init__(specs)
        self.pv_owner = np.array([i for i, s in enumerate(self.specs) if s.pv is not None], dtype=int)
        self.bat_owner = np.array([i for i, s in enumerate(self.specs) if s.battery is not None], dtype=int)
        self.storage = StorageArrays.from_params([self.specs[i].battery for i in self.bat_owner])
        self.pv_kva = np.array([self.specs[i].pv.inverter_kva for i in self.pv_owner], dtype=float)
        # One row per charger, and one per session slot (each slot belongs to one charger).
        self.charger_station, self.slot_station, self.slot_charger, self.slot_ch = [], [], [], []
        self.slot_rating_kw, self.slot_eff = [], []
        self.charger_slots: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(self.specs):
            for c in s.chargers:
                ch = len(self.charger_station)
                self.charger_station.append(i)
                for _ in range(s.slots_per_charger):
                    self.charger_slots.setdefault((s.id, c.id), []).append(len(self.slot_station))
                    self.slot_station.append(i)
                    self.slot_charger.append(c.id)
                    self.slot_ch.append(ch)
                    self.slot_rating_kw.append(c.rating_kw)
                    self.slot_eff.append(c.efficiency)
        self.charger_station = np.array(self.charger_station, dtype=int)
        self.n_chargers = self.charger_station.size
        self.slot_ch = np.array(self.slot_ch, dtype=int)
        self.slot_station = np.array(self.slot_station, dtype=int)
        self.slot_rating_kw = np.array(self.slot_rating_kw, dtype=float)
        self.slot_eff = np.array(self.slot_eff, dtype=float)
        self.n_slots = len(self.slot_station)
        self.import_limit_kw = self.column("import_limit_kw")
        self.export_limit_kw = self.column("export_limit_kw")
        self.slot_sessions: list[str | None] = [None] * self.n_slots
        self._session_cache: _SessionArrays | None = None  # the last sessions table, as arrays
        # Slots are numbered charger by charger: charger c holds slots first[c]:first[c + 1].
        self.charger_first_slot = np.searchsorted(self.slot_ch, np.arange(self.n_chargers + 1))

    def _owner_matrix(self, owners: np.ndarray) -> np.ndarray:
        m = np.zeros((self.n, len(owners)))
        m[owners, np.arange(len(owners))] = 1.0
        return m

    def pv_available_kw(self, weather: pd.DataFrame, site) -> np.ndarray:
        """Available output [kW] of the stations' PV arrays (n_pv, n_steps)."""
        if self.pv_owner.size == 0:
            return np.zeros((0, len(weather)))
        return pv_params_ac_kw([self.specs[i].pv for i in self.pv_owner], weather, site)

    def initial_state(self) -> dict[str, Any]:
        e0 = np.array([self.specs[i].battery.soc_initial_frac for i in self.bat_owner]) * self.storage.e_kwh
        return {"e_kwh": e0, "delivered_kwh": {}}

    # --- dispatch problem ---------------------------------------------------------------------

    def build(self, horizon: Horizon) -> Contribution:
        n, T = self.n, horizon.n_steps
        self.horizon = horizon
        self.pv_avail = nonneg_param((self.pv_owner.size, T), "station_pv_avail_kw")
        self.pv_p = cp.Variable((self.pv_owner.size, T), nonneg=True, name="station_pv_p_kw")
        self.charger_ub = nonneg_param((self.n_chargers, T), "station_charger_ub_kw")
        # Per step, the energy each slot's car gets per kW of its charger's power [kWh/kW]: the
        # slot's share of the charger in that step (zero while its car is away) times the step
        # length and the charger efficiency.  One small parameter per charger: cvxpy's DPP
        # compile of a variable times one (n_slots, T) parameter grows with the square of its size.
        first = self.charger_first_slot
        self.slot_kwh_per_kw = [nonneg_param((first[c + 1] - first[c], T), f"station_slot_kwh_per_kw_{c}")
                                for c in range(self.n_chargers)]
        self.ev_req = nonneg_param((self.n_slots,), "station_ev_req_kwh")
        self.unmet_price = cp.Parameter(nonneg=True, name="station_unmet_price", value=0.0)
        self.charger_p = cp.Variable((self.n_chargers, T), nonneg=True, name="station_charger_p_kw")
        self.ev_unmet = cp.Variable(self.n_slots, nonneg=True, name="station_ev_unmet_kwh")
        # Energy into each slot's car over the horizon, slots in order.
        self.slot_car_kwh = cp.hstack([w @ self.charger_p[c] for c, w in enumerate(self.slot_kwh_per_kw)])
        constraints = [
            self.pv_p <= self.pv_avail,
            self.charger_p <= self.charger_ub,
            self.slot_car_kwh + self.ev_unmet >= self.ev_req,
        ]
        self.ev_total = self._owner_matrix(self.charger_station) @ self.charger_p
        p = -self.ev_total
        costs = {"ev_unmet_energy": self.unmet_price * cp.sum(self.ev_unmet)}
        if self.pv_owner.size:
            p = p + self._owner_matrix(self.pv_owner) @ self.pv_p
        if self.bat_owner.size:
            p_bat, bat_constraints, degradation = self.storage.build(horizon, "station_battery")
            constraints += bat_constraints
            p = p + self._owner_matrix(self.bat_owner) @ p_bat
            costs["battery_degradation"] = degradation
        constraints += [-p <= steps_array(self.import_limit_kw, T), p <= steps_array(self.export_limit_kw, T)]
        self.p = p
        return Contribution(p_kw=p, constraints=constraints, costs_cny=costs)

    def _sessions(self, sessions: pd.DataFrame) -> "_SessionArrays":
        """``sessions`` as arrays, converted once per table (a simulated year filters
        the same table of thousands of sessions every step; a new table, as the service
        builds each cycle, is converted again)."""
        cached = self._session_cache
        if cached is None or cached.frame is not sessions:
            cached = self._session_cache = _SessionArrays(sessions, self.ids)
        return cached

    def _slot_bounds(self, sessions: pd.DataFrame | None, state, index: pd.DatetimeIndex, dt_h: float):
        """Upper bounds (n_slots, T) and energy requirements (n_slots,) for this horizon, of
        the sessions that overlap it, less the energy already delivered (per ``state``)."""
        T = len(index)
        ub = np.zeros((self.n_slots, T))
        req = np.zeros(self.n_slots)
        names: list[str | None] = [None] * self.n_slots
        self.deferred_sessions = []
        if sessions is None or len(sessions) == 0:
            return ub, req, names
        table = self._sessions(sessions)
        start_ns = index.asi8
        step_ns = int(round(dt_h * 3600e9))
        end_ns = int(start_ns[-1]) + step_ns
        # A year holds thousands of sessions: only those overlapping the horizon go further.
        rows = np.flatnonzero((table.departure_ns > start_ns[0]) & (table.arrival_ns < end_ns))
        energy_kwh = table.remaining_kwh(rows, state.get("delivered_kwh"))
        keep = energy_kwh > 0
        rows, energy_kwh = rows[keep], energy_kwh[keep]
        order = np.argsort(table.arrival_ns[rows], kind="stable")
        rows, energy_kwh = rows[order], energy_kwh[order]
        deferred: list[str] = []
        self.deferred_sessions = deferred
        busy_until: dict[tuple[str, str], int] = {}
        for row, energy in zip(rows.tolist(), energy_kwh.tolist()):
            sid, key = table.session_id[row], (table.station_id[row], table.charger_id[row])
            arrival, departure = int(table.arrival_ns[row]), int(table.departure_ns[row])
            slots = self.charger_slots.get(key)
            if slots is None:
                raise SpecError("charging_station.sessions",
                                f"session {sid!r}: no charger {key[1]!r} at station {key[0]!r}")
            if key in busy_until and arrival < busy_until[key]:
                raise SpecError("charging_station.sessions",
                                f"session {sid!r} overlaps the previous session on charger {key[1]!r}")
            slot = next((j for j in slots if names[j] is None), None)
            if slot is None:
                # More sessions on this charger than it has slots: the latest arrivals wait
                # for a later cycle, by which time the earlier sessions have left the horizon.
                deferred.append(sid)
                continue
            busy_until[key] = departure
            names[slot] = sid
            # A step counts as plugged in only if the car is there for the whole step.
            plugged = (start_ns >= arrival) & (start_ns + step_ns <= departure)
            slot_kw = min(float(table.max_kw[row]), self.slot_rating_kw[slot])
            ub[slot] = np.where(plugged, slot_kw, 0.0)
            # Energy the car can still get after the horizon ends counts as not needed now.
            hours_after = max((departure - end_ns) / 3600e9, 0.0)
            req[slot] = max(energy - slot_kw * self.slot_eff[slot] * hours_after, 0.0)
        return ub, req, names

    def update(self, state, forecast, penalties: Penalties) -> None:
        horizon = self.horizon
        index = forecast["index"]
        ub, req, names = self._slot_bounds(forecast.get("sessions"), state, index, horizon.dt_h)
        # Per planning step: a session's mean available power over the step's base steps, and
        # its share of its charger's energy there (a charger's sessions never overlap, but a
        # coarse step can hold the end of one and the start of the next).
        ub = horizon.coarsen(ub)
        charger_ub = np.zeros((self.n_chargers, ub.shape[1]))
        np.add.at(charger_ub, self.slot_ch, ub)
        share = np.divide(ub, charger_ub[self.slot_ch], out=np.zeros_like(ub), where=charger_ub[self.slot_ch] > 0)
        self.charger_ub.value = charger_ub
        kwh_per_kw = share * horizon.step_h * self.slot_eff[:, None]
        first = self.charger_first_slot
        for c, param in enumerate(self.slot_kwh_per_kw):
            param.value = kwh_per_kw[first[c]:first[c + 1]]
        self.ev_req.value, self.slot_sessions = req, names
        self.pv_avail.value = np.clip(horizon.coarsen(require_shape(
            "charging_station.pv_avail_kw", forecast["pv_avail_kw"], (self.pv_owner.size, horizon.n_base_steps))), 0, None)
        if self.bat_owner.size:
            self.storage.update(state["e_kwh"], "charging_station.e_kwh")
        self.unmet_price.value = penalties.ev_unmet_cny_per_kwh

    def fallback_kw(self, state, forecast, horizon: Horizon) -> np.ndarray:
        """No plan: PV at full output, battery idle, every car at full power, capped at the import limit."""
        ub, req, _ = self._slot_bounds(forecast.get("sessions"), state, forecast["index"], horizon.dt_h)
        # Cars stop once their request is met.
        ev = np.where(np.cumsum(ub * self.slot_eff[:, None] * horizon.dt_h, axis=1) <= req[:, None] + ub * horizon.dt_h,
                      ub, 0.0)
        p = -self._owner_matrix(self.slot_station) @ ev
        if self.pv_owner.size:
            p = p + self._owner_matrix(self.pv_owner) @ np.asarray(forecast["pv_avail_kw"], float)
        return np.clip(p, -self.import_limit_kw[:, None], self.export_limit_kw[:, None])

    def power_range(self):
        return -self.import_limit_kw, self.export_limit_kw.copy(), np.zeros(self.n)

    def plan_details(self) -> dict[str, np.ndarray]:
        out = {"ev_kw": self.ev_total.value}
        if self.bat_owner.size:
            soc = np.full((self.n, self.charger_p.shape[1]), np.nan)
            soc[self.bat_owner] = self.storage.e.value[:, 1:] / self.storage.e_kwh[:, None]
            out["soc_frac"] = soc
            battery = np.zeros_like(soc)
            battery[self.bat_owner] = self.storage.p_dis.value - self.storage.p_ch.value
            out["station_battery_kw"] = battery
        return out

    def session_report(self) -> pd.DataFrame:
        """Per planned session: energy requested in the horizon, planned and unmet [kWh]."""
        used = [k for k, sid in enumerate(self.slot_sessions) if sid is not None]
        planned = np.asarray(self.slot_car_kwh.value, float)[used] if used else np.zeros(0)
        return pd.DataFrame({
            "station_id": [self.ids[self.slot_station[k]] for k in used],
            "charger_id": [self.slot_charger[k] for k in used],
            "session_id": [self.slot_sessions[k] for k in used],
            "requested_kwh": np.asarray(self.ev_req.value, float)[used],
            "planned_kwh": planned,
            "unmet_kwh": np.maximum(np.asarray(self.ev_unmet.value, float)[used], 0.0),
        })

    # --- plant -----------------------------------------------------------------------------------

    def plant_step(self, state, setpoint_kw, actual, dt_h):
        """The station's local controller for one step.

        PV gives what the sun allows, the battery follows its planned power
        (``actual["battery_kw"]``, idle when absent) within its limits, and the plugged-in
        cars share what is left of the station's setpoint, but at least the planned EV
        power (``actual["ev_kw"]``, when given), least laxity first, each up to its max kW
        and remaining need, never beyond the station's import limit.
        """
        setpoint = np.nan_to_num(np.asarray(setpoint_kw, float))
        pv = np.zeros(self.n)
        if self.pv_owner.size:
            pv_avail = np.minimum(np.asarray(actual["pv_avail_kw"], float), self.pv_kva)
            np.add.at(pv, self.pv_owner, pv_avail)
        bat = np.zeros(self.n)
        e_next = np.asarray(state["e_kwh"], float)
        if self.bat_owner.size:
            want = np.asarray(actual.get("battery_kw", np.zeros(self.bat_owner.size)), float)
            e_next, p_bat = self.storage.step(state["e_kwh"], want, dt_h)
            np.add.at(bat, self.bat_owner, p_bat)
        ev_budget = np.clip(pv + bat - setpoint, 0.0, None)
        if actual.get("ev_kw") is not None:
            # Cars get at least what the plan gave them; a PV or battery shortfall against
            # the plan comes from the grid, within the station's import limit.
            ev_budget = np.maximum(ev_budget, np.asarray(actual["ev_kw"], float))
        ev_budget = np.minimum(ev_budget, self.import_limit_kw + pv + bat)
        delivered = dict(state.get("delivered_kwh", {}))
        ev = np.zeros(self.n)
        sessions = actual.get("sessions")
        if sessions is not None and len(sessions):
            table = self._sessions(sessions)
            now_ns = actual["time"].value
            here = np.flatnonzero((table.arrival_ns <= now_ns)
                                  & (table.departure_ns >= now_ns + int(round(dt_h * 3600e9))))
            for i, station_id in enumerate(self.ids):
                cars = here[table.station_pos[here] == i]
                if cars.size > 1:
                    # Least laxity first: the car with the least spare time before it must leave.
                    need = table.remaining_kwh(cars, delivered)
                    hours_left = (table.departure_ns[cars] - now_ns) / 3600e9
                    laxity = hours_left - need / np.maximum(table.max_kw[cars], 1e-6)
                    cars = cars[np.argsort(laxity, kind="stable")]
                budget = ev_budget[i]
                for row in cars.tolist():
                    sid, charger_id = table.session_id[row], table.charger_id[row]
                    eff = self._charger_efficiency(station_id, charger_id)
                    rating = self._charger_rating(station_id, charger_id)
                    need_kw = max(table.energy_kwh[row] - delivered.get(sid, 0.0), 0.0) / (eff * dt_h)
                    p = min(budget, table.max_kw[row], rating, need_kw)
                    if p <= 0:
                        continue
                    budget -= p
                    ev[i] += p
                    delivered[sid] = delivered.get(sid, 0.0) + p * eff * dt_h
        p_net = pv + bat - ev
        return {"e_kwh": e_next, "delivered_kwh": delivered}, p_net, {"ev_kw": ev, "pv_kw": pv, "battery_kw": bat}

    def _charger_efficiency(self, station_id: str, charger_id: str) -> float:
        return self.slot_eff[self.charger_slots[(station_id, charger_id)][0]]

    def _charger_rating(self, station_id: str, charger_id: str) -> float:
        return self.slot_rating_kw[self.charger_slots[(station_id, charger_id)][0]]


class _SessionArrays:
    """A table of EV sessions (columns ``SESSION_COLUMNS``) as plain arrays, rows in the
    table's order: boolean masks over them cost microseconds where the same selection
    in pandas costs a millisecond, and the simulator selects every step."""

    def __init__(self, sessions: pd.DataFrame, station_ids: list[str]):
        missing = [c for c in SESSION_COLUMNS if c not in sessions.columns]
        if missing:
            raise SpecError("charging_station.sessions", f"missing columns {missing}")
        self.frame = sessions  # the table these arrays were made from (the cache key)
        self.session_id = sessions["session_id"].to_numpy(object)
        self.station_id = sessions["station_id"].to_numpy(object)
        self.charger_id = sessions["charger_id"].to_numpy(object)
        self.arrival_ns = pd.DatetimeIndex(sessions["arrival"]).asi8
        self.departure_ns = pd.DatetimeIndex(sessions["departure"]).asi8
        self.energy_kwh = sessions["energy_kwh"].to_numpy(float)
        self.max_kw = sessions["max_kw"].to_numpy(float)
        # Position of each session's station in the fleet, -1 for stations it does not hold.
        position = {sid: i for i, sid in enumerate(station_ids)}
        self.station_pos = np.array([position.get(s, -1) for s in self.station_id], dtype=int)

    def remaining_kwh(self, rows: np.ndarray, delivered_kwh: dict[str, float] | None) -> np.ndarray:
        """Energy the sessions at ``rows`` still want, after what ``delivered_kwh`` says they got."""
        done = (np.array([delivered_kwh.get(sid, 0.0) for sid in self.session_id[rows]], dtype=float)
                if delivered_kwh else 0.0)
        return np.clip(self.energy_kwh[rows] - done, 0.0, None)
