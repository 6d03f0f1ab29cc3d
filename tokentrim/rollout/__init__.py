"""Flow-matching schedule and the Self Forcing / Rolling Forcing rollouts with TokenTrim.

- ``FlowSchedule``: shifted flow-matching timesteps, x0 from the predicted flow, re-noising.
- ``SelfForcingRollout`` / ``SelfForcingConfig``: block-causal AR rollout (REFERENCE.md section 3).
- ``RollingForcingRollout`` / ``RollingForcingConfig``: rolling-window rollout (section 4).
- ``RolloutResult`` (latents [B, F, C, H, W] f32 CPU, per-block records, timings) and
  ``BlockOutput`` (what ``iter_blocks`` streams).
"""

from tokentrim.rollout.common import BlockOutput, RolloutResult
from tokentrim.rollout.graphs import GraphRunner
from tokentrim.rollout.rolling_forcing import RollingForcingConfig, RollingForcingRollout
from tokentrim.rollout.schedule import FlowSchedule
from tokentrim.rollout.self_forcing import SelfForcingConfig, SelfForcingRollout

__all__ = [
    "BlockOutput",
    "FlowSchedule",
    "GraphRunner",
    "RollingForcingConfig",
    "RollingForcingRollout",
    "RolloutResult",
    "SelfForcingConfig",
    "SelfForcingRollout",
]
