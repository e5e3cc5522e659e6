"""Battery energy storage.

Energy model (per asset, per step of ``dt_h`` hours)::

    e[t+1] = e[t] * (1 - self_discharge_frac_per_h * dt_h)
             + eta_ch * p_ch[t] * dt_h - p_dis[t] / eta_dis * dt_h

with ``p_ch, p_dis >= 0`` [kW] and the asset's injection ``p = p_dis - p_ch``.  Degradation
is priced per kWh of throughput (charge plus discharge).  The functions here are reused
by the PV-storage-charging station, whose battery follows the same physics.
"""

from __future__ import annotations

from typing import Any, Literal

import cvxpy as cp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vpp.assets.base import AssetSpec, Contribution, Fleet, Horizon, Penalties, require_shape, steps_array


class StorageParams(BaseModel):
    """Physical parameters of a battery, on its own or inside a charging station."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    e_kwh: float = Field(gt=0, le=1e6, description="usable nameplate energy [kWh]")
    p_charge_max_kw: float = Field(gt=0, le=1e6)
    p_discharge_max_kw: float = Field(gt=0, le=1e6)
    eta_charge: float = Field(0.95, gt=0, le=1)
    eta_discharge: float = Field(0.95, gt=0, le=1)
    soc_min_frac: float = Field(0.1, ge=0, lt=1)
    soc_max_frac: float = Field(0.95, gt=0, le=1)
    soc_initial_frac: float = Field(0.5, ge=0, le=1)
    soc_end_target_frac: float | None = Field(
        None, ge=0, le=1, description="end-of-horizon SoC floor; None keeps the starting SoC"
    )
    self_discharge_frac_per_h: float = Field(0.0001, ge=0, lt=0.1)
    degradation_cny_per_kwh: float = Field(0.05, ge=0, description="cost per kWh of throughput")

    @model_validator(mode="after")
    def _soc_window(self):
        if self.soc_min_frac >= self.soc_max_frac:
            raise ValueError("soc_min_frac must be below soc_max_frac")
        return self


class BatterySpec(AssetSpec, StorageParams):
    kind: Literal["battery"] = "battery"


class StorageArrays:
    """Per-asset battery parameters as arrays (shared by batteries and stations)."""

    def __init__(self, e_kwh, p_ch_kw, p_dis_kw, eta_ch, eta_dis, soc_min, soc_max, sd_per_h, deg_cny, end_frac):
        self.e_kwh = np.asarray(e_kwh, float)
        self.p_ch_max_kw = np.asarray(p_ch_kw, float)
        self.p_dis_max_kw = np.asarray(p_dis_kw, float)
        self.eta_ch = np.asarray(eta_ch, float)
        self.eta_dis = np.asarray(eta_dis, float)
        self.e_min_kwh = np.asarray(soc_min, float) * self.e_kwh
        self.e_max_kwh = np.asarray(soc_max, float) * self.e_kwh
        self.sd_per_h = np.asarray(sd_per_h, float)
        self.deg_cny_per_kwh = np.asarray(deg_cny, float)
        # NaN means "end no lower than where the horizon started".
        self.end_frac = np.asarray(end_frac, float)

    @classmethod
    def from_params(cls, params: list[StorageParams]) -> "StorageArrays":
        def col(name):
            return np.array([float(getattr(p, name)) for p in params], dtype=float)

        end = [np.nan if p.soc_end_target_frac is None else p.soc_end_target_frac for p in params]
        return cls(
            col("e_kwh"), col("p_charge_max_kw"), col("p_discharge_max_kw"), col("eta_charge"), col("eta_discharge"),
            col("soc_min_frac"), col("soc_max_frac"), col("self_discharge_frac_per_h"), col("degradation_cny_per_kwh"),
            end,
        )

    @property
    def n(self) -> int:
        return self.e_kwh.size

    def build(self, horizon: Horizon, prefix: str):
        """Variables, parameters and constraints of ``n`` batteries over the horizon."""
        n, T = self.n, horizon.n_steps
        self.p_ch = cp.Variable((n, T), nonneg=True, name=f"{prefix}_p_ch_kw")
        self.p_dis = cp.Variable((n, T), nonneg=True, name=f"{prefix}_p_dis_kw")
        self.e = cp.Variable((n, T + 1), name=f"{prefix}_e_kwh")
        self.e0 = cp.Parameter(n, name=f"{prefix}_e0_kwh", value=np.zeros(n))
        self.e_end = cp.Parameter(n, name=f"{prefix}_e_end_kwh", value=np.zeros(n))
        keep = 1.0 - horizon.per_step(self.sd_per_h)
        constraints = [
            self.e[:, 0] == self.e0,
            self.e[:, 1:]
            == cp.multiply(keep, self.e[:, :-1])
            + cp.multiply(horizon.per_step(self.eta_ch), self.p_ch)
            - cp.multiply(horizon.per_step(1.0 / self.eta_dis), self.p_dis),
            self.e[:, 1:] >= steps_array(self.e_min_kwh, T),
            self.e[:, 1:] <= steps_array(self.e_max_kwh, T),
            self.p_ch <= steps_array(self.p_ch_max_kw, T),
            self.p_dis <= steps_array(self.p_dis_max_kw, T),
            self.e[:, T] >= self.e_end,
        ]
        degradation = cp.sum(cp.multiply(horizon.per_step(self.deg_cny_per_kwh), self.p_ch + self.p_dis))
        return self.p_dis - self.p_ch, constraints, degradation

    def update(self, e_kwh: np.ndarray, name: str) -> None:
        e_kwh = require_shape(name, e_kwh, (self.n,))
        # A state outside the window (after an outage, say) is planned from the nearest bound.
        e0 = np.clip(e_kwh, self.e_min_kwh, self.e_max_kwh)
        self.e0.value = e0
        end = np.where(np.isnan(self.end_frac), e0, self.end_frac * self.e_kwh)
        self.e_end.value = np.clip(end, self.e_min_kwh, self.e_max_kwh)

    def trajectory_kwh(self, e0_kwh: np.ndarray, p_kw: np.ndarray, step_h) -> np.ndarray:
        """Energy (n, T + 1) [kWh] that net powers ``p_kw`` (n, T) leave the batteries
        with from ``e0_kwh``, steps of ``step_h`` hours (a number or one per step), not
        clipped to any limit: charging at the charge efficiency, discharging at the
        discharge efficiency, self-discharge on what is kept."""
        p = np.asarray(p_kw, float)
        step_h = np.broadcast_to(np.asarray(step_h, float), (p.shape[1],))
        e = np.empty((self.n, p.shape[1] + 1))
        e[:, 0] = e0_kwh
        for t, dt_h in enumerate(step_h):
            flow = np.where(p[:, t] < 0, -p[:, t] * self.eta_ch, -p[:, t] / self.eta_dis) * dt_h
            e[:, t + 1] = e[:, t] * (1.0 - self.sd_per_h * dt_h) + flow
        return e

    def step(self, e_kwh: np.ndarray, setpoint_kw: np.ndarray, dt_h: float):
        """Plant model: apply setpoints, clipped to power and energy limits.

        Returns the new energy [kWh] and the realised injection [kW].
        """
        e_kwh = np.asarray(e_kwh, float)
        p = np.clip(np.nan_to_num(setpoint_kw), -self.p_ch_max_kw, self.p_dis_max_kw)
        kept = e_kwh * (1.0 - self.sd_per_h * dt_h)
        # Largest discharge / charge the energy window allows over this step.
        dis_room_kw = np.maximum(kept - self.e_min_kwh, 0.0) * self.eta_dis / dt_h
        ch_room_kw = np.maximum(self.e_max_kwh - kept, 0.0) / (self.eta_ch * dt_h)
        p = np.where(p > 0, np.minimum(p, dis_room_kw), -np.minimum(-p, ch_room_kw))
        e_next = kept + np.where(p < 0, -p * self.eta_ch, -p / self.eta_dis) * dt_h
        return e_next, p


class BatteryFleet(Fleet):
    kind = "battery"
    Spec = BatterySpec

    def __init__(self, specs):
        super().__init__(specs)
        self.storage = StorageArrays.from_params(self.specs)

    def initial_state(self) -> dict[str, Any]:
        return {"e_kwh": self.column("soc_initial_frac") * self.storage.e_kwh}

    def build(self, horizon: Horizon) -> Contribution:
        p, constraints, degradation = self.storage.build(horizon, "battery")
        return Contribution(p_kw=p, constraints=constraints, costs_cny={"battery_degradation": degradation})

    def update(self, state, forecast, penalties: Penalties) -> None:
        self.storage.update(state["e_kwh"], "battery.e_kwh")

    def fallback_kw(self, state, forecast, horizon: Horizon) -> np.ndarray:
        # Idle is always safe for a battery: it neither loads the grid nor risks its SoC window.
        return np.zeros((self.n, horizon.n_steps))

    def plant_step(self, state, setpoint_kw, actual, dt_h):
        e_next, p = self.storage.step(state["e_kwh"], setpoint_kw, dt_h)
        return {"e_kwh": e_next}, p, {"e_kwh": e_next, "soc_frac": e_next / self.storage.e_kwh}

    def power_range(self):
        return -self.storage.p_ch_max_kw, self.storage.p_dis_max_kw.copy(), np.zeros(self.n)

    def plan_details(self) -> dict[str, np.ndarray]:
        e = self.storage.e.value
        return {"soc_frac": e[:, 1:] / self.storage.e_kwh[:, None]}
