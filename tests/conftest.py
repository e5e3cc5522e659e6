"""Fixtures: tiny parks built from dictionaries, and the reference park."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vpp.site import load_park, parse_park

REFERENCE_PARK = Path(__file__).resolve().parents[1] / "sim" / "scenarios" / "changping_science_park.toml"

FLAT_TARIFF = {
    "band_price_cny_per_kwh": {"valley": 0.3, "flat": 0.7, "peak": 1.2},
    "windows": [
        {"start": "00:00", "end": "08:00", "band": "valley"},
        {"start": "08:00", "end": "17:00", "band": "flat"},
        {"start": "17:00", "end": "21:00", "band": "peak"},
        {"start": "21:00", "end": "24:00", "band": "flat"},
    ],
    "export_price_cny_per_kwh": 0.2,
    "demand_charge_cny_per_kw_month": 0.0,
}


def park_dict(assets, **sections):
    """A small park on pandapower's 6-bus 10/0.4 kV `panda_four_load_branch` feeder."""
    data = {
        "park": {"name": "test park", "latitude_deg": 40.2, "longitude_deg": 116.2, "timezone": "Asia/Shanghai"},
        "network": {"benchmark": "panda_four_load_branch", "drop_elements": True},
        "connection": {"import_limit_kw": 500, "export_limit_kw": 500},
        "tariff": copy.deepcopy(FLAT_TARIFF),
        "carbon": {"intensity_kg_per_kwh": 0.6, "price_cny_per_t": 0.0},
        "dispatch": {"horizon_steps": 96, "dt_h": 0.25},
        "assets": assets,
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


@pytest.fixture
def make_park():
    def build(assets, **sections):
        return parse_park(park_dict(assets, **sections))

    return build


@pytest.fixture(scope="session")
def reference_park():
    return load_park(REFERENCE_PARK)


def day_index(n_steps=96, start="2025-01-15", tz="Asia/Shanghai"):
    return pd.date_range(pd.Timestamp(start, tz=tz), periods=n_steps, freq="15min")


def office_load_kw(index, peak_kw=100.0):
    """A simple deterministic day shape: 30 % at night, full 08-18 local."""
    hours = index.hour + index.minute / 60
    return np.where((hours >= 8) & (hours < 18), peak_kw, 0.3 * peak_kw)
