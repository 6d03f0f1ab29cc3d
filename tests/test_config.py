"""TokenTrimConfig: defaults, validation, k_for, dict/JSON and CLI round trips, lazy WanConfig."""

import argparse
import dataclasses
import json
import re
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokentrim.config as config_mod
from tokentrim.config import FIELD_HELP, TokenTrimConfig

DESIGN_DEFAULTS = {  # DESIGN.md's controller table = the paper (REFERENCE.md section 1)
    "enabled": True, "ratio": 0.1, "lam": 2.0, "warmup": 2, "stats": "cumulative", "ema_decay": 0.9,
    "detect_step": 0, "max_regenerations": 1, "scope": "recent", "persist": True, "same_noise": True,
    "patch": (2, 2), "force": "auto", "min_sigma_ratio": 0.0,
}
# tokentrim's behaviour before the paper defaults: final-x0 candidate, sigma floor, previous block only
ROBUST = {**DESIGN_DEFAULTS, "detect_step": -1, "scope": "previous", "min_sigma_ratio": 0.05}


def test_defaults_match_design_table():
    cfg = TokenTrimConfig()
    assert dataclasses.asdict(cfg) == DESIGN_DEFAULTS
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TokenTrimConfig)}


def test_presets():
    assert TokenTrimConfig.preset() == TokenTrimConfig.preset("paper") == TokenTrimConfig()
    assert dataclasses.asdict(TokenTrimConfig.preset("robust")) == ROBUST
    assert TokenTrimConfig.preset("robust", lam=3.0) == TokenTrimConfig(**{**ROBUST, "lam": 3.0})
    assert tuple(config_mod.PRESETS) == ("paper", "robust")
    with pytest.raises(ValueError, match=r"unknown TokenTrimConfig preset 'fast'; expected one of \('paper', 'robust'\)"):
        TokenTrimConfig.preset("fast")
    with pytest.raises(ValueError, match="TokenTrimConfig.ratio"):
        TokenTrimConfig.preset("robust", ratio=2.0)


BAD_VALUES = [
    ("enabled", 1, TypeError), ("enabled", "yes", TypeError),
    ("ratio", 0.0, ValueError), ("ratio", 1.5, ValueError), ("ratio", -0.1, ValueError),
    ("ratio", float("nan"), ValueError), ("ratio", "0.1", TypeError), ("ratio", True, TypeError),
    ("lam", -1.0, ValueError), ("lam", float("inf"), ValueError), ("lam", float("nan"), ValueError),
    ("lam", None, TypeError),
    ("warmup", 0, ValueError), ("warmup", 2.0, TypeError), ("warmup", True, TypeError),
    ("stats", "median", ValueError), ("stats", None, ValueError),
    ("ema_decay", 0.0, ValueError), ("ema_decay", 1.0, ValueError), ("ema_decay", "x", TypeError),
    ("detect_step", 0.5, TypeError), ("detect_step", "final", TypeError),
    ("max_regenerations", -1, ValueError), ("max_regenerations", 1.0, TypeError),
    ("scope", "layer", ValueError),
    ("persist", None, TypeError), ("same_noise", 0, TypeError),
    ("patch", (2,), ValueError), ("patch", (0, 2), ValueError), ("patch", (2.0, 2), ValueError),
    ("patch", 2, ValueError), ("patch", (2, 2, 1), ValueError),
    ("force", "sometimes", ValueError),
    ("min_sigma_ratio", -0.01, ValueError), ("min_sigma_ratio", float("inf"), ValueError),
]


@pytest.mark.parametrize("name,value,exc", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_bad_field_raises_naming_field_and_value(name, value, exc):
    with pytest.raises(exc) as info:
        TokenTrimConfig(**{name: value})
    msg = str(info.value)
    assert f"TokenTrimConfig.{name}" in msg
    assert repr(value) in msg or repr(float(value)) in msg


def test_every_field_has_a_bad_value_tested():
    assert {n for n, _, _ in BAD_VALUES} == {f.name for f in dataclasses.fields(TokenTrimConfig)}


@pytest.mark.parametrize("name,allowed", [("stats", "('cumulative', 'ema')"), ("scope", "('recent', 'previous', 'all')"),
                                          ("force", "('auto', 'never', 'always')")])
def test_enum_error_lists_allowed_values(name, allowed):
    with pytest.raises(ValueError, match=re.escape(f"must be one of {allowed}, got 'bogus'")):
        TokenTrimConfig(**{name: "bogus"})


def test_valid_values_are_normalised():
    cfg = TokenTrimConfig(ratio=1, lam=0, patch=[1, 2], stats="ema", scope="all", force="never", detect_step=0)
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert cfg.lam == 0.0 and isinstance(cfg.lam, float)
    assert cfg.patch == (1, 2)


@pytest.mark.parametrize("ratio,n,k", [(0.1, 1560, 156), (0.1, 60, 6), (0.05, 60, 3), (0.001, 60, 1),
                                       (1.0, 7, 7), (0.25, 10, 3), (0.15, 10, 2), (0.5, 1, 1)])
def test_k_for(ratio, n, k):
    assert TokenTrimConfig(ratio=ratio).k_for(n) == k


@settings(max_examples=20, deadline=None)
@given(ratio=st.floats(min_value=1e-6, max_value=1.0), n=st.integers(min_value=1, max_value=10000))
def test_k_for_property(ratio, n):
    k = TokenTrimConfig(ratio=ratio).k_for(n)
    assert 1 <= k <= n
    assert k == 1 or abs(k - ratio * n) <= 0.5 + 1e-9


@pytest.mark.parametrize("n", [0, -3, 2.0, True])
def test_k_for_bad_input(n):
    with pytest.raises(ValueError, match="num_tokens"):
        TokenTrimConfig().k_for(n)


def test_resolve_detect_step():
    assert TokenTrimConfig(detect_step=-1).resolve_detect_step(4) == 3
    assert TokenTrimConfig(detect_step=0).resolve_detect_step(4) == 0
    assert TokenTrimConfig(detect_step=-4).resolve_detect_step(4) == 0
    for step in (4, -5):
        with pytest.raises(ValueError, match=f"detect_step.*got {step}"):
            TokenTrimConfig(detect_step=step).resolve_detect_step(4)


def test_dict_and_json_round_trip():
    cfg = TokenTrimConfig(enabled=False, ratio=0.2, lam=1.5, warmup=3, stats="ema", ema_decay=0.8, detect_step=0,
                          max_regenerations=2, scope="all", persist=False, same_noise=False, patch=(1, 2),
                          force="always", min_sigma_ratio=0.05)
    d = cfg.to_dict()
    assert d["patch"] == [1, 2]
    assert TokenTrimConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert TokenTrimConfig.from_dict({}) == TokenTrimConfig()
    assert TokenTrimConfig.from_dict({"lam": 3.0}).lam == 3.0


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown TokenTrimConfig field\(s\) \['lambda'\]"):
        TokenTrimConfig.from_dict({"lambda": 2.0})
    with pytest.raises(TypeError, match="expects a dict"):
        TokenTrimConfig.from_dict([("lam", 2.0)])


def _parser():
    parser = argparse.ArgumentParser(prog="t")
    parser.add_argument("--other", default=1)
    TokenTrimConfig.add_cli_arguments(parser)
    return parser


def test_cli_defaults_give_default_config():
    assert TokenTrimConfig.from_cli_args(_parser().parse_args([])) == TokenTrimConfig()


def test_cli_flags_set_every_field():
    args = _parser().parse_args([
        "--no-trim", "--trim-ratio", "0.2", "--trim-lam", "1.5", "--trim-warmup", "3", "--trim-stats", "ema",
        "--trim-ema-decay", "0.8", "--trim-detect-step", "0", "--trim-max-regenerations", "2",
        "--trim-scope", "all", "--no-trim-persist", "--no-trim-same-noise", "--trim-patch", "1", "2",
        "--trim-force", "never", "--trim-min-sigma-ratio", "0.05",
    ])
    cfg = TokenTrimConfig.from_cli_args(args)
    assert cfg == TokenTrimConfig(enabled=False, ratio=0.2, lam=1.5, warmup=3, stats="ema", ema_decay=0.8,
                                  detect_step=0, max_regenerations=2, scope="all", persist=False,
                                  same_noise=False, patch=(1, 2), force="never", min_sigma_ratio=0.05)
    assert TokenTrimConfig.from_cli_args(_parser().parse_args(["--trim", "--trim-persist"])).persist is True


def test_cli_rejects_bad_choice_and_bad_value(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--trim-stats", "median"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="TokenTrimConfig.ratio"):
        TokenTrimConfig.from_cli_args(_parser().parse_args(["--trim-ratio", "2"]))


def test_cli_help_text_from_field_table():
    parser = _parser()
    helps = {a.dest: a.help for a in parser._actions}
    for f in dataclasses.fields(TokenTrimConfig):
        dest = "trim" if f.name == "enabled" else "trim_" + f.name
        assert helps[dest].startswith(FIELD_HELP[f.name])


def test_cli_preset_and_overrides():
    parse = _parser().parse_args
    assert TokenTrimConfig.from_cli_args(parse(["--trim-preset", "robust"])) == TokenTrimConfig.preset("robust")
    # a flag given on top of a preset wins; flags left out keep the preset's value
    cfg = TokenTrimConfig.from_cli_args(parse(["--trim-preset", "robust", "--trim-detect-step", "0", "--trim-lam", "3"]))
    assert cfg == TokenTrimConfig.preset("robust", detect_step=0, lam=3.0)
    assert TokenTrimConfig.from_cli_args(parse(["--trim-min-sigma-ratio", "0.05"])) == TokenTrimConfig(min_sigma_ratio=0.05)
    assert TokenTrimConfig.from_cli_args(parse(["--trim-preset", "robust", "--no-trim-persist"])).persist is False
    with pytest.raises(SystemExit):
        parse(["--trim-preset", "fast"])
    helps = {a.dest: a.help for a in _parser()._actions}
    assert "paper 0, robust -1" in helps["trim_detect_step"] and "(default: 2.0)" in helps["trim_lam"]


def test_cli_custom_prefix_and_missing_args():
    parser = argparse.ArgumentParser()
    TokenTrimConfig.add_cli_arguments(parser, prefix="tt")
    assert TokenTrimConfig.from_cli_args(parser.parse_args(["--tt-lam", "3"]), prefix="tt").lam == 3.0
    with pytest.raises(ValueError, match="add_cli_arguments"):
        TokenTrimConfig.from_cli_args(argparse.Namespace())


def test_wanconfig_lazy_reexport(monkeypatch):
    fake = types.ModuleType("tokentrim.model.config")

    class WanConfig:
        pass

    fake.WanConfig = WanConfig
    monkeypatch.setitem(sys.modules, "tokentrim.model.config", fake)
    try:
        from tokentrim.config import WanConfig as imported

        assert imported is WanConfig
    finally:
        config_mod.__dict__.pop("WanConfig", None)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        config_mod.Nope  # noqa: B018



ASSIGNMENTS = [("ratio", 7.0, ValueError), ("lam", float("nan"), ValueError), ("stats", "nonsense", ValueError),
               ("patch", (0, 2), ValueError), ("warmup", 1.5, TypeError), ("enabled", "yes", TypeError)]


@pytest.mark.parametrize("name,value,exc", ASSIGNMENTS, ids=[f"{n}={v!r}" for n, v, _ in ASSIGNMENTS])
def test_assignment_is_validated_and_leaves_the_config_unchanged(name, value, exc):
    cfg = TokenTrimConfig()
    with pytest.raises(exc, match=rf"TokenTrimConfig\.{name}"):
        setattr(cfg, name, value)
    assert cfg == TokenTrimConfig()


def test_valid_assignment_is_normalised_and_replace_still_works():
    cfg = TokenTrimConfig()
    cfg.ratio = 1  # int -> float, as at construction
    cfg.patch = [1, 1]
    assert cfg.ratio == 1.0 and type(cfg.ratio) is float and cfg.patch == (1, 1)
    cfg.enabled = False
    other = dataclasses.replace(cfg, lam=3)
    assert other.lam == 3.0 and other.ratio == 1.0 and not other.enabled and cfg.lam == 2.0
    with pytest.raises(AttributeError, match="no field 'ratoi'"):
        cfg.ratoi = 0.2
    assert TokenTrimConfig.from_dict(cfg.to_dict()) == cfg
