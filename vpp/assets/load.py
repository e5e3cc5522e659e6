"""Inflexible building load: offices, labs, canteens.

Not a decision: the dispatch takes its forecast as given.  Its reactive power follows a
fixed power factor (lagging, so the load absorbs kvar).
"""

from __future__ import annotations

from typing import Any, Literal

import cvxpy as cp
import numpy as np
from pydantic import Field

from vpp.errors import SpecError

from vpp.assets.base import AssetSpec, Contribution, Fleet, Horizon, Penalties, nonneg_param, require_shape


class LoadSpec(AssetSpec):
    kind: Literal["load"] = "load"
    peak_kw: float = Field(gt=0, le=1e6, description="peak consumption used to scale the synthetic profile [kW]")
    profile: Literal["office", "lab", "residential"] = "office"
    power_factor: float = Field(0.95, gt=0, le=1)


class LoadFleet(Fleet):
    kind = "load"
    Spec = LoadSpec

    def __init__(self, specs):
        super().__init__(specs)
        pf = self.column("power_factor")
        self.tan_phi = np.sqrt(1.0 - pf**2) / pf

    def initial_state(self) -> dict[str, Any]:
        return {}

    def build(self, horizon: Horizon) -> Contribution:
        self.horizon = horizon
        self.demand = nonneg_param((self.n, horizon.n_steps), "load_demand_kw")
        p = -self.demand
        q = -cp.multiply(np.repeat(self.tan_phi[:, None], horizon.n_steps, axis=1), self.demand)
        return Contribution(p_kw=p, q_kvar=q)

    def update(self, state, forecast, penalties: Penalties) -> None:
        demand = require_shape("load.demand_kw", forecast["demand_kw"], (self.n, self.horizon.n_base_steps))
        if np.any(demand < 0):
            raise SpecError("load.demand_kw", "consumption magnitudes must be >= 0")
        self.demand.value = self.horizon.coarsen(demand)

    def fallback_kw(self, state, forecast, horizon: Horizon) -> np.ndarray:
        return -np.asarray(forecast["demand_kw"], float)

    def plant_step(self, state, setpoint_kw, actual, dt_h):
        demand = np.asarray(actual["demand_kw"], float)
        return state, -demand, {"demand_kw": demand}

    def power_range(self):
        # Measured loads may overshoot the nominal peak; 20 % covers the synthetic profiles' noise.
        peak = 1.2 * self.column("peak_kw")
        return -peak, np.zeros(self.n), peak * self.tan_phi

    def reactive_kvar(self, p_kw: np.ndarray) -> np.ndarray:
        """Reactive injection [kvar] that goes with active injection ``p_kw`` (n, ...)."""
        return p_kw * self.tan_phi.reshape((-1,) + (1,) * (np.ndim(p_kw) - 1))
