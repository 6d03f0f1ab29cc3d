"""The causal Wan2.1 DiT and its checkpoint loading."""

from tokentrim.model.config import WanConfig
from tokentrim.model.load import (
           checkpoint_config,
           checkpoint_config_file,
           diffusers_to_wan_state_dict,
           load_wan,
)
from tokentrim.model.wan import TextContext, WanModel, block_causal_frame_mask

__all__ = ["TextContext", "WanConfig", "WanModel", "block_causal_frame_mask", "checkpoint_config",
           "checkpoint_config_file", "diffusers_to_wan_state_dict", "load_wan"]
