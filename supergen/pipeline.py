"""``SuperGenPipeline``: the Python entry point.

Ultra-high resolution (``__call__``): sketch at the backbone's native size ->
up-scale to the target -> re-noise to ``strength`` -> tiled refinement ->
tiled decode. The README's "How a run works" describes each stage and its options.
The request and its checks live in :mod:`supergen.request`, the stages in
:mod:`supergen.stages`, the run's metrics in :mod:`supergen.run_metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from supergen import stages
from supergen.backbones import BackboneAdapter, adapter_for
from supergen.config import (
    CacheConfig,
    CoherenceConfig,
    GenerationConfig,
    ParallelConfig,
    StreamConfig,
    TilingConfig,
)
from supergen.models import read_model_hints, read_native_size, resolve_model
from supergen.request import TiledRequest, check_request_for, validate_request
from supergen.run_metrics import run_metrics
from supergen.samplers.schedule import refinement_steps
from supergen.stages import ResolvedRun
from supergen.tiling import TilePlanner
from supergen.validation import (
    check_bool,
    check_frame_size,
    check_generator,
    check_stream_arguments,
    default_device,
    resolve_device,
)

# Names this module has always offered; they live where they are defined now.
__all__ = ["ResolvedRun", "SuperGenOutput", "SuperGenPipeline", "TiledRequest", "check_request_for",
           "validate_request"]

logger = logging.getLogger(__name__)


@dataclass
class SuperGenOutput:
    """Result of a generation: ``frames`` (F, H, W, 3) uint8 (or float/latents by ``output_type``) and ``metrics``."""

    frames: np.ndarray | torch.Tensor
    metrics: dict = field(default_factory=dict)



def _hooks_attached(method):
    """Run a pipeline method with the adapter's model hooks attached, and detached after (however it ends)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.adapter.attached():
            return method(self, *args, **kwargs)

    return run


def _or_default_configs(**configs) -> dict:
    """The nested configs of a :class:`GenerationConfig`, each ``None`` replaced by its default (``TilingConfig()``,
    ...)."""
    factories = {f.name: f.default_factory for f in dataclasses.fields(GenerationConfig)}
    return {name: factories[name]() if value is None else value for name, value in configs.items()}


def _effective_tiling(request: TiledRequest, tiling: TilingConfig) -> TilingConfig:
    """``tiling`` as the run uses it: at the native size there is nothing to refine, so strength is 1."""
    if (request.sketch_height, request.sketch_width) == (request.height, request.width) and tiling.strength < 1.0:
        # At the native size the sketch is already the video: refining it again would double the work.
        logger.info("target %dx%d is the native size: one full-schedule pass, no sketch", request.height,
                    request.width)
        return dataclasses.replace(tiling, strength=1.0)
    return tiling


class SuperGenPipeline:
    """Wraps a Diffusers video pipeline for tiled ultra-high-resolution generation.

    Build it with :meth:`from_pretrained` (built-in name, local folder or hub
    id) or :meth:`from_pipe` (an already loaded Diffusers pipeline).
    """

    # Diffusers' Wan/CogVideoX pipelines default to CFG 5-6; a checkpoint's supergen.json may say otherwise.
    DEFAULT_GUIDANCE_SCALE = 5.0

    def __init__(self, pipeline, native_size: tuple[int, int, int] | None = None,
                 default_guidance_scale: float | None = None, stream_defaults: dict | None = None):
        self.pipe = pipeline
        self.adapter: BackboneAdapter = adapter_for(pipeline, native_size=native_size)
        # What the checkpoint recommends (supergen.json), else the tiled default; streams default to no
        # guidance (causal few-step checkpoints are distilled without it) unless the checkpoint says otherwise.
        self.default_guidance_scale = (
            self.DEFAULT_GUIDANCE_SCALE if default_guidance_scale is None else float(default_guidance_scale)
        )
        self.default_stream_guidance_scale = 1.0 if default_guidance_scale is None else float(default_guidance_scale)
        # The stream settings the checkpoint recommends (supergen.json "stream"), else StreamConfig's defaults.
        self.default_stream_config = StreamConfig(**(stream_defaults or {}))

    # --- construction ---------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "tiny",
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        native_size: tuple[int, int, int] | None = None,
    ) -> "SuperGenPipeline":
        """Load a pipeline by built-in name (``tiny``), local folder or hub id.

        Args:
            torch_dtype: weights dtype (default: bfloat16 on CUDA, float32 on CPU).
            device: where to run (default: CUDA when available).
            native_size: (height, width, frames) the model was trained at, when
                neither the checkpoint's ``supergen.json`` nor the adapter's
                defaults are right.
        """
        from diffusers import DiffusionPipeline

        source = resolve_model(name_or_path)
        device = resolve_device(device) if device is not None else default_device()
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype)
        except OSError as err:
            # A hub id that is not cached while offline, a typo in an org/name, a folder with a missing file.
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            reason = reason.replace(" Please check out the root cause in the stacktrace above.", "")
            if not reason.lower().startswith("cannot load model"):
                reason = f"cannot load model {str(name_or_path)!r}: {reason}"
            raise ValueError(reason) from err
        pipe.to(device)
        hints = read_model_hints(source) if Path(source).is_dir() else {}
        if native_size is None and Path(source).is_dir():
            native_size = read_native_size(source)
        return cls(pipe, native_size=native_size, default_guidance_scale=hints.get("guidance_scale"),
                   stream_defaults=hints.get("stream"))

    @classmethod
    def from_pipe(cls, pipeline, native_size: tuple[int, int, int] | None = None) -> "SuperGenPipeline":
        """Wrap an already loaded Diffusers pipeline (weights are shared, not copied)."""
        return cls(pipeline, native_size=native_size)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    # --- validation -----------------------------------------------------------
    def check_request(
        self,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        tiling: TilingConfig | None = None,
    ) -> TiledRequest:
        """Validate sizes against the model before any model work; returns latent geometry.

        Defaults: twice the native height and width, the native frame count.
        See :func:`validate_request`.
        """
        return validate_request(self.adapter.spec, height, width, num_frames, tiling)

    def _preflight(self, prompt, request: TiledRequest, tiling: TilingConfig, guidance_scale, output_type,
                   max_memory, max_sequence_length, context) -> None:
        """Refuse a request that does not fit in memory (or has absurdly many tiles); warn about what it loses.

        The weights are loaded, so the device's free memory already excludes
        them; under a multi-process job every rank refuses together, against
        the smallest free memory of any rank.
        """
        from supergen.resources import agreed_budget, check_tiled_request, parse_memory, refused_together
        from supergen.validation import warn_long_prompt, warn_small_tiles

        budget = agreed_budget(self.device, context)
        try:
            check_tiled_request(
                self.adapter.spec, request, tiling, self.footprint, device=self.device,
                dtype_bytes=self.adapter.dtype.itemsize,
                max_memory=None if max_memory is None else parse_memory(max_memory),
                guidance=guidance_scale > 1.0, decode=output_type != "latent", count_weights=False, budget=budget,
            )
        except ValueError as err:
            raise refused_together(context, err) from None
        geo = self.adapter.geometry
        warn_small_tiles((request.tile[1] * geo.scale_spatial, request.tile[2] * geo.scale_spatial),
                         (self.adapter.native_height, self.adapter.native_width))
        warn_long_prompt(self.pipe, prompt, max_sequence_length or self.adapter.default_max_sequence_length)

    @property
    def footprint(self):
        """Parameter count and transformer widths, for :mod:`supergen.resources` estimates."""
        if getattr(self, "_footprint", None) is None:
            from supergen.resources import footprint_of_pipeline

            self._footprint = footprint_of_pipeline(self.pipe)
        return self._footprint

    # --- generation -------------------------------------------------------
    def plan(self, height=None, width=None, num_frames=None, tiling: TilingConfig | None = None,
             cache: CacheConfig | None = None, steps: int | None = None) -> TilePlanner:
        """The refinement tile planner a request would use (validates the request); ``cache`` decides the
        default grid schedule (see ``TilingConfig.shift_every``) and ``steps`` (refinement steps) its phase."""
        tiling = tiling or TilingConfig()
        return stages.make_planner(self.adapter, self.check_request(height, width, num_frames, tiling), tiling, cache,
                                   steps)

    def __call__(
        self,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        tiling: TilingConfig | None = None,
        cache: CacheConfig | None = None,
        output_type: str = "uint8",
        progress: bool = True,
        max_sequence_length: int | None = None,
        image=None,
        parallel: ParallelConfig | None = None,
        context=None,
        coherence: CoherenceConfig | None = None,
        max_memory: int | str | None = None,
        writer=None,
    ) -> SuperGenOutput:
        """Generate a video larger than the backbone's native size.

        Args:
            height, width, num_frames: target size (default: 2x native height and width, native frame count).
            guidance_scale: CFG scale (default: ``default_guidance_scale``, 5 unless the checkpoint's
                ``supergen.json`` recommends another).
            seed: seeds a CPU ``torch.Generator`` (ignored when ``generator`` is given).
            tiling: tile geometry, blend, shift, RoPE, strength, up-scale mode.
            coherence: how the refinement keeps the sketch's layout (one subject, not one per tile): sketch
                guidance and global views.
            cache: region-aware step cache of the refinement stage (the native-size sketch always runs every step).
            output_type: ``uint8`` frames (F,H,W,3), ``float`` frames in [0, 1] (what Diffusers'
                ``output_type='np'`` gives), or ``latent``.
            image: the first frame, for image-to-video pipelines (a PIL image, or anything the pipeline's
                ``video_processor.preprocess`` takes); it is resized with the video to each stage's size.
            parallel: how tiles are spread over ranks (``exchange``).
            context: the :class:`supergen.parallel.DistributedContext` of a multi-process job (``None``: this
                process alone). Every rank calls with the same arguments; frames come back on rank 0 (``None`` on
                the others; latents on every rank).
            max_memory: refuse (``ValueError``, before any model work) a request whose estimated peak memory,
                weights included, is above this many bytes (or a size such as ``"16G"``); a request over the
                device's free memory is refused either way (:mod:`supergen.resources`).
            writer: something with ``append(frames)`` (a :class:`supergen.io.VideoWriter`), used on rank 0:
                uint8 frames are streamed into it as they are decoded (under torchrun frame by frame from
                every rank's band, so rank 0 never holds the float video) and ``frames`` comes back ``None``.
        """
        # GenerationConfig checks the arguments' types and ranges (``resolve`` the generator and the sizes).
        config = GenerationConfig(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
            seed=seed, max_sequence_length=max_sequence_length,
            **_or_default_configs(tiling=tiling, coherence=coherence, cache=cache, parallel=parallel),
        )
        return self.generate(config, generator=generator, image=image, output_type=output_type, progress=progress,
                             context=context, max_memory=max_memory, writer=writer)

    @torch.no_grad()
    @_hooks_attached
    def generate(self, config: GenerationConfig, *, generator: torch.Generator | None = None, image=None,
                 output_type: str = "uint8", progress: bool = True, context=None, max_memory: int | str | None = None,
                 writer=None) -> SuperGenOutput:
        """Run one :class:`~supergen.GenerationConfig` (what the CLI and the demo build); see :meth:`__call__`.

        The request is resolved once (:meth:`resolve`: every check, before any model
        work), then the stages run in a fixed order, each logged and timed: encode,
        sketch, refine, decode, metrics (:mod:`supergen.stages`).
        """
        run = self.resolve(config, generator=generator, image=image, output_type=output_type, progress=progress,
                           context=context, max_memory=max_memory, writer=writer)
        adapter = self.adapter
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        run.started = time.perf_counter()
        with run.stage("encode"):
            cond = adapter.encode_prompt(config.prompt, config.negative_prompt, run.guidance_scale,
                                         config.max_sequence_length, image=image)
        run.planner = stages.make_planner(adapter, run.request, run.tiling, config.cache,
                                          refinement_steps(config.num_inference_steps, run.tiling.strength))
        run.log_plan()
        sampler_args = dict(adapter=adapter, cond=cond, guidance_scale=run.guidance_scale,
                            guidance_scale_2=config.guidance_scale_2, tile_batch_size=run.tiling.tile_batch_size,
                            progress=run.progress)
        clean = None
        if run.tiling.strength < 1.0:
            with run.stage("sketch"):
                clean, run.sketch_stats = stages.sketch(adapter, run.request, run.tiling, config.num_inference_steps,
                                                        run.generator, sampler_args, image, cache=config.cache)
        with run.stage("refine"):
            latents = stages.refine(adapter, run, clean, sampler_args, image)
        with run.stage("decode"):
            frames = stages.decode(adapter, run, latents)
        return SuperGenOutput(frames=frames, metrics=run_metrics(adapter, run))

    def resolve(self, config: GenerationConfig, *, generator: torch.Generator | None = None, image=None,
                output_type: str = "uint8", progress: bool = True, context=None, max_memory: int | str | None = None,
                writer=None) -> ResolvedRun:
        """Check ``config`` against the model, the device and the job (every rank alike) and fix what the run does.

        Raises ``ValueError`` / ``TypeError`` before any model work; the result holds the validated
        request in latent cells, the effective tiling, guidance and parallel plan, and the stage timers.
        """
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        check_generator(generator)
        check_bool("progress", progress)
        self._check_outputs(output_type, writer, image)
        guidance_scale = self.default_guidance_scale if config.guidance_scale is None else config.guidance_scale
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")
        request = self.check_request(config.height, config.width, config.num_frames, config.tiling)
        tiling = _effective_tiling(request, config.tiling)
        self._preflight(config.prompt, request, tiling, guidance_scale, output_type, max_memory,
                        config.max_sequence_length, context)
        distributed = context is not None and context.enabled
        self._check_cache(config.cache, refinement_steps(config.num_inference_steps, tiling.strength), distributed)
        plan = None
        if distributed:
            self._agree_on_request(context, config, request, tiling, guidance_scale, generator, output_type, image)
            progress = progress and context.is_main
            plan = self._parallel_plan(config.parallel, context, request, tiling, guidance_scale,
                                       config.num_inference_steps)
        return ResolvedRun(
            config=config, request=request, tiling=tiling, guidance_scale=guidance_scale,
            generator=generator or torch.Generator(device="cpu").manual_seed(config.seed), output_type=output_type,
            progress=progress, context=context if distributed else None, plan=plan, writer=writer,
        )

    def _check_outputs(self, output_type: str, writer, image) -> None:
        """The output type, the writer and the image against each other and the pipeline."""
        if output_type not in ("uint8", "float", "latent"):
            raise ValueError(f"output_type={output_type!r} must be uint8, float or latent")
        if writer is not None and output_type != "uint8":
            raise ValueError(f"a writer takes uint8 frames: output_type={output_type!r} cannot be streamed to it")
        if self.adapter.image_to_video and image is None:
            raise ValueError(f"{type(self.pipe).__name__} is image-to-video: pass image=... (the first frame)")
        if image is not None and not self.adapter.image_to_video:
            raise ValueError(
                f"{type(self.pipe).__name__} is not an image-to-video pipeline; it takes no image "
                "(load the model's image-to-video pipeline instead)"
            )

    def _check_cache(self, cache: CacheConfig, refine_steps: int, distributed: bool) -> None:
        """The cache's schedule against the refinement steps, and its reuse mode against the adapter and the job."""
        cache.check_schedule(refine_steps)
        if cache.enabled and cache.reuse == "blocks" and not self.adapter.supports_block_reuse:
            raise ValueError(
                f"cache reuse='blocks' needs a backbone adapter that can skip its transformer blocks; "
                f"{type(self.adapter).__name__} cannot: use reuse='output'"
            )
        if distributed and cache.enabled and stages.reuse_mode(cache) == "blocks":
            # Each rank keeps the cache state of its own cells; a tile's blocks residual would have to travel
            # to every owner of its tokens (dim values per token), more than the region exchange moves.
            raise ValueError(
                "cache reuse='blocks' runs in one process only: under torchrun use reuse='output' (the default), "
                "'taylor' or 'residual', which every rank serves from its own part of the canvas"
            )

    def _agree_on_request(self, context, config: GenerationConfig, request: TiledRequest, tiling: TilingConfig,
                          guidance_scale: float, generator, output_type: str, image) -> None:
        """Refuse, on every rank together, a job whose ranks were not all given the same request."""
        parallel = config.parallel
        context.ensure_same(
            "generation requests",
            dict(
                prompt=config.prompt, negative_prompt=config.negative_prompt, request=request,
                steps=config.num_inference_steps, guidance=(guidance_scale, config.guidance_scale_2),
                tiling=tiling, coherence=config.coherence,
                parallel=(parallel.exchange, parallel.parallel, parallel.cfg_parallel, parallel.ulysses,
                          parallel.ring),
                seed=generator.initial_seed() if generator is not None else config.seed, output_type=output_type,
                model=self.adapter.describe(), max_sequence_length=config.max_sequence_length,
                image=None if image is None else getattr(image, "size", type(image).__name__),
            ),
        )

    # --- streaming --------------------------------------------------------------
    def check_stream(
        self, stream: StreamConfig, height: int | None = None, width: int | None = None, num_blocks: int | None = None
    ) -> tuple[int, int]:
        """Validate a stream request against the model before any model work; returns (height, width)."""
        if not isinstance(stream, StreamConfig):
            raise ValueError(f"stream must be a StreamConfig, got {type(stream).__name__}")
        adapter = self.adapter
        adapter.check_streaming()
        if num_blocks is not None and (not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1):
            raise ValueError(f"num_blocks={num_blocks!r} must be an integer >= 1, or None for an endless stream")
        geo = adapter.geometry
        height = adapter.native_height if height is None else height
        width = adapter.native_width if width is None else width
        check_frame_size(geo, height, width)
        patch_t = geo.patch[0]
        for name in ("block_frames", "window", "sink"):
            value = getattr(stream, name)
            if value % patch_t:
                raise ValueError(
                    f"{name}={value} latent frames is not a multiple of the transformer's temporal patch {patch_t}; "
                    "a token would straddle two blocks"
                )
        return height, width

    def _preflight_stream(self, prompt, stream: StreamConfig, height, width, guidance_scale, max_memory,
                          max_sequence_length) -> None:
        from supergen.resources import check_stream_request, parse_memory
        from supergen.validation import warn_long_prompt

        check_stream_request(
            self.adapter.spec, stream, height, width, self.footprint, device=self.device,
            dtype_bytes=self.adapter.dtype.itemsize, guidance=guidance_scale > 1.0,
            max_memory=None if max_memory is None else parse_memory(max_memory), count_weights=False,
        )
        warn_long_prompt(self.pipe, prompt, max_sequence_length or self.adapter.default_max_sequence_length)

    def stream(
        self,
        prompt: str,
        num_blocks: int | None = None,
        stream: StreamConfig | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        scheduler=None,
        output_type: str = "uint8",
        cached: bool = True,
        max_sequence_length: int | None = None,
        max_memory: int | str | None = None,
    ):
        """Stream video block by block; returns a :class:`~supergen.stream.VideoStream` iterator.

        Each item is a :class:`~supergen.stream.StreamBlock` with that block's frames (uint8 F,H,W,3) and
        metrics; ``num_blocks=None`` streams until the caller stops (``close()``, or ``break`` inside ``with``).
        Change the prompt between blocks with ``set_prompt``.

        Args:
            stream: block length, window, sink, steps, schedule, KV write mode, prompt-change handling (default:
                ``default_stream_config``, the checkpoint's recommended settings from its ``supergen.json`` or
                else ``StreamConfig()``).
            height, width: frame size in pixels (default: the native size).
            guidance_scale: CFG scale (default: ``default_stream_guidance_scale``: 1.0, no guidance, as causal
                few-step checkpoints run, unless the checkpoint's ``supergen.json`` recommends a scale).
            scheduler: a Diffusers scheduler to copy per block (default: the pipeline's);
                ``FlowMatchEulerDiscreteScheduler(shift=5.0, stochastic_sampling=True)`` is Self-Forcing's
                few-step sampler.
            cached: ``False`` re-runs the whole history every forward (the exactness reference and benchmark
                baseline; cost grows per block).
            max_memory: refuse a stream whose estimated peak memory (weights, KV cache, one block's work) is
                above this many bytes, or a size like ``"8G"``.
        """
        from supergen.stream import VideoStream

        check_stream_arguments(
            prompt=prompt, negative_prompt=negative_prompt, num_blocks=num_blocks, stream=stream, height=height,
            width=width, guidance_scale=guidance_scale, seed=seed, generator=generator,
            max_sequence_length=max_sequence_length,
        )
        stream = stream or self.default_stream_config
        guidance_scale = self._stream_guidance(output_type, guidance_scale)
        height, width = self.check_stream(stream, height, width, num_blocks)
        self._preflight_stream(prompt, stream, height, width, guidance_scale, max_memory, max_sequence_length)
        generator = generator or torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            return VideoStream(self, prompt, negative_prompt, num_blocks, stream, height, width, guidance_scale,
                               generator, scheduler=scheduler, output_type=output_type, cached=cached,
                               max_sequence_length=max_sequence_length)

    def _stream_guidance(self, output_type: str, guidance_scale: float | None) -> float:
        """A stream's CFG scale (the checkpoint's default when ``None``), once it and ``output_type`` are checked."""
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type={output_type!r} must be uint8 or float")
        if guidance_scale is None:
            guidance_scale = self.default_stream_guidance_scale
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")
        return guidance_scale

    def _parallel_plan(self, parallel: ParallelConfig, context, request: TiledRequest, tiling: TilingConfig,
                       guidance_scale: float, num_inference_steps: int):
        """The run's :class:`~supergen.parallel.plan.ParallelPlan` (validated, or chosen from the cost model),
        before any model work; the same on every rank, so a refusal is every rank's."""
        from supergen.parallel import AgreedError
        from supergen.parallel.plan import resolve_plan, step_time

        workload = self.parallel_workload(request, tiling, guidance_scale, parallel.exchange,
                                          refinement_steps(num_inference_steps, tiling.strength))
        try:
            plan = resolve_plan(context.world_size, workload, parallel.parallel, parallel.cfg_parallel,
                                parallel.ulysses, parallel.ring)
        except ValueError as err:
            raise AgreedError(str(err)) from None
        if context.is_main:
            modelled = step_time(plan, workload)
            logger.info("parallel plan (%s): %s; modelled on H100 NVLink: %.3g s/step, efficiency %.0f%%",
                        "explicit" if parallel.parallel == "tile" or parallel.cfg_parallel or parallel.ulysses
                        or parallel.ring else "auto", plan.describe(), modelled["step_s"],
                        100 * modelled["efficiency"])
        return plan

    def parallel_workload(self, request: TiledRequest, tiling: TilingConfig, guidance_scale: float,
                          exchange: str = "region", steps: int = 4):
        """What the parallel planner checks and costs a request against (model widths, tiles, bytes)."""
        from functools import lru_cache

        from supergen.parallel.hybrid import context_parallel_support
        from supergen.parallel.layout import exchange_bytes
        from supergen.parallel.plan import Workload

        planner = stages.make_planner(self.adapter, request, tiling)
        config = self.pipe.transformer.config
        support = [context_parallel_support(m) for m in self.adapter.context_parallel_models()]
        channels = self.adapter.geometry.channels
        sampled = max(1, min(steps, 4))

        @lru_cache(maxsize=None)
        def moved(world: int) -> float:
            return exchange_bytes(planner, world, sampled, channels, exchange, self.adapter.dtype.itemsize)

        fp = self.footprint
        return Workload(
            tiles=planner.num_tiles, tile_tokens=self.adapter.tokens(request.tile),
            tile_numel=channels * math.prod(request.tile), layers=fp.num_layers, dim=fp.inner_dim,
            heads=int(config.get("num_attention_heads", 1)), ffn=fp.ffn_dim, guidance=guidance_scale > 1.0,
            itemsize=self.adapter.dtype.itemsize, cp_plan=all(s[0] for s in support),
            ring_ok=all(s[1] for s in support), cfg_ok=self.adapter.supports_cfg_parallel,
            rope_ok=tiling.rope == "local", model=type(self.pipe.transformer).__name__, exchange_bytes=moved,
        )

