"""What every asset kind provides, and the helpers the kinds share.

Sign convention (the one place it is written down): **power is positive when an asset
injects into the grid** (PV output, battery discharge) **and negative when it consumes**
(charging, heat pumps, EV chargers, building load).  Reactive power follows the same
rule: positive kvar is delivered to the grid.

An asset kind is a *fleet*: all assets of that kind held as arrays, one row per asset,
so that constraints are built for the whole fleet at once (PyPSA's component tables).
A fleet has two phases, after cvxportfolio's policies:

- ``build(horizon)`` is called once and creates the fleet's cvxpy variables, the
  ``cp.Parameter``\\ s that carry forecasts and state, its constraints and its cost terms;
- ``update(state, forecast)`` is called every cycle and only sets parameter values, so
  a re-solve skips cvxpy's canonicalisation (DPP).

The same fleet object also steps its physical plant forward for the simulator
(``plant_step``) and gives the safe setpoints used when there is no plan
(``fallback_kw``).
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import cvxpy as cp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Horizon:
    """The planning horizon: ``n_steps`` planning steps over base steps of ``dt_h`` hours.

    Inputs (forecasts, prices, limits) and plans handed out come at the base resolution.
    The optimizer may plan the far part of the horizon in coarser steps: ``block_steps``
    gives the number of base steps each planning step spans (None: one each, the uniform
    horizon).  A planning step holds its power constant over its base steps, so its
    energy terms are exact for that plan; forecasts are averaged over the block (exact
    for prices, efficiencies and COPs, which multiply a constant power) and limits take
    the block's tightest value.  See ``DispatchSettings.horizon_resolution``.
    """

    n_steps: int = 96
    dt_h: float = 0.25
    block_steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.block_steps is not None:
            if len(self.block_steps) != self.n_steps or min(self.block_steps) < 1:
                raise ValueError("block_steps needs one positive count per planning step")

    @classmethod
    def with_resolution(cls, n_base_steps: int, dt_h: float, resolution) -> "Horizon":
        """A horizon of ``n_base_steps`` base steps planned at ``resolution``: pairs
        ``(until_h, step_h)`` in increasing order, e.g. ``[(2, 0.25), (6, 0.5), (24, 1.0)]``
        (15-minute steps for two hours, half hours to six, hours to the end).  The last
        block is cut short where the horizon ends; None or empty gives the uniform horizon."""
        if not resolution:
            return cls(n_base_steps, dt_h)
        blocks: list[int] = []
        done = 0
        for until_h, step_h in resolution:
            per = int(round(step_h / dt_h))
            until = min(int(round(until_h / dt_h)), n_base_steps)
            while done < until:
                blocks.append(min(per, until - done))
                done += blocks[-1]
        while done < n_base_steps:  # past the last block: keep its step
            blocks.append(min(per, n_base_steps - done))
            done += blocks[-1]
        if all(b == 1 for b in blocks):
            return cls(n_base_steps, dt_h)
        return cls(len(blocks), dt_h, tuple(blocks))

    @property
    def n_base_steps(self) -> int:
        return self.n_steps if self.block_steps is None else int(sum(self.block_steps))

    @property
    def uniform(self) -> bool:
        return self.block_steps is None

    @property
    def step_h(self) -> np.ndarray:
        """Length of each planning step [h], shape (n_steps,)."""
        if self.block_steps is None:
            return np.full(self.n_steps, self.dt_h)
        return np.asarray(self.block_steps, float) * self.dt_h

    @functools.cached_property
    def block_start(self) -> np.ndarray:
        """The base step each planning step starts at, shape (n_steps,); computed once,
        read-only."""
        starts = (np.arange(self.n_steps) if self.block_steps is None
                  else np.concatenate([[0], np.cumsum(self.block_steps)[:-1]]).astype(int))
        starts.flags.writeable = False
        return starts

    def steps_within(self, hours: float) -> int:
        """How many planning steps start within the first ``hours`` of the horizon."""
        return int(np.sum(self.block_start * self.dt_h < hours - 1e-9))

    def per_step(self, values) -> np.ndarray:
        """Per-asset values times each step's length: (n,) -> (n, n_steps) [value * h]."""
        return np.asarray(values, dtype=float)[:, None] * self.step_h[None, :]

    def coarsen(self, values, how: str = "mean") -> np.ndarray:
        """Base-step values (..., n_base_steps) to planning steps (..., n_steps) by the
        block ``mean``, ``min`` or ``max``."""
        values = np.asarray(values, dtype=float)
        if self.block_steps is None:
            return values
        if values.shape[-1] != self.n_base_steps:
            return values  # the caller's shape check names the field
        reduce = {"mean": np.add, "min": np.minimum, "max": np.maximum}[how]
        out = reduce.reduceat(values, self.block_start, axis=-1)
        return out / np.asarray(self.block_steps, float) if how == "mean" else out

    def expand(self, values) -> np.ndarray:
        """Planning-step values (..., n_steps) held over their base steps (..., n_base_steps)."""
        values = np.asarray(values)
        if self.block_steps is None:
            return values
        return np.repeat(values, self.block_steps, axis=-1)

    def carry(self, values, shift_base_steps: int | None, fill: float) -> np.ndarray:
        """Move a (..., n_steps) array of last cycle's planning steps onto this cycle's,
        the new horizon starting ``shift_base_steps`` base steps later: each planning step
        takes the value of the old step covering its start, the last one past the end;
        ``fill`` everywhere when the shift is None (no usable last cycle)."""
        values = np.asarray(values, float)
        if shift_base_steps is None:
            return np.full_like(values, fill)
        old = self.block_start
        source = np.searchsorted(old, self.block_start + shift_base_steps, side="right") - 1
        return values[..., np.clip(source, 0, self.n_steps - 1)]


class AssetSpec(BaseModel):
    """Fields every asset spec has.  Kinds add their own, with units in the names."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    kind: str
    bus: str | int = Field(description="pandapower bus name or index the asset is connected to")
    name: str = ""
    ramp_kw_per_min: float | None = Field(
        None, gt=0, le=1e6,
        description="fastest change of the active-power setpoint the service sends [kW/min]; None: no limit",
    )


@dataclass
class Contribution:
    """What a fleet adds to the dispatch problem over the horizon.

    Attributes
    ----------
    p_kw : cp.Expression, shape (n_assets, n_steps)
        Active power at each asset's connection point [kW], injection positive.
    q_kvar : cp.Expression or None, shape (n_assets, n_steps)
        Reactive power [kvar], injection positive; None when the kind has none.
    constraints : list
        The kind's constraints.
    costs_cny : dict of str to cp.Expression
        Scalar cost terms over the horizon [CNY], keyed by the name reported to users.
    """

    p_kw: cp.Expression
    q_kvar: cp.Expression | None = None
    constraints: list = field(default_factory=list)
    costs_cny: dict[str, cp.Expression] = field(default_factory=dict)


class Fleet(abc.ABC):
    """All assets of one kind.  Subclasses set ``kind`` and ``Spec``."""

    kind: ClassVar[str]
    Spec: ClassVar[type[AssetSpec]]

    def __init__(self, specs: Sequence[AssetSpec]):
        self.specs = list(specs)
        self.ids = [s.id for s in self.specs]

    @property
    def n(self) -> int:
        return len(self.specs)

    def column(self, name: str) -> np.ndarray:
        """One spec field of every asset as a float array."""
        return np.array([float(getattr(s, name)) for s in self.specs], dtype=float)

    @abc.abstractmethod
    def initial_state(self) -> dict[str, Any]:
        """The state the plant starts from, as arrays keyed by name (e.g. ``e_kwh``)."""

    @abc.abstractmethod
    def build(self, horizon: Horizon) -> Contribution:
        """Create variables, parameters, constraints and costs once."""

    @abc.abstractmethod
    def update(self, state: dict[str, Any], forecast: dict[str, Any], penalties: "Penalties") -> None:
        """Set this cycle's parameter values from state and forecast."""

    @abc.abstractmethod
    def fallback_kw(self, state: dict[str, Any], forecast: dict[str, Any], horizon: Horizon) -> np.ndarray:
        """Safe active-power setpoints (n_assets, n_steps) used when no plan exists."""

    @abc.abstractmethod
    def plant_step(
        self, state: dict[str, Any], setpoint_kw: np.ndarray, actual: dict[str, Any], dt_h: float
    ) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
        """Advance the physical plant by one step.

        Applies ``setpoint_kw`` (n_assets,), clipped to what the physics allows given the
        ``actual`` conditions of this step, and returns ``(new_state, p_kw, extras)``:
        the realised power per asset and named per-asset quantities worth recording.
        """

    @abc.abstractmethod
    def power_range(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per asset: least and greatest active power [kW] and greatest |reactive| [kvar]
        it can ever put at its bus; the problem leaves out grid rows no asset can bind."""

    def plan_details(self) -> dict[str, np.ndarray]:
        """Named (n_assets, n_steps) arrays of the solved plan worth reporting."""
        return {}


@dataclass(frozen=True)
class Penalties:
    """Prices of soft constraints, in CNY per unit, set by the dispatch settings."""

    ev_unmet_cny_per_kwh: float = 300.0
    comfort_cny_per_kwh_th: float = 100.0
    reactive_cny_per_kvarh: float = 0.001


def steps_array(values: np.ndarray, n_steps: int) -> np.ndarray:
    """Repeat a per-asset vector across the horizon: (n,) -> (n, n_steps)."""
    return np.repeat(np.asarray(values, dtype=float)[:, None], n_steps, axis=1)


def nonneg_param(shape: tuple[int, ...], name: str) -> cp.Parameter:
    return cp.Parameter(shape, nonneg=True, name=name, value=np.zeros(shape))


def require_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Check a forecast or state array's shape and finiteness before it reaches the solver."""
    from vpp.errors import SpecError

    array = np.asarray(array, dtype=float)
    if array.shape != shape:
        raise SpecError(name, f"expected shape {shape}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise SpecError(name, "contains NaN or infinite values")
    return array
