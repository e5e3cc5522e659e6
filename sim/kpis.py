"""KPIs of a simulated period, computed only from the written time series.

Every figure here can be recomputed by a user from ``timeseries.csv`` and
``sessions.csv`` with the formulas in the docstring of :func:`compute_kpis`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

KPI_LABELS = {
    "energy_cost_cny": "Energy cost (CNY)",
    "demand_charge_cny": "Demand charge (CNY)",
    "total_cost_cny": "Total cost (CNY)",
    "co2_t": "Grid CO2 (t)",
    "import_kwh": "Grid import (kWh)",
    "export_kwh": "Grid export (kWh)",
    "renewable_share": "Renewable share of consumption",
    "pv_generation_kwh": "PV generation (kWh)",
    "pv_self_consumption": "PV self-consumption",
    "pv_curtailed_kwh": "PV curtailed (kWh)",
    "peak_import_kw": "Peak import (kW)",
    "import_limit_kw": "Connection import limit (kW)",
    "battery_full_cycles": "Battery equivalent full cycles",
    "heat_delivered_kwh_th": "Heat delivered (kWh_th)",
    "comfort_violation_k_h": "Comfort violation (K*h)",
    "ev_requested_kwh": "EV energy requested (kWh)",
    "ev_unmet_kwh": "EV energy unmet (kWh)",
    "ev_unmet_sessions": "EV sessions with unmet energy",
    "grid_violations": "Grid violations (step-elements)",
    "max_loading_percent": "Max branch loading (%)",
    "vm_min_pu": "Min voltage (p.u.)",
    "vm_max_pu": "Max voltage (p.u.)",
}


def _sum(frame: pd.DataFrame, suffix: str) -> pd.Series:
    cols = [c for c in frame.columns if c.endswith(suffix)]
    return frame[cols].sum(axis=1) if cols else pd.Series(0.0, index=frame.index)


def compute_kpis(frame: pd.DataFrame, sessions: pd.DataFrame, park) -> dict[str, float]:
    """KPIs of one controller's run.

    With ``imp = grid.p_import_kw`` (AC, import positive) and ``dt`` the step in hours:
    energy cost = sum(buy * max(imp, 0) - sell * max(-imp, 0)) * dt; demand charge = the
    tariff's rate times each calendar month's peak of max(imp, 0); CO2 = sum(max(imp, 0) *
    carbon) * dt / 1000; PV generation = sum of every PV ``p_kw`` and station ``pv_kw``;
    consumption = import + PV generation - export (kWh, losses included); renewable share
    = (PV generation - export) / consumption; self-consumption = (PV generation - export)
    / PV generation; battery full cycles = discharged kWh / usable kWh, averaged over
    batteries; comfort violation sums ``comfort_violation_k_h``; EV figures come from
    ``sessions.csv``; grid figures from the ``grid.*`` columns.
    """
    dt = park.settings.dt_h
    imp = frame["grid.p_import_kw"].to_numpy(float)
    imp_pos, exp_pos = np.clip(imp, 0, None), np.clip(-imp, 0, None)
    energy_cost = float(np.sum(frame["price.buy_cny_per_kwh"] * imp_pos - frame["price.sell_cny_per_kwh"] * exp_pos) * dt)
    monthly_peak = pd.Series(imp_pos, index=frame.index).groupby([frame.index.year, frame.index.month]).max()
    demand = float(monthly_peak.sum() * park.tariff.demand_charge_cny_per_kw_month)
    pv_ids = park.fleets["pv"].ids if "pv" in park.fleets else []
    pv_gen = sum(frame[f"{i}.p_kw"].clip(lower=0).sum() for i in pv_ids) * dt + _sum(frame, ".pv_kw").sum() * dt
    curtailed = sum(frame[f"{i}.curtailed_kw"].sum() for i in pv_ids) * dt
    import_kwh, export_kwh = imp_pos.sum() * dt, exp_pos.sum() * dt
    consumption = import_kwh + pv_gen - export_kwh
    pv_used = max(pv_gen - export_kwh, 0.0)
    cycles = []
    if "battery" in park.fleets:
        for spec in park.fleets["battery"].specs:
            usable = spec.e_kwh * (spec.soc_max_frac - spec.soc_min_frac)
            cycles.append(frame[f"{spec.id}.p_kw"].clip(lower=0).sum() * dt / usable)
    ev_requested = float(sessions["requested_kwh"].sum()) if len(sessions) else 0.0
    ev_unmet = float(sessions["unmet_kwh"].sum()) if len(sessions) else 0.0
    return {
        "energy_cost_cny": energy_cost,
        "demand_charge_cny": demand,
        "total_cost_cny": energy_cost + demand,
        "co2_t": float(np.sum(imp_pos * frame["carbon.kg_per_kwh"]) * dt / 1000.0),
        "import_kwh": float(import_kwh),
        "export_kwh": float(export_kwh),
        "renewable_share": float(pv_used / consumption) if consumption > 0 else 0.0,
        "pv_generation_kwh": float(pv_gen),
        "pv_self_consumption": float(pv_used / pv_gen) if pv_gen > 0 else 0.0,
        "pv_curtailed_kwh": float(curtailed),
        "peak_import_kw": float(imp_pos.max()) if imp.size else 0.0,
        "import_limit_kw": float(park.connection.import_limit_kw),
        "battery_full_cycles": float(np.mean(cycles)) if cycles else 0.0,
        "heat_delivered_kwh_th": float(_sum(frame, ".heat_out_kw_th").sum() * dt),
        "comfort_violation_k_h": float(_sum(frame, ".comfort_violation_k_h").sum()),
        "ev_requested_kwh": ev_requested,
        "ev_unmet_kwh": ev_unmet,
        "ev_unmet_sessions": int((sessions["unmet_kwh"] > 0.01).sum()) if len(sessions) else 0,
        "grid_violations": int(frame["grid.violations"].sum()),
        "max_loading_percent": float(frame["grid.max_loading_percent"].max()),
        "vm_min_pu": float(frame["grid.vm_min_pu"].min()),
        "vm_max_pu": float(frame["grid.vm_max_pu"].max()),
    }


def monthly_figures(frame: pd.DataFrame, park) -> pd.DataFrame:
    """Per calendar month: energy cost, demand charge, total cost [CNY] and CO2 [t],
    with the formulas of :func:`compute_kpis`."""
    dt = park.settings.dt_h
    imp = frame["grid.p_import_kw"]
    imp_pos, exp_pos = imp.clip(lower=0), (-imp).clip(lower=0)
    month = frame.index.strftime("%Y-%m")
    energy = ((frame["price.buy_cny_per_kwh"] * imp_pos - frame["price.sell_cny_per_kwh"] * exp_pos) * dt).groupby(month).sum()
    demand = imp_pos.groupby(month).max() * park.tariff.demand_charge_cny_per_kw_month
    co2 = (imp_pos * frame["carbon.kg_per_kwh"] * dt / 1000.0).groupby(month).sum()
    return pd.DataFrame({"energy_cost_cny": energy, "demand_charge_cny": demand, "total_cost_cny": energy + demand,
                         "co2_t": co2})


def kpi_table(kpis: dict[str, dict[str, float]]) -> str:
    """Controllers side by side as a fixed-width text table."""
    names = list(kpis)
    lines = [f"{'KPI':<34}" + "".join(f"{n:>16}" for n in names)]
    for key, label in KPI_LABELS.items():
        cells = []
        for n in names:
            v = kpis[n][key]
            if key in ("renewable_share", "pv_self_consumption"):
                cells.append(f"{100 * v:15.1f}%")
            elif key.startswith("vm_"):
                cells.append(f"{v:16.4f}")
            elif isinstance(v, int):
                cells.append(f"{v:16d}")
            else:
                cells.append(f"{v:16,.1f}")
        lines.append(f"{label:<34}" + "".join(cells))
    return "\n".join(lines)
