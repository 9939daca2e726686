"""Block-wise (semi-autoregressive) streaming loops.

Both loops are model-agnostic. They take:

- ``model``: anything with ``predict(x_1CFHW, timesteps_F, write_frames) -> prediction``
  that attends to the clean context written so far and, when
  ``write_frames > 0``, adds the first ``write_frames`` frames of ``x`` to that
  context after the forward (``WanStreamModel`` or ``WanUncachedStreamModel``);
- ``next_noise``: a callable returning the next block's noise ``(1,C,F,H,W)``,
  or ``None`` when the stream should end;
- ``make_scheduler``: a callable returning a fresh Diffusers scheduler with
  ``set_timesteps(steps)`` already called; every block gets its own, so
  multistep schedulers keep per-block state and the loops work with any
  scheduler a pipeline ships (``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``
  gives Self-Forcing's x0-predict-and-renoise few-step sampler).

``kv_write`` chooses how a finished block enters the context: ``rerun`` runs it
once more at timestep 0 (clean keys/values, as Self-Forcing does; one forward
more per block); ``last_step`` keeps the keys/values of its last denoising
forward (one forward fewer, keys from a slightly noisy input).

``context_noise`` (``rerun`` only) adds Gaussian noise of that standard
deviation to a finished block before its clean re-run, so the context the
next blocks attend to is as noisy as the one a causal student was trained on
(CausVid's and Self-Forcing's ``context_noise``; ``train_toy_causal.py
--context-noise``). The yielded block stays the clean sample; 0 (the default)
draws nothing and leaves the stream bit for bit as before.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

KV_WRITE_MODES = ("rerun", "last_step")


class StreamModel(Protocol):
    def predict(self, x: torch.Tensor, timesteps_F: torch.Tensor, write_frames: int = 0) -> torch.Tensor: ...


def _clean_timesteps(frames: int) -> torch.Tensor:
    return torch.zeros(frames)


def _check(kv_write: str, context_noise: float) -> None:
    if kv_write not in KV_WRITE_MODES:
        raise ValueError(f"kv_write={kv_write!r} is not one of {', '.join(KV_WRITE_MODES)}")
    if not context_noise >= 0:
        raise ValueError(f"context_noise={context_noise} must be >= 0 (the noise std added to the written context)")
    if context_noise > 0 and kv_write != "rerun":
        raise ValueError(f"context_noise={context_noise} needs kv_write='rerun': it noises the clean re-run's input")


def _write_clean(model, x: torch.Tensor, context_noise: float, generator) -> None:
    if context_noise > 0:
        from diffusers.utils.torch_utils import randn_tensor

        x = x + context_noise * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    model.predict(x, _clean_timesteps(x.shape[2]), write_frames=x.shape[2])


def _step(scheduler, pred, t, x, generator):
    # Stochastic samplers (FlowMatchEuler with stochastic_sampling) draw fresh
    # noise in step(): give them the stream's generator so a seed reproduces.
    kwargs = {"generator": generator} if generator is not None and "generator" in inspect.signature(scheduler.step).parameters else {}
    return scheduler.step(pred, t, x, return_dict=False, **kwargs)[0]


def block_stream(
    model: StreamModel,
    next_noise: Callable[[], torch.Tensor | None],
    make_scheduler: Callable[[], object],
    kv_write: str = "rerun",
    generator: torch.Generator | None = None,
    context_noise: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Few-step block schedule: denoise one block fully, commit it, move on. Yields clean blocks."""
    _check(kv_write, context_noise)
    while (x := next_noise()) is not None:
        frames = x.shape[2]
        scheduler = make_scheduler()
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            last = i == len(timesteps) - 1
            write = frames if (last and kv_write == "last_step") else 0
            pred = model.predict(x, t.reshape(1).expand(frames).float(), write_frames=write)
            x = _step(scheduler, pred, t, x, generator)
        if kv_write == "rerun":
            _write_clean(model, x, context_noise, generator)
        yield x


@dataclass
class _WindowEntry:
    x: torch.Tensor
    scheduler: object
    level: int = 0

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.level]


def rolling_stream(
    model: StreamModel,
    next_noise: Callable[[], torch.Tensor | None],
    make_scheduler: Callable[[], object],
    kv_write: str = "rerun",
    generator: torch.Generator | None = None,
    context_noise: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Rolling Forcing's joint window: up to ``steps`` blocks denoised together, oldest cleanest.

    Every forward advances each block in the window by one step of its own
    schedule; then the oldest block, now clean, leaves the window (and enters
    the context) and a new noise block joins at the other end. Blocks attend
    to each other inside the window both ways. After a warm-up of ``steps - 1``
    forwards one block comes out per forward.
    """
    _check(kv_write, context_noise)
    window: list[_WindowEntry] = []
    source_open = True
    while True:
        if source_open:
            noise = next_noise()
            if noise is None:
                source_open = False
            else:
                window.append(_WindowEntry(noise, make_scheduler()))
        if not window:
            return
        frames = [e.x.shape[2] for e in window]
        x = torch.cat([e.x for e in window], dim=2)
        t_F = torch.cat([e.timestep.reshape(1).expand(f).float() for e, f in zip(window, frames)])
        oldest = window[0]
        exits = oldest.level == len(oldest.scheduler.timesteps) - 1
        write = frames[0] if (exits and kv_write == "last_step") else 0
        pred = model.predict(x, t_F, write_frames=write)
        for entry, p in zip(window, pred.split(frames, dim=2)):
            entry.x = _step(entry.scheduler, p, entry.timestep, entry.x, generator)
            entry.level += 1
        if exits:
            window.pop(0)
            if kv_write == "rerun":
                _write_clean(model, oldest.x, context_noise, generator)
            yield oldest.x
