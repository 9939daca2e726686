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

    def _run_counted(
        self, canvas: torch.Tensor, timestep: torch.Tensor, tiles: list[Tile], skips: list[bool] | None = None,
        reused: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """This rank's tiles: computed, or (predicted skips, all-gather scheme) read from ``reused``, in order."""
        skipped = {tile.index for tile in tiles if skips is not None and skips[tile.index]}
        computed = iter(self.run_tiles(canvas, timestep, [t for t in tiles if t.index not in skipped])[0])
        self.stats.tile_steps_computed += len(tiles) - len(skipped)
        return [t.gather(reused) if t.index in skipped else next(computed) for t in tiles]

    def run_views(self, timestep, inputs, conditions):
        """Global views spread over the ranks (each runs whole views), shared by an all-gather."""
        def run(indices: list[int]) -> list[torch.Tensor]:
            return super(DistributedTiledSampler, self).run_views(
                timestep, [inputs[i] for i in indices], None if conditions is None else [conditions[i] for i in indices]
            ) if indices else []

        return self.executor.run_shared(len(inputs), run, inputs[0])

    def __call__(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        if self.coherence is not None and self.coherence.views is not None and self.executor.scheme != "allgather":
            raise ValueError("global views read the whole canvas on every rank: use exchange='allgather'")
        # Sketch guidance filters the canvas from pooled sums that the ranks add up (see tiling.coherence.Lowpass).
        box, reduce = self.executor.canvas_part()
        local = self.executor.scatter(latents)
        bar = tqdm(total=len(timesteps), desc=self.desc, disable=not self.progress, leave=False)
        with bar:
            for step, t in enumerate(timesteps):
                if self.coherence is not None:
                    local = self.coherence.guide_latents(step, t, local, box, reduce)
                skips = reused = None
                if self.cache is not None:
                    # The cache holds this rank's part of the canvas and totals its statistics over the
                    # ranks, so every rank predicts the same skips (and the balancer counts them nearly free).
                    plan = self.planner.plan(step)
                    skips = self.cache.predict_skips(step, plan, local)
                    reused = self.cache.reused_prediction(local, t) if any(skips) else None
                    self.stats.skip_map.append([int(s) for s in skips])
                prediction = self.executor.predict(
                    step, local,
                    lambda canvas, tiles, t=t, skips=skips, reused=reused: self._run_counted(
                        canvas, t, tiles, skips, reused),
                    skips=skips, reused=reused,
                )
                if self.cache is not None:
                    self.cache.update(plan, skips, local, prediction, timestep=t)
                prediction = self.global_views(step, t, local, prediction)
                if self.coherence is not None:
                    prediction = self.coherence.guide_prediction(step, t, local, prediction, box, reduce)
                self.stats.tile_steps_total += self.planner.num_tiles
                local = scheduler.step(prediction, t, local, return_dict=False)[0]
                bar.update()
        return self.executor.gather(local)
