"""Global coherence in the tiled loop: guidance from the up-scaled sketch and global views.

:class:`CoherenceGuide` is what :class:`~supergen.samplers.tiled.TiledSampler`
consults at each refinement step; the math lives in
:mod:`supergen.tiling.coherence`. Two hooks:

* :meth:`CoherenceGuide.guide_latents`, before the tiles run: the canvas is
  pulled towards the up-scaled sketch noised to this step's timestep (by the
  scheduler's own ``add_noise`` / ``scale_noise``, with the noise the
  refinement started from), in every frequency (``skip``) or only in the
  sketch's own band (``lowpass``), with weight ``cosine_decay(step / steps,
  guide_exponent)``;
* :meth:`CoherenceGuide.guide_prediction`, after the tiles ran (``x0``): the
  clean canvas the prediction implies has its low band moved towards the
  up-scaled clean sketch's (HiFlow / FreeScale style), and the prediction is
  rewritten to imply that canvas (flow, epsilon and v prediction);
* :meth:`CoherenceGuide.view_weight` / :attr:`CoherenceGuide.views`: while the
  weight is above zero the loop also runs the dilated global views and blends
  their outputs into the tiles' prediction with it.
"""

from __future__ import annotations

import logging

import torch

from supergen.samplers.schedule import renoise
from supergen.tiling.coherence import DilatedViews, Lowpass, cosine_decay

logger = logging.getLogger(__name__)

GUIDES = ("none", "skip", "lowpass", "x0")


def _parameterisation(config) -> str:
    """What a scheduler's model predicts: ``flow_prediction``, ``epsilon`` or ``v_prediction``."""
    if getattr(config, "use_flow_sigmas", False) or not hasattr(config, "prediction_type"):
        return "flow_prediction"  # flow-matching schedulers have no prediction_type
    kind = config.prediction_type
    if kind not in ("flow_prediction", "epsilon", "v_prediction"):
        raise ValueError(f"guide='x0' does not know prediction_type={kind!r}; use guide='lowpass'")
    return kind


class CoherenceGuide:
    """Per-step coherence decisions of one refinement run.

    Args:
        num_steps: refinement steps (the schedule's progress is ``step / num_steps``).
        guide: ``none``, ``skip``, ``lowpass`` or ``x0`` (see the module docstring).
        sketch: the up-scaled clean sketch latents on the refinement canvas
            (needed by every guide).
        noise: the noise the refinement canvas was re-noised with.
        noiser: a scheduler with ``set_timesteps`` called and no begin index,
            used only to noise the sketch to a timestep (``skip``, ``lowpass``)
            and to read the schedule's parameterisation (``x0``).
        guide_exponent: exponent of the guide's cosine decay.
        lowpass_HW: the sketch's latent size: the band ``lowpass`` keeps.
        views: dilated global views (``None``: none).
        view_exponent: exponent of the views' cosine decay.
        view_until: fraction of the refinement after which the views stop
            (their weight is zero from there on, and they cost nothing).
    """

    def __init__(
        self,
        num_steps: int,
        guide: str = "none",
        sketch: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        noiser=None,
        guide_exponent: float = 0.25,
        lowpass_HW: tuple[int, int] | None = None,
        views: DilatedViews | None = None,
        view_exponent: float = 1.0,
        view_until: float = 1.0,
    ):
        if guide not in GUIDES:
            raise ValueError(f"guide={guide!r} is not one of {', '.join(GUIDES)}")
        if guide != "none" and (sketch is None or noise is None or noiser is None):
            raise ValueError(f"guide={guide!r} needs the up-scaled sketch, its noise and a noiser scheduler")
        if guide in ("lowpass", "x0") and lowpass_HW is None:
            raise ValueError(f"guide={guide!r} needs lowpass_HW, the sketch's latent size")
        self.num_steps = num_steps
        self.guide = guide
        self.sketch = sketch
        self.noise = noise
        self.noiser = noiser
        self.guide_exponent = guide_exponent
        self.lowpass_HW = tuple(lowpass_HW) if lowpass_HW is not None else None
        self.views = views
        self.view_exponent = view_exponent
        self.view_until = view_until
        self.lowpass = None
        if guide in ("lowpass", "x0"):
            self.lowpass = Lowpass(tuple(sketch.shape[-2:]), self.lowpass_HW).to(sketch.device)
        self.parameterisation = _parameterisation(noiser.config) if guide == "x0" else None

    @property
    def active(self) -> bool:
        return self.guide != "none" or self.views is not None

    def guide_weight(self, step: int) -> float:
        if self.guide == "none":
            return 0.0
        return cosine_decay(step / self.num_steps, self.guide_exponent)

    def view_weight(self, step: int) -> float:
        """Weight of the global views' prediction at ``step`` (0: the views do not run)."""
        progress = step / self.num_steps
        if self.views is None or progress >= self.view_until:
            return 0.0
        return cosine_decay(progress / self.view_until, self.view_exponent)

    def _x0_coefficients(self, timestep: torch.Tensor) -> tuple[float, float]:
        """``(a, b)`` with ``x0 = a * x_t + b * prediction`` at ``timestep`` for the noiser's parameterisation."""
        kind = self.parameterisation
        timesteps = self.noiser.timesteps
        index = int(torch.argmin((timesteps.to(torch.float64) - float(timestep)).abs()))
        if kind == "flow_prediction":
            return 1.0, -float(self.noiser.sigmas[index])
        alpha_bar = float(self.noiser.alphas_cumprod[int(timesteps[index])])
        if kind == "epsilon":
            return 1.0 / alpha_bar**0.5, -((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return alpha_bar**0.5, -((1.0 - alpha_bar) ** 0.5)  # v_prediction

    def _band(self, x_part: torch.Tensor, box, reduce) -> torch.Tensor:
        """``lowpass`` of a canvas of which this process holds the part ``box`` (``None``: all of it).

        ``reduce`` sums a tensor over the processes that hold the other parts.
        """
        if box is None:
            return self.lowpass(x_part)
        frames, rows, cols = box[2:]
        pooled = self.lowpass.pooled(x_part, rows, cols)
        # Every part adds its sums into the whole down-sampled canvas (zeros on frames it does not hold).
        whole = torch.zeros((*pooled.shape[:2], self.sketch.shape[2], *pooled.shape[3:]), dtype=pooled.dtype,
                            device=pooled.device)
        whole[:, :, frames] = pooled
        # Summed in float64: the sums then agree with one process's to the last float32 bit in practice, so
        # N ranks make the same video as one (a float32 sum did not: frames differed by one grey level).
        whole = reduce(whole)
        return self.lowpass.expand(whole[:, :, frames], rows, cols).to(x_part.dtype)

    def guide_prediction(self, step: int, timestep: torch.Tensor, latents: torch.Tensor,
                         prediction: torch.Tensor, box=None, reduce=None) -> torch.Tensor:
        """``prediction`` rewritten so that its clean canvas takes the sketch's low band (``x0`` guide only).

        ``box`` (slices of the canvas) and ``reduce`` (a sum over processes): this process holds only
        that part of the latents and prediction; the others hold the rest.
        """
        weight = self.guide_weight(step) if self.guide == "x0" else 0.0
        if weight == 0.0:
            return prediction
        a, b = self._x0_coefficients(timestep)
        if b == 0.0:
            return prediction
        x0 = a * latents.float() + b * prediction.float()
        sketch = self.sketch if box is None else self.sketch[box]
        correction = weight * self._band(sketch.float() - x0, box, reduce)
        return (prediction.float() + correction / b).to(prediction.dtype)

    def guide_latents(self, step: int, timestep: torch.Tensor, latents: torch.Tensor, box=None,
                      reduce=None) -> torch.Tensor:
        """The canvas to denoise at ``step``: ``latents`` pulled towards the noised sketch (``skip``, ``lowpass``).

        ``box`` and ``reduce`` as in :meth:`guide_prediction`.
        """
        weight = self.guide_weight(step) if self.guide in ("skip", "lowpass") else 0.0
        if weight == 0.0:
            return latents
        sketch, noise = (self.sketch, self.noise) if box is None else (self.sketch[box], self.noise[box])
        target = renoise(self.noiser, sketch, noise, timestep).to(latents.dtype)
        if self.guide == "skip":
            return latents + weight * (target - latents)
        # lowpass: move only the band the sketch resolves (linear, so one filter of the difference).
        return latents + weight * self._band(target - latents, box, reduce)

    def describe(self) -> str:
        parts = []
        if self.guide != "none":
            parts.append(f"guide {self.guide} (cosine decay ^{self.guide_exponent:g})")
        if self.views is not None:
            parts.append(
                f"{len(self.views)} dilated views of {self.views.view_size[0]}x{self.views.view_size[1]} cells "
                f"(stride {self.views.strides}, decay ^{self.view_exponent:g}, first {self.view_until:.0%} of steps)"
            )
        return "coherence: " + (", ".join(parts) if parts else "off")
