"""Rehearsing the next cycle: plan it ahead on what this cycle expects of it.

A large portfolio's cycle solves its LP with the grid rows the last cycles needed and
activates the rows the plan then breaks (the lazy rows of :mod:`vpp.dispatch.problem`),
which costs a whole interior-point solve more.  Between cycles the plans of
equal cost shift (which home's battery or car moves makes no difference to the LP), so
most cycles break a few rows that no earlier plan came near.

Right after a cycle has published its setpoints, a dispatcher can rehearse the next
cycle: plan it on the inputs this cycle expects for it (the same forecasts one step on,
the last step held) from the state its assets should reach by carrying out their first
setpoints under the forecast conditions.  The rehearsal's plan is never published.  What
stays is what it taught the problem: the grid rows its plan needed and the margins of the
coarse blocks.  The real cycle then starts with them, so its first solve usually holds.
The price is a second cycle's work every quarter hour, spent after the setpoints are out
rather than between the forecast update and the setpoints.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from vpp.dispatch.problem import HorizonInputs
from vpp.inputs import first_step_conditions


def advance(inputs: HorizonInputs, planned_import_kw: float = 0.0) -> HorizonInputs:
    """``inputs`` one step on: every per-step series moved by a step, its last value held
    for the new last step; the month's peak so far raised to ``planned_import_kw`` (the
    import the plan's first step expects).

    Per-step arrays are the prices, carbon intensity, connection and branch limits, and
    every forecast array whose last axis runs over the steps; anything else (an EV
    sessions table, the voltage band per bus) is kept as it is.
    """
    T = len(inputs.index)
    step = inputs.index[1] - inputs.index[0] if T > 1 else pd.Timedelta(minutes=15)

    def on(value):
        if isinstance(value, pd.DatetimeIndex) and len(value) == T:
            return value + step
        if isinstance(value, np.ndarray) and value.ndim in (1, 2) and value.shape[-1] == T:
            return np.concatenate([value[..., 1:], value[..., -1:]], axis=-1)
        return value

    return replace(
        inputs, index=inputs.index + step,
        forecasts={kind: {name: on(v) for name, v in f.items()} for kind, f in inputs.forecasts.items()},
        buy_price_cny_per_kwh=on(np.asarray(inputs.buy_price_cny_per_kwh, float)),
        sell_price_cny_per_kwh=on(np.asarray(inputs.sell_price_cny_per_kwh, float)),
        carbon_kg_per_kwh=on(np.asarray(inputs.carbon_kg_per_kwh, float)),
        import_limit_kw=on(np.asarray(inputs.import_limit_kw, float)),
        export_limit_kw=on(np.asarray(inputs.export_limit_kw, float)),
        branch_limit_percent=None if inputs.branch_limit_percent is None else on(
            np.asarray(inputs.branch_limit_percent, float)),
        peak_import_so_far_kw=max(float(inputs.peak_import_so_far_kw), float(planned_import_kw)),
    )


def plant_after(park, state: dict[str, dict[str, Any]], setpoints_kw: dict[str, np.ndarray],
                conditions: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Each fleet's state after carrying out ``setpoints_kw`` (per kind, (n_assets,) [kW])
    for one step under ``conditions`` (per kind, as ``plant_step`` reads them), through
    the fleet's own plant model (which leaves ``state`` untouched)."""
    dt_h = park.settings.dt_h
    return {kind: fleet.plant_step(state[kind], np.asarray(setpoints_kw[kind], float), conditions.get(kind, {}),
                                   dt_h)[0]
            for kind, fleet in park.fleets.items()}


def expected_state(park, state: dict[str, dict[str, Any]], first_kw: dict[str, np.ndarray],
                   inputs: HorizonInputs) -> dict[str, dict[str, Any]]:
    """Each fleet's state after carrying out ``first_kw`` for the first step of ``inputs``
    under its forecast conditions (:func:`plant_after`)."""
    return plant_after(park, state, first_kw, first_step_conditions(inputs.forecasts, inputs.index[0]))


def next_cycle(park, inputs: HorizonInputs, state: dict[str, dict[str, Any]], first_kw: dict[str, np.ndarray],
               grid: pd.DataFrame) -> tuple[HorizonInputs, dict[str, dict[str, Any]]]:
    """The inputs and state of the cycle after the one planned on ``inputs`` from ``state``,
    as that cycle's plan expects them: ``first_kw`` its first setpoints per kind, ``grid``
    its grid table (the first step's ``p_import_kw`` raises the month's peak so far)."""
    planned_import_kw = float(grid["p_import_kw"].iloc[0]) if len(grid) else 0.0
    return advance(inputs, planned_import_kw), expected_state(park, state, first_kw, inputs)
