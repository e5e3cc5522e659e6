"""Properties of vpp.profiles: building loads, heat demand, EV sessions."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpp.errors import SpecError
from vpp.profiles import building_load_kw, china_holidays, ev_sessions, heat_demand_kw_th
from vpp.weather import load_period_index, synthetic_weather

TZ = "Asia/Shanghai"
CHARGERS = [("ac-1", 7.0), ("ac-2", 11.0), ("ac-3", 22.0), ("dc-1", 120.0), ("dc-2", 480.0), ("dc-3", 40.0)]


@pytest.fixture(scope="module")
def year_idx():
    return load_period_index("2025-01-01", 365, TZ)


def at(idx, values, when):
    return pd.Series(values, idx).loc[when]


# ---------------------------------------------------------------- holidays

def test_china_holidays_2025():
    h = china_holidays(2025)
    assert dt.date(2025, 1, 1) in h and dt.date(2025, 5, 5) in h and dt.date(2025, 10, 7) in h
    assert {dt.date(2025, 1, 29) + dt.timedelta(days=k) for k in range(7)} <= h
    assert dt.date(2025, 2, 5) not in h and dt.date(2025, 10, 8) not in h
    assert len(h) == 20
    assert dt.date(2026, 2, 17) in china_holidays(2026)
    assert len(china_holidays(2030)) == 13  # no Spring Festival table entry


# ---------------------------------------------------------------- building load

@pytest.mark.parametrize("kind", ["office", "lab", "residential"])
def test_load_non_negative_and_about_peak(year_idx, kind):
    load = building_load_kw(year_idx, 200.0, kind, seed=1)
    assert load.shape == (len(year_idx),)
    assert (load >= 0).all()
    assert 0.9 * 200 <= load.max() <= 1.1 * 200


def test_office_weekday_above_weekend_and_holiday(year_idx):
    s = pd.Series(building_load_kw(year_idx, 100.0, "office"), year_idx)
    weekday = s.loc["2025-03-05"].between_time("10:00", "16:00").mean()  # Wednesday
    weekend = s.loc["2025-03-08"].between_time("10:00", "16:00").mean()  # Saturday
    holiday = s.loc["2025-10-01"].between_time("10:00", "16:00").mean()  # Wednesday, National Day
    assert weekday > 80 and weekend < 40 and holiday < 40
    night = s.between_time("02:00", "04:00").mean()
    assert 15 <= night <= 35  # ~25 % base
    assert s.loc["2025-03-05 09:30"] > s.loc["2025-03-05 06:30"] + 50  # morning ramp


def test_holidays_can_be_overridden(year_idx):
    s = pd.Series(building_load_kw(year_idx, 100.0, "office", holidays=[dt.date(2025, 3, 5)]), year_idx)
    assert s.loc["2025-10-01"].between_time("10:00", "16:00").mean() > 80  # no longer a holiday
    assert s.loc["2025-03-05"].between_time("10:00", "16:00").mean() < 40  # company day off


def test_load_noise_differs_between_days(year_idx):
    s = pd.Series(building_load_kw(year_idx, 100.0, "lab", seed=0), year_idx)
    a, b = s.loc["2025-03-04"].to_numpy(), s.loc["2025-03-05"].to_numpy()
    assert not np.allclose(a, b)
    assert np.abs(a - b).max() < 20  # small noise only


def test_lab_has_high_base(year_idx):
    s = pd.Series(building_load_kw(year_idx, 100.0, "lab"), year_idx)
    assert 45 <= s.between_time("02:00", "04:00").mean() <= 65
    weekend = s[s.index.dayofweek >= 5]
    assert 50 <= weekend.mean() <= 70
    weekday_noon = s[s.index.dayofweek < 5].between_time("10:00", "16:00").mean()
    assert weekday_noon > weekend.mean() + 15


def test_residential_morning_and_evening_peaks(year_idx):
    s = pd.Series(building_load_kw(year_idx, 100.0, "residential"), year_idx)
    by_hour = s.groupby(s.index.hour).mean()
    assert by_hour.idxmax() in (19, 20, 21)
    assert by_hour[7] > by_hour[3] + 15 and by_hour[7] > by_hour[10]


def test_load_deterministic_and_window_independent(year_idx):
    year = building_load_kw(year_idx, 100.0, "office", seed=4)
    day_idx = load_period_index("2025-03-05", 1, TZ)
    np.testing.assert_array_equal(building_load_kw(day_idx, 100.0, "office", seed=4), at(year_idx, year, day_idx))
    np.testing.assert_array_equal(year, building_load_kw(year_idx, 100.0, "office", seed=4))
    assert not np.allclose(year, building_load_kw(year_idx, 100.0, "office", seed=5))


def test_load_rejects_bad_kind_and_naive_index():
    with pytest.raises(SpecError) as err:
        building_load_kw(load_period_index("2025-01-01", 1, TZ), 100.0, kind="factory")
    assert err.value.field == "kind"
    with pytest.raises(SpecError) as err:
        building_load_kw(pd.date_range("2025-01-01", periods=96, freq="15min"), 100.0)
    assert err.value.field == "index"


# ---------------------------------------------------------------- heat demand

def test_heat_zero_in_july_even_if_cold():
    idx = load_period_index("2025-07-15", 1, TZ)
    assert (heat_demand_kw_th(idx, np.full(96, -5.0), 500.0) == 0).all()


def test_heat_positive_on_cold_january_day_and_design_point():
    idx = load_period_index("2025-01-15", 1, TZ)  # Wednesday
    q = pd.Series(heat_demand_kw_th(idx, np.full(96, -7.6), 500.0), idx)
    assert (q > 0).all()
    assert q.loc["2025-01-15 10:00"] == pytest.approx(500.0)  # office hours, design temperature
    assert q.loc["2025-01-15 06:00"] > q.loc["2025-01-15 10:00"] > q.loc["2025-01-15 23:00"]  # preheat, setback
    lab = heat_demand_kw_th(idx, np.full(96, -7.6), 500.0, occupancy_kind="lab")
    np.testing.assert_allclose(lab, 500.0)
    assert heat_demand_kw_th(idx, np.full(96, -40.0), 500.0, occupancy_kind="lab").max() <= 1.3 * 500 + 1e-9


def test_heat_season_wraps_year_end():
    idx = load_period_index("2024-11-13", 130, TZ)
    q = pd.Series(heat_demand_kw_th(idx, np.zeros(len(idx)), 100.0, occupancy_kind="lab"), idx)
    daily = q.resample("D").sum()
    on = daily[daily > 0].index
    assert on[0].date() == dt.date(2024, 11, 15) and on[-1].date() == dt.date(2025, 3, 15)
    assert (daily.loc["2024-11-15":"2025-03-15"] > 0).all()
    custom = heat_demand_kw_th(idx, np.zeros(len(idx)), 100.0, season=((12, 1), (12, 31)), occupancy_kind="lab")
    assert pd.Series(custom, idx).loc["2025-01-10"].sum() == 0 and pd.Series(custom, idx).loc["2024-12-10"].sum() > 0


@settings(max_examples=40, deadline=None)
@given(t=st.lists(st.floats(-30, 30), min_size=96, max_size=96), dt_k=st.floats(0, 20),
       kind=st.sampled_from(["office", "lab", "residential"]))
def test_heat_non_negative_and_monotone_in_temperature(t, dt_k, kind):
    idx = load_period_index("2025-01-20", 1, TZ)
    cold = heat_demand_kw_th(idx, np.array(t), 300.0, occupancy_kind=kind)
    warm = heat_demand_kw_th(idx, np.array(t) + dt_k, 300.0, occupancy_kind=kind)
    assert (cold >= 0).all() and (warm >= 0).all()
    assert (warm <= cold + 1e-9).all()
    assert (warm[np.array(t) + dt_k >= 15.0] == 0).all()


def test_heat_with_synthetic_weather_plausible_full_load_hours(year_idx):
    w = synthetic_weather(year_idx, 40.2, 116.2, 50.0, seed=0)
    q = heat_demand_kw_th(year_idx, w["temp_air_c"].to_numpy(), 1000.0)
    full_load_h = q.sum() * 0.25 / 1000.0
    assert 1000 <= full_load_h <= 2500
    assert pd.Series(q, year_idx).loc["2025-06"].sum() == 0


def test_heat_rejects_bad_inputs():
    idx = load_period_index("2025-01-01", 1, TZ)
    for kwargs, field in [({"occupancy_kind": "barn"}, "occupancy_kind"), ({"season": ((13, 1), (3, 15))}, "season")]:
        with pytest.raises(SpecError) as err:
            heat_demand_kw_th(idx, np.zeros(96), 100.0, **kwargs)
        assert err.value.field == field
    with pytest.raises(SpecError) as err:
        heat_demand_kw_th(idx, np.zeros(95), 100.0)
    assert err.value.field == "temp_air_c"


# ---------------------------------------------------------------- EV sessions

def check_sessions(s: pd.DataFrame, idx: pd.DatetimeIndex, chargers) -> None:
    rating = dict(chargers)
    assert list(s.columns) == ["session_id", "charger_id", "arrival", "departure", "energy_kwh", "max_kw"]
    assert s["session_id"].is_unique
    assert (s["departure"] > s["arrival"]).all()
    assert s["arrival"].between(idx[0], idx[-1]).all()
    for col in ("arrival", "departure"):
        assert (s[col].dt.tz_convert("UTC").astype("int64") % (900 * 10**9) == 0).all()
    stay_h = (s["departure"] - s["arrival"]).dt.total_seconds() / 3600
    assert (s["energy_kwh"] > 0).all()
    assert (s["energy_kwh"] <= 0.95 * s["max_kw"] * stay_h + 1e-9).all()
    assert (s["max_kw"] <= s["charger_id"].map(rating)).all() and (s["max_kw"] > 0).all()
    for cid, g in s.groupby("charger_id"):
        g = g.sort_values("arrival")
        gap = g["arrival"].iloc[1:].to_numpy() - g["departure"].iloc[:-1].to_numpy()
        assert (gap >= np.timedelta64(15, "m")).all(), cid


def test_sessions_year_invariants(year_idx):
    s = ev_sessions(year_idx, CHARGERS, seed=3)
    check_sessions(s, year_idx, CHARGERS)
    assert set(s["charger_id"]) == {c for c, _ in CHARGERS}
    ac = s[s["charger_id"].str.startswith("ac")]
    assert set(ac["max_kw"]) <= {7.0, 11.0}
    local = ac["arrival"].dt.tz_convert(TZ)
    hours = local.dt.hour + local.dt.minute / 60
    assert hours.between(7.5, 10.0).all()
    stay_h = (ac["departure"] - ac["arrival"]).dt.total_seconds() / 3600
    assert stay_h.between(6, 10).all()
    dc = s[s["charger_id"].isin(["dc-1", "dc-2"])]
    assert dc["max_kw"].min() >= 60 and dc["max_kw"].max() <= 250
    assert (s.loc[s["charger_id"] == "dc-3", "max_kw"] == 40.0).all()
    dc_hour = dc["arrival"].dt.tz_convert(TZ).dt.hour
    assert dc_hour.between(7, 23).all()
    assert (dc_hour == 12).sum() > 2 * (dc_hour == 8).sum() and (dc_hour == 18).sum() > 2 * (dc_hour == 8).sum()
    sid = s.iloc[0]
    assert sid["session_id"] == f"{sid['charger_id']}-{sid['arrival'].tz_convert(TZ):%Y%m%d%H%M}"


def test_fewer_sessions_on_weekends(year_idx):
    s = ev_sessions(year_idx, CHARGERS, seed=0)
    day = s["arrival"].dt.tz_convert(TZ).dt.normalize()
    per_day = s.groupby(day).size().reindex(pd.date_range("2025-01-01", "2025-12-31", tz=TZ), fill_value=0)
    weekend = per_day.index.dayofweek >= 5
    assert per_day[~weekend].mean() > 1.3 * per_day[weekend].mean()


def test_sessions_deterministic_and_window_independent(year_idx):
    year = ev_sessions(year_idx, CHARGERS, seed=2)
    day_idx = load_period_index("2025-03-05", 1, TZ)
    day = ev_sessions(day_idx, CHARGERS, seed=2)
    assert len(day) > 0
    sliced = year[year["arrival"].between(day_idx[0], day_idx[-1])].reset_index(drop=True)
    pd.testing.assert_frame_equal(day, sliced)
    pd.testing.assert_frame_equal(year, ev_sessions(year_idx, CHARGERS, seed=2))
    other = ev_sessions(load_period_index("2025-03-05", 7, TZ), CHARGERS, seed=9)
    assert not set(other["session_id"]) >= set(day["session_id"])


def test_sessions_vary_from_day_to_day(year_idx):
    s = ev_sessions(year_idx, [("ac-1", 7.0)], seed=0)
    local = s["arrival"].dt.tz_convert(TZ)
    assert (local.dt.hour * 60 + local.dt.minute).nunique() >= 6
    assert s["energy_kwh"].nunique() > 0.9 * len(s)


@settings(max_examples=20, deadline=None)
@given(ratings=st.lists(st.floats(3.0, 480.0), min_size=1, max_size=4), seed=st.integers(0, 10**6),
       kind=st.sampled_from(["workplace", "public"]), start=st.integers(0, 300))
def test_sessions_invariants_hold_for_any_chargers(ratings, seed, kind, start):
    chargers = [(f"c{i}", r) for i, r in enumerate(ratings)]
    idx = load_period_index(pd.Timestamp("2025-01-01") + pd.Timedelta(days=start), 7, TZ)
    check_sessions(ev_sessions(idx, chargers, seed=seed, kind=kind), idx, chargers)


def test_sessions_reject_bad_kind_and_chargers():
    idx = load_period_index("2025-01-01", 1, TZ)
    with pytest.raises(SpecError) as err:
        ev_sessions(idx, CHARGERS, kind="fleet")
    assert err.value.field == "kind"
    with pytest.raises(SpecError) as err:
        ev_sessions(idx, [("a", 7.0), ("a", 11.0)])
    assert err.value.field == "chargers[1]"
    with pytest.raises(SpecError) as err:
        ev_sessions(idx, [("a", 0.0)])
    assert err.value.field == "chargers[0]"
    empty = ev_sessions(idx, [])
    assert list(empty.columns)[:3] == ["session_id", "charger_id", "arrival"] and len(empty) == 0
