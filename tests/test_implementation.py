"""The implementation switches: one frozen settings object, active process-wide, swapped for a block."""
import dataclasses

import pytest

from ldm.implementation import OURS, REFERENCE, Implementation, current, using


def test_using_swaps_the_active_settings_for_a_block_and_restores_them():
    assert current() is OURS
    lean_off = Implementation(lean_conv=False)
    with using(REFERENCE):
        with using(lean_off):
            assert current() is lean_off
        assert current() is REFERENCE
    assert current() is OURS
    with pytest.raises(RuntimeError), using(REFERENCE):
        raise RuntimeError
    assert current() is OURS
    with pytest.raises(TypeError, match="takes an Implementation"), using(False):
        pass
    assert current() is OURS


def test_ours_turns_every_switch_on_and_the_reference_every_switch_off():
    for field in dataclasses.fields(Implementation):
        assert getattr(OURS, field.name) is True and getattr(REFERENCE, field.name) is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        OURS.sdpa = False
