"""Who owns which part of the canvas, who runs which tile, and what must move: pure geometry.

Nothing here talks to other processes, so every rank computes the same answers
from the same inputs, and the benchmark can evaluate real 2K/4K geometries on
a laptop. Coordinates are latent cells (F, H, W); a *box* is a half-open range
per axis.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from supergen.tiling.plan import Tile, TilePlan, TilePlanner

Shape3 = tuple[int, int, int]
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: Relative cost of a tile the region cache predicts to reuse: blending a stored
#: output, no model call. Not zero, so a rank is not handed an unbounded number.
SKIP_COST = 0.02


def _bounds(length: int, parts: int, align: int) -> list[int]:
    """``parts + 1`` boundaries splitting ``length`` into near-equal multiples of ``align``."""
    units = length // align
    return [align * round(k * units / parts) if k < parts else length for k in range(parts + 1)]


def _factorisations(world_size: int) -> list[Shape3]:
    return [
        (a, b, world_size // (a * b))
        for a in range(1, world_size + 1)
        for b in range(1, world_size // a + 1)
        if world_size % (a * b) == 0
    ]


def _overlap_1d(cells: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return cells[(cells >= lo) & (cells < hi)] - lo


def _count_1d(start: int, size: int, length: int, lo: int, hi: int) -> int:
    """Cells of the wrapped range [start, start + size) mod length that fall in [lo, hi)."""
    end = start + size
    count = max(0, min(end, length, hi) - max(start, lo))
    if end > length:  # the part that wrapped to the start of the axis
        count += max(0, min(end - length, hi) - max(0, lo))
    return count


class RegionLayout:
    """A partition of the canvas into one box per rank (a grid of ``splits`` boxes over F, H, W).

    Each rank keeps the latents and the scheduler state of its box only.
    """

    def __init__(self, canvas: Shape3, splits: Shape3, align: Shape3 = (1, 1, 1)):
        for axis, (length, parts, a) in enumerate(zip(canvas, splits, align)):
            if parts > length // a:
                raise ValueError(
                    f"cannot split canvas axis {'FHW'[axis]} of {length} cells into {parts} regions of at least "
                    f"{a} cells; use fewer processes"
                )
        self.canvas = tuple(canvas)
        self.splits = tuple(splits)
        edges = [_bounds(length, parts, a) for length, parts, a in zip(canvas, splits, align)]
        self.boxes: list[Box] = [
            ((edges[0][i], edges[0][i + 1]), (edges[1][j], edges[1][j + 1]), (edges[2][k], edges[2][k + 1]))
            for i, j, k in itertools.product(*(range(p) for p in splits))
        ]

    @property
    def world_size(self) -> int:
        return len(self.boxes)

    def slices(self, rank: int) -> tuple[slice, slice, slice, slice, slice]:
        """Index of rank's box in a (B, C, F, H, W) tensor."""
        return (slice(None), slice(None), *(slice(lo, hi) for lo, hi in self.boxes[rank]))

    def box_shape(self, rank: int) -> Shape3:
        return tuple(hi - lo for lo, hi in self.boxes[rank])

    def tile_cells_in(self, tile: Tile, rank: int) -> int:
        """How many of the tile's cells lie in rank's box."""
        return math.prod(
            _count_1d(s, n, length, lo, hi)
            for s, n, length, (lo, hi) in zip(tile.start, tile.size, tile.canvas, self.boxes[rank])
        )

    def tile_mask_in(self, tile: Tile, rank: int, mask: torch.Tensor) -> None:
        """Mark the tile's cells in rank's box on ``mask`` (shaped like the box)."""
        f, h, w = (_overlap_1d(cells, lo, hi) for cells, (lo, hi) in zip(tile.cells, self.boxes[rank]))
        if len(f) and len(h) and len(w):
            mask[f[:, None, None], h[None, :, None], w[None, None, :]] = True

    def describe(self) -> str:
        return f"{self.world_size} regions ({self.splits[0]}x{self.splits[1]}x{self.splits[2]} over F,H,W)"

    @classmethod
    def choose(cls, planner: TilePlanner, world_size: int, steps: int) -> "RegionLayout":
        """The grid of regions that moves the fewest cells over a run of ``steps`` steps.

        Every factorisation of ``world_size`` into F x H x W splits is scored
        by the halo cells its tile assignment would exchange (counted without
        building masks, so this is cheap even for 4K canvases).
        """
        best, best_cells = None, None
        for splits in _factorisations(world_size):
            if any(p > length // a for p, length, a in zip(splits, planner.canvas, planner.align)):
                continue
            layout = cls(planner.canvas, splits, planner.align)
            moved = 0
            for step in range(steps):
                plan = planner.plan(step)
                owners = assign_tiles([1.0] * len(plan), layout.affinity(plan), world_size)
                moved += sum(t.num_cells - layout.tile_cells_in(t, r) for t, r in zip(plan.tiles, owners))
            if best_cells is None or moved < best_cells:
                best, best_cells = layout, moved
        if best is None:
            cells = tuple(c // a for c, a in zip(planner.canvas, planner.align))
            fits = next(
                n for n in range(world_size - 1, 0, -1)
                if any(all(p <= c for p, c in zip(f, cells)) for f in _factorisations(n))
            )
            raise ValueError(
                f"a canvas of {cells[0]}x{cells[1]}x{cells[2]} patch cells cannot be cut into a grid of {world_size} "
                f"regions; use at most {fits} processes for this size"
            )
        return best

    def affinity(self, plan: TilePlan) -> list[list[int]]:
        """``affinity[k][r]``: cells of tile k that lie in rank r's box (what r would not need to fetch)."""
        return [[self.tile_cells_in(tile, r) for r in range(self.world_size)] for tile in plan.tiles]


def assign_tiles(costs: list[float], affinity: list[list[int]], world_size: int) -> list[int]:
    """Owner rank of every tile: balanced cost first, then as much of each tile in its owner's region as possible.

    The makespan target is the one of greedy longest-processing-time
    scheduling; within it, each tile (most expensive first) goes to the rank
    holding most of its cells that still has room, ties to the least loaded
    and then the lowest rank. Deterministic: every rank gets the same answer.
    """
    order = sorted(range(len(costs)), key=lambda k: (-costs[k], k))
    loads = [0.0] * world_size
    for k in order:
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += costs[k]
    bound = max(loads) * (1 + 1e-9)
    loads = [0.0] * world_size
    owners = [-1] * len(costs)
    for k in order:
        fits = [r for r in range(world_size) if loads[r] + costs[k] <= bound]
        pool = fits or list(range(world_size))
        r = max(pool, key=lambda r: (affinity[k][r], -loads[r], -r))
        owners[k] = r
        loads[r] += costs[k]
    return owners


def tile_costs(plan: TilePlan, skips: list[bool] | None = None) -> list[float]:
    """Cost model: a tile costs its cell count (all ranks run the same model), a predicted reuse ``SKIP_COST`` of it."""
    skips = skips or [False] * len(plan)
    return [tile.num_cells * (SKIP_COST if skip else 1.0) for tile, skip in zip(plan.tiles, skips)]


@dataclass
class StepExchange:
    """What moves in one step of the region scheme, from the point of view of every rank.

    ``needs[r][q]`` (r != q) is a boolean mask over q's box: the cells of q's
    region that tiles owned by r cover. Before the model runs, q sends r its
    latents there; after, r sends q its weighted tile outputs there.
    """

    layout: RegionLayout
    plan: TilePlan
    owners: list[int]

    @cached_property
    def needs(self) -> list[dict[int, torch.Tensor]]:
        needs: list[dict[int, torch.Tensor]] = [{} for _ in range(self.layout.world_size)]
        for tile, r in zip(self.plan.tiles, self.owners):
            if r < 0:  # reused from the cache: runs nowhere, moves nothing
                continue
            for q in range(self.layout.world_size):
                if q == r or self.layout.tile_cells_in(tile, q) == 0:
                    continue
                if q not in needs[r]:
                    needs[r][q] = torch.zeros(self.layout.box_shape(q), dtype=torch.bool)
                self.layout.tile_mask_in(tile, q, needs[r][q])
        return needs

    def tiles_of(self, rank: int) -> list[Tile]:
        return [tile for tile, r in zip(self.plan.tiles, self.owners) if r == rank]

    def local_only(self, rank: int) -> list[bool]:
        """Per tile of ``rank`` (in order): does it need no cell from another region?"""
        return [
            self.layout.tile_cells_in(tile, rank) == tile.num_cells for tile in self.tiles_of(rank)
        ]

    def halo_cells(self, rank: int) -> int:
        """Cells rank receives plus cells it sends in one exchange (inputs or outputs)."""
        received = sum(int(m.sum()) for m in self.needs[rank].values())
        sent = sum(int(self.needs[q][rank].sum()) for q in range(self.layout.world_size) if rank in self.needs[q])
        return received + sent

    def bytes_per_rank(self, channels: int, batch: int = 1, itemsize: int = 4) -> list[int]:
        """Bytes each rank sends plus receives in the step: the input halo exchange and the output exchange."""
        return [2 * self.halo_cells(r) * channels * batch * itemsize for r in range(self.layout.world_size)]


def allgather_bytes(owners: list[int], world_size: int, tile_numel: int, itemsize: int) -> list[int]:
    """Bytes per rank of a ring all-gather of every rank's tile outputs (padded to the busiest rank).

    A ring all-gather of ``world_size`` chunks sends and receives
    ``world_size - 1`` chunks on every rank.
    """
    if world_size == 1:
        return [0]
    chunk = max(owners.count(r) for r in range(world_size)) * tile_numel * itemsize
    return [2 * (world_size - 1) * chunk] * world_size


def idle_ranks(owners: list[int], world_size: int) -> list[int]:
    """Ranks that own no tile in a step (they still step the scheduler on their region)."""
    busy = set(owners)
    return [r for r in range(world_size) if r not in busy]


def exchange_bytes(planner: TilePlanner, world_size: int, steps: int, channels: int, scheme: str = "region",
                   itemsize: int = 4) -> float:
    """Mean over ``steps`` sampled steps of the busiest rank's bytes per step for the tile exchange among
    ``world_size`` ranks (the planner's cost model; region halos in float32, all-gather at ``itemsize``)."""
    if world_size == 1:
        return 0.0
    layout = RegionLayout.choose(planner, world_size, steps) if scheme == "region" else None
    total = 0.0
    for step in range(steps):
        plan = planner.plan(step)
        if layout is None:
            owners = assign_tiles(tile_costs(plan), [[0] * world_size for _ in plan.tiles], world_size)
            total += allgather_bytes(owners, world_size, channels * plan.tiles[0].num_cells, itemsize)[0]
        else:
            owners = assign_tiles(tile_costs(plan), layout.affinity(plan), world_size)
            total += max(StepExchange(layout, plan, owners).bytes_per_rank(channels))
    return total / steps
