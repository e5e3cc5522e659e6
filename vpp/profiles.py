"""Seeded synthetic demand profiles: building electricity, space heat, EV sessions.

Building loads are standard-load-profile style shapes (hourly control points,
linearly interpolated, values are fractions of the peak) distinguished by working
day / day off, in the spirit of the BDEW/VDEW standard load profiles and Chinese
public-building metering studies, with small seeded multiplicative noise.  Heat
demand is the degree-day (heating-curve) model of building design practice with
the Beijing design temperature -7.6 C (GB 50736-2012) and the official Beijing
heating season 15 Nov - 15 Mar.  EV sessions follow the usual workplace/public
charging patterns (arrival peaks, dwell times, energy per session) reported in
charging-data studies; vehicle acceptance limits come from a few vehicle classes.

All random numbers come from generators keyed by ``(seed, ..., date)``, so the
value at a timestamp (or the sessions of a day) never depends on the requested
window.  Times of day are read in the time zone of ``index`` (the park's local time).
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from vpp.errors import SpecError
from vpp.weather import STEP, validate_index

_SPRING_FESTIVAL_FIRST_DAY = {
    2024: dt.date(2024, 2, 10), 2025: dt.date(2025, 1, 29),
    2026: dt.date(2026, 2, 17), 2027: dt.date(2027, 2, 6),
}

# (hour, fraction of peak) control points; day = (working day, day off).
_SHAPES = {
    "office": (
        [(0, .25), (6, .25), (7, .32), (8, .65), (9, .93), (11.5, .98), (12, .86), (13, .86),
         (13.5, .97), (17, .97), (18, .85), (19, .50), (20, .35), (22, .28), (24, .25)],
        [(0, .25), (8, .25), (9, .30), (17, .30), (18, .26), (24, .25)]),
    "lab": (
        [(0, .55), (7, .56), (8, .70), (9, .95), (12, 1.0), (12.5, .92), (13.5, .97), (17, .97),
         (18.5, .75), (20, .62), (24, .55)],
        [(0, .57), (9, .58), (10, .63), (16, .63), (17, .58), (24, .57)]),
    "residential": (
        [(0, .35), (3, .28), (5, .30), (6.5, .55), (7.5, .70), (8.5, .55), (10, .40), (12, .45),
         (13, .42), (16, .45), (18, .75), (19.5, 1.0), (21, .95), (22.5, .70), (24, .35)],
        [(0, .38), (3, .30), (7, .32), (9, .62), (10.5, .70), (12, .62), (14, .55), (17, .62),
         (18.5, .85), (19.5, 1.0), (21, .97), (22.5, .72), (24, .38)]),
}
_KIND_CODE = {"office": 1, "lab": 2, "residential": 3, "workplace": 11, "public": 12}
_AC_CLASSES = ((7.0, 0.6), (11.0, 0.4))  # car on-board charger kW, share
_DC_CLASSES = ((60.0, 0.25), (100.0, 0.35), (150.0, 0.25), (250.0, 0.15))
_AC_MAX_RATING_KW = 22.0


def china_holidays(year: int) -> frozenset[dt.date]:
    """Main statutory days off in mainland China for one year.

    Fixed holidays New Year (1 Jan), Labour Day (1-5 May), National Day (1-7 Oct),
    plus the Spring Festival week (7 days from the first day off) for 2024-2027 from
    the State Council schedules.  Other lunar holidays (Qingming, Dragon Boat,
    Mid-Autumn) and weekend make-up working days are not modelled.

    Parameters
    ----------
    year : int
        Calendar year.

    Returns
    -------
    frozenset of datetime.date
        The days off; outside 2024-2027 only the fixed ones.
    """
    days = {dt.date(year, 1, 1)}
    days.update(dt.date(year, 5, d) for d in range(1, 6))
    days.update(dt.date(year, 10, d) for d in range(1, 8))
    first = _SPRING_FESTIVAL_FIRST_DAY.get(year)
    if first is not None:
        days.update(first + dt.timedelta(days=k) for k in range(7))
    return frozenset(days)


def _local_time(index: pd.DatetimeIndex, holidays: Iterable[dt.date] | None):
    """Local dates, hour of interval midpoint (0..24) and day-off mask."""
    mid = index + STEP / 2
    hour = (mid.hour + mid.minute / 60.0).to_numpy(float)
    dates = np.asarray(index.date)
    if holidays is None:
        hol = set().union(*(china_holidays(y) for y in range(dates[0].year, dates[-1].year + 1)))
    else:
        hol = set(holidays)
    off = (index.dayofweek.to_numpy() >= 5) | np.fromiter((d in hol for d in dates), bool, len(dates))
    return dates, hour, off


def _seed_ok(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError("seed", f"must be a non-negative integer, got {seed!r}")
    return int(seed)


def building_load_kw(index: pd.DatetimeIndex, peak_kw: float, kind: str = "office", seed: int = 0,
                     holidays: Iterable[dt.date] | None = None) -> np.ndarray:
    """Electric consumption of a building in kW (positive magnitudes).

    Parameters
    ----------
    index : pd.DatetimeIndex
        Tz-aware, regular 15-minute index in the park's local time zone.
    peak_kw : float
        Typical working-day peak in kW; the profile stays within ~1.06 * peak_kw.
    kind : {"office", "lab", "residential"}
        Office: night base ~25 % of peak, ramp 7-9 h, plateau 9-18 h with a lunch
        dip, ~25-30 % on days off.  Lab: base ~55 % (ventilation, freezers), smaller
        day bump, ~60 % on days off.  Residential: morning and evening peaks.
    seed : int
        Non-negative seed of the noise (a day-level factor, sd 3 %, and an AR(1)
        15-minute fluctuation, sd 3 %).
    holidays : iterable of datetime.date, optional
        Days off besides weekends; default ``china_holidays`` of the covered years.

    Returns
    -------
    np.ndarray
        Load in kW on ``index``, >= 0.
    """
    validate_index(index)
    if kind not in ("office", "lab", "residential"):
        raise SpecError("kind", f"must be 'office', 'lab' or 'residential', got {kind!r}")
    if not np.isfinite(peak_kw) or peak_kw < 0:
        raise SpecError("peak_kw", f"must be finite and >= 0, got {peak_kw!r}")
    seed = _seed_ok(seed)
    dates, hour, off = _local_time(index, holidays)
    work_pts, off_pts = (np.asarray(p, dtype=float) for p in _SHAPES[kind])
    shape = np.where(off, np.interp(hour, off_pts[:, 0], off_pts[:, 1]),
                     np.interp(hour, work_pts[:, 0], work_pts[:, 1]))
    slot = np.clip((np.floor(((index.hour + index.minute / 60.0).to_numpy(float)) * 4)).astype(int), 0, 95)
    noise = np.empty(len(index))
    phi = 0.9
    for day in np.unique(dates):
        sel = dates == day
        rng = np.random.default_rng([seed, _KIND_CODE[kind], day.toordinal()])
        e = rng.standard_normal(97)
        ar = lfilter([np.sqrt(1 - phi * phi)], [1.0, -phi], e[1:], zi=[phi * e[0]])[0]
        noise[sel] = 0.03 * rng.standard_normal() + 0.03 * ar[slot[sel]]
    return np.clip(peak_kw * shape * (1.0 + noise), 0.0, 1.06 * peak_kw)


def heat_demand_kw_th(index: pd.DatetimeIndex, temp_air_c: np.ndarray, design_heat_kw_th: float,
                      design_temp_c: float = -7.6, heating_limit_c: float = 15.0,
                      indoor_c: float = 20.0,
                      season: tuple[tuple[int, int], tuple[int, int]] = ((11, 15), (3, 15)),
                      occupancy_kind: str = "office",
                      holidays: Iterable[dt.date] | None = None) -> np.ndarray:
    """Space-heating demand in kW_th from a degree-day (heating-curve) model.

    ``demand = design_heat_kw_th * clip((indoor_c - T) / (indoor_c - design_temp_c),
    0, 1.3) * occupancy`` while ``T < heating_limit_c`` and the local date lies in the
    heating season (inclusive, may wrap the year end), else 0.  The default design
    temperature -7.6 C is Beijing's heating design value (GB 50736-2012); the default
    season is Beijing's official 15 Nov - 15 Mar.

    Parameters
    ----------
    index : pd.DatetimeIndex
        Tz-aware, regular 15-minute index in the park's local time zone.
    temp_air_c : array-like
        Outdoor air temperature in degC on ``index``.
    design_heat_kw_th : float
        Heat load in kW_th at ``design_temp_c`` (>= 0).
    design_temp_c, heating_limit_c, indoor_c : float
        Design outdoor temperature, heating limit and indoor set point in degC.
    season : ((month, day), (month, day))
        First and last day of the heating season.
    occupancy_kind : {"office", "lab", "residential"}
        Office: night/day-off setback 0.7, morning preheat 1.25 (5-8 h), 1.0 in
        office hours; lab and residential: 1.0 around the clock.
    holidays : iterable of datetime.date, optional
        Office days off besides weekends; default ``china_holidays``.

    Returns
    -------
    np.ndarray
        Heat demand in kW_th, >= 0, non-increasing in temperature at a fixed time.
    """
    validate_index(index)
    temp = np.asarray(temp_air_c, dtype=float)
    if temp.shape != (len(index),) or not np.isfinite(temp).all():
        raise SpecError("temp_air_c", f"need {len(index)} finite values, got shape {temp.shape}")
    if not np.isfinite(design_heat_kw_th) or design_heat_kw_th < 0:
        raise SpecError("design_heat_kw_th", f"must be finite and >= 0, got {design_heat_kw_th!r}")
    if not indoor_c > design_temp_c:
        raise SpecError("design_temp_c", "must be below indoor_c")
    if occupancy_kind not in ("office", "lab", "residential"):
        raise SpecError("occupancy_kind", f"must be 'office', 'lab' or 'residential', got {occupancy_kind!r}")
    try:
        (m0, d0), (m1, d1) = season
        dt.date(2024, m0, d0), dt.date(2024, m1, d1)
    except (TypeError, ValueError) as exc:
        raise SpecError("season", f"need ((month, day), (month, day)): {exc}") from exc
    md = index.month.to_numpy() * 100 + index.day.to_numpy()
    first, last = m0 * 100 + d0, m1 * 100 + d1
    in_season = (md >= first) & (md <= last) if first <= last else (md >= first) | (md <= last)
    ratio = np.clip((indoor_c - temp) / (indoor_c - design_temp_c), 0.0, 1.3)
    demand = design_heat_kw_th * ratio * (in_season & (temp < heating_limit_c))
    if occupancy_kind == "office":
        _, hour, off = _local_time(index, holidays)
        occ = np.select([hour < 5, hour < 8, hour < 18], [0.7, 1.25, 1.0], 0.7)
        demand = demand * np.where(off, 0.7, occ)
    return demand


def _draw_class(rng: np.random.Generator, classes) -> float:
    kw, p = zip(*classes)
    return float(rng.choice(kw, p=p))


def _day_requests(rng, ac: bool, kind: str, off: bool) -> list[tuple[float, float, float]]:
    """Wanted (arrival hour, stay hours, energy kWh) for one charger-day, unsorted."""
    if ac and kind == "workplace":
        if rng.random() >= (0.1 if off else 0.85):
            return []
        return [(rng.triangular(7.5, 8.5, 10.0), rng.uniform(6, 10), rng.uniform(10, 40))]
    if ac:  # public AC: short shopping/visit stays
        n = rng.poisson(3.0)
        return [(rng.uniform(8, 21), rng.uniform(1, 4), rng.uniform(5, 30)) for _ in range(n)]
    n = rng.poisson(3.0 if off and kind == "workplace" else 6.0)
    out = []
    for _ in range(n):
        u = rng.random()
        hour = rng.normal(12.5, 1.0) if u < 0.4 else rng.normal(18.0, 1.0) if u < 0.8 else rng.uniform(7, 23)
        out.append((float(np.clip(hour, 7, 23)), rng.uniform(20, 60) / 60, rng.uniform(20, 70)))
    return out


def ev_sessions(index: pd.DatetimeIndex, chargers: Sequence[tuple[str, float]], seed: int = 0,
                kind: str = "workplace", holidays: Iterable[dt.date] | None = None) -> pd.DataFrame:
    """Synthetic EV charging sessions whose arrival falls inside ``index``.

    Parameters
    ----------
    index : pd.DatetimeIndex
        Tz-aware, regular 15-minute index in the park's local time zone.
    chargers : sequence of (charger_id, rating_kw)
        Ratings <= 22 kW are AC chargers (car limit 7 or 11 kW), larger ones DC
        fast chargers (car limit 60/100/150/250 kW by vehicle class).
    seed : int
        Non-negative seed; sessions of a day depend only on (seed, charger, day).
    kind : {"workplace", "public"}
        Workplace AC: one session on ~85 % of working days (10 % of days off),
        arrival 7:30-10:00, stay 6-10 h, 10-40 kWh.  Public AC: ~3 sessions a day,
        arrival 8-21 h, stay 1-4 h, 5-30 kWh.  DC: Poisson ~6 arrivals a day (3 on
        workplace days off), peaks at 12:30 and 18:00 plus a uniform 7-23 h share,
        stay 20-60 min, 20-70 kWh; a car that would wait > 45 min leaves.
    holidays : iterable of datetime.date, optional
        Days off besides weekends; default ``china_holidays``.

    Returns
    -------
    pd.DataFrame
        Columns ``session_id`` (``f"{charger_id}-{YYYYmmddHHMM}"`` of local arrival),
        ``charger_id``, ``arrival``, ``departure`` (tz-aware, on the 15-min grid,
        departure > arrival, at most 23:45 local of the arrival day, possibly after
        the end of ``index``), ``energy_kwh`` (requested, <= 0.95 * max_kw * stay h)
        and ``max_kw`` (vehicle acceptance limit, <= rating).  Sessions on a
        charger never overlap and leave at least one free 15-min step between them.
    """
    validate_index(index)
    if kind not in ("workplace", "public"):
        raise SpecError("kind", f"must be 'workplace' or 'public', got {kind!r}")
    seed = _seed_ok(seed)
    seen: set[str] = set()
    for i, item in enumerate(chargers):
        try:
            cid, rating = item
            rating = float(rating)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"chargers[{i}]", f"need (charger_id, rating_kw): {exc}") from exc
        if not isinstance(cid, str) or not cid or cid in seen:
            raise SpecError(f"chargers[{i}]", f"charger_id must be a unique non-empty str, got {cid!r}")
        if not np.isfinite(rating) or rating <= 0:
            raise SpecError(f"chargers[{i}]", f"rating_kw must be > 0, got {rating!r}")
        seen.add(cid)
    dates, _, off = _local_time(index, holidays)
    day_off = dict(zip(dates, off))
    t_first, t_last = index[0], index[-1]
    rows = []
    for cid, rating in chargers:
        rating, ac = float(rating), float(rating) <= _AC_MAX_RATING_KW
        key = zlib.crc32(cid.encode())
        for day in sorted(day_off):
            rng = np.random.default_rng([seed, _KIND_CODE[kind], key, day.toordinal()])
            reqs = sorted(_day_requests(rng, ac, kind, bool(day_off[day])))
            midnight = pd.Timestamp(day).tz_localize(index.tz, nonexistent="shift_forward", ambiguous=False)
            free_step, last_dep_step = 0, 95
            for hour, stay_h, energy in reqs:
                want = int(round(hour * 4))
                arr = max(want, free_step)
                stay = max(1, int(round(stay_h * 4)))
                if arr - want > 3 or arr + stay > last_dep_step:
                    continue
                max_kw = min(rating, _draw_class(rng, _AC_CLASSES if ac else _DC_CLASSES))
                arrival = midnight + arr * STEP
                free_step = arr + stay + 1
                if not t_first <= arrival <= t_last:
                    continue
                rows.append({
                    "session_id": f"{cid}-{arrival:%Y%m%d%H%M}", "charger_id": cid,
                    "arrival": arrival, "departure": midnight + (arr + stay) * STEP,
                    "energy_kwh": float(min(energy, 0.95 * max_kw * stay / 4)), "max_kw": max_kw,
                })
    cols = ["session_id", "charger_id", "arrival", "departure", "energy_kwh", "max_kw"]
    out = pd.DataFrame(rows, columns=cols)
    tz_dtype = pd.DatetimeTZDtype("ns", index.tz)
    out = out.astype({"session_id": object, "charger_id": object, "arrival": tz_dtype,
                      "departure": tz_dtype, "energy_kwh": float, "max_kw": float})
    return out.sort_values(["arrival", "charger_id"], kind="stable").reset_index(drop=True)
