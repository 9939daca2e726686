"""What the samplers need of a model: the small contract the pipeline binds a backbone adapter to.

The samplers never import the backbones: an object with a ``geometry`` (its
``patch`` in latent cells) and a ``predict`` method of the signature below
is a :class:`Denoiser`; :class:`supergen.backbones.BackboneAdapter` is one.
Conditioning is opaque here: whatever the denoiser's own prompt encoding
returned, handed back to ``predict`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class TokenPositions:
    """Per-axis RoPE positions (in tokens) for each tile of a batch.

    Each tensor has shape (N, n_axis): tile ``k`` of the batch has frames
    ``frames[k]``, rows ``rows[k]`` and columns ``cols[k]``. Positions may be
    non-contiguous (a tile that wraps around the canvas edge).
    """

    frames: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


class PatchGeometry(Protocol):
    #: The transformer's patch in latent cells (t, h, w).
    patch: tuple[int, int, int]


class Denoiser(Protocol):
    """A model function over batches of latent tiles, classifier-free guidance inside."""

    geometry: PatchGeometry

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Any,
        guidance_scale: float,
        positions: TokenPositions | None = None,
        guidance_scale_2: float | None = None,
        condition: torch.Tensor | None = None,
        **block_reuse: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The guided prediction for ``latents`` (N tiles, canonical ``B,C,F,H,W`` each).

        ``block_reuse``: ``return_block_residual=True`` also returns what the
        transformer blocks added; ``block_residual=...`` runs with it in their place.
        """
        ...
