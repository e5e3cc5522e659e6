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

Errors map to status codes in one place (:func:`_rpc`): a bad field is INVALID_ARGUMENT
naming it, unknown ids NOT_FOUND, a conflicting enrollment ALREADY_EXISTS, a missing or
wrong token UNAUTHENTICATED, a call outside the role or tenant PERMISSION_DENIED.  Any
other exception is logged and answered INTERNAL; the server keeps serving and nothing is
stored for a refused request.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import time
from datetime import datetime, timezone

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from sqlalchemy.exc import OperationalError

from vpp.errors import SpecError, UnknownAssetError, VppError
from vpp.service.store import ConflictError, NotFoundError
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


class Denied(VppError):
    """The caller's role or tenant does not allow this call."""


class Unauthenticated(VppError):
    pass


def _code_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    if isinstance(error, Denied):
        return grpc.StatusCode.PERMISSION_DENIED, str(error)
    if isinstance(error, SpecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, (UnknownAssetError, NotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, ConflictError):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, OperationalError):  # disk full, read-only or locked database, lost connection
        return grpc.StatusCode.UNAVAILABLE, "storage unavailable; nothing was written, try again later"
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
    if ts.seconds == 0 and ts.nanos == 0:
        if required:
            raise SpecError(field, "required timestamp is missing")
        return None
    try:
        return ts.ToDatetime(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise SpecError(field, "timestamp out of range") from None


def _finite(value: float, field: str, nonneg: bool = False) -> float:
    if not math.isfinite(value):
        raise SpecError(field, "must be a finite number")
    if nonneg and value < 0:
        raise SpecError(field, "must not be negative")
    return value


def _window(window, field: str) -> tuple[datetime, datetime]:
    start, end = _dt(window.start, f"{field}.start"), _dt(window.end, f"{field}.end")
    if end <= start:
        raise SpecError(f"{field}.end", "must be after start")
    return start, end


class _Base:
    def __init__(self, service):
        self.service = service
        self.store = service.store

    def _principal(self, context):
        token = ""
        for key, value in context.invocation_metadata():
            if key == "authorization" and value.lower().startswith("bearer "):
                token = value[7:].strip()
        if not token:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        principal = self.store.authenticate(token)
        if principal is None:
            raise Unauthenticated("invalid token")
        return principal

    @staticmethod
    def _require(principal, *roles: str) -> None:
        if principal.role not in roles:
            raise Denied(f"role {principal.role!r} may not make this call")

    def _own_asset(self, principal, asset_id: str, roles=("aggregator", "device", "operator")):
        """The asset record if the caller may touch it, else an error."""
        self._require(principal, *roles)
        if not asset_id:
            raise SpecError("asset_id", "required")
        asset = self.store.get_asset(asset_id)
        if principal.role == "device" and principal.asset_id != asset_id:
            raise Denied("a device token reads and reports only its own asset")
        if principal.role == "aggregator" and asset.tenant != principal.tenant:
            raise Denied(f"asset {asset_id!r} belongs to another tenant")
        return asset

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
        spec = json_format.MessageToDict(request.spec)
        site.validate_asset(KINDS[request.kind], request.bus, spec)
        record, created = self.store.enroll_asset(principal.tenant, request.site_id, request.external_id,
                                                  KINDS[request.kind], request.bus, spec)
        if created:
            self.service.refresh_asset_metrics()
        return _asset_message(record)

    @_rpc
    def GetAsset(self, request, context, principal):
        return _asset_message(self._own_asset(principal, request.asset_id, ("aggregator", "operator", "device")))

    @_rpc
    def ListAssets(self, request, context, principal):
        self._require(principal, "aggregator", "operator")
        tenant = principal.tenant if principal.role == "aggregator" else None
        kind = None
        if request.kind != common_pb2.ASSET_KIND_UNSPECIFIED:
            if request.kind not in KINDS:
                raise SpecError("kind", f"unknown kind {request.kind}")
            kind = KINDS[request.kind]
        records, token = self.store.list_assets(tenant=tenant, site_id=request.site_id or None, kind=kind,
                                                include_decommissioned=request.include_decommissioned,
                                                page_size=request.page_size or 100, page_token=request.page_token)
        return assets_pb2.ListAssetsResponse(assets=[_asset_message(a) for a in records], next_page_token=token)

    @_rpc
    def UpdateAsset(self, request, context, principal):
        asset = self._own_asset(principal, request.asset_id, ("aggregator",))
        spec = json_format.MessageToDict(request.spec)
        self._site(asset.site_id).validate_asset(asset.kind, asset.bus, spec)
        return _asset_message(self.store.update_asset(asset.asset_id, spec))

    @_rpc
    def DecommissionAsset(self, request, context, principal):
        asset = self._own_asset(principal, request.asset_id, ("aggregator",))
        record = self.store.decommission_asset(asset.asset_id)
        self.service.refresh_asset_metrics()
        return _asset_message(record)


class Telemetry(_Base, telemetry_pb2_grpc.TelemetryServicer):
    def _record(self, m, principal) -> None:
        self._own_asset(principal, m.asset_id, ("aggregator", "device"))
        when = _dt(m.time, "time")
        values = {"p_kw": _finite(m.p_kw, "p_kw"), "q_kvar": _finite(m.q_kvar, "q_kvar")}
        for name in ("e_kwh", "soc_frac", "e_th_kwh"):
            if m.HasField(name):
                values[name] = _finite(getattr(m, name), name, nonneg=name != "e_th_kwh")
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
                             "energy_kwh": _finite(s.energy_kwh, f"{where}.energy_kwh", True),
                             "max_kw": _finite(s.max_kw, f"{where}.max_kw", True) if s.HasField("max_kw") else None,
                             "delivered_kwh": _finite(s.delivered_kwh, f"{where}.delivered_kwh", True)})
        if sessions:
            values["ev_sessions"] = sessions
        self.store.record_telemetry(m.asset_id, when, values)

    @_rpc
    def ReportTelemetry(self, request, context, principal):
        self._record(request, principal)
        return telemetry_pb2.ReportTelemetryResponse()

    def StreamTelemetry(self, request_iterator, context):
        t0 = time.perf_counter()
        try:
            principal = self._principal(context)
        except VppError as error:
            code, message = _code_of(error)
            self.service.metrics.observe_rpc("StreamTelemetry", code.name, time.perf_counter() - t0)
            context.abort(code, message)
        accepted, errors = 0, []
        for i, m in enumerate(request_iterator):
            try:
                self._record(m, principal)
                accepted += 1
            except VppError as error:  # one bad measurement does not cost the stream the rest
                errors.append(f"measurement {i}: {error}")
            except Exception:
                log.exception("StreamTelemetry measurement %d failed", i)
                errors.append(f"measurement {i}: internal error")
        self.service.metrics.observe_rpc("StreamTelemetry", "OK", time.perf_counter() - t0)
        return telemetry_pb2.TelemetrySummary(accepted=accepted, rejected=len(errors), errors=errors[:100])


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

    def _visible(self, principal, asset_ids) -> set[str]:
        if principal.role == "operator":
            return set(asset_ids)
        if principal.role == "device":
            return {principal.asset_id} & set(asset_ids)
        own = {a.asset_id for a in self.store.iter_assets(tenant=principal.tenant, include_decommissioned=True)}
        return own & set(asset_ids)

    @_rpc
    def WatchSetpoints(self, request, context, principal):
        if request.site_id:
            self._site(request.site_id)
        q = self.service.engine.subscribe()
        try:
            while context.is_active():
                try:
                    outcome = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if request.site_id and outcome.site_id != request.site_id:
                    continue
                visible = self._visible(principal, [s.asset_id for s in outcome.setpoints])
                batch = [_setpoint_message(s, outcome.cycle_start) for s in outcome.setpoints if s.asset_id in visible]
                if batch:
                    yield dispatch_pb2.SetpointBatch(site_id=outcome.site_id, cycle_start=_ts(outcome.cycle_start),
                                                     setpoints=batch)
        finally:
            self.service.engine.unsubscribe(q)

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
        if request.element not in ELEMENTS:
            raise SpecError("element", "required: CONNECTION_IMPORT, CONNECTION_EXPORT, TRANSFORMER or LINE")
        element = ELEMENTS[request.element]
        start, end = _window(request.window, "window")
        which = request.WhichOneof("value")
        if which is None:
            raise SpecError("limit_kw", "give limit_kw or limit_percent")
        value = _finite(getattr(request, which), which, nonneg=True)
        if element.startswith("connection"):
            if which != "limit_kw":
                raise SpecError("limit_percent", "a connection limit is given in kW (limit_kw)")
        else:
            grid = site.template.grid
            kind = "trafo" if element == "transformer" else "line"
            names = [n for n, k in zip(grid.branch_names, grid.branch_kind) if k == kind]
            if request.element_name not in names:
                raise SpecError("element_name", f"no {element} named {request.element_name!r} at site "
                                                f"{request.site_id!r}; e.g. {names[:3]}")
        record = self.store.add_limit(request.site_id, element, request.element_name, start, end,
                                      limit_kw=value if which == "limit_kw" else None,
                                      limit_percent=value if which == "limit_percent" else None,
                                      created_by=principal.tenant)
        return _limit_message(record)

    @_rpc
    def LiftLimit(self, request, context, principal):
        self._require(principal, "operator")
        if not request.limit_id:
            raise SpecError("limit_id", "required")
        return _limit_message(self.store.lift_limit(request.limit_id))

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
        start, end = _window(request.window, "window")
        bounds = {}
        for name in ("max_import_kw", "min_import_kw", "price_cny_per_kwh"):
            if request.HasField(name):
                bounds[name] = _finite(getattr(request, name), name, nonneg=name == "price_cny_per_kwh")
        if "max_import_kw" not in bounds and "min_import_kw" not in bounds:
            raise SpecError("max_import_kw", "give max_import_kw, min_import_kw or both")
        if bounds.get("min_import_kw", -math.inf) > bounds.get("max_import_kw", math.inf):
            raise SpecError("min_import_kw", "must not exceed max_import_kw")
        r = self.store.add_flex_request(request.site_id, start, end, priority=request.priority,
                                        created_by=principal.tenant, **bounds)
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
        limit = request.limit or 10
        if not 1 <= limit <= 1000:
            raise SpecError("limit", "must lie in 1..1000")
        cycles = []
        for c in self.store.last_cycles(request.site_id, limit=limit):
            m = grid_operator_pb2.CycleStatus(site_id=c.site_id, cycle_start=_ts(c.cycle_start),
                                              solve_seconds=c.solve_s, total_seconds=c.total_s,
                                              violations_found=c.violations_found,
                                              violations_remaining=c.violations_remaining,
                                              outcome=OUTCOMES.get(c.status, 0), reason=c.reason or "")
            if c.objective_cny is not None:
                m.objective_cny = c.objective_cny
            cycles.append(m)
        return grid_operator_pb2.GetCycleStatusResponse(cycles=cycles)


def add_services(server, service) -> list[str]:
    """Register the four services; return their full names (for health and reflection)."""
    assets_pb2_grpc.add_AssetRegistryServicer_to_server(AssetRegistry(service), server)
    telemetry_pb2_grpc.add_TelemetryServicer_to_server(Telemetry(service), server)
    dispatch_pb2_grpc.add_DispatchServicer_to_server(Dispatch(service), server)
    grid_operator_pb2_grpc.add_GridOperatorServicer_to_server(GridOperator(service), server)
    return [d.full_name for d in (assets_pb2.DESCRIPTOR.services_by_name["AssetRegistry"],
                                  telemetry_pb2.DESCRIPTOR.services_by_name["Telemetry"],
                                  dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"],
                                  grid_operator_pb2.DESCRIPTOR.services_by_name["GridOperator"])]
