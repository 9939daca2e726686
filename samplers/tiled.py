"""The tiled denoising loop.

Every step: plan the tiles of this step, run the model on each tile (tiles
batched ``tile_batch_size`` at a time, classifier-free guidance batched inside
the adapter), blend the tile outputs into one canvas prediction, and step the
pipeline's own scheduler on the whole canvas. The loop knows nothing about a
particular model: it talks to the backbone through ``adapter.predict``
(:mod:`supergen.samplers.protocol`).

An optional step cache (a :class:`supergen.cache.RegionCache`, or anything with
its ``predict_skips`` / ``reused_prediction`` / ``update`` methods) decides before
each step which tiles reuse its canvas-coordinate prediction instead of running
the model; it lives entirely inside :meth:`TiledSampler.predict` and sees the
raw blended prediction of the tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from supergen.samplers.protocol import Denoiser, TokenPositions
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
    view_forwards: int = 0
    skip_map: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "tile_steps_total": self.tile_steps_total,
            "tile_steps_computed": self.tile_steps_computed,
            "tile_steps_skipped": self.tile_steps_skipped,
            "model_calls": self.model_calls,
            "view_forwards": self.view_forwards,
            "skip_map": self.skip_map,
        }


class TiledSampler:
    """Denoise a latent canvas tile by tile.

    Args:
        adapter: the model (a :class:`~supergen.samplers.protocol.Denoiser`: the pipeline's backbone adapter).
        cond: prompt conditioning from the adapter's ``encode_prompt``, passed back to its ``predict``.
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
        cache: step cache consulted every step (``None``: every tile runs every step).
        coherence: a :class:`~supergen.samplers.coherence.CoherenceGuide` (sketch
            guidance before each step, global views blended into its prediction).
    """

    def __init__(
        self,
        adapter: Denoiser,
        cond: Any,
        planner: TilePlanner,
        guidance_scale: float,
        guidance_scale_2: float | None = None,
        tile_batch_size: int = 1,
        rope: str = "local",
        progress: bool = True,
        desc: str = "refine",
        condition: torch.Tensor | None = None,
        cache=None,
        coherence=None,
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
        self.cache = cache
        self.coherence = coherence if coherence is not None and coherence.active else None
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

    def run_tiles(
        self, latents: torch.Tensor, timestep: torch.Tensor, tiles: list[Tile], blocks: str | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Model outputs for ``tiles`` of the canvas ``latents``, in order.

        ``blocks='record'`` also returns the residuals of the transformer blocks
        (tile-major); ``blocks='reuse'`` runs the tiles with the cache's block
        residuals in place of the blocks (not counted as model calls).
        """
        outputs: list[torch.Tensor] = []
        residuals: list[torch.Tensor] = []
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
                **self._block_args(blocks, batch),
            )
            if blocks == "record":
                out, residual = out
                residuals.append(residual)
            if blocks != "reuse":
                self.stats.model_calls += 1
            outputs.extend(out.split(latents.shape[0]))
        return outputs, (torch.cat(residuals) if residuals else None)

    def global_views(self, step: int, timestep: torch.Tensor, latents: torch.Tensor,
                     prediction: torch.Tensor) -> torch.Tensor:
        """``prediction`` blended with the coherence guide's global views (unchanged while their weight is 0)."""
        weight = 0.0 if self.coherence is None else self.coherence.view_weight(step)
        if weight == 0.0:
            return prediction
        views = self.coherence.views
        inputs = views.gather(latents)
        conditions = None if self.condition is None else views.gather(self.condition)
        outputs = self.run_views(timestep, inputs, conditions)
        return prediction + weight * (views.scatter(outputs) - prediction)

    def run_views(self, timestep: torch.Tensor, inputs: list[torch.Tensor],
                  conditions: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Model outputs of whole-picture views (each a native-size canvas at local positions), in order."""
        outputs = []
        for first in range(0, len(inputs), self.tile_batch_size):
            batch = slice(first, first + self.tile_batch_size)
            out = self.adapter.predict(
                torch.cat(inputs[batch]),
                timestep,
                self.cond,
                self.guidance_scale,
                guidance_scale_2=self.guidance_scale_2,
                condition=None if conditions is None else torch.cat(conditions[batch]),
            )
            self.stats.model_calls += 1
            outputs.extend(out.split(inputs[0].shape[0]))
        self.stats.view_forwards += len(inputs)
        return outputs

    def _block_args(self, blocks: str | None, batch: list[Tile]) -> dict:
        if blocks == "record":
            return {"return_block_residual": True}
        if blocks == "reuse":
            return {"block_residual": self.cache.block_residual(batch)}
        return {}

    def predict(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The blended canvas prediction of one step."""
        plan: TilePlan = self.planner.plan(step)
        skips = self.cache.predict_skips(step, plan, latents) if self.cache is not None else [False] * len(plan)
        by_blocks = self.cache is not None and self.cache.reuse_mode == "blocks"
        run = [t for t, skip in zip(plan.tiles, skips) if not skip]
        computed, block_residuals = self.run_tiles(latents, timestep, run, blocks="record" if by_blocks else None)
        if by_blocks:
            reused = iter(self.run_tiles(latents, timestep, [t for t, skip in zip(plan.tiles, skips) if skip], "reuse")[0])
        elif any(skips):
            canvas = self.cache.reused_prediction(latents, timestep)
            reused = (t.gather(canvas) for t, skip in zip(plan.tiles, skips) if skip)
        else:
            reused = iter(())
        computed = iter(computed)
        outputs = [next(reused) if skip else next(computed) for skip in skips]
        skipped = sum(skips)
        self.stats.tile_steps_total += len(plan)
        self.stats.tile_steps_computed += len(plan) - skipped
        self.stats.tile_steps_skipped += skipped
        self.stats.skip_map.append([int(skip) for skip in skips])
        if skipped:
            logger.debug("step %d: reused tiles %s", step, [t.index for t, skip in zip(plan.tiles, skips) if skip])
        if len(plan) == 1 and not plan.tiles[0].wraps and plan.tiles[0].size == tuple(latents.shape[2:]):
            # One tile that is the canvas: hand the model output through untouched.
            prediction = outputs[0]
        else:
            prediction = plan.blend(outputs)
        if self.cache is not None:
            self.cache.update(plan, skips, latents, prediction, block_residuals, timestep=timestep)
        return prediction

    def __call__(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        """Run the loop over ``timesteps`` with ``scheduler`` already set up; returns the final latents."""
        logger.info("%s: %s", self.desc, self.planner.describe())
        if self.cache is not None:
            logger.info("%s: %s", self.desc, self.cache.describe())
        if self.coherence is not None:
            logger.info("%s: %s", self.desc, self.coherence.describe())
        bar = tqdm(total=len(timesteps), desc=self.desc, disable=not self.progress, leave=False)
        with bar:
            for step, t in enumerate(timesteps):
                if self.coherence is not None:
                    latents = self.coherence.guide_latents(step, t, latents)
                prediction = self.predict(step, t, latents)
                prediction = self.global_views(step, t, latents, prediction)
                if self.coherence is not None:
                    prediction = self.coherence.guide_prediction(step, t, latents, prediction)
                latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
                bar.update()
        return latents
