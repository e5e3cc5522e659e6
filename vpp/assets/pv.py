"""Rooftop and canopy photovoltaics.

Output forecast: plane-of-array irradiance from pvlib (Hay-Davies transposition), cell
temperature from the Faiman model, DC power from PVWatts, AC power from the PVWatts
inverter model, capped at the inverter rating.  In the dispatch problem the AC output
``p`` is a decision below the available power (curtailment), and inverters that allow
it may supply or absorb reactive power within their apparent-power rating.
"""

from __future__ import annotations

from typing import Any, Literal

import cvxpy as cp
import numpy as np
import pandas as pd
import pvlib
from pydantic import BaseModel, ConfigDict, Field

from vpp.assets.base import AssetSpec, Contribution, Fleet, Horizon, Penalties, nonneg_param, require_shape, steps_array

# The capability circle p^2 + q^2 <= S^2 is replaced by an inscribed polygon with
# vertices every 45 degrees, which keeps the problem linear and never exceeds S.
_FACET_ANGLES_RAD = np.deg2rad([22.5, 67.5])
_FACET_RHS_FRAC = np.cos(np.deg2rad(22.5))


class PVParams(BaseModel):
    """Physical parameters of a PV system, on its own or inside a charging station."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    p_kwp: float = Field(gt=0, le=1e6, description="DC nameplate [kWp]")
    inverter_kva: float = Field(gt=0, le=1e6, description="inverter apparent-power rating [kVA]")
    tilt_deg: float = Field(25.0, ge=0, le=90)
    azimuth_deg: float = Field(180.0, ge=0, lt=360, description="pvlib convention: 180 = south")
    losses_frac: float = Field(0.14, ge=0, lt=1, description="soiling, wiring, mismatch")
    gamma_pdc_per_c: float = Field(-0.0037, ge=-0.01, le=0)
    reactive_power: bool = Field(True, description="inverter may supply/absorb kvar when the grid needs it")


class PVSpec(AssetSpec, PVParams):
    kind: Literal["pv"] = "pv"
    fallback_p_max_kw: float | None = Field(None, ge=0, description="output cap without a plan; None = no cap")


def pv_ac_kw(
    weather: pd.DataFrame,
    latitude_deg: float,
    longitude_deg: float,
    altitude_m: float,
    p_kwp: np.ndarray,
    inverter_kva: np.ndarray,
    tilt_deg: np.ndarray,
    azimuth_deg: np.ndarray,
    losses_frac: np.ndarray,
    gamma_pdc_per_c: np.ndarray,
) -> np.ndarray:
    """AC output [kW] of PV systems, shape (n_systems, n_steps).

    ``weather`` has a tz-aware index and columns ``ghi_w_per_m2``, ``dni_w_per_m2``,
    ``dhi_w_per_m2``, ``temp_air_c`` and ``wind_speed_m_per_s``.  The 15-minute values are
    taken at the middle of each interval so the sun position matches the interval's energy.
    """
    times = weather.index + (weather.index[1] - weather.index[0]) / 2 if len(weather) > 1 else weather.index
    solpos = pvlib.solarposition.get_solarposition(times, latitude_deg, longitude_deg, altitude_m)
    dni_extra = pvlib.irradiance.get_extra_radiation(times).to_numpy()
    ghi = weather["ghi_w_per_m2"].to_numpy()
    dni = weather["dni_w_per_m2"].to_numpy()
    dhi = weather["dhi_w_per_m2"].to_numpy()
    temp_air = weather["temp_air_c"].to_numpy()
    wind = weather["wind_speed_m_per_s"].to_numpy()
    zenith = solpos["apparent_zenith"].to_numpy()
    azimuth = solpos["azimuth"].to_numpy()
    out = np.zeros((len(p_kwp), len(weather)))
    # Systems sharing an orientation share one transposition.
    orientations = {}
    for i, key in enumerate(zip(tilt_deg, azimuth_deg)):
        orientations.setdefault(key, []).append(i)
    for (tilt, az), rows in orientations.items():
        poa = pvlib.irradiance.get_total_irradiance(
            tilt, az, zenith, azimuth, dni, ghi, dhi, dni_extra=dni_extra, model="haydavies"
        )
        poa_w = np.nan_to_num(np.asarray(poa["poa_global"], float), nan=0.0).clip(min=0.0)
        t_cell = np.asarray(pvlib.temperature.faiman(poa_w, temp_air, wind), float)
        for i in rows:
            dc_kw = pvlib.pvsystem.pvwatts_dc(poa_w, t_cell, p_kwp[i], gamma_pdc_per_c[i]) * (1 - losses_frac[i])
            ac_kw = pvlib.inverter.pvwatts(np.asarray(dc_kw, float), inverter_kva[i] / 0.96)
            out[i] = np.clip(np.nan_to_num(ac_kw), 0.0, inverter_kva[i])
    return out


def pv_params_ac_kw(params: list[PVParams], weather: pd.DataFrame, site) -> np.ndarray:
    """:func:`pv_ac_kw` for a list of PV parameter records at a site (lat/lon/altitude)."""

    def col(name):
        return np.array([float(getattr(p, name)) for p in params], dtype=float)

    return pv_ac_kw(
        weather, site.latitude_deg, site.longitude_deg, site.altitude_m, col("p_kwp"), col("inverter_kva"),
        col("tilt_deg"), col("azimuth_deg"), col("losses_frac"), col("gamma_pdc_per_c"),
    )


class PVFleet(Fleet):
    kind = "pv"
    Spec = PVSpec

    def __init__(self, specs):
        super().__init__(specs)
        self.s_kva = self.column("inverter_kva")
        self.q_allowed = np.array([1.0 if s.reactive_power else 0.0 for s in self.specs])

    def available_kw(self, weather: pd.DataFrame, site) -> np.ndarray:
        """Forecast or actual available output [kW] (n, n_steps) for the given weather."""
        return pv_params_ac_kw(self.specs, weather, site)

    def initial_state(self) -> dict[str, Any]:
        return {}

    def build(self, horizon: Horizon) -> Contribution:
        n, T = self.n, horizon.n_steps
        self.horizon = horizon
        self.avail = nonneg_param((n, T), "pv_avail_kw")
        self.q_price = cp.Parameter(nonneg=True, name="pv_q_price", value=0.0)
        self.p = cp.Variable((n, T), nonneg=True, name="pv_p_kw")
        self.q = cp.Variable((n, T), name="pv_q_kvar")
        self.q_abs = cp.Variable((n, T), nonneg=True, name="pv_q_abs_kvar")
        s = steps_array(self.s_kva, T)
        constraints = [self.p <= self.avail, self.q_abs >= self.q, self.q_abs >= -self.q,
                       self.q_abs <= s * steps_array(self.q_allowed, T)]
        for angle in _FACET_ANGLES_RAD:
            constraints.append(np.cos(angle) * self.p + np.sin(angle) * self.q_abs <= _FACET_RHS_FRAC * s)
        # A small price on reactive power keeps q at zero unless the grid needs it.
        q_cost = self.q_price * cp.sum(self.q_abs @ horizon.step_h)
        return Contribution(p_kw=self.p, q_kvar=self.q, constraints=constraints, costs_cny={"reactive_power": q_cost})

    def update(self, state, forecast, penalties: Penalties) -> None:
        avail = self.horizon.coarsen(require_shape("pv.avail_kw", forecast["avail_kw"],
                                                   (self.n, self.horizon.n_base_steps)))
        self.avail.value = np.clip(avail, 0.0, steps_array(self.s_kva, avail.shape[1]))
        self.q_price.value = penalties.reactive_cny_per_kvarh

    def fallback_kw(self, state, forecast, horizon: Horizon) -> np.ndarray:
        cap = np.array([np.inf if s.fallback_p_max_kw is None else s.fallback_p_max_kw for s in self.specs])
        return np.minimum(np.asarray(forecast["avail_kw"], float), cap[:, None])

    def plant_step(self, state, setpoint_kw, actual, dt_h):
        # A PV setpoint is an output cap: the plant gives what the sun allows below it.
        avail = np.asarray(actual["avail_kw"], float)
        p = np.clip(np.minimum(np.nan_to_num(setpoint_kw, nan=np.inf), avail), 0.0, self.s_kva)
        return state, p, {"avail_kw": avail, "curtailed_kw": avail - p}

    def power_range(self):
        return np.zeros(self.n), self.s_kva.copy(), self.s_kva * self.q_allowed

    def plan_details(self) -> dict[str, np.ndarray]:
        return {"curtailed_kw": self.avail.value - self.p.value, "q_kvar": self.q.value}
