"""launch.py's flags: the choices of the flags that name an implementation are the names that
the implementing packages register, ``--help`` lists them and argparse refuses others."""

from __future__ import annotations

import pytest

import launch
from engine.layers.backend import ATTENTION_BACKENDS
from engine.weights import LOAD_FORMATS
from kvtransfer import BACKENDS
from protocol.config import Mode
from scheduler_proc.policy import POLICIES
from tokenizer_proc.router import ROUTING_POLICIES

REGISTRIES = {
    "--schedule-policy": tuple(POLICIES),
    "--routing-policy": ROUTING_POLICIES,
    "--transfer-backend": tuple(BACKENDS),
    "--attention-backend": ATTENTION_BACKENDS,
    "--load-format": LOAD_FORMATS,
}


def test_flag_choices_come_from_the_registries():
    choices = launch.flag_choices()
    assert choices.schedule_policy == tuple(POLICIES) and choices.routing_policy == ROUTING_POLICIES
    assert choices.transfer_backend == tuple(BACKENDS) and choices.attention_backend == ATTENTION_BACKENDS
    assert choices.load_format == LOAD_FORMATS


def test_help_lists_every_choice(capsys):
    with pytest.raises(SystemExit) as done:
        launch.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag, names in REGISTRIES.items():
        assert f"{flag} {{{','.join(names)}}}" in text
    assert "--mode {unified,prefill,decode,frontend,pd}" in text


@pytest.mark.parametrize("flag", list(REGISTRIES))
def test_a_value_outside_the_registry_is_refused_by_argparse(flag, capsys):
    with pytest.raises(SystemExit) as done:
        launch.parse_args([flag, "no-such-thing"])
    assert done.value.code == 2
    assert f"argument {flag}: invalid choice: 'no-such-thing'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", list(REGISTRIES))
def test_every_registered_name_is_accepted(flag):
    field = flag[2:].replace("-", "_")
    for name in REGISTRIES[flag]:
        argv = [flag, name] + (["--model-path", "/m"] if (flag, name) == ("--load-format", "dummy") else [])
        _, args, _ = launch.parse_args(argv)
        assert getattr(args, field) == name


def test_the_mode_is_parsed_into_its_enum():
    mode, _, _ = launch.parse_args(["--mode", "pd", "--num-prefill", "2"])
    assert mode is Mode.PD
