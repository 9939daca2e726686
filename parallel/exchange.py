"""Executors: how the tiles of one denoising step run on many ranks and how their outputs meet.

Both executors plug into :class:`supergen.samplers.distributed.DistributedTiledSampler`
through three calls: ``scatter`` (the part of the canvas this rank keeps),
``predict`` (the blended model prediction on that part, one step) and
``gather`` (the whole canvas on every rank, after the last step).

``RegionExecutor`` (the default, ``exchange='region'``): each rank owns a box
of the canvas (:class:`~supergen.parallel.layout.RegionLayout`), keeps the
latents and its own copy of the scheduler state only there (schedulers act
cell by cell, so per-region copies step exactly like one whole-canvas
scheduler), and runs the tiles assigned to it. Per step:

1. Input halo: for each tile it runs, a rank needs the latents of the tile's
   cells that lie in other regions. With the wrap-shifted grid the tiles move
   every step, so the halo is recomputed every step from the plan: owner q
   sends rank r exactly the cells of q's box that r's tiles cover, once each,
   however many of r's tiles cover them. Tiles that lie wholly inside the own
   region run while the halo is in flight.
2. Output: each rank blends its tiles' weighted outputs into a canvas-sized
   accumulator, sends every other owner the accumulated values on that
   owner's cells (the same cell sets as step 1, in the other direction), and
   adds what it receives to its own region. Owners then step the scheduler.

Bytes per rank and step are therefore ``2 x (cells received + cells sent) x
channels x 4`` (float32 latents and accumulated predictions), which depends
only on how far tiles stick out of their owners' regions: the tile
assignment prefers the rank whose region holds most of the tile.

``AllGatherExecutor`` (``exchange='allgather'``, SuperGen's released scheme,
kept for comparison): every rank runs its tiles, all tile outputs are
all-gathered so that every rank holds all of them, and every rank blends and
steps the whole canvas. Its bytes are those of a ring all-gather.

Both count the bytes each rank sends plus receives, per step; the tests
check them against the geometry.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist

from supergen.parallel.layout import (
    RegionLayout,
    StepExchange,
    allgather_bytes,
    assign_tiles,
    idle_ranks,
    tile_costs,
)
from supergen.parallel.runtime import DistributedContext
from supergen.tiling.plan import Tile, TilePlan, TilePlanner

logger = logging.getLogger(__name__)

EXCHANGES = ("region", "allgather")

RunTiles = Callable[[torch.Tensor, list[Tile]], list[torch.Tensor]]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_whole_canvas(plan: TilePlan) -> bool:
    return len(plan) == 1 and not plan.tiles[0].wraps and plan.tiles[0].size == plan.canvas


class _Executor:
    """Shared bookkeeping: tile assignment per step, logging, byte counts."""

    scheme = ""

    def __init__(self, ctx: DistributedContext, planner: TilePlanner):
        self.ctx = ctx
        self.planner = planner
        #: Bytes this rank sent plus received in each denoising step.
        self.step_bytes: list[int] = []
        #: Bytes outside the steps (the final gather of the canvas, the decode).
        self.other_bytes = 0
        self._warned_idle = False

    def owners(self, step: int, plan: TilePlan, affinity: list[list[int]], skips: list[bool] | None) -> list[int]:
        costs = tile_costs(plan, skips)
        owners = assign_tiles(costs, affinity, self.ctx.world_size)
        idle = idle_ranks(owners, self.ctx.world_size)
        if idle and not self._warned_idle and self.ctx.is_main:
            world = self.ctx.world_size
            if world > len(plan):
                advice = (f"there are more processes than tiles: use at most {len(plan)} processes, or smaller tiles "
                          "(--tile-height/--tile-width) to give every process work")
            else:
                advice = (f"the cost balance put the {len(plan)} tiles on fewer processes at step {step} (uneven "
                          "tile costs); the output is unaffected, only those processes idle during that step's "
                          f"model calls. Tile counts that divide by {world} balance best")
            logger.warning(
                "%d tiles for %d ranks: ranks %s run no tiles and only step their part of the canvas; %s",
                len(plan), world, ", ".join(map(str, idle)), advice,
            )
            self._warned_idle = True
        if logger.isEnabledFor(logging.DEBUG):
            per_rank = [[k for k, r in enumerate(owners) if r == q] for q in range(self.ctx.world_size)]
            logger.debug(
                "step %d (%s): tiles per rank %s, load %s%s", step, self.scheme, per_rank,
                [round(sum(costs[k] for k in ks) / max(costs), 2) for ks in per_rank],
                f", predicted reuse {[k for k, s in enumerate(skips) if s]}" if skips and any(skips) else "",
            )
        return owners

    def canvas_part(self):
        """``(box, reduce)`` for canvas-wide filters: the slices of the canvas this rank holds (``None``:
        all of it) and a sum over ranks of a tensor every rank holds whole."""
        return None, None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank (a ring all-reduce: each rank sends and receives about twice its size)."""
        dist.all_reduce(tensor, group=self.ctx.group)
        moved = 4 * (self.ctx.world_size - 1) * _nbytes(tensor) // self.ctx.world_size
        if self.step_bytes:
            self.step_bytes[-1] += moved
        else:
            self.other_bytes += moved
        return tensor

    def comm_summary(self) -> dict:
        steps = self.step_bytes
        return {
            "scheme": self.scheme,
            "total": sum(steps) + self.other_bytes,
            "per_step": steps,
            "per_step_mean": sum(steps) / len(steps) if steps else 0.0,
        }


class RegionExecutor(_Executor):
    """Owner-computes over canvas regions with halo exchange (see the module docstring)."""

    scheme = "region"

    def __init__(self, ctx: DistributedContext, planner: TilePlanner, steps: int):
        super().__init__(ctx, planner)
        self.layout = RegionLayout.choose(planner, ctx.world_size, steps)
        self.box = self.layout.slices(ctx.rank)
        self._exchanges: dict[tuple, StepExchange] = {}
        self._masks: dict[tuple, dict[int, torch.Tensor]] = {}
        if ctx.is_main:
            logger.info(
                "region exchange: %s; rank %d owns cells %s", self.layout.describe(), ctx.rank,
                self.layout.boxes[ctx.rank],
            )

    def exchange_for(self, step: int, skips: list[bool] | None = None) -> StepExchange:
        """The step's plan, owners and halo masks (cached: the shifted grid repeats).

        A tile the cache reuses (``skips``) runs nowhere: its owner is -1, and
        the owners of its cells serve its reused prediction themselves.
        """
        plan = self.planner.plan(step)
        affinity = self.layout.affinity(plan)
        owners = self.owners(step, plan, affinity, skips)
        if skips is not None:
            owners = [-1 if skip else r for r, skip in zip(owners, skips)]
        key = (plan.shift, tuple(owners))
        if key not in self._exchanges:
            self._exchanges[key] = StepExchange(self.layout, plan, owners)
        return self._exchanges[key]

    def _device_masks(self, ex: StepExchange) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(cells of q's box this rank needs, cells of this rank's box q needs), on the device."""
        key = (ex.plan.shift, tuple(ex.owners))
        if key not in self._masks:
            r, dev = self.ctx.rank, self.ctx.device
            need = {q: m.to(dev) for q, m in sorted(ex.needs[r].items())}
            give = {q: ex.needs[q][r].to(dev) for q in range(self.ctx.world_size) if r in ex.needs[q]}
            self._masks[key] = (need, give)
        return self._masks[key]

    def scatter(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[self.box].clone()

    def canvas_part(self):
        return self.box, self.all_reduce_sum

    def _swap(self, recv_shapes: dict[int, int], payloads: dict[int, torch.Tensor], like: torch.Tensor):
        """Post receives of ``recv_shapes[q]`` cells from each q and sends ``payloads[q]``; returns (buffers, works, bytes).

        One batch, so that NCCL groups the pairwise sends and receives
        instead of deadlocking on their order; gloo runs them in the background.
        """
        b, c = like.shape[:2]
        bufs = {q: torch.empty((b, c, n), dtype=like.dtype, device=like.device) for q, n in recv_shapes.items()}
        peer, group = self.ctx.peer, self.ctx.group
        ops = [dist.P2POp(dist.irecv, buf, peer(q), group) for q, buf in bufs.items()]
        ops += [dist.P2POp(dist.isend, p, peer(q), group) for q, p in payloads.items()]
        works = dist.batch_isend_irecv(ops) if ops else []
        moved = sum(_nbytes(t) for t in bufs.values()) + sum(_nbytes(t) for t in payloads.values())
        return bufs, works, moved

    def predict(
        self,
        step: int,
        local: torch.Tensor,
        run_tiles: RunTiles,
        skips: list[bool] | None = None,
        reused: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's part of the step's blended prediction; tiles in ``skips`` take ``reused`` (the cache's
        prediction on this rank's box) on their cells, added here by the cells' owner."""
        ex = self.exchange_for(step, skips)
        rank, layout = self.ctx.rank, self.layout
        need, give = self._device_masks(ex)
        b, c = local.shape[:2]
        # NaN everywhere this rank has no current data: a tile reading a cell
        # it was not sent would poison the output instead of silently using stale values.
        canvas = torch.full((b, c, *layout.canvas), float("nan"), dtype=local.dtype, device=local.device)
        canvas[self.box] = local

        bufs, works, moved = self._swap(
            {q: int(m.sum()) for q, m in need.items()},
            {q: local[:, :, m].contiguous() for q, m in give.items()},
            local,
        )
        tiles = ex.tiles_of(rank)
        ready = ex.local_only(rank)
        outputs: dict[int, torch.Tensor] = {}
        first = [t for t, ok in zip(tiles, ready) if ok]
        outputs.update(zip((t.index for t in first), run_tiles(canvas, first)))
        for work in works:
            work.wait()
        for q, buf in bufs.items():
            canvas[layout.slices(q)][:, :, need[q]] = buf
        rest = [t for t, ok in zip(tiles, ready) if not ok]
        outputs.update(zip((t.index for t in rest), run_tiles(canvas, rest)))

        acc = torch.zeros((b, c, *layout.canvas), dtype=torch.float32, device=local.device)
        for tile in tiles:
            weight = ex.plan.weights[tile.index].to(device=local.device, dtype=torch.float32)
            tile.add_into(acc, outputs[tile.index].float() * weight)
        bufs, works, moved_out = self._swap(
            {q: int(m.sum()) for q, m in give.items()},
            {q: acc[layout.slices(q)][:, :, m].contiguous() for q, m in need.items()},
            acc,
        )
        prediction = acc[self.box].clone()
        for work in works:
            work.wait()
        for q in sorted(bufs):
            prediction[:, :, give[q]] += bufs[q]
        if skips is not None and any(skips):
            weight_FHW = torch.zeros(layout.canvas, dtype=torch.float32, device=local.device)
            for tile, skip in zip(ex.plan.tiles, skips):
                if skip:
                    weight = ex.plan.weights[tile.index].to(device=local.device, dtype=torch.float32)
                    tile.add_into(weight_FHW[None, None], weight[None, None])
            prediction += weight_FHW[self.box[2:]] * reused.float()
        self.step_bytes.append(moved + moved_out)
        return prediction

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole canvas on every rank (an all-gather of the regions, padded to the largest)."""
        b, c = local.shape[:2]
        sizes = [b * c * (hi_f - lo_f) * (hi_h - lo_h) * (hi_w - lo_w)
                 for (lo_f, hi_f), (lo_h, hi_h), (lo_w, hi_w) in self.layout.boxes]
        chunk = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
        chunk[: local.numel()] = local.reshape(-1)
        parts = [torch.empty_like(chunk) for _ in range(self.ctx.world_size)]
        dist.all_gather(parts, chunk, group=self.ctx.group)
        self.other_bytes += 2 * (self.ctx.world_size - 1) * _nbytes(chunk)
        canvas = torch.empty((b, c, *self.layout.canvas), dtype=local.dtype, device=local.device)
        for q, (part, size) in enumerate(zip(parts, sizes)):
            canvas[self.layout.slices(q)] = part[:size].reshape(b, c, *self.layout.box_shape(q))
        return canvas


class AllGatherExecutor(_Executor):
    """Every rank ends each step with every tile's output (SuperGen's released scheme)."""

    scheme = "allgather"

    def __init__(self, ctx: DistributedContext, planner: TilePlanner, out_dtype: torch.dtype):
        super().__init__(ctx, planner)
        self.out_dtype = out_dtype

    def scatter(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def predict(
        self,
        step: int,
        latents: torch.Tensor,
        run_tiles: RunTiles,
        skips: list[bool] | None = None,
        reused: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The whole canvas's prediction (every rank blends every tile; ``run_tiles`` serves reused tiles)."""
        plan = self.planner.plan(step)
        world = self.ctx.world_size
        owners = self.owners(step, plan, [[0] * world for _ in plan.tiles], skips)
        mine = [tile for tile, r in zip(plan.tiles, owners) if r == self.ctx.rank]
        outs = run_tiles(latents, mine)
        slots = max(owners.count(r) for r in range(world))
        b, c = latents.shape[:2]
        # The model's dtype, known to ranks without tiles too, so every rank's buffer matches.
        stacked = torch.zeros((slots, b, c, *plan.tiles[0].size), dtype=self.out_dtype, device=latents.device)
        for i, out in enumerate(outs):
            stacked[i] = out
        gathered = [torch.empty_like(stacked) for _ in range(world)]
        dist.all_gather(gathered, stacked, group=self.ctx.group)
        self.step_bytes.append(allgather_bytes(owners, world, stacked[0].numel(), stacked.element_size())[self.ctx.rank])
        outputs: list[torch.Tensor | None] = [None] * len(plan)
        for r in range(world):
            for i, k in enumerate(k for k, o in enumerate(owners) if o == r):
                outputs[k] = gathered[r][i]
        if _is_whole_canvas(plan):
            return outputs[0]
        return plan.blend(outputs)

    def gather(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def run_shared(self, count: int, run: Callable[[list[int]], list[torch.Tensor]], like: torch.Tensor) -> list[torch.Tensor]:
        """Items ``0..count-1`` spread round-robin over the ranks, every output all-gathered to every rank.

        ``run(indices)`` computes this rank's items (outputs shaped like ``like``),
        so every item is computed once, by one rank, exactly as one process would.
        """
        world, rank = self.ctx.world_size, self.ctx.rank
        mine = list(range(rank, count, world))
        slots = -(-count // world)
        stacked = torch.zeros((slots, *like.shape), dtype=self.out_dtype, device=like.device)
        for i, out in enumerate(run(mine)):
            stacked[i] = out
        gathered = [torch.empty_like(stacked) for _ in range(world)]
        dist.all_gather(gathered, stacked, group=self.ctx.group)
        owners = [k % world for k in range(count)]
        self.step_bytes[-1] += allgather_bytes(owners, world, like.numel(), stacked.element_size())[rank]
        return [gathered[k % world][k // world] for k in range(count)]


def make_executor(ctx: DistributedContext, planner: TilePlanner, exchange: str, steps: int, out_dtype: torch.dtype):
    """The executor for ``exchange`` (``region`` or ``allgather``); ``out_dtype`` is the model output's dtype."""
    if exchange == "region":
        return RegionExecutor(ctx, planner, steps)
    if exchange == "allgather":
        return AllGatherExecutor(ctx, planner, out_dtype)
    raise ValueError(f"exchange={exchange!r} is not one of {', '.join(EXCHANGES)}")
