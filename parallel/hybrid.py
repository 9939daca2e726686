"""Running a :class:`~supergen.parallel.plan.ParallelPlan`: the mesh, CFG branches on two ranks, Diffusers CP.

The job's ranks form a ``torch.distributed.device_mesh`` of shape
``(tile, cfg, ring, ulysses)``. The tile exchange runs among the ranks of
one ``tile`` slice (same CFG branch, same sequence shard): every rank of a
tile group holds the same latents and ends each step with the same
prediction, so the exchange code runs unchanged on a sub-group.

Context parallelism inside a tile is Diffusers' own, applied without
``ModelMixin.enable_parallelism`` (which computes ``rank %
torch.accelerator.device_count()`` and divides by zero on a CPU-only
machine). :func:`enable_context_parallel` does what it does, on our mesh:

- ``diffusers.ContextParallelConfig(ring_degree, ulysses_degree, mesh=...)``
  and ``diffusers.models._modeling_parallel.ParallelConfig(...).setup(rank,
  world_size, device, mesh=mesh)`` (the mesh's ``ring`` and ``ulysses``
  dimensions are ours);
- the attention processors' ``_parallel_config`` (Wan's self-attention
  passes it to ``dispatch_attention_fn``, which runs Ulysses/Ring through
  ``_templated_context_parallel_attention``);
- ``diffusers.hooks.context_parallel.apply_context_parallel(model, config,
  model._cp_plan)``: the named split/gather hooks of the model's plan, taken
  off again with ``remove_context_parallel``;
- ``_AttentionBackendRegistry._is_context_parallel_available`` to refuse a
  backend that cannot.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from supergen.parallel.plan import ParallelPlan
from supergen.parallel.runtime import DistributedContext

logger = logging.getLogger(__name__)

#: Attention backends whose forward returns the log-sum-exp that ring attention merges with.
RING_BACKENDS = frozenset({"flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash"})


def _processors(model: torch.nn.Module):
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            yield processor


def attention_backend(model: torch.nn.Module) -> str:
    """The attention backend ``model``'s processors dispatch to (Diffusers' active one when unset)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for processor in _processors(model):
        backend = getattr(processor, "_attention_backend", None)
        if backend is not None:
            return str(getattr(backend, "value", backend))
        break
    return _AttentionBackendRegistry.get_active_backend()[0].value


def context_parallel_support(model: torch.nn.Module) -> tuple[bool, bool]:
    """``(has a CP plan and a CP-capable attention backend, ring attention possible)`` for ``model``."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = attention_backend(model)
    plan = getattr(model, "_cp_plan", None) is not None and any(True for _ in _processors(model))
    capable = _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend))
    return plan and capable, backend in RING_BACKENDS


class _Traces:
    """What applying CP changes on a model's modules and processors, recorded before, put back by :meth:`restore`.

    Diffusers' ``remove_context_parallel`` takes its hooks off but leaves, on every module of the plan, an
    empty hook registry (``_diffusers_hook``) and the unwrapped ``forward`` as an instance attribute; and
    ``_parallel_config = None`` shadows the class attribute. Only what was not there before is removed, so
    hooks of other parties (the adapter's, a user's cache) stay as they are.
    """

    def __init__(self, model: torch.nn.Module):
        self.modules = [(m, hasattr(m, "_diffusers_hook"), "forward" in m.__dict__) for m in model.modules()]
        self.configs = [(obj, "_parallel_config" in vars(obj), vars(obj).get("_parallel_config"))
                        for obj in (model, *_processors(model))]

    def restore(self) -> None:
        for module, had_registry, had_forward in self.modules:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or registry.hooks or had_registry:
                continue
            del module._diffusers_hook
            if not had_forward:
                module.__dict__.pop("forward", None)
        for obj, had_config, config in self.configs:
            if had_config:
                obj._parallel_config = config
            else:
                vars(obj).pop("_parallel_config", None)


class ContextParallelHandle:
    """Diffusers' CP hooks on one transformer; :meth:`remove` leaves the model exactly as it was."""

    def __init__(self, model: torch.nn.Module, mesh, plan: ParallelPlan, ctx: DistributedContext):
        from diffusers import ContextParallelConfig
        from diffusers.hooks.context_parallel import apply_context_parallel
        from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig

        if getattr(model, "_parallel_config", None) is not None:
            raise ValueError(f"{type(model).__name__} already has Diffusers parallelism enabled; load it without it")
        self.model = model
        self._traces = _Traces(model)
        cp = ContextParallelConfig(ring_degree=plan.ring, ulysses_degree=plan.ulysses, mesh=mesh)
        config = DiffusersParallelConfig(context_parallel_config=cp)
        config.setup(ctx.rank, ctx.world_size, ctx.device, mesh=mesh)
        for processor in _processors(model):
            processor._parallel_config = config
        model._parallel_config = config
        apply_context_parallel(model, cp, model._cp_plan)

    def remove(self) -> None:
        from diffusers.hooks.context_parallel import remove_context_parallel

        remove_context_parallel(self.model, self.model._cp_plan)
        self._traces.restore()


class CfgSplit:
    """One guidance branch per rank of a 2-rank ``cfg`` group; :meth:`combine` gives both to both.

    ``branch`` 0 runs the unconditional (negative) branch, 1 the conditional.
    """

    def __init__(self, ctx: DistributedContext):
        self.ctx = ctx
        self.branch = ctx.rank
        #: Bytes this rank sent plus received combining branches.
        self.bytes = 0

    def combine(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uncond, cond)`` from this rank's branch output ``out``; both ranks get identical tensors."""
        out = out.contiguous()
        parts = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(parts, out, group=self.ctx.group)
        self.bytes += 2 * out.numel() * out.element_size()
        return parts[0], parts[1]


class HybridRun:
    """The mesh and sub-contexts of one plan on one job (build once per job: groups are collective)."""

    def __init__(self, ctx: DistributedContext, plan: ParallelPlan):
        self.ctx = ctx
        self.plan = plan
        self.coords = plan.coords(ctx.rank)
        if plan.tile_only:
            self.mesh = None
            self.tile = ctx
            self.cfg = None
            return
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(ctx.device.type, plan.mesh_shape, mesh_dim_names=ParallelPlan.MESH_DIMS)
        self.tile = ctx.subgroup(self.mesh["tile"].get_group())
        self.cfg = CfgSplit(ctx.subgroup(self.mesh["cfg"].get_group())) if plan.cfg > 1 else None

    @property
    def leader(self) -> bool:
        """Whether this rank counts for its tile group in totals (branch 0, first sequence shard)."""
        return self.coords["cfg"] == self.coords["ring"] == self.coords["ulysses"] == 0

    @contextlib.contextmanager
    def installed(self, adapter):
        """CFG split and Diffusers CP on ``adapter``'s transformers for the ``with`` block, removed after."""
        handles = []
        adapter.cfg_split = self.cfg
        try:
            if self.plan.context > 1:
                for model in adapter.context_parallel_models():
                    handles.append(ContextParallelHandle(model, self.mesh, self.plan, self.ctx))
            yield self
        finally:
            adapter.cfg_split = None
            for handle in handles:
                handle.remove()


def run_for(ctx: DistributedContext, plan: ParallelPlan) -> HybridRun:
    """The job's :class:`HybridRun` for ``plan`` (built on first use, then reused: same groups every call)."""
    runs = ctx.__dict__.setdefault("_hybrid_runs", {})
    if plan not in runs:
        runs[plan] = HybridRun(ctx, plan)
    return runs[plan]
