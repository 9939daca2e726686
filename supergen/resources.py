"""What a request will cost before it runs: latent canvas, tiles, peak memory of its largest stage.

An estimate is arithmetic on sizes (no tensors are made), so it runs before
any weights load: from a pipeline folder's config files and the safetensors
headers of its weights (:func:`footprint_from_folder`), or from a loaded
pipeline (:func:`footprint_of_pipeline`). Every stage's peak counts the
tensors that scale with the video (latent canvases, decoded pixel videos, the
KV cache of a stream) plus the activations of one model call; the weights are
counted where they are not resident yet. It is an estimate, meant to be on the
safe side by small factors and to catch requests that are off by orders of
magnitude (a 100000x100000 video asks for terabytes) before minutes of work
end in an allocator error.

A request over the device's free memory, or over a ``max_memory`` budget, is
refused with the estimate and the largest size of the same aspect ratio that
fits (:func:`check_fits`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

logger = logging.getLogger(__name__)

# A step with more tiles than this is a mistake, not a plan: 4K on a 480p model is 25 tiles, 8K about 100.
MAX_TILES_PER_STEP = 1024

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def parse_memory(text: str | int | float) -> int:
    """``"16G"``, ``"512M"``, ``"1.5GB"``, ``"2e9"`` or a number of bytes -> bytes (decimal units)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
        if not match:
            raise ValueError(f"max memory {text!r} is not a size; use e.g. 16G, 512M or a number of bytes")
        value, unit = float(match.group(1)), match.group(2)
    bytes_ = value * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit]
    if not math.isfinite(bytes_) or bytes_ < 1e6:
        raise ValueError(f"max memory {text!r} must be at least 1M")
    return int(bytes_)


@dataclass(frozen=True)
class ModelFootprint:
    """What an estimate needs to know about a model besides its geometry.

    ``weights_params`` counts every loaded component's parameters (``None``:
    unknown, e.g. a hub id before loading); widths are the transformer's.
    """

    weights_params: int | None
    num_layers: int
    inner_dim: int
    ffn_dim: int


def _transformer_widths(cfg: Mapping) -> tuple[int, int, int]:
    def get(name, default=None):
        try:
            value = cfg[name]
        except (KeyError, TypeError, ValueError):  # a folder's config without the field and no class default
            value = None
        return default if value is None else value

    heads, head_dim = get("num_attention_heads", 1), get("attention_head_dim", 64)
    inner = int(heads) * int(head_dim)
    layers = int(get("num_layers", 1)) + int(get("num_single_layers", 0))
    ffn = int(get("ffn_dim", 4 * inner))
    return layers, inner, ffn


def _safetensors_params(path: Path) -> int:
    """Parameters in one safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def footprint_from_folder(folder: str | os.PathLike, transformer_config: Mapping) -> ModelFootprint:
    """A pipeline folder's footprint, reading only configs and safetensors headers."""
    params = 0
    for component in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        try:
            params += sum(_safetensors_params(f) for f in files)
        except (OSError, ValueError, KeyError, struct.error):
            files = []
        if not files:  # .bin / .pt: count bytes as float32 parameters
            params += sum(f.stat().st_size for f in component.glob("*.bin")) // 4
    return ModelFootprint(params, *_transformer_widths(transformer_config))


def footprint_of_pipeline(pipeline) -> ModelFootprint:
    params = sum(
        p.numel()
        for module in pipeline.components.values()
        if isinstance(module, torch.nn.Module)
        for p in module.parameters()
    )
    return ModelFootprint(params, *_transformer_widths(pipeline.transformer.config))


@dataclass(frozen=True)
class ResourceEstimate:
    """Peak bytes of each stage of a request; ``peak`` is that of the largest."""

    what: str
    canvas: tuple[int, int, int]
    channels: int
    tiles: int
    stages: dict[str, int]
    weights_bytes: int = 0
    #: Host memory for the frames, when the device has its own (CUDA); 0 when it is in the stages.
    host_bytes: int = 0

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def largest_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    def describe(self) -> str:
        f, h, w = self.canvas
        stages = ", ".join(f"{name} {format_bytes(b)}" for name, b in self.stages.items())
        weights = f"; weights {format_bytes(self.weights_bytes)}" if self.weights_bytes else ", weights already loaded"
        if self.host_bytes:
            weights += f"; host RAM for the frames {format_bytes(self.host_bytes)}"
        return (
            f"{self.what}: latent canvas {f}x{h}x{w} ({self.channels} ch), {self.tiles:,} tile(s) per step; "
            f"peak {format_bytes(self.peak)} in the {self.largest_stage} stage ({stages}{weights})"
        )


def _decode_device_bytes(dtype_bytes: int) -> int:
    """Peak bytes per decoded pixel value (frame x channel x row x column) on the device while a video is decoded.

    The tiled VAE decode keeps its decoded tiles, the blended rows and their
    concatenation, a clamped and a denormalised copy: about six copies in the
    VAE's dtype. With :data:`DECODE_HOST_BYTES`, calibrated on CPU (tiny Wan,
    float32, 1152x768x9: 0.93-1.05 GB measured growth, 39-44 bytes per value)
    with some margin.
    """
    return 6 * dtype_bytes + 4


#: Bytes per decoded pixel value in host memory: float32 frames, the temporaries of the uint8
#: conversion, the uint8 frames.
DECODE_HOST_BYTES = 20


def _activation_bytes(footprint: ModelFootprint, tokens: int, batch: int, act_bytes: int) -> int:
    """One transformer call: the widest layer's activations (attention kernels do not keep scores)."""
    return batch * tokens * (4 * footprint.inner_dim + footprint.ffn_dim) * act_bytes


def estimate_tiled(
    spec,
    request,
    footprint: ModelFootprint,
    tiles: int,
    *,
    dtype_bytes: int,
    tile_batch_size: int = 1,
    guidance: bool = True,
    upscale: str = "pixel",
    sketch: bool = True,
    decode: bool = True,
    count_weights: bool = True,
    host_separate: bool = False,
) -> ResourceEstimate:
    """Peak memory of each stage of a tiled request (:class:`~supergen.request.TiledRequest`).

    ``host_separate``: the device is not the host's memory (CUDA), so the
    frames converted on the host go to ``host_bytes`` instead of the stages.
    """
    geo = spec.geometry
    c = geo.channels
    f, h, w = request.canvas
    canvas_bytes = 4 * c * f * h * w  # latents are float32 in the samplers
    pixels = 3 * request.num_frames * request.height * request.width
    weights = (footprint.weights_params or 0) * dtype_bytes if count_weights else 0
    patch = math.prod(geo.patch)
    batch = tile_batch_size * (2 if guidance else 1)
    tile_tokens = math.prod(request.tile) // patch
    sf, sh, sw = geo.latent_shape(request.sketch_height, request.sketch_width, request.num_frames)
    sketch_bytes = 4 * c * sf * sh * sw
    sketch_pixels = 3 * request.num_frames * request.sketch_height * request.sketch_width
    stages = {}
    if sketch:
        # Noise, latents, prediction, blend weights and the scheduler's state: about six canvases.
        stages["sketch"] = weights + 6 * sketch_bytes + _activation_bytes(footprint, sf * sh * sw // patch, batch, dtype_bytes)
        if upscale == "pixel":
            # The decoded sketch, the resized float32 video and its copy in the VAE's dtype, then the encode.
            stages["up-scale"] = weights + 4 * sketch_pixels + 2 * 4 * pixels + dtype_bytes * pixels + 2 * canvas_bytes
        else:
            stages["up-scale"] = weights + sketch_bytes + 2 * canvas_bytes
    stages["refine"] = weights + 6 * canvas_bytes + _activation_bytes(footprint, tile_tokens, batch, dtype_bytes)
    if decode:
        stages["decode"] = weights + canvas_bytes + _decode_device_bytes(dtype_bytes) * pixels
    host = DECODE_HOST_BYTES * pixels if decode else 0
    if not host_separate:
        stages["decode" if decode else "refine"] += host
    what = f"{request.width}x{request.height}, {request.num_frames} frames"
    return ResourceEstimate(what, tuple(request.canvas), c, tiles, stages, weights, host if host_separate else 0)


def estimate_stream(
    spec,
    footprint: ModelFootprint,
    config,
    height: int,
    width: int,
    *,
    dtype_bytes: int,
    guidance: bool,
    count_weights: bool = True,
    host_separate: bool = False,
) -> ResourceEstimate:
    """Peak memory of one block of a stream: KV cache, the forward's activations, the block's decode."""
    geo = spec.geometry
    c = geo.channels
    _, lh, lw = geo.latent_shape(height, width, 1)
    tokens_per_frame = (lh // geo.patch[1]) * (lw // geo.patch[2])
    segment = config.segment_frames
    batch = 2 if guidance else 1
    kv = 2 * footprint.num_layers * batch * (config.sink + config.window + segment) * tokens_per_frame
    kv *= footprint.inner_dim * dtype_bytes
    weights = (footprint.weights_params or 0) * dtype_bytes if count_weights else 0
    block_pixels = 3 * geo.scale_temporal * config.block_frames * height * width
    latents = 4 * c * segment * lh * lw
    stages = {
        "denoise": weights + kv + 6 * latents + _activation_bytes(footprint, segment * tokens_per_frame, batch, dtype_bytes),
        # The causal stream decode is not tiled: the decoder's full-resolution feature maps of the whole block
        # come on top (measured on CPU, tiny Wan, 768x512 blocks of 12 frames: 0.74-1.14 GB in three runs).
        "decode": weights + kv + 3 * _decode_device_bytes(dtype_bytes) * block_pixels,
    }
    host = DECODE_HOST_BYTES * block_pixels
    if not host_separate:
        stages["decode"] += host
    return ResourceEstimate(f"stream {width}x{height}", (segment, lh, lw), c, 1, stages, weights,
                            host if host_separate else 0)


# --- budgets ----------------------------------------------------------------------------------

def _cgroup_available() -> int | None:
    """Bytes left under this container's memory limit (cgroup v2), if it has one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def _host_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_budget(device: torch.device) -> tuple[int | None, str]:
    """Free memory this process can count on, and how it was found (``None``: unknown, not checked)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    if device.type == "cpu":
        known = [b for b in (_host_available(), _cgroup_available()) if b is not None]
        if not known:
            return None, "available RAM"
        # Processes of one torchrun job on this host share its memory.
        share = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return min(known) // share, "available RAM" + (f" / {share} local processes" if share > 1 else "")
    return None, str(device)


def check_tile_count(tiles: int, grid: tuple[int, ...], fits: Callable[[], str]) -> None:
    if tiles > MAX_TILES_PER_STEP:
        raise ValueError(
            f"{tiles:,} tiles per step ({' x '.join(map(str, grid))} over F,H,W) is more than {MAX_TILES_PER_STEP}: "
            f"each step would make {tiles:,} model calls; {fits()}, or use larger tiles (tile_height/tile_width)"
        )


def check_fits(estimate: ResourceEstimate, budget: int | None, label: str, fits: Callable[[], str]) -> None:
    """Refuse an estimate over ``budget`` bytes; ``fits()`` names a size that would fit (only asked on refusal)."""
    logger.debug("resource estimate: %s; budget %s (%s)", estimate.describe(),
                 "unknown" if budget is None else format_bytes(budget), label)
    if budget is not None and estimate.peak > budget:
        raise ValueError(f"needs about {format_bytes(estimate.peak)}, more than {format_bytes(budget)} ({label}): "
                         f"{estimate.describe()}; {fits()}")


def check_host(estimate: ResourceEstimate, host_free: int | None, fits: Callable[[], str]) -> None:
    """Refuse frames that would not fit in host RAM once copied off the device."""
    if host_free is not None and estimate.host_bytes > host_free:
        raise ValueError(f"the frames need about {format_bytes(estimate.host_bytes)} of host RAM once off the device, "
                         f"more than {format_bytes(host_free)} available: {estimate.describe()}; {fits()}")


def largest_fitting(height: int, width: int, multiple: tuple[int, int], minimum: tuple[int, int],
                    ok: Callable[[int, int], bool]) -> tuple[int, int] | None:
    """The largest (height, width) of about the same aspect ratio, multiples of ``multiple``, for which ``ok``.

    ``ok`` must be monotone in the size (it is for memory and tile counts);
    ``None`` when even ``minimum`` does not pass.
    """
    def scaled(s: float) -> tuple[int, int]:
        return (max(minimum[0], int(height * s) // multiple[0] * multiple[0]),
                max(minimum[1], int(width * s) // multiple[1] * multiple[1]))

    if not ok(*scaled(0.0)):
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if ok(*scaled(mid)) else (low, mid)
    return scaled(low)


def dtype_bytes_for(dtype: torch.dtype | None, device: torch.device) -> int:
    """Bytes per weight/activation element; ``None`` is from_pretrained's default (bfloat16 on CUDA, else float32)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.empty((), dtype=dtype).element_size()


def check_tiled_request(
    spec,
    request,
    tiling,
    footprint: ModelFootprint,
    *,
    device: torch.device,
    dtype_bytes: int,
    max_memory: int | None = None,
    guidance: bool = True,
    decode: bool = True,
    count_weights: bool = True,
    budget: tuple[int | None, str] | None = None,
) -> ResourceEstimate:
    """Refuse a tiled request with too many tiles or over the memory budget; returns its estimate.

    ``count_weights=False`` when the weights are already loaded (the free
    memory then already excludes them); a ``max_memory`` budget always counts
    them. ``budget`` overrides the device's (a multi-process job agrees on one).
    """
    from supergen.request import validate_request
    from supergen.tiling import TilePlanner

    geo = spec.geometry

    def plan(req):
        return TilePlanner(canvas=req.canvas, tile=req.tile, overlap=req.overlap_cells, align=geo.patch,
                           blend=tiling.blend, shift=tiling.shift, shift_stride=req.shift_stride_cells)

    host_separate = device.type != "cpu"

    def estimate(req, with_weights):
        return estimate_tiled(
            spec, req, footprint, plan(req).num_tiles, dtype_bytes=dtype_bytes, tile_batch_size=tiling.tile_batch_size,
            guidance=guidance, upscale=tiling.upscale, sketch=tiling.strength < 1.0, decode=decode,
            count_weights=with_weights, host_separate=host_separate,
        )

    free, label = budget if budget is not None else device_budget(device)
    cap = None if max_memory is None else (max_memory, "the --max-memory / max_memory budget")
    host_free = device_budget(torch.device("cpu"))[0] if host_separate else None

    def fits_in_memory(req) -> bool:
        result = estimate(req, count_weights)
        return (free is None or result.peak <= free) and (host_free is None or result.host_bytes <= host_free) and (
            cap is None or estimate(req, True).peak <= cap[0])

    def suggestion() -> str:
        tile_hw = (request.tile[1] * geo.scale_spatial, request.tile[2] * geo.scale_spatial)

        def ok(h, w):
            try:
                req = validate_request(spec, h, w, request.num_frames, tiling)
            except ValueError:
                return False
            return plan(req).num_tiles <= MAX_TILES_PER_STEP and fits_in_memory(req)

        size = largest_fitting(request.height, request.width, geo.pixel_multiple, tile_hw, ok)
        if size is None:
            return "even one tile's size does not fit: free memory, use a smaller dtype or fewer frames"
        return f"the largest size of this aspect ratio that fits is height {size[0]}, width {size[1]}"

    result = estimate(request, count_weights)
    check_fits(result, free, label, suggestion)
    check_host(result, host_free, suggestion)
    if cap is not None:
        check_fits(estimate(request, True), *cap, suggestion)
    planner = plan(request)
    check_tile_count(planner.num_tiles, planner.grid, suggestion)
    return result


def check_stream_request(
    spec,
    config,
    height: int,
    width: int,
    footprint: ModelFootprint,
    *,
    device: torch.device,
    dtype_bytes: int,
    guidance: bool,
    max_memory: int | None = None,
    count_weights: bool = True,
) -> ResourceEstimate:
    """Refuse a stream whose KV cache and per-block work exceed the memory budget; returns its estimate."""
    geo = spec.geometry
    free, label = device_budget(device)
    host_separate = device.type != "cpu"
    host_free = device_budget(torch.device("cpu"))[0] if host_separate else None

    def estimate(h, w, with_weights):
        return estimate_stream(spec, footprint, config, h, w, dtype_bytes=dtype_bytes, guidance=guidance,
                               count_weights=with_weights, host_separate=host_separate)

    def ok(h, w):
        result = estimate(h, w, count_weights)
        return (free is None or result.peak <= free) and (host_free is None or result.host_bytes <= host_free) and (
            max_memory is None or estimate(h, w, True).peak <= max_memory)

    def suggestion() -> str:
        size = largest_fitting(height, width, geo.pixel_multiple, geo.pixel_multiple, ok)
        if size is None:
            return "even the smallest frame does not fit: free memory or shorten --window/--block-frames"
        return f"the largest frame of this aspect ratio that fits is height {size[0]}, width {size[1]}"

    result = estimate(height, width, count_weights)
    check_fits(result, free, label, suggestion)
    check_host(result, host_free, suggestion)
    if max_memory is not None:
        check_fits(estimate(height, width, True), max_memory, "the --max-memory / max_memory budget", suggestion)
    return result


def model_footprint_for(name_or_path: str | os.PathLike):
    """``(spec, footprint, hints)`` of a built-in name or pipeline folder from its files alone; ``None`` for a hub id."""
    from supergen.backbones import spec_from_folder
    from supergen.models import read_model_hints, read_native_size, resolve_model

    source = Path(resolve_model(name_or_path))
    if not source.is_dir():
        return None
    spec = spec_from_folder(source, native_size=read_native_size(source))
    # The file as written, not the mapping that falls back on the class defaults: finding those imports
    # the Diffusers model classes (seconds), and the widths have safe defaults here.
    try:
        transformer = json.loads((source / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        transformer = {}
    return spec, footprint_from_folder(source, transformer), read_model_hints(source)


def refused_together(context, err: ValueError) -> ValueError:
    """A refusal every rank of ``context`` reached from the same numbers: no rank needs to tell the others."""
    if context is None or not context.enabled:
        return err
    from supergen.parallel.runtime import AgreedError

    return AgreedError(str(err))


def agreed_budget(device: torch.device, context) -> tuple[int | None, str]:
    """The device's free memory; in a multi-process job the smallest of any rank's, so every rank decides alike."""
    free, label = device_budget(device)
    if context is None or not context.enabled:
        return free, label
    known = [b[0] for b in context.gather_ints([-1 if free is None else free]) if b[0] >= 0]
    return (min(known) if known else None), label + " (smallest of all ranks)"
