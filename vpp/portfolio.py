"""Seeded synthetic VPP portfolios: a generated 10/0.4 kV feeder with thousands of homes.

A portfolio is an ordinary :class:`~vpp.site.Park` (so the monolithic dispatch plans it
as it plans the reference park) whose assets are home batteries, rooftop PV, heat pumps
with thermal storage and home chargers (one-charger ``charging_station`` assets), with
spread sizes, efficiencies drawn from a few product models, spread initial states and EV
sessions, plus one inflexible ``load`` per home bus for the households' base load.
Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give the
same network, assets and series in every process.

The feeder (:func:`synthetic_feeder`): a 10 kV source bus, ``mv_feeders`` radial 10 kV
cables chaining ``n_substations`` secondary substations between them, each substation a
10/0.4 kV transformer feeding ``lv_feeders`` cables of ``buses_per_feeder`` street buses.
Transformers, LV cables and the far ends' voltage can bind once heat pumps and chargers
run together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandapower as pp

from vpp.assets import FLEETS, parse_asset_spec
from vpp.dispatch.grid import GridModel
from vpp.inputs import ParkSeries
from vpp.profiles import building_load_kw, china_holidays, heat_demand_kw_th
from vpp.site import ConnectionSpec, DispatchSettings, InputsSpec, NetworkSpec, Park, SiteSpec
from vpp.tariff import Carbon, Tariff
from vpp import weather

KINDS = ("battery", "pv", "heat_pump", "charging_station")
_TARIFF = {
    "band_price_cny_per_kwh": {"valley": 0.31, "flat": 0.70, "peak": 1.14},
    "export_price_cny_per_kwh": 0.3598,
    "demand_charge_cny_per_kw_month": 48.0,
    "windows": [
        {"start": "23:00", "end": "07:00", "band": "valley"},
        {"start": "07:00", "end": "10:00", "band": "flat"},
        {"start": "10:00", "end": "13:00", "band": "peak"},
        {"start": "13:00", "end": "17:00", "band": "flat"},
        {"start": "17:00", "end": "22:00", "band": "peak"},
        {"start": "22:00", "end": "23:00", "band": "flat"},
    ],
}
# Product models: assets of one model share their dynamics (efficiencies, losses).
# (dynamics, C-rate) of two battery products; (source, flow temperature, store loss) of three heat pumps.
_BATTERY_MODELS = (({"eta_charge": 0.95, "eta_discharge": 0.95, "self_discharge_frac_per_h": 0.0001}, 0.5),
                   ({"eta_charge": 0.97, "eta_discharge": 0.96, "self_discharge_frac_per_h": 0.0002}, 0.37))
_HEAT_PUMP_MODELS = (("air", 35.0, 0.01), ("air", 45.0, 0.02), ("ground", 35.0, 0.01))


@dataclass(frozen=True)
class FeederSize:
    """Shape of the generated feeder; the default has 1 + 10 * (2 + 3 * 4) = 141 buses.

    ``mv_feeders`` radial 10 kV cables leave the source bus, each chaining its share of
    the substations (the first ones take one more where they do not divide evenly).
    """

    n_substations: int = 10
    lv_feeders: int = 3
    buses_per_feeder: int = 4
    trafo_type: str = "0.63 MVA 10/0.4 kV"
    mv_feeders: int = 1

    @property
    def n_buses(self) -> int:
        return 1 + self.n_substations * (2 + self.lv_feeders * self.buses_per_feeder)


def synthetic_feeder(size: FeederSize = FeederSize(), seed: int = 0) -> pp.pandapowerNet:
    """A radial 10/0.4 kV network with seeded cable lengths; street buses are named ``s{k}_f{f}_b{b}``."""
    rng = np.random.default_rng(seed)
    net = pp.create_empty_network(name=f"synthetic feeder seed {seed}")
    names, vn_kv = ["source"], [10.0]
    mv_lines, lv_lines, trafos = [], [], []  # (from name, to name, length km, name)
    if not 1 <= size.mv_feeders <= size.n_substations:
        raise ValueError(f"mv_feeders: need 1 to n_substations ({size.n_substations}), got {size.mv_feeders}")
    # Each MV feeder's first substation hangs on the source, the next ones on the one before.
    starts = {int(part[0]) for part in np.array_split(np.arange(size.n_substations), size.mv_feeders)}
    upstream = "source"
    for k in range(size.n_substations):
        if k in starts:
            upstream = "source"
        names += [f"mv{k}", f"lv{k}"]
        vn_kv += [10.0, 0.4]
        mv_lines.append((upstream, f"mv{k}", float(rng.uniform(0.4, 1.2)), f"mv cable {k}"))
        trafos.append((f"mv{k}", f"lv{k}", f"trafo {k}"))
        for f in range(size.lv_feeders):
            prev = f"lv{k}"
            for b in range(size.buses_per_feeder):
                bus = f"s{k}_f{f}_b{b}"
                names.append(bus)
                vn_kv.append(0.4)
                lv_lines.append((prev, bus, float(rng.uniform(0.04, 0.09)), f"lv cable {k}.{f}.{b}"))
                prev = bus
        upstream = f"mv{k}"
    # One vectorised call per element table: element-wise creation takes seconds per hundred buses.
    index = dict(zip(names, pp.create_buses(net, len(names), np.array(vn_kv), name=names)))
    pp.create_ext_grid(net, index["source"], vm_pu=1.02)
    for lines, std_type in ((mv_lines, "NA2XS2Y 1x185 RM/25 12/20 kV"), (lv_lines, "NAYY 4x150 SE")):
        if lines:
            pp.create_lines(net, [index[a] for a, _, _, _ in lines], [index[b] for _, b, _, _ in lines],
                            [km for _, _, km, _ in lines], std_type, name=[n for _, _, _, n in lines])
    for hv, lv, name in trafos:
        pp.create_transformer(net, index[hv], index[lv], size.trafo_type, name=name)
    return net


def street_buses(size: FeederSize) -> list[str]:
    return [f"s{k}_f{f}_b{b}" for k in range(size.n_substations) for f in range(size.lv_feeders)
            for b in range(size.buses_per_feeder)]


def _asset_specs(n_assets: int, buses: list[str], rng: np.random.Generator) -> list[dict]:
    """``n_assets`` flexible assets, a quarter of each kind, on random street buses."""
    kinds = np.array(KINDS)[np.arange(n_assets) % len(KINDS)]
    at = rng.integers(0, len(buses), n_assets)
    out = []
    for i, (kind, b) in enumerate(zip(kinds, at)):
        spec = {"id": f"{kind}-{i:05d}", "kind": str(kind), "bus": buses[b]}
        if kind == "battery":
            e_kwh = float(rng.choice([5.0, 10.0, 13.5, 15.0]))
            dynamics, c_rate = _BATTERY_MODELS[int(rng.integers(0, 2))]
            spec.update(e_kwh=e_kwh, p_charge_max_kw=round(c_rate * e_kwh, 2), p_discharge_max_kw=round(c_rate * e_kwh, 2),
                        soc_min_frac=0.1, soc_max_frac=0.95, soc_initial_frac=round(float(rng.uniform(0.2, 0.8)), 3),
                        degradation_cny_per_kwh=0.05, **dynamics)
        elif kind == "pv":
            kwp = round(float(rng.uniform(3.0, 10.0)), 2)
            spec.update(p_kwp=kwp, inverter_kva=round(kwp * float(rng.uniform(0.85, 1.0)), 2),
                        tilt_deg=float(rng.choice([15.0, 25.0, 35.0])), azimuth_deg=float(rng.choice([135.0, 180.0, 225.0])),
                        reactive_power=False)
        elif kind == "heat_pump":
            design = round(float(rng.uniform(4.0, 10.0)), 2)
            source, t_supply_c, loss = _HEAT_PUMP_MODELS[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
            # Sized to cover the design heat load at a cold-day COP of about 2.5, with margin.
            spec.update(source=source, p_el_max_kw=round(design / 2.5 * float(rng.uniform(1.3, 1.4)), 2),
                        t_supply_c=t_supply_c, carnot_efficiency=round(float(rng.uniform(0.42, 0.48)), 3),
                        store_kwh_th=round(design * float(rng.uniform(3.3, 3.7)), 2), comfort_band_k=2.0,
                        store_loss_frac_per_h=loss,
                        soc_initial_frac=round(float(rng.uniform(0.3, 0.9)), 3), design_heat_kw_th=design)
        else:
            rating = float(rng.choice([7.0, 11.0]))
            spec.update(import_limit_kw=rating, export_limit_kw=0.0, slots_per_charger=3,
                        chargers=[{"id": "c", "rating_kw": rating, "type": "ac", "efficiency": float(rng.choice([0.9, 0.93]))}])
        out.append(spec)
    # One inflexible load per home bus: the households' base load (about one home per two assets).
    homes = np.bincount(at, minlength=len(buses))
    for b in np.flatnonzero(homes):
        out.append({"id": f"homes-{buses[b]}", "kind": "load", "bus": buses[b], "profile": "residential",
                    "peak_kw": round(1.2 * max(homes[b] / 2.0, 1.0), 2)})
    return out


def synthetic_portfolio(n_assets: int, seed: int = 0, size: FeederSize = FeederSize(),
                        import_limit_kw: float | None = None, settings: dict | None = None) -> Park:
    """A park of ``n_assets`` flexible home assets (plus base loads) on a generated feeder.

    ``import_limit_kw`` defaults to 60 % of the transformers' total rating, below the
    fleet's uncontrolled evening peak on a winter day; ``settings`` overrides dispatch
    settings (e.g. ``{"solver": "CLARABEL"}``).
    """
    if n_assets < len(KINDS):
        raise ValueError(f"n_assets: need at least {len(KINDS)} (one of each kind), got {n_assets}")
    rng = np.random.default_rng(seed)
    specs = _asset_specs(n_assets, street_buses(size), rng)
    return portfolio_park(specs, size, seed, import_limit_kw, settings,
                          name=f"synthetic portfolio {n_assets} seed {seed}")


def portfolio_park(assets: list[dict], size: FeederSize = FeederSize(), seed: int = 0,
                   import_limit_kw: float | None = None, settings: dict | None = None,
                   name: str = "portfolio") -> Park:
    """A park of the given asset descriptions (as in a park file's ``[[assets]]``) on the
    generated feeder of ``size`` and ``seed``; the connection limits and dispatch settings
    as in :func:`synthetic_portfolio`."""
    net = synthetic_feeder(size, seed)
    grid = GridModel(net, 0.95, 1.05, 100.0)
    specs = [parse_asset_spec(a, f"assets[{i}]") for i, a in enumerate(assets)]
    trafo_kva = float(net.trafo.sn_mva.sum() * 1000.0)
    limit = 0.6 * trafo_kva if import_limit_kw is None else import_limit_kw
    by_kind: dict[str, list] = {}
    for s in specs:
        by_kind.setdefault(s.kind, []).append(s)
    return Park(
        site=SiteSpec(name=name, latitude_deg=40.2, longitude_deg=116.2, altitude_m=50, timezone="Asia/Shanghai"),
        network=NetworkSpec(file=f"<generated: vpp.portfolio.synthetic_feeder seed {seed}>"),
        connection=ConnectionSpec(import_limit_kw=limit, export_limit_kw=limit),
        tariff=Tariff.model_validate(_TARIFF), carbon=Carbon(intensity_kg_per_kwh=0.6776, price_cny_per_t=90.0),
        settings=DispatchSettings(**{"time_budget_s": 600.0, **(settings or {})}), inputs=InputsSpec(seed=seed),
        grid=grid, fleets={kind: FLEETS[kind](by_kind[kind]) for kind in FLEETS if kind in by_kind},
        asset_bus={s.id: grid.bus_position(s.bus) for s in specs},
    )


def home_sessions(index: pd.DatetimeIndex, station_ids: list[str], ratings_kw: np.ndarray, seed: int) -> pd.DataFrame:
    """Overnight home-charging sessions, at most one a day per charger, in the station fleet's columns.

    Arrival around 18:30 local (sd 1.5 h), departure around 07:30 the next morning (sd
    1 h), 6-30 kWh wanted, the car's on-board limit 7 or 11 kW.
    """
    rng = np.random.default_rng(seed)
    days = pd.date_range(index[0].normalize() - pd.Timedelta(days=1), index[-1].normalize(), freq="D")
    n, d = len(station_ids), len(days)
    arrive_h = np.clip(rng.normal(18.5, 1.5, (n, d)), 15.0, 23.5)
    leave_h = 24.0 + np.clip(rng.normal(7.5, 1.0, (n, d)), 5.0, 10.0)
    energy = rng.uniform(6.0, 30.0, (n, d))
    car_kw = rng.choice([7.0, 11.0], (n, d))
    present = rng.random((n, d)) < 0.85
    start = np.asarray(days.tz_localize(None), dtype="datetime64[ns]")[None, :]
    rows = np.nonzero(present)
    arrival = pd.DatetimeIndex(start[0][rows[1]] + (arrive_h[rows] * 3600e9).astype("timedelta64[ns]")).tz_localize(index.tz)
    departure = pd.DatetimeIndex(start[0][rows[1]] + (leave_h[rows] * 3600e9).astype("timedelta64[ns]")).tz_localize(index.tz)
    stations = np.asarray(station_ids, dtype=object)[rows[0]]
    return pd.DataFrame({
        "session_id": [f"{s}/{k}" for s, k in zip(stations, rows[1])], "station_id": stations, "charger_id": "c",
        "arrival": arrival.round("s"), "departure": departure.round("s"), "energy_kwh": energy[rows],
        "max_kw": np.minimum(car_kw[rows], np.asarray(ratings_kw)[rows[0]]),
    })


def portfolio_series(park: Park, start: pd.Timestamp, days: int = 1) -> ParkSeries:
    """Every member's forecast inputs for ``days`` days from ``start`` plus one horizon, seeded
    by the park's seed: pvlib PV output, heat demand and COP, base loads, EV sessions, prices."""
    extra = int(np.ceil(park.settings.horizon_steps * park.settings.dt_h / 24.0))
    index = weather.load_period_index(start, days + extra, park.site.timezone)
    index = index[index >= start] if start.tzinfo is not None else index
    seed, site, fleets, n = park.inputs.seed, park.site, park.fleets, len(index)
    wx = weather.synthetic_weather(index, site.latitude_deg, site.longitude_deg, site.altitude_m, seed=seed)
    pv = fleets["pv"].available_kw(wx, site) if "pv" in fleets else np.zeros((0, n))
    temp = wx["temp_air_c"].to_numpy()
    heat, cop = np.zeros((0, n)), np.zeros((0, n))
    if "heat_pump" in fleets:
        hp = fleets["heat_pump"]
        shape = heat_demand_kw_th(index, temp, 1.0, occupancy_kind="residential")  # linear in the design load
        heat = hp.column("design_heat_kw_th")[:, None] * shape[None, :]
        cop = hp.cop(temp)
    holidays = set().union(*(china_holidays(y) for y in range(index[0].year, index[-1].year + 1)))
    load = np.zeros((0, n))
    if "load" in fleets:
        load = np.vstack([building_load_kw(index, s.peak_kw, kind="residential", seed=seed + 104729 * (k + 1),
                                           holidays=holidays) for k, s in enumerate(fleets["load"].specs)])
    sessions = pd.DataFrame(columns=["session_id", "station_id", "charger_id", "arrival", "departure", "energy_kwh",
                                     "max_kw"])
    station_pv = np.zeros((0, n))
    if "charging_station" in fleets:
        st = fleets["charging_station"]
        sessions = home_sessions(index, st.ids, st.column("import_limit_kw"), seed + 7919)
        station_pv = st.pv_available_kw(wx, site)
    return ParkSeries(
        index=index, weather=wx, pv_avail_kw=pv, station_pv_avail_kw=station_pv, load_demand_kw=load,
        heat_kw_th=heat, cop=cop, sessions=sessions, buy_price_cny_per_kwh=park.tariff.buy_price_cny_per_kwh(index),
        sell_price_cny_per_kwh=park.tariff.sell_price_cny_per_kwh(index), carbon_kg_per_kwh=park.carbon.intensity(index),
    )
