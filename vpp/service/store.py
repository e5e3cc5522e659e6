"""The service's persistent state, with SQLAlchemy 2: SQLite (WAL) by default, PostgreSQL by URL.

What is stored: bearer tokens (as SHA-256 digests only, each with an optional expiry and a
revocation time), enrolled assets and their specs,
telemetry (the latest measurement per asset plus every measurement as history), grid
operators' limits, flexibility requests, and every dispatch cycle with its plan and the
setpoints it sent.

Guarantees the service relies on:

* Every mutating method commits before it returns, so a write the service acknowledges
  is durable: SQLite runs with ``journal_mode=WAL`` and ``synchronous=FULL`` (the WAL is
  fsynced at every commit), PostgreSQL commits synchronously by default.
* A write that fails, for whatever reason, rolls back and leaves the stored data as it
  was; a cycle and its setpoints are stored in one transaction.
* Sessions are short-lived, one per call, so one ``Store`` can be shared by the gRPC
  thread pool and the dispatch loop.  On SQLite, write transactions start with
  ``BEGIN IMMEDIATE``, so concurrent writers queue on the lock (up to 30 s) instead of
  failing when a read transaction would have to be upgraded to a write.
* Times go in timezone-aware (a naive time raises :class:`~vpp.errors.SpecError` naming
  the field) and come out timezone-aware in UTC.  Powers are in kW (reactive in kvar),
  prices in CNY/kWh, durations in seconds.

Input errors raise :class:`~vpp.errors.SpecError`, unknown asset ids
:class:`~vpp.errors.UnknownAssetError`; :class:`ConflictError` and :class:`NotFoundError`
below cover the rest.  The service maps these to gRPC codes in ``vpp.service.api``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import secrets
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
                        and_, create_engine, event, func, inspect, make_url, select)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from vpp.errors import SpecError, UnknownAssetError, VppError

ROLES = ("aggregator", "operator", "device")
ELEMENTS = ("connection_import", "connection_export", "transformer", "line")
CYCLE_STATUSES = ("optimal", "fallback", "failed")
ASSET_STATES = ("active", "decommissioned")

MAX_ID_CHARS = 128       # tenants, site ids, external ids, kinds, buses, names
MIN_TOKEN_CHARS = 16
MAX_PAGE_SIZE = 1000
MAX_CYCLES = 10_000      # last_cycles(limit=...)
MAX_REASON_CHARS = 2000  # longer cycle reasons are cut
_IN_CHUNK = 500          # ids per IN (...) clause


class ConflictError(VppError):
    """The request contradicts what is stored (gRPC ALREADY_EXISTS)."""


class NotFoundError(VppError):
    """Something other than an asset that is not stored (gRPC NOT_FOUND)."""


class TokenRejected(VppError):
    """A bearer token that is unknown, expired or revoked (gRPC UNAUTHENTICATED)."""


def generate_token() -> str:
    """A new random bearer token: 32 random bytes (256 bits), URL-safe base64, 43 characters."""
    return secrets.token_urlsafe(32)


def _digest(token: str) -> str:
    # Tokens are long random strings (generate_token: 256 bits), not passwords people
    # choose, so a plain SHA-256 cannot be brute-forced or looked up in a table: no salt
    # or slow hash is needed, and the digest can be an indexed unique column.  The token
    # itself is never stored.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- column types ------------------------------------------------------------------------------


class UtcDateTime(TypeDecorator):
    """A timezone-aware datetime, stored as UTC and read back tz-aware in UTC.

    PostgreSQL stores ``timestamp with time zone``; SQLite has no such type, so the UTC
    wall time is stored (as text that sorts in time order) and UTC is put back on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # the public methods reject these first; this guards the rest
            raise ValueError("naive datetime reached the database layer")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class JsonText(TypeDecorator):
    """A JSON document kept as text written by Python's ``json``.

    Used for cycle plans: they may hold NaN where a power flow failed, which Python's
    ``json`` writes and reads back but PostgreSQL's JSON types refuse.  Plans are only ever
    read whole, so nothing is lost by not using the database's JSON type.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect) -> Any:
        return None if value is None else json.loads(value)


# --- tables ------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class AssetRow(Base):
    __tablename__ = "assets"
    __table_args__ = (UniqueConstraint("tenant", "external_id", name="uq_assets_tenant_external_id"),
                      Index("ix_assets_site", "site_id"), Index("ix_assets_tenant", "tenant"))

    # Insertion sequence: the creation order, and the key that pages through list_assets.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    asset_id: Mapped[str] = mapped_column(String(32), unique=True)  # uuid4 hex
    tenant: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    site_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    external_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    kind: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    bus: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    spec: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime)


class TokenRow(Base):
    __tablename__ = "tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the token
    tenant: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    asset_id: Mapped[str | None] = mapped_column(ForeignKey("assets.asset_id"), nullable=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    # None: never expires.  Checked at every call, so an expired token stops working at once.
    expire_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Set by revoke_token; the row is kept so listings show who had access until when.
    revoke_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


# Columns added to tables after their first release: (table, column, SQL type), added on
# open to databases made by an older version (create_all only creates missing tables).
_ADDED_COLUMNS = (("tokens", "expire_time", {"sqlite": "DATETIME", "postgresql": "TIMESTAMP WITH TIME ZONE"}),
                  ("tokens", "revoke_time", {"sqlite": "DATETIME", "postgresql": "TIMESTAMP WITH TIME ZONE"}))


class TelemetryRow(Base):
    """Every measurement received (history)."""

    __tablename__ = "telemetry"
    __table_args__ = (Index("ix_telemetry_asset_time", "asset_id", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.asset_id"))
    time: Mapped[datetime] = mapped_column(UtcDateTime)
    values: Mapped[dict] = mapped_column(JSON)
    receive_time: Mapped[datetime] = mapped_column(UtcDateTime)


class LatestTelemetryRow(Base):
    """The measurement with the latest time per asset (one row per asset)."""

    __tablename__ = "telemetry_latest"

    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.asset_id"), primary_key=True)
    time: Mapped[datetime] = mapped_column(UtcDateTime)
    values: Mapped[dict] = mapped_column(JSON)


class LimitRow(Base):
    __tablename__ = "limits"
    __table_args__ = (Index("ix_limits_site_window", "site_id", "start_time", "end_time"),)

    limit_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    element: Mapped[str] = mapped_column(String(32))
    element_name: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    start: Mapped[datetime] = mapped_column("start_time", UtcDateTime)
    end: Mapped[datetime] = mapped_column("end_time", UtcDateTime)
    limit_kw: Mapped[float | None] = mapped_column(Float, nullable=True)
    limit_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_by: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    lifted_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class FlexRow(Base):
    __tablename__ = "flex_requests"
    __table_args__ = (Index("ix_flex_site_window", "site_id", "start_time", "end_time"),)

    request_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))  # "" = the whole portfolio
    start: Mapped[datetime] = mapped_column("start_time", UtcDateTime)
    end: Mapped[datetime] = mapped_column("end_time", UtcDateTime)
    max_import_kw: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_import_kw: Mapped[float | None] = mapped_column(Float, nullable=True)
    price_cny_per_kwh: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)


class CycleRow(Base):
    __tablename__ = "cycles"
    __table_args__ = (Index("ix_cycles_site", "site_id", "cycle_id"),)

    cycle_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    cycle_start: Mapped[datetime] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(16))
    solve_s: Mapped[float] = mapped_column(Float)
    total_s: Mapped[float] = mapped_column(Float)
    objective_cny: Mapped[float | None] = mapped_column(Float, nullable=True)
    violations_found: Mapped[int] = mapped_column(Integer)
    violations_remaining: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    plan: Mapped[dict] = mapped_column(JsonText)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)


class SetpointRow(Base):
    __tablename__ = "setpoints"
    __table_args__ = (Index("ix_setpoints_asset_cycle", "asset_id", "cycle_id"),)

    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.cycle_id"), primary_key=True)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.asset_id"), primary_key=True)
    valid_from: Mapped[datetime] = mapped_column(UtcDateTime)
    valid_until: Mapped[datetime] = mapped_column(UtcDateTime)
    p_kw: Mapped[float] = mapped_column(Float)
    q_kvar: Mapped[float] = mapped_column(Float)
    fallback: Mapped[bool] = mapped_column(Boolean)


# --- records: what the store hands out (plain, frozen, detached from any session) ---------------


@dataclass(frozen=True)
class Principal:
    """Who a bearer token belongs to; ``asset_id`` is set for device tokens only."""

    tenant: str
    role: str
    asset_id: str | None = None
    token_id: str | None = None


@dataclass(frozen=True)
class TokenRecord:
    """A stored token's metadata (never the token or its digest)."""

    token_id: str
    tenant: str
    role: str
    name: str
    asset_id: str | None
    create_time: datetime
    expire_time: datetime | None
    revoke_time: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoke_time is None and (self.expire_time is None or now < self.expire_time)


@dataclass(frozen=True)
class AssetRecord:
    asset_id: str
    tenant: str
    site_id: str
    external_id: str
    kind: str
    bus: str
    spec: dict
    state: str  # "active" | "decommissioned"
    create_time: datetime  # tz-aware UTC
    update_time: datetime  # tz-aware UTC


@dataclass(frozen=True)
class LimitRecord:
    limit_id: int
    site_id: str
    element: str  # one of ELEMENTS
    element_name: str
    start: datetime
    end: datetime
    limit_kw: float | None
    limit_percent: float | None  # percent of the element's rating
    created_by: str
    create_time: datetime
    lifted_time: datetime | None


@dataclass(frozen=True)
class FlexRecord:
    request_id: int
    site_id: str  # "" = the whole portfolio
    start: datetime
    end: datetime
    max_import_kw: float | None
    min_import_kw: float | None
    price_cny_per_kwh: float | None
    priority: int
    created_by: str
    create_time: datetime


@dataclass(frozen=True)
class SetpointRecord:
    asset_id: str
    valid_from: datetime
    valid_until: datetime
    p_kw: float
    q_kvar: float
    fallback: bool


@dataclass(frozen=True)
class CycleRecord:
    cycle_id: int
    site_id: str
    cycle_start: datetime
    status: str  # one of CYCLE_STATUSES
    solve_s: float
    total_s: float
    objective_cny: float | None
    violations_found: int
    violations_remaining: int
    reason: str | None


def _token(r: TokenRow) -> TokenRecord:
    return TokenRecord(r.token_id, r.tenant, r.role, r.name, r.asset_id, r.create_time, r.expire_time, r.revoke_time)


def _asset(r: AssetRow) -> AssetRecord:
    return AssetRecord(r.asset_id, r.tenant, r.site_id, r.external_id, r.kind, r.bus, dict(r.spec), r.state,
                       r.create_time, r.update_time)


def _limit(r: LimitRow) -> LimitRecord:
    return LimitRecord(r.limit_id, r.site_id, r.element, r.element_name, r.start, r.end, r.limit_kw,
                       r.limit_percent, r.created_by, r.create_time, r.lifted_time)


def _flex(r: FlexRow) -> FlexRecord:
    return FlexRecord(r.request_id, r.site_id, r.start, r.end, r.max_import_kw, r.min_import_kw,
                      r.price_cny_per_kwh, r.priority, r.created_by, r.create_time)


def _cycle(r: CycleRow) -> CycleRecord:
    return CycleRecord(r.cycle_id, r.site_id, r.cycle_start, r.status, r.solve_s, r.total_s, r.objective_cny,
                       r.violations_found, r.violations_remaining, r.reason)


def _setpoint(r: SetpointRow) -> SetpointRecord:
    return SetpointRecord(r.asset_id, r.valid_from, r.valid_until, r.p_kw, r.q_kvar, r.fallback)


# --- input checks ------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: Any, field: str) -> datetime:
    """An aware datetime converted to UTC; SpecError naming ``field`` otherwise."""
    if not isinstance(value, datetime):
        raise SpecError(field, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise SpecError(field, "must be timezone-aware (a naive time is ambiguous)")
    return value.astimezone(timezone.utc)


def _window(start: Any, end: Any) -> tuple[datetime, datetime]:
    start, end = _utc(start, "start"), _utc(end, "end")
    if end <= start:
        raise SpecError("end", "must be after start")
    return start, end


def _text(value: Any, field: str, required: bool = True) -> str:
    if not isinstance(value, str):
        raise SpecError(field, f"must be a string, got {type(value).__name__}")
    if required and not value:
        raise SpecError(field, "required")
    if len(value) > MAX_ID_CHARS:
        raise SpecError(field, f"at most {MAX_ID_CHARS} characters")
    return value


def _number(value: Any, field: str, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy scalars and the like
            value = float(value)
        except (TypeError, ValueError):
            raise SpecError(field, "must be a number") from None
    value = float(value)
    if not math.isfinite(value):
        raise SpecError(field, "must be a finite number")
    if nonneg and value < 0:
        raise SpecError(field, "must be >= 0")
    return value


def _optional_number(value: Any, field: str, nonneg: bool = False) -> float | None:
    return None if value is None else _number(value, field, nonneg)


def _whole(value: Any, field: str, nonneg: bool = False) -> int:
    try:
        ok = not isinstance(value, bool) and int(value) == value and (value >= 0 or not nonneg)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise SpecError(field, "must be a whole number" + (" >= 0" if nonneg else ""))
    return int(value)


def _json_object(value: Any, field: str) -> dict:
    """A dict of plain, finite JSON values, as it will read back from the database."""
    if not isinstance(value, dict):
        raise SpecError(field, f"must be a JSON object (dict), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except ValueError:
        raise SpecError(field, "must not contain NaN or infinite numbers") from None
    except TypeError as error:
        raise SpecError(field, f"must contain only JSON values: {error}") from None


def _plan_default(value: Any) -> Any:
    """numpy scalars and arrays in a plan, as plain numbers and lists."""
    for method in ("tolist", "item"):
        if hasattr(value, method):
            return getattr(value, method)()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    unique = list(dict.fromkeys(ids))
    for k in range(0, len(unique), _IN_CHUNK):
        yield unique[k:k + _IN_CHUNK]


def _encode_page(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def _decode_page(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, seq = text.split(":")
        if version != "v1":
            raise ValueError(version)
        return int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise SpecError("page_token", "not a page token this service issued") from None


# --- the store ---------------------------------------------------------------------------------


class Store:
    """The service's database.

    Parameters
    ----------
    url : str
        ``sqlite:///path/to/vpp.db`` (the service's default, in its data folder; the folder
        is created if missing) or a PostgreSQL URL such as
        ``postgresql+psycopg://user:password@host/dbname``.  Tables are created on open.
    """

    def __init__(self, url: str):
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if backend == "sqlite":
            if parsed.database in (None, "", ":memory:") or (parsed.query.get("mode") == "memory"):
                raise SpecError("database_url", "an in-memory SQLite database is not durable; give a file path")
            if not parsed.database.startswith("file:"):
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # One connection per thread at a time from the pool; check_same_thread only
            # forbids handing a connection between threads, which the pool does safely.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30.0}
        elif backend == "postgresql":
            kwargs["pool_pre_ping"] = True  # survive server restarts between calls
        else:
            raise SpecError("database_url", f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
        self.dialect = backend
        self.engine = create_engine(parsed, **kwargs)
        if backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        # Short-lived sessions, one per call.  Writes go through an engine view that marks
        # their transactions (SQLite: BEGIN IMMEDIATE); reads take a plain snapshot.
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(vpp_write=True), expire_on_commit=False).begin

    def _add_missing_columns(self) -> None:
        """Bring a database made by an older version up to the current columns (all nullable)."""
        for table, column, sql_type in _ADDED_COLUMNS:
            present = {c["name"] for c in inspect(self.engine).get_columns(table)}
            if column not in present:
                with self.engine.begin() as connection:
                    connection.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type[self.dialect]}")

    def close(self) -> None:
        """Close the pooled connections (the store must not be used afterwards)."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- tokens --------------------------------------------------------------------------------

    def add_token(self, tenant: str, role: str, token: str, name: str = "", asset_id: str | None = None,
                  expire_time: datetime | None = None) -> str:
        """Store a bearer token's SHA-256 digest (never the token); return the token's id.

        ``role`` is "aggregator", "operator" or "device"; a device token is bound to one
        enrolled ``asset_id`` of the same tenant, other roles take none.  ``expire_time``
        (tz-aware) ends its validity; None means it holds until revoked.  A token that is
        stored already raises :class:`ConflictError`.
        """
        tenant = _text(tenant, "tenant")
        if role not in ROLES:
            raise SpecError("role", f"must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise SpecError("token", f"must be a random string of at least {MIN_TOKEN_CHARS} characters "
                                     "(use generate_token())")
        name = _text(name, "name", required=False)
        if role == "device":
            asset_id = _text(asset_id, "asset_id") if asset_id is not None else None
            if asset_id is None:
                raise SpecError("asset_id", "required: a device token belongs to one asset")
        elif asset_id is not None:
            raise SpecError("asset_id", f"only a device token is bound to an asset, not a {role} token")
        if expire_time is not None:
            expire_time = _utc(expire_time, "expire_time")
        digest = _digest(token)
        token_id = uuid.uuid4().hex
        try:
            with self._write() as s:
                if asset_id is not None:
                    asset = self._asset_row(s, asset_id)
                    if asset.tenant != tenant:
                        raise SpecError("asset_id", f"asset {asset_id!r} belongs to another tenant")
                if s.scalar(select(TokenRow.token_id).where(TokenRow.digest == digest)) is not None:
                    raise ConflictError("this token is stored already")
                s.add(TokenRow(token_id=token_id, digest=digest, tenant=tenant, role=role, name=name,
                               asset_id=asset_id, create_time=_now(), expire_time=expire_time, revoke_time=None))
        except IntegrityError:  # the same token added concurrently
            raise ConflictError("this token is stored already") from None
        return token_id

    def issue_token(self, tenant: str, role: str, name: str = "", asset_id: str | None = None,
                    expire_time: datetime | None = None) -> tuple[str, str]:
        """Make a new random token, store its digest; return (token_id, token).

        The token itself is returned once and never stored: hand it to its holder now.
        """
        token = generate_token()
        return self.add_token(tenant, role, token, name=name, asset_id=asset_id, expire_time=expire_time), token

    def revoke_token(self, token_id: str) -> TokenRecord:
        """Revoke a token by its id: every later call with it is refused (a running server
        reads the token at each call, so no restart is needed).  Revoking twice keeps the
        first revocation time."""
        token_id = _text(token_id, "token_id")
        with self._write() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                raise NotFoundError(f"no token with id {token_id!r}")
            if row.revoke_time is None:
                row.revoke_time = _now()
                s.flush()
            record = _token(row)
        return record

    def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        """Every stored token's metadata (revoked and expired ones too), oldest first."""
        q = select(TokenRow)
        if tenant is not None:
            q = q.where(TokenRow.tenant == tenant)
        with self._read() as s:
            return [_token(r) for r in s.scalars(q.order_by(TokenRow.create_time, TokenRow.token_id))]

    def principal(self, token: str, now: datetime | None = None) -> Principal:
        """Who ``token`` belongs to; :class:`TokenRejected` saying why if it is unknown,
        expired (at ``now``, default the wall clock) or revoked."""
        if not isinstance(token, str) or not token:
            raise TokenRejected("missing bearer token")
        # Looked up by digest: timing reveals nothing useful about a 256-bit random token.
        with self._read() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.digest == _digest(token)))
            if row is None:
                raise TokenRejected("invalid token")
            record = _token(row)
        if record.revoke_time is not None:
            raise TokenRejected(f"token {record.token_id} was revoked at {record.revoke_time.isoformat()}")
        now = _now() if now is None else _utc(now, "now")
        if record.expire_time is not None and now >= record.expire_time:
            raise TokenRejected(f"token {record.token_id} expired at {record.expire_time.isoformat()}")
        return Principal(record.tenant, record.role, record.asset_id, record.token_id)

    def authenticate(self, token: str, now: datetime | None = None) -> Principal | None:
        """Who ``token`` belongs to, or None for an unknown, expired or revoked token."""
        try:
            return self.principal(token, now)
        except TokenRejected:
            return None

    # --- assets --------------------------------------------------------------------------------

    def enroll_asset(self, tenant: str, site_id: str, external_id: str, kind: str, bus: str,
                     spec: dict) -> tuple[AssetRecord, bool]:
        """Enroll an asset once per (tenant, external_id); return (record, created).

        The same request again returns the stored record with ``created=False``.  The same
        external id with another site, kind, bus or spec, or one whose asset was
        decommissioned, raises :class:`ConflictError` (change a spec with update_asset).
        """
        tenant = _text(tenant, "tenant")
        site_id = _text(site_id, "site_id")
        external_id = _text(external_id, "external_id")
        kind = _text(kind, "kind")
        bus = _text(bus, "bus", required=False)
        spec = _json_object(spec, "spec")
        # Two concurrent first enrolls race on the (tenant, external_id) unique key: the
        # loser's insert fails, and its second try finds the winner's row.
        for attempt in range(2):
            try:
                with self._write() as s:
                    row = s.scalar(select(AssetRow).where(AssetRow.tenant == tenant,
                                                          AssetRow.external_id == external_id))
                    if row is None:
                        now = _now()
                        row = AssetRow(asset_id=uuid.uuid4().hex, tenant=tenant, site_id=site_id,
                                       external_id=external_id, kind=kind, bus=bus, spec=spec, state="active",
                                       create_time=now, update_time=now)
                        s.add(row)
                        s.flush()
                        created = True
                    elif row.state != "active":
                        raise ConflictError(f"external id {external_id!r} belonged to asset {row.asset_id}, which "
                                            "is decommissioned; enroll under a new external id")
                    elif (row.site_id, row.kind, row.bus, row.spec) != (site_id, kind, bus, spec):
                        raise ConflictError(f"external id {external_id!r} is enrolled already as asset "
                                            f"{row.asset_id} with another site, kind, bus or spec; "
                                            "use UpdateAsset to change its spec")
                    else:
                        created = False
                    record = _asset(row)
                return record, created
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _asset_row(s: Session, asset_id: str) -> AssetRow:
        row = s.scalar(select(AssetRow).where(AssetRow.asset_id == asset_id))
        if row is None:
            raise UnknownAssetError(asset_id)
        return row

    def get_asset(self, asset_id: str) -> AssetRecord:
        """The asset's record, decommissioned or not; UnknownAssetError if never enrolled."""
        with self._read() as s:
            return _asset(self._asset_row(s, asset_id))

    def asset_tenants(self, asset_ids: Sequence[str]) -> dict[str, str]:
        """The tenant of each of ``asset_ids`` that was ever enrolled (decommissioned too)."""
        out: dict[str, str] = {}
        with self._read() as s:
            for ids in _chunks(list(asset_ids)):
                out.update(s.execute(select(AssetRow.asset_id, AssetRow.tenant).where(AssetRow.asset_id.in_(ids))).all())
        return out

    def list_assets(self, tenant: str | None = None, site_id: str | None = None, kind: str | None = None,
                    include_decommissioned: bool = False, page_size: int = 100,
                    page_token: str = "") -> tuple[list[AssetRecord], str]:
        """One page of assets in creation order, and the token of the next page ("" at the end).

        ``tenant=None`` lists every tenant's assets (an empty string matches none);
        ``site_id`` and ``kind`` filter when given (None or "" does not filter).  Paging
        with the returned tokens visits every matching asset exactly once.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise SpecError("page_size", f"must lie in 1..{MAX_PAGE_SIZE}, got {page_size!r}")
        after = _decode_page(page_token) if page_token else 0
        q = select(AssetRow).where(AssetRow.seq > after)
        if tenant is not None:
            q = q.where(AssetRow.tenant == tenant)
        if site_id:
            q = q.where(AssetRow.site_id == site_id)
        if kind:
            q = q.where(AssetRow.kind == kind)
        if not include_decommissioned:
            q = q.where(AssetRow.state == "active")
        with self._read() as s:
            rows = list(s.scalars(q.order_by(AssetRow.seq).limit(page_size + 1)))
            records = [_asset(r) for r in rows[:page_size]]
            next_token = _encode_page(rows[page_size - 1].seq) if len(rows) > page_size else ""
        return records, next_token

    def iter_assets(self, tenant: str | None = None, site_id: str | None = None, kind: str | None = None,
                    include_decommissioned: bool = False) -> Iterator[AssetRecord]:
        """Every matching asset, in creation order, read a page at a time."""
        token = ""
        while True:
            page, token = self.list_assets(tenant, site_id, kind, include_decommissioned, MAX_PAGE_SIZE, token)
            yield from page
            if not token:
                return

    def update_asset(self, asset_id: str, spec: dict) -> AssetRecord:
        """Replace an active asset's spec (the whole spec); SpecError if it is decommissioned."""
        spec = _json_object(spec, "spec")
        with self._write() as s:
            row = self._asset_row(s, asset_id)
            if row.state != "active":
                raise SpecError("asset_id", f"asset {asset_id!r} is decommissioned and cannot change")
            row.spec = spec
            row.update_time = _now()
            s.flush()
            record = _asset(row)
        return record

    def decommission_asset(self, asset_id: str) -> AssetRecord:
        """Mark the asset decommissioned (kept, never deleted); a second call changes nothing."""
        with self._write() as s:
            row = self._asset_row(s, asset_id)
            if row.state != "decommissioned":
                row.state = "decommissioned"
                row.update_time = _now()
                s.flush()
            record = _asset(row)
        return record

    # --- telemetry -----------------------------------------------------------------------------

    def record_telemetry(self, asset_id: str, time: datetime, values: dict) -> None:
        """Store one measurement of an active asset, taken at ``time`` (tz-aware).

        ``values`` is a JSON object of finite values (p_kw, q_kvar, soc_frac, ...).  It is
        kept as history and becomes the asset's latest unless a measurement with a later
        ``time`` is stored already (a late, older one does not replace it).
        """
        refused = self.record_telemetry_batch([(asset_id, time, values)])
        if refused:
            raise refused[0][1]

    def record_telemetry_batch(self, measurements: Sequence[tuple[str, datetime, dict]]) -> list[tuple[int, VppError]]:
        """Store many measurements ``(asset_id, time, values)`` in one transaction.

        Each is checked as :meth:`record_telemetry` checks one; the ones refused (bad time or
        values, unknown or decommissioned asset) are returned as ``(position, error)`` and
        the others stored, all with one commit: one fsync for the lot instead of one each.
        """
        refused: list[tuple[int, VppError]] = []
        rows: list[tuple[int, str, datetime, dict]] = []
        for i, (asset_id, time, values) in enumerate(measurements):
            try:
                rows.append((i, _text(asset_id, "asset_id"), _utc(time, "time"), _json_object(values, "values")))
            except VppError as error:
                refused.append((i, error))
        if not rows:
            return refused
        with self._write() as s:
            states: dict[str, str] = {}
            for ids in _chunks([r[1] for r in rows]):
                states.update(s.execute(select(AssetRow.asset_id, AssetRow.state).where(AssetRow.asset_id.in_(ids))).all())
            keep = []
            for i, asset_id, time, values in rows:
                if asset_id not in states:
                    refused.append((i, UnknownAssetError(asset_id)))
                elif states[asset_id] != "active":
                    refused.append((i, SpecError("asset_id", f"asset {asset_id!r} is decommissioned")))
                else:
                    keep.append((asset_id, time, values))
            if keep:
                received = _now()
                s.add_all([TelemetryRow(asset_id=a, time=t, values=v, receive_time=received) for a, t, v in keep])
                insert = (sqlite.insert if self.dialect == "sqlite" else postgresql.insert)(LatestTelemetryRow)
                upsert = insert.on_conflict_do_update(
                    index_elements=[LatestTelemetryRow.asset_id],
                    set_={"time": insert.excluded.time, "values": insert.excluded["values"]},
                    where=LatestTelemetryRow.time <= insert.excluded.time)
                # executemany keeps the arrival order: within one batch the latest time wins,
                # as it would call by call.
                s.execute(upsert, [{"asset_id": a, "time": t, "values": v} for a, t, v in keep])
        return sorted(refused, key=lambda r: r[0])

    def latest_telemetry(self, asset_ids: list[str]) -> dict[str, tuple[datetime, dict]]:
        """The latest measurement per asset: {asset_id: (time UTC, values)}; assets without any are left out."""
        out: dict[str, tuple[datetime, dict]] = {}
        with self._read() as s:
            for ids in _chunks(asset_ids):
                for r in s.scalars(select(LatestTelemetryRow).where(LatestTelemetryRow.asset_id.in_(ids))):
                    out[r.asset_id] = (r.time, dict(r.values))
        return out

    # --- grid operators' limits and flexibility requests -----------------------------------------

    def add_limit(self, site_id: str, element: str, element_name: str, start: datetime, end: datetime,
                  limit_kw: float | None = None, limit_percent: float | None = None,
                  created_by: str = "") -> LimitRecord:
        """Store a limit on a site's grid connection or branch for [start, end).

        Give exactly one of ``limit_kw`` (kW; the only form for connection limits) and
        ``limit_percent`` (percent of a transformer's or line's rating), finite and >= 0.
        ``element_name`` names the transformer or line ("" for the connection).
        """
        site_id = _text(site_id, "site_id")
        if element not in ELEMENTS:
            raise SpecError("element", f"must be one of {list(ELEMENTS)}, got {element!r}")
        element_name = _text(element_name, "element_name", required=element in ("transformer", "line"))
        start, end = _window(start, end)
        if (limit_kw is None) == (limit_percent is None):
            raise SpecError("limit_kw", "give exactly one of limit_kw and limit_percent")
        limit_kw = _optional_number(limit_kw, "limit_kw", nonneg=True)
        limit_percent = _optional_number(limit_percent, "limit_percent", nonneg=True)
        if element.startswith("connection") and limit_percent is not None:
            raise SpecError("limit_percent", "a connection limit is given in kW (limit_kw)")
        created_by = _text(created_by, "created_by", required=False)
        with self._write() as s:
            row = LimitRow(site_id=site_id, element=element, element_name=element_name, start=start, end=end,
                           limit_kw=limit_kw, limit_percent=limit_percent, created_by=created_by,
                           create_time=_now(), lifted_time=None)
            s.add(row)
            s.flush()
            record = _limit(row)
        return record

    def lift_limit(self, limit_id: int | str) -> LimitRecord:
        """Mark a limit lifted (the row is kept); lifting it again changes nothing."""
        try:
            key = int(limit_id)
        except (TypeError, ValueError):
            raise SpecError("limit_id", f"not a limit id: {limit_id!r}") from None
        with self._write() as s:
            row = s.get(LimitRow, key)
            if row is None:
                raise NotFoundError(f"no limit {limit_id!r}")
            if row.lifted_time is None:
                row.lifted_time = _now()
                s.flush()
            record = _limit(row)
        return record

    def active_limits(self, site_id: str, start: datetime, end: datetime) -> list[LimitRecord]:
        """The site's limits that are not lifted and overlap [start, end), oldest first."""
        start, end = _window(start, end)
        with self._read() as s:
            rows = s.scalars(select(LimitRow).where(LimitRow.site_id == site_id, LimitRow.lifted_time.is_(None),
                                                    LimitRow.start < end, LimitRow.end > start)
                             .order_by(LimitRow.limit_id))
            return [_limit(r) for r in rows]

    def add_flex_request(self, site_id: str, start: datetime, end: datetime, max_import_kw: float | None = None,
                         min_import_kw: float | None = None, price_cny_per_kwh: float | None = None,
                         priority: int = 0, created_by: str = "") -> FlexRecord:
        """Store a request to keep the import (kW, negative = export) within bounds over [start, end).

        An empty ``site_id`` addresses the whole portfolio.  Give at least one of
        ``max_import_kw`` and ``min_import_kw`` (min <= max); ``price_cny_per_kwh`` >= 0.
        """
        site_id = _text(site_id, "site_id", required=False)
        start, end = _window(start, end)
        if max_import_kw is None and min_import_kw is None:
            raise SpecError("max_import_kw", "give max_import_kw, min_import_kw or both")
        hi = _optional_number(max_import_kw, "max_import_kw")
        lo = _optional_number(min_import_kw, "min_import_kw")
        if hi is not None and lo is not None and lo > hi:
            raise SpecError("min_import_kw", "must not exceed max_import_kw")
        price = _optional_number(price_cny_per_kwh, "price_cny_per_kwh", nonneg=True)
        priority = _whole(priority, "priority")
        created_by = _text(created_by, "created_by", required=False)
        with self._write() as s:
            row = FlexRow(site_id=site_id, start=start, end=end, max_import_kw=hi, min_import_kw=lo,
                          price_cny_per_kwh=price, priority=priority, created_by=created_by, create_time=_now())
            s.add(row)
            s.flush()
            record = _flex(row)
        return record

    def flex_requests(self, site_id: str, start: datetime, end: datetime) -> list[FlexRecord]:
        """Requests stored for exactly this ``site_id`` that overlap [start, end), highest priority first.

        ``site_id=""`` returns the portfolio-wide requests; a site's dispatch asks for both.
        """
        start, end = _window(start, end)
        with self._read() as s:
            rows = s.scalars(select(FlexRow).where(FlexRow.site_id == site_id, FlexRow.start < end,
                                                   FlexRow.end > start)
                             .order_by(FlexRow.priority.desc(), FlexRow.request_id))
            return [_flex(r) for r in rows]

    # --- cycles and setpoints ------------------------------------------------------------------

    def save_cycle(self, site_id: str, cycle_start: datetime, status: str, solve_s: float, total_s: float,
                   objective_cny: float | None, violations_found: int, violations_remaining: int,
                   reason: str | None, setpoints: list[SetpointRecord], plan: dict) -> int:
        """Store one dispatch cycle, its plan and its setpoints in one transaction; return the cycle id.

        ``status`` is "optimal", "fallback" or "failed"; ``solve_s`` and ``total_s`` are
        wall seconds.  ``plan`` is stored as the JSON the caller passes (NaN allowed, numpy
        numbers converted).  Setpoint powers must be finite, each asset enrolled and listed
        once; on any error nothing of the cycle is stored.
        """
        site_id = _text(site_id, "site_id")
        cycle_start = _utc(cycle_start, "cycle_start")
        if status not in CYCLE_STATUSES:
            raise SpecError("status", f"must be one of {list(CYCLE_STATUSES)}, got {status!r}")
        solve_s = _number(solve_s, "solve_s", nonneg=True)
        total_s = _number(total_s, "total_s", nonneg=True)
        objective_cny = _optional_number(objective_cny, "objective_cny")
        violations_found = _whole(violations_found, "violations_found", nonneg=True)
        violations_remaining = _whole(violations_remaining, "violations_remaining", nonneg=True)
        if reason is not None and not isinstance(reason, str):
            raise SpecError("reason", "must be a string or None")
        reason = reason[:MAX_REASON_CHARS] if reason else None
        if not isinstance(plan, dict):
            raise SpecError("plan", f"must be a dict, got {type(plan).__name__}")
        try:
            plan = json.loads(json.dumps(plan, default=_plan_default))
        except (TypeError, ValueError) as error:
            raise SpecError("plan", f"must be JSON-serializable: {error}") from None
        rows, seen = [], set()
        for i, sp in enumerate(setpoints):
            where = f"setpoints[{i}]"
            asset_id = _text(sp.asset_id, f"{where}.asset_id")
            if asset_id in seen:
                raise SpecError(f"{where}.asset_id", f"asset {asset_id!r} has two setpoints in one cycle")
            seen.add(asset_id)
            valid_from = _utc(sp.valid_from, f"{where}.valid_from")
            valid_until = _utc(sp.valid_until, f"{where}.valid_until")
            if valid_until <= valid_from:
                raise SpecError(f"{where}.valid_until", "must be after valid_from")
            rows.append(dict(asset_id=asset_id, valid_from=valid_from, valid_until=valid_until,
                             p_kw=_number(sp.p_kw, f"{where}.p_kw"), q_kvar=_number(sp.q_kvar, f"{where}.q_kvar"),
                             fallback=bool(sp.fallback)))
        with self._write() as s:
            cycle = CycleRow(site_id=site_id, cycle_start=cycle_start, status=status, solve_s=solve_s,
                             total_s=total_s, objective_cny=objective_cny, violations_found=violations_found,
                             violations_remaining=violations_remaining, reason=reason, plan=plan,
                             create_time=_now())
            s.add(cycle)
            s.flush()
            known: set[str] = set()
            for ids in _chunks(list(seen)):
                known.update(s.scalars(select(AssetRow.asset_id).where(AssetRow.asset_id.in_(ids))))
            for row in rows:
                if row["asset_id"] not in known:  # the foreign key would refuse it too
                    raise UnknownAssetError(row["asset_id"])
                s.add(SetpointRow(cycle_id=cycle.cycle_id, **row))
            cycle_id = cycle.cycle_id
        return cycle_id

    def latest_setpoints(self, asset_ids: list[str]) -> dict[str, SetpointRecord]:
        """Per asset, its setpoint from the newest stored cycle (the last saved) that has one."""
        out: dict[str, SetpointRecord] = {}
        with self._read() as s:
            for ids in _chunks(asset_ids):
                newest = (select(SetpointRow.asset_id, func.max(SetpointRow.cycle_id).label("cycle_id"))
                          .where(SetpointRow.asset_id.in_(ids)).group_by(SetpointRow.asset_id).subquery())
                q = select(SetpointRow).join(newest, and_(SetpointRow.asset_id == newest.c.asset_id,
                                                          SetpointRow.cycle_id == newest.c.cycle_id))
                for r in s.scalars(q):
                    out[r.asset_id] = _setpoint(r)
        return out

    def last_cycles(self, site_id: str, limit: int = 10) -> list[CycleRecord]:
        """The site's last ``limit`` (1..10000) stored cycles, newest (last saved) first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_CYCLES:
            raise SpecError("limit", f"must lie in 1..{MAX_CYCLES}, got {limit!r}")
        with self._read() as s:
            rows = s.scalars(select(CycleRow).where(CycleRow.site_id == site_id)
                             .order_by(CycleRow.cycle_id.desc()).limit(limit))
            return [_cycle(r) for r in rows]

    def latest_plan(self, site_id: str) -> tuple[CycleRecord, dict] | None:
        """The newest cycle that produced a plan (status other than "failed") and its plan, or None."""
        with self._read() as s:
            row = s.scalar(select(CycleRow).where(CycleRow.site_id == site_id, CycleRow.status != "failed")
                           .order_by(CycleRow.cycle_id.desc()).limit(1))
            return None if row is None else (_cycle(row), row.plan)


# --- SQLite connection setup -------------------------------------------------------------------


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    """On every new SQLite connection: WAL, fsync at every commit, foreign keys enforced."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # Let SQLAlchemy, not the sqlite3 module, begin transactions (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None


def _sqlite_on_begin(connection) -> None:
    # A write transaction takes the write lock at once, so writers wait their turn (busy
    # timeout) rather than fail on upgrading a read lock; reads start a snapshot lazily.
    if connection.get_execution_options().get("vpp_write"):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")
