"""HiGHS for cvxpy, handing the LP over as arrays.

cvxpy's own HiGHS interface fills a ``highspy.HighsModel`` field by field; for the
reference park's LP (about 8,000 rows, 2,000 columns) that copy costs about 20 ms per
solve, as much as HiGHS's own simplex on a typical re-solve.  ``highspy.Highs.passModel``
also takes the LP as NumPy arrays, which costs about 2 ms.  :data:`HIGHS_ARRAYS` is
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


class HighsArrays(HIGHS):
    """cvxpy's HiGHS conic interface, passing the LP to HiGHS as arrays (LPs only)."""

    MIP_CAPABLE = False

    def name(self) -> str:
        return "VPP_HIGHS_ARRAYS"

    def solve_via_data(self, data, warm_start: bool, verbose: bool, solver_opts, solver_cache=None):
        import highspy as hp

        if data[s.BOOL_IDX] or data[s.INT_IDX]:
            raise SolverError("HIGHS_ARRAYS solves linear programs only")
        solver = hp.Highs()
        inf = solver.inf
        dims = dims_to_solver_dict(data[s.DIMS])
        A = data[s.A].tocsc()
        n_rows, n_cols = A.shape
        b = np.asarray(data[s.B], dtype=np.float64)
        n_eq = dims[s.EQ_DIM]
        # Equality rows first (l = u = b), then A x <= b.
        row_lower = np.concatenate([b[:n_eq], np.full(n_rows - n_eq, -inf)])
        lb, ub = data[s.LOWER_BOUNDS], data[s.UPPER_BOUNDS]
        col_lower = np.full(n_cols, -inf) if lb is None else np.asarray(lb, dtype=np.float64)
        col_upper = np.full(n_cols, inf) if ub is None else np.asarray(ub, dtype=np.float64)

        opts = dict(solver_opts)
        unpack_highs_options_inplace(opts)
        opts.pop("write_model_file", None)
        solver.setOptionValue("log_to_console", verbose)
        for name, value in opts.items():
            if solver.setOptionValue(name, value) == hp.HighsStatus.kError:
                raise ValueError(f"HIGHS returned status kError for option (name, value): ({name}, {value})")
        status = solver.passModel(
            n_cols, n_rows, A.nnz, int(hp.MatrixFormat.kColwise), int(hp.ObjSense.kMinimize), 0.0,
            np.asarray(data[s.C], dtype=np.float64), col_lower, col_upper, row_lower, b,
            A.indptr.astype(np.int32, copy=False), A.indices.astype(np.int32, copy=False),
            np.asarray(A.data, dtype=np.float64), np.zeros(n_cols, dtype=np.int32))
        if status == hp.HighsStatus.kError:
            raise SolverError("HiGHS refused the model")
        try:
            solver.run()
            results = {
                "solution": solver.getSolution(),
                "info": solver.getInfo(),
                "model_status": solver.getModelStatus().name,
                "run_time": solver.getRunTime(),
            }
            if results["model_status"] == "kInfeasible":
                results["dual_ray"] = solver.getDualRay()
        except ValueError as error:
            raise SolverError(error) from error
        return results


HIGHS_ARRAYS = HighsArrays()
