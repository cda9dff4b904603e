"""The fault-injection setting: parsed once, unknown or malformed faults refused by name."""

from __future__ import annotations

import pytest

from protocol.faults import FAULTS_ENV, Faults, FaultsError


def test_no_setting_means_no_fault() -> None:
    assert Faults.from_env({}) == Faults() == Faults.parse(" , ")
    assert Faults().to_setting() == ""


def test_a_known_fault_is_parsed_and_round_trips() -> None:
    faults = Faults.from_env({FAULTS_ENV: " kv_send_delay_s = 0.4 "})
    assert faults.kv_send_delay_s == 0.4
    assert Faults.parse(faults.to_setting()) == faults


def test_step_faults_are_parsed_and_round_trip() -> None:
    faults = Faults.parse("step_delay_s=2.5,step_delay_at_step=4,forward_error_at_step=7")
    assert (faults.step_delay_s, faults.step_delay_at_step, faults.forward_error_at_step) == (2.5, 4, 7)
    assert Faults.parse(faults.to_setting()) == faults
    assert Faults().forward_error_at_step is None


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("kv_send_dealy_s=1", "unknown fault 'kv_send_dealy_s'; known: kv_send_delay_s"),
        ("kv_send_delay_s", "is not key=value"),
        ("kv_send_delay_s=soon", "needs a float"),
        ("kv_send_delay_s=-1", "must be ≥ 0"),
        ("kv_send_delay_s=1,kv_send_delay_s=2", "given twice"),
        ("step_delay_s=-0.5", "step_delay_s must be ≥ 0"),
        ("forward_error_at_step=-1", "forward_error_at_step must be ≥ 0"),
        ("step_delay_at_step=1.5", "needs a int"),
    ],
)
def test_a_bad_setting_is_refused_naming_what_is_wrong(setting: str, needle: str) -> None:
    with pytest.raises(FaultsError, match=needle):
        Faults.parse(setting)
