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
* On a skip the tile gets, by ``reuse``: the residual its cells' transformer
  blocks last added to the hidden states, run through the model's embeddings
  and output head at the current timestep (``blocks``; the loop asks the
  adapter for it); the cached output of its cells (``output``); or its current
  input plus the cached output-minus-input (``residual``).

All state lives in canvas coordinates (per latent cell, or per region of
cells), never per tile, so it stays valid when a wrap-shifted grid moves
between steps: a tile reads the state of whatever cells it covers now.

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
REUSE_MODES = ("output", "residual", "blocks")

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


class RegionCache:
    """Per-region skip predictor and residual store over one latent canvas.

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
        reuse: what a skipped tile reuses: ``output`` (the last output as it
            was) or ``residual`` (last output minus last input, added to the
            current input) or ``blocks`` (the residual the transformer blocks
            added to the hidden states, run through the current timestep's
            output head: the loop then calls the adapter for skipped tiles
            too, but only its embeddings and head run); see
            :class:`supergen.CacheConfig`.
        patch: the transformer's patch size in cells (token geometry of the
            ``blocks`` residual).
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
    ):
        if reuse not in REUSE_MODES:
            raise ValueError(f"cache reuse={reuse!r} is not one of {', '.join(REUSE_MODES)}")
        if scope not in SCOPES:
            raise ValueError(f"cache scope={scope!r} is not one of {', '.join(SCOPES)}")
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"cache threshold={threshold!r} must be a finite number >= 0")
        self.canvas = tuple(canvas)
        self.region = tuple(min(r, c) for r, c in zip(region, canvas))
        self.threshold = float(threshold)
        self.schedule = schedule
        self.max_skips = max_skips
        self.adaptive = adaptive
        self.scope = scope
        self.reuse_mode = reuse
        self.patch = tuple(patch)
        self._blocks = None  # per token: the blocks' residual (branches, dim, Ft, Ht, Wt), for reuse='blocks'
        self.adapt_exponent = ADAPT_EXPONENT if adapt_exponent is None else adapt_exponent
        idx = [_axis_regions(c, r) for c, r in zip(self.canvas, self.region)]
        self.grid = tuple(int(i[-1]) + 1 for i in idx)
        # Flat region id of every cell (F, H, W): region statistics are scatter-sums over it.
        self._region_of = (idx[0][:, None, None] * self.grid[1] + idx[1][None, :, None]) * self.grid[2] + idx[2][
            None, None, :
        ]
        self._device: torch.device | None = None
        self._x_prev = None  # canvas input of the previous step (1, C, F, H, W)
        self._x1 = None  # input at each cell's last computed step
        self._o1 = None  # output at each cell's last computed step
        self._residual = None  # per cell: what an output/residual skip reuses
        self._d_out = None  # per cell: mean_C |o1 - o2| between its last two computed steps (F, H, W)
        self._d_in = None  # per cell: mean_C |x1 - x2|
        self._computed = None  # per cell: computed steps so far (0, 1, 2+)
        self._acc = None  # per cell: accumulated predicted relative change since the last compute
        self._run = None  # per cell: consecutive steps served from the cache
        self._variability = None  # per region: running estimate of the per-step relative change
        self.reuse_maps: list[torch.Tensor] = []  # per step: reused fraction of every cell (F, H, W)

    # --- predictor ------------------------------------------------------------
    def _region_mean(self, field_FHW: torch.Tensor) -> torch.Tensor:
        """Mean of a per-cell field over each region (flat, one value per region)."""
        ids = self._region_of.to(field_FHW.device).reshape(-1)
        n = math.prod(self.grid)
        total = torch.zeros(n, dtype=torch.float64, device=field_FHW.device).index_add_(
            0, ids, field_FHW.reshape(-1).double()
        )
        count = torch.bincount(ids, minlength=n).double()
        return total / count

    def _to_cells(self, per_region: torch.Tensor) -> torch.Tensor:
        return per_region[self._region_of.to(per_region.device)]

    def _step_change(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted relative output change of this step: per cell (F, H, W) and per region (flat), float64.

        Infinite where a region lacks two computed steps: such cells cannot be
        predicted, so any tile over them runs.
        """
        dx = (latents - self._x_prev).abs().mean(dim=(0, 1))
        response = self._region_mean(self._d_out) / self._region_mean(self._d_in).clamp_min(_EPS)
        out_scale = self._region_mean(self._o1.abs().mean(dim=(0, 1)))
        change = response * self._region_mean(dx) / out_scale.clamp_min(_EPS)
        ready = self._region_mean((self._computed >= 2).double()) >= 1.0
        change = torch.where(ready, change, torch.full_like(change, math.inf))
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

        Pure: reads the cache state and ``latents`` (the canvas input of this
        step, (1, C, F, H, W)) and changes nothing, so every rank that holds
        the same state and latents gets the same answer.
        """
        if self.threshold <= 0 or self._x_prev is None or not self.schedule.may_skip(step):
            return [False] * len(plan)
        acc = self._acc + self._step_change(latents)[0]
        load = acc / self._to_cells(self._region_thresholds())
        if self.scope == "canvas":
            skip = bool(load.mean() < 1.0) and int(self._run.max()) < self.max_skips
            return [skip] * len(plan)
        skips = []
        for tile in plan.tiles:
            tile_load = tile.gather(load[None, None])
            tile_run = tile.gather(self._run[None, None])
            skips.append(bool(tile_load.mean() < 1.0) and int(tile_run.max()) < self.max_skips)
        return skips

    # --- outputs --------------------------------------------------------------
    def reuse(self, tile: Tile, latents: torch.Tensor) -> torch.Tensor:
        """The tile's approximate output at this step: its input plus the cached residual of its cells
        (or the cached output itself, with ``reuse='output'``)."""
        cached = tile.gather(self._residual).to(latents.dtype)
        return cached if self.reuse_mode == "output" else tile.gather(latents) + cached

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

    def update(
        self,
        plan: TilePlan,
        skips: list[bool],
        latents: torch.Tensor,
        prediction: torch.Tensor,
        block_residuals: torch.Tensor | None = None,
    ) -> None:
        """Record the outcome of the step just run: which tiles of ``plan`` were reused (``skips``, as
        :meth:`predict_skips` returned them), the canvas input, the blended canvas prediction and, for
        ``reuse='blocks'``, the computed tiles' block residuals (in plan order, tile-major)."""
        if block_residuals is not None:
            self._store_blocks(plan, skips, block_residuals)
        x = latents.detach()
        pred = prediction.detach().to(x.dtype)
        if self._x_prev is None:
            self._init_state(x)
        fresh = torch.zeros(self.canvas, dtype=torch.float64, device=x.device)
        for tile, weight, skipped in zip(plan.tiles, plan.weights, skips):
            if not skipped:
                tile.add_into(fresh[None, None], weight.to(fresh.device)[None, None])
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
        # The response of a cell is measured between its last two fully recomputed steps.
        d_out = (pred - self._o1).abs().mean(dim=(0, 1)).double()
        d_in = (x - self._x1).abs().mean(dim=(0, 1)).double()
        had = self._computed >= 1
        self._d_out = torch.where(full & had, d_out, self._d_out)
        self._d_in = torch.where(full & had, d_in, self._d_in)
        self._o1 = torch.where(full, pred, self._o1)
        self._x1 = torch.where(full, x, self._x1)
        self._computed = self._computed + full.long()
        self._run = torch.where(fresh > 0, torch.zeros_like(self._run), self._run + 1)
        if self.reuse_mode != "blocks":
            self._residual = pred.clone() if self.reuse_mode == "output" else pred - x
        self._x_prev = x.clone()
        self.reuse_maps.append((1.0 - fresh).clamp(0.0, 1.0).float().cpu())

    def _init_state(self, x: torch.Tensor) -> None:
        self._device = x.device
        cells = dict(dtype=torch.float64, device=x.device)
        self._x1 = x.clone()
        self._o1 = torch.zeros_like(x)
        self._residual = torch.zeros_like(x)
        self._d_out = torch.zeros(self.canvas, **cells)
        self._d_in = torch.zeros(self.canvas, **cells)
        self._acc = torch.zeros(self.canvas, **cells)
        self._computed = torch.zeros(self.canvas, dtype=torch.int64, device=x.device)
        self._run = torch.zeros(self.canvas, dtype=torch.int64, device=x.device)

    def region_fractions(self, cells_FHW: torch.Tensor) -> torch.Tensor:
        """Mean of a per-cell map (e.g. one of :attr:`reuse_maps`) over every region, shape ``grid``."""
        return self._region_mean(cells_FHW.to(self._region_of.device)).float().reshape(self.grid)

    def describe(self) -> str:
        return (
            f"region cache ({self.scope}): threshold {self.threshold:g}, {math.prod(self.grid)} regions "
            f"({self.grid[0]}x{self.grid[1]}x{self.grid[2]}) of {self.region[0]}x{self.region[1]}x{self.region[2]} "
            f"cells, warm-up {self.schedule.warmup}, cool-down {self.schedule.cooldown}, max skips {self.max_skips}, "
            f"adaptive {'on' if self.adaptive else 'off'}, reuse {self.reuse_mode}"
        )
