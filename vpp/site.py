"""A park: its network, the assets on its buses, its connection limits, tariff and carbon.

Parks are described in TOML (see ``sim/scenarios/changping_science_park.toml``).  Every
section is validated; an error names the field, e.g. ``assets[4].bus: no bus named 'x'``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vpp.assets import FLEETS, Fleet, Penalties, parse_asset_spec, pydantic_error
from vpp.errors import SpecError
from vpp.tariff import Carbon, Tariff


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SiteSpec(_Section):
    name: str = Field(min_length=1)
    latitude_deg: float = Field(ge=-90, le=90)
    longitude_deg: float = Field(ge=-180, le=180)
    altitude_m: float = Field(0.0, ge=-500, le=9000)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


class NetworkSpec(_Section):
    benchmark: str | None = Field(None, description="function name in pandapower.networks")
    file: str | None = Field(None, description="pandapower JSON file, relative to the park file")
    drop_elements: bool = Field(True, description="remove the network's own loads and generators")
    v_min_pu: float = Field(0.95, gt=0.5, lt=1.0)
    v_max_pu: float = Field(1.05, gt=1.0, lt=1.5)
    max_loading_percent: float = Field(100.0, gt=0, le=200)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.benchmark is None) == (self.file is None):
            raise ValueError("give exactly one of benchmark or file")
        return self


class ConnectionSpec(_Section):
    import_limit_kw: float = Field(gt=0, le=1e6)
    export_limit_kw: float = Field(ge=0, le=1e6)


class DispatchSettings(_Section):
    horizon_steps: int = Field(96, ge=4, le=2976)
    dt_h: float = Field(0.25, gt=0, le=1)
    # Coarser planning steps further out, as [[until_h, step_h], ...]; empty: every step at dt_h.
    horizon_resolution: list[tuple[float, float]] = Field(
        default_factory=list,
        description="[[until_h, step_h], ...]: plan in steps of step_h hours up to until_h hours ahead, "
                    "e.g. [[2, 0.25], [6, 0.5], [24, 1.0]]; empty plans every base step",
    )
    solver: Literal["HIGHS", "CLARABEL"] = "HIGHS"
    # HiGHS's method: dual simplex, or interior point without crossover (faster on the LPs
    # of large feeders, see docs/performance.md); auto: interior point with the sparse grid model.
    lp_method: Literal["auto", "simplex", "ipm"] = "auto"
    # Receding horizon: only the first steps of a plan are carried out before the next
    # cycle re-plans.  With strict_hours set, a cycle re-solves only for grid-limit
    # violations in its first strict_hours; those further out are activated and folded
    # into the linear model for the next cycle, and reported with the plan.
    strict_hours: float | None = Field(
        None, gt=0, le=744,
        description="re-plan within a cycle only for grid violations in the first strict_hours "
                    "(None: anywhere in the horizon); later ones tighten the next cycle",
    )
    time_budget_s: float = Field(20.0, gt=0, le=3600)
    max_grid_iterations: int = Field(5, ge=1, le=20)
    lazy_grid_rows: bool = True
    # How the LP states linear voltages and flows: dense sensitivities (every bus against
    # every bus), the sparse network equations, or "auto" (sparse when much smaller).
    grid_model: Literal["auto", "dense", "sparse"] = "auto"
    # Service before cost: these defaults exceed what a kWh costs when it raises the
    # month's demand charge within one step (48 CNY/kW / 0.25 h = 192 CNY/kWh for the
    # reference tariff), so the optimizer only leaves a car short or a building cool when
    # the limits leave no room.
    ev_unmet_penalty_cny_per_kwh: float = Field(300.0, ge=0)
    comfort_penalty_cny_per_kwh_th: float = Field(100.0, ge=0, description="per kWh_th below the comfort band, per hour")
    reactive_power_cny_per_kvarh: float = Field(0.001, ge=0)
    flex_penalty_cny_per_kwh: float = Field(10.0, ge=0, description="default price of a flexibility request's deviation")

    @model_validator(mode="after")
    def _check_resolution(self):
        last_until_h = 0.0
        for k, (until_h, step_h) in enumerate(self.horizon_resolution):
            where = f"dispatch.horizon_resolution[{k}]"
            ratio = step_h / self.dt_h
            if step_h <= 0 or abs(ratio - round(ratio)) > 1e-9:
                raise ValueError(f"{where}: step_h {step_h:g} must be a positive multiple of dt_h {self.dt_h:g}")
            if until_h <= last_until_h:
                raise ValueError(f"{where}: until_h {until_h:g} must be greater than the previous block's")
            last_until_h = until_h
        return self

    @property
    def penalties(self) -> Penalties:
        return Penalties(self.ev_unmet_penalty_cny_per_kwh, self.comfort_penalty_cny_per_kwh_th,
                         self.reactive_power_cny_per_kvarh)


class InputsSpec(_Section):
    seed: int = Field(0, ge=0)
    default_date: str | None = Field(None, description="local date `vpp dispatch` plans when no --at is given")


class ParkFile(_Section):
    park: SiteSpec
    network: NetworkSpec
    connection: ConnectionSpec
    tariff: Tariff
    carbon: Carbon
    dispatch: DispatchSettings = DispatchSettings()
    inputs: InputsSpec = InputsSpec()
    assets: list[dict[str, Any]] = Field(min_length=1)


@dataclass
class Park:
    """A validated park with its grid model and one fleet per asset kind present."""

    site: SiteSpec
    network: NetworkSpec
    connection: ConnectionSpec
    tariff: Tariff
    carbon: Carbon
    settings: DispatchSettings
    inputs: InputsSpec
    grid: Any  # vpp.dispatch.grid.GridModel
    fleets: dict[str, Fleet]
    asset_bus: dict[str, int] = field(default_factory=dict)  # asset id -> position in the grid's bus order
    path: Path | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.site.timezone)

    def bus_positions(self, kind: str) -> np.ndarray:
        return np.array([self.asset_bus[i] for i in self.fleets[kind].ids], dtype=int)

    @property
    def asset_ids(self) -> list[str]:
        return [i for fleet in self.fleets.values() for i in fleet.ids]


def parse_park(data: dict[str, Any], base_dir: Path | None = None) -> Park:
    """Validate a park description (the parsed TOML) and build its grid model and fleets."""
    from vpp.dispatch.grid import GridModel, load_network

    try:
        spec = ParkFile.model_validate(data)
    except ValidationError as error:
        raise pydantic_error("", error) from None
    specs = [parse_asset_spec(a, f"assets[{i}]") for i, a in enumerate(spec.assets)]
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.id in seen:
            raise SpecError(f"assets[{i}].id", f"duplicate asset id {s.id!r} (also assets[{seen[s.id]}])")
        seen[s.id] = i
    json_path = None
    if spec.network.file is not None:
        json_path = str((base_dir or Path.cwd()) / spec.network.file)
    net = load_network(spec.network.benchmark, json_path, spec.network.drop_elements)
    grid = GridModel(net, spec.network.v_min_pu, spec.network.v_max_pu, spec.network.max_loading_percent)
    asset_bus = {}
    for i, s in enumerate(specs):
        try:
            asset_bus[s.id] = grid.bus_position(s.bus)
        except SpecError as error:
            raise SpecError(f"assets[{i}].bus", error.reason) from None
    by_kind: dict[str, list] = {}
    for s in specs:
        by_kind.setdefault(s.kind, []).append(s)
    fleets = {kind: FLEETS[kind](by_kind[kind]) for kind in FLEETS if kind in by_kind}
    return Park(spec.park, spec.network, spec.connection, spec.tariff, spec.carbon, spec.dispatch, spec.inputs,
                grid, fleets, asset_bus)


def load_park(path: str | Path, dispatch: dict[str, Any] | None = None) -> Park:
    """Read and validate a park TOML file; ``dispatch`` overrides keys of its ``[dispatch]``
    table (e.g. ``{"horizon_resolution": []}`` to plan every quarter hour).

    Raises
    ------
    SpecError
        If the file is missing, is not TOML, or any field is invalid (the error names it).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError("park_file", f"cannot read {path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError("park_file", f"{path} is not valid TOML: {error}") from None
    if dispatch:
        data.setdefault("dispatch", {}).update(dispatch)
    park = parse_park(data, path.parent)
    park.path = path
    return park
