"""Seeded synthetic weather at 15-minute resolution.

Irradiance is pvlib's Ineichen clear-sky model (Linke turbidity climatology shipped
with pvlib; falls back to Simplified Solis if that lookup fails) times a stochastic
clear-sky index, split into beam and diffuse with the Erbs (1982) correlation.
The clear-sky index is a daily weather regime (clear / partly cloudy / overcast,
Markov chain with monthly probabilities) plus an AR(1) fluctuation on 15-minute
steps.  Air temperature is an annual sinusoid plus AR(1) day-to-day anomalies plus a
two-half-cosine diurnal cycle (minimum at sunrise, maximum in the afternoon, cf.
Cesaraccio et al. 2001), whose range grows on clear days.  The defaults describe
Beijing/Changping (CMA 1991-2020 normals, rounded: annual mean ~12.5-13 C, January
~-3 C, July ~27 C; sunshine-based monthly cloud regimes; NASA POWER-like GHI).

Window independence: every random number is drawn from a stream keyed by
``(seed, year, stream)`` and indexed by the day of year and the 15-minute step of
the *local mean solar* day, so the value at a timestamp does not depend on the
requested window.  Days run from local mean solar midnight, when the sun is down.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import pvlib
from scipy.signal import lfilter

from vpp.errors import SpecError

STEP = pd.Timedelta(minutes=15)
_N_DAY_SLOTS = 367  # day-of-year slots per year (0..365, plus one spare)
_AR_TAIL_DAYS = 40  # length of the day-to-day anomaly filter (phi**40 ~ 0)
_EPOCH_2000_DAYS = 10957  # days from 1970-01-01 to 2000-01-01

_BEIJING_REGIMES = (  # P(clear), P(partly cloudy), P(overcast) per month
    (0.62, 0.28, 0.10), (0.56, 0.31, 0.13), (0.46, 0.36, 0.18), (0.42, 0.38, 0.20),
    (0.42, 0.38, 0.20), (0.32, 0.40, 0.28), (0.16, 0.42, 0.42), (0.22, 0.42, 0.36),
    (0.42, 0.37, 0.21), (0.52, 0.32, 0.16), (0.52, 0.32, 0.16), (0.60, 0.29, 0.11),
)
_BEIJING_WIND = (2.6, 2.8, 3.2, 3.5, 3.1, 2.5, 2.2, 2.0, 2.0, 2.3, 2.6, 2.6)


@dataclass(frozen=True)
class Climate:
    """Parameters of the synthetic climate; the defaults describe Beijing.

    The seasonal temperature is ``mean - A1 cos(p) - A2 cos(2 p)`` with
    ``p = 2 pi (day - coldest_day) / 365.2425``; the small semiannual term (fitted to
    Beijing monthly normals) makes winter and summer flatter and spring warmer than a
    pure sinusoid; set it to 0 for a pure sinusoid.
    Temperatures in degC, temperature differences in K, irradiance ratios are
    clear-sky indices (measured GHI / clear-sky GHI, dimensionless).  Regime tuples
    are ordered (clear, partly cloudy, overcast).  ``regime_probs`` has one row per
    calendar month; ``wind_monthly_mean_m_per_s`` one value per month (10 m height).
    """

    t_annual_mean_c: float = 12.8
    t_annual_amplitude_k: float = 15.2
    t_semiannual_amplitude_k: float = 0.9
    t_coldest_day_of_year: float = 16.0
    t_diurnal_range_k: float = 10.0
    t_max_hours_after_solar_noon: float = 2.75
    t_anomaly_sd_k: float = 3.0
    t_anomaly_ar1: float = 0.7
    regime_probs: tuple[tuple[float, float, float], ...] = _BEIJING_REGIMES
    regime_persistence: float = 0.5
    regime_kc_mean: tuple[float, float, float] = (0.97, 0.70, 0.30)
    regime_kc_sd_day: tuple[float, float, float] = (0.02, 0.07, 0.07)
    regime_kc_sd_step: tuple[float, float, float] = (0.02, 0.20, 0.08)
    regime_diurnal_range_factor: tuple[float, float, float] = (1.25, 1.0, 0.5)
    kc_ar1_per_step: float = 0.8
    wind_monthly_mean_m_per_s: tuple[float, ...] = _BEIJING_WIND
    wind_day_sd_log: float = 0.35
    wind_diurnal_amplitude: float = 0.3

    def __post_init__(self) -> None:
        for f in fields(self):  # lists -> tuples, so that a Climate stays hashable
            val = getattr(self, f.name)
            if isinstance(val, (list, tuple, np.ndarray)):
                object.__setattr__(self, f.name, tuple(
                    tuple(float(x) for x in v) if np.ndim(v) else float(v) for v in val))
        probs = np.asarray(self.regime_probs, dtype=float)
        if probs.shape != (12, 3) or (probs < 0).any() or not np.allclose(probs.sum(1), 1, atol=1e-6):
            raise SpecError("climate.regime_probs", "need 12 rows of 3 probabilities summing to 1")
        if len(self.wind_monthly_mean_m_per_s) != 12 or min(self.wind_monthly_mean_m_per_s) < 0:
            raise SpecError("climate.wind_monthly_mean_m_per_s", "need 12 non-negative values")
        for name in ("regime_persistence", "t_anomaly_ar1", "kc_ar1_per_step"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SpecError(f"climate.{name}", "must be in [0, 1)")
        for f in fields(self):
            val = getattr(self, f.name)
            flat = np.ravel(np.asarray(val, dtype=float))
            if not np.isfinite(flat).all():
                raise SpecError(f"climate.{f.name}", "must be finite")
            non_negative = ("regime_kc", "t_anomaly_sd", "t_diurnal", "wind_", "regime_diurnal")
            if f.name.startswith(non_negative) and (flat < 0).any():
                raise SpecError(f"climate.{f.name}", "must be non-negative")
        if not 0.0 < self.t_max_hours_after_solar_noon < 11.0:
            raise SpecError("climate.t_max_hours_after_solar_noon", "must be in (0, 11) h")


BEIJING = Climate()


def validate_index(index: object, field: str = "index") -> pd.DatetimeIndex:
    """Check that ``index`` is a tz-aware, regular 15-minute grid.

    Parameters
    ----------
    index : object
        Candidate index; must be a non-empty, tz-aware ``pd.DatetimeIndex`` whose
        steps are exactly 15 min and whose timestamps sit on :00/:15/:30/:45.
    field : str
        Name reported in the ``SpecError``.

    Returns
    -------
    pd.DatetimeIndex
        The same index.

    Raises
    ------
    SpecError
        If any of the conditions above fails.
    """
    if not isinstance(index, pd.DatetimeIndex):
        raise SpecError(field, f"must be a pandas DatetimeIndex, got {type(index).__name__}")
    if index.tz is None:
        raise SpecError(field, "must be tz-aware (e.g. tz='Asia/Shanghai')")
    if len(index) == 0:
        raise SpecError(field, "must not be empty")
    secs = _epoch_seconds(index)
    if (secs % 900 != 0).any():
        raise SpecError(field, "timestamps must lie on the 15-minute grid")
    if len(index) > 1 and (np.diff(secs) != 900).any():
        raise SpecError(field, "must be regular with 15-minute steps, sorted, no gaps")
    return index


def load_period_index(start: str | pd.Timestamp, days: int, tz: str) -> pd.DatetimeIndex:
    """15-minute tz-aware index covering ``days`` whole local days.

    Parameters
    ----------
    start : str or pd.Timestamp
        Any moment of the first day; a naive value is read as local time in ``tz``,
        an aware one is converted to ``tz``.  The index starts at local midnight.
    days : int
        Number of local calendar days, >= 1.
    tz : str
        IANA time zone, e.g. ``"Asia/Shanghai"``.

    Returns
    -------
    pd.DatetimeIndex
        Steps of 15 min from local midnight of ``start`` up to (excluding) local
        midnight ``days`` later; DST days have 92 or 100 steps.
    """
    if isinstance(days, bool) or not isinstance(days, (int, np.integer)) or days < 1:
        raise SpecError("days", f"must be an integer >= 1, got {days!r}")
    try:
        pd.Timestamp("2000-01-01").tz_localize(tz)
    except Exception as exc:  # pytz/zoneinfo raise various types for unknown zones
        raise SpecError("tz", f"unknown time zone {tz!r}") from exc
    try:
        ts = pd.Timestamp(start)
        ts = ts.tz_localize(tz) if ts.tzinfo is None else ts.tz_convert(tz)
    except (ValueError, TypeError) as exc:
        raise SpecError("start", str(exc)) from exc
    day0 = ts.date()
    first = pd.Timestamp(day0).tz_localize(tz, nonexistent="shift_forward", ambiguous=False)
    last = pd.Timestamp(day0 + dt.timedelta(days=int(days))).tz_localize(
        tz, nonexistent="shift_forward", ambiguous=False)
    return pd.date_range(first, last, freq=STEP, inclusive="left")


def _epoch_seconds(index: pd.DatetimeIndex) -> np.ndarray:
    """Seconds since 1970-01-01 UTC (int64), independent of the index unit."""
    naive = index.tz_convert("UTC").tz_localize(None) if index.tz is not None else index
    return naive.values.astype("datetime64[s]").astype(np.int64)


def ar1_rows(shocks: np.ndarray, start: np.ndarray, phi: float) -> np.ndarray:
    """Unit-variance AR(1) along axis 1: x_j = phi x_{j-1} + sqrt(1-phi^2) e_j."""
    zi = (phi * start)[:, None]
    return lfilter([np.sqrt(1.0 - phi * phi)], [1.0, -phi], shocks, axis=1, zi=zi)[0]


def _day_shocks(seed: int, year: int, stream: int) -> np.ndarray:
    return np.random.default_rng([seed, year, stream]).standard_normal(_N_DAY_SLOTS)


def _smooth_daily(seed: int, year: int, stream: int, phi: float) -> np.ndarray:
    """Unit-variance AR(1) day series for one year, continuous across New Year.

    Written as a truncated moving average of shocks so that it is a pure function
    of (seed, date): the tail reaches back into the previous year's shocks.
    """
    n_prev = 366 if calendar.isleap(year - 1) else 365
    prev = _day_shocks(seed, year - 1, stream)[n_prev - _AR_TAIL_DAYS:n_prev]
    e = np.concatenate([prev, _day_shocks(seed, year, stream)])
    kernel = np.sqrt(1.0 - phi * phi) * phi ** np.arange(_AR_TAIL_DAYS + 1)
    return np.convolve(e, kernel)[_AR_TAIL_DAYS:_AR_TAIL_DAYS + _N_DAY_SLOTS]


@functools.lru_cache(maxsize=32)
def _year_state(year: int, seed: int, climate: Climate) -> dict[str, np.ndarray]:
    """All random draws of one (solar) year, indexed [day_of_year0] or [day, step]."""
    c = climate
    months = (np.datetime64(f"{year}-01-01") + np.arange(_N_DAY_SLOTS)).astype("datetime64[M]")
    month0 = (months.astype(int) % 12)
    cum = np.cumsum(np.asarray(c.regime_probs), axis=1)[month0]
    u = np.random.default_rng([seed, year, 1]).random((_N_DAY_SLOTS, 2))
    regime = np.empty(_N_DAY_SLOTS, dtype=int)
    for d in range(_N_DAY_SLOTS):
        if d > 0 and u[d, 0] < c.regime_persistence:
            regime[d] = regime[d - 1]
        else:
            regime[d] = min(int(np.searchsorted(cum[d], u[d, 1], side="right")), 2)
    rng = np.random.default_rng([seed, year, 2])
    kc_day = (np.asarray(c.regime_kc_mean)[regime]
              + np.asarray(c.regime_kc_sd_day)[regime] * rng.standard_normal(_N_DAY_SLOTS))
    kc_ar = ar1_rows(rng.standard_normal((_N_DAY_SLOTS, 96)), rng.standard_normal(_N_DAY_SLOTS),
                      c.kc_ar1_per_step)
    kc_sd = np.asarray(c.regime_kc_sd_step)[regime][:, None]
    kc = np.clip(kc_day[:, None] + kc_sd * kc_ar, 0.03, 1.1)
    rng = np.random.default_rng([seed, year, 5])
    wind_ar = ar1_rows(rng.standard_normal((_N_DAY_SLOTS, 96)), rng.standard_normal(_N_DAY_SLOTS), 0.8)
    return {
        "kc": kc,
        "t_anom_k": c.t_anomaly_sd_k * _smooth_daily(seed, year, 3, c.t_anomaly_ar1),
        "dtr_k": c.t_diurnal_range_k * np.asarray(c.regime_diurnal_range_factor)[regime],
        "wind_log": c.wind_day_sd_log * _smooth_daily(seed, year, 4, 0.6),
        "wind_ar": wind_ar,
    }


def _daily_values(day_num: np.ndarray, key: str, seed: int, climate: Climate) -> np.ndarray:
    """Look up a per-day quantity for days given as days since 1970-01-01 (solar)."""
    days = day_num.astype("datetime64[D]")
    years = days.astype("datetime64[Y]").astype(int) + 1970
    out = np.empty(len(day_num))
    for y in np.unique(years):
        sel = years == y
        doy0 = (days[sel] - np.datetime64(f"{y}-01-01")).astype(int)
        out[sel] = _year_state(int(y), seed, climate)[key][doy0]
    return out


def _interp_daily(day_num, hour, key, seed, climate) -> np.ndarray:
    """Daily value attached to solar noon, linearly interpolated in between."""
    own = _daily_values(day_num, key, seed, climate)
    nb = _daily_values(day_num + np.where(hour >= 12.0, 1, -1), key, seed, climate)
    w = np.abs(hour - 12.0) / 24.0
    return (1.0 - w) * own + w * nb


def synthetic_weather(index: pd.DatetimeIndex, latitude_deg: float, longitude_deg: float,
                      altitude_m: float = 50.0, seed: int = 0,
                      climate: Climate | None = None) -> pd.DataFrame:
    """Seeded synthetic weather on a 15-minute grid.

    Parameters
    ----------
    index : pd.DatetimeIndex
        Tz-aware, regular 15-minute index.  Values are means over ``[t, t+15 min)``
        (solar geometry is evaluated at the interval midpoint).
    latitude_deg, longitude_deg : float
        Site position in degrees (north, east positive).
    altitude_m : float
        Site altitude above sea level in m.
    seed : int
        Non-negative seed; same seed gives the same numbers for any window.
    climate : Climate, optional
        Climate parameters; Beijing (``BEIJING``) by default.

    Returns
    -------
    pd.DataFrame
        On ``index``: ``ghi_w_per_m2``, ``dni_w_per_m2``, ``dhi_w_per_m2`` (W/m2),
        ``temp_air_c`` (degC), ``wind_speed_m_per_s`` (m/s at 10 m) and
        ``clear_sky_index`` (GHI / Ineichen clear-sky GHI, 0.03..1.1).
    """
    validate_index(index)
    climate = BEIJING if climate is None else climate
    if not isinstance(climate, Climate):
        raise SpecError("climate", "must be a vpp.weather.Climate")
    if not -90.0 <= float(latitude_deg) <= 90.0:
        raise SpecError("latitude_deg", f"must be in [-90, 90], got {latitude_deg}")
    if not -180.0 <= float(longitude_deg) <= 180.0:
        raise SpecError("longitude_deg", f"must be in [-180, 180], got {longitude_deg}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError("seed", f"must be a non-negative integer, got {seed!r}")
    seed = int(seed)

    # Local mean solar time: day number, hour of day and 15-min slot.
    sol_s = _epoch_seconds(index) + float(longitude_deg) * 240.0
    day_num = np.floor(sol_s / 86400.0).astype(np.int64)
    hour = (sol_s - day_num * 86400.0) / 3600.0
    slot = np.clip(np.floor(hour * 4.0).astype(int), 0, 95)
    days = day_num.astype("datetime64[D]")
    years = days.astype("datetime64[Y]").astype(int) + 1970
    doy0 = (days - days.astype("datetime64[Y]").astype("datetime64[D]")).astype(int)

    # Irradiance: clear sky x stochastic clear-sky index, Erbs split.
    kc = np.empty(len(index))
    wind_ar = np.empty(len(index))
    for y in np.unique(years):
        sel = years == y
        state = _year_state(int(y), seed, climate)
        kc[sel] = state["kc"][doy0[sel], slot[sel]]
        wind_ar[sel] = state["wind_ar"][doy0[sel], slot[sel]]
    loc = pvlib.location.Location(latitude_deg, longitude_deg, "UTC", altitude_m)
    mid = index.tz_convert("UTC") + STEP / 2  # pvlib day-of-year lookups in UTC
    solpos = loc.get_solarposition(mid)
    try:
        cs = loc.get_clearsky(mid, model="ineichen", solar_position=solpos)
    except (OSError, ImportError, KeyError, ValueError):  # turbidity file unavailable
        cs = loc.get_clearsky(mid, model="simplified_solis", solar_position=solpos)
    cs_ghi = np.nan_to_num(cs["ghi"].to_numpy(float)).clip(min=0.0)
    ghi = kc * cs_ghi
    zenith = solpos["zenith"].to_numpy(float)
    erbs = pvlib.irradiance.erbs(ghi, zenith, mid.dayofyear.to_numpy())
    dni = np.nan_to_num(np.asarray(erbs["dni"], dtype=float)).clip(min=0.0)
    cosz = np.cos(np.radians(zenith)).clip(min=0.0)
    dhi = (ghi - dni * cosz).clip(min=0.0)  # closure GHI = DNI cos z + DHI

    # Temperature: annual sinusoid + day anomaly + diurnal two-half-cosine cycle.
    c = climate
    t_days = day_num - _EPOCH_2000_DAYS + hour / 24.0
    phase = 2 * np.pi * (t_days - c.t_coldest_day_of_year) / 365.2425
    t_season = (c.t_annual_mean_c - c.t_annual_amplitude_k * np.cos(phase)
                - c.t_semiannual_amplitude_k * np.cos(2 * phase))
    decl = np.radians(23.44) * np.sin(2 * np.pi * (284 + doy0 + 1) / 365.0)
    cos_w0 = np.clip(-np.tan(np.radians(latitude_deg)) * np.tan(decl), -1.0, 1.0)
    t_max_h = 12.0 + c.t_max_hours_after_solar_noon
    sunrise_h = np.clip(12.0 - np.degrees(np.arccos(cos_w0)) / 15.0, 1.0, t_max_h - 1.0)
    rising = (hour >= sunrise_h) & (hour < t_max_h)
    h_fall = np.where(hour < sunrise_h, hour + 24.0, hour)
    shape = np.where(
        rising,
        -np.cos(np.pi * (hour - sunrise_h) / (t_max_h - sunrise_h)),
        np.cos(np.pi * (h_fall - t_max_h) / (sunrise_h + 24.0 - t_max_h)))
    anom = _interp_daily(day_num, hour, "t_anom_k", seed, c)
    dtr = _interp_daily(day_num, hour, "dtr_k", seed, c)
    temp = t_season + anom + 0.5 * dtr * shape

    # Wind: monthly climatology x log-normal day factor x afternoon peak x gusts.
    month_mid = 15.2 + 30.44 * np.arange(12)
    doy_frac = doy0 + hour / 24.0
    w_clim = np.interp(doy_frac, month_mid, np.asarray(c.wind_monthly_mean_m_per_s), period=365.25)
    w_day = np.exp(_interp_daily(day_num, hour, "wind_log", seed, c) - 0.5 * c.wind_day_sd_log ** 2)
    w_diur = 1.0 + c.wind_diurnal_amplitude * np.cos(2 * np.pi * (hour - 14.0) / 24.0)
    wind = (w_clim * w_day * w_diur * (1.0 + 0.2 * wind_ar)).clip(min=0.0)

    return pd.DataFrame({
        "ghi_w_per_m2": ghi, "dni_w_per_m2": dni, "dhi_w_per_m2": dhi,
        "temp_air_c": temp, "wind_speed_m_per_s": wind, "clear_sky_index": kc,
    }, index=index)
