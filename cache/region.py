"""Region-aware step cache for the tiled denoising loop.

Denoising trajectories change little from one step to the next, and unevenly
so over the canvas: background settles early, moving subjects keep changing.
:class:`RegionCache` decides per tile, every step, whether the model must run
or whether the tile's last output can be reused, from a predictor that needs
no calibration (the tile-wise, EasyCache-style rule the SuperGen paper uses):

* For every region (a fixed block of latent cells) the cache keeps the inputs
  and outputs of the last two steps where the region was computed, and from
  them the region's *response* ``k = mean|o1 - o2| / mean|x1 - x2|``: how
  strongly its output moves when its input moves.
* At step ``t`` the predicted relative output change of a region is
  ``k * mean|x_t - x_{t-1}| / mean|o1|``. It is added to a per-cell
  accumulator; a tile is recomputed when the mean of ``accumulator /
  threshold`` over its cells reaches one (the accumulator of recomputed cells
  is then reset to zero).
* On a skip the tile gets, by ``reuse``: the cached canvas prediction of its
  cells (``output``); that prediction extrapolated to the current timestep
  from the cells' last two computed steps (``taylor``); its current input plus
  the cached output-minus-input (``residual``); or the residual its cells'
  transformer blocks last added to the hidden states, run through the model's
  embeddings and output head at the current timestep (``blocks``; the loop
  asks the adapter for it; one process only).

All state lives in canvas coordinates (per latent cell, or per region of
cells), never per tile, so it stays valid when a wrap-shifted grid moves
between steps: a tile reads the state of whatever cells it covers now.
A cell's output depends on where the tile boundaries lie, though (moving
the grid by one stride changes the blended prediction by 0.4-0.7 of itself
on the toy model, against 0.1-0.3 of denoising change per step, even
averaged over 8x8 cells), and two policies handle that:

* ``across_moves=True`` (``CacheConfig.grid='shifting'``, the default): the
  grid keeps moving every step, as without the cache, and a reused cell gets
  its last canvas prediction, made at the previous grid position. The
  response ``k`` is measured between a cell's last two computed steps
  wherever the grid stood, so the predicted change includes the boundary
  movement: it is the error a reuse hands over, and it needs a larger
  threshold (``CacheConfig.shift_threshold``). The uncached video is the
  default video, and a reuse is one step of a held grid for those cells.
* ``across_moves=False`` (``grid='held'``): every cell remembers the grid
  position (the plan's shift) of its last computed step and is only reused
  at that position; ``k`` is measured only between two computed steps at one
  grid position, so the predictor reads denoising change alone. A grid that
  moves every step then computes every tile; ``TilePlanner(shift_every=k)``
  holds the grid for ``k`` steps and leaves ``k - 1`` cacheable steps per
  move (another grid schedule, so another sample of the prompt).

The canvas-space reuse modes are a function of a cell's own state only, so
under the region exchange the owner of a cell serves its reused prediction
and a skipped tile runs nowhere and moves nothing.

Under torchrun each rank keeps the state of its own box of the canvas
(``box``) and the decisions come from sums over regions and tiles that
``reduce`` adds up over the ranks. Every sum is taken in fixed point
(int64, :data:`FIXED_POINT` units): integer addition does not depend on
the order of its terms, so 1, 2 or 3 ranks make bit-identical decisions.

The cache sees the guided prediction that :meth:`BackboneAdapter.predict`
returns, so the conditional and unconditional branches of a tile always share
one decision: both run, or both are reused.

The API has two halves so that a parallel executor can plan with it:
:meth:`RegionCache.predict_skips` is a pure function of the cache state, the
step and the canvas input (every rank that holds the same state and latents
gets the same answer and nothing changes), and :meth:`RegionCache.update`
records the outcome once the step's prediction is known.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from supergen.tiling.plan import Tile, TilePlan

logger = logging.getLogger(__name__)

SCOPES = ("region", "canvas")
REUSE_MODES = ("output", "taylor", "residual", "blocks")
#: Reuse modes served from a cell's own canvas state (no model call, valid on the rank that owns the cell).
CANVAS_REUSE = ("output", "taylor", "residual")
#: Decision statistics are summed as integers in units of 2**-24: exact, so independent of summation order.
FIXED_POINT = 2.0**24

#: Exponent of the adaptive threshold rule ``thr_r = threshold * (v_r / mean v) ** ADAPT_EXPONENT``.
#: Negative: regions whose outputs vary more over time get a *stricter* threshold,
#: because the predictor extrapolates from the last two computed steps and that
#: extrapolation is least reliable where the output moves most. Not decided by
#: measurement yet: on the tiny model stricter, looser and off gave identical
#: skip decisions (docs/benchmarks.md); a real checkpoint must settle it.
ADAPT_EXPONENT = -0.5
#: Adaptive thresholds stay within this factor of the base threshold, so one
#: outlier region can neither freeze nor pin a tile.
ADAPT_RANGE = 2.0
#: Weight of the newest step in the running estimate of a region's variability.
ADAPT_EMA = 0.5
#: A cell whose fresh blend weight reaches this counts as recomputed (weights
#: sum to one up to float rounding).
_FRESH = 1.0 - 1e-6
_EPS = 1e-12


@dataclass(frozen=True)
class CacheSchedule:
    """Which steps may skip at all: ``warmup`` first and ``cooldown`` last steps never do."""

    num_steps: int
    warmup: int
    cooldown: int

    def may_skip(self, step: int) -> bool:
        return self.warmup <= step < self.num_steps - self.cooldown


def _axis_regions(length: int, size: int) -> torch.Tensor:
    """Region index of every cell on one axis: ``ceil(length / size)`` nearly equal blocks."""
    n = max(1, math.ceil(length / size))
    return torch.arange(length) * n // length


def _fixed(values: torch.Tensor) -> torch.Tensor:
    """Finite float values as int64 fixed-point numbers (see :data:`FIXED_POINT`)."""
    return torch.round(values.double() * FIXED_POINT).to(torch.int64)


def _local_reduce(values: torch.Tensor, op: str) -> torch.Tensor:
    """The reduction of one process: its values are already the totals."""
    return values


Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class RegionCache:
    """Per-region skip predictor and reuse store over one latent canvas (or one rank's box of it).

    Args:
        canvas: latent canvas (F, H, W) in cells.
        region: region size (F, H, W) in cells; the state behind the skip
            predictor (response, variability, threshold) is kept per region.
        threshold: accumulated predicted relative change at which a tile is
            recomputed; 0 never skips.
        schedule: warm-up and cool-down steps (always computed).
        max_skips: most consecutive steps any cell may be served from the cache.
        adaptive: scale each region's threshold by its measured variability
            (see :data:`ADAPT_EXPONENT`).
        scope: ``region`` decides per tile; ``canvas`` makes one decision for
            the whole canvas (every tile runs or every tile is reused), the
            baseline a whole-model cache would give.
        adapt_exponent: override :data:`ADAPT_EXPONENT` (benchmarks).
        reuse: what a skipped tile reuses (see the module docstring and
            :class:`supergen.CacheConfig`).
        patch: the transformer's patch size in cells (token geometry of the
            ``blocks`` residual).
        box: the cells whose state this cache keeps, ``((f0, f1), (h0, h1),
            (w0, w1))``; default the whole canvas. Under the region exchange,
            the rank's own region.
        reduce: ``reduce(int64 tensor, "sum" | "max")`` totals a tensor over
            every rank's box (an all-reduce); default: this process holds the
            whole canvas.
        taylor_damping: fraction of the first-order term that ``reuse='taylor'``
            applies (1 is plain linear extrapolation in the timestep).
        across_moves: a cell may be reused at a grid position other than the
            one it was computed at, and its response is measured between its
            last two computed steps wherever the grid stood (so the predicted
            change includes the boundary movement: the error a reuse hands
            over). Off: a grid move computes every tile (held-grid schedules).
    """

    def __init__(
        self,
        canvas: tuple[int, int, int],
        region: tuple[int, int, int],
        threshold: float,
        schedule: CacheSchedule,
        max_skips: int = 3,
        adaptive: bool = True,
        scope: str = "region",
        adapt_exponent: float | None = None,
        reuse: str = "output",
        patch: tuple[int, int, int] = (1, 1, 1),
        box: Box | None = None,
        reduce=None,
        taylor_damping: float = 1.0,
        across_moves: bool = False,
    ):
        if reuse not in REUSE_MODES:
            raise ValueError(f"cache reuse={reuse!r} is not one of {', '.join(REUSE_MODES)}")
        if scope not in SCOPES:
            raise ValueError(f"cache scope={scope!r} is not one of {', '.join(SCOPES)}")
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"cache threshold={threshold!r} must be a finite number >= 0")
        self.canvas = tuple(canvas)
        self.box = tuple(box) if box is not None else tuple((0, c) for c in self.canvas)
        self.partial = self.box != tuple((0, c) for c in self.canvas)
        if self.partial and reuse == "blocks":
            raise ValueError(
                "cache reuse='blocks' keeps the blocks' residual of whole tiles, which a rank holding one region of "
                "the canvas does not have; use reuse='output' (or the all-gather exchange)"
            )
        self._reduce = reduce or _local_reduce
        self.region = tuple(min(r, c) for r, c in zip(region, canvas))
        self.threshold = float(threshold)
        self.schedule = schedule
        self.max_skips = max_skips
        self.adaptive = adaptive
        self.scope = scope
        self.reuse_mode = reuse
        self.taylor_damping = float(taylor_damping)
        self.across_moves = bool(across_moves)
        self.patch = tuple(patch)
        self._blocks = None  # per token: the blocks' residual (branches, dim, Ft, Ht, Wt), for reuse='blocks'
        self.adapt_exponent = ADAPT_EXPONENT if adapt_exponent is None else adapt_exponent
        idx = [_axis_regions(c, r) for c, r in zip(self.canvas, self.region)]
        self.grid = tuple(int(i[-1]) + 1 for i in idx)
        region_of = (idx[0][:, None, None] * self.grid[1] + idx[1][None, :, None]) * self.grid[2] + idx[2][None, None, :]
        self._region_count = torch.bincount(region_of.reshape(-1), minlength=math.prod(self.grid)).double()
        # Flat region id of every cell of the box (F, H, W): region statistics are scatter-sums over it.
        self._region_of = region_of[self._box_index]
        self._device: torch.device | None = None
        self._x_prev = None  # box input of the previous step (1, C, F, H, W)
        self._x1 = None  # input at each cell's last computed step
        self._o1 = None  # output at each cell's last computed step
        self._o2 = None  # output at each cell's computed step before that (reuse='taylor')
        self._t1 = None  # per cell: timestep of its last computed step (F, H, W)
        self._t2 = None  # per cell: timestep of its computed step before that
        self._last = None  # per cell: the last prediction, fresh or reused (reuse='output' / 'residual')
        self._d_out = None  # per cell: mean_C |o1 - o2| between its last two computed steps (F, H, W)
        self._d_in = None  # per cell: mean_C |x1 - x2|
        self._computed = None  # per cell: computed steps so far (0, 1, 2+)
        self._grid1 = None  # per cell: grid position (plan shift id) of its last computed step, -1 before any
        self._responded = None  # per cell: whether d_out / d_in were measured between two steps at one grid position
        self._acc = None  # per cell: accumulated predicted relative change since the last compute
        self._run = None  # per cell: consecutive steps served from the cache
        self._variability = None  # per region: running estimate of the per-step relative change
        self.reuse_maps: list[torch.Tensor] = []  # per step: reused fraction of every cell of the box (F, H, W)
        self.region_reuse: list[torch.Tensor] = []  # per step: reused fraction of every region, shape ``grid``

    @property
    def _box_index(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, hi) for lo, hi in self.box)

    def _on_canvas(self, field_FHW: torch.Tensor) -> torch.Tensor:
        """A per-cell field of the box placed on a zero canvas (F, H, W), so that tiles can read it."""
        if not self.partial:
            return field_FHW
        canvas = field_FHW.new_zeros(self.canvas)
        canvas[self._box_index] = field_FHW
        return canvas

    def _box_of(self, canvas_field: torch.Tensor) -> torch.Tensor:
        """The box's part of a canvas-shaped tensor (any leading dimensions)."""
        return canvas_field[(..., *self._box_index)] if self.partial else canvas_field

    # --- predictor ------------------------------------------------------------
    def _region_sums(self, fields_KFHW: torch.Tensor) -> torch.Tensor:
        """Sums of K per-cell fields over every region, totalled over all ranks: (K, regions) float64."""
        ids = self._region_of.to(fields_KFHW.device).reshape(-1)
        n = math.prod(self.grid)
        fixed = _fixed(fields_KFHW.reshape(fields_KFHW.shape[0], -1))
        total = torch.zeros((fields_KFHW.shape[0], n), dtype=torch.int64, device=fields_KFHW.device)
        total.index_add_(1, ids, fixed)
        return self._reduce(total, "sum").double() / FIXED_POINT

    def _to_cells(self, per_region: torch.Tensor) -> torch.Tensor:
        return per_region[self._region_of.to(per_region.device)]

    def _step_change(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted relative output change of this step: per cell of the box (F, H, W) and per region (flat).

        Infinite where a region lacks two computed steps at one grid position:
        such cells cannot be predicted, so any tile over them runs.
        """
        dx = (latents - self._x_prev).abs().mean(dim=(0, 1)).double()
        fields = torch.stack([
            self._d_out, self._d_in, self._o1.abs().mean(dim=(0, 1)).double(), dx, self._responded.double()
        ])
        d_out, d_in, out_scale, d_x, ready = self._region_sums(fields)
        count = self._region_count.to(d_out.device)
        change = (d_out / d_in.clamp_min(_EPS)) * (d_x / count) / (out_scale / count).clamp_min(_EPS)
        change = torch.where(ready >= count, change, torch.full_like(change, math.inf))
        return self._to_cells(change), change

    def _region_thresholds(self) -> torch.Tensor:
        """Threshold of every region (flat): the base threshold, scaled per region when adaptive."""
        base = torch.full((math.prod(self.grid),), self.threshold, dtype=torch.float64, device=self._device)
        if self.adaptive and self._variability is not None:
            v = self._variability
            known = torch.isfinite(v)
            if bool(known.any()):
                mean = v[known].mean().clamp_min(_EPS)
                scale = (v.clamp_min(_EPS) / mean).pow(self.adapt_exponent).clamp(1 / ADAPT_RANGE, ADAPT_RANGE)
                base = torch.where(known, base * scale, base)
        return base

    def thresholds(self) -> torch.Tensor:
        """Current threshold of every region, shape ``grid`` (F, H, W)."""
        return self._region_thresholds().cpu().reshape(self.grid)

    def predict_skips(self, step: int, plan: TilePlan, latents: torch.Tensor) -> list[bool]:
        """Which tiles of ``plan`` reuse their cached output at ``step`` (True = skip).

        Pure: reads the cache state and ``latents`` (the input of this step on
        the cache's box, (1, C, F, H, W)) and changes nothing, so every rank
        that holds the same state gets the same answer. Under torchrun every
        rank must call it (its sums are collective).
        """
        if self.threshold <= 0 or self._x_prev is None or not self.schedule.may_skip(step):
            return [False] * len(plan)
        acc = self._acc + self._step_change(latents)[0]
        load = self._on_canvas(acc / self._to_cells(self._region_thresholds()))
        run = self._on_canvas(self._run)
        blocked = ~torch.isfinite(load)
        if not self.across_moves:
            # A cell last computed at another grid position would be handed that grid's output.
            blocked = blocked | self._on_canvas(self._grid1 != self._grid_id(plan))
        finite = torch.where(blocked, torch.zeros_like(load), load)
        if self.scope == "canvas":
            parts = [(finite, blocked, run)]
        else:
            parts = [(t.gather(finite[None, None]), t.gather(blocked[None, None]), t.gather(run[None, None]))
                     for t in plan.tiles]
        sums = self._reduce(torch.stack([torch.stack([_fixed(f.sum()), b.sum()]) for f, b, _ in parts]), "sum")
        longest = self._reduce(torch.stack([r.max() for _, _, r in parts]), "max")
        cells = [math.prod(self.canvas)] if self.scope == "canvas" else [t.num_cells for t in plan.tiles]
        skips = [
            int(blocked_cells) == 0 and float(load_sum) / FIXED_POINT < n and int(run_max) < self.max_skips
            for (load_sum, blocked_cells), run_max, n in zip(sums.tolist(), longest.tolist(), cells)
        ]
        return skips * len(plan) if self.scope == "canvas" else skips

    def _grid_id(self, plan: TilePlan) -> int:
        """One integer per grid position (the plan's (H, W) shift)."""
        shift_h, shift_w = plan.shift
        return shift_h * self.canvas[2] + shift_w

    # --- outputs --------------------------------------------------------------
    def reused_prediction(self, latents: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """What every cell of the box gets where it is served from the cache at this step (1, C, F, H, W).

        A function of each cell's own state and input only, so a reused tile
        reads it in canvas coordinates wherever the grid has moved.
        """
        if self.reuse_mode == "output":
            return self._last.to(latents.dtype)
        if self.reuse_mode == "residual":
            return (latents + self._last).to(latents.dtype)
        if self.reuse_mode == "taylor":
            span = self._t1 - self._t2
            # First order in the timestep where a cell has two computed steps, else its last output.
            known = (self._computed >= 2) & (span != 0)
            slope = torch.where(known, (float(timestep) - self._t1) / torch.where(known, span, 1.0), 0.0)
            slope = (self.taylor_damping * slope).to(self._o1.dtype)
            return (self._o1 + (self._o1 - self._o2) * slope).to(latents.dtype)
        raise ValueError("reuse='blocks' is served through the adapter (block_residual), not from the canvas")

    def _token_tile(self, tile: Tile) -> Tile:
        p = self.patch
        return Tile(tile.index, *(tuple(v // q for v, q in zip(vals, p)) for vals in (tile.start, tile.size, tile.canvas)))

    def block_residual(self, tiles: list[Tile]) -> torch.Tensor:
        """Cached residual of the transformer blocks for ``tiles``: (N, branches, tokens, dim), for
        ``adapter.predict(..., block_residual=...)``."""
        out = []
        for tile in tiles:
            res = self._token_tile(tile).gather(self._blocks)  # branches, dim, ft, ht, wt
            out.append(res.flatten(2).transpose(1, 2))
        return torch.stack(out)

    def _store_blocks(self, plan: TilePlan, skips: list[bool], residuals: torch.Tensor) -> None:
        """Blend the computed tiles' block residuals (tile-major, as ``predict`` returns them) into the canvas."""
        tiles = [(tile, weight) for tile, weight, skip in zip(plan.tiles, plan.weights, skips) if not skip]
        grid = tuple(c // q for c, q in zip(self.canvas, self.patch))
        if self._blocks is None:
            self._blocks = residuals.new_zeros((residuals.shape[1], residuals.shape[3], *grid))
        fresh = torch.zeros(grid, dtype=torch.float32, device=residuals.device)
        blended = torch.zeros_like(self._blocks, dtype=torch.float32)
        for (tile, weight), res in zip(tiles, residuals):
            token_tile = self._token_tile(tile)
            pt, ph, pw = self.patch
            nf, nh, nw = token_tile.size
            # A token's weight is the mean of its cells' blend weights.
            w = weight.reshape(nf, pt, nh, ph, nw, pw).mean(dim=(1, 3, 5)).float().to(residuals.device)
            token_tile.add_into(fresh[None, None], w[None, None])
            values = res.transpose(1, 2).reshape(res.shape[0], res.shape[2], nf, nh, nw).float()
            token_tile.add_into(blended, values * w)
        self._blocks = (self._blocks.float() * (1.0 - fresh) + blended).to(self._blocks.dtype)

    def fresh_weights(self, plan: TilePlan, skips: list[bool], device=None) -> torch.Tensor:
        """Per cell of the box: the summed blend weight of the tiles computed this step (F, H, W), float64."""
        fresh = torch.zeros(self.canvas, dtype=torch.float64, device=device)
        for tile, weight, skipped in zip(plan.tiles, plan.weights, skips):
            if not skipped:
                tile.add_into(fresh[None, None], weight.to(fresh.device)[None, None])
        return self._box_of(fresh)

    def update(
        self,
        plan: TilePlan,
        skips: list[bool],
        latents: torch.Tensor,
        prediction: torch.Tensor,
        block_residuals: torch.Tensor | None = None,
        timestep: torch.Tensor | float = 0.0,
    ) -> None:
        """Record the outcome of the step just run: which tiles of ``plan`` were reused (``skips``, as
        :meth:`predict_skips` returned them), the input and the blended prediction on the cache's box,
        the step's timestep and, for ``reuse='blocks'``, the computed tiles' block residuals (in plan
        order, tile-major). Collective under torchrun, like :meth:`predict_skips`."""
        if block_residuals is not None:
            self._store_blocks(plan, skips, block_residuals)
        x = latents.detach()
        pred = prediction.detach().to(x.dtype)
        if self._x_prev is None:
            self._init_state(x)
        fresh = self.fresh_weights(plan, skips, x.device)
        if self.threshold > 0 and self._x_prev is not None:
            cells, per_region = self._step_change(x)
            self._acc = (self._acc + torch.nan_to_num(cells, posinf=0.0)) * (1.0 - fresh).clamp_min(0.0)
            known = torch.isfinite(per_region)
            if self._variability is None:
                self._variability = torch.where(known, per_region, torch.full_like(per_region, math.inf))
            else:
                blended = ADAPT_EMA * per_region + (1 - ADAPT_EMA) * self._variability
                old = torch.isfinite(self._variability)
                self._variability = torch.where(known & old, blended, torch.where(known, per_region, self._variability))
        else:
            self._acc = self._acc * (1.0 - fresh).clamp_min(0.0)
        full = fresh >= _FRESH
        grid = self._grid_id(plan)
        # The response of a cell is measured between its last two fully recomputed steps, when both saw
        # the same grid: across a grid move the output change is mostly the tile boundary moving.
        d_out = (pred - self._o1).abs().mean(dim=(0, 1)).double()
        d_in = (x - self._x1).abs().mean(dim=(0, 1)).double()
        had = self._computed >= 1
        same = full & had if self.across_moves else full & had & (self._grid1 == grid)
        self._d_out = torch.where(same, d_out, self._d_out)
        self._d_in = torch.where(same, d_in, self._d_in)
        self._responded = self._responded | same
        self._grid1 = torch.where(full, torch.full_like(self._grid1, grid), self._grid1)
        self._o2 = torch.where(full, self._o1, self._o2)
        self._o1 = torch.where(full, pred, self._o1)
        self._t2 = torch.where(full & had, self._t1, self._t2)
        self._t1 = torch.where(full, float(timestep), self._t1)
        self._x1 = torch.where(full, x, self._x1)
        self._computed = self._computed + full.long()
        self._run = torch.where(fresh > 0, torch.zeros_like(self._run), self._run + 1)
        if self.reuse_mode != "blocks":
            self._last = pred.clone() if self.reuse_mode != "residual" else pred - x
        self._x_prev = x.clone()
        reused = (1.0 - fresh).clamp(0.0, 1.0)
        self.reuse_maps.append(reused.float().cpu())
        count = self._region_count.to(reused.device)
        self.region_reuse.append((self._region_sums(reused[None])[0] / count).float().cpu().reshape(self.grid))

    def _init_state(self, x: torch.Tensor) -> None:
        self._device = x.device
        cells = dict(dtype=torch.float64, device=x.device)
        shape = tuple(hi - lo for lo, hi in self.box)
        self._x1 = x.clone()
        self._o1 = torch.zeros_like(x)
        self._o2 = torch.zeros_like(x)
        self._last = torch.zeros_like(x)
        self._t1 = torch.zeros(shape, **cells)
        self._t2 = torch.zeros(shape, **cells)
        self._d_out = torch.zeros(shape, **cells)
        self._d_in = torch.zeros(shape, **cells)
        self._acc = torch.zeros(shape, **cells)
        self._computed = torch.zeros(shape, dtype=torch.int64, device=x.device)
        self._grid1 = torch.full(shape, -1, dtype=torch.int64, device=x.device)
        self._responded = torch.zeros(shape, dtype=torch.bool, device=x.device)
        self._run = torch.zeros(shape, dtype=torch.int64, device=x.device)

    def describe(self) -> str:
        return (
            f"region cache ({self.scope}): threshold {self.threshold:g}, {math.prod(self.grid)} regions "
            f"({self.grid[0]}x{self.grid[1]}x{self.grid[2]}) of {self.region[0]}x{self.region[1]}x{self.region[2]} "
            f"cells, warm-up {self.schedule.warmup}, cool-down {self.schedule.cooldown}, max skips {self.max_skips}, "
            f"adaptive {'on' if self.adaptive else 'off'}, reuse {self.reuse_mode}"
            + (", reused across grid moves" if self.across_moves else "")
        )
