"""Text reports for the terminal."""

from __future__ import annotations

from typing import TextIO


def print_dispatch(result, park, out: TextIO) -> None:
    """Next step's setpoints, the objective breakdown and the AC grid check of a plan."""
    tz = park.tz
    index = result.p_kw.index.tz_convert(tz)
    first = index[0]
    dt_min = int(park.settings.dt_h * 60)
    print(f"{park.site.name}: {len(index)} x {dt_min} min from {first:%Y-%m-%d %H:%M %Z}", file=out)
    print(f"status: {result.status}" + (f"  ({result.reason})" if result.reason else ""), file=out)
    print(f"\nsetpoints {first:%H:%M}-{first + (index[1] - index[0]):%H:%M} (kW, + = injection):", file=out)
    print(f"  {'asset':<14}{'kind':<18}{'bus':<14}{'p_kw':>9}{'q_kvar':>9}  state", file=out)
    bus_names = park.grid.bus_names
    for kind, fleet in park.fleets.items():
        for asset_id in fleet.ids:
            state = ""
            for name, frame in result.details.items():
                if asset_id in frame.columns and name in ("soc_frac", "e_th_kwh", "ev_kw"):
                    value = frame[asset_id].iloc[0]
                    if value == value:
                        state += f"{name}={value:.2f} " if name != "soc_frac" else f"soc={100 * value:.0f}% "
            print(f"  {asset_id:<14}{kind:<18}{bus_names[park.asset_bus[asset_id]]:<14}"
                  f"{result.p_kw[asset_id].iloc[0]:9.1f}{result.q_kvar[asset_id].iloc[0]:9.1f}  {state}", file=out)
    if result.costs_cny:
        print(f"\nobjective over the horizon: {result.objective_cny:,.2f} CNY", file=out)
        for name, value in result.costs_cny.items():
            print(f"  {name:<22}{value:12.2f}", file=out)
        print(f"  (grid CO2: {result.co2_t:.3f} t)", file=out)
    g = result.grid
    worst = g["max_loading_percent"].idxmax()
    print(f"\nAC check ({len(g)} steps, pandapower network, {result.grid_iterations} grid iteration(s)):", file=out)
    print(f"  max branch loading {g['max_loading_percent'].max():6.1f} %  at {worst.tz_convert(tz):%H:%M}"
          f"  (limit {park.network.max_loading_percent:g} %)", file=out)
    print(f"  bus voltage        {g['vm_min_pu'].min():.4f} .. {g['vm_max_pu'].max():.4f} p.u."
          f"  (band {park.network.v_min_pu:g} .. {park.network.v_max_pu:g})", file=out)
    print(f"  grid import        {g['p_import_kw'].max():6.1f} kW peak, export {max(-g['p_import_kw'].min(), 0):.1f} kW"
          f" peak  (limits {park.connection.import_limit_kw:g} / {park.connection.export_limit_kw:g} kW)", file=out)
    print(f"  violations         {int(g['violations'].sum())} step-element(s); not converged: "
          f"{int((~g['converged']).sum())} step(s)", file=out)
    if len(result.ev_sessions):
        s = result.ev_sessions
        unmet = s[s["unmet_kwh"] > 1e-3]
        print(f"\nEV sessions in the horizon: {len(s)}, requested {s['requested_kwh'].sum():.0f} kWh, "
              f"unmet {s['unmet_kwh'].sum():.1f} kWh in {len(unmet)} session(s)", file=out)
        for row in unmet.itertuples():
            print(f"  unmet {row.unmet_kwh:7.1f} kWh  {row.session_id}", file=out)
    print(f"\ntiming: solve {result.solve_s:.3f} s, AC check {result.ac_check_s:.3f} s, "
          f"cycle {result.total_s:.3f} s", file=out)
