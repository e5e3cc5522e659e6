"""Physics and properties of vpp.weather (reference park: Changping, Beijing)."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pvlib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpp.errors import SpecError
from vpp.weather import BEIJING, Climate, load_period_index, synthetic_weather

LAT, LON, ALT, TZ = 40.2, 116.2, 50.0, "Asia/Shanghai"
COLUMNS = ["ghi_w_per_m2", "dni_w_per_m2", "dhi_w_per_m2", "temp_air_c",
           "wind_speed_m_per_s", "clear_sky_index"]


def weather(start, days, seed=0, tz=TZ, climate=None):
    return synthetic_weather(load_period_index(start, days, tz), LAT, LON, ALT, seed=seed, climate=climate)


@pytest.fixture(scope="module")
def year():
    return weather("2025-01-01", 365)


@pytest.fixture(scope="module")
def clearsky(year):
    """Ineichen clear-sky GHI at the start and the end of every interval."""
    loc = pvlib.location.Location(LAT, LON, TZ, ALT)
    a = loc.get_clearsky(year.index)["ghi"].to_numpy()
    b = loc.get_clearsky(year.index + pd.Timedelta(minutes=15))["ghi"].to_numpy()
    return np.maximum(a, b)


# ---------------------------------------------------------------- index helper

def test_load_period_index_starts_at_local_midnight():
    idx = load_period_index("2025-03-05 13:20", 2, TZ)
    assert len(idx) == 192
    assert str(idx.tz) == TZ
    assert idx[0] == pd.Timestamp("2025-03-05 00:00", tz=TZ)
    assert (np.diff(idx.asi8) == 15 * 60 * 10**9).all()
    # an aware start is converted to the zone first: 2025-03-04 20:00 UTC is 04:00 on 5 March
    idx2 = load_period_index(pd.Timestamp("2025-03-04 20:00", tz="UTC"), 1, TZ)
    assert idx2[0] == pd.Timestamp("2025-03-05", tz=TZ)


def test_load_period_index_dst_day_has_92_steps():
    assert len(load_period_index("2025-03-30", 1, "Europe/Berlin")) == 92


@pytest.mark.parametrize("days", [0, -1, 1.5])
def test_load_period_index_rejects_bad_days(days):
    with pytest.raises(SpecError) as err:
        load_period_index("2025-01-01", days, TZ)
    assert err.value.field == "days"


def test_load_period_index_rejects_bad_tz_and_start():
    with pytest.raises(SpecError) as err:
        load_period_index("2025-01-01", 1, "Mars/Olympus")
    assert err.value.field == "tz"
    with pytest.raises(SpecError) as err:
        load_period_index("not a date", 1, TZ)
    assert err.value.field == "start"


# ---------------------------------------------------------------- validation

def test_tz_naive_index_is_rejected():
    idx = pd.date_range("2025-01-01", periods=96, freq="15min")
    with pytest.raises(SpecError) as err:
        synthetic_weather(idx, LAT, LON)
    assert err.value.field == "index"


@pytest.mark.parametrize("idx", [
    pd.date_range("2025-01-01", periods=24, freq="1h", tz=TZ),
    pd.date_range("2025-01-01 00:05", periods=10, freq="15min", tz=TZ),
    pd.DatetimeIndex([], tz=TZ),
])
def test_irregular_or_empty_index_is_rejected(idx):
    with pytest.raises(SpecError) as err:
        synthetic_weather(idx, LAT, LON)
    assert err.value.field == "index"


def test_bad_seed_and_climate_are_rejected():
    idx = load_period_index("2025-01-01", 1, TZ)
    with pytest.raises(SpecError) as err:
        synthetic_weather(idx, LAT, LON, seed=-1)
    assert err.value.field == "seed"
    with pytest.raises(SpecError) as err:
        Climate(regime_probs=((0.5, 0.5, 0.5),) * 12)
    assert err.value.field == "climate.regime_probs"


# ---------------------------------------------------------------- irradiance physics

def test_shape_columns_and_finite(year):
    assert list(year.columns) == COLUMNS
    assert len(year) == 365 * 96
    assert np.isfinite(year.to_numpy()).all()


def test_ghi_zero_at_night_and_positive_at_noon(year):
    hour = year.index.hour
    assert (year.loc[(hour < 4) | (hour >= 21), ["ghi_w_per_m2", "dni_w_per_m2", "dhi_w_per_m2"]] == 0).all().all()
    noon = year.between_time("12:00", "12:14")
    assert (noon["ghi_w_per_m2"] > 20).all()


def test_ghi_zero_when_sun_below_horizon(year):
    loc = pvlib.location.Location(LAT, LON, TZ, ALT)
    elev_a = loc.get_solarposition(year.index)["apparent_elevation"].to_numpy()
    elev_b = loc.get_solarposition(year.index + pd.Timedelta(minutes=15))["apparent_elevation"].to_numpy()
    dark = (elev_a < 0) & (elev_b < 0)
    assert dark.mean() > 0.4
    assert (year["ghi_w_per_m2"].to_numpy()[dark] == 0).all()


def test_ghi_bounded_by_clear_sky(year, clearsky):
    ghi = year["ghi_w_per_m2"].to_numpy()
    assert (ghi >= 0).all()
    assert (ghi <= 1.15 * clearsky + 1e-9).all()
    assert ghi.max() <= 1100
    assert year["clear_sky_index"].between(0, 1.1).all()


def test_beam_diffuse_closure(year):
    loc = pvlib.location.Location(LAT, LON, TZ, ALT)
    zen = loc.get_solarposition(year.index + pd.Timedelta(minutes=7.5))["zenith"].to_numpy()
    cosz = np.clip(np.cos(np.radians(zen)), 0, None)
    ghi, dni, dhi = (year[c].to_numpy() for c in COLUMNS[:3])
    assert (dni >= 0).all() and (dhi >= 0).all() and (dhi <= ghi + 1e-9).all()
    np.testing.assert_allclose(dni * cosz + dhi, ghi, atol=1e-6)
    assert dni.max() < 1100


def test_annual_ghi_plausible_for_beijing(year):
    kwh_per_m2 = year["ghi_w_per_m2"].sum() * 0.25 / 1000
    assert 1300 <= kwh_per_m2 <= 1650
    monthly = year["ghi_w_per_m2"].resample("MS").sum() * 0.25 / 1000
    assert monthly.idxmax().month in (4, 5, 6)
    assert monthly.idxmin().month in (11, 12, 1)


def test_summer_cloudier_than_winter():
    daily = []
    for seed in range(3):
        w = weather("2025-01-01", 365, seed=seed)
        day = w.between_time("10:00", "14:00")["clear_sky_index"]
        daily.append(day.groupby(day.index.month).mean())
    kc = pd.concat(daily, axis=1).mean(axis=1)
    assert kc[[7, 8]].mean() < kc[[12, 1]].mean() - 0.1


# ---------------------------------------------------------------- temperature and wind

def test_monthly_temperatures_like_beijing(year):
    monthly = year["temp_air_c"].groupby(year.index.month).mean()
    assert -6 <= monthly[1] <= 0
    assert 24 <= monthly[7] <= 30
    assert 10 <= year["temp_air_c"].mean() <= 15
    assert monthly.idxmin() in (12, 1, 2) and monthly.idxmax() in (6, 7, 8)


def test_diurnal_cycle_min_near_sunrise_max_afternoon(year):
    by_hour = year["temp_air_c"].groupby(year.index.hour).mean()
    assert by_hour.idxmin() in range(4, 9)
    assert by_hour.idxmax() in range(14, 17)  # ~15:00 local
    swing = year["temp_air_c"].resample("D").agg(lambda s: s.max() - s.min())
    assert 7 <= swing.mean() <= 13


def test_clear_days_have_larger_diurnal_swing(year):
    days = year.resample("D")
    swing = days["temp_air_c"].max() - days["temp_air_c"].min()
    kc = year.between_time("10:00", "14:00")["clear_sky_index"].resample("D").mean()
    assert swing[kc > 0.9].mean() > swing[kc < 0.45].mean() + 2


def test_temperature_continuous_including_new_year():
    w = weather("2024-12-25", 14)
    assert w["temp_air_c"].diff().abs().max() < 3.0


def test_wind_non_negative_and_plausible(year):
    wind = year["wind_speed_m_per_s"]
    assert (wind >= 0).all()
    assert 1.5 <= wind.mean() <= 4.0


def test_fallback_clear_sky_model_when_turbidity_lookup_fails(monkeypatch):
    real = pvlib.location.Location.get_clearsky
    models = []

    def no_turbidity(self, times, model="ineichen", **kw):
        models.append(model)
        if model == "ineichen":
            raise OSError("LinkeTurbidities.h5 not available")
        return real(self, times, model=model, **kw)

    monkeypatch.setattr(pvlib.location.Location, "get_clearsky", no_turbidity)
    w = weather("2025-06-21", 1)
    assert models == ["ineichen", "simplified_solis"]
    solis = real(pvlib.location.Location(LAT, LON, TZ, ALT), w.index + pd.Timedelta(minutes=7.5),
                 model="simplified_solis")["ghi"].to_numpy()
    np.testing.assert_allclose(w["ghi_w_per_m2"], w["clear_sky_index"] * solis, atol=1e-6)
    assert w["ghi_w_per_m2"].sum() > 0


def test_custom_climate_changes_temperature():
    warm = Climate(t_annual_mean_c=26.0, t_annual_amplitude_k=2.0, t_semiannual_amplitude_k=0.0)
    w = weather("2025-01-01", 31, climate=warm)
    assert 22 <= w["temp_air_c"].mean() <= 28
    assert BEIJING == Climate()
    as_lists = Climate(regime_probs=[list(p) for p in BEIJING.regime_probs])  # lists are accepted
    assert as_lists == BEIJING and hash(as_lists) == hash(BEIJING)


# ---------------------------------------------------------------- determinism and windows

def test_same_seed_same_numbers_other_seed_different():
    a, b, c = weather("2025-06-01", 3, seed=7), weather("2025-06-01", 3, seed=7), weather("2025-06-01", 3, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["ghi_w_per_m2"], c["ghi_w_per_m2"])
    assert not np.allclose(a["temp_air_c"], c["temp_air_c"])


def test_day_alone_equals_day_from_year(year):
    day = weather("2025-03-05", 1)
    pd.testing.assert_frame_equal(day, year.loc[day.index])


def test_window_across_new_year_equals_year_slices(year):
    w = weather("2024-12-30", 4)
    pd.testing.assert_frame_equal(w.loc["2025-01-01":], year.loc["2025-01-01":"2025-01-02"])
    pd.testing.assert_frame_equal(w.loc[:"2024-12-31"], weather("2024-12-30", 2))


def test_values_do_not_depend_on_index_time_zone(year):
    day = year.loc["2025-07-10"]
    utc = synthetic_weather(day.index.tz_convert("UTC"), LAT, LON, ALT, seed=0)
    np.testing.assert_allclose(utc.to_numpy(), day.to_numpy())


@functools.lru_cache(maxsize=4)
def _year_for_seed(seed):
    return weather("2025-01-01", 365, seed=seed)


@settings(max_examples=15, deadline=None)
@given(start=st.integers(0, 360), days=st.integers(1, 4), seed=st.integers(0, 3))
def test_any_window_is_a_slice_of_the_year(start, days, seed):
    part = weather(pd.Timestamp("2025-01-01") + pd.Timedelta(days=start), days, seed=seed)
    pd.testing.assert_frame_equal(part, _year_for_seed(seed).loc[part.index], check_freq=False)
