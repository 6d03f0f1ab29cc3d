"""Configuration dataclasses: ``TokenTrimConfig`` (here) and ``WanConfig`` (re-exported lazily from
``tokentrim.model.config``).

``TokenTrimConfig`` holds every TokenTrim setting with the defaults of DESIGN.md, validated on
construction. It converts to/from plain dicts (JSON) and to/from command-line flags, so the
rollout and generate commands expose the same settings with the same help text::

    parser = argparse.ArgumentParser()
    TokenTrimConfig.add_cli_arguments(parser)       # --trim/--no-trim, --trim-ratio, ...
    cfg = TokenTrimConfig.from_cli_args(parser.parse_args())

Named presets (``TokenTrimConfig.preset(name)``, ``--trim-preset`` on the command line):

- ``"paper"`` (the defaults): what the paper's text states (REFERENCE.md section 1): candidate = the
  x0 of the FIRST denoising step, compared with the previous accepted block's x0 at that same
  step; the plain rule mu + lam*sigma; the S_t positions masked in every cached non-sink frame.
- ``"robust"``: tokentrim's behaviour before the paper defaults: candidate = the final x0
  (compared with the previous block's final x0), sigma floored at 5% of mu, only the previous
  block's frames masked.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any

STATS_MODES = ("cumulative", "ema")
SCOPES = ("recent", "previous", "all")  # "all": the older name of "recent"
FORCE_MODES = ("auto", "never", "always")

# Named presets: field values over the dataclass defaults (which are "paper").
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "robust": {"detect_step": -1, "scope": "previous", "min_sigma_ratio": 0.05},
}

# One help line per field: used for the CLI flags and kept next to the defaults table of DESIGN.md.
FIELD_HELP: dict[str, str] = {
    "enabled": "apply TokenTrim drift detection and pruning",
    "ratio": "fraction p of the N tokens per frame in the unstable set: k = max(1, round(p*N))",
    "lam": "prune when the drift severity exceeds mu + lam*sigma of the accepted blocks",
    "warmup": "accepted blocks per video recorded into the statistics before any decision",
    "stats": "running statistics of accepted severities: cumulative (Welford) or ema",
    "ema_decay": "weight of the past in the ema statistics (0 < decay < 1)",
    "detect_step": "denoising step whose x0 prediction is the candidate, compared with the previous accepted "
                   "block's x0 at the same step (0 = first, the paper; -1 = final)",
    "max_regenerations": "regenerations per block; the last regenerated batch is accepted",
    "scope": "cached frames masked on prune: recent = every cached non-sink frame (the paper), previous = "
             "the previous block only (all = recent)",
    "persist": "pruned cache entries stay pruned for later blocks",
    "same_noise": "a regeneration reuses the block's noise (only the cache changes)",
    "patch": "token patch (ph, pw) of the drift summary: the model's spatial patch size",
    "min_sigma_ratio": "sigma in the threshold is at least this fraction of mu (0 = the paper's rule)",
    "force": "auto = prune on detection; never = detect but never prune; always = prune every block after warm-up",
}

# CLI flag name per field (without the leading dashes); the dest is the flag with '-' -> '_'.
_CLI_FLAG = {"enabled": "trim"}


def _flag(name: str, prefix: str) -> str:
    return _CLI_FLAG.get(name, f"{prefix}-{name.replace('_', '-')}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class TokenTrimConfig:
    """TokenTrim settings (REFERENCE.md section 1; defaults = the ``"paper"`` preset, DESIGN.md's table).

    ``enabled``, ``detect_step``, ``max_regenerations``, ``scope``, ``persist`` and ``same_noise``
    are read by the rollout; ``ratio``, ``lam``, ``warmup``, ``stats``, ``ema_decay``, ``patch``,
    ``force`` and ``min_sigma_ratio`` by ``TokenTrimController``.

    ``min_sigma_ratio`` (not in the paper): the threshold is mu + lam * max(sigma, min_sigma_ratio *
    |mu|). 0 (default) is the paper's rule mu + lam * sigma. With warmup=2, sigma comes from very
    few blocks and the plain rule pruned at least once in 26 of 40 seeds of a smooth synthetic
    sequence (8% of decided blocks, every one a needless regeneration); the ``"robust"`` preset's
    0.05 floor gave 0 of 40 and still catches corrupted blocks (``bench/bench_detect.py``
    measures both presets).

    ``detect_step``: the candidate is the x0 prediction of that denoising step (Self Forcing) or
    noise level (Rolling Forcing), and the previous accepted block's summary is taken at the same
    step, so like is compared with like; -1 (the final x0 of both blocks) is the final-x0
    comparison. With 0 a flagged block costs one forward before its regeneration, not a block.

    Invalid values raise ``ValueError`` (range, unknown choice) or ``TypeError`` (wrong type)
    naming the field, the allowed values and the value given, at construction and on assignment
    (``cfg.ratio = 7.0`` raises and leaves ``cfg`` unchanged; the checks live in ``__post_init__``
    only: an assignment validates a ``dataclasses.replace`` copy). Assigning a name that is not a
    field raises ``AttributeError``.
    """

    enabled: bool = True
    ratio: float = 0.1
    lam: float = 2.0
    warmup: int = 2
    stats: str = "cumulative"
    ema_decay: float = 0.9
    detect_step: int = 0
    max_regenerations: int = 1
    scope: str = "recent"
    persist: bool = True
    same_noise: bool = True
    patch: tuple[int, int] = field(default=(2, 2))
    force: str = "auto"
    min_sigma_ratio: float = 0.0

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_validated"):  # after __init__: check through a validated copy
            if name not in _FIELD_NAMES:
                raise AttributeError(f"TokenTrimConfig has no field {name!r}; fields: {sorted(_FIELD_NAMES)}")
            value = getattr(dataclasses.replace(self, **{name: value}), name)  # raises on a bad value
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self._check()
        object.__setattr__(self, "_validated", True)

    def _check(self) -> None:
        """Validate and normalise every field (the one place the rules live)."""
        for name in ("enabled", "persist", "same_noise"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"TokenTrimConfig.{name} must be a bool (True or False), got {value!r}")
        for name in ("ratio", "lam", "ema_decay", "min_sigma_ratio"):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(f"TokenTrimConfig.{name} must be a real number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("warmup", "detect_step", "max_regenerations"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"TokenTrimConfig.{name} must be an int, got {value!r}")
        if not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"TokenTrimConfig.ratio must be in (0, 1], got {self.ratio!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0.0):
            raise ValueError(f"TokenTrimConfig.lam must be finite and >= 0, got {self.lam!r}")
        if not (math.isfinite(self.min_sigma_ratio) and self.min_sigma_ratio >= 0.0):
            raise ValueError(f"TokenTrimConfig.min_sigma_ratio must be finite and >= 0, got {self.min_sigma_ratio!r}")
        if self.warmup < 1:
            raise ValueError(f"TokenTrimConfig.warmup must be >= 1, got {self.warmup!r}")
        if not (0.0 < self.ema_decay < 1.0):
            raise ValueError(f"TokenTrimConfig.ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.max_regenerations < 0:
            raise ValueError(f"TokenTrimConfig.max_regenerations must be >= 0, got {self.max_regenerations!r}")
        for name, allowed in (("stats", STATS_MODES), ("scope", SCOPES), ("force", FORCE_MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"TokenTrimConfig.{name} must be one of {allowed}, got {value!r}")
        patch = self.patch
        if not (isinstance(patch, (tuple, list)) and len(patch) == 2 and all(_is_int(p) and p >= 1 for p in patch)):
            raise ValueError(f"TokenTrimConfig.patch must be a pair of positive ints (ph, pw), got {patch!r}")
        self.patch = (int(patch[0]), int(patch[1]))

    # ------------------------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str = "paper", **overrides) -> TokenTrimConfig:
        """The named preset (``PRESETS``: "paper" = the defaults, "robust" = final-x0 candidate, sigma
        floor 0.05, previous-block scope), with ``overrides`` (field=value) applied on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown TokenTrimConfig preset {name!r}; expected one of {tuple(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------------------------ helpers
    def k_for(self, num_tokens: int) -> int:
        """Size of the unstable set for ``num_tokens`` tokens per frame: max(1, round(ratio*N)).

        Rounds half up (not Python's half-to-even) so e.g. ratio 0.25 of N = 10 gives 3, not 2.
        """
        if not _is_int(num_tokens) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        return min(num_tokens, max(1, math.floor(self.ratio * num_tokens + 0.5)))

    def resolve_detect_step(self, num_steps: int) -> int:
        """``detect_step`` as an index in [0, num_steps) (negative counts from the end, like Python)."""
        if not _is_int(num_steps) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        step = self.detect_step + num_steps if self.detect_step < 0 else self.detect_step
        if not 0 <= step < num_steps:
            raise ValueError(
                f"TokenTrimConfig.detect_step must be in [-{num_steps}, {num_steps}) for {num_steps} "
                f"denoising steps, got {self.detect_step}"
            )
        return step

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field (patch as a list)."""
        d = dataclasses.asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenTrimConfig:
        """Inverse of ``to_dict``; missing keys take their defaults, unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise TypeError(f"TokenTrimConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TokenTrimConfig field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("patch"), list):
            d["patch"] = tuple(d["patch"])
        return cls(**d)

    # ---------------------------------------------------------------------------------------- CLI
    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser, prefix: str = "trim") -> argparse._ArgumentGroup:
        """Add ``--{prefix}-preset`` and one flag per field to ``parser`` (in an argument group); returns the group.

        Flags: ``--{prefix}-preset {paper,robust}``, ``--trim/--no-trim`` (enabled),
        ``--{prefix}-ratio``, ..., booleans as ``--{prefix}-persist/--no-{prefix}-persist``, enums with
        ``choices``, ``--{prefix}-patch PH PW``. A field whose value differs between presets has the
        argparse default None (= not given: ``from_cli_args`` takes the preset's value); the others
        have their common value as the default, so ``args.trim`` etc. stay plain values.
        """
        group = parser.add_argument_group("TokenTrim", "drift detection and KV-cache pruning")
        group.add_argument(f"--{prefix}-preset", choices=tuple(PRESETS), default="paper",
                           help=f"named TokenTrim settings the other --{prefix}-* flags override: paper = the "
                                "paper's rule (first-step candidate, no sigma floor, recent-context scope), robust = "
                                "final-x0 candidate, sigma floor 0.05, previous-block scope (default: paper)")
        presets = {name: cls.preset(name) for name in PRESETS}
        for f in dataclasses.fields(cls):
            flag = "--" + _flag(f.name, prefix)
            values = {name: getattr(p, f.name) for name, p in presets.items()}
            default = values["paper"]
            shown = {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}
            if len({repr(v) for v in shown.values()}) == 1:
                help_text = f"{FIELD_HELP[f.name]} (default: {shown['paper']})"
                arg_default = list(default) if f.name == "patch" else default  # same in every preset
            else:
                help_text = f"{FIELD_HELP[f.name]} (default: the preset's: " + ", ".join(
                    f"{name} {v}" for name, v in shown.items()) + ")"
                arg_default = None  # None = not given: from_cli_args takes the preset's value
            if f.name == "patch":
                group.add_argument(flag, type=int, nargs=2, metavar=("PH", "PW"), default=arg_default, help=help_text)
            elif isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=arg_default, help=help_text)
            elif f.name in ("stats", "scope", "force"):
                choices = {"stats": STATS_MODES, "scope": SCOPES, "force": FORCE_MODES}[f.name]
                group.add_argument(flag, choices=choices, default=arg_default, help=help_text)
            else:
                group.add_argument(flag, type=type(default), default=arg_default, help=help_text)
        return group

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, prefix: str = "trim") -> TokenTrimConfig:
        """Build the config from a namespace parsed with a parser set up by ``add_cli_arguments``:
        the ``--{prefix}-preset`` preset ("paper" if absent), with every flag given on top."""
        values = {}
        for f in dataclasses.fields(cls):
            dest = _flag(f.name, prefix).replace("-", "_")
            if not hasattr(args, dest):
                raise ValueError(f"args has no attribute {dest!r}: call TokenTrimConfig.add_cli_arguments(parser) first")
            if getattr(args, dest) is not None:
                values[f.name] = getattr(args, dest)
        if "patch" in values:
            values["patch"] = tuple(values["patch"])
        return cls.preset(getattr(args, f"{prefix}_preset", None) or "paper", **values)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TokenTrimConfig))


def __getattr__(name):
    # WanConfig lives with the model (tokentrim/model/config.py); imported on first use so that
    # importing TokenTrimConfig never pulls the model code in.
    if name == "WanConfig":
        value = importlib.import_module("tokentrim.model.config").WanConfig
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokentrim.config' has no attribute {name!r}")
