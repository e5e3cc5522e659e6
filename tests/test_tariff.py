import pandas as pd
import pytest

from vpp.site import parse_park
from conftest import park_dict


def beijing_tariff(reference_park):
    return reference_park.tariff


def test_beijing_bands_by_hour_and_critical_peak_months(reference_park):
    t = reference_park.tariff
    idx = pd.DatetimeIndex([pd.Timestamp(f"2025-{m:02d}-10 {h}", tz="Asia/Shanghai")
                            for m, h in [(3, "03:00"), (3, "08:00"), (3, "11:00"), (3, "19:00"), (1, "19:00"),
                                         (7, "11:30"), (7, "16:30"), (3, "22:30"), (3, "23:00")]])
    assert list(t.bands(idx)) == ["valley", "flat", "peak", "peak", "critical", "critical", "critical", "flat",
                                  "valley"]
    prices = t.buy_price_cny_per_kwh(idx)
    assert prices[0] == 0.31 and prices[4] == 1.34


def test_hourly_carbon_intensity(make_park):
    park = make_park([{"id": "b", "kind": "battery", "bus": "bus3", "e_kwh": 10, "p_charge_max_kw": 5,
                       "p_discharge_max_kw": 5}], carbon={"intensity_kg_per_kwh": [0.5] * 12 + [0.7] * 12})
    idx = pd.date_range(pd.Timestamp("2025-01-01", tz="Asia/Shanghai"), periods=96, freq="15min")
    ci = park.carbon.intensity(idx)
    assert ci[:48].tolist() == [0.5] * 48 and ci[48:].tolist() == [0.7] * 48
