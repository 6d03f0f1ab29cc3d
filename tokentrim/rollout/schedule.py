"""Flow-matching schedule with timestep shift (Wan2.1 / Self Forcing / Rolling Forcing).

The model predicts the flow ``v = noise - x0`` at a noise level ``sigma`` where
``x_t = (1 - sigma) * x0 + sigma * noise`` and the timestep fed to the model is ``t = 1000 * sigma``.

Warping (REFERENCE.md section 3): the base sigmas are ``linspace(1, 0, 1001)[:-1]``, shifted to
``s*sigma / (1 + (s-1)*sigma)``; a nominal step ``k`` in 0..1000 maps to entry ``1000 - k`` of the
shifted timesteps with a 0 appended (so nominal 0 -> timestep 0).

Upstream fidelity (Self-Forcing ``utils/scheduler.py`` FlowMatchScheduler with ``sigma_min=0,
extra_one_step=True``, built in ``utils/wan_wrapper.py``; the same files in RollingForcing): the
table is computed in float32 exactly as upstream does, so the warped timesteps fed to the model are
bit-identical to upstream's (a float64 table differed by one float32 ulp, 6e-5, for 3 of the 5
Rolling Forcing steps). Deliberate difference: upstream finds sigma by a nearest-timestep lookup in
its float32 sigma table (``_convert_flow_pred_to_x0``, ``add_noise``); here ``sigma = t / 1000`` in
float64, which differs from the table entry by < 3e-8 for every warped step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FlowSchedule:
    """Shifted flow-matching schedule.

    Args:
        shift: timestep shift ``s`` (5.0 for Self Forcing and Rolling Forcing).
        num_train_timesteps: number of training timesteps (1000 for Wan2.1).
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
        #: shifted sigmas [num_train_timesteps] float32 (as upstream), from 1 down to just above 0
        self.sigmas = self.shift * base / (1 + (self.shift - 1) * base)
        #: shifted timesteps [num_train_timesteps] float32 (= sigmas * num_train_timesteps)
        self.timesteps = self.sigmas * num_train_timesteps

    def warp(self, step_list: Sequence[int]) -> torch.Tensor:
        """Warp nominal steps (ints in 0..num_train_timesteps) to shifted timesteps.

        Returns a float32 CPU tensor [len(step_list)], e.g. ``[1000, 750, 500, 250]`` with shift 5
        -> ``[1000, 937.5, 833.33, 625.0]``.
        """
        steps = list(step_list)
        if not steps:
            raise ValueError("step_list must not be empty")
        for s in steps:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= self.num_train_timesteps:
                raise ValueError(
                    f"step_list entries must be ints in [0, {self.num_train_timesteps}], got {s!r} in {steps}"
                )
        table = torch.cat([self.timesteps, torch.zeros(1, dtype=torch.float32)])
        idx = torch.tensor([self.num_train_timesteps - s for s in steps], dtype=torch.long)
        return table[idx].clone()

    def sigma(self, timestep) -> torch.Tensor | float:
        """Noise level of a timestep: ``t / num_train_timesteps`` (float64 for tensors)."""
        if isinstance(timestep, torch.Tensor):
            return timestep.to(torch.float64) / self.num_train_timesteps
        return float(timestep) / self.num_train_timesteps

    @staticmethod
    def _expand(sigma, x: torch.Tensor) -> torch.Tensor:
        """sigma as float64 broadcastable to x [B, F, C, H, W]: scalar, [B] or [B, F]."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        if s.dim() == 0:
            return s
        if s.dim() > 2 or tuple(s.shape) != tuple(x.shape[: s.dim()]):
            raise ValueError(
                f"sigma must be a scalar, [B] or [B, F] matching x {tuple(x.shape)}, got shape {tuple(s.shape)}"
            )
        return s.reshape(*s.shape, *([1] * (x.dim() - s.dim())))

    def _sigma_like(self, timestep, x: torch.Tensor):
        """sigma of ``timestep`` ready to combine with x: a Python float stays a float (no tensor is
        built, so nothing is copied to the device), a tensor becomes float64 on x's device."""
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            return self.sigma(timestep)
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        return self._expand(self.sigma(timestep.to(x.device)), x)

    def x0_from_flow(self, flow: torch.Tensor, x_t: torch.Tensor, timestep) -> torch.Tensor:
        """Clean latents from the predicted flow: ``x0 = x_t - sigma * flow``.

        Computed in float64 and cast back to ``x_t``'s dtype (as upstream Self Forcing does).

        Args:
            flow: [B, F, C, H, W] predicted flow (any float dtype).
            x_t: [B, F, C, H, W] noisy latents the flow was predicted from.
            timestep: a Python number (no tensor is built: graph- and sync-friendly), or a scalar,
                [B] or [B, F] tensor of timesteps (0..num_train_timesteps), ideally on x_t's device
                (a CPU tensor with CUDA latents costs a host-to-device copy).
        """
        if flow.shape != x_t.shape:
            raise ValueError(f"flow and x_t must have the same shape, got {tuple(flow.shape)} and {tuple(x_t.shape)}")
        s = self._sigma_like(timestep, x_t)
        return (x_t.to(torch.float64) - s * flow.to(torch.float64)).to(x_t.dtype)

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """Latents at a noise level: ``(1 - sigma) * x0 + sigma * noise`` (float64, cast to x0's dtype).

        Args:
            x0, noise: [B, F, C, H, W].
            timestep: a Python number, or a scalar, [B] or [B, F] tensor of target timesteps (as
                in ``x0_from_flow``).
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise and x0 must have the same shape, got {tuple(noise.shape)} and {tuple(x0.shape)}")
        s = self._sigma_like(timestep, x0)
        return ((1.0 - s) * x0.to(torch.float64) + s * noise.to(torch.float64)).to(x0.dtype)
