"""The exogenous series a park needs: weather, PV availability, loads, heat demand,
EV sessions, prices and carbon intensity, on the park's 15-minute grid.

``synthetic_series`` generates them from the park's location and a seed (see
:mod:`vpp.weather` and :mod:`vpp.profiles`), so a park runs without any data files;
``ParkSeries.horizon`` cuts one cycle's :class:`~vpp.dispatch.problem.HorizonInputs` out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from vpp import profiles, weather
from vpp.dispatch.problem import FlexRequest, HorizonInputs
from vpp.errors import SpecError


@dataclass
class ParkSeries:
    """Per-asset series over a period, each (n_assets_of_kind, n_steps), power in kW."""

    index: pd.DatetimeIndex
    weather: pd.DataFrame
    pv_avail_kw: np.ndarray
    station_pv_avail_kw: np.ndarray
    load_demand_kw: np.ndarray
    heat_kw_th: np.ndarray
    cop: np.ndarray
    sessions: pd.DataFrame
    buy_price_cny_per_kwh: np.ndarray
    sell_price_cny_per_kwh: np.ndarray
    carbon_kg_per_kwh: np.ndarray

    def position(self, time: pd.Timestamp) -> int:
        """Step number of ``time`` (tz-aware), which must lie on the series' grid."""
        if time.tzinfo is None:
            raise SpecError("time", "must be timezone-aware")
        pos = self.index.get_indexer([time])[0]
        if pos < 0:
            raise SpecError("time", f"{time} is not a step of the series "
                                    f"({self.index[0]} .. {self.index[-1]}, every {self.index.freq or '15min'})")
        return int(pos)

    def window(self, first: int, n_steps: int) -> "ParkSeries":
        """Steps ``first .. first + n_steps`` as a series of their own (EV sessions kept whole)."""
        sl = slice(first, first + n_steps)
        return ParkSeries(
            index=self.index[sl], weather=self.weather.iloc[sl], pv_avail_kw=self.pv_avail_kw[:, sl],
            station_pv_avail_kw=self.station_pv_avail_kw[:, sl], load_demand_kw=self.load_demand_kw[:, sl],
            heat_kw_th=self.heat_kw_th[:, sl], cop=self.cop[:, sl], sessions=self.sessions,
            buy_price_cny_per_kwh=self.buy_price_cny_per_kwh[sl], sell_price_cny_per_kwh=self.sell_price_cny_per_kwh[sl],
            carbon_kg_per_kwh=self.carbon_kg_per_kwh[sl],
        )

    def step_forecast(self, park, pos: int, n_steps: int) -> dict[str, dict]:
        """Per-kind forecast dicts for steps ``pos .. pos + n_steps``."""
        if pos < 0 or pos + n_steps > len(self.index):
            raise SpecError("time", f"a {n_steps}-step horizon from step {pos} runs past the series' end")
        sl = slice(pos, pos + n_steps)
        index = self.index[sl]
        out: dict[str, dict] = {}
        if "pv" in park.fleets:
            out["pv"] = {"avail_kw": self.pv_avail_kw[:, sl]}
        if "load" in park.fleets:
            out["load"] = {"demand_kw": self.load_demand_kw[:, sl]}
        if "heat_pump" in park.fleets:
            out["heat_pump"] = {"heat_kw_th": self.heat_kw_th[:, sl], "cop": self.cop[:, sl]}
        if "charging_station" in park.fleets:
            out["charging_station"] = {"pv_avail_kw": self.station_pv_avail_kw[:, sl], "sessions": self.sessions,
                                       "index": index}
        return out

    def horizon(self, park, start: pd.Timestamp, peak_import_so_far_kw: float = 0.0,
                flex_requests: list[FlexRequest] | None = None) -> HorizonInputs:
        """The inputs of the cycle that starts at ``start``."""
        T = park.settings.horizon_steps
        pos = self.position(start)
        sl = slice(pos, pos + T)
        forecasts = self.step_forecast(park, pos, T)
        return HorizonInputs(
            index=self.index[sl], forecasts=forecasts,
            buy_price_cny_per_kwh=self.buy_price_cny_per_kwh[sl], sell_price_cny_per_kwh=self.sell_price_cny_per_kwh[sl],
            carbon_kg_per_kwh=self.carbon_kg_per_kwh[sl],
            import_limit_kw=np.full(T, park.connection.import_limit_kw),
            export_limit_kw=np.full(T, park.connection.export_limit_kw),
            peak_import_so_far_kw=peak_import_so_far_kw, flex_requests=list(flex_requests or []),
        )


def synthetic_series(park, start, days: int, seed: int | None = None) -> ParkSeries:
    """Seeded synthetic inputs for ``days`` days from the local midnight of ``start``.

    One more day than asked is generated so that the last cycle still sees a full horizon.
    """
    seed = park.inputs.seed if seed is None else seed
    extra_days = int(np.ceil(park.settings.horizon_steps * park.settings.dt_h / 24.0))
    index = weather.load_period_index(start, days + extra_days, park.site.timezone)
    site = park.site
    wx = weather.synthetic_weather(index, site.latitude_deg, site.longitude_deg, site.altitude_m, seed=seed)
    fleets, n = park.fleets, len(index)
    pv = fleets["pv"].available_kw(wx, site) if "pv" in fleets else np.zeros((0, n))
    station_pv = np.zeros((0, n))
    sessions = pd.DataFrame(columns=["session_id", "station_id", "charger_id", "arrival", "departure", "energy_kwh",
                                     "max_kw"])
    if "charging_station" in fleets:
        st = fleets["charging_station"]
        station_pv = st.pv_available_kw(wx, site)
        frames = []
        for k, spec in enumerate(st.specs):
            chargers = [(c.id, c.rating_kw) for c in spec.chargers]
            s = profiles.ev_sessions(index, chargers, seed=seed + 7919 * (k + 1))
            frames.append(s.assign(station_id=spec.id, session_id=spec.id + "/" + s["session_id"].astype(str)))
        sessions = pd.concat(frames, ignore_index=True) if frames else sessions
    holidays = set()
    for year in range(index[0].year, index[-1].year + 1):
        holidays |= set(profiles.china_holidays(year))
    load = np.zeros((0, n))
    if "load" in fleets:
        load = np.vstack([
            profiles.building_load_kw(index, s.peak_kw, kind=s.profile, seed=seed + 104729 * (k + 1), holidays=holidays)
            for k, s in enumerate(fleets["load"].specs)
        ])
    heat, cop = np.zeros((0, n)), np.zeros((0, n))
    if "heat_pump" in fleets:
        hp = fleets["heat_pump"]
        temp = wx["temp_air_c"].to_numpy()
        heat = np.vstack([profiles.heat_demand_kw_th(index, temp, s.design_heat_kw_th) for s in hp.specs])
        cop = hp.cop(temp)
    return ParkSeries(
        index=index, weather=wx, pv_avail_kw=pv, station_pv_avail_kw=station_pv, load_demand_kw=load,
        heat_kw_th=heat, cop=cop, sessions=sessions,
        buy_price_cny_per_kwh=park.tariff.buy_price_cny_per_kwh(index),
        sell_price_cny_per_kwh=park.tariff.sell_price_cny_per_kwh(index),
        carbon_kg_per_kwh=park.carbon.intensity(index),
    )


def first_step_conditions(forecasts: dict[str, dict], time: pd.Timestamp) -> dict[str, dict]:
    """The conditions of a horizon's first step per kind, as the plant models read them
    (``plant_step``'s ``actual``): each per-asset forecast array's first column, other
    entries (an EV sessions table) as they are, and the step's start for the chargers."""
    out = {kind: {name: (v[:, 0] if isinstance(v, np.ndarray) and v.ndim == 2 else v) for name, v in f.items()}
           for kind, f in forecasts.items()}
    if "charging_station" in out:
        out["charging_station"]["time"] = time
    return out
