"""Tile plans over a latent canvas (F, H, W), in latent cells.

A :class:`TilePlanner` fixes the geometry of a run (canvas, tile size,
overlap, alignment, blend, shift); :meth:`TilePlanner.plan` gives the
:class:`TilePlan` of one denoising step. With ``shift='wrap'`` the spatial
grid moves by ``shift_stride`` cells every step and tiles wrap around the
canvas edges (the canvas is treated as a torus in H and W); time never wraps.
With ``shift_every=k`` the grid moves only on the steps ``s`` with
``(s - shift_phase) % k == 0``, to where the every-step grid is at ``s``, and
holds still in between: the steps in between see the same tiles as the step
before (a step cache can reuse a tile's output there without handing it
another grid position's). A phase of ``(steps - 1) % k`` makes the last step
a move, so the last step's tile boundaries are the every-step grid's.

Blend weights are normalised per plan so that on every cell the weights of
the tiles covering it sum to one: blending the outputs of a point-wise model
gives back the point-wise model's output on the whole canvas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

Shape3 = tuple[int, int, int]


def _axis_starts(length: int, tile: int, overlap: int, align: int, wrap: bool) -> list[int]:
    """Tile starts on one axis, before any shift, multiples of ``align``.

    Non-wrapping axes spread ``n`` tiles evenly over [0, length - tile] (so
    the first starts at 0 and the last ends at ``length``). Wrapping axes
    spread them evenly around the circle; neighbours then overlap by
    ``n * tile - length`` cells in total, shared between the n seams.
    """
    if tile >= length:
        return [0]
    step = tile - overlap
    if wrap:
        n = math.ceil(length / step)
        return [align * round(k * length / (n * align)) for k in range(n)]
    n = math.ceil((length - overlap) / step)
    span = length - tile
    return [align * round(k * span / ((n - 1) * align)) for k in range(n)]


def _ramp(n: int, blend: str) -> torch.Tensor:
    """Rising weights over an overlap of ``n`` cells, strictly positive."""
    if blend == "uniform":
        return torch.ones(n, dtype=torch.float64)
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.sin(0.5 * math.pi * x) ** 2


@dataclass(frozen=True)
class Tile:
    """One tile: where it starts on the canvas (before wrap-around) and its size."""

    index: int
    start: Shape3
    size: Shape3
    canvas: Shape3

    @cached_property
    def cells(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canvas indices covered on each axis (wrapped modulo the canvas)."""
        return tuple(
            (torch.arange(s, s + n) % length) for s, n, length in zip(self.start, self.size, self.canvas)
        )

    @property
    def wraps(self) -> bool:
        return any(s + n > length for s, n, length in zip(self.start, self.size, self.canvas))

    @property
    def num_cells(self) -> int:
        return self.size[0] * self.size[1] * self.size[2]

    def gather(self, canvas_BCFHW: torch.Tensor) -> torch.Tensor:
        """The tile's latent crop (B, C, f, h, w); a copy when the tile wraps."""
        if not self.wraps:
            (f0, h0, w0), (nf, nh, nw) = self.start, self.size
            return canvas_BCFHW[:, :, f0 : f0 + nf, h0 : h0 + nh, w0 : w0 + nw]
        fi, hi, wi = (idx.to(canvas_BCFHW.device) for idx in self.cells)
        return canvas_BCFHW.index_select(2, fi).index_select(3, hi).index_select(4, wi)

    def add_into(self, canvas_BCFHW: torch.Tensor, values_BCfhw: torch.Tensor) -> None:
        """``canvas[tile cells] += values`` (cells of one tile are distinct, so no index collides)."""
        if not self.wraps:
            (f0, h0, w0), (nf, nh, nw) = self.start, self.size
            canvas_BCFHW[:, :, f0 : f0 + nf, h0 : h0 + nh, w0 : w0 + nw] += values_BCfhw
            return
        fi, hi, wi = (idx.to(canvas_BCFHW.device) for idx in self.cells)
        canvas_BCFHW[:, :, fi[:, None, None], hi[None, :, None], wi[None, None, :]] += values_BCfhw

    def describe(self) -> str:
        return f"tile {self.index} at f{self.start[0]} h{self.start[1]} w{self.start[2]}"


class TilePlan:
    """The tiles of one step and their normalised blend weights."""

    def __init__(self, canvas: Shape3, tiles: list[Tile], raw_weights: list[torch.Tensor], shift: tuple[int, int]):
        self.canvas = canvas
        self.tiles = tiles
        self.shift = shift
        total = torch.zeros(canvas, dtype=torch.float64)
        for tile, weight in zip(tiles, raw_weights):
            tile.add_into(total[None, None], weight[None, None])
        if bool((total <= 0).any()):
            raise RuntimeError("tile plan leaves latent cells uncovered; this is a bug in the planner")
        self.weights = [weight / tile.gather(total[None, None])[0, 0] for tile, weight in zip(tiles, raw_weights)]

    def __len__(self) -> int:
        return len(self.tiles)

    def coverage(self) -> torch.Tensor:
        """How many tiles cover each cell (F, H, W)."""
        count = torch.zeros(self.canvas, dtype=torch.int64)
        for tile in self.tiles:
            tile.add_into(count[None, None], torch.ones(tile.size, dtype=torch.int64)[None, None])
        return count

    def weight_sum(self) -> torch.Tensor:
        """Sum of normalised weights on each cell (one, up to rounding)."""
        total = torch.zeros(self.canvas, dtype=torch.float64)
        for tile, weight in zip(self.tiles, self.weights):
            tile.add_into(total[None, None], weight[None, None])
        return total

    def blend(self, outputs: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Blend per-tile outputs (B, C, f, h, w), one per tile in plan order, into a canvas."""
        first = outputs[0]
        if out is None:
            out = torch.zeros((*first.shape[:2], *self.canvas), dtype=torch.float32, device=first.device)
        for tile, weight, value in zip(self.tiles, self.weights, outputs):
            tile.add_into(out, value.float() * weight.to(device=value.device, dtype=torch.float32))
        return out


class TilePlanner:
    """Geometry of a tiled run; ``plan(step)`` gives the tiles of one step.

    Args:
        canvas: latent canvas (F, H, W).
        tile: tile size (F, H, W) in cells; clipped to the canvas.
        overlap: minimum overlap (F, H, W) between neighbours, in cells.
        align: every start and shift is a multiple of this (the patch size).
        blend: ``cosine`` or ``uniform``.
        shift: ``wrap`` or ``none``.
        shift_stride: (H, W) cells the grid moves per step (``wrap`` only).
        shift_every: the grid moves on every ``shift_every``-th step only
            (1: every step), to the every-step grid's position at that step.
        shift_phase: the first step that moves (steps before it stay at the
            initial grid).
    """

    def __init__(
        self,
        canvas: Shape3,
        tile: Shape3,
        overlap: Shape3 = (0, 0, 0),
        align: Shape3 = (1, 1, 1),
        blend: str = "cosine",
        shift: str = "none",
        shift_stride: tuple[int, int] | None = None,
        shift_every: int = 1,
        shift_phase: int = 0,
    ):
        if not isinstance(shift_every, int) or isinstance(shift_every, bool) or shift_every < 1:
            raise ValueError(f"shift_every={shift_every!r} must be an integer >= 1 (steps between grid moves)")
        for axis, (c, t, o, a) in enumerate(zip(canvas, tile, overlap, align)):
            name = "FHW"[axis]
            if t > c:
                raise ValueError(f"tile {name}={t} cells is larger than the canvas {name}={c} cells")
            if t < c and o >= t:
                raise ValueError(f"overlap {name}={o} cells must be smaller than the tile {name}={t} cells")
            if c % a or t % a:
                raise ValueError(f"canvas {name}={c} and tile {name}={t} must be multiples of the patch size {a}")
        self.canvas = tuple(canvas)
        self.tile = tuple(tile)
        self.overlap = tuple(overlap)
        self.align = tuple(align)
        self.blend = blend
        self.shift = shift
        wrap_hw = [shift == "wrap" and t < c for t, c in zip(self.tile[1:], self.canvas[1:])]
        self.wrap = (False, *wrap_hw)
        if shift_stride is None:
            shift_stride = tuple(max(a, (t // 16) // a * a) for t, a in zip(self.tile[1:], self.align[1:]))
        self.shift_stride = tuple(shift_stride)
        self.shift_every = shift_every
        self.shift_phase = shift_phase % shift_every
        self.starts = [
            _axis_starts(c, t, o, a, w)
            for c, t, o, a, w in zip(self.canvas, self.tile, self.overlap, self.align, self.wrap)
        ]
        self._cache: dict[tuple[int, int], TilePlan] = {}

    @property
    def grid(self) -> Shape3:
        """Tiles per axis."""
        return tuple(len(s) for s in self.starts)

    @property
    def num_tiles(self) -> int:
        return math.prod(self.grid)

    def shift_at(self, step: int) -> tuple[int, int]:
        """Grid offset (H, W) in cells at a step."""
        moved = max(0, step - (step - self.shift_phase) % self.shift_every)
        return tuple(
            (moved * stride) % length if wrap else 0
            for stride, length, wrap in zip(self.shift_stride, self.canvas[1:], self.wrap[1:])
        )

    def _axis_weights(self, axis: int, k: int) -> torch.Tensor:
        starts, length, tile, wrap = self.starts[axis], self.canvas[axis], self.tile[axis], self.wrap[axis]
        weight = torch.ones(tile, dtype=torch.float64)
        n = len(starts)
        if n == 1 or self.blend == "uniform":
            return weight
        if k > 0 or wrap:
            prev_end = starts[k - 1] + tile if k > 0 else starts[-1] + tile - length
            left = prev_end - starts[k]
            if left > 0:
                weight[:left] *= _ramp(left, self.blend)
        if k < n - 1 or wrap:
            next_start = starts[k + 1] if k < n - 1 else starts[0] + length
            right = starts[k] + tile - next_start
            if right > 0:
                weight[tile - right :] *= _ramp(right, self.blend).flip(0)
        return weight

    def plan(self, step: int = 0) -> TilePlan:
        shift = self.shift_at(step)
        if shift not in self._cache:
            tiles, weights = [], []
            offsets = (0, *shift)
            for kf, sf in enumerate(self.starts[0]):
                for kh, sh in enumerate(self.starts[1]):
                    for kw, sw in enumerate(self.starts[2]):
                        start = (sf + offsets[0], (sh + offsets[1]) % self.canvas[1], (sw + offsets[2]) % self.canvas[2])
                        tiles.append(Tile(len(tiles), start, self.tile, self.canvas))
                        wf, wh, ww = self._axis_weights(0, kf), self._axis_weights(1, kh), self._axis_weights(2, kw)
                        weights.append(wf[:, None, None] * wh[None, :, None] * ww[None, None, :])
            self._cache[shift] = TilePlan(self.canvas, tiles, weights, shift)
        return self._cache[shift]

    def describe(self) -> str:
        f, h, w = self.grid
        return (
            f"{self.num_tiles} tiles ({f}x{h}x{w} over F,H,W) of {self.tile[0]}x{self.tile[1]}x{self.tile[2]} latent "
            f"cells on a {self.canvas[0]}x{self.canvas[1]}x{self.canvas[2]} canvas, overlap {self.overlap}, "
            f"blend {self.blend}, shift {self.shift}"
            + (f" by {self.shift_stride} cells/step" if any(self.wrap) else "")
            + (f", moving every {self.shift_every} steps from step {self.shift_phase}"
               if any(self.wrap) and self.shift_every > 1 else "")
        )
