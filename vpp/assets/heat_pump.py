"""Heat pumps (ground- or air-source) feeding a thermal store or building mass.

COP model: a fixed fraction of the Carnot COP between the source and the supply (flow)
temperature, ``cop = eta_carnot * T_supply / (T_supply - T_source)`` in kelvin, clipped to
``[1, cop_max]``.  Ground-source units see a nearly constant ground temperature;
air-source units see the outdoor air, so their COP drops on cold evenings.

Thermal state ``e_th_kwh`` is the heat held above the lower comfort bound, so the comfort
band is ``0 <= e_th_kwh <= store_kwh_th``::

    e[t+1] = e[t] * (1 - loss_frac_per_h * dt_h) + (cop[t] * p_el[t] - heat_demand[t]) * dt_h

Heat demand is always drawn; when the store cannot cover it the state falls below zero,
which is a comfort violation (reported in kWh_th and in kelvin-hours via
``store_kwh_th / comfort_band_k`` kWh_th per kelvin), never hidden.
"""

from __future__ import annotations

from typing import Any, Literal

import cvxpy as cp
import numpy as np
from pydantic import Field, model_validator

from vpp.assets.base import AssetSpec, Contribution, Fleet, Horizon, Penalties, nonneg_param, require_shape, steps_array

_KELVIN = 273.15
_MIN_LIFT_K = 5.0


class HeatPumpSpec(AssetSpec):
    kind: Literal["heat_pump"] = "heat_pump"
    source: Literal["ground", "air"] = "ground"
    p_el_max_kw: float = Field(gt=0, le=1e5, description="maximum electrical input [kW]")
    p_el_min_kw: float = Field(0.0, ge=0, description="must-run electrical input [kW]")
    t_supply_c: float = Field(35.0, ge=20, le=80, description="heating flow temperature [C]")
    t_ground_c: float = Field(12.0, ge=-5, le=30, description="ground-source brine temperature [C]")
    carnot_efficiency: float = Field(0.5, gt=0, le=0.8)
    cop_max: float = Field(6.0, ge=1, le=12)
    store_kwh_th: float = Field(gt=0, le=1e6, description="heat held across the comfort band [kWh_th]")
    comfort_band_k: float = Field(2.0, gt=0, le=30, description="temperature width of the comfort band [K]")
    store_loss_frac_per_h: float = Field(0.01, ge=0, lt=0.5)
    soc_initial_frac: float = Field(0.5, ge=0, le=1)
    soc_end_target_frac: float | None = Field(None, ge=0, le=1, description="None keeps the starting state")
    design_heat_kw_th: float = Field(gt=0, le=1e6, description="heat demand at the design temperature [kW_th]")

    @model_validator(mode="after")
    def _power_range(self):
        if self.p_el_min_kw > self.p_el_max_kw:
            raise ValueError("p_el_min_kw must not exceed p_el_max_kw")
        return self


def carnot_cop(t_source_c, t_supply_c, carnot_efficiency, cop_max):
    """COP of a heat pump as a fraction of the Carnot COP [-].

    All arguments broadcast.  The lift is floored at 5 K so a warm source cannot give an
    unbounded COP; the result is clipped to ``[1, cop_max]``.
    """
    t_sink_k = np.asarray(t_supply_c, float) + _KELVIN
    lift_k = np.maximum(t_sink_k - (np.asarray(t_source_c, float) + _KELVIN), _MIN_LIFT_K)
    return np.clip(carnot_efficiency * t_sink_k / lift_k, 1.0, cop_max)


class HeatPumpFleet(Fleet):
    kind = "heat_pump"
    Spec = HeatPumpSpec

    def __init__(self, specs):
        super().__init__(specs)
        c = self.column
        self.p_max_kw, self.p_min_kw = c("p_el_max_kw"), c("p_el_min_kw")
        self.cap_kwh, self.loss_per_h = c("store_kwh_th"), c("store_loss_frac_per_h")
        self.kwh_per_k = self.cap_kwh / c("comfort_band_k")
        self.is_air = np.array([s.source == "air" for s in self.specs])

    def cop(self, temp_air_c: np.ndarray) -> np.ndarray:
        """COP (n, n_steps) for an outdoor temperature series [C]."""
        temp_air_c = np.asarray(temp_air_c, float)[None, :]
        source = np.where(self.is_air[:, None], temp_air_c, self.column("t_ground_c")[:, None])
        return carnot_cop(source, self.column("t_supply_c")[:, None], self.column("carnot_efficiency")[:, None],
                          self.column("cop_max")[:, None])

    def initial_state(self) -> dict[str, Any]:
        return {"e_th_kwh": self.column("soc_initial_frac") * self.cap_kwh}

    def build(self, horizon: Horizon) -> Contribution:
        n, T = self.n, horizon.n_steps
        self.horizon = horizon
        dt = np.broadcast_to(horizon.step_h, (n, T))
        # One small COP parameter per heat pump: cvxpy's DPP compile of a product of a
        # variable with one large (n, T) parameter grows with the square of its size.
        self.cop_params = [nonneg_param((T,), f"hp_cop_{i}") for i in range(n)]
        self.heat_demand = nonneg_param((n, T), "hp_heat_demand_kw_th")
        self.e0 = cp.Parameter(n, name="hp_e0_kwh_th", value=np.zeros(n))
        self.e_end = cp.Parameter(n, name="hp_e_end_kwh_th", value=np.zeros(n))
        self.comfort_price = cp.Parameter(nonneg=True, name="hp_comfort_price", value=0.0)
        self.p_el = cp.Variable((n, T), name="hp_p_el_kw")
        self.e = cp.Variable((n, T + 1), name="hp_e_th_kwh")
        self.shortfall = cp.Variable((n, T), nonneg=True, name="hp_shortfall_kwh_th")
        self.end_shortfall = cp.Variable(n, nonneg=True, name="hp_end_shortfall_kwh_th")
        heat_out_kw_th = cp.vstack([cp.multiply(cop, self.p_el[i]) for i, cop in enumerate(self.cop_params)])
        keep = 1.0 - horizon.per_step(self.loss_per_h)
        constraints = [
            self.p_el >= steps_array(self.p_min_kw, T),
            self.p_el <= steps_array(self.p_max_kw, T),
            self.e[:, 0] == self.e0,
            self.e[:, 1:] == cp.multiply(keep, self.e[:, :-1]) + cp.multiply(dt, heat_out_kw_th - self.heat_demand),
            self.e[:, 1:] <= steps_array(self.cap_kwh, T),
            self.e[:, 1:] + self.shortfall >= 0,
            self.e[:, T] + self.end_shortfall >= self.e_end,
        ]
        comfort = self.comfort_price * (cp.sum(cp.multiply(dt, self.shortfall)) + cp.sum(self.end_shortfall))
        return Contribution(p_kw=-self.p_el, constraints=constraints, costs_cny={"comfort_violation": comfort})

    def update(self, state, forecast, penalties: Penalties) -> None:
        # A block's mean COP is exact for a power held constant over it.
        base = (self.n, self.horizon.n_base_steps)
        cop = require_shape("heat_pump.cop", forecast["cop"], base)
        heat = require_shape("heat_pump.heat_kw_th", forecast["heat_kw_th"], base)
        for param, row in zip(self.cop_params, self.horizon.coarsen(cop)):
            param.value = row
        self.heat_demand.value = np.clip(self.horizon.coarsen(heat), 0, None)
        e0 = np.minimum(require_shape("heat_pump.e_th_kwh", state["e_th_kwh"], (self.n,)), self.cap_kwh)
        self.e0.value = e0
        end = [s.soc_end_target_frac for s in self.specs]
        target = np.array([np.nan if f is None else f for f in end]) * self.cap_kwh
        self.e_end.value = np.clip(np.where(np.isnan(target), e0, target), 0.0, self.cap_kwh)
        self.comfort_price.value = penalties.comfort_cny_per_kwh_th

    def fallback_kw(self, state, forecast, horizon: Horizon) -> np.ndarray:
        """Thermostatic control: full power below half the store, else follow the demand."""
        cop, heat = np.asarray(forecast["cop"], float), np.asarray(forecast["heat_kw_th"], float)
        e = np.asarray(state["e_th_kwh"], float).copy()
        out = np.zeros((self.n, horizon.n_steps))
        for t in range(horizon.n_steps):
            want = np.where(e < 0.5 * self.cap_kwh, self.p_max_kw, heat[:, t] / cop[:, t])
            p = self._feasible_power(e, want, cop[:, t], heat[:, t], horizon.dt_h)
            e = self._advance(e, p, cop[:, t], heat[:, t], horizon.dt_h)
            out[:, t] = -p
        return out

    def _feasible_power(self, e, p_el_kw, cop, heat_kw_th, dt_h):
        # The store cannot be filled beyond its top: the plant throttles to what fits.
        room_kw_th = (self.cap_kwh - e * (1 - self.loss_per_h * dt_h)) / dt_h + heat_kw_th
        return np.clip(np.minimum(p_el_kw, np.maximum(room_kw_th, 0.0) / cop), self.p_min_kw, self.p_max_kw)

    def _advance(self, e, p_el_kw, cop, heat_kw_th, dt_h):
        e_next = e * (1 - self.loss_per_h * dt_h) + (cop * p_el_kw - heat_kw_th) * dt_h
        return np.minimum(e_next, self.cap_kwh)

    def plant_step(self, state, setpoint_kw, actual, dt_h):
        cop, heat = np.asarray(actual["cop"], float), np.asarray(actual["heat_kw_th"], float)
        e = np.asarray(state["e_th_kwh"], float)
        p_el = self._feasible_power(e, -np.nan_to_num(setpoint_kw), cop, heat, dt_h)
        e_next = self._advance(e, p_el, cop, heat, dt_h)
        deficit = np.maximum(-e_next, 0.0)
        return {"e_th_kwh": e_next}, -p_el, {
            "e_th_kwh": e_next, "heat_out_kw_th": cop * p_el, "heat_demand_kw_th": heat, "cop": cop,
            "comfort_violation_k_h": deficit / self.kwh_per_k * dt_h,
        }

    def power_range(self):
        return -self.p_max_kw, -self.p_min_kw, np.zeros(self.n)

    def plan_details(self) -> dict[str, np.ndarray]:
        return {"e_th_kwh": self.e.value[:, 1:], "shortfall_kwh_th": self.shortfall.value}
