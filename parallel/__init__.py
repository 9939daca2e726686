"""Tile parallelism over torch.distributed (the only package that imports it).

:mod:`~supergen.parallel.runtime` joins the job started by ``torchrun`` and
fails every rank fast when one fails; :mod:`~supergen.parallel.layout`
assigns tiles to ranks and computes what must move (pure geometry);
:mod:`~supergen.parallel.exchange` runs a step's tiles and exchanges halos
(``region``) or all tile outputs (``allgather``);
:mod:`~supergen.parallel.decode` splits the VAE decode over the ranks;
:mod:`~supergen.parallel.plan` factorises the world size into tile x CFG x
context-parallel degrees (validated, or chosen from the cost model) and
:mod:`~supergen.parallel.hybrid` runs a plan on a device mesh (CFG branches on
two ranks, Diffusers' context parallelism inside a tile).
"""

from supergen.parallel.decode import decode_distributed
from supergen.parallel.exchange import EXCHANGES, AllGatherExecutor, RegionExecutor, make_executor
from supergen.parallel.plan import ParallelPlan, Workload, choose_plan, resolve_plan
from supergen.parallel.layout import RegionLayout, StepExchange, allgather_bytes, assign_tiles, tile_costs
from supergen.parallel.runtime import (
    AgreedError,
    DistributedContext,
    distributed_session,
    init_distributed,
    launched_distributed,
)

__all__ = [
    "EXCHANGES",
    "ParallelPlan",
    "Workload",
    "choose_plan",
    "resolve_plan",
    "AgreedError",
    "AllGatherExecutor",
    "DistributedContext",
    "RegionExecutor",
    "RegionLayout",
    "StepExchange",
    "allgather_bytes",
    "assign_tiles",
    "decode_distributed",
    "distributed_session",
    "init_distributed",
    "launched_distributed",
    "make_executor",
    "tile_costs",
]
