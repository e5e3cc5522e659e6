"""Asset kinds.  Adding a kind means adding its module and one line in ``FLEETS``."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from vpp.assets.base import AssetSpec, Contribution, Fleet, Horizon, Penalties
from vpp.assets.battery import BatteryFleet
from vpp.assets.charging_station import ChargingStationFleet
from vpp.assets.heat_pump import HeatPumpFleet
from vpp.assets.load import LoadFleet
from vpp.assets.pv import PVFleet
from vpp.errors import SpecError

FLEETS: dict[str, type[Fleet]] = {
    fleet.kind: fleet for fleet in (PVFleet, BatteryFleet, HeatPumpFleet, ChargingStationFleet, LoadFleet)
}


def pydantic_error(where: str, error: ValidationError) -> SpecError:
    """The first problem of a pydantic validation error as a SpecError naming the field."""
    first = error.errors()[0]
    path = where
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required field is missing"
    return SpecError(path, message)


def parse_asset_spec(data: Mapping[str, Any], where: str = "asset") -> AssetSpec:
    """Validate one asset description and return the spec of its kind.

    Raises
    ------
    SpecError
        Naming the field, e.g. ``assets[2].e_kwh: Input should be greater than 0``.
    """
    if not isinstance(data, Mapping):
        raise SpecError(where, "must be a table of fields")
    kind = data.get("kind")
    if kind not in FLEETS:
        raise SpecError(f"{where}.kind", f"unknown asset kind {kind!r}; expected one of {sorted(FLEETS)}")
    try:
        return FLEETS[kind].Spec.model_validate(dict(data))
    except ValidationError as error:
        raise pydantic_error(where, error) from None


__all__ = ["AssetSpec", "Contribution", "FLEETS", "Fleet", "Horizon", "Penalties", "parse_asset_spec", "pydantic_error"]
