"""The service's persistent state, with SQLAlchemy: SQLite (WAL) by default, PostgreSQL by URL.

Every mutating method commits before it returns, so a write the service acknowledges is
on disk (SQLite runs with ``synchronous=FULL``); a failing write rolls back and leaves
the stored data as it was.  Sessions are short-lived, one per call, so the store can be
used from the gRPC thread pool and the dispatch loop at once.  All times are stored and
returned timezone-aware in UTC.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, UniqueConstraint,
                        create_engine, event, select)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from vpp.errors import SpecError, UnknownAssetError, VppError

ROLES = ("aggregator", "operator", "device")
ELEMENTS = ("connection_import", "connection_export", "transformer", "line")


class ConflictError(VppError):
    """The request contradicts what is stored (ALREADY_EXISTS)."""


class NotFoundError(VppError):
    """An id that is not stored (NOT_FOUND)."""


def generate_token() -> str:
    """A new random bearer token (256 bits)."""
    return secrets.token_urlsafe(32)


def _hash(token: str) -> str:
    # Tokens are 256-bit random strings, not passwords: a plain SHA-256 cannot be reversed
    # and needs no salt or slow hash.
    return hashlib.sha256(token.encode()).hexdigest()


def _utc(value: datetime, field: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise SpecError(field, "must be a timezone-aware time")
    return value.astimezone(timezone.utc)


class UtcDateTime(TypeDecorator):
    """Aware datetimes in, aware UTC datetimes out (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class TokenRow(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128), default="")
    asset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class AssetRow(Base):
    __tablename__ = "assets"
    __table_args__ = (UniqueConstraint("tenant", "external_id"), Index("ix_assets_site", "site_id"))
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    asset_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    site_id: Mapped[str] = mapped_column(String(64))
    external_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    bus: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="active")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime)


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    __table_args__ = (Index("ix_telemetry_asset_time", "asset_id", "time"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.asset_id"))
    time: Mapped[datetime] = mapped_column(UtcDateTime)
    values: Mapped[dict] = mapped_column(JSON)


class LimitRow(Base):
    __tablename__ = "limits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(64), index=True)
    element: Mapped[str] = mapped_column(String(32))
    element_name: Mapped[str] = mapped_column(String(128), default="")
    start: Mapped[datetime] = mapped_column(UtcDateTime)
    end: Mapped[datetime] = mapped_column(UtcDateTime)
    limit_kw: Mapped[float | None] = mapped_column(Float, nullable=True)
    limit_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    lifted_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class FlexRow(Base):
    __tablename__ = "flex_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(64), index=True)
    start: Mapped[datetime] = mapped_column(UtcDateTime)
    end: Mapped[datetime] = mapped_column(UtcDateTime)
    max_import_kw: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_import_kw: Mapped[float | None] = mapped_column(Float, nullable=True)
    price_cny_per_kwh: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)


class CycleRow(Base):
    __tablename__ = "cycles"
    __table_args__ = (Index("ix_cycles_site_start", "site_id", "cycle_start"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(64))
    cycle_start: Mapped[datetime] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(16))
    solve_s: Mapped[float] = mapped_column(Float)
    total_s: Mapped[float] = mapped_column(Float)
    objective_cny: Mapped[float | None] = mapped_column(Float, nullable=True)
    violations_found: Mapped[int] = mapped_column(Integer)
    violations_remaining: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    plan: Mapped[dict] = mapped_column(JSON)


class SetpointRow(Base):
    __tablename__ = "setpoints"
    __table_args__ = (Index("ix_setpoints_asset_cycle", "asset_id", "cycle_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"))
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.asset_id"))
    valid_from: Mapped[datetime] = mapped_column(UtcDateTime)
    valid_until: Mapped[datetime] = mapped_column(UtcDateTime)
    p_kw: Mapped[float] = mapped_column(Float)
    q_kvar: Mapped[float] = mapped_column(Float)
    fallback: Mapped[bool] = mapped_column(Boolean)


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str
    asset_id: str | None = None


@dataclass(frozen=True)
class AssetRecord:
    asset_id: str
    tenant: str
    site_id: str
    external_id: str
    kind: str
    bus: str
    spec: dict
    state: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class LimitRecord:
    limit_id: int
    site_id: str
    element: str
    element_name: str
    start: datetime
    end: datetime
    limit_kw: float | None
    limit_percent: float | None
    created_by: str
    create_time: datetime
    lifted_time: datetime | None


@dataclass(frozen=True)
class FlexRecord:
    request_id: int
    site_id: str
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
    status: str
    solve_s: float
    total_s: float
    objective_cny: float | None
    violations_found: int
    violations_remaining: int
    reason: str | None


def _asset(r: AssetRow) -> AssetRecord:
    return AssetRecord(r.asset_id, r.tenant, r.site_id, r.external_id, r.kind, r.bus, dict(r.spec), r.state,
                       r.create_time, r.update_time)


def _limit(r: LimitRow) -> LimitRecord:
    return LimitRecord(r.id, r.site_id, r.element, r.element_name, r.start, r.end, r.limit_kw, r.limit_percent,
                       r.created_by, r.create_time, r.lifted_time)


def _flex(r: FlexRow) -> FlexRecord:
    return FlexRecord(r.id, r.site_id, r.start, r.end, r.max_import_kw, r.min_import_kw, r.price_cny_per_kwh,
                      r.priority, r.created_by, r.create_time)


def _cycle(r: CycleRow) -> CycleRecord:
    return CycleRecord(r.id, r.site_id, r.cycle_start, r.status, r.solve_s, r.total_s, r.objective_cny,
                       r.violations_found, r.violations_remaining, r.reason)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _finite_or_none(value, field: str, nonneg: bool = False) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or (nonneg and value < 0):
        raise SpecError(field, "must be a finite number" + (" >= 0" if nonneg else ""))
    return value


class Store:
    def __init__(self, url: str):
        kwargs: dict[str, Any] = {}
        sqlite = url.startswith("sqlite")
        if sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, future=True, **kwargs)
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(connection, _record):
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # --- tokens ---------------------------------------------------------------------------------

    def add_token(self, tenant: str, role: str, token: str, name: str = "", asset_id: str | None = None) -> int:
        if role not in ROLES:
            raise SpecError("role", f"must be one of {list(ROLES)}")
        if len(token) < 16:
            raise SpecError("token", "must be at least 16 characters")
        if role == "device" and not asset_id:
            raise SpecError("asset_id", "a device token belongs to one asset")
        with self._session.begin() as s:
            row = TokenRow(digest=_hash(token), tenant=tenant, role=role, name=name, asset_id=asset_id)
            s.add(row)
            s.flush()
            return row.id

    def authenticate(self, token: str) -> Principal | None:
        with self._session() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.digest == _hash(token)))
            return None if row is None else Principal(row.tenant, row.role, row.asset_id)

    # --- assets ---------------------------------------------------------------------------------

    def enroll_asset(self, tenant: str, site_id: str, external_id: str, kind: str, bus: str,
                     spec: dict) -> tuple[AssetRecord, bool]:
        """Enroll once per (tenant, external_id); the same request again returns the record."""
        if not external_id:
            raise SpecError("external_id", "required")
        spec = json.loads(json.dumps(spec))  # plain JSON types, as they will be read back
        with self._session.begin() as s:
            row = s.scalar(select(AssetRow).where(AssetRow.tenant == tenant, AssetRow.external_id == external_id))
            if row is not None:
                if (row.site_id, row.kind, row.bus, row.spec) != (site_id, kind, bus, spec):
                    raise ConflictError(f"external id {external_id!r} is enrolled already with another site, kind, "
                                        f"bus or spec (asset {row.asset_id}); use UpdateAsset to change its spec")
                return _asset(row), False
            now = _now()
            row = AssetRow(asset_id=uuid.uuid4().hex, tenant=tenant, site_id=site_id, external_id=external_id,
                           kind=kind, bus=bus, spec=spec, state="active", create_time=now, update_time=now)
            s.add(row)
            s.flush()
            return _asset(row), True

    def _row(self, s, asset_id: str) -> AssetRow:
        row = s.scalar(select(AssetRow).where(AssetRow.asset_id == asset_id))
        if row is None:
            raise UnknownAssetError(asset_id)
        return row

    def get_asset(self, asset_id: str) -> AssetRecord:
        with self._session() as s:
            return _asset(self._row(s, asset_id))

    def list_assets(self, tenant: str | None = None, site_id: str | None = None, kind: str | None = None,
                    include_decommissioned: bool = False, page_size: int = 100,
                    page_token: str = "") -> tuple[list[AssetRecord], str]:
        if not 1 <= page_size <= 1000:
            raise SpecError("page_size", "must lie in 1..1000")
        after = 0
        if page_token:
            try:
                after = int(page_token)
            except ValueError:
                raise SpecError("page_token", "not a token this service issued") from None
        q = select(AssetRow).where(AssetRow.seq > after).order_by(AssetRow.seq).limit(page_size + 1)
        if tenant is not None:
            q = q.where(AssetRow.tenant == tenant)
        if site_id:
            q = q.where(AssetRow.site_id == site_id)
        if kind:
            q = q.where(AssetRow.kind == kind)
        if not include_decommissioned:
            q = q.where(AssetRow.state == "active")
        with self._session() as s:
            rows = list(s.scalars(q))
        more = len(rows) > page_size
        rows = rows[:page_size]
        return [_asset(r) for r in rows], (str(rows[-1].seq) if more else "")

    def update_asset(self, asset_id: str, spec: dict) -> AssetRecord:
        with self._session.begin() as s:
            row = self._row(s, asset_id)
            if row.state != "active":
                raise ConflictError(f"asset {asset_id!r} is decommissioned")
            row.spec = json.loads(json.dumps(spec))
            row.update_time = _now()
            s.flush()
            return _asset(row)

    def decommission_asset(self, asset_id: str) -> AssetRecord:
        with self._session.begin() as s:
            row = self._row(s, asset_id)
            if row.state != "decommissioned":
                row.state = "decommissioned"
                row.update_time = _now()
            s.flush()
            return _asset(row)

    # --- telemetry ------------------------------------------------------------------------------

    def record_telemetry(self, asset_id: str, time: datetime, values: dict) -> None:
        time = _utc(time, "time")
        with self._session.begin() as s:
            row = self._row(s, asset_id)
            if row.state != "active":
                raise ConflictError(f"asset {asset_id!r} is decommissioned")
            s.add(TelemetryRow(asset_id=asset_id, time=time, values=json.loads(json.dumps(values))))

    def latest_telemetry(self, asset_ids: list[str]) -> dict[str, tuple[datetime, dict]]:
        out: dict[str, tuple[datetime, dict]] = {}
        if not asset_ids:
            return out
        with self._session() as s:
            for chunk in range(0, len(asset_ids), 500):
                ids = asset_ids[chunk:chunk + 500]
                for r in s.scalars(select(TelemetryRow).where(TelemetryRow.asset_id.in_(ids))
                                   .order_by(TelemetryRow.time, TelemetryRow.id)):
                    out[r.asset_id] = (r.time, dict(r.values))
        return out

    # --- limits and flexibility requests ----------------------------------------------------------

    def add_limit(self, site_id: str, element: str, element_name: str, start: datetime, end: datetime,
                  limit_kw: float | None = None, limit_percent: float | None = None,
                  created_by: str = "") -> LimitRecord:
        if element not in ELEMENTS:
            raise SpecError("element", f"must be one of {list(ELEMENTS)}")
        start, end = _utc(start, "window.start"), _utc(end, "window.end")
        if end <= start:
            raise SpecError("window.end", "must be after start")
        if (limit_kw is None) == (limit_percent is None):
            raise SpecError("limit_kw", "give exactly one of limit_kw and limit_percent")
        with self._session.begin() as s:
            row = LimitRow(site_id=site_id, element=element, element_name=element_name, start=start, end=end,
                           limit_kw=_finite_or_none(limit_kw, "limit_kw", True),
                           limit_percent=_finite_or_none(limit_percent, "limit_percent", True),
                           created_by=created_by, create_time=_now())
            s.add(row)
            s.flush()
            return _limit(row)

    def lift_limit(self, limit_id) -> LimitRecord:
        try:
            key = int(limit_id)
        except (TypeError, ValueError):
            raise SpecError("limit_id", "not a limit id") from None
        with self._session.begin() as s:
            row = s.get(LimitRow, key)
            if row is None:
                raise NotFoundError(f"no limit {limit_id!r}")
            if row.lifted_time is None:
                row.lifted_time = _now()
            s.flush()
            return _limit(row)

    def active_limits(self, site_id: str, start: datetime, end: datetime) -> list[LimitRecord]:
        start, end = _utc(start, "start"), _utc(end, "end")
        with self._session() as s:
            rows = s.scalars(select(LimitRow).where(LimitRow.site_id == site_id, LimitRow.lifted_time.is_(None),
                                                    LimitRow.start < end, LimitRow.end > start).order_by(LimitRow.id))
            return [_limit(r) for r in rows]

    def add_flex_request(self, site_id: str, start: datetime, end: datetime, max_import_kw: float | None = None,
                         min_import_kw: float | None = None, price_cny_per_kwh: float | None = None,
                         priority: int = 0, created_by: str = "") -> FlexRecord:
        start, end = _utc(start, "window.start"), _utc(end, "window.end")
        if end <= start:
            raise SpecError("window.end", "must be after start")
        if max_import_kw is None and min_import_kw is None:
            raise SpecError("max_import_kw", "give max_import_kw, min_import_kw or both")
        hi = _finite_or_none(max_import_kw, "max_import_kw")
        lo = _finite_or_none(min_import_kw, "min_import_kw")
        if hi is not None and lo is not None and lo > hi:
            raise SpecError("min_import_kw", "must not exceed max_import_kw")
        with self._session.begin() as s:
            row = FlexRow(site_id=site_id, start=start, end=end, max_import_kw=hi, min_import_kw=lo,
                          price_cny_per_kwh=_finite_or_none(price_cny_per_kwh, "price_cny_per_kwh", True),
                          priority=int(priority), created_by=created_by, create_time=_now())
            s.add(row)
            s.flush()
            return _flex(row)

    def flex_requests(self, site_id: str, start: datetime, end: datetime) -> list[FlexRecord]:
        start, end = _utc(start, "start"), _utc(end, "end")
        with self._session() as s:
            rows = s.scalars(select(FlexRow).where(FlexRow.site_id == site_id, FlexRow.start < end,
                                                   FlexRow.end > start).order_by(FlexRow.priority.desc(), FlexRow.id))
            return [_flex(r) for r in rows]

    # --- cycles and setpoints ---------------------------------------------------------------------

    def save_cycle(self, site_id: str, cycle_start: datetime, status: str, solve_s: float, total_s: float,
                   objective_cny: float | None, violations_found: int, violations_remaining: int,
                   reason: str | None, setpoints: list[SetpointRecord], plan: dict) -> int:
        """Store a cycle and its setpoints in one transaction; return the cycle's id."""
        cycle_start = _utc(cycle_start, "cycle_start")
        for i, sp in enumerate(setpoints):
            for name in ("p_kw", "q_kvar"):
                if not math.isfinite(getattr(sp, name)):
                    raise SpecError(f"setpoints[{i}].{name}", "must be a finite number")
        with self._session.begin() as s:
            row = CycleRow(site_id=site_id, cycle_start=cycle_start, status=status, solve_s=float(solve_s),
                           total_s=float(total_s), objective_cny=objective_cny, violations_found=int(violations_found),
                           violations_remaining=int(violations_remaining), reason=(reason or None) and reason[:2000],
                           plan=json.loads(json.dumps(plan, default=float)))
            s.add(row)
            s.flush()
            for sp in setpoints:
                s.add(SetpointRow(cycle_id=row.id, asset_id=sp.asset_id, valid_from=_utc(sp.valid_from, "valid_from"),
                                  valid_until=_utc(sp.valid_until, "valid_until"), p_kw=float(sp.p_kw),
                                  q_kvar=float(sp.q_kvar), fallback=bool(sp.fallback)))
            s.flush()
            return row.id

    def latest_setpoints(self, asset_ids: list[str]) -> dict[str, SetpointRecord]:
        out: dict[str, SetpointRecord] = {}
        with self._session() as s:
            for chunk in range(0, len(asset_ids), 500):
                ids = asset_ids[chunk:chunk + 500]
                for r in s.scalars(select(SetpointRow).where(SetpointRow.asset_id.in_(ids))
                                   .order_by(SetpointRow.cycle_id, SetpointRow.id)):
                    out[r.asset_id] = SetpointRecord(r.asset_id, r.valid_from, r.valid_until, r.p_kw, r.q_kvar,
                                                     r.fallback)
        return out

    def last_cycles(self, site_id: str, limit: int = 10) -> list[CycleRecord]:
        with self._session() as s:
            rows = s.scalars(select(CycleRow).where(CycleRow.site_id == site_id)
                             .order_by(CycleRow.id.desc()).limit(limit))
            return [_cycle(r) for r in rows]

    def latest_plan(self, site_id: str) -> tuple[CycleRecord, dict] | None:
        with self._session() as s:
            row = s.scalar(select(CycleRow).where(CycleRow.site_id == site_id, CycleRow.status != "failed")
                           .order_by(CycleRow.id.desc()).limit(1))
            return None if row is None else (_cycle(row), dict(row.plan))
