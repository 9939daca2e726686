"""Every hook the engine puts on a Diffusers model: named, through ``HookRegistry``, attached only while it runs.

An adapter declares its hooks once (:meth:`HookSet.add`: a module, a name and
a Diffusers :class:`~diffusers.hooks.ModelHook`) and attaches them for the
duration of a generation (:meth:`HookSet.attached`). Attaching is re-entrant
(a stream inside a call, a prediction inside either share one registration),
idempotent by name, and detaching leaves every module exactly as it was: the
registry Diffusers adds to a module and the ``forward`` it wraps are removed
again when nothing else was registered there, so a pipeline handed to
``SuperGenPipeline.from_pipe`` is the user's own pipeline again between calls.
Hooks of other parties (Diffusers' caches, context parallelism) registered
on the same modules are left in place.

The hooks themselves: :class:`WanRopePositions` and :class:`HunyuanRopePositions`
(canvas-absolute RoPE positions for a batch of tiles, and the stream's bounded
frame positions), and :class:`WanBlockResidual` (record what the transformer
blocks add, or hand every block's input through and add a cached residual).
The adapters import this module when they wrap a loaded pipeline, so reading a
checkpoint's configs imports no Diffusers code.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook

from supergen.samplers.protocol import TokenPositions

#: Every hook the engine registers is named with this prefix.
PREFIX = "supergen."


class HookSet:
    """The hooks one adapter puts on its pipeline's modules (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: list[tuple[torch.nn.Module, str, ModelHook]] = []
        self._depth = 0
        # Per attached module: whether it had a registry / an instance ``forward`` before us.
        self._before: dict[int, tuple[bool, bool]] = {}

    def add(self, module: torch.nn.Module, name: str, hook: ModelHook) -> ModelHook:
        """Declare ``hook`` for ``module`` under ``supergen.<name>``; registered on the next :meth:`attached`."""
        full = PREFIX + name
        if any(m is module and n == full for m, n, _ in self._entries):
            raise ValueError(f"hook {full!r} is declared twice on {type(module).__name__}")
        self._entries.append((module, full, hook))
        if self._depth:
            self._register(module, full, hook)
        return hook

    @property
    def is_attached(self) -> bool:
        return self._depth > 0

    @property
    def names(self) -> list[str]:
        return [name for _, name, _ in self._entries]

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Register every declared hook for the duration of the ``with`` block (re-entrant)."""
        self.attach()
        try:
            yield
        finally:
            self.detach()

    def attach(self) -> None:
        """Enter one attachment (:meth:`attached` pairs it with :meth:`detach`)."""
        if self._depth == 0:
            for module, name, hook in self._entries:
                self._register(module, name, hook)
        self._depth += 1

    def detach(self, all_levels: bool = False) -> None:
        """Leave one attachment; the last one (or ``all_levels``) removes the hooks."""
        if self._depth == 0:
            return
        self._depth = 0 if all_levels else self._depth - 1
        if self._depth == 0:
            for module, name, _ in reversed(self._entries):
                self._unregister(module, name)

    def _register(self, module: torch.nn.Module, name: str, hook: ModelHook) -> None:
        key = id(module)
        if key not in self._before:
            self._before[key] = (hasattr(module, "_diffusers_hook"), "forward" in module.__dict__)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(name) is None:
            registry.register_hook(hook, name)

    def _unregister(self, module: torch.nn.Module, name: str) -> None:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            return
        registry.remove_hook(name, recurse=False)
        before = self._before.get(id(module))
        if registry.hooks or before is None:
            return
        had_registry, had_forward = self._before.pop(id(module))
        # Diffusers leaves an empty registry and the unwrapped ``forward`` as an instance attribute.
        if not had_registry:
            del module._diffusers_hook
        if not had_forward:
            module.__dict__.pop("forward", None)


def state_of(module: torch.nn.Module) -> dict:
    """What hooks and wrappers sit on ``module`` and its children: for checking a pipeline is left as it was."""
    state = {}
    for name, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        processor = getattr(sub, "processor", None)
        state[name] = (
            type(sub).__name__,
            tuple(sub._forward_hooks),
            tuple(sub._forward_pre_hooks),
            "forward" in sub.__dict__,
            None if registry is None else tuple(registry._hook_order),
            type(processor).__name__,
            # Diffusers' context parallelism sets these on the model and its attention processors.
            "_parallel_config" in sub.__dict__,
            "_parallel_config" in getattr(processor, "__dict__", {}),
        )
    return state


# --- the hooks ----------------------------------------------------------------------------------------


class WanRopePositions(ModelHook):
    """A hook on ``transformer.rope`` that can replace token positions.

    ``WanRotaryPosEmbed`` always returns positions 0..n-1 on each axis. While
    :attr:`positions` is set, the hook returns cos/sin tables for the given
    per-tile positions instead (batch dimension = tiles), read from the
    module's own frequency table, so nothing is recomputed or copied from
    Diffusers.
    """

    def __init__(self):
        super().__init__()
        self.positions: TokenPositions | None = None
        self.repeat = 1

    def post_forward(self, module, output):
        if self.positions is None:
            return output
        limit = module.max_seq_len
        pos = self.positions
        for axis, tensor in (("frame", pos.frames), ("row", pos.rows), ("column", pos.cols)):
            if int(tensor.max()) >= limit or int(tensor.min()) < 0:
                raise ValueError(
                    f"RoPE {axis} position {int(tensor.max())} is outside the model's table of {limit} positions; "
                    "use rope='local' or a smaller canvas"
                )
        sizes = [module.t_dim, module.h_dim, module.w_dim]
        tables = []
        for table in (module.freqs_cos, module.freqs_sin):
            t_tab, h_tab, w_tab = table.split(sizes, dim=1)
            device = table.device
            f = t_tab[pos.frames.to(device)]  # N, nf, dt
            h = h_tab[pos.rows.to(device)]  # N, nh, dh
            w = w_tab[pos.cols.to(device)]  # N, nw, dw
            n, nf, nh, nw = f.shape[0], f.shape[1], h.shape[1], w.shape[1]
            grid = torch.cat(
                [
                    f[:, :, None, None, :].expand(n, nf, nh, nw, -1),
                    h[:, None, :, None, :].expand(n, nf, nh, nw, -1),
                    w[:, None, None, :, :].expand(n, nf, nh, nw, -1),
                ],
                dim=-1,
            ).reshape(n, nf * nh * nw, 1, -1)
            tables.append(grid.repeat(self.repeat, 1, 1, 1))
        expected = output[0].shape
        if tables[0].shape[1:] != expected[1:]:
            raise RuntimeError(f"RoPE override shape {tuple(tables[0].shape)} does not match the model's {tuple(expected)}")
        return tables[0], tables[1]


class WanBlockResidual:
    """Hooks on the blocks and on ``norm_out`` of a Wan transformer, for reusing what the blocks add.

    While :attr:`mode` is ``record`` they keep the residual the blocks added to
    the hidden states (:attr:`value`); while it is ``inject`` every block hands
    its input through untouched and :attr:`value` is added before the output
    head, so only the embeddings and the timestep-modulated head run. A step
    cache uses this to reuse a region's blocks at the current timestep, as
    Diffusers' MagCache does for the whole model.
    """

    def __init__(self, model: torch.nn.Module, hooks: HookSet):
        self.mode: str | None = None
        self.value: torch.Tensor | None = None
        self._first_input: torch.Tensor | None = None
        hooks.add(model.blocks[0], "block_residual.record", _RecordBlocksInput(self))
        for block in model.blocks:
            hooks.add(block, "block_residual.skip", _SkipBlock(self))
        hooks.add(model.norm_out, "block_residual.head", _HeadInput(self))


class _OwnedHook(ModelHook):
    """One of the hooks of a :class:`WanBlockResidual`, which holds their shared state."""

    def __init__(self, owner: WanBlockResidual):
        super().__init__()
        self.owner = owner


class _RecordBlocksInput(_OwnedHook):
    def pre_forward(self, module, *args, **kwargs):
        if self.owner.mode == "record":
            self.owner._first_input = args[0]
        return args, kwargs


class _SkipBlock(_OwnedHook):
    def new_forward(self, module, *args, **kwargs):
        if self.owner.mode == "inject":
            return args[0] if args else kwargs["hidden_states"]
        return self.fn_ref.original_forward(*args, **kwargs)


class _HeadInput(_OwnedHook):
    def pre_forward(self, module, *args, **kwargs):
        owner = self.owner
        if owner.mode == "record":
            # Kept in the model's dtype: the residual of a 4K canvas is large.
            owner.value = (args[0] - owner._first_input.float()).to(owner._first_input.dtype)
            owner._first_input = None
        elif owner.mode == "inject":
            args = (args[0] + owner.value.to(args[0].dtype), *args[1:])
        return args, kwargs


class HunyuanRopePositions(ModelHook):
    """A hook on ``HunyuanVideoRotaryPosEmbed`` that can set the token positions.

    The module builds its grid from ``arange`` over the tile; while
    :attr:`positions` (one tile's per-axis positions) is set, the hook builds
    the same tables with Diffusers' ``get_1d_rotary_pos_embed`` at those
    positions instead, so 0..n-1 reproduces the module exactly.
    """

    def __init__(self):
        super().__init__()
        self.positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def post_forward(self, module, output):
        if self.positions is None:
            return output
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        device = output[0].device
        axes = [axis.to(device=device, dtype=torch.float32) for axis in self.positions]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        freqs = [get_1d_rotary_pos_embed(module.rope_dim[i], grid[i].reshape(-1), module.theta, use_real=True)
                 for i in range(3)]
        tables = torch.cat([f[0] for f in freqs], dim=1), torch.cat([f[1] for f in freqs], dim=1)
        if tables[0].shape != output[0].shape:
            raise RuntimeError(f"RoPE override shape {tuple(tables[0].shape)} does not match the model's "
                               f"{tuple(output[0].shape)}")
        return tables
