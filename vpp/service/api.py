"""The gRPC services: AssetRegistry, Telemetry, Dispatch and GridOperator (``vpp.v1``).

Every call carries ``authorization: Bearer <token>``; the token's tenant and role decide
what it may do:

==============  ==========================================================================
role            may
==============  ==========================================================================
aggregator      enroll, read, update, decommission its own tenant's assets; report their
                telemetry; read their setpoints and plans
device          report telemetry for and read the setpoint of its one asset
operator        set and lift limits, submit flexibility requests, read envelopes, cycle
                status, every plan and setpoint; read every asset
==============  ==========================================================================

Errors map to status codes in one place (:func:`_code_of`): a bad field, or bytes that
are not a valid message of the method's request type, is INVALID_ARGUMENT naming it;
unknown ids NOT_FOUND; a conflicting enrollment ALREADY_EXISTS; a missing, unknown,
expired or revoked token UNAUTHENTICATED (checked at every call, and again on open
streams, so a revocation needs no restart); a call outside the role or tenant
PERMISSION_DENIED; storage that cannot write UNAVAILABLE.  Any other exception is logged
and answered INTERNAL; the server keeps serving and nothing is stored for a refused
request.

The request checks are plain functions (:func:`measurement_values`, :func:`limit_values`,
:func:`flex_values`, :func:`cycle_limit`, :func:`asset_filter`) that turn a message into
checked values or raise :class:`~vpp.errors.SpecError`; the servicers only call them,
the store and the engine.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
from datetime import datetime, timezone

import grpc
from google.protobuf import message, message_factory, struct_pb2, timestamp_pb2
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from vpp.errors import SpecError, UnknownAssetError, VppError
from vpp.service.store import ConflictError, NotFoundError, TokenRejected
from vpp.v1 import (assets_pb2, assets_pb2_grpc, common_pb2, dispatch_pb2, dispatch_pb2_grpc, grid_operator_pb2,
                    grid_operator_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc)

log = logging.getLogger("vpp.service.api")

KINDS = {common_pb2.ASSET_KIND_PV: "pv", common_pb2.ASSET_KIND_BATTERY: "battery",
         common_pb2.ASSET_KIND_HEAT_PUMP: "heat_pump", common_pb2.ASSET_KIND_CHARGING_STATION: "charging_station",
         common_pb2.ASSET_KIND_LOAD: "load"}
KIND_ENUM = {v: k for k, v in KINDS.items()}
STATES = {"active": common_pb2.ASSET_STATE_ACTIVE, "decommissioned": common_pb2.ASSET_STATE_DECOMMISSIONED}
OUTCOMES = {"optimal": common_pb2.CYCLE_OUTCOME_OPTIMAL, "fallback": common_pb2.CYCLE_OUTCOME_FALLBACK,
            "failed": common_pb2.CYCLE_OUTCOME_FAILED}
ELEMENTS = {grid_operator_pb2.GRID_ELEMENT_CONNECTION_IMPORT: "connection_import",
            grid_operator_pb2.GRID_ELEMENT_CONNECTION_EXPORT: "connection_export",
            grid_operator_pb2.GRID_ELEMENT_TRANSFORMER: "transformer", grid_operator_pb2.GRID_ELEMENT_LINE: "line"}
ELEMENT_ENUM = {v: k for k, v in ELEMENTS.items()}

TELEMETRY_BATCH = 500        # measurements of a stream stored per transaction
TELEMETRY_FLUSH_S = 0.2      # a stream that pauses this long has its measurements stored
TOKEN_RECHECK_S = 5.0        # an open stream re-reads its token this often (revocation, expiry)
MAX_LIMIT_ID = 2**63 - 1     # limit ids are 64-bit integers in every database
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)   # accepted timestamps: [EARLIEST, LATEST)
LATEST = datetime(2200, 1, 1, tzinfo=timezone.utc)
MAX_POWER_KW = 1e6           # any power, limit or import bound [kW or kvar]; asset ratings stop at 1e6 too
MAX_ENERGY_KWH = 1e7         # stored energy [kWh, kWh_th]
MAX_SESSION_KWH = 1e4        # one EV session's energy [kWh]
MAX_LIMIT_PERCENT = 1e4      # a branch loading limit [% of rating]
MAX_PRICE_CNY_PER_KWH = 1e6
# A sync gRPC server runs each call on a thread of its pool, and a setpoint stream holds
# its thread while it is open: with 16 threads, 16 watchers used to stall every other
# call.  The pool (``SERVER_THREADS``, used by vpp.service.server) has room for
# MAX_WATCH_STREAMS streams plus CALL_THREADS for everything else; a stream beyond the
# cap is refused with RESOURCE_EXHAUSTED rather than queued.
MAX_WATCH_STREAMS = 256
CALL_THREADS = 32
SERVER_THREADS = MAX_WATCH_STREAMS + CALL_THREADS
WATCH_CACHE = 64             # setpoint batches kept for the watchers (per cycle and scope)


class Denied(VppError):
    """The caller's role or tenant does not allow this call."""


class Unauthenticated(VppError):
    pass


class Busy(VppError):
    """The server has no room for this call now (gRPC RESOURCE_EXHAUSTED)."""


class StorageUnavailable(VppError):
    """The database cannot take writes now (gRPC UNAVAILABLE)."""


class Malformed:
    """What the server hands a method for request bytes that do not parse as its message."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error

    def check(self, field: str = "request") -> None:
        raise SpecError(field, f"not a valid {self.type_name} message ({self.error})")


def _code_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, (Unauthenticated, TokenRejected)):
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    if isinstance(error, Denied):
        return grpc.StatusCode.PERMISSION_DENIED, str(error)
    if isinstance(error, SpecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, (UnknownAssetError, NotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, ConflictError):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, Busy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, StorageUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, OperationalError):  # disk full, read-only or locked database, lost connection
        return grpc.StatusCode.UNAVAILABLE, "storage unavailable; nothing was written, try again later"
    if isinstance(error, PoolTimeout):  # every database connection busy for the pool's whole timeout
        return grpc.StatusCode.UNAVAILABLE, "storage busy; nothing was written, try again later"
    return grpc.StatusCode.INTERNAL, "internal error"


def _rpc(method):
    """Authenticate, time, count and map errors of one unary or server-streaming method."""
    name = method.__name__

    def fail(self, context, error, t0):
        code, message = _code_of(error)
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
            log.exception("%s failed", name)
        self.service.metrics.observe_rpc(name, code.name, time.perf_counter() - t0)
        context.abort(code, message)

    if method.__code__.co_flags & 0x20:  # a generator: server streaming
        @functools.wraps(method)
        def stream(self, request, context):
            t0 = time.perf_counter()
            try:
                principal = self._principal(context)
                if isinstance(request, Malformed):
                    request.check()
                yield from method(self, request, context, principal)
            except Exception as error:
                if isinstance(error, grpc.RpcError) or context.code() is not None:
                    raise
                fail(self, context, error, t0)
            self.service.metrics.observe_rpc(name, "OK", time.perf_counter() - t0)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        t0 = time.perf_counter()
        try:
            principal = self._principal(context)
            if isinstance(request, Malformed):
                request.check()
            response = method(self, request, context, principal)
        except Exception as error:
            fail(self, context, error, t0)
        self.service.metrics.observe_rpc(name, "OK", time.perf_counter() - t0)
        return response
    return unary


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if value is not None:
        ts.FromDatetime(value.astimezone(timezone.utc))
    return ts


def _dt(ts: timestamp_pb2.Timestamp, field: str, required: bool = True) -> datetime | None:
    """A Timestamp as an aware UTC datetime in [EARLIEST, LATEST); SpecError naming the field otherwise.

    The range keeps every stored time usable by the dispatch (pandas counts nanoseconds
    from 1970 and ends in 2262): one telemetry report dated 9999 used to fail every cycle
    of its site until newer telemetry replaced it.
    """
    if ts.seconds == 0 and ts.nanos == 0:
        if required:
            raise SpecError(field, "required timestamp is missing")
        return None
    try:
        value = ts.ToDatetime(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise SpecError(field, "timestamp out of range") from None
    if not EARLIEST <= value < LATEST:
        raise SpecError(field, f"must lie in [{EARLIEST:%Y-%m-%d}, {LATEST:%Y-%m-%d}), got {value.isoformat()}")
    return value


def _finite(value: float, field: str, nonneg: bool = False, bound: float = 1e6) -> float:
    """A finite number with ``|value| <= bound`` (and >= 0 if ``nonneg``); SpecError otherwise."""
    if not math.isfinite(value):
        raise SpecError(field, "must be a finite number")
    if nonneg and value < 0:
        raise SpecError(field, "must not be negative")
    if abs(value) > bound:
        raise SpecError(field, f"magnitude above {bound:g} is not physical")
    return value


def spec_values(spec: struct_pb2.Struct, field: str = "spec") -> dict:
    """A Struct as plain JSON values; numbers must be finite (SpecError naming the key otherwise).

    Done by hand rather than with json_format, which raises a bare ValueError on NaN and
    infinity (answered INTERNAL before this existed)."""
    def value(v: struct_pb2.Value, where: str):
        kind = v.WhichOneof("kind")
        if kind == "number_value":
            if not math.isfinite(v.number_value):
                raise SpecError(where, "must be a finite number")
            return v.number_value
        if kind == "string_value":
            return v.string_value
        if kind == "bool_value":
            return v.bool_value
        if kind == "struct_value":
            return {k: value(x, f"{where}.{k}") for k, x in v.struct_value.fields.items()}
        if kind == "list_value":
            return [value(x, f"{where}[{i}]") for i, x in enumerate(v.list_value.values)]
        return None  # null_value, or no kind set

    return {k: value(v, f"{field}.{k}") for k, v in spec.fields.items()}


def _window(window, field: str) -> tuple[datetime, datetime]:
    start, end = _dt(window.start, f"{field}.start"), _dt(window.end, f"{field}.end")
    if end <= start:
        raise SpecError(f"{field}.end", "must be after start")
    return start, end


# --- request checks: message in, checked values out (SpecError naming the field otherwise) ----


def measurement_values(m: telemetry_pb2.Measurement) -> tuple[str, datetime, dict]:
    """A Measurement as (asset_id, time UTC, values): finite powers [kW, kvar], stored
    energies [kWh] >= 0 (e_th_kwh may be negative: heat below the band), 0 <= soc_frac <= 1,
    EV sessions with ids, departure after arrival and energies >= 0."""
    if not m.asset_id:
        raise SpecError("asset_id", "required")
    when = _dt(m.time, "time")
    values = {"p_kw": _finite(m.p_kw, "p_kw", bound=MAX_POWER_KW),
              "q_kvar": _finite(m.q_kvar, "q_kvar", bound=MAX_POWER_KW)}
    for name in ("e_kwh", "soc_frac", "e_th_kwh"):
        if m.HasField(name):
            values[name] = _finite(getattr(m, name), name, nonneg=name != "e_th_kwh", bound=MAX_ENERGY_KWH)
    if m.HasField("soc_frac") and m.soc_frac > 1:
        raise SpecError("soc_frac", "must lie in 0..1")
    sessions = []
    for i, s in enumerate(m.ev_sessions):
        where = f"ev_sessions[{i}]"
        if not s.session_id or not s.charger_id:
            raise SpecError(f"{where}.session_id", "session_id and charger_id are required")
        arrival, departure = _dt(s.arrival, f"{where}.arrival"), _dt(s.departure, f"{where}.departure")
        if departure <= arrival:
            raise SpecError(f"{where}.departure", "must be after arrival")
        sessions.append({"session_id": s.session_id, "charger_id": s.charger_id, "arrival": arrival.isoformat(),
                         "departure": departure.isoformat(),
                         "energy_kwh": _finite(s.energy_kwh, f"{where}.energy_kwh", True, MAX_SESSION_KWH),
                         "max_kw": (_finite(s.max_kw, f"{where}.max_kw", True, MAX_POWER_KW)
                                    if s.HasField("max_kw") else None),
                         "delivered_kwh": _finite(s.delivered_kwh, f"{where}.delivered_kwh", True, MAX_SESSION_KWH)})
    if sessions:
        values["ev_sessions"] = sessions
    return m.asset_id, when, values


def limit_values(request: grid_operator_pb2.SetLimitRequest, branch_names: dict[str, list[str]]) -> dict:
    """A SetLimitRequest as keyword arguments of ``Store.add_limit`` (less site and author).

    ``branch_names`` lists the site's transformers and lines by element ("transformer",
    "line"); a branch limit must name one of them.  Connection limits are in kW, branch
    limits in kW or percent of the rating; values finite and >= 0."""
    if request.element not in ELEMENTS:
        raise SpecError("element", "required: CONNECTION_IMPORT, CONNECTION_EXPORT, TRANSFORMER or LINE")
    element = ELEMENTS[request.element]
    start, end = _window(request.window, "window")
    which = request.WhichOneof("value")
    if which is None:
        raise SpecError("limit_kw", "give limit_kw or limit_percent")
    value = _finite(getattr(request, which), which, nonneg=True,
                    bound=MAX_POWER_KW if which == "limit_kw" else MAX_LIMIT_PERCENT)
    if element.startswith("connection"):
        if which != "limit_kw":
            raise SpecError("limit_percent", "a connection limit is given in kW (limit_kw)")
    else:
        names = branch_names.get(element, [])
        if request.element_name not in names:
            raise SpecError("element_name", f"no {element} named {request.element_name!r}; e.g. {names[:3]}")
    return dict(element=element, element_name=request.element_name, start=start, end=end,
                limit_kw=value if which == "limit_kw" else None,
                limit_percent=value if which == "limit_percent" else None)


def flex_values(request: grid_operator_pb2.SubmitFlexRequestRequest) -> dict:
    """A SubmitFlexRequestRequest as keyword arguments of ``Store.add_flex_request`` (less
    site and author): a window, at least one finite import bound [kW] with min <= max, a
    price [CNY/kWh] >= 0 if given, the priority."""
    start, end = _window(request.window, "window")
    bounds = {}
    for name in ("max_import_kw", "min_import_kw", "price_cny_per_kwh"):
        if request.HasField(name):
            price = name == "price_cny_per_kwh"
            bounds[name] = _finite(getattr(request, name), name, nonneg=price,
                                   bound=MAX_PRICE_CNY_PER_KWH if price else MAX_POWER_KW)
    if "max_import_kw" not in bounds and "min_import_kw" not in bounds:
        raise SpecError("max_import_kw", "give max_import_kw, min_import_kw or both")
    if bounds.get("min_import_kw", -math.inf) > bounds.get("max_import_kw", math.inf):
        raise SpecError("min_import_kw", "must not exceed max_import_kw")
    return dict(start=start, end=end, priority=request.priority, **bounds)


def cycle_limit(request: grid_operator_pb2.GetCycleStatusRequest) -> int:
    """How many cycles a GetCycleStatusRequest asks for: 10 when unset, else 1..1000."""
    limit = request.limit or 10
    if not 1 <= limit <= 1000:
        raise SpecError("limit", "must lie in 1..1000")
    return limit


def asset_filter(request: assets_pb2.ListAssetsRequest) -> dict:
    """A ListAssetsRequest as keyword arguments of ``Store.list_assets`` (less the tenant):
    page size 100 when unset, else 1..1000; a known kind or none."""
    kind = None
    if request.kind != common_pb2.ASSET_KIND_UNSPECIFIED:
        if request.kind not in KINDS:
            raise SpecError("kind", f"unknown kind {request.kind}")
        kind = KINDS[request.kind]
    page_size = request.page_size or 100
    if not 1 <= page_size <= 1000:
        raise SpecError("page_size", "must lie in 1..1000")
    return dict(site_id=request.site_id or None, kind=kind, include_decommissioned=request.include_decommissioned,
                page_size=page_size, page_token=request.page_token)


def limit_id(request: grid_operator_pb2.LiftLimitRequest) -> int:
    """The id of a LiftLimitRequest: a positive whole number."""
    if not request.limit_id:
        raise SpecError("limit_id", "required")
    text = request.limit_id.strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT_ID:
        raise SpecError("limit_id", f"not a limit id: {request.limit_id[:40]!r}")
    return int(text)


class _Base:
    def __init__(self, service):
        self.service = service
        self.store = service.store

    def _principal(self, context):
        token = _bearer(context)
        if not token:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        return self.store.principal(token)

    @staticmethod
    def _require(principal, *roles: str) -> None:
        if principal.role not in roles:
            raise Denied(f"role {principal.role!r} may not make this call")

    def _own_asset(self, principal, asset_id: str, roles=("aggregator", "device", "operator")):
        """The asset record if the caller may touch it, else an error."""
        self._before_lookup(principal, asset_id, roles)
        asset = self.store.get_asset(asset_id)
        self._same_tenant(principal, asset_id, asset.tenant)
        return asset

    def _own_assets(self, principal, asset_ids, roles=("aggregator", "device", "operator")) -> dict:
        """Per asset id, None if the caller may touch it, else the error ``_own_asset``
        would raise; one lookup for them all (a telemetry stream names hundreds)."""
        out, lookup = {}, []
        for asset_id in dict.fromkeys(asset_ids):
            try:
                self._before_lookup(principal, asset_id, roles)
                lookup.append(asset_id)
            except VppError as error:
                out[asset_id] = error
        tenants = self.store.asset_tenants(lookup) if lookup else {}
        for asset_id in lookup:
            try:
                if asset_id not in tenants:
                    raise UnknownAssetError(asset_id)
                self._same_tenant(principal, asset_id, tenants[asset_id])
                out[asset_id] = None
            except VppError as error:
                out[asset_id] = error
        return out

    def _before_lookup(self, principal, asset_id: str, roles) -> None:
        self._require(principal, *roles)
        if not asset_id:
            raise SpecError("asset_id", "required")
        if principal.role == "device" and principal.asset_id != asset_id:
            # Checked before the lookup: a device token learns nothing about other ids.
            raise Denied("a device token reads and reports only its own asset")

    @staticmethod
    def _same_tenant(principal, asset_id: str, tenant: str) -> None:
        if principal.role == "aggregator" and tenant != principal.tenant:
            raise Denied(f"asset {asset_id!r} belongs to another tenant")

    def _site(self, site_id: str):
        if not site_id:
            raise SpecError("site_id", "required")
        if site_id not in self.service.sites:
            raise NotFoundError(f"unknown site {site_id!r}")
        return self.service.sites[site_id]


def _asset_message(a) -> assets_pb2.Asset:
    spec = struct_pb2.Struct()
    spec.update(a.spec)
    return assets_pb2.Asset(asset_id=a.asset_id, external_id=a.external_id, site_id=a.site_id, bus=a.bus,
                            kind=KIND_ENUM[a.kind], state=STATES[a.state], spec=spec, create_time=_ts(a.create_time),
                            update_time=_ts(a.update_time))


class AssetRegistry(_Base, assets_pb2_grpc.AssetRegistryServicer):
    @_rpc
    def EnrollAsset(self, request, context, principal):
        self._require(principal, "aggregator")
        site = self._site(request.site_id)
        if not request.external_id:
            raise SpecError("external_id", "required")
        if request.kind not in KINDS:
            raise SpecError("kind", "required: one of " + ", ".join(common_pb2.AssetKind.Name(k) for k in KINDS))
        spec = spec_values(request.spec)
        site.validate_asset(KINDS[request.kind], request.bus, spec)
        record, created = self.store.enroll_asset(principal.tenant, request.site_id, request.external_id,
                                                  KINDS[request.kind], request.bus, spec)
        if created:
            self.service.metrics.asset_enrolled(record.kind)
        return _asset_message(record)

    @_rpc
    def GetAsset(self, request, context, principal):
        return _asset_message(self._own_asset(principal, request.asset_id, ("aggregator", "operator", "device")))

    @_rpc
    def ListAssets(self, request, context, principal):
        self._require(principal, "aggregator", "operator")
        tenant = principal.tenant if principal.role == "aggregator" else None
        records, token = self.store.list_assets(tenant=tenant, **asset_filter(request))
        return assets_pb2.ListAssetsResponse(assets=[_asset_message(a) for a in records], next_page_token=token)

    @_rpc
    def UpdateAsset(self, request, context, principal):
        asset = self._own_asset(principal, request.asset_id, ("aggregator",))
        spec = spec_values(request.spec)
        self._site(asset.site_id).validate_asset(asset.kind, asset.bus, spec)
        return _asset_message(self.store.update_asset(asset.asset_id, spec))

    @_rpc
    def DecommissionAsset(self, request, context, principal):
        asset = self._own_asset(principal, request.asset_id, ("aggregator",))
        record = self.store.decommission_asset(asset.asset_id)
        if asset.state == "active":
            self.service.metrics.asset_decommissioned(record.kind)
        return _asset_message(record)


class Telemetry(_Base, telemetry_pb2_grpc.TelemetryServicer):
    @_rpc
    def ReportTelemetry(self, request, context, principal):
        self._own_asset(principal, request.asset_id, ("aggregator", "device"))
        self.store.record_telemetry(*measurement_values(request))
        return telemetry_pb2.ReportTelemetryResponse()

    def StreamTelemetry(self, request_iterator, context):
        """Check each measurement as ReportTelemetry does; store the good ones in batches
        (one transaction per TELEMETRY_BATCH, or when the stream pauses TELEMETRY_FLUSH_S),
        every one before the summary acknowledges it."""
        t0 = time.perf_counter()

        def fail(error: Exception):
            """End the stream with the error's defined code, counted and (if ours) logged."""
            code, message = _code_of(error)
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                log.exception("StreamTelemetry failed")
            self.service.metrics.observe_rpc("StreamTelemetry", code.name, time.perf_counter() - t0)
            context.abort(code, message)

        try:
            principal = self._principal(context)
        except Exception as error:  # a refused token, or the store unavailable or busy
            fail(error)
        accepted, errors = 0, []  # errors: (index, line)
        allowed: dict[str, VppError | None] = {}  # per asset id: None, or why this caller may not report it
        received: list[tuple[int, str, tuple | VppError]] = []  # (index, asset id, values or why they are bad)
        checked_at = time.monotonic()

        def refuse(i, error):
            errors.append((i, f"measurement {i}: {_code_of(error)[0].name}: {error}"))

        def flush():
            nonlocal accepted
            if not received:
                return
            # Whether the caller may report each asset, looked up for the batch at once;
            # refused for the asset before its values are looked at, as ReportTelemetry does.
            allowed.update(self._own_assets(principal, [a for _, a, _ in received if a not in allowed],
                                            ("aggregator", "device")))
            pending = []
            for i, asset_id, values in received:
                if allowed[asset_id] is not None:
                    refuse(i, allowed[asset_id])
                elif isinstance(values, VppError):
                    refuse(i, values)
                else:
                    pending.append((i, values))
            received.clear()
            if not pending:
                return
            try:
                refused = dict(self.store.record_telemetry_batch([m for _, m in pending]))
            except (OperationalError, PoolTimeout):
                log.exception("StreamTelemetry: storage unavailable")
                refused = {k: StorageUnavailable("storage unavailable; not stored, send it again later")
                           for k in range(len(pending))}
            for k, (i, _) in enumerate(pending):
                if k in refused:
                    refuse(i, refused[k])
                else:
                    accepted += 1

        try:
            for i, m in _paced(request_iterator, TELEMETRY_FLUSH_S):
                if m is None:  # the client paused: store what has come so far
                    flush()
                    continue
                if time.monotonic() - checked_at > TOKEN_RECHECK_S:  # a token revoked mid-stream stops it
                    self.store.principal(_bearer(context))
                    checked_at = time.monotonic()
                if isinstance(m, Malformed):  # one bad measurement does not cost the stream the rest
                    try:
                        m.check("measurement")
                    except VppError as error:
                        refuse(i, error)
                    continue
                try:
                    received.append((i, m.asset_id, measurement_values(m)))
                except VppError as error:
                    received.append((i, m.asset_id, error))
                if len(received) >= TELEMETRY_BATCH:
                    flush()
            flush()
        except TokenRejected as error:
            flush()  # what came before the revocation was sent with a valid token
            self.service.metrics.observe_rpc("StreamTelemetry", "UNAUTHENTICATED", time.perf_counter() - t0)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        except Exception as error:  # e.g. the store unavailable or busy while checking an asset: a defined code
            if isinstance(error, grpc.RpcError) or context.code() is not None:
                raise
            fail(error)
        self.service.metrics.observe_rpc("StreamTelemetry", "OK", time.perf_counter() - t0)
        errors.sort()
        return telemetry_pb2.TelemetrySummary(accepted=accepted, rejected=len(errors),
                                              errors=[line for _, line in errors[:100]])


def _bearer(context) -> str:
    for key, value in context.invocation_metadata():
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return ""


_END = object()


def _paced(iterator, pause_s: float):
    """(index, item) of ``iterator``, with (-1, None) whenever no item came for ``pause_s``.

    A helper thread reads the (blocking) request stream, so the caller can act on a pause;
    the queue between them is bounded, so a slow store slows the client down (flow
    control) instead of filling memory.  An error of the stream is raised here.
    """
    items: queue.Queue = queue.Queue(maxsize=4 * TELEMETRY_BATCH)
    done = threading.Event()

    def put(item) -> bool:
        while not done.is_set():
            try:
                items.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read():
        try:
            for item in iterator:
                if not put(item):
                    return
        except Exception as error:  # handed to the consumer
            put(error)
        put(_END)

    threading.Thread(target=read, name="telemetry-stream-reader", daemon=True).start()
    i = 0
    try:
        while True:
            try:
                item = items.get(timeout=pause_s)
            except queue.Empty:
                yield -1, None
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield i, item
            i += 1
    finally:
        done.set()  # the reader stops rather than wait on a queue nobody reads


def _setpoint_message(s, cycle_start=None) -> common_pb2.Setpoint:
    return common_pb2.Setpoint(asset_id=s.asset_id, p_kw=s.p_kw, q_kvar=s.q_kvar, valid_from=_ts(s.valid_from),
                               valid_until=_ts(s.valid_until), fallback=s.fallback,
                               cycle_start=_ts(cycle_start or s.valid_from))


class Dispatch(_Base, dispatch_pb2_grpc.DispatchServicer):
    @_rpc
    def GetSetpoint(self, request, context, principal):
        asset = self._own_asset(principal, request.asset_id)
        latest = self.store.latest_setpoints([asset.asset_id]).get(asset.asset_id)
        if latest is None:
            raise NotFoundError(f"no setpoint for asset {asset.asset_id!r} yet")
        return _setpoint_message(latest)

    def __init__(self, service):
        super().__init__(service)
        self._watching = 0
        self._lock = threading.Lock()
        self._batches: dict[tuple, tuple] = {}  # (id(outcome), scope) -> (outcome, SetpointBatch or None)
        self._building = threading.Lock()  # one batch built at a time, so each is built once

    def _visible(self, principal, asset_ids) -> set[str]:
        if principal.role == "operator":
            return set(asset_ids)
        if principal.role == "device":
            return {principal.asset_id} & set(asset_ids)
        own = {a.asset_id for a in self.store.iter_assets(tenant=principal.tenant, include_decommissioned=True)}
        return own & set(asset_ids)

    def _batch(self, principal, outcome):
        """The part of a cycle's setpoints this caller may see, as a SetpointBatch (None if empty).

        Built once per cycle and scope (all, a tenant, a device) and shared by every watcher
        of that scope: with a hundred watchers of 10,000 setpoints each, building it per
        watcher cost seconds of CPU per cycle.
        """
        scope = {"operator": ("*",), "device": ("device", principal.asset_id)}.get(principal.role,
                                                                                   ("tenant", principal.tenant))
        key = (id(outcome), scope)
        with self._lock:
            hit = self._batches.get(key)
        if hit is not None and hit[0] is outcome:
            return hit[1]
        # The watchers all wake on the same cycle: without this lock each of them missed the
        # cache and built the batch itself (a hundred listings of every asset at once).
        with self._building:
            with self._lock:
                hit = self._batches.get(key)
            if hit is not None and hit[0] is outcome:
                return hit[1]
            visible = self._visible(principal, [s.asset_id for s in outcome.setpoints])
            setpoints = [_setpoint_message(s, outcome.cycle_start) for s in outcome.setpoints if s.asset_id in visible]
            batch = (dispatch_pb2.SetpointBatch(site_id=outcome.site_id, cycle_start=_ts(outcome.cycle_start),
                                                setpoints=setpoints) if setpoints else None)
            with self._lock:
                if len(self._batches) >= WATCH_CACHE:
                    self._batches.pop(next(iter(self._batches)))  # the oldest entry
                self._batches[key] = (outcome, batch)  # holding the outcome keeps its id from being reused
        return batch

    @_rpc
    def WatchSetpoints(self, request, context, principal):
        if request.site_id:
            self._site(request.site_id)
        with self._lock:
            if self._watching >= MAX_WATCH_STREAMS:
                raise Busy(f"{MAX_WATCH_STREAMS} setpoint streams are open already; try again later")
            self._watching += 1
        q = self.service.engine.subscribe()
        checked_at = time.monotonic()
        try:
            while context.is_active():
                if time.monotonic() - checked_at > TOKEN_RECHECK_S:  # a revoked or expired token ends the stream
                    self.store.principal(_bearer(context))
                    checked_at = time.monotonic()
                try:
                    outcome = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if request.site_id and outcome.site_id != request.site_id:
                    continue
                batch = self._batch(principal, outcome)
                if batch is not None:
                    yield batch
        finally:
            self.service.engine.unsubscribe(q)
            with self._lock:
                self._watching -= 1

    @_rpc
    def GetPlan(self, request, context, principal):
        self._require(principal, "operator", "aggregator")
        self._site(request.site_id)
        latest = self.store.latest_plan(request.site_id)
        if latest is None:
            raise NotFoundError(f"no plan for site {request.site_id!r} yet")
        cycle, plan = latest
        p_kw = plan.get("p_kw", {})
        visible = self._visible(principal, list(p_kw))
        grid = plan.get("grid", {})
        steps = [dispatch_pb2.GridStep(time=_ts(datetime.fromisoformat(t)), max_loading_percent=grid["max_loading_percent"][k],
                                       vm_min_pu=grid["vm_min_pu"][k], vm_max_pu=grid["vm_max_pu"][k],
                                       p_import_kw=grid["p_import_kw"][k], violations=int(grid["violations"][k]))
                 for k, t in enumerate(grid.get("time", []))] if principal.role == "operator" else []
        message = dispatch_pb2.Plan(site_id=request.site_id, cycle_start=_ts(cycle.cycle_start),
                                    step_seconds=plan.get("step_seconds", 900.0),
                                    asset_plans=[dispatch_pb2.AssetPlan(asset_id=a, p_kw=v) for a, v in p_kw.items()
                                                 if a in visible],
                                    grid_steps=steps, status=OUTCOMES.get(cycle.status, 0), reason=cycle.reason or "")
        if cycle.objective_cny is not None and principal.role == "operator":
            message.objective_cny = cycle.objective_cny
        return message


def _limit_message(r) -> grid_operator_pb2.Limit:
    m = grid_operator_pb2.Limit(limit_id=str(r.limit_id), site_id=r.site_id, element=ELEMENT_ENUM[r.element],
                                element_name=r.element_name,
                                window=common_pb2.TimeWindow(start=_ts(r.start), end=_ts(r.end)),
                                create_time=_ts(r.create_time))
    if r.limit_kw is not None:
        m.limit_kw = r.limit_kw
    else:
        m.limit_percent = r.limit_percent
    if r.lifted_time is not None:
        m.lift_time.CopyFrom(_ts(r.lifted_time))
    return m


class GridOperator(_Base, grid_operator_pb2_grpc.GridOperatorServicer):
    @_rpc
    def SetLimit(self, request, context, principal):
        self._require(principal, "operator")
        site = self._site(request.site_id)
        grid = site.template.grid
        branches = {"transformer": [n for n, k in zip(grid.branch_names, grid.branch_kind) if k == "trafo"],
                    "line": [n for n, k in zip(grid.branch_names, grid.branch_kind) if k == "line"]}
        record = self.store.add_limit(request.site_id, created_by=principal.tenant, **limit_values(request, branches))
        return _limit_message(record)

    @_rpc
    def LiftLimit(self, request, context, principal):
        self._require(principal, "operator")
        return _limit_message(self.store.lift_limit(limit_id(request)))

    @_rpc
    def ListLimits(self, request, context, principal):
        self._require(principal, "operator")
        self._site(request.site_id)
        far = datetime(9999, 1, 1, tzinfo=timezone.utc)
        records = self.store.active_limits(request.site_id, self.service.engine.clock.now(), far)
        return grid_operator_pb2.ListLimitsResponse(limits=[_limit_message(r) for r in records])

    @_rpc
    def SubmitFlexRequest(self, request, context, principal):
        self._require(principal, "operator")
        if request.site_id:
            self._site(request.site_id)
        r = self.store.add_flex_request(request.site_id, created_by=principal.tenant, **flex_values(request))
        m = grid_operator_pb2.FlexRequest(request_id=str(r.request_id), site_id=r.site_id,
                                          window=common_pb2.TimeWindow(start=_ts(r.start), end=_ts(r.end)),
                                          priority=r.priority, create_time=_ts(r.create_time))
        for name in ("max_import_kw", "min_import_kw", "price_cny_per_kwh"):
            if getattr(r, name) is not None:
                setattr(m, name, getattr(r, name))
        return m

    @_rpc
    def GetFlexibilityEnvelope(self, request, context, principal):
        self._require(principal, "operator")
        site = self._site(request.site_id)
        envelope = self.service.envelope(site)
        if envelope is None:
            raise NotFoundError(f"site {request.site_id!r} has not planned yet")
        start, step_s, lo, hi = envelope
        steps = [grid_operator_pb2.EnvelopeStep(time=_ts(start + k * step_s), p_min_kw=float(lo[k]),
                                                p_max_kw=float(hi[k])) for k in range(len(lo))]
        return grid_operator_pb2.FlexibilityEnvelope(site_id=site.id, cycle_start=_ts(start),
                                                     step_seconds=step_s.total_seconds(), steps=steps)

    @_rpc
    def GetCycleStatus(self, request, context, principal):
        self._require(principal, "operator")
        self._site(request.site_id)
        cycles = []
        for c in self.store.last_cycles(request.site_id, limit=cycle_limit(request)):
            m = grid_operator_pb2.CycleStatus(site_id=c.site_id, cycle_start=_ts(c.cycle_start),
                                              solve_seconds=c.solve_s, total_seconds=c.total_s,
                                              violations_found=c.violations_found,
                                              violations_remaining=c.violations_remaining,
                                              outcome=OUTCOMES.get(c.status, 0), reason=c.reason or "")
            if c.objective_cny is not None:
                m.objective_cny = c.objective_cny
            cycles.append(m)
        return grid_operator_pb2.GetCycleStatusResponse(cycles=cycles)


SERVICES = (assets_pb2.DESCRIPTOR.services_by_name["AssetRegistry"],
            telemetry_pb2.DESCRIPTOR.services_by_name["Telemetry"],
            dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"],
            grid_operator_pb2.DESCRIPTOR.services_by_name["GridOperator"])


def _lenient(message_class):
    """A request deserializer that hands bytes which do not parse to the method as
    :class:`Malformed` (answered INVALID_ARGUMENT) instead of failing inside gRPC (INTERNAL)."""
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except (message.DecodeError, RecursionError, ValueError) as error:
            return Malformed(name, error)
    return deserialize


def _handlers(servicer, service) -> dict[str, grpc.RpcMethodHandler]:
    handlers = {}
    for method in service.methods:
        request = _lenient(message_factory.GetMessageClass(method.input_type))
        response = message_factory.GetMessageClass(method.output_type).SerializeToString
        shape = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming,
                                                                        method.server_streaming)]
        handlers[method.name] = shape(getattr(servicer, method.name), request_deserializer=request,
                                      response_serializer=response)
    return handlers


def add_services(server, service) -> list[str]:
    """Register the four services; return their full names (for health and reflection)."""
    servicers = (AssetRegistry(service), Telemetry(service), Dispatch(service), GridOperator(service))
    for servicer, descriptor in zip(servicers, SERVICES):
        handlers = _handlers(servicer, descriptor)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
        server.add_registered_method_handlers(descriptor.full_name, handlers)
    return [d.full_name for d in SERVICES]
