"""Schedule arithmetic shared by the loops: where refinement starts and re-noising.

Uses the Diffusers scheduler's own ``set_timesteps`` / ``set_begin_index`` /
``add_noise`` (or ``scale_noise`` for flow-matching Euler), as Diffusers'
video-to-video pipelines do, so any scheduler a pipeline ships works.
"""

from __future__ import annotations

import torch


def fresh_scheduler(scheduler):
    """A new scheduler of the same class and config: no step state leaks between stages."""
    return type(scheduler).from_config(scheduler.config)


def refinement_steps(num_inference_steps: int, strength: float) -> int:
    """How many of ``num_inference_steps`` steps refinement at ``strength`` runs (at least one)."""
    return min(max(int(round(num_inference_steps * strength)), 1), num_inference_steps)


def refinement_timesteps(scheduler, num_inference_steps: int, strength: float, device=None):
    """Set the schedule and return ``(timesteps, start_index)`` for refinement at ``strength``.

    ``strength`` is the fraction of the schedule that runs: 1.0 runs all of it
    from pure noise; 0.9 skips the first 10% of steps (SuperGen refines 45 of 50).
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    order = getattr(scheduler, "order", 1)
    run = refinement_steps(num_inference_steps, strength)
    start = (num_inference_steps - run) * order
    # Schedulers that keep a step index need to know where it starts; index-free ones
    # (DDIM-style, which derive the previous timestep from the current one) have no such call.
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps[start:], start


def renoise(scheduler, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Bring clean latents to the noise level of ``timestep`` (call after :func:`refinement_timesteps`)."""
    t = timestep.reshape(1)
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(clean, noise, t)
    return scheduler.scale_noise(clean, t, noise)
