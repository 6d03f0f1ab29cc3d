"""tokentrim: fused Triton kernels and a streamlined Wan2.1 autoregressive video rollout with
TokenTrim drift pruning (arXiv 2602.00268).

Public API (imported lazily so ``import tokentrim`` stays cheap):

- ops: ``drift_topk``, ``masked_attention``, ``compact_kv`` (see ``tokentrim.ops``)
- ``TokenTrimConfig``, ``TokenTrimController`` (the drift detector / pruning controller)
- ``KVCache`` (static KV cache for all layers)
- ``WanConfig``, ``WanModel``, ``load_wan`` (the causal Wan2.1 DiT and checkpoint loading)
- ``SelfForcingRollout``, ``RollingForcingRollout``, their configs, ``RolloutResult``, ``BlockOutput``
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "drift_topk": "tokentrim.ops",
    "masked_attention": "tokentrim.ops",
    "compact_kv": "tokentrim.ops",
    "TokenTrimConfig": "tokentrim.config",
    "TokenTrimController": "tokentrim.trim",
    "KVCache": "tokentrim.cache",
    "WanConfig": "tokentrim.model",
    "WanModel": "tokentrim.model",
    "load_wan": "tokentrim.model",
    "FlowSchedule": "tokentrim.rollout",
    "SelfForcingConfig": "tokentrim.rollout",
    "SelfForcingRollout": "tokentrim.rollout",
    "RollingForcingConfig": "tokentrim.rollout",
    "RollingForcingRollout": "tokentrim.rollout",
    "RolloutResult": "tokentrim.rollout",
    "BlockOutput": "tokentrim.rollout",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokentrim' has no attribute {name!r}")


def __dir__():
    return __all__
