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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import cvxpy as cp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Horizon:
    """The planning horizon: ``n_steps`` steps of ``dt_h`` hours each."""

    n_steps: int = 96
    dt_h: float = 0.25


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
