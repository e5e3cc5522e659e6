"""Measured data a user brings to a simulation, laid over the synthetic year.

Time series file (CSV or Parquet, one row per 15-minute step):

==================================  ========  ==================================================
column                              required  meaning
==================================  ========  ==================================================
``time``                            yes       step start; ISO 8601, park-local unless it has an offset
``temp_air_c``                      yes       outdoor air temperature [deg C] (heat pump COP, heat demand)
``ghi_w_per_m2``                    see note  global horizontal irradiance [W/m2]
``dni_w_per_m2``, ``dhi_w_per_m2``  no        beam and diffuse irradiance; split from GHI (Erbs) if absent
``wind_speed_m_per_s``              no        wind speed for the PV cell temperature (1 m/s if absent)
``<load id>.demand_kw``             yes       each inflexible load's consumption [kW, positive]
``<pv id>.p_kw``                    no        a PV system's measured output [kW]; replaces the pvlib model
``<station id>.pv_kw``              no        a charging station's measured PV output [kW]
``<heat pump id>.heat_demand_kw_th`` no       heat demand [kW_th]; from the temperature if absent
``price.buy_cny_per_kwh``           no        energy price paid [CNY/kWh]; the park's tariff if absent
``price.sell_cny_per_kwh``          no        export price [CNY/kWh]
``carbon.kg_per_kwh``               no        grid carbon intensity [kg CO2/kWh]
==================================  ========  ==================================================

Note: ``ghi_w_per_m2`` is required unless every PV system and every station with PV
has its measured output column.  Values must be finite; loads, irradiance and heat
demand must not be negative.  The file must cover the simulated period; the optimizer's
look-ahead past its end repeats the file's last day.

EV sessions file (CSV or Parquet, one row per charging session):

================  ========  ===============================================
column            required  meaning
================  ========  ===============================================
``station_id``    yes       the charging station (an asset id of the park)
``charger_id``    yes       the charger the car plugs into
``arrival``       yes       plug-in time (park-local unless it has an offset)
``departure``     yes       plug-out time
``energy_kwh``    yes       energy the driver asks for [kWh]
``max_kw``        no        the car's charging limit [kW] (charger rating if absent)
``session_id``    no        a unique name (row number if absent)
================  ========  ===============================================
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pvlib

from vpp import profiles
from vpp.errors import SpecError
from vpp.inputs import ParkSeries

SESSION_COLUMNS = ["station_id", "charger_id", "arrival", "departure", "energy_kwh"]


def read_table(path: str | Path, field: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SpecError(field, f"no such file: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as error:  # a malformed file is the user's to fix, with the reason
        raise SpecError(field, f"cannot read {path}: {error}") from None


def _times(values: pd.Series, tz: str, field: str) -> pd.DatetimeIndex:
    try:
        parsed = pd.to_datetime(values, utc=False, format="ISO8601")
    except (ValueError, TypeError) as error:
        raise SpecError(field, f"not ISO 8601 times: {error}") from None
    index = pd.DatetimeIndex(parsed)
    if index.tz is None:
        index = index.tz_localize(tz)
    return index.tz_convert(tz)


def _column(frame: pd.DataFrame, name: str, field: str, nonneg: bool = False) -> np.ndarray:
    if name not in frame.columns:
        raise SpecError(f"{field}.{name}", f"missing column {name!r}")
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values)
    if bad.any():
        raise SpecError(f"{field}.{name}", f"not a finite number at {frame.index[np.argmax(bad)]}")
    if nonneg and (values < 0).any():
        raise SpecError(f"{field}.{name}", f"negative at {frame.index[np.argmax(values < 0)]}")
    return values


def apply_measured(series: ParkSeries, park, data_path: str | Path | None = None,
                   sessions_path: str | Path | None = None, n_steps: int | None = None) -> ParkSeries:
    """``series`` with the user's measured columns laid over it.

    ``n_steps`` is the simulated period (the file must cover it); steps after it keep the
    file's last day repeated so the last cycles still see a full horizon.
    """
    out = series
    if data_path is not None:
        out = _apply_timeseries(out, park, read_table(data_path, "data"), n_steps or len(series.index))
    if sessions_path is not None:
        out = dataclasses.replace(out, sessions=read_sessions(read_table(sessions_path, "sessions"), park))
    return out


def _apply_timeseries(series: ParkSeries, park, raw: pd.DataFrame, n_period: int) -> ParkSeries:
    if "time" not in raw.columns:
        raise SpecError("data.time", "missing column 'time'")
    tz = park.site.timezone
    frame = raw.set_index(_times(raw["time"], tz, "data.time")).drop(columns="time")
    if frame.index.has_duplicates:
        raise SpecError("data.time", f"repeated time {frame.index[frame.index.duplicated()][0]}")
    frame = frame.sort_index()
    index = series.index
    period = index[:n_period]
    missing = period.difference(frame.index)
    if len(missing):
        raise SpecError("data.time", f"{len(missing)} step(s) of the period are missing, the first at {missing[0]} "
                                     f"(the file covers {frame.index[0]} .. {frame.index[-1]})")
    frame = _extend(frame.loc[period[0]:], index)

    fleets, site = park.fleets, park.site
    wx = series.weather.copy()
    wx["temp_air_c"] = _column(frame, "temp_air_c", "data")
    pv_measured = {i: f"{i}.p_kw" in frame for i in (fleets["pv"].ids if "pv" in fleets else [])}
    station_measured = {}
    if "charging_station" in fleets:
        st = fleets["charging_station"]
        station_measured = {st.ids[i]: f"{st.ids[i]}.pv_kw" in frame for i in st.pv_owner}
    needs_irradiance = not all(pv_measured.values()) or not all(station_measured.values())
    if needs_irradiance or "ghi_w_per_m2" in frame:
        ghi = _column(frame, "ghi_w_per_m2", "data", nonneg=True)
        if "dni_w_per_m2" in frame and "dhi_w_per_m2" in frame:
            dni = _column(frame, "dni_w_per_m2", "data", nonneg=True)
            dhi = _column(frame, "dhi_w_per_m2", "data", nonneg=True)
        else:
            solpos = pvlib.solarposition.get_solarposition(index, site.latitude_deg, site.longitude_deg, site.altitude_m)
            split = pvlib.irradiance.erbs(ghi, solpos["zenith"].to_numpy(), index)
            dni, dhi = np.nan_to_num(np.asarray(split["dni"], float)), np.nan_to_num(np.asarray(split["dhi"], float))
        wx["ghi_w_per_m2"], wx["dni_w_per_m2"], wx["dhi_w_per_m2"] = ghi, dni, dhi
        wx["wind_speed_m_per_s"] = (_column(frame, "wind_speed_m_per_s", "data", nonneg=True)
                                    if "wind_speed_m_per_s" in frame else 1.0)

    changes: dict = {"weather": wx}
    if "pv" in fleets:
        pv = fleets["pv"].available_kw(wx, site) if needs_irradiance else np.zeros_like(series.pv_avail_kw)
        for k, asset_id in enumerate(fleets["pv"].ids):
            if pv_measured[asset_id]:
                pv[k] = _column(frame, f"{asset_id}.p_kw", "data", nonneg=True)
        changes["pv_avail_kw"] = pv
    if station_measured:
        st = fleets["charging_station"]
        spv = st.pv_available_kw(wx, site) if needs_irradiance else np.zeros_like(series.station_pv_avail_kw)
        for k, i in enumerate(st.pv_owner):
            if station_measured[st.ids[i]]:
                spv[k] = _column(frame, f"{st.ids[i]}.pv_kw", "data", nonneg=True)
        changes["station_pv_avail_kw"] = spv
    if "load" in fleets:
        changes["load_demand_kw"] = np.vstack([_column(frame, f"{i}.demand_kw", "data", nonneg=True)
                                               for i in fleets["load"].ids])
    if "heat_pump" in fleets:
        hp = fleets["heat_pump"]
        temp = wx["temp_air_c"].to_numpy()
        changes["heat_kw_th"] = np.vstack([
            _column(frame, f"{s.id}.heat_demand_kw_th", "data", nonneg=True) if f"{s.id}.heat_demand_kw_th" in frame
            else profiles.heat_demand_kw_th(index, temp, s.design_heat_kw_th) for s in hp.specs])
        changes["cop"] = hp.cop(temp)
    for column, name in (("price.buy_cny_per_kwh", "buy_price_cny_per_kwh"),
                         ("price.sell_cny_per_kwh", "sell_price_cny_per_kwh"), ("carbon.kg_per_kwh", "carbon_kg_per_kwh")):
        if column in frame:
            changes[name] = _column(frame, column, "data", nonneg=name == "carbon_kg_per_kwh")
    return dataclasses.replace(series, **changes)


def _extend(frame: pd.DataFrame, index: pd.DatetimeIndex) -> pd.DataFrame:
    """``frame`` on ``index``; steps past the file's end repeat its last day."""
    day = pd.Timedelta(days=1)
    out = frame.reindex(index)
    late = index[index > frame.index[-1]]
    for t in late:
        source = t - day
        while source > frame.index[-1]:
            source -= day
        out.loc[t] = frame.loc[source] if source in frame.index else np.nan
    return out


def read_sessions(raw: pd.DataFrame, park) -> pd.DataFrame:
    """Validated EV sessions in the layout the charging-station fleet reads."""
    if "charging_station" not in park.fleets:
        raise SpecError("sessions", "the park has no charging station")
    for name in SESSION_COLUMNS:
        if name not in raw.columns:
            raise SpecError(f"sessions.{name}", f"missing column {name!r}")
    st = park.fleets["charging_station"]
    tz = park.site.timezone
    out = pd.DataFrame({
        "station_id": raw["station_id"].astype(str), "charger_id": raw["charger_id"].astype(str),
        "arrival": _times(raw["arrival"], tz, "sessions.arrival"),
        "departure": _times(raw["departure"], tz, "sessions.departure"),
    })
    out["energy_kwh"] = _column(raw, "energy_kwh", "sessions", nonneg=True)
    ratings = {}
    for spec in st.specs:
        for charger in spec.chargers:
            ratings[(spec.id, charger.id)] = charger.rating_kw
    for row, (station, charger) in enumerate(zip(out["station_id"], out["charger_id"])):
        if station not in st.ids:
            raise SpecError(f"sessions[{row}].station_id", f"unknown charging station {station!r}; the park has "
                                                           f"{list(st.ids)}")
        if (station, charger) not in ratings:
            raise SpecError(f"sessions[{row}].charger_id", f"station {station!r} has no charger {charger!r}")
    rating = np.array([ratings[k] for k in zip(out["station_id"], out["charger_id"])], float)
    out["max_kw"] = (np.minimum(_column(raw, "max_kw", "sessions", nonneg=True), rating) if "max_kw" in raw
                     else rating)
    bad = np.flatnonzero(out["departure"] <= out["arrival"])
    if bad.size:
        raise SpecError(f"sessions[{bad[0]}].departure", "must be after arrival")
    ordered = out.sort_values(["station_id", "charger_id", "arrival"])
    same = (ordered["station_id"] == ordered["station_id"].shift()) & (ordered["charger_id"] == ordered["charger_id"].shift())
    overlap = same & (ordered["arrival"] < ordered["departure"].shift())
    if overlap.any():
        row = overlap.idxmax()
        raise SpecError(f"sessions[{row}].arrival", f"charger {out['charger_id'][row]!r} at {out['station_id'][row]!r} is "
                                                    "still taken by the previous session")
    out["session_id"] = (raw["session_id"].astype(str) if "session_id" in raw
                         else out["station_id"] + "/" + pd.Series(np.arange(len(out)), dtype=str))
    if out["session_id"].duplicated().any():
        raise SpecError("sessions.session_id", f"repeated id {out['session_id'][out['session_id'].duplicated()].iloc[0]!r}")
    return out[["session_id", "station_id", "charger_id", "arrival", "departure", "energy_kwh", "max_kw"]]
