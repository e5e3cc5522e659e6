"""Forecasts the simulated optimizer sees, made from the actual series.

- ``perfect``: the actuals themselves.
- ``persistence``: the seasonal-naive forecast used in the live service: each quarter hour
  as it was 24 h earlier (PV, loads, heat demand); the current step is known.
- ``noise``: the actuals times ``1 + sigma(lead) * z(t)``.  ``z`` is a seeded AR(1) series
  over the target time ``t`` (standard normal, correlated over about two hours), fixed for
  the run, and ``sigma`` grows with the lead time as ``spread * sqrt(lead / 24 h)``: the
  forecast of a given quarter hour is consistent from one cycle to the next and sharpens
  as it draws near, as a weather or load forecast does.

Under ``persistence`` and ``noise`` the optimizer knows an EV session only once the car has
arrived (what a charger reports); under ``perfect`` it knows every session in advance.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from vpp.errors import SpecError
from vpp.weather import ar1_rows

MODES = ("perfect", "persistence", "noise")
_AR_PHI = 0.9  # per 15-minute step: errors correlated over about two hours


@dataclass
class Forecaster:
    mode: str = "perfect"
    spread: float = 0.15
    seed: int = 0
    # The run's error series per (series, kind, quantity), drawn once: see _errors.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise SpecError("forecast", f"unknown forecast mode {self.mode!r}; expected one of {list(MODES)}")
        if not 0 <= self.spread <= 2:
            raise SpecError("forecast_spread", "must lie in 0..2")

    def forecast(self, series, park, pos: int, n_steps: int) -> dict[str, dict]:
        """Per-kind forecast dicts for the horizon starting at step ``pos``."""
        out = series.step_forecast(park, pos, n_steps)
        if self.mode == "perfect":
            return out
        steps_per_day = int(round(24 / park.settings.dt_h))
        for kind, fields in out.items():
            for name in ("avail_kw", "demand_kw", "heat_kw_th", "pv_avail_kw"):
                if name in fields and fields[name].size:
                    fields[name] = self._perturb(series, kind, name, pos, n_steps, steps_per_day, fields[name])
        if "charging_station" in out:
            now = series.index[pos]
            sessions = out["charging_station"]["sessions"]
            out["charging_station"]["sessions"] = sessions[sessions["arrival"] <= now]
        return out

    def _perturb(self, series, kind, name, pos, n_steps, steps_per_day, actual):
        if self.mode == "persistence":
            full = _full_array(series, kind, name)
            lagged = np.arange(pos, pos + n_steps) - steps_per_day
            forecast = np.where(lagged[None, :] >= 0, full[:, np.maximum(lagged, 0)], actual)
            forecast[:, 0] = actual[:, 0]  # the current step is measured
            return forecast
        z = self._errors(series, kind, name, actual.shape[0])[:, pos:pos + n_steps]
        sigma = self.spread * np.sqrt(np.arange(n_steps) / steps_per_day)
        return np.clip(actual * (1.0 + sigma[None, :] * z), 0.0, None)

    def _errors(self, series, kind: str, name: str, n_rows: int) -> np.ndarray:
        """The run's standard-normal AR(1) error series per asset (n_rows, n_total_steps)."""
        cache = self._cache
        key = (id(series), kind, name)
        if key not in cache:
            n = len(series.index)
            rng = np.random.default_rng([self.seed, zlib.crc32(f"{kind}.{name}".encode())])
            shocks = rng.standard_normal((n_rows, n))
            z = np.empty_like(shocks)
            z[:, 0] = shocks[:, 0]  # stationary start
            z[:, 1:] = ar1_rows(shocks[:, 1:], shocks[:, 0], _AR_PHI)
            cache[key] = z
        return cache[key]


def _full_array(series, kind: str, name: str) -> np.ndarray:
    return {
        ("pv", "avail_kw"): series.pv_avail_kw,
        ("load", "demand_kw"): series.load_demand_kw,
        ("heat_pump", "heat_kw_th"): series.heat_kw_th,
        ("charging_station", "pv_avail_kw"): series.station_pv_avail_kw,
    }[(kind, name)]
