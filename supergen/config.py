"""Typed, validated configuration for every part of the engine.

Each concern has its own ``@dataclass(kw_only=True)`` whose ``__post_init__``
raises ``ValueError`` naming the field, the value and what is allowed. The CLI
maps its flags onto these one to one. Checks that need the model (divisibility
by the VAE and patch factors, tile larger than the canvas) live in
:func:`supergen.pipeline.SuperGenPipeline.check_request`, which runs before any
model work.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from supergen.parallel.runtime import DEFAULT_TIMEOUT_S
from supergen.samplers.coherence import GUIDES as COHERENCE_GUIDES
from supergen.samplers.stream import KV_WRITE_MODES

BLEND_MODES = ("cosine", "uniform")
SHIFT_MODES = ("wrap", "none")
ROPE_MODES = ("local", "absolute")
UPSCALE_MODES = ("pixel", "latent")
COHERENCE_VIEWS = ("none", "dilated")
CACHE_MODES = ("off", "region", "canvas")
CACHE_REUSE = ("auto", "output", "taylor", "residual", "blocks")
CACHE_GRIDS = ("shifting", "held")
EXCHANGE_MODES = ("region", "allgather")
BACKENDS = ("auto", "nccl", "gloo")
PARALLEL_MODES = ("auto", "tile")
STREAM_SCHEDULES = ("block", "rolling")
PROMPT_CHANGE_MODES = ("keep", "recache", "flush", "restart")

logger = logging.getLogger(__name__)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def cli(flag: str, help: str, model_default: bool = False, **argparse_kwargs) -> dict:
    """Field metadata naming the field's ``supergen generate`` or ``supergen stream`` flag; :mod:`supergen.cli`
    builds its parsers from it, so each default, choice and help text is written once, here (``--help`` shows
    every default). ``model_default``: left out, the flag takes the model's recommended value (its
    ``supergen.json`` ``"stream"`` settings), else the field's default."""
    return {"cli": dict(flag=flag, help=help, model_default=model_default, **argparse_kwargs)}


def _non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")


def _non_negative_number(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


#: Steps the tile grid holds still between moves when the step cache is on with ``CacheConfig.grid="held"``
#: and ``TilingConfig.shift_every`` is not set (docs/benchmarks.md, "Region-aware step cache", shift schedule).
CACHE_SHIFT_EVERY = 3


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
        shift_every: the grid moves only every ``shift_every``-th refinement
            step, by that many strides (it visits every k-th position of the
            every-step grid). ``None`` (default): every step with the step
            cache off (the video is the same as before this option existed),
            and with it on at its default ``CacheConfig.grid='shifting'`` (the
            cache reuses tiles across grid moves), every
            :data:`CACHE_SHIFT_EVERY` steps with ``grid='held'``, so that the
            steps in between see the grid of the step before (that cache never
            reuses a tile across a grid move).
        rope: ``local`` gives every tile the positions of a native-size video;
            ``absolute`` offsets them by the tile's place on the canvas.
        tile_batch_size: tiles sent through the model in one batch.
        strength: fraction of the schedule that refinement runs (1.0 skips the
            sketch: refinement starts from pure noise).
        upscale: how the sketch reaches the target size, ``pixel`` (decode,
            resize, re-encode) or ``latent`` (interpolate latents).
        sketch_steps: steps of the native-size sketch (default: same as refinement).
    """

    tile_height: int | None = field(default=None, metadata=cli(
        "--tile-height", "tile height in pixels (default: native)", type=int))
    tile_width: int | None = field(default=None, metadata=cli(
        "--tile-width", "tile width in pixels (default: native)", type=int))
    tile_frames: int | None = None
    overlap: int = field(default=0, metadata=cli("--tile-overlap", "overlap between tiles, pixels"))
    frame_overlap: int = 0
    blend: str = field(default="cosine", metadata=cli("--blend", "weights where tiles overlap", choices=BLEND_MODES))
    shift: str = field(default="wrap", metadata=cli("--shift", "shift the tile grid every step", choices=SHIFT_MODES))
    shift_stride: int | None = None
    shift_every: int | None = field(default=None, metadata=cli(
        "--shift-every", "move the grid only every N-th step, by N strides (default: every step; every 3rd with "
        "--cache-grid held, so that cache can reuse tiles between moves)", type=int))
    rope: str = field(default="local", metadata=cli("--rope", "tile RoPE positions", choices=ROPE_MODES))
    tile_batch_size: int = field(default=1, metadata=cli("--tile-batch-size", "tiles per model call"))
    strength: float = field(default=0.9, metadata=cli(
        "--strength", "fraction of the schedule refined at the target size"))
    upscale: str = field(default="pixel", metadata=cli(
        "--upscale", "how the sketch is up-scaled", choices=UPSCALE_MODES))
    sketch_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("tile_height", "tile_width", "tile_frames", "shift_stride", "shift_every", "sketch_steps"):
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


def _finite_number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
        raise ValueError(f"{name}={value!r} must be a finite number {bound}")


@dataclass(kw_only=True)
class CoherenceConfig:
    """Global coherence of the tiled refinement: one subject where the prompt asks for one.

    Native-size tiles each see only part of the canvas and, left alone, each
    draws the whole prompt again. See :mod:`supergen.tiling.coherence`.

    Args:
        guide: ``x0`` (default) moves the clean canvas each prediction
            implies towards the up-scaled sketch in the band the sketch
            resolves (its latent size), leaving finer detail to the tiles
            (HiFlow / FreeScale style); ``lowpass`` pulls the noisy canvas
            towards the sketch noised to the step, in that band; ``skip``
            pulls it in every band (DemoFusion's skip residual); ``none`` is
            off. Needs a sketch (strength below 1). Chosen on the toy model by
            ``scripts/bench_fidelity.py`` (docs/benchmarks.md#coherence).
        guide_exponent: the guide's weight is ``((1 + cos(pi p)) / 2) **
            guide_exponent`` at refinement progress ``p``: 1 at the start,
            0 at the end; larger values release the canvas sooner.
        views: ``dilated`` also denoises strided sub-canvases of native size
            (global views, DemoFusion's dilated sampling) and blends them into
            the tiles' prediction; each costs one forward per step while on.
        view_exponent: exponent of the views' cosine decay.
        view_until: fraction of the refinement steps during which the views run.
    """

    guide: str = field(default="x0", metadata=cli(
        "--coherence-guide", "keep the sketch's layout (one subject, not one per tile): move the clean canvas each "
        "prediction implies towards the sketch in the band it resolves (x0), pull the noisy canvas towards the noised "
        "sketch in that band (lowpass) or in every band (skip), or not (none)", choices=COHERENCE_GUIDES))
    guide_exponent: float = field(default=0.25, metadata=cli(
        "--coherence-decay", "exponent of the guide's cosine decay over the refinement (larger: released sooner)"))
    views: str = field(default="none", metadata=cli(
        "--global-views", "also denoise strided whole-picture views of native size and blend them in (dilated; one "
        "extra forward per view and step)", choices=COHERENCE_VIEWS))
    view_exponent: float = 1.0
    view_until: float = field(default=0.5, metadata=cli(
        "--global-views-until", "fraction of the refinement steps during which the global views run"))

    def __post_init__(self) -> None:
        _choice("coherence guide", self.guide, COHERENCE_GUIDES)
        _choice("coherence views", self.views, COHERENCE_VIEWS)
        _finite_number("coherence guide_exponent", self.guide_exponent, 0.0, low_open=True)
        _finite_number("coherence view_exponent", self.view_exponent, 0.0, low_open=True)
        _finite_number("coherence view_until", self.view_until, 0.0, 1.0, low_open=True)

    @property
    def enabled(self) -> bool:
        return self.guide != "none" or self.views != "none"


@dataclass(kw_only=True)
class CacheConfig:
    """Region-aware step cache of the tiled refinement (see :mod:`supergen.cache`).

    Args:
        mode: ``off``; ``region`` decides per tile from the state of the
            canvas regions under it; ``canvas`` makes one decision for the
            whole canvas (all tiles run or all are reused), the baseline a
            whole-model cache gives.
        threshold: accumulated predicted relative output change at which a
            tile is recomputed; 0 never skips (and turns the cache off).
        shift_threshold: the threshold of a tiled loop whose grid moves between
            steps with ``grid='shifting'``. A reuse there hands a cell the
            output of the previous grid position, and the predicted change
            includes that boundary movement (0.4-0.7 of the output per step on
            the toy model, against ~0.1 of denoising change), so it needs its
            own scale; 0.9 measured best at 64x64 and 96x96 (docs/benchmarks.md).
        warmup: first refinement steps always computed (a region also needs
            two computed steps before it can be predicted at all).
        cooldown: last refinement steps always computed (at least the last).
            2 by default: on the shifting grid a reuse on the second-last step
            costs as much as one in the first steps (docs/benchmarks.md).
        max_skips: most consecutive steps a region may be served from the cache.
        grid: ``shifting`` (default) keeps the grid schedule of the cache-off
            run (moving every step) and reuses a cell's canvas-cache output at
            the next grid position, so the uncached video is the default one;
            ``held`` moves the grid every :data:`CACHE_SHIFT_EVERY` steps and
            never reuses across a move (the previous default: another grid
            schedule, so another sample of the prompt).
        adaptive: scale each region's threshold by its measured variability
            (stricter where outputs vary more; see :mod:`supergen.cache.region`).
        regions_per_tile: regions per tile along height and width (the cache
            state's resolution; a region spans all frames of a tile).
        reuse: what a skipped tile gets. ``output``: its cells' last
            prediction as it was; ``taylor``: that prediction extrapolated to
            the current timestep from the cells' last two computed steps, the
            first-order term scaled by ``taylor_damping``; ``residual``: the
            last prediction minus the last input, added to the current input
            (EasyCache's form); ``blocks``: the residual its cells' transformer
            blocks last added to the hidden states, run through the current
            timestep's embeddings and output head (one process only). ``auto``
            (default) is ``output``: on the trained toy model it matches or
            beats ``blocks`` at the same decisions (untiled, every other step
            reused: output 39.5 dB, blocks 38.9 dB; tiled with the grid fixed:
            41.5 vs 41.5 dB), needs no model call and no residual memory, and
            every rank serves it from its own cells (docs/benchmarks.md).
        taylor_damping: fraction of the first-order term ``reuse='taylor'``
            applies; 0.5 measured best on the toy model (0.3-1.0 tried).
        sketch: also cache the native-size sketch (one whole-canvas decision
            per step, the same settings), as a whole-model cache accelerates a
            plain run at the native size. Off by default since the ``x0``
            coherence guide became the tiling default: the guide pulls the
            refinement's low band onto the up-scaled sketch, so the sketch's
            reuse error reaches the final video (toy, 64x64, one prompt: 40.3
            dB against the uncached run on the same grid schedule with the
            sketch computed, 36.9 dB with it cached; docs/benchmarks.md).
    """

    mode: str = field(default="off", metadata=cli(
        "--cache", "step cache of the refinement: region (per-tile decisions), canvas (one decision), off",
        choices=CACHE_MODES))
    threshold: float = field(default=0.3, metadata=cli(
        "--cache-threshold", "accumulated predicted relative change at which a tile is recomputed (0: never skip)"))
    shift_threshold: float = field(default=0.9, metadata=cli(
        "--cache-shift-threshold", "the threshold where the tile grid moves between steps (grid shifting, tiled "
        "canvas): the predicted change then includes the tile boundaries' movement (0: never skip there)"))
    warmup: int = field(default=3, metadata=cli("--cache-warmup", "first refinement steps always computed"))
    cooldown: int = field(default=2, metadata=cli("--cache-cooldown", "last refinement steps always computed (>= 1)"))
    max_skips: int = field(default=2, metadata=cli("--cache-max-skips", "most consecutive reuses of one region"))
    adaptive: bool = field(default=True, metadata=cli(
        "--no-cache-adaptive", "one threshold everywhere instead of per-region adaptive thresholds",
        dest="cache_adaptive"))
    regions_per_tile: int = 4
    reuse: str = field(default="auto", metadata=cli(
        "--cache-reuse", "what a skipped tile reuses: its cells' last prediction (output, what auto picks), that "
        "prediction extrapolated to this step (taylor), its last output-minus-input (residual), or its transformer "
        "blocks' residual run through the current output head (blocks, one process only)", choices=CACHE_REUSE))
    taylor_damping: float = 0.5
    grid: str = field(default="shifting", metadata=cli(
        "--cache-grid", "grid schedule with the cache on: shifting (moves every step, as with the cache off; "
        "tiles reused across moves from the canvas cache) or held (moves every few steps, no reuse across a move)",
        choices=CACHE_GRIDS))
    sketch: bool = field(default=False, metadata=cli(
        "--cache-sketch", "also cache the native-size sketch, one whole-canvas decision per step (off by default: "
        "the coherence guide carries the sketch's reuse error into the video)", dest="cache_sketch",
        action="boolean_optional"))

    def __post_init__(self) -> None:
        _choice("cache mode", self.mode, CACHE_MODES)
        _non_negative_number("cache threshold", self.threshold)
        _non_negative_number("cache shift_threshold", self.shift_threshold)
        _non_negative_int("cache warmup", self.warmup)
        if not isinstance(self.cooldown, int) or isinstance(self.cooldown, bool) or self.cooldown < 1:
            raise ValueError(f"cache cooldown={self.cooldown!r} must be an integer >= 1: the last step is always computed")
        _positive_int("cache max_skips", self.max_skips)
        _positive_int("cache regions_per_tile", self.regions_per_tile)
        _choice("cache reuse", self.reuse, CACHE_REUSE)
        _choice("cache grid", self.grid, CACHE_GRIDS)
        if not isinstance(self.taylor_damping, (int, float)) or not 0.0 <= self.taylor_damping <= 1.0:
            raise ValueError(f"cache taylor_damping={self.taylor_damping!r} must be in [0, 1]")
        for name in ("adaptive", "sketch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"cache {name}={getattr(self, name)!r} must be True or False")

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.threshold > 0

    def threshold_for(self, grid_moves: bool) -> float:
        """The threshold of a loop whose tile grid moves between steps (``grid_moves``) or holds still."""
        return self.shift_threshold if grid_moves and self.grid == "shifting" else self.threshold

    def grid_shift_every(self, tiling: "TilingConfig") -> int:
        """Steps between grid moves for a run with this cache: ``tiling.shift_every`` when set, else 1 with
        the cache off or on the shifting grid, :data:`CACHE_SHIFT_EVERY` with the cache on the held grid."""
        if tiling.shift_every is not None:
            return tiling.shift_every
        return CACHE_SHIFT_EVERY if self.enabled and self.grid == "held" else 1

    def check_schedule(self, num_steps: int) -> None:
        """Refuse a warm-up longer than the ``num_steps`` refinement steps; warn when nothing can be skipped."""
        if not self.enabled:
            return
        if self.warmup > num_steps:
            raise ValueError(
                f"cache warmup={self.warmup} is longer than the schedule ({num_steps} refinement steps); "
                f"use at most {num_steps}, or --cache off"
            )
        if self.warmup + self.cooldown >= num_steps:
            logger.warning(
                "cache warm-up %d + cool-down %d cover all %d refinement steps: the cache will skip nothing",
                self.warmup,
                self.cooldown,
                num_steps,
            )


@dataclass(kw_only=True)
class ParallelConfig:
    """Multi-process execution (see :mod:`supergen.parallel`).

    Args:
        backend: ``auto`` picks NCCL when CUDA is available, gloo otherwise.
        timeout_s: collective timeout; a rank that hangs fails the job after
            this (a rank that raises fails it at once).
        exchange: ``region`` (each rank owns a region of the canvas and
            exchanges only halos) or ``allgather`` (every rank receives every
            tile output, SuperGen's released scheme; for comparison).
        parallel: how the world size is factorised into tile x CFG x
            context-parallel degrees (:mod:`supergen.parallel.plan`): ``auto``
            picks the plan with the lowest modelled step time, ``tile`` spreads
            tiles only. ``cfg_parallel``, ``ulysses`` and ``ring`` fix those
            degrees (the tile degree is what is left of the world size).
        cfg_parallel: 1, or 2 (the conditional and unconditional branch of a
            tile on two ranks); ``None``: chosen by ``parallel``.
        ulysses, ring: Diffusers context-parallel degrees inside a tile
            (``None``: chosen by ``parallel``).
    """

    backend: str = field(default="auto", metadata=cli(
        "--backend", "torch.distributed backend under torchrun (auto: NCCL with CUDA, else gloo)",
        choices=BACKENDS))
    timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata=cli(
        "--timeout", "seconds a collective may wait under torchrun before a hung rank fails the job"))
    exchange: str = field(default="region", metadata=cli(
        "--exchange", "under torchrun: each rank owns a canvas region and swaps halos (region), or every rank "
        "receives every tile output (allgather)", choices=EXCHANGE_MODES))
    parallel: str = field(default="auto", metadata=cli(
        "--parallel", "under torchrun: factorise the ranks into tile x CFG x sequence (Ulysses/Ring) degrees with "
        "the lowest modelled step time (auto), or spread tiles only (tile)", choices=PARALLEL_MODES))
    cfg_parallel: int | None = field(default=None, metadata=cli(
        "--cfg-parallel", "1 or 2: run a tile's conditional and unconditional branch on two ranks (overrides auto)",
        type=int, metavar="N"))
    ulysses: int | None = field(default=None, metadata=cli(
        "--ulysses", "Ulysses degree inside a tile (Diffusers context parallelism; overrides auto)", type=int,
        metavar="N"))
    ring: int | None = field(default=None, metadata=cli(
        "--ring", "ring-attention degree inside a tile (needs a flash/cuDNN attention backend; overrides auto)",
        type=int, metavar="N"))

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("exchange", self.exchange, EXCHANGE_MODES)
        _choice("parallel", self.parallel, PARALLEL_MODES)
        for name in ("cfg_parallel", "ulysses", "ring"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (or None: chosen by parallel=)")
        if self.cfg_parallel not in (None, 1, 2):
            raise ValueError(f"cfg_parallel={self.cfg_parallel} must be 1 or 2: a tile has two guidance branches")
        if not isinstance(self.timeout_s, (int, float)) or not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s!r} must be a finite number of seconds > 0")


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
        context_noise: with ``rerun``, the std of Gaussian noise added to a finished
            block before its clean re-run writes it to the cache (CausVid's context
            noise; the output block stays clean). 0 writes the sample as it is.
        on_prompt_change: what ``VideoStream.set_prompt`` does to the cached
            context: ``keep`` it (its keys/values were computed under the old
            prompt); ``recache`` it, re-running the cached clean frames under the
            new prompt (LongLive's KV re-cache; one clean forward per cached
            block, once per switch); ``flush`` it to the sink plus the last
            latent frame (Infinity-RoPE's KV flush); or ``restart``: drop it all,
            sink included, so the next block starts like a stream's first (a hard
            cut: the new prompt alone decides it, nothing carries the old motion
            on, and the shape's position does not carry on either). Measured on
            ``toy-causal`` in docs/benchmarks.md ("Streaming quality").
    """

    block_frames: int = field(default=3, metadata=cli("--block-frames", "latent frames per block", model_default=True))
    window: int = field(default=9, metadata=cli(
        "--window", "recent clean latent frames kept in the KV cache", model_default=True))
    sink: int = field(default=3, metadata=cli(
        "--sink", "first latent frames pinned in the cache (attention sink)", model_default=True))
    steps: int = field(default=4, metadata=cli("--steps", "denoising steps per block", model_default=True))
    schedule: str = field(default="block", metadata=cli(
        "--schedule", "block: one block at a time; rolling: a joint window of blocks at staggered noise levels",
        model_default=True, choices=STREAM_SCHEDULES))
    kv_write: str = field(default="rerun", metadata=cli(
        "--kv-write", "write a finished block's keys/values by a clean re-run (rerun), or from its last denoising "
        "step (last_step)", model_default=True, choices=KV_WRITE_MODES))
    context_noise: float = field(default=0.0, metadata=cli(
        "--context-noise", "with --kv-write rerun, noise std added to a finished block before it is written to the "
        "KV cache (0: none)", model_default=True))
    on_prompt_change: str = field(default="keep", metadata=cli(
        "--on-prompt-change", "what a prompt change (demo: apply prompt) does to the cached context: keep it, "
        "re-run it under the new prompt (recache), flush it to the sink (flush), or drop it all and start afresh "
        "(restart)", model_default=True,
        choices=PROMPT_CHANGE_MODES))

    def __post_init__(self) -> None:
        _positive_int("block_frames", self.block_frames)
        _positive_int("window", self.window)
        _non_negative_int("sink", self.sink)
        _positive_int("steps", self.steps)
        _choice("schedule", self.schedule, STREAM_SCHEDULES)
        _choice("kv_write", self.kv_write, KV_WRITE_MODES)
        _choice("on_prompt_change", self.on_prompt_change, PROMPT_CHANGE_MODES)
        _finite_number("context_noise", self.context_noise, 0.0, 1.0)
        if self.context_noise > 0 and self.kv_write != "rerun":
            raise ValueError(f"context_noise={self.context_noise} needs kv_write='rerun' (last_step writes the "
                             "last denoising forward's keys, there is no clean re-run to noise)")
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
    """One tiled generation, everything but the model: what ``SuperGenPipeline.generate`` runs.

    ``SuperGenPipeline.__call__`` builds one from its arguments; the CLI and the
    demo build one from their inputs. Types and ranges are checked here; sizes
    need the model and are checked when the pipeline resolves the request
    (before any model work).
    """

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None  # None: 2x the model's native height
    width: int | None = None  # None: 2x the model's native width
    num_frames: int | None = None  # None: the model's native frame count
    num_inference_steps: int = 30
    guidance_scale: float | None = None  # None: the model's default (SuperGenPipeline.default_guidance_scale)
    guidance_scale_2: float | None = None
    seed: int = 0
    tiling: TilingConfig = field(default_factory=TilingConfig)
    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_sequence_length: int | None = None  # None: the pipeline's own default

    def __post_init__(self) -> None:
        from supergen.validation import check_call_arguments

        check_call_arguments(
            prompt=self.prompt, negative_prompt=self.negative_prompt, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, guidance_scale_2=self.guidance_scale_2, seed=self.seed,
            generator=None, tiling=self.tiling, cache=self.cache, parallel=self.parallel,
            max_sequence_length=self.max_sequence_length, progress=True, coherence=self.coherence,
        )
