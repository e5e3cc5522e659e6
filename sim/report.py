"""What a simulation writes: KPIs (JSON), time series (CSV), plots (PNG), index.html."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sim.kpis import KPI_LABELS, compute_kpis, kpi_table, monthly_figures  # noqa: E402
from vpp.plot import KIND_COLOURS, KIND_LABELS  # noqa: E402

CONTROLLER_COLOURS = {"optimizer": "#3969ac", "rules": "#f2b701", "none": "#7f7f7f"}


def write_outputs(results: dict, park, out_dir: str | Path, meta: dict) -> dict[str, dict[str, float]]:
    """Write every output of a run; return the KPIs per controller."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kpis = {}
    for name, r in results.items():
        r.series.to_csv(out / f"timeseries_{name}.csv", float_format="%.10g")
        r.sessions.to_csv(out / f"sessions_{name}.csv", index=False, float_format="%.10g")
        kpis[name] = compute_kpis(r.series, r.sessions, park)
    (out / "kpis.json").write_text(json.dumps({"meta": meta, "kpis": kpis,
                                               "stats": {n: r.stats for n, r in results.items()}}, indent=2,
                                              default=float))
    plots = make_plots(results, park, out)
    (out / "index.html").write_text(_html(park, kpis, plots, meta))
    return kpis


def _week(frame: pd.DataFrame, months: tuple[int, ...]) -> pd.DataFrame | None:
    """The first full week (Monday to Sunday) of the run falling in ``months``; for a run
    without one, up to its first seven days in ``months``; None if it has none."""
    step = frame.index[1] - frame.index[0] if len(frame) > 1 else pd.Timedelta(minutes=15)
    for monday in frame.index[(frame.index.dayofweek == 0) & (frame.index.hour == 0) & (frame.index.minute == 0)]:
        end = monday + pd.Timedelta(days=7)
        if monday.month in months and end <= frame.index[-1] + step:
            return frame.loc[monday:end - pd.Timedelta(minutes=1)]
    inside = frame.index[frame.index.month.isin(months)]
    if len(inside) < 2:
        return None
    return frame.loc[inside[0]:inside[0] + pd.Timedelta(days=7) - pd.Timedelta(minutes=1)]


def _week_plot(frame: pd.DataFrame, park, title: str, path: Path) -> None:
    fig, axes = plt.subplots(4, 1, figsize=(13, 12), sharex=True, gridspec_kw={"height_ratios": [3, 1.2, 1.2, 1.2]})
    t = frame.index
    ax = axes[0]
    pos_base, neg_base = np.zeros(len(t)), np.zeros(len(t))
    for kind, fleet in park.fleets.items():
        p = frame[[f"{i}.p_kw" for i in fleet.ids]].sum(axis=1).to_numpy()
        pos, neg = np.clip(p, 0, None), np.clip(p, None, 0)
        colour = KIND_COLOURS.get(kind)
        ax.fill_between(t, pos_base, pos_base + pos, step="post", color=colour, alpha=0.85, label=KIND_LABELS[kind])
        ax.fill_between(t, neg_base, neg_base + neg, step="post", color=colour, alpha=0.85)
        pos_base += pos
        neg_base += neg
    ax.step(t, -frame["grid.p_import_kw"], where="post", color="black", lw=1.2, label="Grid export (+) / import (-)")
    ax.axhline(-park.connection.import_limit_kw, color="red", ls="--", lw=1, label="Connection limits")
    ax.axhline(park.connection.export_limit_kw, color="red", ls="--", lw=1)
    ax.set_ylabel("Power [kW] (+ injection)")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.set_title(title)
    for ax, suffix, label in ((axes[1], ".soc_frac", "Battery SoC [%]"), (axes[2], ".e_th_kwh", "Thermal store [kWh_th]"),
                              (axes[3], ".ev_kw", "EV charging [kW]")):
        cols = [c for c in frame.columns if c.endswith(suffix)]
        for c in cols:
            values = frame[c] * (100 if suffix == ".soc_frac" else 1)
            ax.step(t, values, where="post", label=c.rsplit(".", 1)[0], lw=1)
        if cols:
            ax.legend(fontsize=8, loc="upper left")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_plots(results: dict, park, out: Path) -> list[tuple[str, str]]:
    plots = []
    main = results.get("optimizer") or next(iter(results.values()))
    for months, season in (((12, 1, 2), "winter"), ((6, 7, 8), "summer")):
        week = _week(main.series, months)
        if week is not None:
            name = f"week_{season}.png"
            _week_plot(week, park, f"A {season} week under the {main.controller} controller "
                                   f"({week.index[0]:%Y-%m-%d})", out / name)
            plots.append((name, f"A {season} week: asset power, battery SoC, thermal stores, EV charging"))
    dt = park.settings.dt_h
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(results)
    for k, (name, r) in enumerate(results.items()):
        monthly = monthly_figures(r.series, park)
        monthly_cost, monthly_co2 = monthly["total_cost_cny"], monthly["co2_t"]
        x = np.arange(len(monthly_cost)) + k * width
        colour = CONTROLLER_COLOURS.get(name)
        axes[0].bar(x, monthly_cost / 1000, width, label=name, color=colour)
        axes[1].bar(x, monthly_co2, width, label=name, color=colour)
        labels = [str(p) for p in monthly_cost.index]
    for ax, ylabel in ((axes[0], "Cost incl. demand charge [kCNY]"), (axes[1], "Grid CO2 [t]")):
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=45, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Monthly cost and CO2 per controller")
    fig.tight_layout()
    fig.savefig(out / "monthly_cost_co2.png", dpi=100)
    plt.close(fig)
    plots.append(("monthly_cost_co2.png", "Monthly cost and CO2 per controller"))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, r in results.items():
        loading = np.sort(r.series["grid.trafo_loading_percent"].to_numpy())[::-1]
        hours = np.arange(1, loading.size + 1) * dt
        ax.plot(hours, loading, label=name, color=CONTROLLER_COLOURS.get(name))
    ax.axhline(100, color="red", ls="--", lw=1, label="Rating")
    ax.set_xlabel("Hours at or above")
    ax.set_ylabel("Transformer loading [%]")
    ax.set_title("Duration curve of transformer loading")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "trafo_duration.png", dpi=100)
    plt.close(fig)
    plots.append(("trafo_duration.png", "Duration curve of transformer loading"))
    return plots


def _html(park, kpis: dict, plots: list[tuple[str, str]], meta: dict) -> str:
    names = list(kpis)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for key, label in KPI_LABELS.items():
        cells = "".join(f"<td>{_fmt(key, kpis[n][key])}</td>" for n in names)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    figures = "".join(f'<figure><img src="{f}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
                      for f, c in plots)
    files = "".join(f'<li><a href="timeseries_{n}.csv">timeseries_{n}.csv</a>, '
                    f'<a href="sessions_{n}.csv">sessions_{n}.csv</a></li>' for n in names)
    meta_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(park.site.name)}: simulation</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:2em 0}}</style></head>
<body><h1>{html.escape(park.site.name)}: simulation report</h1>
<table>{meta_rows}</table>
<h2>KPIs per controller</h2><table><tr><th>KPI</th>{head}</tr>{''.join(rows)}</table>
<p>Every KPI is recomputed from the time series below (formulas in <code>sim/kpis.py</code>);
<a href="kpis.json">kpis.json</a> holds the same figures.</p>
{figures}
<h2>Data</h2><ul>{files}</ul></body></html>
"""


def _fmt(key: str, value) -> str:
    if key in ("renewable_share", "pv_self_consumption"):
        return f"{100 * value:.1f} %"
    if key.startswith("vm_"):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:d}"
    return f"{value:,.1f}"


def print_kpis(kpis: dict, stream) -> None:
    print(kpi_table(kpis), file=stream)
