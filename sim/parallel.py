"""Parallel in time: a long period split into runs of whole months, one per worker.

A year re-planned every 15 minutes is ~35,000 LP solves in a row.  With ``workers > 1``
the period is cut at month starts into contiguous chunks of about equal length, each
simulated in its own process.  Every chunk after the first starts ``warmup_days``
earlier from the assets' initial states and its warm-up rows are dropped: batteries,
thermal stores and charging sessions forget their starting point within a day, and
because chunks begin on the first of a month the demand charge's "peak so far" starts
from zero exactly as in a sequential run.  The result therefore differs from a sequential
run only by what the assets remember for longer than the warm-up; the same inputs, seed
and number of workers give the same result.

This uses the standard library's process pool (forked workers) on one machine; where fork
is unavailable the run is sequential.  A cluster is Ray's job (each chunk is an
independent task), not this module's.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from sim.forecast import Forecaster
from sim.simulator import Progress, SimResult, simulate

_counters = None
# What the forked workers inherit instead of receiving it pickled (the grid model holds
# factorised matrices that do not pickle).
_shared: dict = {}


def _init(counters) -> None:
    global _counters
    _counters = counters


def chunks(index: pd.DatetimeIndex, n_steps: int, workers: int) -> list[int]:
    """First steps of the chunks: month starts splitting ``n_steps`` into ~equal parts."""
    period = index[:n_steps]
    month_starts = [0] + [int(i) for i in np.flatnonzero(
        (period.day == 1) & (period.hour == 0) & (period.minute == 0)) if i > 0]
    if workers <= 1 or len(month_starts) < 2:
        return [0]
    cuts = [0]
    for k in range(1, workers):
        target = k * n_steps / workers
        best = min(month_starts, key=lambda i: abs(i - target))
        if best > cuts[-1]:
            cuts.append(best)
    return cuts


def _run_chunk(job) -> tuple[int, SimResult]:
    k, first, stop, warm, controller, replan_every = job
    park, series, forecaster = _shared["park"], _shared["series"], _shared["forecaster"]
    begin = first - warm
    horizon = park.settings.horizon_steps
    window = series.window(begin, stop - begin + horizon)

    def on_step(done):
        _counters[k] = done

    result = simulate(park, window, stop - begin, controller, forecaster, replan_every, progress=False,
                      on_step=on_step)
    return k, result


def simulate_parallel(park, series, n_steps: int, controller: str, forecaster: Forecaster | None,
                      replan_every: int = 1, workers: int = 2, warmup_days: float = 2.0,
                      progress: bool = True) -> SimResult:
    """:func:`sim.simulator.simulate` over ``workers`` month-aligned chunks in parallel."""
    forecaster = forecaster or Forecaster("perfect")
    starts = chunks(series.index, n_steps, workers)
    if len(starts) == 1 or "fork" not in mp.get_all_start_methods():
        return simulate(park, series, n_steps, controller, forecaster, replan_every, progress)
    stops = starts[1:] + [n_steps]
    warm_steps = int(round(warmup_days * 24 / park.settings.dt_h))
    warms = [0] + [min(warm_steps, s) for s in starts[1:]]
    totals = [stop - first + warm for first, stop, warm in zip(starts, stops, warms)]
    counters = mp.Array("i", len(starts), lock=False)
    jobs = [(k, first, stop, warm, controller, replan_every)
            for k, (first, stop, warm) in enumerate(zip(starts, stops, warms))]
    _shared.update(park=park, series=series, forecaster=forecaster)
    bar = Progress(sum(totals), f"{controller} x{len(starts)}") if progress else None
    results: dict[int, SimResult] = {}
    t_start = time.perf_counter()
    try:
        with ProcessPoolExecutor(len(starts), mp_context=mp.get_context("fork"), initializer=_init,
                                 initargs=(counters,)) as pool:
            futures = [pool.submit(_run_chunk, job) for job in jobs]
            while not all(f.done() for f in futures):
                time.sleep(0.5)
                if bar:
                    done = [counters[k] for k in range(len(starts))]
                    behind = min(range(len(starts)), key=lambda k: done[k] / totals[k])
                    when = series.index[starts[behind] - warms[behind] + max(done[behind] - 1, 0)]
                    bar.update(sum(done), when)
            for f in futures:
                k, r = f.result()
                results[k] = r
    finally:
        _shared.clear()
    if bar:
        bar.update(sum(totals), series.index[n_steps - 1], force=True)
    frames, sessions, stats = [], [], {}
    for k in range(len(starts)):
        r = results[k]
        record_start = series.index[starts[k]]
        frames.append(r.series.iloc[warms[k]:])
        s = r.sessions
        sessions.append(s[s["departure"] > record_start] if k else s)
        for key, value in r.stats.items():
            stats[key] = stats.get(key, 0) + value
    stats["steps"] = n_steps
    stats["workers"] = len(starts)
    stats["wall_s"] = time.perf_counter() - t_start  # the other times add up the workers'

    return SimResult(controller, pd.concat(frames), pd.concat(sessions, ignore_index=True), stats)
