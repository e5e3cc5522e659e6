"""The service's configuration: a TOML file, overridden by ``VPP_*`` environment variables.

Example (``vpp serve`` without a file uses exactly these defaults)::

    data_dir = "data"                      # SQLite database and generated tokens live here
    database_url = ""                      # empty: sqlite:///<data_dir>/vpp.db (WAL); or postgresql://...
    grpc_address = "127.0.0.1:50051"
    metrics_port = 9108                    # Prometheus /metrics; 0 turns it off
    metrics_address = "127.0.0.1"

    [clock]
    mode = "real"                          # "real": cycles on the quarter hour; "simulated": faster
    speed = 60.0                           # simulated seconds per real second
    start = "2025-01-15T00:00:00+08:00"    # simulated clock's first cycle

    [loop]
    telemetry_max_age_s = 1800             # older telemetry counts as missing
    setpoint_grace_s = 120                 # a setpoint stays valid this long past its step

    [tls]                                  # all empty: plaintext (loopback only!)
    cert_file = ""
    key_file = ""
    client_ca_file = ""                    # set: mutual TLS, clients need a certificate

    [[sites]]
    id = "changping"
    park = "sim/scenarios/changping_science_park.toml"   # network, connection, tariff, carbon
    enroll_park_assets = true              # enroll the park file's assets for demo_tenant
    demo_tenant = "demo"

Environment variables (for containers) override the file: ``VPP_DATA_DIR``,
``VPP_DATABASE_URL``, ``VPP_GRPC_ADDRESS``, ``VPP_METRICS_PORT``, ``VPP_METRICS_ADDRESS``, ``VPP_CLOCK_MODE``,
``VPP_CLOCK_SPEED``, ``VPP_TLS_CERT_FILE``, ``VPP_TLS_KEY_FILE``, ``VPP_TLS_CLIENT_CA_FILE``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vpp.assets import pydantic_error
from vpp.errors import SpecError

REFERENCE_PARK = Path(__file__).resolve().parents[2] / "sim" / "scenarios" / "changping_science_park.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClockConfig(_Section):
    mode: Literal["real", "simulated"] = "real"
    speed: float = Field(60.0, gt=0, le=1e6)
    start: str = "2025-01-15T00:00:00+08:00"

    @field_validator("start")
    @classmethod
    def _aware(cls, value: str) -> str:
        stamp = pd.Timestamp(value)
        if stamp.tzinfo is None:
            raise ValueError("must carry a UTC offset, e.g. 2025-01-15T00:00:00+08:00")
        return value


class LoopConfig(_Section):
    telemetry_max_age_s: float = Field(1800.0, gt=0)
    setpoint_grace_s: float = Field(120.0, ge=0, le=3600)


class TlsConfig(_Section):
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class SiteConfig(_Section):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    park: str
    enroll_park_assets: bool = False
    demo_tenant: str = "demo"


class ServiceConfig(_Section):
    data_dir: str = "data"
    database_url: str = ""
    grpc_address: str = "127.0.0.1:50051"
    metrics_port: int = Field(9108, ge=0, le=65535)
    metrics_address: str = "127.0.0.1"
    clock: ClockConfig = ClockConfig()
    loop: LoopConfig = LoopConfig()
    tls: TlsConfig = TlsConfig()
    sites: list[SiteConfig] = Field(default_factory=lambda: [
        SiteConfig(id="changping", park=str(REFERENCE_PARK), enroll_park_assets=True)])
    base_dir: str = "."

    def path(self, value: str) -> Path:
        """A path from the configuration: relative ones are relative to the config file."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def data_path(self) -> Path:
        return self.path(self.data_dir)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'vpp.db'}"

    def site_park_path(self, site: SiteConfig) -> Path:
        path = Path(site.park)
        return path if path.is_absolute() else Path(self.base_dir) / path


_ENV = {
    "VPP_DATA_DIR": ("data_dir",), "VPP_DATABASE_URL": ("database_url",), "VPP_GRPC_ADDRESS": ("grpc_address",),
    "VPP_METRICS_PORT": ("metrics_port",), "VPP_METRICS_ADDRESS": ("metrics_address",), "VPP_CLOCK_MODE": ("clock", "mode"), "VPP_CLOCK_SPEED": ("clock", "speed"),
    "VPP_TLS_CERT_FILE": ("tls", "cert_file"), "VPP_TLS_KEY_FILE": ("tls", "key_file"),
    "VPP_TLS_CLIENT_CA_FILE": ("tls", "client_ca_file"),
}


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None, **overrides) -> ServiceConfig:
    """The configuration from ``path`` (or the defaults), the environment and ``overrides``
    (dotted keys as nested dicts, e.g. ``clock={"mode": "simulated"}``)."""
    data: dict = {}
    base = Path(".")
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError("config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise SpecError("config", f"{path} is not valid TOML: {error}") from None
        base = path.resolve().parent
    data.setdefault("base_dir", str(base))
    for name, keys in _ENV.items():
        value = (os.environ if environ is None else environ).get(name)
        if value:
            target = data
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        elif value is not None:
            data[key] = value
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as error:
        raise pydantic_error("config", error) from None
