"""Typed configs: coercion of CLI strings, unknown keys and range errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimtrain.registry import ConfigError, check_choice, check_range, parse_config
from slimtrain.registry.config import config_defaults


@dataclasses.dataclass(frozen=True)
class Cfg:
    rank: int = 4
    scale: float = 0.25
    exact: bool = False
    mode: str = "randomized"
    targets: tuple[str, ...] = ("wq", "wk")
    alpha: float | None = None

    def __post_init__(self):
        check_range("m", "rank", self.rank, low=1)
        check_range("m", "scale", self.scale, low=0.0, low_inclusive=False)
        check_choice("m", "mode", self.mode, ("randomized", "svd"))


def test_defaults():
    assert parse_config(Cfg, None, "m") == Cfg()
    assert config_defaults(Cfg)["targets"] == ("wq", "wk")


def test_cli_strings_are_coerced():
    cfg = parse_config(Cfg, {"rank": "64", "scale": "0.5", "exact": "true", "targets": "w1,w2", "alpha": "32"}, "m")
    assert cfg == Cfg(rank=64, scale=0.5, exact=True, targets=("w1", "w2"), alpha=32.0)


def test_toml_lists_are_tuples():
    assert parse_config(Cfg, {"targets": ["wq"]}, "m").targets == ("wq",)


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"rank": "x"}, "[m] rank = 'x': expected an integer"),
        ({"rank": 2.5}, "[m] rank = 2.5: expected an integer"),
        ({"exact": "maybe"}, "[m] exact = 'maybe': expected true or false"),
        ({"scale": 0}, "[m] scale = 0.0 is out of range; allowed: (0.0, inf)"),
        ({"mode": "qr"}, "[m] mode = 'qr' is not allowed; allowed values: 'randomized', 'svd'"),
        ({"rnak": 1}, "[m] unknown key 'rnak'; allowed keys: alpha, exact, mode, rank, scale, targets"),
    ],
)
def test_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(Cfg, raw, "m")
    assert needle in str(err.value)


@given(st.integers(min_value=-1000, max_value=1000))
def test_range_check_agrees_with_bounds(rank):
    if rank >= 1:
        assert parse_config(Cfg, {"rank": rank}, "m").rank == rank
    else:
        with pytest.raises(ConfigError, match=f"rank = {rank} is out of range"):
            parse_config(Cfg, {"rank": rank}, "m")
