"""HiGHS for cvxpy, handing the LP over as arrays.

cvxpy's own HiGHS interface fills a ``highspy.HighsModel`` field by field; for the
reference park's LP (about 8,000 rows, 2,000 columns) that copy costs about 20 ms per
solve, as much as HiGHS's own simplex on a typical re-solve.  ``highspy.Highs.passModel``
also takes the LP as NumPy arrays, which costs about 2 ms.  :class:`HighsArrays` is
cvxpy's interface with only that hand-over changed (a custom solver in cvxpy's sense:
same canonicalisation, same result mapping, its own name), so the solution, the duals,
the statuses and ``solver_stats.solve_time`` are what cvxpy's HIGHS gives.
"""

from __future__ import annotations

import numpy as np
from cvxpy.error import SolverError
from cvxpy.reductions.solvers.conic_solvers.highs_conif import HIGHS, unpack_highs_options_inplace
from cvxpy.reductions.solvers.conic_solvers.conic_solver import dims_to_solver_dict
import cvxpy.settings as s
from cvxpy.reductions.solution import Solution, failure_solution


class HighsArrays(HIGHS):
    """cvxpy's HiGHS conic interface, passing the LP to HiGHS as arrays (LPs only).

    With ``keep_basis`` the instance remembers the optimal simplex basis of its last solve
    of each LP shape and hands it to HiGHS for the next solve of that shape, whose simplex
    then starts from it (a hot start, without presolve) instead of from a crash basis
    after presolve.  A re-solve within a cycle (grid rows switched on, caps tightened)
    and the next cycle's LP (the horizon moved on by a step) differ from the last one in
    their data only, and their optimal bases differ in a few hundred pivots: on the
    reference park's cycles a hot start took a fifth to a quarter of the simplex
    iterations of a cold one and 15-23 % less time inside HiGHS (docs/performance.md).
    Interior-point solves neither take nor leave a basis.  Both methods get only the
    rows that can bind (:func:`_rows_that_bind`); a hot start keeps its basis's row set
    while it can (:func:`_rows_for_hot_start`), and a simplex solve without duals takes
    rows on a single column as that column's bounds (:func:`_fold_into_bounds`).

    With ``duals=False`` the solution comes back without dual values: cvxpy's result
    mapping then skips reading, reshaping and storing a dual for every constraint, which
    on the reference park's cycles was about a twentieth of the dispatch time outside
    HiGHS (the dispatch reads primal values only).

    With ``unreachable_rhs`` an interior-point solve also leaves out every inequality row
    ``a x <= b`` with ``b >= unreachable_rhs``: the limits the caller states nothing can
    reach (vpp's relaxed grid rows).  After the solve those rows are checked at the
    solution; if one is broken, or the solve did not end optimal, the LP is solved again
    with them, so the answer is always the whole LP's.  On the 10,000-asset portfolio
    they are 200,000 to 260,000 of 420,000 rows; without them HiGHS's presolve leaves an
    LP half the size (the network equations that only defined relaxed rows go too),
    and a solve takes about a third of the time (docs/performance.md).
    """

    MIP_CAPABLE = False

    def __init__(self, keep_basis: bool = False, unreachable_rhs: float | None = None, duals: bool = True):
        super().__init__()
        self.keep_basis = keep_basis
        self.duals = duals
        self.unreachable_rhs = unreachable_rhs
        self._bases: dict[tuple[int, int], object] = {}
        self.hot_starts = 0  # solves that started from a remembered basis
        self.whole_lp_resolves = 0  # interior-point solves repeated with the unreachable rows
        self.rows_left_out = 0  # unreachable rows left out of the last solve

    def name(self) -> str:
        return "VPP_HIGHS_ARRAYS"

    def solve_via_data(self, data, warm_start: bool, verbose: bool, solver_opts, solver_cache=None):
        import highspy as hp

        if data[s.BOOL_IDX] or data[s.INT_IDX]:
            raise SolverError("HighsArrays solves linear programs only")
        dims = dims_to_solver_dict(data[s.DIMS])
        opts = dict(solver_opts)
        unpack_highs_options_inplace(opts)
        opts.pop("write_model_file", None)
        ipm = opts.get("solver") == "ipm"
        A = data[s.A]
        n_rows, n_cols = A.shape
        shape = (n_rows, n_cols)
        b = np.asarray(data[s.B], dtype=np.float64)
        n_eq = dims[s.EQ_DIM]
        # Only the rows that can bind go to HiGHS (both methods); for interior point, also
        # only the reachable ones.
        A = A.tocsr()
        entries = _Entries(A)
        rows = every_row = _rows_that_bind(entries, b, n_eq)
        left_out = None  # the reachable-limit rows left out of an interior-point solve
        if ipm and self.unreachable_rhs is not None:
            reachable = (rows < n_eq) | (b[rows] < self.unreachable_rhs)
            rows, left_out = rows[reachable], rows[~reachable]
            self.rows_left_out = len(left_out)
        lb, ub = data[s.LOWER_BOUNDS], data[s.UPPER_BOUNDS]
        bounds = (np.full(n_cols, -np.inf) if lb is None else np.asarray(lb, dtype=np.float64),
                  np.full(n_cols, np.inf) if ub is None else np.asarray(ub, dtype=np.float64))
        # A simplex solve without duals takes rows on a single column as that column's
        # bounds (presolve would, but a hot start skips presolve).
        single = rows[:0]
        if not ipm and not self.duals:
            single, rows = rows[entries.count[rows] == 1], rows[entries.count[rows] != 1]
        # Interior point ignores a basis, and a crossover's basis of a large LP is no
        # start for the simplex method without presolve.
        keep = self.keep_basis and not ipm
        kept = self._bases.pop(shape, None) if keep else None
        basis = None
        if kept is not None:
            rows = _rows_for_hot_start(kept.rows, rows)
            basis = _basis_on_rows(kept, rows)
        if len(single):
            bounds = _fold_into_bounds(entries, b, n_eq, single[~np.isin(single, rows, assume_unique=True)], *bounds)
        try:
            solver = self._run(data, A, b, n_eq, rows, bounds, opts, verbose, basis)
            run_time = solver.getRunTime()
            if left_out is not None and len(left_out) and _needs_every_row(solver, A[left_out], b[left_out]):
                self.whole_lp_resolves += 1
                rows = every_row
                solver = self._run(data, A, b, n_eq, rows, bounds, opts, verbose, None)
                run_time += solver.getRunTime()
            status = solver.getModelStatus()
            if keep and status == hp.HighsModelStatus.kOptimal:
                optimal = solver.getBasis()
                if optimal.valid:
                    self._bases[shape] = _KeptBasis(optimal, rows, n_rows)
            solution = _Solution(solver.getSolution(), rows, n_rows)
            results = {
                "solution": solution,
                "info": solver.getInfo(),
                "model_status": status.name,
                "run_time": run_time,
            }
        except ValueError as error:
            raise SolverError(error) from error
        return results

    def _run(self, data, A, b: np.ndarray, n_eq: int, rows: np.ndarray, bounds, opts: dict, verbose: bool, basis):
        """Hand HiGHS the LP's ``rows`` and its columns' ``bounds`` (lower, upper) and run
        it, from ``basis`` if one is given; returns the solver."""
        import highspy as hp

        A, b, n_eq = A[rows].tocsc(), b[rows], int(np.count_nonzero(rows < n_eq))
        n_cols = A.shape[1]
        solver = hp.Highs()
        inf = solver.inf
        # Equality rows first (l = u = b), then A x <= b.
        row_lower = np.concatenate([b[:n_eq], np.full(A.shape[0] - n_eq, -inf)])
        col_lower, col_upper = bounds

        solver.setOptionValue("log_to_console", verbose)
        for name, value in opts.items():
            if solver.setOptionValue(name, value) == hp.HighsStatus.kError:
                raise ValueError(f"HIGHS returned status kError for option (name, value): ({name}, {value})")
        status = solver.passModel(
            n_cols, A.shape[0], A.nnz, int(hp.MatrixFormat.kColwise), int(hp.ObjSense.kMinimize), 0.0,
            np.asarray(data[s.C], dtype=np.float64), col_lower, col_upper, row_lower, b,
            A.indptr.astype(np.int32, copy=False), A.indices.astype(np.int32, copy=False),
            np.asarray(A.data, dtype=np.float64), np.zeros(n_cols, dtype=np.int32))
        if status == hp.HighsStatus.kError:
            raise SolverError("HiGHS refused the model")
        hot = basis is not None and solver.setBasis(basis) != hp.HighsStatus.kError
        solver.run()
        if hot:
            self.hot_starts += 1
            if solver.getModelStatus() not in (hp.HighsModelStatus.kOptimal, hp.HighsModelStatus.kTimeLimit):
                # A basis from other data may leave the simplex stuck where a cold start
                # (presolve and a crash basis) is not: the result is the cold one's.
                solver.clearSolver()
                solver.run()
        return solver

    def invert(self, results, inverse_data):
        """cvxpy's result mapping, except that an infeasible LP comes back without a
        certificate: the dispatch never reads one, and HiGHS finds its dual ray by running
        the simplex method, which after an interior-point solve of a large portfolio LP
        takes longer than the cycle.  Without ``duals``, an optimal LP comes back with its
        primal values only."""
        if results["model_status"] == "kInfeasible":
            return failure_solution(s.INFEASIBLE, {s.SOLVE_TIME: results["run_time"], s.EXTRA_STATS: results["info"]})
        status = self.STATUS_MAP.get(results["model_status"], s.UNKNOWN)
        if self.duals or status not in s.SOLUTION_PRESENT:
            return super().invert(results, inverse_data)
        info = results["info"]
        attr = {s.SOLVE_TIME: results["run_time"], s.EXTRA_STATS: info,
                s.NUM_ITERS: info.simplex_iteration_count + info.ipm_iteration_count + info.crossover_iteration_count}
        x = np.asarray(results["solution"].col_value)
        return Solution(status, info.objective_function_value + inverse_data[s.OFFSET], {HIGHS.VAR_ID: x}, None, attr)


def _needs_every_row(solver, A_out, b_out: np.ndarray) -> bool:
    """Whether an LP solved without the rows ``A_out x <= b_out`` must be solved again with
    them: its optimum breaks one of them, or it ended neither optimal nor infeasible.  An
    infeasible LP stays infeasible with more rows, and one that ran out of time would
    run out of time again."""
    import highspy as hp

    status = solver.getModelStatus()
    if status == hp.HighsModelStatus.kOptimal:
        x = np.asarray(solver.getSolution().col_value)
        return bool(np.any(A_out @ x > b_out + 1e-6 * np.maximum(np.abs(b_out), 1.0)))
    return status not in (hp.HighsModelStatus.kInfeasible, hp.HighsModelStatus.kTimeLimit)


class _Entries:
    """The non-zero pattern of a CSR matrix ``A``, row by row: the row of each stored
    entry, which stored entries are non-zero (a parameter may have zeroed one), and the
    count of non-zeros per row."""

    def __init__(self, A):
        self.A = A
        self.row = np.repeat(np.arange(A.shape[0]), np.diff(A.indptr))
        self.nonzero = A.data != 0
        self.count = np.bincount(self.row[self.nonzero], minlength=A.shape[0])


def _rows_that_bind(entries: _Entries, b: np.ndarray, n_eq: int) -> np.ndarray:
    """Positions of the rows of ``A x = b`` (the first ``n_eq``) and ``A x <= b`` (its
    ``entries``) that can bind: all but the rows without a non-zero coefficient whose right-hand
    side holds for any x (``0 = 0``, ``0 <= b`` with b >= 0).  Lazy grid rows switched
    off by their 0/1 parameter keep their place in the compiled LP with all coefficients
    zero: on the 10,000-asset portfolio they are a fifth to four fifths of the rows, and
    handing HiGHS the rest made an interior-point solve about 10 % faster (its presolve
    finds them anyway, after taking them in).  On the reference park they are over half
    of its 8,073 rows, and a hot-started simplex, which skips presolve, carries them
    through every iteration: without them a typical re-solve took half the time inside
    HiGHS."""
    satisfied = np.concatenate([b[:n_eq] == 0.0, b[n_eq:] >= 0.0])
    return np.flatnonzero((entries.count > 0) | ~satisfied)


def _fold_into_bounds(entries: _Entries, b: np.ndarray, n_eq: int, rows: np.ndarray,
                      lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column bounds (lower, upper) tightened by ``rows``, each with a single non-zero
    coefficient ``a`` on column j: ``a x_j = b`` fixes x_j at b / a, ``a x_j <= b`` bounds
    it above (a > 0) or below (a < 0) by b / a.  The LP without those rows and with these
    bounds has the same feasible set.  The reference park's LP has about 1,500 such rows
    (power limits that are parameters); as bounds they leave its simplex 2,000 rows
    instead of 3,500, and a hot-started re-solve about half the time inside HiGHS."""
    is_folded = np.zeros(len(entries.count), bool)
    is_folded[rows] = True
    at = entries.nonzero & is_folded[entries.row]
    row, col, a = entries.row[at], entries.A.indices[at], entries.A.data[at]
    value = b[row] / a
    eq = row < n_eq
    lower, upper = lower.copy(), upper.copy()
    below = eq | (a < 0)
    np.maximum.at(lower, col[below], value[below])
    above = eq | (a > 0)
    np.minimum.at(upper, col[above], value[above])
    return lower, upper


# A hot start keeps the last solve's rows while they hold every row that can bind now
# and at most this share more (rows that cannot bind any longer, their slacks basic).
_STALE_ROWS = 0.25


def _rows_for_hot_start(kept_rows: np.ndarray, live: np.ndarray) -> np.ndarray:
    """The rows to hand HiGHS for a hot start from a basis solved on ``kept_rows``, when
    the rows that can bind now are ``live``.  Grid rows are switched on and off between
    solves, a few dozen of the 3,000-4,000 live rows each time on the reference park;
    mapping the basis onto another row set costs more in the conversion of HiGHS's
    status lists than leaving some rows that cannot bind in the LP.  So the kept rows
    stay, with rows taken in as they go live (their slacks basic, the basis stays
    square), until more than ``_STALE_ROWS`` of them are stale; then the basis goes
    onto the live rows alone."""
    stale = len(kept_rows) - np.count_nonzero(np.isin(live, kept_rows, assume_unique=True))
    if stale > _STALE_ROWS * len(live):
        return live
    if stale == len(kept_rows) - len(live):  # every live row is a kept one
        return kept_rows
    return np.union1d(kept_rows, live)


class _KeptBasis:
    """An optimal basis of an LP of ``n_rows`` rows solved on some of its ``rows`` (the
    HiGHS basis as it came back, to hand over again unconverted while the rows stay the
    same)."""

    def __init__(self, basis, rows: np.ndarray, n_rows: int):
        self.basis = basis
        self.rows = rows
        self.n_rows = n_rows


def _basis_on_rows(kept: _KeptBasis, rows: np.ndarray):
    """``kept`` as a HiGHS basis of the LP on ``rows``.  The slack of a row left out of
    the kept basis's solve (it could not bind) counts as basic there: a row taken in
    since (a grid row switched on) enters with its slack basic, which keeps the basis
    square.  A row now left out whose slack was not basic (a limit that bound, switched
    off) leaves one basic variable too many, and HiGHS is told the basis is alien, so
    that it completes it before its simplex starts."""
    import highspy as hp

    if np.array_equal(kept.rows, rows):
        return kept.basis
    basic = hp.HighsBasisStatus.kBasic
    row_status = np.full(kept.n_rows, basic, dtype=object)
    row_status[kept.rows] = kept.basis.row_status
    # Each read of a HighsBasis field converts HiGHS's whole list: read and write each once.
    col_status, row_status = kept.basis.col_status, row_status[rows].tolist()
    basis = hp.HighsBasis()
    basis.col_status, basis.row_status = col_status, row_status
    basis.alien = col_status.count(basic) + row_status.count(basic) != len(rows)
    basis.valid = True
    return basis


class _Solution:
    """A HiGHS solution of an LP given without some of its rows, on all ``n_rows``
    rows again (what cvxpy's result mapping reads): the left-out rows never bind, so
    their duals are zero."""

    def __init__(self, solution, rows: np.ndarray, n_rows: int):
        self.col_value = np.asarray(solution.col_value)
        self.row_dual = np.zeros(n_rows)
        self.row_dual[rows] = solution.row_dual
