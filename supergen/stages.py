"""The stages of one tiled run, in the order :meth:`SuperGenPipeline.generate` runs them.

A :class:`ResolvedRun` is what :meth:`SuperGenPipeline.resolve` fixed before
any model work (the checked request, effective tiling, guidance, parallel
plan); each stage reads it and records what it made (planner, sampler, cache,
executor, timings). The stages are functions of the backbone adapter and the
run, so the pipeline object stays a short sequence of named calls:

1. :func:`sketch`: the whole video at the native area, up-scaled to the target canvas;
2. :func:`refine`: the tiled refinement of that canvas (one process, or the job's ranks);
3. :func:`decode`: frames of the requested type (tiled, split over ranks, or streamed into a writer).

Their collaborators (:func:`make_planner`, :func:`region_cache`,
:func:`coherence_guide`) are built here from the configs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from supergen.backbones import BackboneAdapter
from supergen.cache import CacheSchedule, RegionCache
from supergen.config import CacheConfig, CoherenceConfig, GenerationConfig, TilingConfig
from supergen.io import to_uint8
from supergen.request import TiledRequest
from supergen.samplers.coherence import CoherenceGuide
from supergen.samplers.schedule import refinement_timesteps, renoise
from supergen.samplers.tiled import TiledSampler, TileStats
from supergen.tiling import TilePlanner, resize_latents, resize_video
from supergen.tiling.coherence import DilatedViews

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ResolvedRun:
    """One generation after :meth:`SuperGenPipeline.resolve`: the checked request and what the stages fill in."""

    config: GenerationConfig
    request: TiledRequest
    #: The config's tiling, with strength 1 when the target is the native size (nothing to refine).
    tiling: TilingConfig
    guidance_scale: float
    generator: torch.Generator
    output_type: str
    progress: bool
    #: The job's context under torchrun (``None``: this process alone) and its parallel plan.
    context: Any = None
    plan: Any = None
    writer: Any = None
    # Filled in by the stages.
    planner: TilePlanner | None = None
    sketch_stats: TileStats | None = None
    sampler: Any = None
    region_cache: RegionCache | None = None
    executor: Any = None
    hybrid: Any = None
    refine_steps: int = 0
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time (and log at DEBUG) one named stage of the run."""
        logger.debug("stage %s", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t0
            logger.debug("stage %s: %.2f s", name, self.timings[name])

    def log_plan(self) -> None:
        request, tiling = self.request, self.tiling
        logger.info(
            "target %dx%dx%df, %s; sketch %dx%d, strength %.2f, upscale %s, rope %s",
            request.height, request.width, request.num_frames, self.planner.describe(), request.sketch_height,
            request.sketch_width, tiling.strength, tiling.upscale, tiling.rope,
        )


# --- collaborators ------------------------------------------------------------------------------

def make_planner(adapter: BackboneAdapter, request: TiledRequest, tiling: TilingConfig,
                 cache: CacheConfig | None = None, steps: int | None = None) -> TilePlanner:
    """The refinement's tile planner; ``cache`` decides the grid schedule and ``steps`` (refinement steps) its
    phase."""
    every = (cache or CacheConfig()).grid_shift_every(tiling)
    return TilePlanner(
        canvas=request.canvas,
        tile=request.tile,
        overlap=request.overlap_cells,
        align=adapter.geometry.patch,
        blend=tiling.blend,
        shift=tiling.shift,
        shift_stride=request.shift_stride_cells,
        shift_every=every,
        # The last refinement step moves the grid, so its tile boundaries are where the every-step grid's are.
        shift_phase=0 if steps is None else (steps - 1) % every,
    )


def reuse_mode(cache: CacheConfig) -> str:
    """What a skipped tile reuses, ``auto`` resolved."""
    # Measured on the toy model: output reuse matches or beats blocks reuse at the same decisions
    # (docs/benchmarks.md), costs no model call and is served by each rank from its own cells.
    return "output" if cache.reuse == "auto" else cache.reuse


def region_cache(adapter: BackboneAdapter, cache: CacheConfig, planner: TilePlanner, num_steps: int,
                 scope: str | None = None, box=None, reduce=None) -> RegionCache | None:
    """The step cache of a loop over ``planner`` (``None`` when off or at threshold 0); ``box`` and
    ``reduce`` restrict its state to one rank's region (see :class:`~supergen.cache.RegionCache`)."""
    if not cache.enabled:
        return None
    tile_f, tile_h, tile_w = planner.tile
    region = (tile_f, max(1, tile_h // cache.regions_per_tile), max(1, tile_w // cache.regions_per_tile))
    return RegionCache(
        canvas=planner.canvas,
        region=region,
        threshold=cache.threshold_for(grid_moves=any(planner.wrap)),
        schedule=CacheSchedule(num_steps=num_steps, warmup=cache.warmup, cooldown=cache.cooldown),
        max_skips=cache.max_skips,
        adaptive=cache.adaptive,
        scope=scope or cache.mode,
        reuse=reuse_mode(cache),
        patch=adapter.geometry.patch,
        box=box,
        reduce=reduce,
        taylor_damping=cache.taylor_damping,
        across_moves=cache.grid == "shifting",
    )


def coherence_guide(adapter: BackboneAdapter, coherence: CoherenceConfig, request: TiledRequest,
                    planner: TilePlanner, num_inference_steps: int, num_steps: int, sketch: torch.Tensor | None,
                    noise: torch.Tensor) -> CoherenceGuide | None:
    """The refinement's coherence guide (``None`` when nothing applies: one tile, or off)."""
    if not coherence.enabled or planner.num_tiles == 1:
        return None
    guide = coherence.guide
    if guide != "none" and sketch is None:
        logger.info("coherence guide %s needs a sketch; strength 1.0 has none, so it is off", guide)
        guide = "none"
    noiser = None
    if guide != "none":
        noiser = adapter.make_scheduler(request.tile)
        noiser.set_timesteps(num_inference_steps, device=adapter.device)
    geo = adapter.geometry
    sketch_hw = geo.latent_shape(request.sketch_height, request.sketch_width, request.num_frames)[1:]
    views = None
    if coherence.views == "dilated":
        views = DilatedViews(request.canvas, request.tile[1:], geo.patch[1:])
    return CoherenceGuide(
        num_steps, guide=guide, sketch=sketch, noise=noise, noiser=noiser,
        guide_exponent=coherence.guide_exponent, lowpass_HW=sketch_hw, views=views,
        view_exponent=coherence.view_exponent, view_until=coherence.view_until,
    )


def image_condition(adapter: BackboneAdapter, image, height: int, width: int, num_frames: int,
                    generator) -> torch.Tensor | None:
    """The image-to-video condition canvas at this stage's size (``None`` without an image)."""
    if image is None:
        return None
    return adapter.encode_image(image, height, width, num_frames, generator)


# --- the stages ---------------------------------------------------------------------------------

def sketch(adapter: BackboneAdapter, request: TiledRequest, tiling: TilingConfig, steps: int, generator,
           sampler_args: dict, image=None, cache: CacheConfig | None = None) -> tuple[torch.Tensor, TileStats]:
    """Native-area sketch of the whole video, up-scaled to the target canvas (clean latents), and its
    loop's counts. With ``cache.sketch`` the cache makes one whole-canvas decision per sketch step."""
    geo = adapter.geometry
    sketch_canvas = geo.latent_shape(request.sketch_height, request.sketch_width, request.num_frames)
    # The sketch is one tile in space (full attention over the frame), tiled only in time.
    planner = TilePlanner(
        canvas=sketch_canvas,
        tile=(min(request.tile[0], sketch_canvas[0]), sketch_canvas[1], sketch_canvas[2]),
        overlap=(request.overlap_cells[0], 0, 0),
        align=geo.patch,
        blend=tiling.blend,
    )
    scheduler = adapter.make_scheduler(planner.tile, generator)
    timesteps, _ = refinement_timesteps(scheduler, tiling.sketch_steps or steps, 1.0, device=adapter.device)
    condition = image_condition(adapter, image, request.sketch_height, request.sketch_width, request.num_frames,
                                generator)
    noise = adapter.prepare_noise(sketch_canvas, generator)
    sketch_cache = None
    if cache is not None and cache.sketch:
        sketch_cache = region_cache(adapter, cache, planner, len(timesteps), scope="canvas")
    sampler = TiledSampler(planner=planner, rope="local", desc="sketch", condition=condition, cache=sketch_cache,
                           **sampler_args)
    latents = sampler(noise, scheduler, timesteps)
    if sketch_canvas == request.canvas:
        return latents, sampler.stats
    if tiling.upscale == "latent":
        return resize_latents(latents, request.canvas), sampler.stats
    video = adapter.decode(latents)
    video = resize_video(video.float(), (request.num_frames, request.height, request.width))
    tiled = request.canvas[1:] != adapter.native_latent_shape[1:]
    return adapter.encode(video.to(adapter.pipeline.vae.dtype), tiled=tiled).to(latents.dtype), sampler.stats


def refine(adapter: BackboneAdapter, run: ResolvedRun, clean: torch.Tensor | None, sampler_args: dict,
           image) -> torch.Tensor:
    """The tiled refinement of the up-scaled sketch (or of noise at strength 1): the run's denoised canvas."""
    request, tiling, generator, config = run.request, run.tiling, run.generator, run.config
    scheduler = adapter.make_scheduler(request.tile, generator)
    timesteps, _ = refinement_timesteps(scheduler, config.num_inference_steps, tiling.strength,
                                        device=adapter.device)
    # Image before noise: the image-to-video pipelines draw from the generator in this order.
    condition = image_condition(adapter, image, request.height, request.width, request.num_frames, generator)
    noise = adapter.prepare_noise(request.canvas, generator)
    latents = noise if clean is None else renoise(scheduler, clean, noise, timesteps[0])
    planner, run.refine_steps = run.planner, len(timesteps)
    guide = coherence_guide(adapter, config.coherence, request, planner, config.num_inference_steps,
                            len(timesteps), clean, noise)
    sampler_kwargs = dict(planner=planner, rope=tiling.rope, desc="refine", condition=condition, coherence=guide,
                          **sampler_args)
    if run.context is None:
        run.region_cache = region_cache(adapter, config.cache, planner, len(timesteps))
        run.sampler = TiledSampler(cache=run.region_cache, **sampler_kwargs)
        return run.sampler(latents, scheduler, timesteps)
    return _refine_on_ranks(adapter, run, latents, scheduler, timesteps, guide, sampler_kwargs)


def _exchange_for(adapter: BackboneAdapter, exchange: str, scheduler, guide: CoherenceGuide | None) -> str:
    """The tile exchange the run can use: the region exchange falls back to the all-gather where it would not
    give one process's result."""
    if exchange == "region" and getattr(scheduler, "step_kwargs", {}).get("generator") is not None:
        # A scheduler that draws noise inside step() would draw it per region, not as one
        # process would; stepping the whole canvas on every rank keeps the output identical.
        logger.warning("%s draws noise in its step: using exchange='allgather'", type(adapter).__name__)
        return "allgather"
    if guide is not None and guide.views is not None and exchange != "allgather":
        # Global views read the whole canvas (sketch guidance alone works on regions).
        logger.warning("global coherence (%s) runs on the all-gather exchange under torchrun; using it",
                       guide.describe())
        return "allgather"
    return exchange


def _refine_on_ranks(adapter: BackboneAdapter, run: ResolvedRun, latents: torch.Tensor, scheduler, timesteps,
                     guide: CoherenceGuide | None, sampler_kwargs: dict) -> torch.Tensor:
    """:func:`refine` under torchrun: tiles spread over the plan's tile groups, CFG and CP installed for it."""
    from supergen.parallel import make_executor
    from supergen.parallel.hybrid import run_for
    from supergen.samplers.distributed import DistributedTiledSampler

    cache, planner = run.config.cache, run.planner
    exchange = _exchange_for(adapter, run.config.parallel.exchange, scheduler, guide)
    run.hybrid = run_for(run.context, run.plan)
    # Tiles are exchanged among the ranks of one tile slice of the mesh (same branch, same shard).
    tiles_ctx = run.hybrid.tile
    run.executor = make_executor(tiles_ctx, planner, exchange, len(timesteps), adapter.dtype)
    if exchange == "region":
        # Each rank caches its own region; decisions come from sums totalled over its tile group.
        run.region_cache = region_cache(adapter, cache, planner, len(timesteps),
                                        box=run.executor.layout.boxes[tiles_ctx.rank], reduce=tiles_ctx.reduce_ints)
    else:
        run.region_cache = region_cache(adapter, cache, planner, len(timesteps))
    run.sampler = DistributedTiledSampler(run.executor, cache=run.region_cache, **sampler_kwargs)
    with run.hybrid.installed(adapter):
        return run.sampler(latents, scheduler, timesteps)


def decode(adapter: BackboneAdapter, run: ResolvedRun, latents: torch.Tensor):
    """Frames of the run's ``output_type`` (``None`` on ranks other than 0, and when a writer took them)."""
    context, writer = run.context, run.writer
    tiled_decode = run.request.canvas[1:] != adapter.native_latent_shape[1:]
    if run.output_type == "latent":
        return latents
    if context is not None and writer is not None:
        from supergen.parallel.decode import decode_streamed

        run.executor.other_bytes += decode_streamed(
            adapter, latents, context, tiled_decode, lambda video: to_uint8(adapter.postprocess(video)),
            writer.append if context.is_main else None,
        )
        return None
    if context is not None:
        from supergen.parallel import decode_distributed

        video, moved = decode_distributed(adapter, latents, context, tiled_decode)
        run.executor.other_bytes += moved
    else:
        video = adapter.decode(latents, tiled=tiled_decode)
    frames = None if video is None else adapter.postprocess(video)
    if run.output_type == "uint8" and frames is not None:
        frames = to_uint8(frames)
    if writer is not None:
        writer.append(frames)
        return None
    return frames
