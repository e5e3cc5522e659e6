"""Planning horizons: uniform, and coarser further out."""

import numpy as np
import pytest

from vpp.assets import Horizon
from vpp.errors import SpecError


def test_resolution_blocks_cover_the_horizon():
    hz = Horizon.with_resolution(96, 0.25, [(2, 0.25), (6, 0.5), (24, 1.0)])
    assert hz.block_steps == (1,) * 8 + (2,) * 8 + (4,) * 18
    assert hz.n_steps == 34 and hz.n_base_steps == 96
    assert hz.step_h.sum() == pytest.approx(24.0)
    np.testing.assert_array_equal(hz.block_start[:10], [0, 1, 2, 3, 4, 5, 6, 7, 8, 10])
    # A last block longer than what is left is cut short; past the last block its step goes on.
    assert Horizon.with_resolution(10, 0.25, [(1, 0.25), (2, 1.0)]).block_steps == (1, 1, 1, 1, 4, 2)
    assert Horizon.with_resolution(12, 0.25, [(1, 0.5)]).block_steps == (2,) * 6
    assert Horizon.with_resolution(8, 0.25, []) == Horizon(8, 0.25)
    assert Horizon.with_resolution(8, 0.25, [(2, 0.25)]).uniform


def test_coarsen_and_expand():
    hz = Horizon.with_resolution(8, 0.25, [(0.5, 0.25), (2, 0.75)])
    assert hz.block_steps == (1, 1, 3, 3)
    x = np.arange(8.0)[None, :]
    np.testing.assert_allclose(hz.coarsen(x), [[0, 1, 3, 6]])
    np.testing.assert_allclose(hz.coarsen(x, "min"), [[0, 1, 2, 5]])
    np.testing.assert_allclose(hz.coarsen(x, "max"), [[0, 1, 4, 7]])
    np.testing.assert_allclose(hz.expand(np.array([1.0, 2, 3, 4])), [1, 2, 3, 3, 3, 4, 4, 4])
    # Energy over a block is kept: mean power times the block's hours.
    assert (hz.coarsen(x) * hz.step_h).sum() == pytest.approx(x.sum() * 0.25)


def test_carry_moves_values_to_the_new_steps():
    uniform = Horizon(5, 0.25)
    np.testing.assert_allclose(uniform.carry(np.arange(5.0), 2, 0.0), [2, 3, 4, 4, 4])
    np.testing.assert_allclose(uniform.carry(np.arange(5.0), None, -1.0), [-1] * 5)
    hz = Horizon.with_resolution(8, 0.25, [(0.5, 0.25), (2, 0.75)])  # starts 0, 1, 2, 5
    # One base step later the new steps start at old base steps 1, 2, 3 and 6.
    np.testing.assert_allclose(hz.carry(np.array([10.0, 11, 12, 13]), 1, 0.0), [11, 12, 12, 13])


def test_resolution_setting_is_validated(make_park):
    battery = {"id": "b", "kind": "battery", "bus": 1, "e_kwh": 100, "p_charge_max_kw": 50, "p_discharge_max_kw": 50}
    with pytest.raises(SpecError, match="horizon_resolution.*multiple of dt_h"):
        make_park([battery], dispatch={"horizon_resolution": [[2, 0.3]]})
    with pytest.raises(SpecError, match="horizon_resolution.*greater than the previous"):
        make_park([battery], dispatch={"horizon_resolution": [[2, 0.25], [2, 0.5]]})
    park = make_park([battery], dispatch={"horizon_resolution": [[2, 0.25], [24, 1.0]]})
    assert park.settings.horizon_resolution == [(2.0, 0.25), (24.0, 1.0)]
