"""What a dispatch cycle returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class DispatchResult:
    """A plan for every asset over the horizon, its costs and its AC grid check.

    Attributes
    ----------
    status : str
        ``"optimal"`` when the optimizer's plan is returned, ``"fallback"`` otherwise.
    reason : str or None
        Why a fallback was used, or why grid violations remain.
    p_kw, q_kvar : DataFrame
        Setpoints per step (rows, tz-aware step starts) and asset (columns), injection
        positive [kW], [kvar].
    costs_cny : dict
        Objective terms over the horizon [CNY]; empty for a fallback.
    grid : DataFrame
        Per step, from the AC power flow of the plan: ``p_import_kw``,
        ``max_loading_percent``, ``vm_min_pu``, ``vm_max_pu``, ``violations`` (count of
        element limits broken) and ``converged``.
    details : dict of DataFrame
        Per-asset trajectories worth plotting (``soc_frac``, ``e_th_kwh``, ``ev_kw``, ...).
    ev_sessions : DataFrame
        Planned sessions with requested, planned and unmet energy [kWh].
    """

    status: str
    reason: str | None
    p_kw: pd.DataFrame
    q_kvar: pd.DataFrame
    costs_cny: dict[str, float]
    grid: pd.DataFrame
    details: dict[str, pd.DataFrame] = field(default_factory=dict)
    ev_sessions: pd.DataFrame = field(default_factory=pd.DataFrame)
    grid_iterations: int = 0
    # Rounds that activated grid rows a plan broke (re-solved at once when one lies in the
    # strict window, else left for the next cycle); LP solves the cycle took in all.
    lazy_rounds: int = 0
    lp_solves: int = 0
    solve_s: float = 0.0  # LP solves as the caller sees them: cvxpy's parameter updates, the solver, unpacking
    solver_s: float = 0.0  # of which inside the solver itself (cvxpy's solver_stats.solve_time)
    ac_check_s: float = 0.0
    total_s: float = 0.0
    co2_t: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "optimal"

    @property
    def index(self) -> pd.DatetimeIndex:
        return self.p_kw.index

    @property
    def objective_cny(self) -> float:
        return float(sum(self.costs_cny.values()))

    @property
    def violations_remaining(self) -> int:
        return int(self.grid["violations"].sum())

    def next_setpoints(self) -> pd.DataFrame:
        """The first step's setpoints: one row per asset with p_kw and q_kvar."""
        return pd.DataFrame({"p_kw": self.p_kw.iloc[0], "q_kvar": self.q_kvar.iloc[0]})

    def shifted(self, index: pd.DatetimeIndex) -> pd.DataFrame | None:
        """This plan's active setpoints on a later horizon's steps, NaN where it has none."""
        if index[0] < self.index[0] or index[0] > self.index[-1]:
            return None
        return self.p_kw.reindex(index)

    def plan_table(self) -> pd.DataFrame:
        """The whole plan as one wide table (the CSV users download)."""
        parts = [self.p_kw.add_suffix(".p_kw"), self.q_kvar.loc[:, (self.q_kvar != 0).any()].add_suffix(".q_kvar")]
        for name, frame in self.details.items():
            parts.append(frame.add_suffix(f".{name}"))
        parts.append(self.grid.add_prefix("grid."))
        table = pd.concat(parts, axis=1)
        table.index.name = "time"
        return table


def count_violations(ac, v_min_pu: np.ndarray, v_max_pu: np.ndarray, limit_percent: np.ndarray,
                     import_limit_kw: np.ndarray, export_limit_kw: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Element limits broken per step: buses outside their band, overloaded branches and
    the connection beyond its import or export limit (kW tolerance 0.5 %)."""
    volt = (ac.vm_pu < v_min_pu[None, :] - tol) | (ac.vm_pu > v_max_pu[None, :] + tol)
    over = ac.loading_percent > limit_percent.T + 1e-4
    conn = (ac.p_slack_kw > import_limit_kw * 1.005 + 1e-3) | (-ac.p_slack_kw > export_limit_kw * 1.005 + 1e-3)
    return volt.sum(axis=1) + over.sum(axis=1) + conn.astype(int) + (~ac.converged).astype(int)
