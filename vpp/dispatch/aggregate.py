"""Dispatch at portfolio scale: plan virtual assets, then split the plan over the real ones.

Method
------
1. **Cluster.**  Assets of one kind at one bus that share their dynamics form a virtual
   asset (:func:`cluster_assets`): batteries of one product (efficiencies,
   self-discharge, degradation price, C-rate, SoC window), heat pumps of one source,
   flow temperature and store loss, and all PV systems, chargers and base loads at the
   bus.  Sizes, COPs, initial states, targets and EV sessions may all differ.
2. **Aggregate** (every cycle, :mod:`vpp.dispatch.virtual`): each member takes a fixed
   share of its virtual asset's plan plus a fixed offset trajectory, and the virtual
   asset's limits are the tightest any member allows after its offset, so *every*
   virtual plan splits into member plans that keep each member's power, SoC, comfort
   and EV limits.  The virtual park is solved, AC-checked and tightened by the ordinary
   :class:`~vpp.dispatch.dispatcher.Dispatcher`.
3. **Disaggregate** (:meth:`AggregateDispatcher.dispatch`): members' setpoints are the
   shares plus offsets; per bus they add up to the virtual plan (to rounding), so the AC
   check of the virtual plan is the AC check of the members' setpoints.  Batteries are
   the exception: each member follows its planned energy, and where its offset nets
   against its share it skips losses the plan counts and injects up to about 11 % of the
   offset's power more than planned; the members' setpoints then get an AC check of
   their own.

Plan groups
-----------
Virtual assets are per bus, but the storage kinds' LP variables need not be: with
``group_by="feeder"`` (the default) the virtual batteries (heat pumps) of one product on
one LV feeder share one plan, each taking its members' share of it.  The grid rows still
see each bus's own injection, exactly, so every limit the LP states holds for the
members; what grouping gives up is that two buses of one feeder cannot run their
batteries differently (the loss is measured, below).  The LP then grows with products
times LV feeders, not with buses.  ``group_by="bus"`` keeps one plan per virtual asset,
``"portfolio"`` one per product.

Coarse horizons
---------------
With ``horizon_resolution`` the virtual assets plan in coarse steps and every member gets
a setpoint per base step: the block's power for batteries, the same share of the
available output for PV, the same heat output (electric power over each base step's COP)
for heat pumps, and its own reference schedules per base step for EVs.  Power limits then
hold in every base step; stores meet their limits at block ends and drift inside a block
only by what its forecasts vary within it.  The grid sees each block's mean injections in
the LP, so every cycle also runs the AC power flow of the members' setpoints in every base
step; where a base step breaks a grid limit, the cycle plans once more with each block's
spread around its mean (voltages, branch loading, connection power) as a margin on its
limits (:meth:`~vpp.dispatch.problem.DispatchProblem.fold_base_check`).

Where it is exact, and the bound elsewhere
------------------------------------------
The virtual feasible set is an inner approximation of the members' joint flexibility
(the Minkowski sum of their feasible sets), so the fast plan is always feasible for the
members and its cost is never below the monolithic optimum.  It is **exact** (the same
set, hence the monolithic optimum) for PV (common curtailment fraction), base loads, and
batteries or heat pumps that are scaled copies of each other in the same normalised
state (equal SoC, equal end target, heat demand and power in proportion to store size):
their offsets vanish.  Otherwise what is given up is bounded by what the offsets take:

- batteries and heat pumps: while a member's offset is non-zero (the ramp at the start
  of the horizon that evens out initial states, at a quarter of its rating, and the way
  back to its own target at the end: for heat pumps a ramp, for batteries a profile the
  LP places within the last hours), the virtual window narrows by the spread of the
  members' normalised offsets and the virtual power by the offsets' power; spread
  C-rates or power-to-store ratios within a cluster cap the virtual power at the
  smallest member ratio; a heat pump's offset falls no faster than its own heat demand
  and store losses can take its store down (in summer it only decays); the plan counts
  the round-trip loss of a battery offset's flows even where the member's net setpoint
  skips it (the member then draws less than planned);
- EVs: each car's schedule is a blend of seven reference schedules with cluster-wide
  weights, so EV flexibility is the convex hull of those schedules, not every schedule.

The loss is measured, not assumed: ``bench/bench_portfolio.py`` evaluates the fast and
the monolithic plans on the individual assets with :func:`evaluate_plan` and prints the
cost ratio (target: within 1 %).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vpp.assets.base import Horizon
from vpp.dispatch.dispatcher import Dispatcher, base_limits
from vpp.dispatch.problem import HorizonInputs
from vpp.dispatch.rehearsal import next_cycle
from vpp.dispatch.result import DispatchResult, count_violations
from vpp.dispatch.virtual import (VirtualBatteryFleet, VirtualChargerFleet, VirtualHeatPumpFleet, VirtualLoadFleet,
                                  VirtualPVFleet, session_table)
from vpp.errors import SpecError

VIRTUAL_FLEETS = {f.kind: f for f in (VirtualPVFleet, VirtualBatteryFleet, VirtualHeatPumpFleet, VirtualChargerFleet,
                                      VirtualLoadFleet)}


def _cluster_keys(park, kind: str) -> list[tuple]:
    """What must be equal for two assets of ``kind`` to share a virtual asset (bus first)."""
    fleet, buses = park.fleets[kind], park.bus_positions(kind)
    if kind == "battery":
        st = fleet.storage
        rate = np.round(st.p_ch_max_kw / st.e_kwh, 3), np.round(st.p_dis_max_kw / st.e_kwh, 3)
        window = np.round(st.e_min_kwh / st.e_kwh, 3), np.round(st.e_max_kwh / st.e_kwh, 3)
        return list(zip(buses, st.eta_ch, st.eta_dis, st.sd_per_h, st.deg_cny_per_kwh, *rate, *window))
    if kind == "heat_pump":
        return list(zip(buses, fleet.loss_per_h, [s.source for s in fleet.specs], fleet.column("t_supply_c")))
    return [(b,) for b in buses]


GROUP_BY = ("bus", "feeder", "portfolio")
# Kinds whose virtual assets on different buses may share one plan (the storage kinds,
# whose plan variables make up most of the LP).
_GROUPED_KINDS = ("battery", "heat_pump")


def cluster_assets(park, group_by: str = "bus") -> dict[str, tuple[np.ndarray, list[str], np.ndarray]]:
    """Per kind: each asset's virtual row, the virtual assets' ids (``kind@bus#k``) and
    each virtual asset's plan group.

    ``group_by`` says which virtual batteries and heat pumps of one product share a plan:
    none (``bus``: every virtual asset plans alone), those on one LV feeder (``feeder``)
    or all of them (``portfolio``).
    """
    if group_by not in GROUP_BY:
        raise SpecError("aggregate.group_by", f"expected one of {', '.join(GROUP_BY)}, got {group_by!r}")
    feeder = park.grid.feeder_of_bus()
    out = {}
    for kind in park.fleets:
        if kind not in VIRTUAL_FLEETS:
            raise SpecError(f"aggregate.{kind}", "no virtual asset for this kind")
        keys = _cluster_keys(park, kind)
        rows: dict[tuple, int] = {}
        cluster = np.array([rows.setdefault(k, len(rows)) for k in keys], dtype=int)
        count: dict[int, int] = {}
        ids, groups = [], {}
        group = np.empty(len(rows), dtype=int)
        for r, key in enumerate(rows):
            bus = int(key[0])
            ids.append(f"{kind}@{park.grid.bus_names[bus]}#{count.setdefault(bus, 0)}")
            count[bus] += 1
            if kind not in _GROUPED_KINDS or group_by == "bus":
                gkey = (r,)
            else:
                gkey = key[1:] + ((int(feeder[bus]),) if group_by == "feeder" else ())
            group[r] = groups.setdefault(gkey, len(groups))
        out[kind] = (cluster, ids, group)
    return out


def aggregate_park(park, group_by: str = "bus"):
    """The park with one virtual asset per cluster in place of its assets."""
    fleets, asset_bus = {}, {}
    for kind, (cluster, ids, group) in cluster_assets(park, group_by).items():
        fleets[kind] = VIRTUAL_FLEETS[kind](park.fleets[kind], cluster, ids, group)
        buses = park.bus_positions(kind)
        for row, vid in enumerate(ids):
            asset_bus[vid] = int(buses[np.flatnonzero(cluster == row)[0]])
    return dataclasses.replace(park, fleets=fleets, asset_bus=asset_bus)


def with_ev_orders(park, inputs: HorizonInputs) -> HorizonInputs:
    """Inputs whose charger forecast carries what the cars' reference schedules sort steps
    by: the energy price (with carbon) and the rest of the portfolio's forecast draw [kW],
    base loads and heat demand over COP less available PV."""
    if "charging_station" not in inputs.forecasts:
        return inputs
    carbon_cny = np.asarray(inputs.carbon_kg_per_kwh, float) * park.carbon.price_cny_per_t / 1000.0
    f = inputs.forecasts
    others = np.zeros(len(inputs.index))
    if "load" in f:
        others += np.sum(np.asarray(f["load"]["demand_kw"], float), axis=0)
    if "pv" in f:
        others -= np.sum(np.asarray(f["pv"]["avail_kw"], float), axis=0)
    if "heat_pump" in f:
        others += np.sum(np.asarray(f["heat_pump"]["heat_kw_th"], float) / np.asarray(f["heat_pump"]["cop"], float), axis=0)
    forecasts = dict(f)
    forecasts["charging_station"] = {**f["charging_station"], "others_kw": others,
                                     "price_cny_per_kwh": np.asarray(inputs.buy_price_cny_per_kwh, float) + carbon_cny}
    return dataclasses.replace(inputs, forecasts=forecasts)


@dataclass
class AggregateResult:
    """A cycle of the fast method: the virtual plan and every member's setpoints.

    ``p_kw`` maps a kind to its members' active setpoints (n_members, n_steps) [kW], in
    the order of the park's fleet; ``bus_mismatch_kw`` is the largest difference between a
    virtual asset's plan and the sum of its members' setpoints (the losses batteries skip,
    see :meth:`~vpp.dispatch.virtual.VirtualBatteryFleet.disaggregate`).
    ``base_violations`` counts the grid limits the members' base-step setpoints break in
    their AC check (run for coarse horizons and wherever the members differ from the
    plan; ``rounds`` plans were made to get there), ``strict_violations`` those of
    them in the first ``settings.strict_hours`` (all of them without a window); the
    seconds split the cycle.
    """

    virtual: DispatchResult
    p_kw: dict[str, np.ndarray]
    details: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    bus_mismatch_kw: float = 0.0
    window_conflicts: int = 0
    n_virtual: int = 0
    solve_s: float = 0.0
    solver_s: float = 0.0
    ac_check_s: float = 0.0
    aggregate_s: float = 0.0
    disaggregate_s: float = 0.0
    total_s: float = 0.0
    base_check_s: float = 0.0
    base_violations: int = 0
    strict_violations: int = 0
    rounds: int = 1

    @property
    def ok(self) -> bool:
        return self.virtual.ok


# Re-plans of a cycle whose quarter hours break a grid limit inside coarse planning steps.
_BASE_ROUNDS = 1
# Members' setpoints within this of the virtual plan at every bus [kW] need no AC check of their own.
_EXACT_KW = 1e-6


class AggregateDispatcher:
    """Plans a park through its virtual assets, cycle after cycle (one compiled problem)."""

    def __init__(self, park, group_by: str = "feeder"):
        """``group_by``: which virtual batteries and heat pumps share a plan (see
        :func:`cluster_assets`).  Raises SpecError for a park with a kind that has no
        virtual asset, members of a cluster that do not share their dynamics, or an
        unknown ``group_by``."""
        self.park = park
        self.virtual_park = aggregate_park(park, group_by)
        self.dispatcher = Dispatcher(self.virtual_park)
        # Portfolios are large: compile at start-up rather than in the first cycle.
        self.compile_s = self.dispatcher.compile()

    def dispatch(self, inputs: HorizonInputs, state: dict[str, dict[str, Any]]) -> AggregateResult:
        """Plan the horizon from the members' forecasts and states; setpoints for every member.

        A fallback of the virtual cycle gives each member its own fallback setpoints
        (never a disaggregated old plan), and the virtual fallback the virtual dispatcher
        checked is their per-bus sum, so its AC check is theirs.
        """
        t_start = time.perf_counter()
        inputs = with_ev_orders(self.park, inputs)
        # A virtual fallback must be the sum of the members' own fallbacks, not the last
        # virtual plan shifted (which could not be split without its solved variables).
        self.dispatcher.previous = None
        problem = self.dispatcher.problem
        limits = base_limits(self.park.grid, inputs)  # v_min, v_max, branch %, import, export per base step
        hours = self.park.settings.strict_hours
        strict = len(inputs.index) if hours is None else int(np.ceil(hours / self.park.settings.dt_h - 1e-9))
        base_s = solve_s = solver_s = ac_s = dis_s = 0.0
        violations = None
        for round_ in range(_BASE_ROUNDS + 1):
            virtual = self.dispatcher.dispatch(inputs, state)
            solve_s, solver_s, ac_s = solve_s + virtual.solve_s, solver_s + virtual.solver_s, ac_s + virtual.ac_check_s
            t0 = time.perf_counter()
            p_kw, details, mismatch = self._split(virtual, inputs, state)
            dis_s += time.perf_counter() - t0
            uniform = problem.horizon.uniform
            if not virtual.ok or (uniform and mismatch <= _EXACT_KW):
                break
            # The members' quarter hours, not only the planning steps, through the AC power
            # flow: inside coarse blocks they vary around the block, and batteries whose
            # offsets net against their share inject a little more than the plan.
            t0 = time.perf_counter()
            ac = self.park.grid.run_ac(*member_bus_injections(self.park, p_kw))
            violations = count_violations(ac, *limits)
            problem.fold_base_check(ac, limits[2])
            base_s += time.perf_counter() - t0
            # Re-plan for the quarter hours the next cycles carry out; further out the
            # margins folded above shape the next cycle's plan instead.  A uniform plan
            # has no blocks to fold, so planning it again would give the same plan.
            if uniform or violations[:strict].sum() == 0 or round_ == _BASE_ROUNDS:
                break
        checked = virtual.ok and violations is not None
        base_violations = int(violations.sum()) if checked else 0
        strict_violations = int(violations[:strict].sum()) if checked else 0
        if base_violations:
            virtual.reason = (f"{base_violations} grid limit violation(s) remain in the quarter hours of the "
                              f"members' setpoints after {round_ + 1} plan(s)"
                              + (f", {strict_violations} of them in the first {hours:g} h" if hours is not None else ""))
        total = time.perf_counter() - t_start
        return AggregateResult(
            virtual=virtual, p_kw=p_kw, details=details, bus_mismatch_kw=mismatch,
            window_conflicts=sum(getattr(f, "window_conflicts", 0) for f in problem.fleets.values()),
            n_virtual=sum(f.n for f in problem.fleets.values()), solve_s=solve_s, solver_s=solver_s, ac_check_s=ac_s,
            aggregate_s=total - solve_s - ac_s - dis_s - base_s, disaggregate_s=dis_s, total_s=total,
            base_check_s=base_s, base_violations=base_violations, strict_violations=strict_violations,
            rounds=round_ + 1,
        )

    def rehearse(self, inputs: HorizonInputs, state: dict[str, dict[str, Any]],
                 result: AggregateResult) -> AggregateResult:
        """Plan the next cycle ahead from the members' first setpoints in ``result`` and
        publish nothing (see :mod:`vpp.dispatch.rehearsal`): the grid rows and block
        margins its plan needs stay for the real next cycle.  Returns its result."""
        first = {kind: p[:, 0] for kind, p in result.p_kw.items()}
        return self.dispatch(*next_cycle(self.park, inputs, state, first, result.virtual.grid))

    def _split(self, virtual: DispatchResult, inputs: HorizonInputs, state):
        """Members' setpoints per base step, their details and the largest bus mismatch."""
        problem = self.dispatcher.problem
        p_kw, details, mismatch = {}, {}, 0.0
        hz = problem.horizon
        base = Horizon(hz.n_base_steps, hz.dt_h)  # members' own fallbacks plan every base step
        for kind, fleet in problem.fleets.items():
            if virtual.ok:
                parts = fleet.disaggregate()
                planned = problem.contributions[kind].p_kw.value
            else:
                member = self.park.fleets[kind]
                parts = {"p_kw": member.fallback_kw(state[kind], inputs.forecasts.get(kind, {}), base)}
                parts["p_base_kw"] = parts["p_kw"]
                planned = virtual.p_kw[fleet.ids].to_numpy().T
            mismatch = max(mismatch, float(np.max(np.abs(fleet.total(parts["p_kw"]) - planned), initial=0.0)))
            # Setpoints per base step: a planning step's power held over its block, or the
            # member's own base-step plan where the fleet has one (EV sessions, base loads).
            p_kw[kind] = parts.pop("p_base_kw", None)
            planning_kw = parts.pop("p_kw")
            if p_kw[kind] is None:
                p_kw[kind] = hz.expand(planning_kw)
            details[kind] = parts
        return p_kw, details, mismatch


# --- evaluation on the individual assets ---------------------------------------------------------

@dataclass
class PlanCheck:
    """Costs [CNY] and limit violations of a plan, recomputed from members' setpoints.

    ``violations`` counts member-steps beyond a limit by more than 1e-4 (kW, kWh) per
    limit name; ``worst`` gives the largest excess per name; ``grid`` the AC check's
    element violations over the horizon.
    """

    costs_cny: dict[str, float]
    violations: dict[str, int]
    worst: dict[str, float]
    grid_violations: int
    ev_unmet_kwh: float
    comfort_shortfall_kwh_th: float

    @property
    def total_cny(self) -> float:
        return float(sum(self.costs_cny.values()))

    @property
    def limit_violations(self) -> int:
        return int(sum(self.violations.values()))


_TOL = 1e-4


def _excess(name: str, values: np.ndarray, counts: dict, worst: dict) -> None:
    values = np.asarray(values, float)
    counts[name] = counts.get(name, 0) + int(np.sum(values > _TOL))
    worst[name] = max(worst.get(name, 0.0), float(np.max(values, initial=0.0)))


def member_bus_injections(park, p_kw: dict[str, np.ndarray], q_kvar: dict[str, np.ndarray] | None = None):
    """Bus totals (n_steps, n_buses) [kW], [kvar] of members' setpoints; without ``q_kvar``
    only the base loads draw reactive power (at their power factor)."""
    T = next(iter(p_kw.values())).shape[1]
    P = np.zeros((T, park.grid.n_buses))
    Q = np.zeros_like(P)
    for kind, fleet in park.fleets.items():
        buses = park.bus_positions(kind)
        np.add.at(P.T, buses, np.asarray(p_kw[kind], float))
        if q_kvar is not None and kind in q_kvar:
            np.add.at(Q.T, buses, np.asarray(q_kvar[kind], float))
        elif kind == "load":
            np.add.at(Q.T, buses, fleet.reactive_kvar(np.asarray(p_kw[kind], float)))
    return P, Q


def evaluate_plan(park, inputs: HorizonInputs, state: dict, p_kw: dict[str, np.ndarray],
                  q_kvar: dict[str, np.ndarray] | None = None) -> PlanCheck:
    """Recompute a plan's cost and check every member's limits from its setpoints alone.

    The members' energy, store and EV trajectories follow from their net setpoints
    through their own models (charging at the charge efficiency, discharging at the
    discharge efficiency), the grid exchange from an AC power flow of the bus totals, so
    two plans of one park (fast and monolithic) are judged by the same rules.
    """
    dt, T = park.settings.dt_h, len(inputs.index)
    counts: dict[str, int] = {}
    worst: dict[str, float] = {}
    costs = {"battery_degradation": 0.0, "comfort_violation": 0.0, "ev_unmet_energy": 0.0}
    pen = park.settings.penalties
    shortfall_total = unmet_total = 0.0
    for kind, fleet in park.fleets.items():
        p = np.asarray(p_kw[kind], float)
        forecast = inputs.forecasts.get(kind, {})
        if kind == "battery":
            st = fleet.storage
            _excess("battery.p_charge_kw", -p - st.p_ch_max_kw[:, None], counts, worst)
            _excess("battery.p_discharge_kw", p - st.p_dis_max_kw[:, None], counts, worst)
            e0 = np.clip(state[kind]["e_kwh"], st.e_min_kwh, st.e_max_kwh)
            e = st.trajectory_kwh(e0, p, dt)
            _excess("battery.soc_min_kwh", st.e_min_kwh[:, None] - e[:, 1:], counts, worst)
            _excess("battery.soc_max_kwh", e[:, 1:] - st.e_max_kwh[:, None], counts, worst)
            end = np.clip(np.where(np.isnan(st.end_frac), e0, st.end_frac * st.e_kwh), st.e_min_kwh, st.e_max_kwh)
            _excess("battery.end_kwh", end - e[:, T], counts, worst)
            costs["battery_degradation"] += float(np.sum(st.deg_cny_per_kwh[:, None] * np.abs(p)) * dt)
        elif kind == "heat_pump":
            p_el = -p
            _excess("heat_pump.p_max_kw", p_el - fleet.p_max_kw[:, None], counts, worst)
            _excess("heat_pump.p_min_kw", fleet.p_min_kw[:, None] - p_el, counts, worst)
            cop, heat = np.asarray(forecast["cop"], float), np.asarray(forecast["heat_kw_th"], float)
            e0 = np.minimum(state[kind]["e_th_kwh"], fleet.cap_kwh)
            e = np.empty((fleet.n, T + 1))
            e[:, 0] = e0
            for t in range(T):
                e[:, t + 1] = e[:, t] * (1 - fleet.loss_per_h * dt) + (cop[:, t] * p_el[:, t] - heat[:, t]) * dt
            _excess("heat_pump.store_max_kwh_th", e[:, 1:] - fleet.cap_kwh[:, None], counts, worst)
            frac = np.array([np.nan if s.soc_end_target_frac is None else s.soc_end_target_frac for s in fleet.specs])
            end = np.clip(np.where(np.isnan(frac), e0, frac * fleet.cap_kwh), 0.0, fleet.cap_kwh)
            shortfall = float(np.sum(np.maximum(-e[:, 1:], 0.0)) * dt + np.sum(np.maximum(end - e[:, T], 0.0)))
            shortfall_total += shortfall
            costs["comfort_violation"] += pen.comfort_cny_per_kwh_th * shortfall
        elif kind == "pv":
            avail = np.clip(np.asarray(forecast["avail_kw"], float), 0.0, fleet.s_kva[:, None])
            _excess("pv.p_avail_kw", p - avail, counts, worst)
            _excess("pv.p_negative_kw", -p, counts, worst)
        elif kind == "charging_station":
            if any(len(s.chargers) != 1 for s in fleet.specs):
                raise SpecError("evaluate_plan.charging_station", "checks stations of one charger each")
            table = session_table(fleet, forecast.get("sessions"), inputs.index, dt, state[kind].get("delivered_kwh"))
            charge_kw = -p
            _excess("charging_station.p_export_kw", -charge_kw, counts, worst)
            allowed = np.zeros_like(charge_kw)
            np.add.at(allowed, table["station"], table["cap_kwh"] / (table["eff"][:, None] * dt))
            _excess("charging_station.p_car_max_kw", charge_kw - allowed, counts, worst)
            # A station's steps belong to at most one session: what it draws then goes to that car.
            plugged = table["cap_kwh"] > 0
            delivered = np.sum(np.where(plugged, charge_kw[table["station"]], 0.0), axis=1) * table["eff"] * dt
            unmet = np.maximum(table["need_kwh"] - delivered, 0.0)
            unmet_total += float(unmet.sum())
            costs["ev_unmet_energy"] += pen.ev_unmet_cny_per_kwh * float(unmet.sum())
    # Grid exchange by AC power flow of the bus totals.
    grid = park.grid
    ac = grid.run_ac(*member_bus_injections(park, p_kw, q_kvar))
    imp, exp = np.clip(ac.p_slack_kw, 0.0, None), np.clip(-ac.p_slack_kw, 0.0, None)
    costs["energy"] = float(np.sum(inputs.buy_price_cny_per_kwh * imp - inputs.sell_price_cny_per_kwh * exp) * dt)
    rate = park.tariff.demand_charge_cny_per_kw_month
    costs["demand_charge"] = float(rate * max(float(imp.max(initial=0.0)) - inputs.peak_import_so_far_kw, 0.0))
    costs["carbon"] = float(np.sum(inputs.carbon_kg_per_kwh * imp) * dt * park.carbon.price_cny_per_t / 1000.0)
    grid_violations = int(count_violations(ac, *base_limits(grid, inputs)).sum())
    return PlanCheck(costs, counts, worst, grid_violations, unmet_total, shortfall_total)
