"""The tiled denoising loop when the tiles of a step run on many ranks.

Same model calls as :class:`~supergen.samplers.tiled.TiledSampler`; the
executor (from :mod:`supergen.parallel`) decides which tiles this rank runs,
moves what the ranks must share, and hands back the blended prediction on the
part of the canvas this rank keeps, where this rank's scheduler steps.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from supergen.samplers.tiled import TiledSampler
from supergen.tiling.plan import Tile


class DistributedTiledSampler(TiledSampler):
    """A :class:`TiledSampler` whose steps go through ``executor`` (``scatter`` / ``predict`` / ``gather``).

    The scheduler passed to ``__call__`` only ever sees this rank's part of
    the canvas; the canvas returned is whole, on every rank.
    """

    def __init__(self, executor, **kwargs):
        super().__init__(**kwargs)
        self.executor = executor

    def _run_counted(self, canvas: torch.Tensor, timestep: torch.Tensor, tiles: list[Tile]) -> list[torch.Tensor]:
        self.stats.tile_steps_computed += len(tiles)
        outputs, _ = self.run_tiles(canvas, timestep, tiles)
        return outputs

    def __call__(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        local = self.executor.scatter(latents)
        bar = tqdm(total=len(timesteps), desc=self.desc, disable=not self.progress, leave=False)
        with bar:
            for step, t in enumerate(timesteps):
                prediction = self.executor.predict(
                    step, local, lambda canvas, tiles, t=t: self._run_counted(canvas, t, tiles)
                )
                self.stats.tile_steps_total += self.planner.num_tiles
                local = scheduler.step(prediction, t, local, return_dict=False)[0]
                bar.update()
        return self.executor.gather(local)
