"""The one place that assembles the dispatch problem.

Every asset kind contributes its variables, constraints and costs (``Fleet.build``); this
module adds what couples them: the park's power balance at the grid connection, the
connection's import/export limits, linearised bus-voltage and branch-flow limits from the
grid model's sensitivities, the tariff, the demand charge, the carbon price and the
tracking of grid-operator flexibility requests.  The problem is built once over
``cp.Parameter``\\ s (DPP); each cycle ``update`` only sets their values.

Linear grid model (around zero asset injection, corrected by the AC check)::

    vm[b, t]   = vm0[b] + sum_j dvm_dp[b, j] p_bus[j, t] + dvm_dq[b, j] q_bus[j, t]
    v_min[b] <= ac_voltage(vm[b, t]) + vm_correction[b, t] <= v_max[b]
    pflow[k, t] = sum_j f_p[k, j] p_bus[j, t]      qflow[k, t] = sum_j f_q[k, j] q_bus[j, t]
    (|pflow|, |qflow|) inside a polygon inscribed in the circle of radius
        S_rated * limit * min(vm_ends, vm_cal) / (1 + loss_frac) * scale

The polygon has vertices at 0, 20, 40, 65 and 90 degrees, so a purely active flow may use
the full rating and no point of it exceeds the circle (it gives up at most 2.4 % of the
rating between vertices).  Each facet is stated for the four sign combinations of
(pflow, qflow).  A relaxed row is switched off by zeroing its coefficients (a 0/1
parameter per row, or per step on large networks) and costs the solver nothing.

Lazy grid rows: most steps are nowhere near a grid limit, yet the grid rows make up most
of the LP.  Every grid row (branch group or watched bus, per step) is therefore *active*
(its real limit) or *relaxed* (a limit it cannot reach).  A cycle starts from last cycle's
active rows, shifted; after each solve the linear flows and voltages of all rows are
evaluated and every relaxed row the plan breaks is activated and the LP solved again,
until none is broken.  The result is the optimum of the full LP (a relaxation's optimum
that satisfies every row is optimal for the full problem); rows with wide slack are
relaxed again for the next cycle.  ``ac_voltage`` bends the linear voltage the way a
line's current does (:func:`ac_voltage_pu`), ``vm_correction`` carries what is left
between the AC power flow and that at the last plan.  A branch's rating limits its
current, its power plus the losses below it over its voltage: ``vm_ends`` is the lowest
voltage the last AC check found at its ends, ``loss_frac`` and ``vm_cal`` the loss share
and that voltage measured once with the branch at its rating
(``DispatchProblem._calibrate_groups``), and ``scale`` shrinks, per branch, wherever the
AC check still found an overload.  ``ac_voltage`` is monotone, so a voltage row stays a bound
on the linear voltage: the band goes through its inverse, a parameter like any other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import cvxpy as cp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vpp.assets import Contribution, Horizon
from vpp.dispatch.grid import SPARSE_X_SCALE
from vpp.errors import SpecError

_BIG_KW = 1e6
_VOLTAGE_MARGIN_PU = 0.002
# Headroom kept below a branch rating from the start, for what the last AC check's voltages
# (which scale the ratings, see DispatchProblem.correct) do not foresee.
_INITIAL_FLOW_SCALE = 0.99
# The lowest voltage a branch cap follows, whatever a check finds.
_FLOW_VM_FLOOR_PU = 0.5
# Branch-group calibration (DispatchProblem._calibrate_groups): the largest loss share it
# takes, and how far below the band a calibration may pull a voltage and still count.
_MAX_LOSS_FRAC = 0.05
_CALIBRATION_BAND_PU = 0.05
# Branch capability polygon: vertices at these angles on the (|P|, |Q|) quarter circle.
_VERTEX_DEG = np.array([0.0, 20.0, 40.0, 65.0, 90.0])
# A branch group is left out when its worst-case flow stays below this share of its
# rating, a bus when its worst-case linear voltage stays this far inside the band.
_PRUNE_LOADING_FRAC = 0.9
_PRUNE_SLACK_PU = 0.01
# Steps whose AC loading is within this fraction of the limit share a branch's tightening.
_NEAR_LIMIT_FRAC = 0.97
# Lazy grid rows: a relaxed row's limit, how far a row may be broken before it is
# activated, and the slack above which an active row is relaxed for the next cycle.
# Relaxed limits sit at or above UNREACHABLE_RHS, and every real limit of the LP (kW,
# kVA, kWh, p.u.) below it: the interior-point solve leaves those rows out
# (vpp.dispatch.highs.HighsArrays) and checks them at its solution.
UNREACHABLE_RHS = 1e5
_RELAXED_KVA = 1e6
_RELAXED_PU = 1e6
_LAZY_TOL = 1e-6
# Rows stay active down to these slacks: a row relaxed too eagerly costs a re-solve
# when the next cycle breaks it (0.3 / 0.04 cut the re-solves by about a third against
# 0.6 / 0.02 on the reference park, for a slightly larger LP).
_RELAX_FLOW_FRAC = 0.3
_RELAX_VOLTAGE_PU = 0.04
# With a strict window (settings.strict_hours) a row the next cycle breaks inside its
# window costs a whole re-solve, one it breaks further out only its activation.  So the
# rows of the next cycle's window are active where the last plan comes within these of
# their limits (activated as well as relaxed), and voltage rows beyond it are relaxed
# from this slack on: every active voltage row keeps its step's network equations in the
# interior-point solve.  On the 10,000-asset portfolio (docs/performance.md) a cycle's
# first solve then held in its window in 11 of 12 cycles instead of 6, and the slowest
# of 12 cycles took 6.1 s instead of 11.5 s.  The dispatcher applies it to interior-point
# solves only: with the hot-started simplex it cost the reference park's year time and a
# broken import limit.
_WINDOW_BAND_FRAC = 0.6
_WINDOW_BAND_PU = 0.03
_BEYOND_RELAX_PU = 0.01
# Grid rows go through per-bus injection variables when there are more than this many
# assets per bus with assets (their coefficients then number buses, not assets).
_BUS_VARIABLES_FACTOR = 2
# grid_model "auto" takes the sparse network rows when the dense ones would hold more than
# this many coefficients per step, and this many times more than the sparse ones.  Below,
# dense rows win: HiGHS's presolve drops the relaxed ones whole, while the sparse network
# equations stay in the LP (5x slower at 300 assets on a 71-bus feeder, same optimum).
_SPARSE_GRID_FACTOR = 4
_DENSE_GRID_MAX_NNZ = 100_000
_LAZY_WIDEN_STEPS = 2
_LAZY_NEAR_FRAC = 0.95
_LAZY_NEAR_PU = 0.005
# Per check of a coarse plan's base steps, what is left of a block's earlier, larger spread.
_SPREAD_FADE = 0.8
# Elastic problems: the price of exceeding a grid limit, far above any other term, so a
# limit gives only what no asset can make up.
_EXCESS_CNY_PER_KWH = 1e4
_EXCESS_CNY_PER_KW_PEAK = 1e5
_EXCESS_CNY_PER_PU_H = 1e6


@dataclass(frozen=True)
class FlexRequest:
    """A grid operator's request on the park's net import [kW] for a window.

    ``max_import_kw`` alone reads "hold the park at or below X"; both bounds equal reads
    "follow X".  Deviations are priced at ``price_cny_per_kwh`` (or the park default).
    """

    start: pd.Timestamp
    end: pd.Timestamp
    max_import_kw: float | None = None
    min_import_kw: float | None = None
    price_cny_per_kwh: float | None = None

    def __post_init__(self):
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise SpecError("flex_request.start", "times must be timezone-aware")
        if self.end <= self.start:
            raise SpecError("flex_request.end", "must be after start")
        if self.max_import_kw is None and self.min_import_kw is None:
            raise SpecError("flex_request", "give max_import_kw, min_import_kw or both")
        if self.max_import_kw is not None and self.min_import_kw is not None and self.min_import_kw > self.max_import_kw:
            raise SpecError("flex_request.min_import_kw", "must not exceed max_import_kw")


@dataclass
class HorizonInputs:
    """Everything exogenous the optimizer needs for one cycle.

    ``index`` holds the start of each step (tz-aware).  ``forecasts`` maps an asset kind to
    the forecast arrays its fleet reads (see each fleet's ``update``).  Limits are per step
    so that grid-operator windows (a maintenance outage, say) can tighten them.
    """

    index: pd.DatetimeIndex
    forecasts: dict[str, dict[str, Any]]
    buy_price_cny_per_kwh: np.ndarray
    sell_price_cny_per_kwh: np.ndarray
    carbon_kg_per_kwh: np.ndarray
    import_limit_kw: np.ndarray
    export_limit_kw: np.ndarray
    peak_import_so_far_kw: float = 0.0
    flex_requests: list[FlexRequest] = field(default_factory=list)
    branch_limit_percent: np.ndarray | None = None  # (n_branches, n_steps); None = network ratings
    v_min_pu: np.ndarray | None = None  # (n_buses,) overrides of the voltage band
    v_max_pu: np.ndarray | None = None


class DispatchProblem:
    """The park's dispatch LP, built once for a park and a horizon."""

    def __init__(self, park, elastic: bool = False):
        """``elastic``: every grid limit (connection, branches, voltage band) may be
        exceeded at a steep price, so the problem is feasible whenever the assets' own
        constraints are; the dispatcher solves it when the firm problem is infeasible, to
        publish the plan that exceeds the limits least."""
        self.park = park
        self.elastic = elastic
        s = park.settings
        self.horizon = Horizon.with_resolution(s.horizon_steps, s.dt_h, s.horizon_resolution)
        T, step_h = self.horizon.n_steps, self.horizon.step_h
        grid = park.grid
        # Building binds cvxpy objects to a fleet (and to its storage arrays), so each problem
        # builds on deep copies: two problems of one park must not share parameters.
        self.fleets = {k: copy.deepcopy(f) for k, f in park.fleets.items()}
        self.contributions: dict[str, Contribution] = {k: f.build(self.horizon) for k, f in self.fleets.items()}
        self.incidence = {k: self._incidence(park.bus_positions(k), grid.n_buses) for k in park.fleets}
        sens = grid.sensitivities()
        self.sens = sens

        # Buses and branches that assets can push to a limit; the others need no rows.
        bus_p_min, bus_p_max, bus_q_max = self._bus_power_ranges()
        asset_buses = np.unique(np.concatenate([park.bus_positions(k) for k in park.fleets]))
        injection_buses = asset_buses
        self._group_branches(sens, asset_buses, bus_p_min, bus_p_max, bus_q_max)
        asset_buses = asset_buses[asset_buses != grid.slack_position]
        self._calibrate_groups(asset_buses)
        asset_buses = asset_buses[self._voltage_can_bind(asset_buses, bus_p_min, bus_p_max, bus_q_max)]
        self.watched_buses = asset_buses
        self.active_flow = np.zeros((self.group_rep.size, T), bool)
        self.unsolved_flow = np.zeros_like(self.active_flow)
        self.active_vm = np.zeros((asset_buses.size, T), bool)
        self.vm_corr_pu = np.zeros((asset_buses.size, T))
        # Per branch group and step, the lowest voltage at its members' ends in the last AC
        # check [pu]: a branch carries S / V, so its rating in kVA shrinks with the voltage.
        self.flow_vm_pu = np.ones((self.group_rep.size, T))
        # Coarse planning steps: how far a block's quarter hours stray from its mean (voltage
        # below / above [pu], connection power above / below [kW]) and its branch groups'
        # mean over peak loading; measured by fold_base_check, kept as margins.
        self.block_spread = self._no_spread(T)
        # 1 while a step has an active grid row, 0 when all its rows are relaxed.
        self.step_on = [cp.Parameter(nonneg=True, name=f"grid_step_on_{t}", value=1.0) for t in range(T)]

        constraints: list = []
        costs: dict[str, cp.Expression] = {}
        net_p = 0
        vm_lin = np.zeros((asset_buses.size, T)) + sens.vm0_pu[asset_buses, None]
        flow_lin = 0
        qflow_lin = 0
        # Many assets per bus (portfolios): state the grid rows on per-bus injection
        # variables, so each row has one coefficient per bus instead of one per asset.
        by_bus = sum(f.n for f in park.fleets.values()) > _BUS_VARIABLES_FACTOR * len(injection_buses)
        p_bus, q_bus = 0, 0
        for kind, c in self.contributions.items():
            constraints += c.constraints
            for name, cost in c.costs_cny.items():
                costs[name] = costs[name] + cost if name in costs else cost
            A = self.incidence[kind]
            net_p = net_p + cp.sum(c.p_kw, axis=0)
            q = c.q_kvar
            if by_bus:
                S = sp.csr_matrix(A[injection_buses])
                p_bus = p_bus + S @ c.p_kw
                q_bus = q_bus + S @ q if q is not None else q_bus
                continue
            vm_lin = vm_lin + (sens.dvm_dp_pu_per_kw[asset_buses] @ A) @ c.p_kw
            flow_lin = flow_lin + (sens.branch_p_per_kw[self.group_rep] @ A) @ c.p_kw
            if q is not None:
                vm_lin = vm_lin + (sens.dvm_dq_pu_per_kvar[asset_buses] @ A) @ q
                qflow_lin = qflow_lin + (sens.branch_q_per_kvar[self.group_rep] @ A) @ q
        self.grid_form = "dense"
        if by_bus and (asset_buses.size or self.group_rep.size):
            nb = len(injection_buses)
            p_bus_var = cp.Variable((nb, T), name="bus_p_kw")
            constraints.append(p_bus_var == p_bus)
            # The connection's balance over the buses, not over every asset: a coefficient
            # per bus instead of per asset in each step's row.
            net_p = cp.sum(p_bus_var, axis=0)
            sparse_grid = self._use_sparse_grid(injection_buses, asset_buses)
            # Reactive power of fixed loads alone is a parameter: in the dense form it moves the
            # right-hand sides only; the sparse form's per-step switch needs it as a variable.
            if isinstance(q_bus, cp.Expression) and (q_bus.variables() or sparse_grid):
                q_bus_var = cp.Variable((nb, T), name="bus_q_kvar")
                constraints.append(q_bus_var == q_bus)
                q_bus = q_bus_var
            has_q = isinstance(q_bus, cp.Expression)
            if sparse_grid:
                self.grid_form = "sparse"
                vm_lin, flow_lin, qflow_lin = self._sparse_grid_rows(
                    injection_buses, asset_buses, p_bus_var, q_bus if has_q else None, T)
            else:
                vm_lin = vm_lin + sens.dvm_dp_pu_per_kw[np.ix_(asset_buses, injection_buses)] @ p_bus_var
                flow_lin = sens.branch_p_per_kw[np.ix_(self.group_rep, injection_buses)] @ p_bus_var
                if has_q:
                    vm_lin = vm_lin + sens.dvm_dq_pu_per_kvar[np.ix_(asset_buses, injection_buses)] @ q_bus
                    qflow_lin = sens.branch_q_per_kvar[np.ix_(self.group_rep, injection_buses)] @ q_bus
        self.net_p_kw = net_p

        # Grid connection: losses come from the last AC check.
        n_w, n_b = asset_buses.size, self.group_rep.size
        self.p = {
            "buy": cp.Parameter(T, name="buy_cny_per_kwh", value=np.zeros(T)),
            "sell": cp.Parameter(T, name="sell_cny_per_kwh", value=np.zeros(T)),
            "carbon_cost": cp.Parameter(T, nonneg=True, name="carbon_cny_per_kwh", value=np.zeros(T)),
            "import_limit": cp.Parameter(T, nonneg=True, name="import_limit_kw", value=np.zeros(T)),
            "export_limit": cp.Parameter(T, nonneg=True, name="export_limit_kw", value=np.zeros(T)),
            "losses": cp.Parameter(T, name="losses_kw", value=np.zeros(T)),
            "peak_so_far": cp.Parameter(nonneg=True, name="peak_so_far_kw", value=0.0),
            "demand_rate": cp.Parameter(nonneg=True, name="demand_cny_per_kw", value=0.0),
            "demand_paid": cp.Parameter(nonneg=True, name="demand_paid_cny", value=0.0),
            "flex_max": cp.Parameter(T, name="flex_max_import_kw", value=np.full(T, _BIG_KW)),
            "flex_min": cp.Parameter(T, name="flex_min_import_kw", value=np.full(T, -_BIG_KW)),
            "flex_price": cp.Parameter(T, nonneg=True, name="flex_cny_per_kwh", value=np.zeros(T)),
            "v_min": cp.Parameter((n_w, T), name="v_min_pu", value=np.zeros((n_w, T))),
            "v_max": cp.Parameter((n_w, T), name="v_max_pu", value=np.zeros((n_w, T))),
            "flow_cap": cp.Parameter((n_b, T), nonneg=True, name="flow_cap_kw", value=np.zeros((n_b, T))),
        }
        p = self.p
        self.imp = cp.Variable(T, nonneg=True, name="import_kw")
        self.exp = cp.Variable(T, nonneg=True, name="export_kw")
        self.peak = cp.Variable(nonneg=True, name="peak_import_kw")
        self.flex_dev = cp.Variable(T, nonneg=True, name="flex_deviation_kw")
        net_import = self.imp - self.exp
        # Elastic problems: by how much the grid limits are exceeded per step (kW, p.u.).
        excess_kw, excess_pu = 0.0, 0.0
        self.excess_kw = self.excess_pu = None
        if elastic:
            self.excess_kw = cp.Variable(T, nonneg=True, name="limit_excess_kw")
            self.excess_pu = cp.Variable(T, nonneg=True, name="voltage_excess_pu")
            excess_kw, excess_pu = self.excess_kw, self.excess_pu
        constraints += [
            net_import == -net_p + p["losses"],
            self.imp <= p["import_limit"] + excess_kw,
            self.exp <= p["export_limit"] + excess_kw,
            self.peak >= self.imp,
            self.peak >= p["peak_so_far"],
            self.flex_dev >= net_import - p["flex_max"],
            self.flex_dev >= p["flex_min"] - net_import,
        ]
        # The linear voltages and flows as variables: the dense form defines them here, the
        # sparse form per step (steps without an active grid row then drop out).
        sparse_rows = self.grid_form == "sparse"
        if sparse_rows:
            constraints += self._step_rows
        if n_w:
            # A relaxed row's voltage variable is free and presolve removes it with its definition.
            # The AC correction moves the band (a parameter), not the linear voltage.
            vm = vm_lin if sparse_rows else cp.Variable((n_w, T), name="vm_lin_pu")
            if not sparse_rows:
                constraints.append(vm == vm_lin)
            band = 0.0 if not elastic else np.ones((n_w, 1)) @ cp.reshape(excess_pu, (1, T), order="C")
            vm_on = self._switched(vm, "vm_on")
            constraints += [vm_on >= p["v_min"] - band, vm_on <= p["v_max"] + band]
        if n_b:
            pflow = flow_lin if sparse_rows else cp.Variable((n_b, T), name="branch_p_kw")
            qflow = qflow_lin
            if not sparse_rows:
                constraints.append(pflow == flow_lin)
                if isinstance(qflow_lin, cp.Expression):
                    qflow = cp.Variable((n_b, T), name="branch_q_kvar")
                    constraints.append(qflow == qflow_lin)
            room = 0.0 if not elastic else np.ones((n_b, 1)) @ cp.reshape(excess_kw, (1, T), order="C")
            constraints += self._branch_capability(self._switched(pflow, "flow_on"),
                                                   self._switched(qflow, "flow_on") if isinstance(qflow, cp.Expression)
                                                   else qflow, p["flow_cap"], room)
        self.costs = {
            "energy": cp.sum(cp.multiply(cp.multiply(step_h, p["buy"]), self.imp)
                             - cp.multiply(cp.multiply(step_h, p["sell"]), self.exp)),
            # Only the rise above this month's peak so far costs anything.
            "demand_charge": p["demand_rate"] * self.peak - p["demand_paid"],
            "carbon": cp.sum(cp.multiply(cp.multiply(step_h, p["carbon_cost"]), self.imp)),
            **costs,
            "flex_deviation": cp.sum(cp.multiply(cp.multiply(step_h, p["flex_price"]), self.flex_dev)),
        }
        if elastic:
            # The worst step's excess weighs most (an overload's height is what trips a
            # protection), then the excess energy over the horizon.
            self.costs["limit_excess"] = (_EXCESS_CNY_PER_KW_PEAK * cp.max(self.excess_kw)
                                          + _EXCESS_CNY_PER_KWH * (self.excess_kw @ step_h)
                                          + _EXCESS_CNY_PER_PU_H * (self.excess_pu @ step_h))
        self.problem = cp.Problem(cp.Minimize(cp.sum(list(self.costs.values()))), constraints)
        if not self.problem.is_dpp():
            bad = [str(c)[:80] for c in constraints if not c.is_dcp(dpp=True)]
            bad += [name for name, cost in self.costs.items() if not cost.is_dcp(dpp=True)]
            raise AssertionError(f"the dispatch problem must be DPP; not DPP: {bad}")

    def _use_sparse_grid(self, injection_buses: np.ndarray, watched: np.ndarray) -> bool:
        """Whether the grid rows go through the sparse network model (``grid_model``;
        ``auto``: when the dense rows would be large, see ``_DENSE_GRID_MAX_NNZ``)."""
        choice = self.park.settings.grid_model
        if choice != "auto":
            return choice == "sparse"
        dense_nnz = (watched.size + self.group_rep.size) * injection_buses.size
        if dense_nnz <= _DENSE_GRID_MAX_NNZ:
            return False  # no need to build the sparse model to compare
        lin = self.park.grid.sparse_model()
        sparse_nnz = (lin.jacobian_kw.nnz + 2 * injection_buses.size + watched.size
                      + (lin.subtree.nnz + self.group_rep.size if lin.subtree is not None
                         else self.group_rep.size * injection_buses.size))
        return dense_nnz > _SPARSE_GRID_FACTOR * sparse_nnz

    def _sparse_grid_rows(self, injection_buses, watched, p_bus, q_bus, T: int):
        """Linear voltages and branch flows as variables defined through the network's own
        structure, step by step.

        Radial networks: per step, ``(I - C) d = injections`` gives the power below every
        bus, each branch carries its lower bus's d, and a bus's voltage moves by its
        parent's plus its own step times the power below it, ``(I - C)^T v = step * d``
        (:meth:`~vpp.dispatch.grid.GridModel.sparse_model`; the dense sensitivities to
        ``PATH_TOL`` of their size; checked when the model is built).  Otherwise (a loaded
        base point, a meshed network) the voltages come from ``J0 x = injections`` for the
        PQ buses' voltage angles and magnitudes x, the dense sensitivities exactly, and
        meshed networks keep dense flow rows.

        Each step's definitions are multiplied by that step's 0/1 parameter ``step_on``:
        in a step without an active grid row they vanish (0 == 0) and HiGHS's presolve
        drops them whole, instead of working through the network equations of every step.
        Sets ``self._step_rows``; returns (vm, pflow, qflow), variables (or 0 without rows).
        """
        lin, sens, rep = self.park.grid.sparse_model(), self.sens, self.group_rep
        nb, n_w = injection_buses.size, watched.size
        vm = cp.Variable((n_w, T), name="vm_lin_pu") if n_w else 0
        pflow = cp.Variable((rep.size, T), name="branch_p_kw") if rep.size else 0
        qflow = cp.Variable((rep.size, T), name="branch_q_kvar") if rep.size and q_bus is not None else 0
        vm0 = sens.vm0_pu[watched]
        rows = []

        def define(t, var, expr):
            rows.append(self.step_on[t] * (var[:, t] - expr) == 0)

        if lin.subtree is not None:
            to_int = sp.csr_matrix((np.ones(nb), (lin.internal_bus[injection_buses], np.arange(nb))),
                                   shape=(lin.n_internal, nb))
            branch = sp.csr_matrix((lin.branch_sign[rep], (np.arange(rep.size), lin.branch_bus[rep])),
                                   shape=(rep.size, lin.n_internal))
            below = cp.Variable((lin.n_internal, T), name="grid_p_below_kw")
            below_q = cp.Variable((lin.n_internal, T), name="grid_q_below_kvar") if q_bus is not None else None
            path = n_w > 0 and lin.vm_step_p is not None
            if path:
                # Voltage change per internal bus [milli-pu]: its parent's plus its step.
                dv = cp.Variable((lin.n_internal, T), name="grid_dv_mpu")
                up = lin.subtree.T.tocsr()
                step_p = sp.diags(lin.vm_step_p * SPARSE_X_SCALE)
                step_q = sp.diags(lin.vm_step_q * SPARSE_X_SCALE)
                pick = sp.csr_matrix((np.full(n_w, 1.0 / SPARSE_X_SCALE), (np.arange(n_w), lin.internal_bus[watched])),
                                     shape=(n_w, lin.n_internal))
            for t in range(T):
                rows.append(self.step_on[t] * (lin.subtree @ below[:, t] - to_int @ p_bus[:, t]) == 0)
                if below_q is not None:
                    rows.append(self.step_on[t] * (lin.subtree @ below_q[:, t] - to_int @ q_bus[:, t]) == 0)
                if rep.size:
                    define(t, pflow, branch @ below[:, t])
                    if below_q is not None:
                        define(t, qflow, branch @ below_q[:, t])
                if path:
                    drop = step_p @ below[:, t] + (step_q @ below_q[:, t] if below_q is not None else 0)
                    rows.append(self.step_on[t] * (up @ dv[:, t] - drop) == 0)
                    define(t, vm, vm0 + pick @ dv[:, t])
        if n_w and (lin.subtree is None or lin.vm_step_p is None):
            m = lin.n_pq
            rows_pq = lin.pq_row[injection_buses]
            on_pq = np.flatnonzero(rows_pq >= 0)
            to_pq = sp.csr_matrix((np.ones(on_pq.size), (rows_pq[on_pq], on_pq)), shape=(m, nb))
            zero = sp.csr_matrix((m, nb))
            to_p, to_q = sp.vstack([to_pq, zero]).tocsr(), sp.vstack([zero, to_pq]).tocsr()
            x = cp.Variable((2 * m, T), name="grid_dv_mpu")
            pick = sp.csr_matrix((np.full(n_w, 1.0 / SPARSE_X_SCALE), (np.arange(n_w), m + lin.pq_row[watched])),
                                 shape=(n_w, 2 * m))
            for t in range(T):
                rhs = to_p @ p_bus[:, t] + (to_q @ q_bus[:, t] if q_bus is not None else 0)
                rows.append(self.step_on[t] * (lin.jacobian_kw @ x[:, t] - rhs) == 0)
                define(t, vm, vm0 + pick @ x[:, t])
        if rep.size and lin.subtree is None:
            for t in range(T):
                define(t, pflow, sens.branch_p_per_kw[np.ix_(rep, injection_buses)] @ p_bus[:, t])
                if q_bus is not None:
                    define(t, qflow, sens.branch_q_per_kvar[np.ix_(rep, injection_buses)] @ q_bus[:, t])
        self._step_rows = rows
        return vm, pflow, qflow

    def _switched(self, x: cp.Expression, name: str) -> cp.Expression:
        """``x`` (rows, n_steps) times a 0/1 switch, so that switched-off grid rows are empty
        and presolve drops them at once.

        The dense form switches each row (a (rows, n_steps) parameter ``name``); the
        sparse form, for large networks, each step (``step_on``): cvxpy's compile of an
        elementwise product with one large parameter grows with the square of its size
        (about 1 GiB at 113 x 96), one scalar parameter per step does not.  A relaxed row
        in a switched-on step has a limit it cannot reach."""
        if self.grid_form != "sparse":
            if name not in self.p:
                self.p[name] = cp.Parameter(x.shape, nonneg=True, name=name, value=np.ones(x.shape))
            return cp.multiply(self.p[name], x)
        return cp.vstack([self.step_on[t] * x[:, t] for t in range(x.shape[1])]).T

    @staticmethod
    def _branch_capability(pflow, qflow, s_cap, room=0.0) -> list:
        """(pflow, qflow) within the inscribed polygon of radius ``s_cap`` (see module doc)."""
        facets = _polygon_facets()
        if not isinstance(qflow, cp.Expression):
            # Without reactive flow only the facet nearest the P axis can bind.
            c, _, h = facets[0]
            cap = h / c * s_cap
            return [pflow <= cap + room, -pflow <= cap + room]
        constraints = []
        for c, s, h in facets:
            for sp in (1.0, -1.0):
                for sq in (1.0, -1.0):
                    constraints.append(sp * c * pflow + sq * s * qflow <= h * s_cap + room)
        return constraints

    @staticmethod
    def _incidence(bus_positions: np.ndarray, n_buses: int) -> np.ndarray:
        A = np.zeros((n_buses, bus_positions.size))
        A[bus_positions, np.arange(bus_positions.size)] = 1.0
        return A

    # --- each cycle ------------------------------------------------------------------------------

    def update(self, inputs: HorizonInputs, state: dict[str, dict[str, Any]]) -> None:
        """Set every parameter for this cycle and reset the grid corrections.

        ``inputs`` come at the base resolution; a coarse horizon averages prices and
        carbon over each planning step and takes the tightest limit within it."""
        hz = self.horizon
        T, n_base = hz.n_steps, hz.n_base_steps
        if len(inputs.index) != n_base:
            raise SpecError("inputs.index", f"expected {n_base} steps, got {len(inputs.index)}")
        park, p = self.park, self.p
        for kind, fleet in self.fleets.items():
            fleet.update(state[kind], inputs.forecasts.get(kind, {}), park.settings.penalties)
        self.index = inputs.index[hz.block_start]
        p["buy"].value = hz.coarsen(_finite("inputs.buy_price_cny_per_kwh", inputs.buy_price_cny_per_kwh, n_base))
        p["sell"].value = hz.coarsen(_finite("inputs.sell_price_cny_per_kwh", inputs.sell_price_cny_per_kwh, n_base))
        self.carbon_kg_per_kwh = hz.coarsen(_finite("inputs.carbon_kg_per_kwh", inputs.carbon_kg_per_kwh, n_base))
        p["carbon_cost"].value = np.clip(self.carbon_kg_per_kwh, 0, None) * park.carbon.price_cny_per_t / 1000.0
        self.import_limit_kw = np.clip(hz.coarsen(_finite("inputs.import_limit_kw", inputs.import_limit_kw, n_base),
                                                  "min"), 0, None)
        self.export_limit_kw = np.clip(hz.coarsen(_finite("inputs.export_limit_kw", inputs.export_limit_kw, n_base),
                                                  "min"), 0, None)
        shift = self._steps_since_last(inputs.index)
        self.block_spread = {name: hz.carry(values, shift, 1.0 if name == "flow" else 0.0)
                             for name, values in self.block_spread.items()}
        self._set_connection_limits()
        p["peak_so_far"].value = max(float(inputs.peak_import_so_far_kw), 0.0)
        p["demand_rate"].value = park.tariff.demand_charge_cny_per_kw_month
        p["demand_paid"].value = p["demand_rate"].value * p["peak_so_far"].value
        self._last_start = inputs.index[0]
        self._set_flex(inputs)
        grid = park.grid
        v_min = grid.v_min_pu if inputs.v_min_pu is None else np.asarray(inputs.v_min_pu, float)
        v_max = grid.v_max_pu if inputs.v_max_pu is None else np.asarray(inputs.v_max_pu, float)
        self.v_band_min_pu, self.v_band_max_pu = v_min, v_max
        self._set_band_limits()
        # A receding horizon keeps the last cycle's grid corrections, shifted, as its first guess.
        self.vm_corr_pu = hz.carry(self.vm_corr_pu, shift, 0.0)
        self.flow_vm_pu = hz.carry(self.flow_vm_pu, shift, 1.0)
        p["losses"].value = hz.carry(p["losses"].value, shift, 0.0)
        branch_limit = (np.repeat(grid.branch_limit_percent[:, None], n_base, axis=1)
                        if inputs.branch_limit_percent is None
                        else _finite("inputs.branch_limit_percent", inputs.branch_limit_percent, None))
        if branch_limit.shape != (grid.n_branches, n_base):
            raise SpecError("inputs.branch_limit_percent", f"expected shape {(grid.n_branches, n_base)}")
        self.branch_limit_percent = hz.coarsen(branch_limit, "min")
        fresh = np.full((self.group_rep.size, T), _INITIAL_FLOW_SCALE)
        self.flow_scale = fresh if shift is None else np.minimum(hz.carry(self.flow_scale, shift, _INITIAL_FLOW_SCALE), fresh)
        self.warm = shift is not None
        lazy = park.settings.lazy_grid_rows
        lazy = lazy and not self.elastic
        self.active_flow = (hz.carry(self.active_flow, shift, 0.0) > 0.5 if lazy
                            else np.ones((self.group_rep.size, T), bool))
        self.active_vm = (hz.carry(self.active_vm, shift, 0.0) > 0.5 if lazy
                          else np.ones((self.watched_buses.size, T), bool))
        self.lazy_rounds = 0
        self.unsolved_flow = np.zeros_like(self.active_flow)
        self._set_flow_cap()
        self._set_voltage_band()

    def _steps_since_last(self, index: pd.DatetimeIndex) -> int | None:
        """Base steps between the last cycle's start and this one's, or None to start afresh."""
        last = getattr(self, "_last_start", None)
        if last is None:
            return None
        steps = (index[0] - last) / pd.Timedelta(hours=self.horizon.dt_h)
        if steps != int(steps) or not 0 <= steps < self.horizon.n_base_steps:
            return None
        return int(steps)

    def _set_flex(self, inputs: HorizonInputs) -> None:
        T = self.horizon.n_base_steps
        fmax, fmin, price = np.full(T, _BIG_KW), np.full(T, -_BIG_KW), np.zeros(T)
        starts = inputs.index
        for r in inputs.flex_requests:
            in_window = (starts >= r.start) & (starts < r.end)
            if r.max_import_kw is not None:
                fmax[in_window] = np.minimum(fmax[in_window], r.max_import_kw)
            if r.min_import_kw is not None:
                fmin[in_window] = np.maximum(fmin[in_window], r.min_import_kw)
            rate = self.park.settings.flex_penalty_cny_per_kwh if r.price_cny_per_kwh is None else r.price_cny_per_kwh
            price[in_window] = np.maximum(price[in_window], rate)
        hz = self.horizon
        self.p["flex_max"].value = hz.coarsen(fmax, "min")
        self.p["flex_min"].value = hz.coarsen(fmin, "max")
        self.p["flex_price"].value = hz.coarsen(price)

    def _bus_power_ranges(self):
        """Per bus: the least and greatest active power and greatest |reactive| power the
        assets there can inject [kW], [kvar]."""
        n = self.park.grid.n_buses
        p_min, p_max, q_max = np.zeros(n), np.zeros(n), np.zeros(n)
        for kind, fleet in self.park.fleets.items():
            lo, hi, q = fleet.power_range()
            buses = self.park.bus_positions(kind)
            np.add.at(p_min, buses, lo)
            np.add.at(p_max, buses, hi)
            np.add.at(q_max, buses, q)
        return p_min, p_max, q_max

    @staticmethod
    def _linear_range(f: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """Least and greatest value of ``f @ x`` for ``lo <= x <= hi`` (rows of f)."""
        a, b = f * lo, f * hi
        return np.minimum(a, b).sum(axis=-1), np.maximum(a, b).sum(axis=-1)

    def _voltage_can_bind(self, buses, p_min, p_max, q_max) -> np.ndarray:
        """Which buses' linearised voltage can come within reach of the band."""
        sens, grid = self.sens, self.park.grid
        lo, hi = self._linear_range(sens.dvm_dp_pu_per_kw[buses], p_min, p_max)
        swing_q = np.abs(sens.dvm_dq_pu_per_kvar[buses]) @ q_max
        reach, vm0 = _PRUNE_SLACK_PU, sens.vm0_pu[buses]
        return ((ac_voltage_pu(vm0 + lo - swing_q, vm0) < grid.v_min_pu[buses] + reach)
                | (ac_voltage_pu(vm0 + hi + swing_q, vm0) > grid.v_max_pu[buses] - reach))

    def _group_branches(self, sens, asset_buses, p_min, p_max, q_max) -> None:
        """Group the branches whose linear flows are identical functions of the assets.

        On a radial feeder every cable between two asset connections carries the same
        linear flow, so one constraint row per group, against the group's tightest
        rating, states all of them.  Groups whose worst-case flow (every asset at the end
        of its range) stays well inside the rating get no row.
        """
        fp = np.round(sens.branch_p_per_kw[:, asset_buses], 9) + 0.0  # + 0.0 turns -0.0 into 0.0
        fq = np.round(sens.branch_q_per_kvar[:, asset_buses], 9) + 0.0
        groups: dict[bytes, list[int]] = {}
        for k in np.flatnonzero(np.abs(fp).sum(axis=1) + np.abs(fq).sum(axis=1) > 0):
            groups.setdefault(fp[k].tobytes() + fq[k].tobytes(), []).append(int(k))
        grid = self.park.grid
        kept = []
        for g in groups.values():
            g = np.array(g)
            lo, hi = self._linear_range(sens.branch_p_per_kw[g[0]], p_min, p_max)
            q = np.abs(sens.branch_q_per_kvar[g[0]]) @ q_max
            worst_kva = np.hypot(max(abs(lo), abs(hi)), q)
            capacity_kva = (grid.branch_rating_kva[g] * grid.branch_limit_percent[g] / 100.0).min()
            if worst_kva > _PRUNE_LOADING_FRAC * capacity_kva:
                kept.append(g)
        self.branch_groups = kept
        self.group_rep = np.array([g[0] for g in kept], dtype=int)
        ends = grid.branch_buses()
        self._group_ends = [np.unique(ends[g][ends[g] >= 0]) for g in kept]

    def _calibrate_groups(self, buses: np.ndarray) -> None:
        """Per branch group, what the linear flow misses at the group's rating; ``buses``
        are the buses with assets, the slack bus left out.

        The linear model counts the power of the buses a branch feeds; its current is that
        plus the losses of the cables below it, over its voltage.  On an LV feeder's head
        cable at its rating the two added 2.6 % (losses 2.5 %, voltage 0.1 %), more than
        the 1 % headroom a cap starts with.  One AC power flow per group (batched) draws
        the group's rating from the buses with assets it feeds, in proportion to their
        flow factors, and measures the loss share ``flow_loss_frac`` (AC loading times
        the lowest voltage at the group's ends, less 1) and that voltage,
        ``flow_vm_cal_pu``.  A group whose calibration pulls a voltage far below the band
        (its buses cannot draw that much, as on a 10 kV cable feeding whole LV networks)
        or does not converge keeps 0 and 1 pu.  Sets both, shape (n_groups,)."""
        grid, sens, n_g = self.park.grid, self.sens, self.group_rep.size
        self.flow_loss_frac, self.flow_vm_cal_pu = np.zeros(n_g), np.ones(n_g)
        if not n_g or not buses.size:
            return
        f = sens.branch_p_per_kw[np.ix_(self.group_rep, buses)]
        limit = grid.branch_rating_kva * grid.branch_limit_percent / 100.0
        capacity = np.array([limit[g].min() for g in self.branch_groups])
        weight = np.maximum((f * f).sum(axis=1), 1e-12)
        P = np.zeros((n_g, grid.n_buses))
        P[:, buses] = f * (capacity / weight)[:, None]
        ac = grid.run_ac(P, np.zeros_like(P))
        rel = ac.loading_percent / grid.branch_limit_percent[None, :]
        end_vm = np.diagonal(self._group_end_vm(ac.vm_pu))  # group g's ends in calibration g
        for g, members in enumerate(self.branch_groups):
            if not ac.converged[g] or np.min(ac.vm_pu[g] - grid.v_min_pu) < -_CALIBRATION_BAND_PU:
                continue
            vm = end_vm[g]
            self.flow_vm_cal_pu[g] = vm
            self.flow_loss_frac[g] = float(np.clip(rel[g, members].max() * vm - 1.0, 0.0, _MAX_LOSS_FRAC))

    def _group_end_vm(self, vm_pu: np.ndarray) -> np.ndarray:
        """Per branch group, the lowest voltage at its members' ends in each row of
        ``vm_pu`` (rows, n_buses), shape (n_groups, rows); 1 pu for a group whose ends
        are all auxiliary buses."""
        rows = len(vm_pu)
        return np.array([vm_pu[:, e].min(axis=1) if e.size else np.ones(rows)
                         for e in self._group_ends]).reshape(len(self._group_ends), rows)

    def _group_capacity_kva(self) -> np.ndarray:
        """Per group and step, the smallest apparent-power limit of its members [kVA]."""
        rating = self.park.grid.branch_rating_kva
        return np.array([
            (rating[g, None] * self.branch_limit_percent[g] / 100.0).min(axis=0) for g in self.branch_groups
        ]).reshape(len(self.branch_groups), self.horizon.n_steps)

    def _set_flow_cap(self) -> None:
        # The rating's current at the lower of the last check's and the calibration's voltage.
        current = np.minimum(self.flow_vm_pu, self.flow_vm_cal_pu[:, None]) / (1.0 + self.flow_loss_frac[:, None])
        self.flow_cap_kva = self._group_capacity_kva() * current * self.flow_scale * self.block_spread["flow"]
        self.p["flow_cap"].value = np.where(self.active_flow, self.flow_cap_kva, _RELAXED_KVA)
        if "flow_on" in self.p:
            self.p["flow_on"].value = self.active_flow.astype(float)
        self._set_steps_on()

    def _set_band_limits(self) -> None:
        """Watched buses' voltage limits per step: the band, its safety margin and the
        blocks' spread."""
        w, T = self.watched_buses, self.horizon.n_steps
        self.v_min_pu = (np.repeat(self.v_band_min_pu[w, None] + _VOLTAGE_MARGIN_PU, T, axis=1)
                         + self.block_spread["vm_low"])
        self.v_max_pu = (np.repeat(self.v_band_max_pu[w, None] - _VOLTAGE_MARGIN_PU, T, axis=1)
                         - self.block_spread["vm_high"])

    def _set_connection_limits(self) -> None:
        self.p["import_limit"].value = np.clip(self.import_limit_kw - self.block_spread["import"], 0.0, None)
        self.p["export_limit"].value = np.clip(self.export_limit_kw - self.block_spread["export"], 0.0, None)

    def _no_spread(self, T: int) -> dict[str, np.ndarray]:
        n_w, n_g = self.watched_buses.size, self.group_rep.size
        return {"vm_low": np.zeros((n_w, T)), "vm_high": np.zeros((n_w, T)), "flow": np.ones((n_g, T)),
                "import": np.zeros(T), "export": np.zeros(T)}

    def fold_base_check(self, ac, limit_percent: np.ndarray) -> None:
        """Fold an AC check of a plan's base steps into a coarse plan's limits.

        A planning step's linear rows see its block's mean injections; its quarter hours
        vary around them (a heat pump's COP, cars charging in part of an hour, the base
        load).  The spread of each block's AC results around their mean (voltages below
        and above, connection power, each branch group's mean over peak loading) becomes
        a margin on the block's limits, measured anew by each check (a larger one
        fading by ``_SPREAD_FADE`` per check) and carried to the next cycle; rows the
        base steps break are activated.  ``ac`` holds the base steps, ``limit_percent``
        each branch's limit per base step; the voltage band is this cycle's.  A uniform
        horizon has no blocks and nothing to fold; nor has a check that did not converge.
        """
        hz = self.horizon
        if hz.uniform or not np.all(ac.converged):
            return
        starts, counts = hz.block_start, np.asarray(hz.block_steps, float)

        def mean_peak(values, above: bool):  # (..., n_base) -> block means and peaks (..., n_steps)
            mean = np.add.reduceat(values, starts, axis=-1) / counts
            return mean, (np.maximum if above else np.minimum).reduceat(values, starts, axis=-1)

        def spread(values, above: bool):
            mean, peak = mean_peak(values, above)
            return np.clip(peak - mean if above else mean - peak, 0.0, None)

        w = self.watched_buses
        vm = ac.vm_pu[:, w].T
        old = self.block_spread
        # A margin that just mended a block fades over a few checks instead of vanishing
        # with the plan it shaped (which would break the block again next cycle).
        self.block_spread = {
            "vm_low": np.maximum(spread(vm, False), _SPREAD_FADE * old["vm_low"]),
            "vm_high": np.maximum(spread(vm, True), _SPREAD_FADE * old["vm_high"]),
            "import": np.maximum(spread(ac.p_slack_kw, True), _SPREAD_FADE * old["import"]),
            "export": np.maximum(spread(-ac.p_slack_kw, True), _SPREAD_FADE * old["export"]),
            "flow": old["flow"],
        }
        broken_vm = (vm < self.v_band_min_pu[w, None]) | (vm > self.v_band_max_pu[w, None])
        self.active_vm |= np.logical_or.reduceat(broken_vm, starts, axis=1)
        if self.group_rep.size:
            rel = np.array([(ac.loading_percent[:, g].T / limit_percent[g]).max(axis=0) for g in self.branch_groups])
            mean, peak = mean_peak(rel, True)
            factor = np.where(peak > 1e-9, np.minimum(mean / np.maximum(peak, 1e-9), 1.0), 1.0)
            self.block_spread["flow"] = np.minimum(factor, 1.0 - _SPREAD_FADE * (1.0 - old["flow"]))
            self.active_flow |= np.logical_or.reduceat(rel > 1.0, starts, axis=1)
        self._set_band_limits()
        self._set_connection_limits()
        self._set_flow_cap()
        self._set_voltage_band()

    def _set_voltage_band(self) -> None:
        """Voltage rows: the band less the AC correction, taken back to the linear voltage
        that reaches it (the LP's voltages are the linear model's), or a band no voltage
        can leave where the row is relaxed."""
        vm0 = self.sens.vm0_pu[self.watched_buses, None]
        self.p["v_min"].value = np.where(self.active_vm, linear_voltage_pu(self.v_min_pu - self.vm_corr_pu, vm0),
                                         -_RELAXED_PU)
        self.p["v_max"].value = np.where(self.active_vm, linear_voltage_pu(self.v_max_pu - self.vm_corr_pu, vm0),
                                         _RELAXED_PU)
        if "vm_on" in self.p:
            self.p["vm_on"].value = self.active_vm.astype(float)
        self._set_steps_on()

    def _set_steps_on(self) -> None:
        """Sparse form: a step's grid rows and network equations are in the LP while one
        of its rows is active."""
        if self.grid_form != "sparse":
            return
        on = self.active_vm.any(axis=0) | self.active_flow.any(axis=0)
        for t, param in enumerate(self.step_on):
            param.value = float(on[t])

    def adopt_corrections(self, other: "DispatchProblem") -> None:
        """Take another problem's grid corrections (voltages, losses) for this cycle."""
        self.p["losses"].value = other.p["losses"].value
        self.vm_corr_pu = other.vm_corr_pu.copy()
        self._set_voltage_band()

    # --- lazy grid rows --------------------------------------------------------------------------

    def grid_rows(self, p_bus_kw: np.ndarray, q_bus_kvar: np.ndarray):
        """Linear branch-group utilisation (share of the capped rating) and the voltage
        model's bus voltages (with this cycle's corrections) of a plan, each (rows, n_steps)."""
        sens, w, rep = self.sens, self.watched_buses, self.group_rep
        T = p_bus_kw.shape[0]
        util = np.zeros((rep.size, T))
        if rep.size:
            pf = np.abs(sens.branch_p_per_kw[rep] @ p_bus_kw.T)
            qf = np.abs(sens.branch_q_per_kvar[rep] @ q_bus_kvar.T)
            reach = np.max([(c * pf + s * qf) / h for c, s, h in _polygon_facets()], axis=0)
            util = reach / np.maximum(self.flow_cap_kva, 1e-9)
        return util, self._voltage_model(p_bus_kw, q_bus_kvar) + self.vm_corr_pu

    def activate_broken_rows(self, within_steps: int | None = None) -> int:
        """Activate every relaxed grid row the solved plan breaks; return how many of them
        lie in the first ``within_steps`` planning steps (None: anywhere).  Rows broken
        further out are activated all the same, for the next solve."""
        if not self.park.settings.lazy_grid_rows:
            return 0
        util, vm = self.grid_rows(*self.bus_injections(*self.injections()))
        broken_flow = ~self.active_flow & (util > 1.0 + _LAZY_TOL)
        broken_vm = ~self.active_vm & ((vm < self.v_min_pu - _LAZY_TOL) | (vm > self.v_max_pu + _LAZY_TOL))
        n = int(broken_flow.sum() + broken_vm.sum())
        # Rows the current plan has not seen: its AC overloads there say nothing about the
        # linear model's error (see correct).
        self.unsolved_flow = _widen(broken_flow, _LAZY_WIDEN_STEPS) & ~self.active_flow
        if n:
            # A plan pushed off one limit step lands on its neighbours, and rows close to
            # their limit are next: take them in as well.
            near_flow = util > _LAZY_NEAR_FRAC
            near_vm = (vm < self.v_min_pu + _LAZY_NEAR_PU) | (vm > self.v_max_pu - _LAZY_NEAR_PU)
            self.active_flow |= _widen(broken_flow, _LAZY_WIDEN_STEPS) | near_flow
            self.active_vm |= _widen(broken_vm, _LAZY_WIDEN_STEPS) | near_vm
            self.lazy_rounds += 1
            self._set_flow_cap()
            self._set_voltage_band()
            if within_steps is not None:
                n = int(broken_flow[:, :within_steps].sum() + broken_vm[:, :within_steps].sum())
        return n

    def relax_slack_rows(self, within_steps: int | None = None) -> None:
        """After a cycle, relax the active rows with wide slack in its plan.

        ``within_steps`` (None: the whole horizon) is the strict window a cycle re-solves
        for: the rows of the next cycle's window (these steps and one more, since the
        next cycle starts a step on) become active exactly where this plan comes near
        their limits, and voltage rows beyond it are relaxed sooner (see
        ``_WINDOW_BAND_PU``)."""
        if not self.park.settings.lazy_grid_rows:
            return
        util, vm = self.grid_rows(*self.bus_injections(*self.injections()))
        slack_pu = np.minimum(vm - self.v_min_pu, self.v_max_pu - vm)
        if within_steps is None:
            self.active_flow &= util >= _RELAX_FLOW_FRAC
            self.active_vm &= slack_pu < _RELAX_VOLTAGE_PU
            return
        window = np.arange(util.shape[1]) < within_steps + 1
        self.active_flow = np.where(window, util >= _WINDOW_BAND_FRAC, self.active_flow & (util >= _RELAX_FLOW_FRAC))
        self.active_vm = np.where(window, slack_pu < _WINDOW_BAND_PU, self.active_vm & (slack_pu < _BEYOND_RELAX_PU))

    @property
    def active_grid_rows(self) -> tuple[int, int]:
        """Active (branch-group, bus) rows out of all, summed over steps."""
        return int(self.active_flow.sum() + self.active_vm.sum()), int(self.active_flow.size + self.active_vm.size)

    def _voltage_model(self, p_bus_kw: np.ndarray, q_bus_kvar: np.ndarray) -> np.ndarray:
        """The watched buses' voltages (n_watched, n_steps) a plan's bus injections give in
        the voltage model, before the AC correction."""
        w, sens = self.watched_buses, self.sens
        vm_lin = sens.vm0_pu[w, None] + sens.dvm_dp_pu_per_kw[w] @ p_bus_kw.T + sens.dvm_dq_pu_per_kvar[w] @ q_bus_kvar.T
        return ac_voltage_pu(vm_lin, sens.vm0_pu[w, None])

    # --- grid corrections from the AC check ------------------------------------------------------

    def correct(self, ac, p_bus_kw: np.ndarray, q_bus_kvar: np.ndarray, tighten: bool = True) -> None:
        """Fold an AC check of a plan back into the linear model.

        ``p_bus_kw``, ``q_bus_kvar`` (n_steps, n_buses) are the injections the AC check
        solved.  Voltage corrections take the difference between the AC voltage and the
        voltage model's (:func:`ac_voltage_pu` of the linear one) at every watched bus,
        branch caps follow the lowest AC voltage at each group's ends (a branch's current
        is its apparent power over its voltage; up to the calibration's voltage), the
        connection's losses are taken from the AC slack power and, with ``tighten``,
        branch caps shrink wherever the AC loading exceeded its limit.
        """
        w = self.watched_buses
        ok = np.asarray(ac.converged, bool)
        model = self._voltage_model(p_bus_kw, q_bus_kvar)
        self.vm_corr_pu = np.where(ok[None, :], ac.vm_pu[:, w].T - model, self.vm_corr_pu)
        self._set_voltage_band()
        self.p["losses"].value = np.where(ok, ac.p_slack_kw + p_bus_kw.sum(axis=1), self.p["losses"].value)
        if not self.group_rep.size:
            return
        vm_end = np.maximum(self._group_end_vm(ac.vm_pu), _FLOW_VM_FLOOR_PU)
        self.flow_vm_pu = np.where(ok[None, :], vm_end, self.flow_vm_pu)
        if tighten:
            # Each group's loading relative to its limit: the worst member counts.
            rel = np.array([(ac.loading_percent[:, g].T / self.branch_limit_percent[g]).max(axis=0)
                            for g in self.branch_groups])
            # Only rows the plan was solved with: an overload where a row was relaxed (and
            # just activated) is the missing row's, not the linearisation's.
            loading = np.where(self.unsolved_flow, 0.0, rel)
            limit = np.ones_like(rel)
            ratio = np.where(loading > limit, limit / np.maximum(loading, 1e-9), 1.0).min(axis=1)
            # A plan that flattens load against a limit moves an overload to the neighbouring
            # steps, so every step near the limit shares its branch's worst ratio.
            near = (loading > _NEAR_LIMIT_FRAC * limit) & (ratio[:, None] < 1.0)
            self.flow_scale = np.where(near, self.flow_scale * ratio[:, None] * 0.995, self.flow_scale)
        self._set_flow_cap()

    # --- results ---------------------------------------------------------------------------------

    def injections(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Solved active and reactive injections per kind, each (n_assets, n_steps)."""
        p_kw, q_kvar = {}, {}
        for kind, c in self.contributions.items():
            p_kw[kind] = np.asarray(c.p_kw.value, float).reshape(self.fleets[kind].n, -1)
            q_kvar[kind] = (np.zeros_like(p_kw[kind]) if c.q_kvar is None
                            else np.asarray(c.q_kvar.value, float).reshape(p_kw[kind].shape))
        return p_kw, q_kvar

    def bus_injections(self, p_kw: dict[str, np.ndarray], q_kvar: dict[str, np.ndarray]):
        """Per-bus injections (n_steps, n_buses) [kW], [kvar] from per-kind asset arrays."""
        T = next(iter(p_kw.values())).shape[1]
        P = np.zeros((T, self.park.grid.n_buses))
        Q = np.zeros_like(P)
        for kind in p_kw:
            P += (self.incidence[kind] @ p_kw[kind]).T
            Q += (self.incidence[kind] @ q_kvar[kind]).T
        return P, Q

    def cost_breakdown(self) -> dict[str, float]:
        return {name: float(expr.value) for name, expr in self.costs.items()}


def ac_voltage_pu(vm_lin_pu, vm0_pu):
    """The voltage [pu] the AC power flow gives at a bus whose linearised voltage is
    ``vm_lin_pu``, linearised at ``vm0_pu``, by the physics of a line.

    The linear model takes the currents at the base voltage; a line feeding power S to a
    bus at voltage V carries S / V.  Its voltage change is then the linear one scaled by
    vm0 / V, ``V - vm0 = (vm_lin - vm0) vm0 / V``, whose root is
    ``V = (vm0 + sqrt(vm0^2 + 4 vm0 (vm_lin - vm0))) / 2``: a drop deepens and a rise
    flattens as they grow.  Every line on a bus's path carries current at its own (higher)
    voltage, so on a feeder this overstates a drop slightly; the AC check's correction
    takes up the rest.  On the synthetic feeders, carrying one plan's correction to a
    plan with a third of the street buses drawing up to 30-60 kW more, this model missed
    the AC voltages by at most 0.0009-0.0014 pu, the linear voltage with the same plan's
    difference by up to 0.0043-0.0076 pu (781 and 141 buses; tests/test_grid.py).  Monotone, so it has an inverse
    (:func:`linear_voltage_pu`); beyond a drop of a quarter of vm0 (no power flow goes
    there) it holds at vm0 / 2."""
    vm0_pu = np.asarray(vm0_pu, float)
    return 0.5 * (vm0_pu + np.sqrt(np.maximum(vm0_pu * (4.0 * np.asarray(vm_lin_pu, float) - 3.0 * vm0_pu), 0.0)))


def linear_voltage_pu(vm_pu, vm0_pu):
    """The linearised voltage at which :func:`ac_voltage_pu` gives ``vm_pu``."""
    vm_pu = np.asarray(vm_pu, float)
    return vm0_pu + vm_pu * (vm_pu - vm0_pu) / vm0_pu


def _polygon_facets() -> list[tuple[float, float, float]]:
    """(cos, sin) of each branch-polygon facet's normal and cos of its half-angle."""
    v = np.deg2rad(_VERTEX_DEG)
    return [(np.cos((a + b) / 2), np.sin((a + b) / 2), np.cos((b - a) / 2)) for a, b in zip(v[:-1], v[1:])]


def _widen(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` (rows, n_steps) with every True spread ``steps`` steps either way."""
    out = mask.copy()
    for k in range(1, steps + 1):
        out[:, k:] |= mask[:, :-k]
        out[:, :-k] |= mask[:, k:]
    return out


def _finite(name: str, values, n: int | None) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if n is not None and array.shape != (n,):
        raise SpecError(name, f"expected {n} values, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise SpecError(name, "contains NaN or infinite values")
    return array
