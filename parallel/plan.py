"""The parallel plan: how the world size is factorised into tile x CFG x context-parallel degrees.

Four degrees whose product is the world size, in mesh order (outermost first):

- ``tile``: tiles of a step spread over groups of ranks (the region or
  all-gather exchange of :mod:`~supergen.parallel.exchange`, among the ranks
  that hold the same CFG branch and sequence shard);
- ``cfg``: the conditional and unconditional branch of every tile on two
  ranks, combined afterwards (:class:`~supergen.parallel.hybrid.CfgSplit`);
- ``ring`` and ``ulysses``: Diffusers' context parallelism inside one tile
  (the model's ``_cp_plan``), innermost so that its all-to-alls stay on the
  fastest links of a node.

Pure arithmetic: every rank computes the same plan from the same inputs, and
the benchmark evaluates 64-GPU plans on a laptop. :func:`validate_plan`
refuses a plan like torchtitan's ``ParallelDims`` does, naming every factor
and a plan that would work; :func:`choose_plan` picks the valid plan with the
lowest modelled step time (:func:`step_time`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

#: H100 SXM dense bf16 peak 989 TFLOP/s at an assumed 40% sustained utilisation.
H100_FLOPS = 0.40 * 989e12
#: H100 NVLink 4: 450 GB/s per direction nominal, about 300 GB/s achieved per GPU and direction.
NVLINK_BYTES_S = 300e9


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """Degrees of one plan; ``rank = ((t * cfg + c) * ring + r) * ulysses + u``."""

    tile: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.tile * self.cfg * self.ring * self.ulysses

    @property
    def context(self) -> int:
        """Ranks that share one tile's sequence (Diffusers' context-parallel mesh)."""
        return self.ring * self.ulysses

    @property
    def tile_only(self) -> bool:
        return self.world_size == self.tile

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        return (self.tile, self.cfg, self.ring, self.ulysses)

    MESH_DIMS = ("tile", "cfg", "ring", "ulysses")

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each mesh dimension."""
        out = {}
        for name, size in zip(reversed(self.MESH_DIMS), reversed(self.mesh_shape)):
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in self.MESH_DIMS}

    def describe(self) -> str:
        return (f"tile {self.tile} x cfg {self.cfg} x ring {self.ring} x ulysses {self.ulysses} "
                f"= {self.world_size} ranks")

    def flags(self) -> str:
        return f"--cfg-parallel {self.cfg} --ulysses {self.ulysses}" + (f" --ring {self.ring}" if self.ring > 1 else "")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What a plan is checked and costed against: one refinement step of one request.

    ``exchange_bytes(tile_degree)`` gives the bytes per rank and step of the
    tile exchange among ``tile_degree`` ranks (the engine's geometry code).
    """

    tiles: int
    tile_tokens: int
    tile_numel: int
    layers: int
    dim: int
    heads: int
    ffn: int
    text_tokens: int = 512
    guidance: bool = True
    itemsize: int = 2
    cp_plan: bool = True
    ring_ok: bool = False
    cfg_ok: bool = True
    rope_ok: bool = True
    model: str = "transformer"
    exchange_bytes: Callable[[int], float] = field(default=lambda n: 0.0, compare=False)

    @property
    def branches(self) -> int:
        return 2 if self.guidance else 1


def branch_flops(w: Workload) -> float:
    """Forward FLOPs of one tile and one guidance branch (attention, cross-attention, feed-forward)."""
    n, d = w.tile_tokens, w.dim
    per_layer = (
        4 * 2 * n * d * d  # self-attention q, k, v, o projections
        + 2 * 2 * n * n * d  # QK^T and attention x V
        + 2 * 2 * n * d * d  # cross-attention q, o projections
        + 2 * 2 * w.text_tokens * d * d  # cross-attention k, v of the text
        + 2 * 2 * n * w.text_tokens * d  # cross-attention scores and values
        + 2 * 2 * n * d * w.ffn  # feed-forward
    )
    return w.layers * per_layer


def context_bytes(plan: ParallelPlan, w: Workload) -> float:
    """Bytes one rank sends plus receives for one branch of one tile inside its context-parallel group.

    Ulysses: four all-to-alls per layer (q, k, v out to heads, the attention
    output back to tokens), each moving ``(U-1)/U`` of the rank's
    ``tokens / (R*U)`` x ``dim`` slice both ways. Ring (Diffusers'
    ``rotate_method='allgather'``): k and v of the other ``R-1`` ring ranks
    gathered every layer. Plus the all-gather of the output at ``proj_out``.
    """
    if plan.context == 1:
        return 0.0
    local = w.tile_tokens / plan.context * w.dim * w.itemsize
    uly = 4 * 2 * local * (plan.ulysses - 1) / plan.ulysses
    ring = 2 * 2 * local * (plan.ring - 1)
    out = 2 * w.tile_numel * w.itemsize * (plan.context - 1) / plan.context
    return w.layers * (uly + ring) + out


def step_time(plan: ParallelPlan, w: Workload, flops: float = H100_FLOPS, link: float = NVLINK_BYTES_S) -> dict:
    """Modelled time of one refinement step, and its parts, for ``plan`` (no comm/compute overlap).

    The busiest tile group runs ``ceil(tiles / tile)`` tiles; each of its
    ranks computes ``1 / (cfg * context)`` of each (a CFG rank runs one
    branch, a context rank a slice of tokens or heads). Bytes move at
    ``link`` per direction on full-duplex links (sent and received overlap).
    """
    group_tiles = math.ceil(w.tiles / plan.tile)
    branches_per_rank = w.branches / plan.cfg if w.guidance else 1
    compute = group_tiles * branches_per_rank * branch_flops(w) / plan.context / flops
    cp = group_tiles * branches_per_rank * context_bytes(plan, w)
    cfg = group_tiles * 2 * w.tile_numel * w.itemsize if plan.cfg > 1 else 0.0
    exchange = w.exchange_bytes(plan.tile) if plan.tile > 1 else 0.0
    moved = cp + cfg + exchange
    total = compute + moved / 2 / link
    serial = w.tiles * w.branches * branch_flops(w) / flops
    return dict(step_s=total, compute_s=compute, comm_s=moved / 2 / link, bytes=moved,
                efficiency=serial / (plan.world_size * total), group_tiles=group_tiles)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def problems(plan: ParallelPlan, world_size: int, w: Workload) -> list[str]:
    """Why ``plan`` cannot run ``w`` on ``world_size`` ranks (empty: it can)."""
    out = []
    if plan.world_size != world_size:
        out.append(f"the degrees multiply to {plan.world_size}, not the world size {world_size}")
    if plan.cfg not in (1, 2):
        out.append(f"cfg {plan.cfg} is not 1 or 2 (a tile has two guidance branches)")
    elif plan.cfg == 2 and not w.guidance:
        out.append("cfg 2 needs classifier-free guidance (guidance scale > 1 and a negative branch)")
    elif plan.cfg == 2 and not w.cfg_ok:
        out.append(f"the {w.model} adapter cannot split guidance branches over ranks")
    if plan.context > 1 and not w.cp_plan:
        out.append(f"{w.model} has no Diffusers context-parallel plan (_cp_plan)")
    if plan.context > 1 and not w.rope_ok:
        out.append("canvas-absolute RoPE (rope='absolute') is not split by Diffusers' CP plan; use rope='local'")
    if plan.ulysses > 1 and w.heads % plan.ulysses:
        out.append(f"ulysses {plan.ulysses} does not divide the {w.heads} attention heads of {w.model}")
    if plan.context > 1 and w.tile_tokens % plan.context:
        out.append(f"ring x ulysses = {plan.context} does not divide the {w.tile_tokens} tokens of a tile")
    if plan.ring > 1 and not w.ring_ok:
        out.append("ring > 1 needs an attention backend that returns the log-sum-exp (flash, cuDNN); "
                   "the active one does not (native SDPA on CPU)")
    return out


def valid_plans(world_size: int, w: Workload) -> list[ParallelPlan]:
    plans = []
    for cfg in (1, 2):
        for ring in _divisors(world_size):
            for uly in _divisors(world_size):
                if world_size % (cfg * ring * uly):
                    continue
                plan = ParallelPlan(tile=world_size // (cfg * ring * uly), cfg=cfg, ring=ring, ulysses=uly)
                if not problems(plan, world_size, w):
                    plans.append(plan)
    return plans


def choose_plan(world_size: int, w: Workload, **model) -> ParallelPlan:
    """The valid plan with the lowest modelled step time; ties go to fewer bytes, then more tile parallelism
    (whose output is bit-identical to one process)."""
    def key(plan):
        t = step_time(plan, w, **model)
        return (round(t["step_s"], 9), round(t["bytes"]), -plan.tile, plan.ring)

    return min(valid_plans(world_size, w), key=key)


def resolve_plan(world_size: int, w: Workload, mode: str = "auto", cfg: int | None = None,
                 ulysses: int | None = None, ring: int | None = None) -> ParallelPlan:
    """The plan a run uses: ``mode='tile'`` or explicit degrees, else the modelled best; refuses a bad one.

    Raises ``ValueError`` (one line) naming every factor, what is wrong and a plan that works.
    """
    fixed = any(v is not None for v in (cfg, ulysses, ring))
    if mode == "auto" and not fixed:
        return choose_plan(world_size, w)
    cfg, ulysses, ring = cfg or 1, ulysses or 1, ring or 1
    inner = cfg * ulysses * ring
    plan = ParallelPlan(tile=max(1, world_size // inner), cfg=cfg, ring=ring, ulysses=ulysses)
    why = problems(plan, world_size, w)
    if world_size % inner:
        why[0] = f"cfg x ring x ulysses = {inner} does not divide the world size {world_size}"
    if why:
        good = choose_plan(world_size, w)
        tile = plan.tile if world_size % inner == 0 else f"{world_size}/{inner}"
        raise ValueError(
            f"parallel plan tile {tile} x cfg {cfg} x ring {ring} x ulysses {ulysses} for world size "
            f"{world_size} is refused: {'; '.join(why)}; a plan that works: {good.describe()} ({good.flags()})"
        )
    return plan
