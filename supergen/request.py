"""A tiled request: the target, tile, overlap and sketch sizes, checked against a model's geometry.

:func:`validate_request` needs only the model's :class:`~supergen.backbones.ModelSpec`, so the same
checks (and messages) run before the weights load (:func:`check_request_for`, from a folder's configs)
and after (:meth:`supergen.pipeline.SuperGenPipeline.check_request`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from supergen.backbones import ModelSpec, spec_from_folder
from supergen.config import TilingConfig
from supergen.models import read_native_size, resolve_model
from supergen.validation import check_target_size


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
