"""Fixtures: tiny parks built from dictionaries, and the reference park."""

from __future__ import annotations

import copy
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vpp.site import load_park, parse_park

REFERENCE_PARK = Path(__file__).resolve().parents[1] / "sim" / "scenarios" / "changping_science_park.toml"

FLAT_TARIFF = {
    "band_price_cny_per_kwh": {"valley": 0.3, "flat": 0.7, "peak": 1.2},
    "windows": [
        {"start": "00:00", "end": "08:00", "band": "valley"},
        {"start": "08:00", "end": "17:00", "band": "flat"},
        {"start": "17:00", "end": "21:00", "band": "peak"},
        {"start": "21:00", "end": "24:00", "band": "flat"},
    ],
    "export_price_cny_per_kwh": 0.2,
    "demand_charge_cny_per_kw_month": 0.0,
}


def park_dict(assets, **sections):
    """A small park on pandapower's 6-bus 10/0.4 kV `panda_four_load_branch` feeder."""
    data = {
        "park": {"name": "test park", "latitude_deg": 40.2, "longitude_deg": 116.2, "timezone": "Asia/Shanghai"},
        "network": {"benchmark": "panda_four_load_branch", "drop_elements": True},
        "connection": {"import_limit_kw": 500, "export_limit_kw": 500},
        "tariff": copy.deepcopy(FLAT_TARIFF),
        "carbon": {"intensity_kg_per_kwh": 0.6, "price_cny_per_t": 0.0},
        "dispatch": {"horizon_steps": 96, "dt_h": 0.25},
        "assets": assets,
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


@pytest.fixture
def make_park():
    def build(assets, **sections):
        return parse_park(park_dict(assets, **sections))

    return build


@pytest.fixture(scope="session")
def reference_park():
    return load_park(REFERENCE_PARK)


def reference_park_with(**dispatch):
    """The reference park with some ``[dispatch]`` settings overridden."""
    return load_park(REFERENCE_PARK, dispatch)


@pytest.fixture(scope="session")
def reference_park_uniform():
    """The reference park planned in 15-minute steps over the whole horizon (the exact LP
    its coarse-horizon configuration approximates)."""
    return reference_park_with(horizon_resolution=[])


def day_index(n_steps=96, start="2025-01-15", tz="Asia/Shanghai"):
    return pd.date_range(pd.Timestamp(start, tz=tz), periods=n_steps, freq="15min")


def office_load_kw(index, peak_kw=100.0):
    """A simple deterministic day shape: 30 % at night, full 08-18 local."""
    hours = index.hour + index.minute / 60
    return np.where((hours >= 8) & (hours < 18), peak_kw, 0.3 * peak_kw)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on a Unix socket: {"host": socket dir, "port": port}."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL tests: no initdb/pg_ctl on PATH")
    try:
        import psycopg
    except ImportError:
        pytest.skip("PostgreSQL tests: the psycopg driver is not installed (pip install 'psycopg[binary]')")
    root = Path(tempfile.mkdtemp(prefix="vpp-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("PostgreSQL tests: running as root and there is no 'postgres' user to run the server")
        if not shutil.which("runuser"):
            shutil.rmtree(root)
            pytest.skip("PostgreSQL tests: running as root and no runuser to drop privileges")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", 5432  # the socket lives in root: no TCP port is opened

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(as_user + list(args), capture_output=True, text=True, timeout=120)

    done = run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
    if done.returncode:
        shutil.rmtree(root)
        pytest.skip(f"PostgreSQL tests: initdb failed: {done.stderr.strip()[-300:]}")
    done = run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
               f"-k {root} -p {port} -c listen_addresses='' -c fsync=off", "start")
    if done.returncode:
        log = (root / "server.log").read_text()[-300:] if (root / "server.log").exists() else done.stderr
        shutil.rmtree(root)
        pytest.skip(f"PostgreSQL tests: the server did not start: {log.strip()}")
    try:
        with psycopg.connect(host=str(root), port=port, user="postgres", dbname="postgres"):
            pass
        yield {"host": str(root), "port": port}
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the throwaway PostgreSQL server, as an SQLAlchemy URL."""
    import uuid

    import psycopg

    name = f"vpp_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=postgres_server["host"], port=postgres_server["port"], user="postgres",
                         dbname="postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@/{name}?host={postgres_server['host']}&port={postgres_server['port']}"


@pytest.fixture(scope="module")
def service(tmp_path_factory, request):
    """A running service on its own data folder, shared by one test module's tests."""
    from test_service import make_service

    s = make_service(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def agg(service):
    """A client with the service's aggregator token."""
    from test_service import tokens
    from vpp.client import Client

    with Client(f"127.0.0.1:{service.port}", tokens(service)["aggregator"]) as client:
        yield client
