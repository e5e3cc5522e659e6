"""What bench/bench_load.py found at 10,000 assets and 100 watchers (docs/reliability.md).

- The watchers all wake on the same cycle; each missed the shared batch cache and listed
  every asset of its tenant itself, a hundred listings at once.  The batch is now built once.
- Those listings held every database connection of the pool; calls waiting longer than the
  pool's timeout answered INTERNAL (unary calls) or UNKNOWN (StreamTelemetry, whose errors
  were not mapped at all).  A busy pool now answers UNAVAILABLE, and StreamTelemetry maps
  every error to a defined code.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeout

from test_service import BATTERY, START, bus_of, code_of, tokens
from vpp.client import timestamp
from vpp.service.api import Dispatch
from vpp.v1 import telemetry_pb2

UTC = timezone.utc


def test_watchers_of_one_cycle_build_its_batch_once(service, agg, monkeypatch):
    agg.enroll("changping", "bess-watch-once", "battery", bus_of(service), BATTERY)
    outcome = service.engine.run_cycle(datetime(2025, 1, 15, 2, 0, tzinfo=UTC))[0]
    principal = service.store.principal(tokens(service)["aggregator"])
    dispatch = Dispatch(service)
    listings = []
    real = service.store.iter_assets

    def counted(*args, **kwargs):
        listings.append(threading.current_thread().name)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(service.store, "iter_assets", counted)
    start = threading.Barrier(50)
    batches = [None] * 50

    def watcher(k):
        start.wait()
        batches[k] = dispatch._batch(principal, outcome)

    threads = [threading.Thread(target=watcher, args=(k,)) for k in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(listings) == 1
    assert batches[0] is not None and all(b is batches[0] for b in batches)
    assert len(batches[0].setpoints) == len(outcome.setpoints)  # the aggregator's tenant owns the park


def _busy(*args, **kwargs):
    raise PoolTimeout("QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00")


def test_a_busy_connection_pool_answers_unavailable_on_unary_calls(service, agg, monkeypatch):
    a = agg.enroll("changping", "bess-busy-unary", "battery", bus_of(service), BATTERY)
    monkeypatch.setattr(service.store, "get_asset", _busy)
    code, details = code_of(lambda: agg.report(a.asset_id, START, 1.0, soc_frac=0.5))
    assert code == grpc.StatusCode.UNAVAILABLE and "busy" in details


@pytest.mark.parametrize("where", ["principal", "asset_tenants", "record_telemetry_batch"])
def test_a_busy_connection_pool_answers_unavailable_on_telemetry_streams(service, agg, monkeypatch, where):
    a = agg.enroll("changping", f"bess-busy-stream-{where}", "battery", bus_of(service), BATTERY)
    monkeypatch.setattr(service.store, where, _busy)
    messages = [telemetry_pb2.Measurement(asset_id=a.asset_id, time=timestamp(START + timedelta(seconds=k)), p_kw=1.0)
                for k in range(3)]
    if where == "record_telemetry_batch":
        # Checked and then not stored: each measurement is refused as unavailable, none acknowledged.
        summary = agg.telemetry.StreamTelemetry(iter(messages), metadata=agg.metadata, timeout=30)
        assert summary.accepted == 0 and summary.rejected == 3
        assert all("UNAVAILABLE" in e for e in summary.errors)
    else:
        with pytest.raises(grpc.RpcError) as error:
            agg.telemetry.StreamTelemetry(iter(messages), metadata=agg.metadata, timeout=30)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
    monkeypatch.undo()
    assert service.store.latest_telemetry([a.asset_id]) == {}  # nothing stored by the refused call
    # The store back: the same stream is stored.
    summary = agg.telemetry.StreamTelemetry(iter(messages), metadata=agg.metadata, timeout=30)
    assert summary.accepted == 3


def test_a_telemetry_stream_checks_its_assets_with_one_lookup_and_the_same_answers(service, agg, monkeypatch):
    """Each measurement of a stream used to look its asset up on its own (500 queries for
    a stream of 500); now one lookup per stored batch, with ReportTelemetry's answers."""
    mine = agg.enroll("changping", "bess-stream-batch", "battery", bus_of(service), BATTERY)
    theirs, _ = service.store.enroll_asset("other-tenant", "changping", "bess-theirs", "battery", bus_of(service),
                                           BATTERY)
    lookups = []
    real = service.store.asset_tenants
    monkeypatch.setattr(service.store, "asset_tenants", lambda ids: lookups.append(list(ids)) or real(ids))
    monkeypatch.setattr(service.store, "get_asset", _busy)  # not used per measurement any more
    when = timestamp(START + timedelta(minutes=1))
    sent = [(mine.asset_id, 1.0), (theirs.asset_id, 1.0), ("0" * 32, 1.0), (mine.asset_id, float("nan")),
            (theirs.asset_id, float("nan")), ("", 1.0), (mine.asset_id, 2.0)]
    summary = agg.telemetry.StreamTelemetry(
        iter(telemetry_pb2.Measurement(asset_id=a, time=when, p_kw=p) for a, p in sent), metadata=agg.metadata,
        timeout=30)
    assert summary.accepted == 2 and summary.rejected == 5
    codes = [e.split(":")[:2] for e in summary.errors]
    assert codes == [["measurement 1", " PERMISSION_DENIED"], ["measurement 2", " NOT_FOUND"],
                     ["measurement 3", " INVALID_ARGUMENT"],
                     ["measurement 4", " PERMISSION_DENIED"],  # another tenant's asset: its values are not looked at
                     ["measurement 5", " INVALID_ARGUMENT"]]
    assert len(lookups) == 1 and set(lookups[0]) == {mine.asset_id, theirs.asset_id, "0" * 32}
    monkeypatch.undo()
    assert service.store.latest_telemetry([theirs.asset_id]) == {}
    assert service.store.latest_telemetry([mine.asset_id])[mine.asset_id][1]["p_kw"] == 2.0
