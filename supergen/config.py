"""Typed, validated configuration for every part of the engine.

Each concern has its own ``@dataclass(kw_only=True)`` whose ``__post_init__``
raises ``ValueError`` naming the field, the value and what is allowed. The CLI
maps its flags onto these one to one. Checks that need the model (divisibility
by the VAE and patch factors, tile larger than the canvas) live in
:func:`supergen.pipeline.SuperGenPipeline.check_request`, which runs before any
model work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from supergen.samplers.stream import KV_WRITE_MODES

BLEND_MODES = ("cosine", "uniform")
SHIFT_MODES = ("wrap", "none")
ROPE_MODES = ("local", "absolute")
UPSCALE_MODES = ("pixel", "latent")
CACHE_MODES = ("off", "region")
STREAM_SCHEDULES = ("block", "rolling")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


@dataclass(kw_only=True)
class TilingConfig:
    """How the refinement canvas is cut into tiles.

    Sizes are in pixels (frames for ``tile_frames``); ``None`` means the
    backbone's native size. Overlaps are converted to latent cells by the
    planner and rounded up to the transformer's patch size.

    Args:
        tile_height, tile_width: tile size in pixels (default: native size).
        tile_frames: tile length in pixel frames (default: native frame count);
            longer videos are tiled in time with ``frame_overlap`` frames shared.
        overlap: spatial overlap between neighbouring tiles, in pixels.
        frame_overlap: temporal overlap between tiles, in pixel frames.
        blend: ``cosine`` feathers tile borders inside overlaps; ``uniform``
            averages. Weights are normalised so they sum to one on every cell.
        shift: ``wrap`` moves the whole grid every step with wrap-around at the
            canvas edges (SuperGen's way to hide seams without overlap).
        shift_stride: grid shift per step in pixels (default: tile / 16).
        rope: ``local`` gives every tile the positions of a native-size video;
            ``absolute`` offsets them by the tile's place on the canvas.
        tile_batch_size: tiles sent through the model in one batch.
        strength: fraction of the schedule that refinement runs (1.0 skips the
            sketch: refinement starts from pure noise).
        upscale: how the sketch reaches the target size, ``pixel`` (decode,
            resize, re-encode) or ``latent`` (interpolate latents).
        sketch_steps: steps of the native-size sketch (default: same as refinement).
    """

    tile_height: int | None = None
    tile_width: int | None = None
    tile_frames: int | None = None
    overlap: int = 0
    frame_overlap: int = 0
    blend: str = "cosine"
    shift: str = "wrap"
    shift_stride: int | None = None
    rope: str = "local"
    tile_batch_size: int = 1
    strength: float = 0.9
    upscale: str = "pixel"
    sketch_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("tile_height", "tile_width", "tile_frames", "shift_stride", "sketch_steps"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        _non_negative_int("overlap", self.overlap)
        _non_negative_int("frame_overlap", self.frame_overlap)
        _positive_int("tile_batch_size", self.tile_batch_size)
        _choice("blend", self.blend, BLEND_MODES)
        _choice("shift", self.shift, SHIFT_MODES)
        _choice("rope", self.rope, ROPE_MODES)
        _choice("upscale", self.upscale, UPSCALE_MODES)
        if not isinstance(self.strength, (int, float)) or not (0.0 < self.strength <= 1.0):
            raise ValueError(f"strength={self.strength!r} must be in (0, 1]: the fraction of the schedule refined")
        for size_name in ("tile_height", "tile_width"):
            size = getattr(self, size_name)
            if size is not None and self.overlap >= size:
                raise ValueError(
                    f"overlap={self.overlap} must be smaller than {size_name}={size}; "
                    "tiles that overlap by their whole size never advance"
                )
        if self.tile_frames is not None and self.frame_overlap >= self.tile_frames:
            raise ValueError(f"frame_overlap={self.frame_overlap} must be smaller than tile_frames={self.tile_frames}")


@dataclass(kw_only=True)
class CacheConfig:
    """Region-aware step cache (see :mod:`supergen.cache`).

    Args:
        mode: ``off`` or ``region``.
        threshold: accumulated predicted relative change below which a region
            reuses its last output; 0 never skips.
        warmup: first refinement steps always computed.
        cooldown: last steps always computed.
        max_skips: cap on consecutive skips of one region.
        adaptive: adapt each region's threshold to its measured variability.
    """

    mode: str = "off"
    threshold: float = 0.05
    warmup: int = 3
    cooldown: int = 1
    max_skips: int = 3
    adaptive: bool = True

    def __post_init__(self) -> None:
        _choice("cache mode", self.mode, CACHE_MODES)
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"cache threshold={self.threshold!r} must be a finite number >= 0")
        _non_negative_int("cache warmup", self.warmup)
        _non_negative_int("cache cooldown", self.cooldown)
        _positive_int("cache max_skips", self.max_skips)

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.threshold > 0


@dataclass(kw_only=True)
class ParallelConfig:
    """Multi-process execution (see :mod:`supergen.parallel`).

    Args:
        backend: ``auto`` picks NCCL when CUDA is available, gloo otherwise.
        timeout_s: collective timeout; a dead rank fails the job after this.
    """

    backend: str = "auto"
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _choice("backend", self.backend, ("auto", "nccl", "gloo"))
        if not (self.timeout_s > 0):
            raise ValueError(f"timeout_s={self.timeout_s!r} must be > 0 seconds")


@dataclass(kw_only=True)
class StreamConfig:
    """Block-wise streaming (see :mod:`supergen.samplers.stream`).

    All lengths are in latent frames (Wan: the first latent frame is 1 video
    frame, every later one 4).

    Args:
        block_frames: latent frames per block.
        window: recent clean latent frames kept in the KV cache (besides the sink).
        sink: first latent frames of the stream, pinned in the cache (attention sink).
        steps: denoising steps per block (few-step models: 4).
        schedule: ``block`` denoises one block at a time; ``rolling`` denoises
            ``steps`` consecutive blocks jointly at staggered noise levels
            (Rolling Forcing) and moves on one block per forward.
        kv_write: ``rerun`` writes a finished block's keys/values with one more
            forward at timestep 0 (Self-Forcing); ``last_step`` keeps those of its
            last denoising forward (one forward fewer per block).
    """

    block_frames: int = 3
    window: int = 9
    sink: int = 3
    steps: int = 4
    schedule: str = "block"
    kv_write: str = "rerun"

    def __post_init__(self) -> None:
        _positive_int("block_frames", self.block_frames)
        _positive_int("window", self.window)
        _non_negative_int("sink", self.sink)
        _positive_int("steps", self.steps)
        _choice("schedule", self.schedule, STREAM_SCHEDULES)
        _choice("kv_write", self.kv_write, KV_WRITE_MODES)
        if self.window < self.block_frames:
            raise ValueError(
                f"window={self.window} latent frames is shorter than one block ({self.block_frames}); "
                "the cache must hold at least the previous block"
            )
        if self.sink > self.window:
            raise ValueError(f"sink={self.sink} must not exceed window={self.window}")

    @property
    def segment_frames(self) -> int:
        """Latent frames one forward denoises: a block, or the whole joint window."""
        return self.block_frames * (self.steps if self.schedule == "rolling" else 1)


@dataclass(kw_only=True)
class GenerationConfig:
    """Everything one tiled generation needs besides the model."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None
    seed: int = 0
    tiling: TilingConfig = field(default_factory=TilingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        for name in ("height", "width", "num_frames"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        _positive_int("num_inference_steps", self.num_inference_steps)
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be a finite number >= 0")
