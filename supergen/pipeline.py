"""``SuperGenPipeline``: the Python entry point.

Ultra-high resolution (``__call__``): sketch at the backbone's native size ->
up-scale to the target -> re-noise to ``strength`` -> tiled refinement ->
tiled decode. The README's "How a run works" describes each stage and its options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from supergen.backbones import BackboneAdapter, ModelSpec, adapter_for, spec_from_folder
from supergen.cache import CacheSchedule, RegionCache
from supergen.config import (
    CacheConfig,
    CoherenceConfig,
    GenerationConfig,
    ParallelConfig,
    StreamConfig,
    TilingConfig,
)
from supergen.io import to_uint8
from supergen.models import read_model_hints, read_native_size, resolve_model
from supergen.samplers.coherence import CoherenceGuide
from supergen.samplers.schedule import refinement_steps, refinement_timesteps, renoise
from supergen.samplers.tiled import TiledSampler, TileStats
from supergen.tiling import TilePlanner, resize_latents, resize_video
from supergen.tiling.coherence import DilatedViews
from supergen.validation import (
    check_bool,
    check_frame_size,
    check_generator,
    check_stream_arguments,
    check_target_size,
    resolve_device,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TiledRequest:
    """A validated ultra-high-resolution request.

    ``height``, ``width``, ``num_frames`` and the sketch size are pixels; ``canvas``,
    ``tile``, ``overlap_cells`` and ``shift_stride_cells`` are latent cells (F, H, W),
    the unit of :class:`~supergen.tiling.TilePlanner`.
    """

    height: int
    width: int
    num_frames: int
    canvas: tuple[int, int, int]
    tile: tuple[int, int, int]
    overlap_cells: tuple[int, int, int]
    shift_stride_cells: tuple[int, int] | None
    sketch_height: int
    sketch_width: int

    @property
    def overlap(self) -> tuple[int, int, int]:
        """Deprecated name of :attr:`overlap_cells` (``TilingConfig.overlap`` is pixels)."""
        warnings.warn("TiledRequest.overlap is now overlap_cells (latent cells)", DeprecationWarning, stacklevel=2)
        return self.overlap_cells

    @property
    def shift_stride(self) -> tuple[int, int] | None:
        """Deprecated name of :attr:`shift_stride_cells` (``TilingConfig.shift_stride`` is pixels)."""
        warnings.warn("TiledRequest.shift_stride is now shift_stride_cells (latent cells)", DeprecationWarning,
                      stacklevel=2)
        return self.shift_stride_cells


@dataclass
class SuperGenOutput:
    """Result of a generation: ``frames`` (F, H, W, 3) uint8 (or float/latents by ``output_type``) and ``metrics``."""

    frames: np.ndarray | torch.Tensor
    metrics: dict = field(default_factory=dict)


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


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux: the process's peak resident set.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def validate_request(
    spec: ModelSpec,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    tiling: TilingConfig | None = None,
) -> TiledRequest:
    """Validate sizes against a model's geometry and native size; returns the request in latent cells.

    Needs only the model's :class:`~supergen.backbones.ModelSpec`, so it runs
    as well before the weights load (:func:`check_request_for`) as after
    (:meth:`SuperGenPipeline.check_request`). Defaults: twice the native
    height and width, the native frame count. Raises ``ValueError`` naming the
    bad size and a value that would work.
    """
    tiling = tiling or TilingConfig()
    height, width, num_frames = _target_size(spec, height, width, num_frames, tiling)
    tile_px = _tile_size(spec, tiling, height, width, num_frames)
    geo = spec.geometry
    canvas = geo.latent_shape(height, width, num_frames)
    tile = geo.latent_shape(*tile_px)
    overlap, stride = _overlap_and_stride_cells(geo, tiling, canvas, tile)
    # The sketch keeps the target's aspect ratio at (about) the native area.
    nh, nw, _ = spec.native_size
    mult_h, mult_w = geo.pixel_multiple
    scale = min(1.0, math.sqrt((nh * nw) / (height * width)))
    sketch_h = min(height, max(mult_h, round(height * scale / mult_h) * mult_h))
    sketch_w = min(width, max(mult_w, round(width * scale / mult_w) * mult_w))
    return TiledRequest(height, width, num_frames, canvas, tile, overlap, stride, sketch_h, sketch_w)


def _target_size(spec: ModelSpec, height, width, num_frames, tiling: TilingConfig) -> tuple[int, int, int]:
    """The target (height, width, frames) in pixels, defaults filled in, each checked against the geometry."""
    geo = spec.geometry
    nh, nw, nf = spec.native_size
    t = geo.scale_temporal
    check_target_size(height, width, num_frames, frames_hint=f" ({t}k+1 frames: 1, {t + 1}, {2 * t + 1}, ...)")
    height = 2 * nh if height is None else height
    width = 2 * nw if width is None else width
    num_frames = nf if num_frames is None else num_frames
    mult_h, mult_w = geo.pixel_multiple
    for name, value, mult in (("height", height, mult_h), ("width", width, mult_w)):
        if value % mult:
            raise ValueError(
                f"{name} {value} is not a multiple of {mult} (VAE {geo.scale_spatial} x patch {mult // geo.scale_spatial}); "
                f"try {max(mult, round(value / mult) * mult)}"
            )
    for name, value, native in (("height", height, nh), ("width", width, nw)):
        if value < native:
            raise ValueError(
                f"{name} {value} is smaller than the model's native {name} {native}; SuperGen refines at or "
                "above the native size: use the plain Diffusers pipeline for smaller videos"
            )
    if (num_frames - 1) % geo.scale_temporal:
        raise ValueError(
            f"num_frames {num_frames} must be {geo.scale_temporal}k+1 (VAE temporal factor {geo.scale_temporal}); "
            f"try {((num_frames - 1) // geo.scale_temporal) * geo.scale_temporal + 1}"
        )
    pt = geo.patch[0]
    for name, frames in (("num_frames", num_frames), ("tile_frames", tiling.tile_frames or min(nf, num_frames))):
        if geo.latent_frames(frames) % pt:
            raise ValueError(
                f"{name} {frames} gives {geo.latent_frames(frames)} latent frames, not a multiple of the "
                f"transformer's temporal patch {pt}; try {geo.pixel_frames(-(-geo.latent_frames(frames) // pt) * pt)}"
            )
    if tiling.rope == "absolute" and not spec.supports_absolute_rope:
        raise ValueError(
            f"rope='absolute' is not available for {spec.pipeline_class}: its adapter cannot offset RoPE "
            "positions per tile; use rope='local'"
        )
    return height, width, num_frames


def _tile_size(spec: ModelSpec, tiling: TilingConfig, height: int, width: int,
               num_frames: int) -> tuple[int, int, int]:
    """The tile (height, width, frames) in pixels (default: native), checked against the canvas and geometry."""
    geo = spec.geometry
    nh, nw, nf = spec.native_size
    mult_h, mult_w = geo.pixel_multiple
    tile_h = tiling.tile_height or nh
    tile_w = tiling.tile_width or nw
    tile_f = tiling.tile_frames or min(nf, num_frames)
    for name, tile, canvas, unit in (
        ("tile_height", tile_h, height, "pixels"),
        ("tile_width", tile_w, width, "pixels"),
        ("tile_frames", tile_f, num_frames, "frames"),
    ):
        if tile > canvas:
            raise ValueError(f"{name} {tile} is larger than the canvas ({canvas} {unit}); use a smaller tile")
    for name, tile, mult in (("tile_height", tile_h, mult_h), ("tile_width", tile_w, mult_w)):
        if tile % mult:
            raise ValueError(f"{name} {tile} is not a multiple of {mult} (VAE x patch)")
    if (tile_f - 1) % geo.scale_temporal:
        raise ValueError(f"tile_frames {tile_f} must be {geo.scale_temporal}k+1 (VAE temporal factor)")
    return tile_h, tile_w, tile_f


def _overlap_and_stride_cells(geo, tiling: TilingConfig, canvas, tile):
    """The tiling's pixel overlaps and grid stride in latent cells, rounded up to the patch (the planner's unit)."""
    pt, ph, pw = geo.patch

    def cells(pixels: int, scale: int, patch: int) -> int:
        return math.ceil(math.ceil(pixels / scale) / patch) * patch

    overlap = (
        cells(tiling.frame_overlap, geo.scale_temporal, pt),
        cells(tiling.overlap, geo.scale_spatial, ph),
        cells(tiling.overlap, geo.scale_spatial, pw),
    )
    for axis, name in ((1, "overlap"), (2, "overlap"), (0, "frame_overlap")):
        if tile[axis] < canvas[axis] and overlap[axis] >= tile[axis]:
            raise ValueError(
                f"{name} {overlap[axis]} latent cells is not smaller than the tile ({tile[axis]} cells); reduce it"
            )
    stride = None
    if tiling.shift_stride is not None:
        stride = tuple(max(p, cells(tiling.shift_stride, geo.scale_spatial, p)) for p in (ph, pw))
    return overlap, stride


def check_request_for(
    name_or_path: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    tiling: TilingConfig | None = None,
    native_size: tuple[int, int, int] | None = None,
) -> TiledRequest | None:
    """Validate a request for a model from its config files, before (and without) loading any weights.

    Same checks and messages as :meth:`SuperGenPipeline.check_request` on the
    loaded model; ``native_size`` and the checkpoint's ``supergen.json`` are
    applied as :meth:`SuperGenPipeline.from_pretrained` applies them. Built-in
    names resolve to their folder (a tiny model is built on first use).
    Returns ``None`` for a hub id: its configs are not here, and the check
    after loading still runs.
    """
    source = Path(resolve_model(name_or_path))
    if not source.is_dir():
        return None
    spec = spec_from_folder(source, native_size=native_size or read_native_size(source))
    return validate_request(spec, height, width, num_frames, tiling)


def _hooks_attached(method):
    """Run a pipeline method with the adapter's model hooks attached, and detached after (however it ends)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.adapter.attached():
            return method(self, *args, **kwargs)

    return run


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
        device = resolve_device(device) if device is not None else _default_device()
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
    def _planner(self, request: TiledRequest, tiling: TilingConfig, cache: CacheConfig | None = None,
                 steps: int | None = None) -> TilePlanner:
        every = (cache or CacheConfig()).grid_shift_every(tiling)
        return TilePlanner(
            canvas=request.canvas,
            tile=request.tile,
            overlap=request.overlap_cells,
            align=self.adapter.geometry.patch,
            blend=tiling.blend,
            shift=tiling.shift,
            shift_stride=request.shift_stride_cells,
            shift_every=every,
            # The last refinement step moves the grid, so its tile boundaries are where the every-step grid's are.
            shift_phase=0 if steps is None else (steps - 1) % every,
        )

    def plan(self, height=None, width=None, num_frames=None, tiling: TilingConfig | None = None,
             cache: CacheConfig | None = None, steps: int | None = None) -> TilePlanner:
        """The refinement tile planner a request would use (validates the request); ``cache`` decides the
        default grid schedule (see ``TilingConfig.shift_every``) and ``steps`` (refinement steps) its phase."""
        tiling = tiling or TilingConfig()
        return self._planner(self.check_request(height, width, num_frames, tiling), tiling, cache, steps)

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
            height, width, num_frames: target size (default: 2x native height
                and width, native frame count).
            guidance_scale: CFG scale (default: ``default_guidance_scale``, 5 unless
                the checkpoint's ``supergen.json`` recommends another).
            seed: seeds a CPU ``torch.Generator`` (ignored when ``generator`` is given).
            tiling: tile geometry, blend, shift, RoPE, strength, up-scale mode.
            coherence: how the refinement keeps the sketch's layout (one subject,
                not one per tile): sketch guidance and global views.
            cache: region-aware step cache of the refinement stage (the
                native-size sketch always runs every step).
            output_type: ``uint8`` frames (F,H,W,3), ``float`` frames in [0, 1]
                (what Diffusers' ``output_type='np'`` gives), or ``latent``.
            image: the first frame, for image-to-video pipelines (a PIL image,
                or anything the pipeline's ``video_processor.preprocess``
                takes); it is resized with the video to each stage's size.
            parallel: how tiles are spread over ranks (``exchange``).
            context: the :class:`supergen.parallel.DistributedContext` of a
                multi-process job (``None``: this process alone). Every rank
                calls with the same arguments; frames come back on rank 0
                (``None`` on the others; latents on every rank).
            max_memory: refuse (``ValueError``, before any model work) a request whose
                estimated peak memory, weights included, is above this many bytes
                (or a size such as ``"16G"``); a request over the device's free memory
                is refused either way (:mod:`supergen.resources`).
            writer: something with ``append(frames)`` (a :class:`supergen.io.VideoWriter`), used on rank 0:
                uint8 frames are streamed into it as they are decoded (under torchrun frame by frame from
                every rank's band, so rank 0 never holds the float video) and ``frames`` comes back ``None``.
        """
        # GenerationConfig checks the arguments' types and ranges (``resolve`` the generator and the sizes).
        config = GenerationConfig(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
            seed=seed, tiling=TilingConfig() if tiling is None else tiling,
            coherence=CoherenceConfig() if coherence is None else coherence,
            cache=CacheConfig() if cache is None else cache, parallel=ParallelConfig() if parallel is None else parallel,
            max_sequence_length=max_sequence_length,
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
        sketch, refine, decode, metrics.
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
        run.planner = self._planner(run.request, run.tiling, config.cache,
                                    refinement_steps(config.num_inference_steps, run.tiling.strength))
        run.log_plan()
        sampler_args = dict(adapter=adapter, cond=cond, guidance_scale=run.guidance_scale,
                            guidance_scale_2=config.guidance_scale_2, tile_batch_size=run.tiling.tile_batch_size,
                            progress=run.progress)
        clean = None
        if run.tiling.strength < 1.0:
            with run.stage("sketch"):
                clean, run.sketch_stats = self._sketch(run.request, run.tiling, config.num_inference_steps,
                                                       run.generator, sampler_args, image, cache=config.cache)
        with run.stage("refine"):
            latents = self._refine(run, clean, sampler_args, image)
        with run.stage("decode"):
            frames = self._decode(run, latents)
        return SuperGenOutput(frames=frames, metrics=self._run_metrics(run))

    def resolve(self, config: GenerationConfig, *, generator: torch.Generator | None = None, image=None,
                output_type: str = "uint8", progress: bool = True, context=None, max_memory: int | str | None = None,
                writer=None) -> "ResolvedRun":
        """Check ``config`` against the model, the device and the job (every rank alike) and fix what the run does.

        Raises ``ValueError`` / ``TypeError`` before any model work; the result holds the validated
        request in latent cells, the effective tiling, guidance and parallel plan, and the stage timers.
        """
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        check_generator(generator)
        check_bool("progress", progress)
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
        tiling, cache, parallel = config.tiling, config.cache, config.parallel
        guidance_scale = self.default_guidance_scale if config.guidance_scale is None else config.guidance_scale
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")
        request = self.check_request(config.height, config.width, config.num_frames, tiling)
        if (request.sketch_height, request.sketch_width) == (request.height, request.width) and tiling.strength < 1.0:
            # At the native size the sketch is already the video: refining it again would double the work.
            logger.info("target %dx%d is the native size: one full-schedule pass, no sketch", request.height,
                        request.width)
            tiling = dataclasses.replace(tiling, strength=1.0)
        self._preflight(config.prompt, request, tiling, guidance_scale, output_type, max_memory,
                        config.max_sequence_length, context)
        cache.check_schedule(refinement_steps(config.num_inference_steps, tiling.strength))
        if cache.enabled and cache.reuse == "blocks" and not self.adapter.supports_block_reuse:
            raise ValueError(
                f"cache reuse='blocks' needs a backbone adapter that can skip its transformer blocks; "
                f"{type(self.adapter).__name__} cannot: use reuse='output'"
            )
        distributed = context is not None and context.enabled
        if distributed and cache.enabled and self._reuse_mode(cache) == "blocks":
            # Each rank keeps the cache state of its own cells; a tile's blocks residual would have to travel
            # to every owner of its tokens (dim values per token), more than the region exchange moves.
            raise ValueError(
                "cache reuse='blocks' runs in one process only: under torchrun use reuse='output' (the default), "
                "'taylor' or 'residual', which every rank serves from its own part of the canvas"
            )
        plan = None
        if distributed:
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
            progress = progress and context.is_main
            plan = self._parallel_plan(parallel, context, request, tiling, guidance_scale, config.num_inference_steps)
        return ResolvedRun(
            config=config, request=request, tiling=tiling, guidance_scale=guidance_scale,
            generator=generator or torch.Generator(device="cpu").manual_seed(config.seed), output_type=output_type,
            progress=progress, context=context if distributed else None, plan=plan, writer=writer,
        )

    def _refine(self, run: "ResolvedRun", clean: torch.Tensor | None, sampler_args: dict, image) -> torch.Tensor:
        """The tiled refinement of the up-scaled sketch (or of noise at strength 1): the run's denoised canvas."""
        adapter, request, tiling, generator = self.adapter, run.request, run.tiling, run.generator
        config = run.config
        scheduler = adapter.make_scheduler(request.tile, generator)
        timesteps, _ = refinement_timesteps(scheduler, config.num_inference_steps, tiling.strength, device=self.device)
        # Image before noise: the image-to-video pipelines draw from the generator in this order.
        condition = self._condition(image, request.height, request.width, request.num_frames, generator)
        noise = adapter.prepare_noise(request.canvas, generator)
        latents = noise if clean is None else renoise(scheduler, clean, noise, timesteps[0])
        planner, run.refine_steps = run.planner, len(timesteps)
        guide = self._coherence_guide(config.coherence, request, planner, config.num_inference_steps, len(timesteps),
                                      clean, noise)
        sampler_kwargs = dict(planner=planner, rope=tiling.rope, desc="refine", condition=condition, coherence=guide,
                              **sampler_args)
        if run.context is None:
            run.region_cache = self._region_cache(config.cache, planner, len(timesteps))
            run.sampler = TiledSampler(cache=run.region_cache, **sampler_kwargs)
            return run.sampler(latents, scheduler, timesteps)
        from supergen.parallel import make_executor
        from supergen.parallel.hybrid import run_for
        from supergen.samplers.distributed import DistributedTiledSampler

        exchange = config.parallel.exchange
        if exchange == "region" and getattr(scheduler, "step_kwargs", {}).get("generator") is not None:
            # A scheduler that draws noise inside step() would draw it per region, not as one
            # process would; stepping the whole canvas on every rank keeps the output identical.
            logger.warning("%s draws noise in its step: using exchange='allgather'", type(adapter).__name__)
            exchange = "allgather"
        if guide is not None and guide.views is not None and exchange != "allgather":
            # Global views read the whole canvas (sketch guidance alone works on regions).
            logger.warning("global coherence (%s) runs on the all-gather exchange under torchrun; using it",
                           guide.describe())
            exchange = "allgather"
        run.hybrid = run_for(run.context, run.plan)
        # Tiles are exchanged among the ranks of one tile slice of the mesh (same branch, same shard).
        tiles_ctx = run.hybrid.tile
        run.executor = make_executor(tiles_ctx, planner, exchange, len(timesteps), adapter.dtype)
        if exchange == "region":
            # Each rank caches its own region; decisions come from sums totalled over its tile group.
            run.region_cache = self._region_cache(config.cache, planner, len(timesteps),
                                                  box=run.executor.layout.boxes[tiles_ctx.rank],
                                                  reduce=tiles_ctx.reduce_ints)
        else:
            run.region_cache = self._region_cache(config.cache, planner, len(timesteps))
        run.sampler = DistributedTiledSampler(run.executor, cache=run.region_cache, **sampler_kwargs)
        with run.hybrid.installed(adapter):
            return run.sampler(latents, scheduler, timesteps)

    def _decode(self, run: "ResolvedRun", latents: torch.Tensor):
        """Frames of the run's ``output_type`` (``None`` on ranks other than 0, and when a writer took them)."""
        adapter, context, writer = self.adapter, run.context, run.writer
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

    def _run_metrics(self, run: "ResolvedRun") -> dict:
        """What the run did: tiles, cache, sketch, parallel plan and bytes, stage times, peak memory."""
        steps = run.config.num_inference_steps
        metrics = self._metrics(run.request, steps, run.sampler.stats, run.planner, run.tiling)
        metrics["cache"] = self._cache_metrics(run.config.cache, run.region_cache)
        if run.sketch_stats is not None:
            metrics["sketch"] = {"steps_total": run.sketch_stats.tile_steps_total,
                                 "steps_computed": run.sketch_stats.tile_steps_computed,
                                 "model_calls": run.sketch_stats.model_calls}
        if run.context is not None:
            metrics.update(self._parallel_metrics(run.context, run.executor, run.sampler.stats, run.hybrid))
        timings = run.timings
        metrics.update(
            wall_s=time.perf_counter() - run.started,
            sketch_s=timings.get("sketch", 0.0),
            denoise_s=timings["refine"],
            denoise_s_per_step=timings["refine"] / max(1, run.refine_steps),
            decode_s=timings["decode"],
            peak_mem_bytes=_peak_memory_bytes(self.device),
        )
        return metrics

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

        Each item is a :class:`~supergen.stream.StreamBlock` with that block's
        frames (uint8 F,H,W,3) and metrics; ``num_blocks=None`` streams until
        the caller stops (``close()``, or ``break`` inside ``with``). Change the
        prompt between blocks with ``set_prompt``.

        Args:
            stream: block length, window, sink, steps, schedule, KV write mode, prompt-change
                handling (default: ``default_stream_config``, the checkpoint's recommended
                settings from its ``supergen.json`` or else ``StreamConfig()``).
            height, width: frame size in pixels (default: the native size).
            guidance_scale: CFG scale (default: ``default_stream_guidance_scale``: 1.0,
                no guidance, as causal few-step checkpoints run, unless the
                checkpoint's ``supergen.json`` recommends a scale).
            scheduler: a Diffusers scheduler to copy per block (default: the
                pipeline's); ``FlowMatchEulerDiscreteScheduler(shift=5.0,
                stochastic_sampling=True)`` is Self-Forcing's few-step sampler.
            cached: ``False`` re-runs the whole history every forward (the
                exactness reference and benchmark baseline; cost grows per block).
            max_memory: refuse a stream whose estimated peak memory (weights, KV cache,
                one block's work) is above this many bytes, or a size like ``"8G"``.
        """
        from supergen.stream import VideoStream

        check_stream_arguments(
            prompt=prompt, negative_prompt=negative_prompt, num_blocks=num_blocks, stream=stream, height=height,
            width=width, guidance_scale=guidance_scale, seed=seed, generator=generator,
            max_sequence_length=max_sequence_length,
        )
        stream = stream or self.default_stream_config
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type={output_type!r} must be uint8 or float")
        if guidance_scale is None:
            guidance_scale = self.default_stream_guidance_scale
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")
        height, width = self.check_stream(stream, height, width, num_blocks)
        self._preflight_stream(prompt, stream, height, width, guidance_scale, max_memory, max_sequence_length)
        generator = generator or torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            return VideoStream(
                self,
                prompt,
                negative_prompt,
                num_blocks,
                stream,
                height,
                width,
                guidance_scale,
                generator,
                scheduler=scheduler,
                output_type=output_type,
                cached=cached,
                max_sequence_length=max_sequence_length,
            )

    def _condition(self, image, height: int, width: int, num_frames: int, generator) -> torch.Tensor | None:
        """The image-to-video condition canvas at this stage's size (``None`` without an image)."""
        if image is None:
            return None
        return self.adapter.encode_image(image, height, width, num_frames, generator)

    def _sketch(self, request: TiledRequest, tiling: TilingConfig, steps: int, generator, sampler_args,
                image=None, cache: CacheConfig | None = None) -> tuple[torch.Tensor, TileStats]:
        """Native-area sketch of the whole video, up-scaled to the target canvas (clean latents), and its
        loop's counts. With ``cache.sketch`` the cache makes one whole-canvas decision per sketch step."""
        adapter = self.adapter
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
        timesteps, _ = refinement_timesteps(scheduler, tiling.sketch_steps or steps, 1.0, device=self.device)
        condition = self._condition(image, request.sketch_height, request.sketch_width, request.num_frames, generator)
        noise = adapter.prepare_noise(sketch_canvas, generator)
        sketch_cache = None
        if cache is not None and cache.sketch:
            sketch_cache = self._region_cache(cache, planner, len(timesteps), scope="canvas")
        sampler = TiledSampler(planner=planner, rope="local", desc="sketch", condition=condition, cache=sketch_cache,
                               **sampler_args)
        sketch = sampler(noise, scheduler, timesteps)
        if sketch_canvas == request.canvas:
            return sketch, sampler.stats
        if tiling.upscale == "latent":
            return resize_latents(sketch, request.canvas), sampler.stats
        video = adapter.decode(sketch)
        video = resize_video(video.float(), (request.num_frames, request.height, request.width))
        tiled = request.canvas[1:] != adapter.native_latent_shape[1:]
        return adapter.encode(video.to(adapter.pipeline.vae.dtype), tiled=tiled).to(sketch.dtype), sampler.stats

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

        planner = self._planner(request, tiling)
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

    @staticmethod
    def _parallel_metrics(context, executor, stats: TileStats, hybrid) -> dict:
        """Counts summed over tile groups and bytes per rank (collective: every rank calls it)."""
        comm = executor.comm_summary()
        steps = context.gather_ints(comm["per_step"])
        # A tile group's ranks (CFG branches, sequence shards) all take part in its tiles: count each once.
        lead = int(hybrid.leader)
        cfg_bytes = hybrid.cfg.bytes if hybrid.cfg is not None else 0
        totals = context.gather_ints([comm["total"] + cfg_bytes, lead * stats.tile_steps_computed,
                                      lead * stats.model_calls, lead * stats.view_forwards, stats.tile_steps_computed])
        return {
            "parallel_plan": dict(hybrid.plan.as_dict(), world_size=hybrid.plan.world_size,
                                  describe=hybrid.plan.describe()),
            "world_size": context.world_size,
            "comm_scheme": comm["scheme"],
            "comm_bytes": [t[0] for t in totals],
            "comm_bytes_steps": steps,
            "comm_bytes_per_step": [sum(s) / max(1, len(s)) for s in steps],
            "tiles": {
                "count": stats.count,
                "tile_steps_total": stats.tile_steps_total,
                "tile_steps_computed": sum(t[1] for t in totals),
                "tile_steps_skipped": stats.tile_steps_total - sum(t[1] for t in totals),
                "model_calls": sum(t[2] for t in totals),
                "view_forwards": sum(t[3] for t in totals),
                "tile_steps_per_rank": [t[4] for t in totals],
                "skip_map": stats.skip_map,
                "grid": list(executor.planner.grid),
                "tile_latent": list(executor.planner.tile),
            },
        }

    def _coherence_guide(self, coherence: CoherenceConfig, request: TiledRequest, planner: TilePlanner,
                         num_inference_steps: int, num_steps: int, sketch: torch.Tensor | None,
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
            noiser = self.adapter.make_scheduler(request.tile)
            noiser.set_timesteps(num_inference_steps, device=self.device)
        geo = self.adapter.geometry
        sketch_hw = geo.latent_shape(request.sketch_height, request.sketch_width, request.num_frames)[1:]
        views = None
        if coherence.views == "dilated":
            views = DilatedViews(request.canvas, request.tile[1:], geo.patch[1:])
        return CoherenceGuide(
            num_steps, guide=guide, sketch=sketch, noise=noise, noiser=noiser,
            guide_exponent=coherence.guide_exponent, lowpass_HW=sketch_hw, views=views,
            view_exponent=coherence.view_exponent, view_until=coherence.view_until,
        )

    @staticmethod
    def _reuse_mode(cache: CacheConfig) -> str:
        # Measured on the toy model: output reuse matches or beats blocks reuse at the same decisions
        # (docs/benchmarks.md), costs no model call and is served by each rank from its own cells.
        return "output" if cache.reuse == "auto" else cache.reuse

    def _region_cache(self, cache: CacheConfig, planner: TilePlanner, num_steps: int, scope: str | None = None,
                      box=None, reduce=None) -> RegionCache | None:
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
            reuse=self._reuse_mode(cache),
            patch=self.adapter.geometry.patch,
            box=box,
            reduce=reduce,
            taylor_damping=cache.taylor_damping,
            across_moves=cache.grid == "shifting",
        )

    def _cache_metrics(self, cache: CacheConfig, region_cache: RegionCache | None) -> dict:
        """The cache settings and, when it ran, where it reused outputs: per step, the reused fraction of
        every region (F, H, W grid of regions) and the regions' final thresholds."""
        metrics = {
            "mode": cache.mode if cache.enabled else "off",
            "threshold": cache.threshold,
            "shift_threshold": cache.shift_threshold,
            "grid": cache.grid,
            "warmup": cache.warmup,
            "cooldown": cache.cooldown,
            "max_skips": cache.max_skips,
            "adaptive": cache.adaptive,
            "reuse": self._reuse_mode(cache),
        }
        if region_cache is not None:
            metrics.update(
                threshold_used=region_cache.threshold,
                region_grid=list(region_cache.grid),
                region_skip_map=[m.tolist() for m in region_cache.region_reuse],
                region_thresholds=region_cache.thresholds().tolist(),
            )
        return metrics

    def _metrics(self, request, steps, stats: TileStats, planner: TilePlanner, tiling: TilingConfig) -> dict:
        return {
            "model": type(self.pipe).__name__,
            "world_size": 1,
            "height": request.height,
            "width": request.width,
            "num_frames": request.num_frames,
            "steps": steps,
            "strength": tiling.strength,
            "tiles": {**stats.as_dict(), "grid": list(planner.grid), "tile_latent": list(planner.tile)},
            "comm_bytes": [0],
        }


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
