"""The tiled denoising loop.

Every step: plan the tiles of this step, run the model on each tile (tiles
batched ``tile_batch_size`` at a time, classifier-free guidance batched inside
the adapter), blend the tile outputs into one canvas prediction, and step the
pipeline's own scheduler on the whole canvas. The loop knows nothing about a
particular model: it talks to the backbone through ``adapter.predict``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from supergen.backbones.base import BackboneAdapter, Conditioning, TokenPositions
from supergen.tiling.plan import Tile, TilePlan, TilePlanner

logger = logging.getLogger(__name__)


@dataclass
class TileStats:
    """What the loop did, per tile-step; reported in the run's metrics."""

    count: int = 0
    tile_steps_total: int = 0
    tile_steps_computed: int = 0
    tile_steps_skipped: int = 0
    model_calls: int = 0
    skip_map: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "tile_steps_total": self.tile_steps_total,
            "tile_steps_computed": self.tile_steps_computed,
            "tile_steps_skipped": self.tile_steps_skipped,
            "model_calls": self.model_calls,
        }


class TiledSampler:
    """Denoise a latent canvas tile by tile.

    Args:
        adapter: the backbone adapter.
        cond: prompt conditioning from ``adapter.encode_prompt``.
        planner: tile geometry of this run.
        guidance_scale, guidance_scale_2: CFG scales (the second for Wan2.2's
            low-noise expert).
        tile_batch_size: tiles per model call.
        rope: ``local`` (every tile at positions 0..n) or ``absolute`` (tile
            offsets added, so tiles know where they are on the canvas).
        progress: show a progress bar.
        desc: progress bar label.
        condition: a latent canvas aligned with the video latents (image-to-video:
            the encoded conditioning image), cropped with every tile like the latents.
    """

    def __init__(
        self,
        adapter: BackboneAdapter,
        cond: Conditioning,
        planner: TilePlanner,
        guidance_scale: float,
        guidance_scale_2: float | None = None,
        tile_batch_size: int = 1,
        rope: str = "local",
        progress: bool = True,
        desc: str = "refine",
        condition: torch.Tensor | None = None,
    ):
        self.adapter = adapter
        self.cond = cond
        self.planner = planner
        self.guidance_scale = guidance_scale
        self.guidance_scale_2 = guidance_scale_2
        self.tile_batch_size = tile_batch_size
        self.rope = rope
        self.progress = progress
        self.desc = desc
        self.condition = condition
        self.stats = TileStats(count=planner.num_tiles)

    def positions(self, tiles: list[Tile]) -> TokenPositions | None:
        """Canvas-absolute token positions of a batch of tiles (``None`` for local RoPE)."""
        if self.rope == "local":
            return None
        patch = self.adapter.geometry.patch
        per_axis = [
            torch.stack([tile.cells[axis][:: patch[axis]] // patch[axis] for tile in tiles]) for axis in range(3)
        ]
        return TokenPositions(frames=per_axis[0], rows=per_axis[1], cols=per_axis[2])

    def run_tiles(self, latents: torch.Tensor, timestep: torch.Tensor, tiles: list[Tile]) -> list[torch.Tensor]:
        """Model outputs for ``tiles`` of the canvas ``latents``, in order."""
        outputs: list[torch.Tensor] = []
        for first in range(0, len(tiles), self.tile_batch_size):
            batch = tiles[first : first + self.tile_batch_size]
            x = torch.cat([tile.gather(latents) for tile in batch])
            condition = None if self.condition is None else torch.cat([tile.gather(self.condition) for tile in batch])
            out = self.adapter.predict(
                x,
                timestep,
                self.cond,
                self.guidance_scale,
                positions=self.positions(batch),
                guidance_scale_2=self.guidance_scale_2,
                condition=condition,
            )
            self.stats.model_calls += 1
            outputs.extend(out.split(latents.shape[0]))
        return outputs

    def predict(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The blended canvas prediction of one step."""
        plan: TilePlan = self.planner.plan(step)
        outputs = self.run_tiles(latents, timestep, plan.tiles)
        self.stats.tile_steps_total += len(plan)
        self.stats.tile_steps_computed += len(plan)
        self.stats.skip_map.append([0] * len(plan))
        if len(plan) == 1 and not plan.tiles[0].wraps and plan.tiles[0].size == tuple(latents.shape[2:]):
            # One tile that is the canvas: hand the model output through untouched.
            return outputs[0]
        return plan.blend(outputs)

    def __call__(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        """Run the loop over ``timesteps`` with ``scheduler`` already set up; returns the final latents."""
        logger.info("%s: %s", self.desc, self.planner.describe())
        bar = tqdm(total=len(timesteps), desc=self.desc, disable=not self.progress, leave=False)
        with bar:
            for step, t in enumerate(timesteps):
                prediction = self.predict(step, t, latents)
                latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
                bar.update()
        return latents
