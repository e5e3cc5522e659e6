"""Grid model: the only part of vpp that talks to pandapower.

Power is positive when injected into the grid, in kW and kvar; pandapower's
MW/MVAr and load-positive signs are converted only here.  One pandapower power
flow supplies the admittance matrices and base voltages; many time steps are
then solved together by a vectorised Newton-Raphson.  Loads left in the network
are constant-power loads.
"""

from __future__ import annotations

import copy
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandapower as pp
import pandapower.networks as pn
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from pandapower.pypower.idx_brch import BR_R, BR_X, F_BUS, T_BUS
from pandapower.pypower.idx_bus import BASE_KV, PD, QD
from scipy.sparse.csgraph import connected_components, shortest_path

from vpp.errors import GridModelError, SpecError

SQRT3 = np.sqrt(3.0)
MAX_ITER = 20        # Newton iterations per step
TOL_PU = 1e-8        # largest P/Q mismatch accepted, pu on the network's base power
CHORD_RATE = 0.5     # a chord iteration must at least halve the mismatch ...
MAX_CHORD = 25       # ... and at most this many are tried before Newton takes over
_BENCHMARK_SEED = 0  # numpy seed while a pandapower benchmark network is built
_RHS_BLOCK = 16      # right-hand sides per triangular solve (keeps BLAS single-threaded)
_UNSUPPORTED = ("trafo3w", "impedance", "xward", "dcline", "tcsc", "svc", "ssc", "vsc",
                "bus_dc", "line_dc", "source_dc", "load_dc")
_PF_OPTIONS = dict(numba=False, calculate_voltage_angles=True, trafo_model="t",
                   trafo_loading="current", voltage_depend_loads=False,
                   max_iteration=MAX_ITER, tolerance_mva=TOL_PU)


def _runpp(net) -> None:
    """Run one pandapower power flow with the fixed options of this module."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*numba.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        pp.runpp(net, **_PF_OPTIONS)


def load_network(benchmark: str | None = None, json_path: str | None = None,
                 drop_elements: bool = True) -> pp.pandapowerNet:
    """Load a pandapower network from a benchmark name or a JSON file.

    Parameters
    ----------
    benchmark : str, optional
        Name of a function in ``pandapower.networks``, with or without the
        ``create_`` prefix, e.g. ``"create_kerber_dorfnetz"``.
    json_path : str, optional
        File written by ``pandapower.to_json``.
    drop_elements : bool
        Remove the network's own loads, static generators and storages; the
        park declares its own assets.

    Returns
    -------
    pandapowerNet

    Raises
    ------
    SpecError
        Not exactly one source given (``network``), unknown benchmark
        (``network.benchmark``) or unreadable file (``network.json_path``).
    """
    if (benchmark is None) == (json_path is None):
        raise SpecError("network", "give exactly one of 'benchmark' or 'json_path'")
    if benchmark is not None:
        func = next((getattr(pn, n) for n in (benchmark, f"create_{benchmark}")
                     if not n.startswith("_") and callable(getattr(pn, n, None))), None)
        if func is None:
            raise SpecError("network.benchmark", f"unknown pandapower benchmark {benchmark!r}; "
                            "try e.g. 'create_kerber_dorfnetz' or 'panda_four_load_branch'")
        # Some benchmarks draw from the global random generators (the Kerber networks pick
        # each branch cable's type with Python's `random`): seed them, so a park is the
        # same network in every process, and give the caller's generator states back.
        saved = random.getstate(), np.random.get_state()
        try:
            random.seed(_BENCHMARK_SEED)
            np.random.seed(_BENCHMARK_SEED)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = func()
        except TypeError:      # needs arguments
            net = None
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        if not isinstance(net, pp.pandapowerNet):
            raise SpecError("network.benchmark", f"{benchmark!r} builds no network by itself")
    else:
        try:
            net = pp.from_json(json_path)
        except Exception as exc:  # missing file, bad JSON, not a network
            raise SpecError("network.json_path", f"cannot read {json_path!r}: {exc}") from exc
    if drop_elements:
        for table in ("load", "sgen", "storage"):
            if table in net:
                net[table] = net[table].iloc[0:0]
    return net


@dataclass(frozen=True)
class Sensitivities:
    """Linear sensitivities at zero asset injection.

    Attributes
    ----------
    vm0_pu : ndarray, shape (n_bus,)
        Voltage magnitudes at the linearisation point, pu.
    dvm_dp_pu_per_kw, dvm_dq_pu_per_kvar : ndarray, shape (n_bus, n_bus)
        Change of voltage magnitude at bus i (row) per kW (kvar) injected at
        bus j (column), pu/kW (pu/kvar).  Slack rows and columns are zero.
    branch_p_per_kw, branch_q_per_kvar : ndarray, shape (n_branch, n_bus)
        Change of the flow through each branch, counted in the direction away
        from the slack, per kW (kvar) injected at each bus.  Radial networks
        give -1 for buses downstream of the branch and 0 elsewhere; meshed
        networks split the flow in inverse proportion to |z| of the branches.
    """

    vm0_pu: np.ndarray
    dvm_dp_pu_per_kw: np.ndarray
    dvm_dq_pu_per_kvar: np.ndarray
    branch_p_per_kw: np.ndarray
    branch_q_per_kvar: np.ndarray


# Radial networks state voltages along each bus's path when that matches the dense
# sensitivities to this share of their largest entry.
PATH_TOL = 1e-3
# The sparse model's unknowns are voltage changes in units of 1 / SPARSE_X_SCALE pu
# (milli-pu), which keeps its coefficients near the size of the other rows of the LP.
SPARSE_X_SCALE = 1000.0


@dataclass(frozen=True)
class SparseLinearGrid:
    """The linear grid model of :class:`Sensitivities` in sparse form, for LPs.

    Attributes
    ----------
    jacobian_kw : csr_matrix, shape (2 m, 2 m)
        ``jacobian_kw @ x = [p_kw; q_kvar]`` at the m PQ buses (internal order), with
        x = [voltage angles; magnitudes] in milli-pu (rad / 1000, pu / 1000) away
        from the base point.
    pq_row : ndarray, shape (n_bus,)
        Each bus's PQ row (bus order), -1 at the slack bus.
    internal_bus : ndarray, shape (n_bus,)
        Each bus's internal bus (buses joined by closed switches share one).
    subtree : csr_matrix or None, shape (n_internal, n_internal)
        Radial networks: ``subtree @ d = p`` gives d, each internal bus's injection plus
        that of every bus further from the slack.  None for meshed networks.
    branch_bus, branch_sign : ndarray or None, shape (n_branch,)
        Radial networks: the flow factor of each branch is ``branch_sign * d[branch_bus]``.
    vm_step_p, vm_step_q : ndarray or None, shape (n_internal,)
        Radial networks with an unloaded base point: ``subtree.T @ v = vm_step_p * d +
        vm_step_q * d_q`` gives each internal bus's voltage change v [pu] (each bus's
        change is its parent's plus its step times the power below it).  None where
        that does not match the dense sensitivities to ``PATH_TOL``.
    """

    jacobian_kw: sp.csr_matrix
    n_pq: int
    pq_row: np.ndarray
    internal_bus: np.ndarray
    n_internal: int
    subtree: sp.csr_matrix | None
    branch_bus: np.ndarray | None
    branch_sign: np.ndarray | None
    vm_step_p: np.ndarray | None = None
    vm_step_q: np.ndarray | None = None


@dataclass(frozen=True)
class AcResult:
    """AC power-flow results for a batch of time steps.

    Attributes
    ----------
    vm_pu : ndarray, shape (n_steps, n_bus)
        Voltage magnitudes, pu, in bus order.
    loading_percent : ndarray, shape (n_steps, n_branch)
        Branch loading, percent, as pandapower defines it.
    p_slack_kw, q_slack_kvar : ndarray, shape (n_steps,)
        Power drawn from the upstream grid at the ext_grid, kW / kvar
        (positive = import into the park).
    losses_kw : ndarray, shape (n_steps,)
        Active losses of the modelled lines and transformers, kW.
    converged : ndarray of bool, shape (n_steps,)
        False where the power flow failed; the other fields are NaN there.
    """

    vm_pu: np.ndarray
    loading_percent: np.ndarray
    p_slack_kw: np.ndarray
    q_slack_kvar: np.ndarray
    losses_kw: np.ndarray
    converged: np.ndarray
    # The solved complex bus voltages in the solver's internal order, for a later
    # ``run_ac(..., start=...)`` of similar injections; None from run_pandapower.
    v_internal: np.ndarray | None = field(default=None, repr=False)

    def take(self, steps: np.ndarray) -> "AcResult":
        """The results at the step positions ``steps`` (repeats allowed), as a batch of its own."""
        return AcResult(self.vm_pu[steps], self.loading_percent[steps], self.p_slack_kw[steps],
                        self.q_slack_kvar[steps], self.losses_kw[steps], self.converged[steps],
                        None if self.v_internal is None else self.v_internal[steps])

    @property
    def max_loading_percent(self) -> np.ndarray:
        """Highest branch loading per step, percent, shape (n_steps,)."""
        return self.loading_percent.max(axis=1, initial=0.0)

    @property
    def vm_min_pu(self) -> np.ndarray:
        """Lowest bus voltage per step, pu, shape (n_steps,)."""
        return self.vm_pu.min(axis=1)

    @property
    def vm_max_pu(self) -> np.ndarray:
        """Highest bus voltage per step, pu, shape (n_steps,)."""
        return self.vm_pu.max(axis=1)


def _column(table, name: str, default: float) -> np.ndarray:
    """Float column of a pandapower table; missing column or NaN gives ``default``."""
    if name not in table:
        return np.full(len(table), float(default))
    vals = table[name].to_numpy(dtype=float, na_value=np.nan)
    return np.where(np.isnan(vals), float(default), vals)


def _label(name, fallback: str) -> str:
    """``name`` if it is a non-empty string, else ``fallback``."""
    return name if isinstance(name, str) and name else fallback


class GridModel:
    """Network model for fast batched AC power flows and linear sensitivities.

    Parameters
    ----------
    net : pandapowerNet
        The network.  It is copied; the caller's object is left untouched.
    v_min_pu, v_max_pu : float
        Voltage band, pu, for buses without ``min_vm_pu`` / ``max_vm_pu``.
    max_loading_percent : float
        Loading limit, percent, for branches without ``max_loading_percent``.

    Raises
    ------
    GridModelError
        Not exactly one in-service ext_grid, in-service ``gen`` or other
        unsupported elements (DC, trafo3w, ...), a bus not supplied from the
        ext_grid, or a failing base power flow.
    """

    def __init__(self, net: pp.pandapowerNet, v_min_pu: float = 0.95, v_max_pu: float = 1.05,
                 max_loading_percent: float = 100.0):
        net = copy.deepcopy(net)
        ext = net.ext_grid[net.ext_grid.in_service.astype(bool)]
        if len(ext) != 1:
            raise GridModelError(f"need exactly one in-service ext_grid, found {len(ext)}")
        for table in ("gen",) + _UNSUPPORTED:
            if table in net and len(net[table]) and (
                    "in_service" not in net[table] or net[table].in_service.astype(bool).any()):
                raise GridModelError(f"in-service {table!r} elements are not supported")
        buses = net.bus[net.bus.in_service.astype(bool)]
        self.bus_index = buses.index.to_numpy(dtype=np.int64)
        self.n_buses = len(self.bus_index)
        self.bus_names = [_label(n, str(i)) for i, n in zip(self.bus_index, buses.name)]
        self.v_min_pu = _column(buses, "min_vm_pu", v_min_pu)
        self.v_max_pu = _column(buses, "max_vm_pu", v_max_pu)
        # one zero-power sgen per bus carries the injections of run_pandapower
        self._sgen = np.array([pp.create_sgen(net, int(b), p_mw=0.0, q_mvar=0.0, name="vpp")
                               for b in self.bus_index], dtype=np.int64)
        self._net = net
        try:
            _runpp(net)
        except Exception as exc:
            raise GridModelError(f"base power flow failed: {exc}") from exc

        ppci = net._ppc["internal"]
        n_int = ppci["bus"].shape[0]
        pos = np.asarray(net._pd2ppc_lookups["bus"])[self.bus_index]
        if np.any((pos < 0) | (pos >= n_int)):
            bad = self.bus_index[(pos < 0) | (pos >= n_int)].tolist()
            raise GridModelError(f"buses {bad[:10]} are not supplied from the ext_grid")
        if len(ppci["pv"]) or len(ppci["ref"]) != 1:
            raise GridModelError("only PQ buses and one slack bus are supported")
        self._pos = pos.astype(np.int64)             # bus order -> internal (ppci) bus
        self._ref = int(ppci["ref"][0])
        self._pq = np.asarray(ppci["pq"], dtype=np.int64)
        self._m = len(self._pq)
        self.slack_position = int(np.flatnonzero(self.bus_index == int(ext.bus.iloc[0]))[0])
        self._base_mva = float(ppci["baseMVA"])
        self._ybus = sp.csr_matrix(ppci["Ybus"])
        self._V0 = np.asarray(ppci["V"], dtype=complex).copy()
        ibus, br = ppci["bus"], ppci["branch"]
        self._S0 = -(ibus[:, PD].real + 1j * ibus[:, QD].real) / self._base_mva
        self._agg = sp.csr_matrix((np.ones(self.n_buses), (np.arange(self.n_buses), self._pos)),
                                  shape=(self.n_buses, n_int))   # merged buses share a row
        self.vm_base_pu = np.abs(self._V0[self._pos])

        # branches: in-service, energised lines in net.line order, then trafos
        internal = np.cumsum(ppci["branch_is"]) - 1
        f_all, t_all = br[:, F_BUS].real.astype(int), br[:, T_BUS].real.astype(int)
        base_kv, parts = ibus[:, BASE_KV].real, []
        for kind in ("line", "trafo"):
            if kind not in net._pd2ppc_lookups["branch"]:
                continue
            start, tab = net._pd2ppc_lookups["branch"][kind][0], net[kind]
            use = tab.in_service.to_numpy(bool) & ppci["branch_is"][start:start + len(tab)]
            ri = internal[start:start + len(tab)][use]
            fkv, tkv = base_kv[f_all[ri]], base_kv[t_all[ri]]
            rate = (_column(tab, "df", 1.0) * _column(tab, "parallel", 1.0) * tab[
                "max_i_ka" if kind == "line" else "sn_mva"].to_numpy(float))[use]
            if kind == "line":      # loading = max(I_from, I_to) / I_max
                rating, kf, kt = SQRT3 * fkv * rate, 1 / (SQRT3 * fkv), 1 / (SQRT3 * tkv)
            else:                   # loading = max(I_hv vn_hv, I_lv vn_lv) sqrt3 / S_n
                rating, kf, kt = rate, tab.vn_hv_kv.to_numpy(float)[use] / fkv, \
                    tab.vn_lv_kv.to_numpy(float)[use] / tkv
            names = [_label(n, f"{kind} {i}") for i, n in zip(tab.index[use], tab.name[use])]
            parts.append((ri, tab.index[use].to_numpy(np.int64), names, [kind] * len(ri),
                          _column(tab, "max_loading_percent", max_loading_percent)[use],
                          rating * 1000.0, kf * self._base_mva / rate * 100.0,
                          kt * self._base_mva / rate * 100.0))
        cols = [sum((list(part[k]) for part in parts), []) for k in range(8)]
        self._br_rows, self._br_pd = np.array(cols[0], int), np.array(cols[1], int)
        self.branch_names, self.branch_kind = cols[2], cols[3]
        self.branch_limit_percent, self.branch_rating_kva, self._kf, self._kt = (
            np.array(c, dtype=float) for c in cols[4:])
        self.n_branches = len(self._br_rows)
        self._yf = sp.csr_matrix(ppci["Yf"])[self._br_rows]
        self._yt = sp.csr_matrix(ppci["Yt"])[self._br_rows]
        self._f_all, self._t_all = f_all, t_all
        self._z_all = np.abs(br[:, BR_R].real + 1j * br[:, BR_X].real)
        self._sens = None
        self._build_jacobian_pattern()
        self._j0 = self._jacobian(self._V0[None, :], (self._ybus @ self._V0)[None, :]).tocsc()
        self._lu0 = spla.splu(self._j0)
        self._sparse = None

    @property
    def net(self) -> pp.pandapowerNet:
        """The model's own copy of the network; ``res_*`` hold the last ``run_pandapower``.

        It carries one extra sgen per bus (named ``vpp``) for the injections.
        """
        return self._net

    def bus_position(self, bus: int | str) -> int:
        """Position in bus order of a bus given by pandapower index or name.

        Raises
        ------
        SpecError
            With field ``bus`` if the network has no such bus.
        """
        if isinstance(bus, str):
            hits = [k for k, n in enumerate(self.bus_names) if n == bus]
            what = f"named {bus!r}"
        elif isinstance(bus, (int, np.integer)) and not isinstance(bus, bool):
            hits, what = np.flatnonzero(self.bus_index == int(bus)).tolist(), f"with index {bus}"
        else:
            raise SpecError("bus", f"expected a bus name or index, got {type(bus).__name__}")
        if len(hits) != 1:
            raise SpecError("bus", f"no bus {what} in the network" if not hits
                            else f"more than one bus {what}")
        return int(hits[0])

    def sensitivities(self) -> Sensitivities:
        """Linear voltage and flow sensitivities at zero asset injection (cached).

        Voltage sensitivities are the inverse of the AC power-flow Jacobian at
        the base point; flow sensitivities are a transfer-distribution matrix
        with the slack balancing every injection.

        Returns
        -------
        Sensitivities
        """
        if self._sens is None:
            m = self._m
            inv = self._chord_solve(np.eye(2 * m)).T      # d[angle, |V|] / d[P, Q], pu/pu
            pq_of = np.full(len(self._V0), -1)
            pq_of[self._pq] = np.arange(m)
            rows = pq_of[self._pos]
            keep = np.flatnonzero(rows >= 0)
            r, ix = rows[keep], np.ix_(keep, keep)
            dvp, dvq = np.zeros((2, self.n_buses, self.n_buses))
            per_kw = 1.0 / (1000.0 * self._base_mva)
            dvp[ix] = inv[np.ix_(m + r, r)] * per_kw
            dvq[ix] = inv[np.ix_(m + r, m + r)] * per_kw
            flow = self._flow_factors()[:, self._pos]
            self._sens = Sensitivities(self.vm_base_pu.copy(), dvp, dvq, flow, flow.copy())
        return self._sens

    def feeder_of_bus(self) -> np.ndarray:
        """Per bus (bus order), a label shared by all buses that lines connect without a
        transformer between them: one label per LV feeder behind its secondary substation,
        one for the MV network."""
        lines = self._br_rows[np.array(self.branch_kind) == "line"]
        n_int = len(self._V0)
        adj = sp.csr_matrix((np.ones(len(lines)), (self._f_all[lines], self._t_all[lines])), shape=(n_int, n_int))
        _, label = connected_components(adj, directed=False)
        return label[self._pos]

    def sparse_model(self) -> "SparseLinearGrid":
        """The linear model of :meth:`sensitivities` in sparse form (cached).

        The dense sensitivities are ``J0^-1``, every bus against every bus; stated as
        ``J0 x = injections`` with x the voltage angles and magnitudes they give, the same
        model has as many non-zeros as the network has branches.  On a radial network the
        flow factors become ``(I - C) d = injections`` (d: each bus's injection plus that of
        every bus below it) and each branch carries its lower bus's d.
        """
        if self._sparse is None:
            m, n_int = self._m, len(self._V0)
            pq_of = np.full(n_int, -1)
            pq_of[self._pq] = np.arange(m)
            f, t, ref = self._f_all, self._t_all, self._ref
            steps = subtree = branch_bus = branch_sign = None
            if len(f) == n_int - 1:
                adj = sp.csr_matrix((np.ones(len(f)), (f, t)), shape=(n_int, n_int))
                hops = shortest_path(adj, directed=False, unweighted=True, indices=ref)
                if np.all(np.isfinite(hops)):
                    f_is_upper = hops[f] <= hops[t]
                    upper, lower = np.where(f_is_upper, f, t), np.where(f_is_upper, t, f)
                    subtree = (sp.eye(n_int, format="csr")
                               - sp.csr_matrix((np.ones(len(f)), (upper, lower)), shape=(n_int, n_int))).tocsr()
                    # Each branch's flow factor at its lower bus, read off the (cached) dense factors.
                    rep = self._bus_of_internal()
                    branch_bus = lower[self._br_rows]
                    branch_sign = self.sensitivities().branch_p_per_kw[np.arange(len(branch_bus)), rep[branch_bus]]
                    steps = self._voltage_steps(upper, lower, subtree)
            self._sparse = SparseLinearGrid(
                jacobian_kw=(self._j0 * (1000.0 * self._base_mva / SPARSE_X_SCALE)).tocsr(), n_pq=m,
                pq_row=pq_of[self._pos], internal_bus=self._pos.copy(), n_internal=n_int,
                subtree=subtree, branch_bus=branch_bus, branch_sign=branch_sign,
                vm_step_p=None if steps is None else steps[0], vm_step_q=None if steps is None else steps[1])
        return self._sparse

    def branch_buses(self) -> np.ndarray:
        """Per branch (branch order), the bus-order positions of its two ends, shape
        (n_branches, 2); -1 for an end at an auxiliary bus the network does not list."""
        rep, rows = self._bus_of_internal(), self._br_rows
        return np.stack([rep[self._f_all[rows]], rep[self._t_all[rows]]], axis=1)

    def _bus_of_internal(self) -> np.ndarray:
        """A bus-order position per internal bus (-1 for none)."""
        rep = np.full(len(self._V0), -1)
        rep[self._pos] = np.arange(self.n_buses)
        return rep

    def _voltage_steps(self, upper: np.ndarray, lower: np.ndarray, subtree: sp.csr_matrix):
        """Radial networks: each internal bus's voltage step from its parent per kW (kvar)
        of power below it, or None where that model does not hold.

        On a radial network the sensitivity of bus b to an injection at bus j depends,
        to within a few 1e-4 of its size, only on where their paths to the slack part:
        ``dvm[b, j] = phi(lca(b, j))`` with phi a bus's own sensitivity.  A bus's voltage
        change is then its parent's plus (phi(bus) - phi(parent)) times the power below it:
        one coefficient per bus instead of one per bus of the network.
        """
        n_int, ref = len(self._V0), self._ref
        sens = self.sensitivities()
        rep = self._bus_of_internal()
        parent = np.full(n_int, -1)
        parent[lower] = upper
        to_int = sp.csr_matrix((np.ones(self.n_buses), (self._pos, np.arange(self.n_buses))), shape=(n_int, self.n_buses))
        below_per_kw = spla.spsolve(subtree.tocsc(), to_int.toarray())
        steps = []
        for dense in (sens.dvm_dp_pu_per_kw, sens.dvm_dq_pu_per_kvar):
            phi = np.where(rep >= 0, dense[np.maximum(rep, 0), np.maximum(rep, 0)], 0.0)
            phi[ref] = 0.0
            step = phi - np.where(parent >= 0, phi[np.maximum(parent, 0)], 0.0)
            # A loaded base point breaks the property (angles couple the paths): then None,
            # and the voltages go through the Jacobian instead.
            model = spla.spsolve(subtree.T.tocsc(), step[:, None] * below_per_kw)[self._pos]
            if np.abs(model - dense).max() > PATH_TOL * np.abs(dense).max():
                return None
            steps.append(step)
        return steps

    def _flow_factors(self) -> np.ndarray:
        """Flow away from the slack per unit injection at each internal bus.

        Each branch conducts in inverse proportion to its |z|, which suits
        distribution networks with R/X near or above one better than x alone.
        """
        n_int, ref, f, t = len(self._V0), self._ref, self._f_all, self._t_all
        nbr = len(f)
        inc = sp.csr_matrix((np.r_[np.ones(nbr), -np.ones(nbr)],       # +1 from-bus, -1 to-bus
                             (np.r_[0:nbr, 0:nbr], np.r_[f, t])), shape=(nbr, n_int))
        w = sp.diags(1.0 / np.maximum(self._z_all, 1e-9))
        others = np.flatnonzero(np.arange(n_int) != ref)
        factors = np.zeros((nbr, n_int))
        if len(others):
            b_red = (inc.T @ w @ inc).tocsc()[others][:, others]
            factors[:, others] = (w @ inc[:, others]) @ spla.splu(b_red.tocsc()).solve(
                np.eye(len(others)))
        if nbr == n_int - 1:            # connected and n - 1 branches: a tree, exactly 0 / 1
            factors = np.rint(factors)
        adj = sp.csr_matrix((np.ones(nbr), (f, t)), shape=(n_int, n_int))
        hops = shortest_path(adj, directed=False, unweighted=True, indices=ref)
        sign = np.where(hops[f] <= hops[t], 1.0, -1.0)   # +1 if from-bus is nearer the slack
        return (sign[:, None] * factors)[self._br_rows]

    def _build_jacobian_pattern(self) -> None:
        """Precompute the CSR structure of one step's Jacobian (PQ buses only)."""
        pq, m = self._pq, self._m
        ypq = self._ybus[pq][:, pq].tocsr()
        pattern = (abs(ypq) + sp.eye(m, format="csr")).tocoo()
        r, c = pattern.row.astype(np.int64), pattern.col.astype(np.int64)
        self._jr, self._jc, self._jdiag = pq[r], pq[c], r == c
        self._jy = np.asarray(ypq[r, c]).ravel()
        rows, cols = np.r_[r, r, r + m, r + m], np.r_[c, c + m, c, c + m]
        self._jperm = np.lexsort((cols, rows))
        self._jcols = cols[self._jperm]
        self._jindptr = np.searchsorted(rows[self._jperm], np.arange(2 * m + 1))

    def _jacobian(self, V: np.ndarray, I: np.ndarray) -> sp.csr_matrix:
        """Block-diagonal Jacobian of k steps, V and I of shape (k, n_int), pu.

        Unknowns per step are [angle(pq), |V|(pq)], equations [P(pq), Q(pq)].
        """
        k, m, d = V.shape[0], self._m, self._jdiag
        Vr, Vc = V[:, self._jr], V[:, self._jc]
        vn_c = Vc / np.abs(Vc)
        d_va = -1j * Vr * np.conj(self._jy * Vc)
        d_vm = Vr * np.conj(self._jy * vn_c)
        i_d = np.conj(I[:, self._jr[d]])
        d_va[:, d] += 1j * Vr[:, d] * i_d
        d_vm[:, d] += i_d * vn_c[:, d]
        data = np.concatenate([d_va.real, d_vm.real, d_va.imag, d_vm.imag], axis=1)
        nnz, steps = len(self._jcols), np.arange(k)[:, None]
        indices = (self._jcols[None, :] + 2 * m * steps).ravel()
        indptr = np.r_[(self._jindptr[:-1][None, :] + nnz * steps).ravel(), k * nnz]
        return sp.csr_matrix((data[:, self._jperm].ravel(), indices, indptr),
                             shape=(2 * m * k, 2 * m * k))

    def _chord_solve(self, F: np.ndarray) -> np.ndarray:
        """Rows of ``F`` (k, 2m) solved with the base-point Jacobian, in small blocks."""
        out = np.empty_like(F)
        for c in range(0, len(F), _RHS_BLOCK):
            out[c:c + _RHS_BLOCK] = self._lu0.solve(np.asfortranarray(F[c:c + _RHS_BLOCK].T)).T
        return out

    def _inputs(self, p_inj_kw, q_inj_kvar) -> tuple[np.ndarray, np.ndarray]:
        """Injections as float arrays of shape (n_steps, n_bus), checked."""
        p, q = (np.atleast_2d(np.asarray(a, dtype=float)) for a in (p_inj_kw, q_inj_kvar))
        for name, a in (("p_inj_kw", p), ("q_inj_kvar", q)):
            if a.ndim != 2 or a.shape[1] != self.n_buses or a.shape != p.shape:
                raise SpecError(name, f"expected shape (n_steps, {self.n_buses}), got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise SpecError(name, "contains NaN or infinite values")
        return p, q

    def run_ac(self, p_inj_kw: np.ndarray, q_inj_kvar: np.ndarray, start: AcResult | None = None) -> AcResult:
        """Solve the AC power flow of many steps at once.

        Steps start from the base-case voltages (trafo phase shifts included), or
        from ``start``'s where given, with cheap chord iterations on the factorised
        base-point Jacobian.  A step whose mismatch does not halve per iteration
        switches to full Newton-Raphson (all such steps form one block-diagonal
        sparse system), from the base point again if the chord iterations went
        astray.

        Parameters
        ----------
        p_inj_kw, q_inj_kvar : array_like, shape (n_steps, n_bus)
            Injection per bus, kW / kvar (positive = into the grid), on top of
            the loads left in the network.  A 1-D array is one step.
        start : AcResult, optional
            An earlier result of this model with as many steps, typically of the
            same steps under a slightly different plan: each step starts from its
            solved voltages (the base case where it did not converge).  The
            answer is the same to the tolerance; fewer iterations reach it.

        Returns
        -------
        AcResult
            Steps not converged to 1e-8 pu mismatch within 20 Newton
            iterations are flagged in ``converged`` and filled with NaN.
        """
        p, q = self._inputs(p_inj_kw, q_inj_kvar)
        n_steps, pq, m = p.shape[0], self._pq, self._m
        s_sp = self._S0[None, :] + ((p + 1j * q) / (1000.0 * self._base_mva)) @ self._agg
        V = np.tile(self._V0, (n_steps, 1))
        if start is not None and start.v_internal is not None and start.v_internal.shape == V.shape:
            warm = np.asarray(start.converged, bool)
            V[warm] = start.v_internal[warm]
        state = np.zeros(n_steps, dtype=np.int8)  # 0 chord, 1 Newton, 2 converged, 3 failed
        n_chord, n_newton = np.zeros((2, n_steps), dtype=np.int64)
        last, norm0 = np.full(n_steps, np.inf), None
        for _ in range(MAX_CHORD + MAX_ITER + 2):
            act = np.flatnonzero(state < 2)
            if not len(act):
                break
            Vs = V[act]
            I = (self._ybus @ Vs.T).T
            mis = (Vs * np.conj(I) - s_sp[act])[:, pq]
            F = np.concatenate([mis.real, mis.imag], axis=1)
            norm = np.max(np.abs(F), axis=1, initial=0.0)
            norm0 = norm.copy() if norm0 is None else norm0
            st = state[act]
            st[norm < TOL_PU] = 2
            st[(st == 1) & (~np.isfinite(norm) | (n_newton[act] >= MAX_ITER))] = 3
            slow = (st == 0) & (~np.isfinite(norm) | (n_chord[act] >= MAX_CHORD)
                                | ((n_chord[act] >= 2) & (norm > CHORD_RATE * last[act])))
            restart = slow & ~(norm <= norm0[act])
            st[slow] = 1
            state[act], last[act] = st, norm
            V[act[restart]] = self._V0
            go = (st < 2) & ~restart
            act, Vs, I, F, chord = act[go], Vs[go], I[go], F[go], st[go] == 0
            if not len(act):
                continue
            dx = np.empty_like(F)
            if chord.any():
                dx[chord] = -self._chord_solve(F[chord])
                n_chord[act[chord]] += 1
            if (~chord).any():
                jac = self._jacobian(Vs[~chord], I[~chord])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", spla.MatrixRankWarning)
                    dx[~chord] = -spla.spsolve(jac, F[~chord].ravel()).reshape(-1, 2 * m)
                n_newton[act[~chord]] += 1
            vm = np.abs(Vs[:, pq]) + dx[:, m:]
            va = np.angle(Vs[:, pq]) + dx[:, :m]
            V[act[:, None], pq[None, :]] = vm * np.exp(1j * va)
        return self._results(V, s_sp, state == 2)

    def _results(self, V: np.ndarray, s_sp: np.ndarray, ok: np.ndarray) -> AcResult:
        """Turn internal voltages (pu) into an AcResult."""
        solved = V
        V = np.where(ok[:, None], V, np.nan)
        to_kw = 1000.0 * self._base_mva
        i_f, i_t = (self._yf @ V.T).T, (self._yt @ V.T).T
        loading = np.maximum(np.abs(i_f) * self._kf, np.abs(i_t) * self._kt)
        losses = (V[:, self._f_all[self._br_rows]] * np.conj(i_f)
                  + V[:, self._t_all[self._br_rows]] * np.conj(i_t)).real.sum(axis=1)
        ref = self._ref
        s_ref = V[:, ref] * np.conj(self._ybus[ref] @ V.T).ravel() - s_sp[:, ref]
        return AcResult(vm_pu=np.abs(V[:, self._pos]), loading_percent=loading,
                        p_slack_kw=s_ref.real * to_kw, q_slack_kvar=s_ref.imag * to_kw,
                        losses_kw=losses * to_kw, converged=ok.copy(), v_internal=solved)

    def run_pandapower(self, p_inj_kw_1d, q_inj_kvar_1d) -> AcResult:
        """Solve one step with ``pandapower.runpp``, the reference for ``run_ac``.

        Parameters
        ----------
        p_inj_kw_1d, q_inj_kvar_1d : array_like, shape (n_bus,)
            Injection per bus, kW / kvar (positive = into the grid).

        Returns
        -------
        AcResult
            With ``n_steps = 1``.
        """
        p, q = self._inputs(p_inj_kw_1d, q_inj_kvar_1d)
        if p.shape[0] != 1:
            raise SpecError("p_inj_kw", "run_pandapower solves exactly one step")
        net = self._net
        net.sgen.loc[self._sgen, "p_mw"] = p[0] / 1000.0       # sgen: positive = generating
        net.sgen.loc[self._sgen, "q_mvar"] = q[0] / 1000.0
        try:
            _runpp(net)
        except pp.LoadflowNotConverged:
            return AcResult(np.full((1, self.n_buses), np.nan),
                            np.full((1, self.n_branches), np.nan),
                            *(np.full(1, np.nan) for _ in range(3)), np.zeros(1, dtype=bool))
        is_line = np.array(self.branch_kind) == "line"
        res = [net.res_line.loc[self._br_pd[is_line]], net.res_trafo.loc[self._br_pd[~is_line]]]
        loading = np.r_[res[0].loading_percent.to_numpy(float), res[1].loading_percent]
        losses = res[0].pl_mw.sum() + res[1].pl_mw.sum()
        eg = net.res_ext_grid.loc[net.ext_grid.index[net.ext_grid.in_service.astype(bool)][0]]
        return AcResult(net.res_bus.vm_pu.loc[self.bus_index].to_numpy(float)[None, :],
                        loading[None, :], np.array([eg.p_mw * 1000.0]),
                        np.array([eg.q_mvar * 1000.0]), np.array([losses * 1000.0]),
                        np.ones(1, dtype=bool))
