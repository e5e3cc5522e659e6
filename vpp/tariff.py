"""Time-of-use energy prices, demand charges and grid carbon intensity.

A tariff divides the local day into bands (valley, flat, peak, ...), each with an energy
price.  Critical-peak windows can override the band in given months, as Beijing's tariff
does in summer and winter.  The demand charge is billed per kW of the month's peak import.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _minutes(text: str) -> int:
    try:
        t = dt.time.fromisoformat(text) if text != "24:00" else None
    except ValueError:
        raise ValueError(f"{text!r} is not a time of day HH:MM") from None
    return 24 * 60 if t is None else t.hour * 60 + t.minute


class TouWindow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: str = Field(description="local time HH:MM, inclusive")
    end: str = Field(description="local time HH:MM, exclusive; 24:00 allowed")
    band: str
    months: list[int] | None = Field(None, description="months it applies in; None = all")

    @field_validator("start", "end")
    @classmethod
    def _time(cls, v: str) -> str:
        _minutes(v)
        return v

    @field_validator("months")
    @classmethod
    def _months(cls, v):
        if v is not None and any(m < 1 or m > 12 for m in v):
            raise ValueError("months must be 1..12")
        return v


class Tariff(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    band_price_cny_per_kwh: dict[str, float]
    windows: list[TouWindow] = Field(min_length=1, description="daily bands; later windows override earlier ones")
    export_price_cny_per_kwh: float = Field(0.0, ge=-10, le=10)
    demand_charge_cny_per_kw_month: float = Field(0.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _bands_known(self):
        for i, w in enumerate(self.windows):
            if w.band not in self.band_price_cny_per_kwh:
                raise ValueError(f"windows[{i}].band {w.band!r} has no price in band_price_cny_per_kwh")
        base = [w for w in self.windows if w.months is None]
        covered = np.zeros(24 * 60, bool)
        for w in base:
            covered[self._window_mask(w)] = True
        if not covered.all():
            gap = int(np.argmin(covered))
            raise ValueError(f"windows without months must cover the whole day; {gap // 60:02d}:{gap % 60:02d} is not covered")
        return self

    @staticmethod
    def _window_mask(w: TouWindow) -> np.ndarray:
        minute = np.arange(24 * 60)
        a, b = _minutes(w.start), _minutes(w.end)
        return (minute >= a) & (minute < b) if a < b else (minute >= a) | (minute < b)

    def bands(self, index: pd.DatetimeIndex) -> np.ndarray:
        """Band name of each step, from the step's local start time."""
        minute = (index.hour * 60 + index.minute).to_numpy()
        month = index.month.to_numpy()
        out = np.empty(len(index), dtype=object)
        for w in self.windows:
            in_window = self._window_mask(w)[minute]
            if w.months is not None:
                in_window &= np.isin(month, w.months)
            out[in_window] = w.band
        return out

    def buy_price_cny_per_kwh(self, index: pd.DatetimeIndex) -> np.ndarray:
        """Energy price [CNY/kWh] of each step; ``index`` in the park's local time."""
        return np.array([self.band_price_cny_per_kwh[b] for b in self.bands(index)], dtype=float)

    def sell_price_cny_per_kwh(self, index: pd.DatetimeIndex) -> np.ndarray:
        return np.full(len(index), self.export_price_cny_per_kwh)


class Carbon(BaseModel):
    """Grid carbon intensity and the price put on emissions."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    intensity_kg_per_kwh: float | list[float] = Field(
        description="one value, or 24 hourly values of the local day [kgCO2/kWh]")
    price_cny_per_t: float = Field(0.0, ge=0, le=10000)

    @field_validator("intensity_kg_per_kwh")
    @classmethod
    def _intensity(cls, v):
        values = [v] if isinstance(v, (int, float)) else v
        if isinstance(v, list) and len(v) != 24:
            raise ValueError("give one value or 24 hourly values")
        if any(x < 0 or x > 3 or x != x for x in values):
            raise ValueError("intensities must lie in 0..3 kgCO2/kWh")
        return v

    def intensity(self, index: pd.DatetimeIndex) -> np.ndarray:
        """Carbon intensity [kgCO2/kWh] of each step; ``index`` in local time."""
        if isinstance(self.intensity_kg_per_kwh, list):
            return np.asarray(self.intensity_kg_per_kwh, float)[index.hour.to_numpy()]
        return np.full(len(index), float(self.intensity_kg_per_kwh))
