"""Park files: validation errors name the field; the reference park loads and binds limits."""

import copy

import pytest

from conftest import REFERENCE_PARK, park_dict
from vpp.cli import main
from vpp.errors import SpecError
from vpp.site import load_park, parse_park

BATTERY = {"id": "b", "kind": "battery", "bus": "bus3", "e_kwh": 10, "p_charge_max_kw": 5, "p_discharge_max_kw": 5}


def error_of(data):
    with pytest.raises(SpecError) as error:
        parse_park(data)
    return error.value


@pytest.mark.parametrize("mutate,field,reason", [
    (lambda d: d["park"].pop("latitude_deg"), "park.latitude_deg", "required"),
    (lambda d: d["park"].update(timezone="Mars/Olympus"), "park.timezone", "unknown time zone"),
    (lambda d: d["connection"].update(import_limit_kw=-5), "connection.import_limit_kw", "greater than 0"),
    (lambda d: d["network"].update(benchmark="no_such_grid"), "network.benchmark", "unknown"),
    (lambda d: d["network"].update(file="x.json"), "network", "exactly one"),
    (lambda d: d["assets"][0].update(bus="bus99"), "assets[0].bus", "no bus"),
    (lambda d: d["assets"][0].update(e_kwh="ten"), "assets[0].e_kwh", "valid number"),
    (lambda d: d["assets"].append(dict(d["assets"][0])), "assets[1].id", "duplicate"),
    (lambda d: d["assets"][0].update(kind="flywheel"), "assets[0].kind", "unknown asset kind"),
    (lambda d: d["tariff"]["windows"].pop(0), "tariff", "cover the whole day"),
    (lambda d: d["tariff"]["windows"][0].update(band="super"), "tariff", "no price"),
    (lambda d: d["carbon"].update(intensity_kg_per_kwh=[0.5] * 23), "carbon.intensity_kg_per_kwh", "24 hourly"),
    (lambda d: d.update(extra_section={}), "extra_section", "unknown field"),
])
def test_malformed_park_names_the_field(mutate, field, reason):
    data = park_dict([copy.deepcopy(BATTERY)])
    mutate(data)
    error = error_of(data)
    assert error.field == field, str(error)
    assert reason in error.reason


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_park(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[park\nname=1")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_park(bad)


def test_cli_reports_a_malformed_park_in_one_line(tmp_path, capsys):
    text = REFERENCE_PARK.read_text().replace("e_kwh = 400", "e_kwh = -400")
    path = tmp_path / "park.toml"
    path.write_text(text)
    assert main(["dispatch", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vpp: error: assets[") and ".e_kwh: Input should be greater than 0" in err
    assert len(err.splitlines()) == 1


def test_reference_park_has_every_kind(reference_park):
    assert set(reference_park.fleets) == {"pv", "battery", "heat_pump", "charging_station", "load"}
    hub = reference_park.fleets["charging_station"].specs[0]
    assert {c.rating_kw for c in hub.chargers} == {480, 120, 7}
    assert reference_park.grid.n_buses >= 100
