"""Plots of a dispatch plan (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KIND_COLOURS = {"pv": "#f2b701", "battery": "#3969ac", "heat_pump": "#e73f74", "charging_station": "#11a579",
                "load": "#7f7f7f"}
KIND_LABELS = {"pv": "PV", "battery": "Batteries", "heat_pump": "Heat pumps", "charging_station": "PV-storage-charging hub",
               "load": "Buildings"}


def plot_plan(result, park, path: str | Path) -> Path:
    """Four panels: asset power by kind with the connection limits, battery SoC, thermal
    stores, and the AC check (transformer/line loading and voltage band)."""
    tz = park.tz
    t = result.p_kw.index.tz_convert(tz)
    fig, axes = plt.subplots(4, 1, figsize=(12, 13), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.3, 1.3, 1.6]})
    ax = axes[0]
    pos_base = np.zeros(len(t))
    neg_base = np.zeros(len(t))
    for kind, fleet in park.fleets.items():
        p = result.p_kw[fleet.ids].sum(axis=1).to_numpy()
        pos, neg = np.clip(p, 0, None), np.clip(p, None, 0)
        colour = KIND_COLOURS.get(kind, None)
        ax.fill_between(t, pos_base, pos_base + pos, step="post", color=colour, alpha=0.85, label=KIND_LABELS.get(kind, kind))
        ax.fill_between(t, neg_base, neg_base + neg, step="post", color=colour, alpha=0.85)
        pos_base += pos
        neg_base += neg
    ax.step(t, -result.grid["p_import_kw"], where="post", color="black", lw=1.6, label="Grid export (+) / import (-), AC")
    ax.axhline(-park.connection.import_limit_kw, color="red", ls="--", lw=1, label="Import / export limit")
    ax.axhline(park.connection.export_limit_kw, color="red", ls="--", lw=1)
    ax.set_ylabel("Power [kW]\n(+ injection)")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    title = f"{park.site.name}: plan from {t[0]:%Y-%m-%d %H:%M %Z} ({result.status}"
    title += f", objective {result.objective_cny:,.0f} CNY)" if result.ok else ")"
    ax.set_title(title)
    ax.grid(alpha=0.3)

    ax = axes[1]
    soc = result.details.get("soc_frac")
    if soc is not None:
        for col in soc.columns:
            if soc[col].notna().any():
                ax.step(t, 100 * soc[col], where="post", label=col)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("Battery SoC [%]")
    ax.grid(alpha=0.3)

    ax = axes[2]
    store = result.details.get("e_th_kwh")
    if store is not None and "heat_pump" in park.fleets:
        caps = dict(zip(park.fleets["heat_pump"].ids, park.fleets["heat_pump"].cap_kwh))
        for col in store.columns:
            ax.step(t, 100 * store[col] / caps[col], where="post", label=col)
        ax.axhline(0, color="red", ls="--", lw=1)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("Thermal store\n[% of comfort band]")
    ax.grid(alpha=0.3)

    ax = axes[3]
    ax.step(t, result.grid["max_loading_percent"], where="post", color="tab:purple", label="Max branch loading (AC)")
    ax.axhline(park.network.max_loading_percent, color="tab:purple", ls="--", lw=1)
    ax.set_ylabel("Loading [%]")
    ax2 = ax.twinx()
    ax2.fill_between(t, result.grid["vm_min_pu"], result.grid["vm_max_pu"], step="post", color="tab:cyan", alpha=0.4,
                     label="Bus voltage range (AC)")
    ax2.axhline(park.network.v_min_pu, color="tab:cyan", ls="--", lw=1)
    ax2.axhline(park.network.v_max_pu, color="tab:cyan", ls="--", lw=1)
    ax2.set_ylabel("Voltage [p.u.]")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_xlabel(f"Local time ({tz.key})")
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
