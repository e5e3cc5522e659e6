"""Virtual assets: one fleet row stands for a cluster of similar assets at one bus.

Each virtual fleet is an ordinary :class:`~vpp.assets.base.Fleet`, so the existing
:class:`~vpp.dispatch.problem.DispatchProblem` plans it unchanged.  It holds the member
fleet (the real assets) and, every cycle, turns the members' state and forecasts into its
own parameters such that **every plan of the virtual asset splits into plans of its
members that keep each member's own limits and add up to the virtual plan** (an inner
approximation of the members' joint flexibility; see :mod:`vpp.dispatch.aggregate` for
the method and its bound).  ``disaggregate`` performs that split after a solve.

Coefficients that change every cycle (a heat pump's COP, an EV reference profile) are
one small ``cp.Parameter`` per virtual asset: cvxpy's DPP compile of an elementwise
product with one large parameter grows with the square of its size.
"""

from __future__ import annotations

import copy

import cvxpy as cp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vpp.assets.base import Contribution, Fleet, Horizon, Penalties, nonneg_param, require_shape
from vpp.errors import SpecError

# Offsets between a member and its share of the virtual asset are moved to zero over a
# ramp whose power is at most this share of the member's own power rating.
RAMP_POWER_FRAC = 0.25
# End offsets below this share of their group's capacity are dropped (the group ends that much fuller).
END_OFFSET_TOL = 1e-4
# The end part of the battery offsets moves within this many hours before the horizon's end.
END_WINDOW_H = 3.0


class VirtualFleet(Fleet):
    """Rows are clusters of ``members`` rows: ``cluster[i]`` is member i's virtual row.

    Every row sits at one bus.  Storage kinds may also share their plan across rows:
    ``group[r]`` is row r's *plan group*, and all rows of a group (the same product on
    different buses of one LV feeder, say) follow one set of LP variables, each row with
    its members' share.  The grid rows still see every bus's own injection; the LP has
    one plan per group instead of one per row.  Without ``group`` every row is its own.
    """

    def __init__(self, members: Fleet, cluster: np.ndarray, ids: list[str], group: np.ndarray | None = None):
        self.members = members
        self.specs = []
        self.ids = list(ids)
        self.cluster = np.asarray(cluster, dtype=int)
        m, n = self.cluster.size, len(self.ids)
        self.sum_matrix = sp.csr_matrix((np.ones(m), (self.cluster, np.arange(m))), shape=(n, m))
        self.group = np.arange(n) if group is None else np.asarray(group, dtype=int)
        if self.group.shape != (n,):
            raise SpecError("aggregate.group", f"expected one plan group per virtual asset ({n})")
        self.n_groups = int(self.group.max()) + 1 if n else 0
        self.member_group = self.group[self.cluster]
        self._order = np.argsort(self.member_group, kind="stable")
        self._starts = np.searchsorted(self.member_group[self._order], np.arange(self.n_groups))

    @property
    def n(self) -> int:
        return len(self.ids)

    def __deepcopy__(self, memo):
        # Problems deep-copy their fleets; the member fleet is read-only here and can be large.
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            setattr(clone, key, value if key == "members" else copy.deepcopy(value, memo))
        return clone

    def total(self, member_values: np.ndarray) -> np.ndarray:
        """Per-virtual (row) sums of member rows."""
        return np.asarray(self.sum_matrix @ np.asarray(member_values, float))

    def group_total(self, member_values: np.ndarray) -> np.ndarray:
        """Per plan group sums of member rows."""
        out = np.zeros((self.n_groups,) + np.shape(member_values)[1:])
        np.add.at(out, self.member_group, np.asarray(member_values, float))
        return out

    def group_max(self, member_values: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(np.asarray(member_values, float)[self._order], self._starts, axis=0)

    def group_min(self, member_values: np.ndarray) -> np.ndarray:
        return np.minimum.reduceat(np.asarray(member_values, float)[self._order], self._starts, axis=0)

    def row_fraction(self, member_share: np.ndarray) -> sp.csr_matrix:
        """(rows, groups): each row's part of its group's plan, the sum of its members' shares."""
        return sp.csr_matrix((self.total(member_share), (np.arange(self.n), self.group)), shape=(self.n, self.n_groups))

    def initial_state(self):
        return self.members.initial_state()

    def fallback_kw(self, state, forecast, horizon: Horizon) -> np.ndarray:
        return self.total(self.members.fallback_kw(state, forecast, horizon))

    def power_range(self):
        lo, hi, q = self.members.power_range()
        return self.total(lo), self.total(hi), self.total(q) if self.kind == "load" else np.zeros(self.n)

    def plant_step(self, state, setpoint_kw, actual, dt_h):
        """Split each virtual setpoint over its members in proportion to their power range
        in its direction, step the members' plant and return the per-virtual realised power."""
        lo, hi, _ = self.members.power_range()
        setpoint = np.nan_to_num(np.asarray(setpoint_kw, float))[self.cluster]
        lo_sum, hi_sum = self.total(lo)[self.cluster], self.total(hi)[self.cluster]
        up = np.divide(hi, hi_sum, out=np.zeros_like(hi), where=hi_sum > 0)
        down = np.divide(lo, lo_sum, out=np.zeros_like(lo), where=lo_sum < 0)
        state, p, extras = self.members.plant_step(state, np.where(setpoint >= 0, up, down) * setpoint, actual, dt_h)
        return state, self.total(p), extras


def ramp_offsets(start: np.ndarray, end: np.ndarray, ramp_steps: np.ndarray, n_steps: int) -> np.ndarray:
    """Offsets (m, n_steps + 1): ``start`` fading linearly to 0 over ``ramp_steps`` steps, and 0
    growing to ``end`` over the last ``ramp_steps`` steps."""
    t = np.arange(n_steps + 1)[None, :]
    r = np.maximum(np.asarray(ramp_steps, float), 1.0)[:, None]
    return (start[:, None] * np.clip(1.0 - t / r, 0.0, 1.0)
            + end[:, None] * np.clip(1.0 - (n_steps - t) / r, 0.0, 1.0))


def demand_limited_offsets(offset_kwh: np.ndarray, keep: np.ndarray, demand_kwh: np.ndarray) -> np.ndarray:
    """Heat-pump offsets (m, T + 1) that fall no faster than each member's own heat demand
    and store losses can empty its store: ``offset_kwh`` where it falls slower, else
    ``keep * o[t] - demand_kwh[t]``.

    A member whose offset falls must heat less than its share, and where its demand is
    low (summer, a mild noon) it cannot shed heat any faster than by not heating at all.
    A faster fall would make every other plan of its group heat more (and overfill the
    group's store), so the LP would have no solution.  With this bound the group heating
    exactly its demand never asks a member for negative heat."""
    out = offset_kwh.copy()
    for t in range(out.shape[1] - 1):
        out[:, t + 1] = np.maximum(offset_kwh[:, t + 1], keep[:, t] * out[:, t] - demand_kwh[:, t])
    return out


class VirtualBatteryFleet(VirtualFleet):
    """Batteries of one product (same efficiencies, self-discharge, C-rate, SoC window) at a bus.

    Member i takes the share ``s_i = e_kwh_i / sum e_kwh`` of its group's charge and
    discharge power and energy, plus an *offset*: the difference between its energy and
    that share.  The offset has two parts.

    - The *start* part evens out the spread of initial states: it falls from
      ``e0_i - s_i * E0`` to zero at a quarter of the member's rating, a fixed
      trajectory.
    - The *end* part brings each member to its own end target ``e_end_i``.  It is
      ``(e_end_i - s_i * E_end) * b(t)``, with one profile ``b`` per group that the LP
      chooses: 0 until the start part is gone and before the last ``END_WINDOW_H``
      hours, non-decreasing, and 1 at the end.  So the LP decides when and how fast the
      members part again, for instance while the group tops up in the morning, instead
      of a fixed ramp at a quarter of their rating.  (Letting b move over the whole
      horizon gave plans within 0.1 % of these on the portfolios measured, but made
      the 10,000-asset solves 1.3 to 2 times slower; docs/performance.md.)

    The virtual window and power limits are the tightest any member allows with its
    offset.  Every member of a group has the same window and power per unit of share,
    so the end part binds only for the members furthest above and below their share
    (``end_up``, ``end_down``), a few rows per group whatever its size.  Members with
    equal SoC and end target have no offset: the virtual battery is then exactly their
    sum.
    """

    kind = "battery"

    def __init__(self, members, cluster, ids, group=None):
        super().__init__(members, cluster, ids, group)
        st = members.storage
        first = self._order[self._starts]
        for name in ("eta_ch", "eta_dis", "sd_per_h", "deg_cny_per_kwh"):
            values = getattr(st, name)
            if np.any(np.abs(values - values[first][self.member_group]) > 1e-12):
                raise SpecError(f"aggregate.battery.{name}", "members of one virtual battery must share it")
        self.eta_ch, self.eta_dis, self.sd_per_h, self.deg = (getattr(st, n)[first] for n in
                                                              ("eta_ch", "eta_dis", "sd_per_h", "deg_cny_per_kwh"))
        self.e_total_kwh = self.group_total(st.e_kwh)
        self.share = st.e_kwh / self.e_total_kwh[self.member_group]
        self.fraction = self.row_fraction(self.share)

    def build(self, horizon: Horizon) -> Contribution:
        n, g, T = self.n, self.n_groups, horizon.n_steps
        self.horizon = horizon
        self.p_ch = cp.Variable((g, T), nonneg=True, name="vbat_p_ch_kw")
        self.p_dis = cp.Variable((g, T), nonneg=True, name="vbat_p_dis_kw")
        self.e = cp.Variable((g, T + 1), name="vbat_e_kwh")
        self.e0 = cp.Parameter(g, name="vbat_e0_kwh", value=np.zeros(g))
        self.e_end = cp.Parameter(g, name="vbat_e_end_kwh", value=np.zeros(g))
        self.e_lo, self.e_hi = nonneg_param((g, T), "vbat_e_lo_kwh"), nonneg_param((g, T), "vbat_e_hi_kwh")
        self.ch_max, self.dis_max = nonneg_param((g, T), "vbat_ch_max_kw"), nonneg_param((g, T), "vbat_dis_max_kw")
        self.offset_kw = cp.Parameter((n, T), name="vbat_offset_kw", value=np.zeros((n, T)))
        self.offset_cost = cp.Parameter(nonneg=True, name="vbat_offset_degradation_cny", value=0.0)
        # The end part of the offsets: per group, its profile b (in place, moved per step),
        # the largest end offset above and below a member's share per unit of share
        # [kWh per kWh] and the degradation of its members' end flows per unit moved; per
        # row, the power those flows inject per unit of b moved per hour.
        self.end_b = cp.Variable((g, T + 1), nonneg=True, name="vbat_end_profile")
        self.end_moved = cp.Variable((g, T), nonneg=True, name="vbat_end_moved")
        self.end_allowed = nonneg_param((g, T + 1), "vbat_end_allowed")
        self.end_up, self.end_down = nonneg_param((g,), "vbat_end_up_kwh"), nonneg_param((g,), "vbat_end_down_kwh")
        self.end_row_kwh = cp.Parameter(n, name="vbat_end_row_kwh", value=np.zeros(n))
        self.end_deg_cny = nonneg_param((g,), "vbat_end_degradation_cny")
        keep = 1.0 - horizon.per_step(self.sd_per_h)
        end_b = self.end_b[:, 1:]
        moved_per_h = self.end_moved / horizon.step_h[None, :]
        constraints = [
            self.e[:, 0] == self.e0,
            self.e[:, 1:] == cp.multiply(keep, self.e[:, :-1]) + cp.multiply(horizon.per_step(self.eta_ch), self.p_ch)
            - cp.multiply(horizon.per_step(1.0 / self.eta_dis), self.p_dis),
            self.e[:, 1:] + cp.diag(self.end_up) @ end_b <= self.e_hi,
            self.e[:, 1:] - cp.diag(self.end_down) @ end_b >= self.e_lo,
            self.p_ch + cp.diag(self.end_up) @ cp.multiply(1.0 / self.eta_ch[:, None], moved_per_h) <= self.ch_max,
            self.p_dis + cp.diag(self.end_down) @ cp.multiply(self.eta_dis[:, None], moved_per_h) <= self.dis_max,
            self.e[:, T] >= self.e_end,
            # b rises from 0 to 1 (its stored part decaying like the store) where allowed.
            self.end_b[:, 0] == 0.0,
            self.end_b[:, 1:] == cp.multiply(keep, self.end_b[:, :-1]) + self.end_moved,
            self.end_b <= self.end_allowed,
            self.end_b[:, T] == 1.0,
        ]
        degradation = (cp.sum(cp.multiply(horizon.per_step(self.deg), self.p_ch + self.p_dis)) + self.offset_cost
                       + self.end_deg_cny @ cp.sum(self.end_moved, axis=1))
        p_kw = (self.fraction @ (self.p_dis - self.p_ch) + self.offset_kw
                + cp.diag(self.end_row_kwh) @ moved_per_h[self.group])
        return Contribution(p_kw=p_kw, constraints=constraints, costs_cny={"battery_degradation": degradation})

    def update(self, state, forecast, penalties: Penalties) -> None:
        st, T, c = self.members.storage, self.e_lo.shape[1], self.member_group
        dt = self.horizon.step_h[None, :]
        e0 = np.clip(require_shape("battery.e_kwh", state["e_kwh"], (st.n,)), st.e_min_kwh, st.e_max_kwh)
        e_end = np.clip(np.where(np.isnan(st.end_frac), e0, st.end_frac * st.e_kwh), st.e_min_kwh, st.e_max_kwh)
        E0, Eend = self.group_total(e0), self.group_total(e_end)
        self.e0_members = e0
        share = self.share[:, None]
        # The start part: a fixed ramp, in planning steps at the finest step (slower in longer ones).
        start = e0 - self.share * E0[c]
        rate_kwh = RAMP_POWER_FRAC * np.minimum(st.p_ch_max_kw * st.eta_ch, st.p_dis_max_kw / st.eta_dis) * dt.min()
        steps = np.clip(self.group_max(np.ceil(np.abs(start) / rate_kwh)), 1, T // 2)
        self.start_kwh = ramp_offsets(start, np.zeros_like(start), steps[c], T)
        keep = 1.0 - st.sd_per_h[:, None] * dt
        moved = self.start_kwh[:, 1:] - keep * self.start_kwh[:, :-1]
        self.off_ch_kw = np.maximum(moved, 0.0) / (st.eta_ch[:, None] * dt)
        self.off_dis_kw = np.maximum(-moved, 0.0) * st.eta_dis[:, None] / dt
        lo = self.group_max((st.e_min_kwh[:, None] - self.start_kwh[:, 1:]) / share)
        hi = self.group_min((st.e_max_kwh[:, None] - self.start_kwh[:, 1:]) / share)
        self.window_conflicts = int(np.sum(lo > hi + 1e-9))
        self.e0.value = E0
        self.e_lo.value, self.e_hi.value = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
        self.ch_max.value = np.maximum(self.group_min((st.p_ch_max_kw[:, None] - self.off_ch_kw) / share), 0.0)
        self.dis_max.value = np.maximum(self.group_min((st.p_dis_max_kw[:, None] - self.off_dis_kw) / share), 0.0)
        self.offset_kw.value = self.total(self.off_dis_kw - self.off_ch_kw)
        self.offset_cost.value = float(np.sum(st.deg_cny_per_kwh[:, None] * (self.off_ch_kw + self.off_dis_kw) * dt))
        # The end part: members above their share charge as b rises, those below discharge.
        self.end_kwh = e_end - self.share * Eend[c]
        # Groups whose members all end within a hair of their share drop their end offsets
        # (exact zeros let presolve turn their rows into bounds) and end that much fuller.
        tiny = self.group_max(np.abs(self.end_kwh) / self.share) < END_OFFSET_TOL * self.e_total_kwh
        self.e_end.value = Eend + np.where(tiny, self.group_max(np.maximum(self.end_kwh, 0.0) / self.share), 0.0)
        self.end_kwh = np.where(tiny[c], 0.0, self.end_kwh)
        up, down = np.maximum(self.end_kwh, 0.0), np.maximum(-self.end_kwh, 0.0)
        self.end_up.value, self.end_down.value = self.group_max(up / self.share), self.group_max(down / self.share)
        # b may move once the start part is gone, within the last END_WINDOW_H hours: the
        # LP then carries these rows for a few steps, not the whole horizon.
        hours_to_end = np.append(np.cumsum(self.horizon.step_h[::-1])[::-1], 0.0)
        self.end_allowed.value = ((np.arange(T + 1)[None, :] >= steps[:, None])
                                  & (hours_to_end[None, :] <= END_WINDOW_H + 1e-9)).astype(float)
        self.end_row_kwh.value = self.total(down * st.eta_dis - up / st.eta_ch)
        self.end_deg_cny.value = self.group_total(st.deg_cny_per_kwh * (up / st.eta_ch + down * st.eta_dis))

    def offsets_kwh(self) -> np.ndarray:
        """Members' planned offsets (m, T + 1) [kWh]: the start ramp and the end part the LP placed."""
        return self.start_kwh + self.end_kwh[:, None] * self.end_b.value[self.member_group]

    def disaggregate(self) -> dict[str, np.ndarray]:
        """Members' net power (m, T) [kW] and the energy (m, T + 1) [kWh] it leaves them with.

        Each member follows its planned energy, its share of the virtual energy plus its
        offset, which the virtual window keeps within the member's own.  Its setpoint is
        the net power that moves it there.  Where its offset runs against its share (a
        fuller member charging less than its share while its offset falls, say) the plan
        counts both flows with their losses, but the plant only sees the net flow: the
        member then needs less energy from the grid than the plan counted, and its
        setpoint injects more than its plan by at most ``(1 / (eta_ch * eta_dis) - 1)``
        times the smaller of its charge and discharge flows (about 11 % of the offset's
        power at 95 % each way).  Following the plan's energy instead of its power keeps
        the member within its window without a margin for those skipped losses.
        """
        st, c = self.members.storage, self.member_group
        dt = self.horizon.step_h[None, :]
        planned = np.clip(self.share[:, None] * self.e.value[c] + self.offsets_kwh(),
                          st.e_min_kwh[:, None], st.e_max_kwh[:, None])
        planned[:, 0] = self.e0_members
        gain = planned[:, 1:] - (1.0 - st.sd_per_h[:, None] * dt) * planned[:, :-1]
        p = np.where(gain > 0, -gain / (st.eta_ch[:, None] * dt), -gain * st.eta_dis[:, None] / dt)
        p = np.clip(p, -st.p_ch_max_kw[:, None], st.p_dis_max_kw[:, None])
        return {"p_kw": p, "e_kwh": st.trajectory_kwh(self.e0_members, p, self.horizon.step_h)}

    def plan_details(self):
        e_rows = self.fraction @ self.e.value[:, 1:] + self.total(self.offsets_kwh()[:, 1:])
        return {"soc_frac": e_rows / self.total(self.members.storage.e_kwh)[:, None]}


class VirtualHeatPumpFleet(VirtualFleet):
    """Heat pumps with the same store loss rate at a bus.

    The virtual variable is the heat output ``h`` [kW_th].  Member i delivers
    ``w_i h + g_i`` with ``w_i`` its share of the store capacity and ``g_i`` a fixed heat
    offset (covering its initial-state spread, end target and any demand not in
    proportion to its store); its electric power is that over its own COP, so the
    virtual electric power is ``h * sum(w_i / cop_i) + sum(g_i / cop_i)``, exact for any
    mix of COPs.  Heat bounds and the store window are the tightest any member allows;
    a member's comfort shortfall never exceeds its share of the virtual one.
    """

    kind = "heat_pump"

    def __init__(self, members, cluster, ids, group=None):
        super().__init__(members, cluster, ids, group)
        loss = members.loss_per_h
        first = self._order[self._starts]
        if np.any(np.abs(loss - loss[first][self.member_group]) > 1e-12):
            raise SpecError("aggregate.heat_pump.store_loss_frac_per_h", "members of one virtual heat pump must share it")
        self.loss_per_h = loss[first]
        self.cap_total = self.group_total(members.cap_kwh)
        self.share = members.cap_kwh / self.cap_total[self.member_group]
        self.fraction = self.row_fraction(self.share)
        self.end_frac = np.array([np.nan if s.soc_end_target_frac is None else s.soc_end_target_frac
                                  for s in members.specs])

    def build(self, horizon: Horizon) -> Contribution:
        n, g, T = self.n, self.n_groups, horizon.n_steps
        self.horizon = horizon
        self.h = cp.Variable((g, T), name="vhp_heat_kw_th")
        self.e = cp.Variable((g, T + 1), name="vhp_e_th_kwh")
        self.shortfall = cp.Variable((g, T), nonneg=True, name="vhp_shortfall_kwh_th")
        self.end_shortfall = cp.Variable(g, nonneg=True, name="vhp_end_shortfall_kwh_th")
        # Electric power per unit of its group's heat, per row (its members' shares over their COPs).
        self.el_per_heat = [nonneg_param((T,), f"vhp_el_per_heat_{v}") for v in range(n)]
        self.offset_el = cp.Parameter((n, T), name="vhp_offset_el_kw", value=np.zeros((n, T)))
        self.demand = cp.Parameter((g, T), name="vhp_demand_kw_th", value=np.zeros((g, T)))
        self.h_lo = cp.Parameter((g, T), name="vhp_heat_lo_kw_th", value=np.zeros((g, T)))
        self.h_hi = cp.Parameter((g, T), name="vhp_heat_hi_kw_th", value=np.zeros((g, T)))
        self.e_lo = cp.Parameter((g, T), name="vhp_e_lo_kwh_th", value=np.zeros((g, T)))
        self.e_hi = cp.Parameter((g, T), name="vhp_e_hi_kwh_th", value=np.zeros((g, T)))
        self.e0 = cp.Parameter(g, name="vhp_e0_kwh_th", value=np.zeros(g))
        self.e_end = cp.Parameter(g, name="vhp_e_end_kwh_th", value=np.zeros(g))
        self.comfort_price = cp.Parameter(nonneg=True, name="vhp_comfort_price", value=0.0)
        dt = np.broadcast_to(horizon.step_h, (g, T))
        keep = 1.0 - horizon.per_step(self.loss_per_h)
        constraints = [
            self.h >= self.h_lo, self.h <= self.h_hi,
            self.e[:, 0] == self.e0,
            self.e[:, 1:] == cp.multiply(keep, self.e[:, :-1]) + cp.multiply(dt, self.h - self.demand),
            self.e[:, 1:] <= self.e_hi,
            self.e[:, 1:] + self.shortfall >= self.e_lo,
            self.e[:, T] + self.end_shortfall >= self.e_end,
        ]
        p_el = cp.vstack([cp.multiply(self.el_per_heat[v], self.h[self.group[v]]) for v in range(n)]) + self.offset_el
        comfort = self.comfort_price * (cp.sum(self.shortfall @ horizon.step_h) + cp.sum(self.end_shortfall))
        return Contribution(p_kw=-p_el, constraints=constraints, costs_cny={"comfort_violation": comfort})

    def update(self, state, forecast, penalties: Penalties) -> None:
        hp, hz, c = self.members, self.horizon, self.member_group
        m, T = hp.n, hz.n_steps
        dt = hz.step_h[None, :]
        cop_base = require_shape("heat_pump.cop", forecast["cop"], (m, hz.n_base_steps))
        if np.any(cop_base <= 0):
            raise SpecError("heat_pump.cop", "must be positive")
        # A planning step holds each member's heat output constant over its base steps, so
        # its electric energy follows the block mean of 1 / COP, and its power limits bind
        # at the block's extreme COPs.
        self.cop_base = cop_base
        self.inv_cop = hz.coarsen(1.0 / cop_base)
        cop_lo, cop_hi = hz.coarsen(cop_base, "min"), hz.coarsen(cop_base, "max")
        demand = hz.coarsen(np.clip(require_shape("heat_pump.heat_kw_th", forecast["heat_kw_th"],
                                                  (m, hz.n_base_steps)), 0.0, None))
        e0 = np.minimum(require_shape("heat_pump.e_th_kwh", state["e_th_kwh"], (m,)), hp.cap_kwh)
        e_end = np.clip(np.where(np.isnan(self.end_frac), e0, self.end_frac * hp.cap_kwh), 0.0, hp.cap_kwh)
        w = self.share[:, None]
        D, E0, Eend = self.group_total(demand), self.group_total(e0), self.group_total(e_end)
        start, end = e0 - self.share * E0[c], e_end - self.share * Eend[c]
        rate_kwh = RAMP_POWER_FRAC * hp.p_max_kw * cop_lo.min(axis=1) * dt.min()
        steps = np.clip(self.group_max(np.ceil(np.maximum(np.abs(start), np.abs(end)) / rate_kwh)), 1, T // 2)[c]
        keep = 1.0 - hp.loss_per_h[:, None] * dt
        self.offset_kwh = demand_limited_offsets(ramp_offsets(start, end, steps, T), keep, demand * dt)
        self.offset_heat = (self.offset_kwh[:, 1:] - keep * self.offset_kwh[:, :-1]) / dt + demand - w * D[c]
        self.h_lo.value = self.group_max((hp.p_min_kw[:, None] * cop_hi - self.offset_heat) / w)
        self.h_hi.value = self.group_min((hp.p_max_kw[:, None] * cop_lo - self.offset_heat) / w)
        self.window_conflicts = int(np.sum(self.h_lo.value > self.h_hi.value + 1e-9))
        self.e_lo.value = self.group_max(-self.offset_kwh[:, 1:] / w)
        self.e_hi.value = self.group_min((hp.cap_kwh[:, None] - self.offset_kwh[:, 1:]) / w)
        el_per_heat = self.total(w * self.inv_cop)
        for v in range(self.n):
            self.el_per_heat[v].value = el_per_heat[v]
        self.offset_el.value = self.total(self.offset_heat * self.inv_cop)
        self.demand.value, self.e0.value, self.e_end.value = D, E0, Eend
        self.comfort_price.value = penalties.comfort_cny_per_kwh_th

    def disaggregate(self) -> dict[str, np.ndarray]:
        """Members' electric power per planning and per base step [kW, negative], heat
        (m, T) [kW_th] and store (m, T + 1) [kWh_th]."""
        w, c = self.share[:, None], self.member_group
        heat = w * self.h.value[c] + self.offset_heat
        return {"p_kw": -heat * self.inv_cop, "p_base_kw": -self.horizon.expand(heat) / self.cop_base,
                "heat_kw_th": heat, "e_th_kwh": w * self.e.value[c] + self.offset_kwh}

    def plan_details(self):
        return {"e_th_kwh": self.fraction @ self.e.value[:, 1:] + self.total(self.offset_kwh[:, 1:]),
                "shortfall_kwh_th": self.fraction @ self.shortfall.value}


class VirtualPVFleet(VirtualFleet):
    """PV systems at a bus: every member is curtailed by the same fraction of its available
    output, so any virtual output up to the summed availability splits exactly.  Virtual
    PV plans no reactive power (members keep unity power factor)."""

    kind = "pv"

    def build(self, horizon: Horizon) -> Contribution:
        n, T = self.n, horizon.n_steps
        self.horizon = horizon
        self.avail = nonneg_param((n, T), "vpv_avail_kw")
        self.p = cp.Variable((n, T), nonneg=True, name="vpv_p_kw")
        return Contribution(p_kw=self.p, constraints=[self.p <= self.avail])

    def update(self, state, forecast, penalties: Penalties) -> None:
        hz = self.horizon
        avail = require_shape("pv.avail_kw", forecast["avail_kw"], (self.members.n, hz.n_base_steps))
        self.member_avail_base = np.clip(avail, 0.0, self.members.s_kva[:, None])
        self.member_avail = hz.coarsen(self.member_avail_base)
        self.avail.value = self.total(self.member_avail)

    def disaggregate(self) -> dict[str, np.ndarray]:
        total = self.avail.value[self.cluster]
        fraction = np.divide(self.p.value[self.cluster], total, out=np.zeros_like(total), where=total > 1e-9)
        # The same share of the available output in every base step of a planning step.
        fraction = np.clip(fraction, 0.0, 1.0)
        return {"p_kw": fraction * self.member_avail,
                "p_base_kw": self.horizon.expand(fraction) * self.member_avail_base}

    def plan_details(self):
        return {"curtailed_kw": self.avail.value - self.p.value}


class VirtualLoadFleet(VirtualFleet):
    """Inflexible loads at a bus: their forecasts add up exactly, reactive power included."""

    kind = "load"

    def build(self, horizon: Horizon) -> Contribution:
        self.horizon = horizon
        self.demand = nonneg_param((self.n, horizon.n_steps), "vload_demand_kw")
        self.demand_q = cp.Parameter((self.n, horizon.n_steps), name="vload_demand_kvar",
                                     value=np.zeros((self.n, horizon.n_steps)))
        return Contribution(p_kw=-self.demand, q_kvar=-self.demand_q)

    def update(self, state, forecast, penalties: Penalties) -> None:
        demand = require_shape("load.demand_kw", forecast["demand_kw"], (self.members.n, self.horizon.n_base_steps))
        if np.any(demand < 0):
            raise SpecError("load.demand_kw", "consumption magnitudes must be >= 0")
        self.member_demand_base = demand
        demand = self.member_demand = self.horizon.coarsen(demand)
        self.demand.value = self.total(demand)
        self.demand_q.value = self.total(demand * self.members.tan_phi[:, None])

    def disaggregate(self) -> dict[str, np.ndarray]:
        return {"p_kw": -self.member_demand, "p_base_kw": -self.member_demand_base}

    def reactive_kvar(self, p_kw: np.ndarray) -> np.ndarray:
        """Reactive injection [kvar] with active injection ``p_kw`` (n, ...), at the members'
        peak-weighted power factor (exact when they share one)."""
        peak = self.members.column("peak_kw")
        tan_phi = self.total(peak * self.members.tan_phi) / self.total(peak)
        return p_kw * tan_phi.reshape((-1,) + (1,) * (np.ndim(p_kw) - 1))


def session_table(stations: Fleet, sessions: pd.DataFrame | None, index: pd.DatetimeIndex, dt_h: float,
                  delivered_kwh: dict | None = None) -> dict[str, np.ndarray]:
    """Per session planned in this horizon: its station row, plugged steps' energy per step
    at the car's limit (n_s, T) [kWh], efficiency and wanted energy [kWh], as the station
    fleet counts them (whole steps only; energy the car can still get after the horizon
    is not needed now; energy already delivered is taken off)."""
    T = len(index)
    empty = {"station": np.zeros(0, int), "cap_kwh": np.zeros((0, T)), "eff": np.zeros(0), "need_kwh": np.zeros(0)}
    if sessions is None or len(sessions) == 0:
        return empty
    row_of = {sid: k for k, sid in enumerate(stations.ids)}
    rating, eff = {}, {}
    for k, spec in enumerate(stations.specs):
        for ch in spec.chargers:
            rating[(spec.id, ch.id)], eff[(spec.id, ch.id)] = ch.rating_kw, ch.efficiency
    step = pd.Timedelta(hours=dt_h)
    end = index[-1] + step
    s = sessions[(sessions["departure"] > index[0]) & (sessions["arrival"] < end) & (sessions["energy_kwh"] > 0)]
    s = s[s["station_id"].isin(row_of)]
    if len(s) == 0:
        return empty
    keys = list(zip(s["station_id"], s["charger_id"]))
    missing = [k for k in keys if k not in rating]
    if missing:
        raise SpecError("charging_station.sessions", f"no charger {missing[0][1]!r} at station {missing[0][0]!r}")
    ordered = s.sort_values(["station_id", "charger_id", "arrival"])
    same = ((ordered["station_id"].to_numpy()[1:] == ordered["station_id"].to_numpy()[:-1])
            & (ordered["charger_id"].to_numpy()[1:] == ordered["charger_id"].to_numpy()[:-1]))
    overlap = same & (pd.DatetimeIndex(ordered["arrival"]).asi8[1:] < pd.DatetimeIndex(ordered["departure"]).asi8[:-1])
    if overlap.any():
        first = ordered["session_id"].to_numpy()[1:][overlap][0]
        raise SpecError("charging_station.sessions", f"session {first!r} overlaps the previous session on its charger")
    starts = index.asi8[None, :]
    arrive = pd.DatetimeIndex(s["arrival"]).asi8[:, None]
    leave = pd.DatetimeIndex(s["departure"]).asi8[:, None]
    plugged = (starts >= arrive) & (starts + step.value <= leave)
    max_kw = np.minimum(s["max_kw"].to_numpy(float), [rating[k] for k in keys])
    efficiency = np.array([eff[k] for k in keys])
    hours_after = np.maximum((leave[:, 0] - end.value) / 3.6e12, 0.0)
    done = s["session_id"].map(delivered_kwh or {}).fillna(0.0).to_numpy(float)
    need = np.maximum(s["energy_kwh"].to_numpy(float) - done - max_kw * efficiency * hours_after, 0.0)
    return {"station": np.array([row_of[k[0]] for k in keys]), "cap_kwh": plugged * (max_kw * efficiency * dt_h)[:, None],
            "eff": efficiency, "need_kwh": need, "session_id": s["session_id"].to_numpy()}


def _fill(cap_kwh: np.ndarray, need_kwh: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Energy per step (n_s, T) filling ``need_kwh`` into steps taken in ``order``, up to ``cap_kwh``."""
    cap = np.take_along_axis(cap_kwh, order, axis=1)
    before = np.cumsum(cap, axis=1) - cap
    out = np.empty_like(cap_kwh)
    np.put_along_axis(out, order, np.clip(need_kwh[:, None] - before, 0.0, cap), axis=1)
    return out


def reference_schedules(table: dict[str, np.ndarray], price_cny_per_kwh: np.ndarray, others_kw: np.ndarray,
                        dt_h: float) -> np.ndarray:
    """Charging schedules (K, n_s, T) [kWh per step to the car]: as soon as possible, as late
    as possible, flat over the stay, cheapest steps first (ties early, ties late),
    cheapest steps at half rate first, and the portfolio's valleys filled (``others_kw``:
    the rest of the portfolio's forecast draw per step; ``dt_h`` the step).  Each delivers
    the same energy, the most the car can take up to its need, and stays within the
    car's limit while it is plugged in.

    The valley schedule fills the cars one after the other, those with the least slack
    first, each into the steps where the others and the cars placed before it draw
    least.  Where a demand charge or a grid limit binds, what a car costs depends on
    what everything else draws then, not on the energy price alone.  On 1,000-asset
    portfolios from a July noon, with one plan per virtual asset, all cars into the
    others' valleys took one plan from 1.8 % to 0.8 % above the monolithic optimum, and
    filling them one after the other took another from 0.82 % to 0.26 %
    (docs/performance.md)."""
    cap, n_s, T = table["cap_kwh"], *table["cap_kwh"].shape
    need = np.minimum(table["need_kwh"], cap.sum(axis=1))
    steps = np.broadcast_to(np.arange(T), (n_s, T))
    by_price_early = np.broadcast_to(np.argsort(price_cny_per_kwh + 1e-9 * np.arange(T), kind="stable"), (n_s, T))
    by_price_late = np.broadcast_to(np.argsort(price_cny_per_kwh - 1e-9 * np.arange(T), kind="stable"), (n_s, T))
    half = _fill(cap / 2.0, need, by_price_early)
    half = half + _fill(cap - half, need - half.sum(axis=1), by_price_early)
    flat = cap * np.divide(need, cap.sum(axis=1), out=np.zeros(n_s), where=cap.sum(axis=1) > 0)[:, None]
    return np.stack([_fill(cap, need, steps), _fill(cap, need, steps[:, ::-1]), flat,
                     _fill(cap, need, by_price_early), _fill(cap, need, by_price_late), half,
                     _valleys_filled(cap, need, np.asarray(others_kw, float) * dt_h)])


def _valleys_filled(cap_kwh: np.ndarray, need_kwh: np.ndarray, others_kwh: np.ndarray) -> np.ndarray:
    """Energy per step (n_s, T): each car in turn, least slack first, fills its need into
    the steps where ``others_kwh`` plus the cars before it draw least."""
    level = others_kwh.copy()
    out = np.zeros_like(cap_kwh)
    for s in np.argsort(cap_kwh.sum(axis=1) - need_kwh, kind="stable"):
        if need_kwh[s] <= 0.0:
            continue
        out[s] = _fill(cap_kwh[s:s + 1], need_kwh[s:s + 1], np.argsort(level, kind="stable")[None, :])[0]
        level += out[s]
    return out


class VirtualChargerFleet(VirtualFleet):
    """EV chargers (stations without PV or battery) at a bus.

    Every car gets a convex combination, with weights ``lam`` common to its virtual
    asset, of its own reference schedules (:func:`reference_schedules`).  Any convex
    combination of schedules that each respect the car's limits and deliver its energy
    does so too, so the split is exact by construction; the optimizer chooses how the
    cluster blends early, late, flat, cheapest-first and valley-filling charging.
    """

    kind = "charging_station"
    n_refs = 7

    def __init__(self, members, cluster, ids, group=None):
        super().__init__(members, cluster, ids, group)
        for spec in members.specs:
            if spec.pv is not None or spec.battery is not None or sum(c.rating_kw for c in spec.chargers) > spec.import_limit_kw:
                raise SpecError(f"aggregate.charging_station[{spec.id}]", "only stations of chargers alone, within "
                                "their import limit, can be aggregated")

    def build(self, horizon: Horizon) -> Contribution:
        n, T, K = self.n, horizon.n_steps, self.n_refs
        self.horizon, self.dt_h = horizon, horizon.dt_h
        self.lam = cp.Variable((n, K), nonneg=True, name="vev_blend")
        self.refs_kw = [cp.Parameter((T, K), nonneg=True, name=f"vev_refs_kw_{v}", value=np.zeros((T, K)))
                        for v in range(n)]
        self.unmet_cost = cp.Parameter(nonneg=True, name="vev_unmet_cny", value=0.0)
        p = -cp.vstack([self.refs_kw[v] @ self.lam[v] for v in range(n)])
        return Contribution(p_kw=p, constraints=[cp.sum(self.lam, axis=1) == 1],
                            costs_cny={"ev_unmet_energy": self.unmet_cost})

    def _schedules(self, state, forecast, dt_h):
        index = forecast["index"]
        table = session_table(self.members, forecast.get("sessions"), index, dt_h, (state or {}).get("delivered_kwh"))
        price = np.asarray(forecast.get("price_cny_per_kwh", np.zeros(len(index))), float)
        # Without the others' forecast draw, the valley schedule evens out the cars' own draw.
        others = np.asarray(forecast.get("others_kw", np.zeros(len(index))), float)
        return table, reference_schedules(table, price, others, dt_h)

    def update(self, state, forecast, penalties: Penalties) -> None:
        hz = self.horizon
        if len(forecast["index"]) != hz.n_base_steps:
            raise SpecError("charging_station.index", f"expected {hz.n_base_steps} steps")
        # Schedules per base step; a coarse planning step takes their mean over its block.
        self.table, refs_kwh = self._schedules(state, forecast, self.dt_h)
        self.refs_grid_kw = refs_kwh / (self.table["eff"][None, :, None] * self.dt_h)  # (K, n_s, T_base) at the meter
        owner = sp.csr_matrix((np.ones(self.table["station"].size), (self.cluster[self.table["station"]],
                                                                      np.arange(self.table["station"].size))),
                              shape=(self.n, self.table["station"].size))
        per_virtual = np.stack([hz.coarsen(owner @ r) for r in self.refs_grid_kw], axis=2)  # (n, T, K)
        for v in range(self.n):
            self.refs_kw[v].value = per_virtual[v]
        unmet = self.table["need_kwh"] - refs_kwh[0].sum(axis=1)
        self.unmet_cost.value = float(penalties.ev_unmet_cny_per_kwh * np.sum(np.maximum(unmet, 0.0)))

    def disaggregate(self) -> dict[str, np.ndarray]:
        """Members' power per planning step (m, T) and per base step [kW, negative], and each
        session's power at the meter per base step (n_s, T_base) [kW]."""
        lam = np.clip(self.lam.value, 0.0, None)
        lam = lam / lam.sum(axis=1, keepdims=True)
        weights = lam[self.cluster[self.table["station"]]]  # (n_s, K)
        session_kw = np.einsum("sk,kst->st", weights, self.refs_grid_kw)
        member = np.zeros((self.members.n, self.horizon.n_base_steps))
        np.add.at(member, self.table["station"], session_kw)
        return {"p_kw": -self.horizon.coarsen(member), "p_base_kw": -member, "session_kw": session_kw}

    def plan_details(self):
        return {"ev_kw": np.vstack([r.value @ l for r, l in zip(self.refs_kw, self.lam.value)])}
