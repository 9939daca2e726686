"""Rolling key/value cache for block-wise streaming, and a per-prompt cross-attention cache.

Layout of one layer's buffer, in latent frames of ``tokens_per_frame`` tokens::

    [ sink (S) | window (W) | current segment (up to F) ]

The first ``S`` frames ever committed are pinned as the attention sink; later
frames go to the window, oldest first, and the oldest are evicted once it
holds ``W`` frames. Keys are stored *after* RoPE, and a cached frame's RoPE
frame position is always its slot index: the sink sits at 0..S-1, the window
right after it, the current segment right after the window. When the window
rolls by ``e`` frames the survivors move ``e`` slots down and their keys are
rotated back by ``e`` positions, so positions never exceed ``S + W + F`` however
long a stream runs (Rolling Forcing re-ropes its sink to sit just before the
window in the same spirit). Each key is rotated at most ``W`` times before it
is evicted, so rounding drift is bounded too.

The current segment's keys/values are written straight after the valid
context, so attention always reads one contiguous view (no concatenation).
The cache is model-agnostic: the backbone adapter supplies the RoPE rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

#: rotate(keys, frames) -> new tensor: keys (B, tokens, heads, head_dim) re-roped ``frames`` positions earlier.
RotateFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class KVCacheSpec:
    """Sizes of a :class:`RollingKVCache`; read them from the transformer's config, never hard-code them.

    Args:
        num_layers: transformer blocks, one cache layer each.
        batch: batch of every forward (2 with classifier-free guidance batched).
        heads, head_dim: attention heads and channels per head.
        tokens_per_frame: tokens of one latent frame after patching.
        sink_frames, window_frames: pinned and rolling context, in latent frames.
        max_current_frames: the longest segment denoised in one forward (a
            block, or all blocks of a joint window).
    """

    num_layers: int
    batch: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    sink_frames: int
    window_frames: int
    max_current_frames: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "batch", "heads", "head_dim", "tokens_per_frame", "window_frames", "max_current_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCacheSpec.{name}={value!r} must be an integer >= 1")
        if not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise ValueError(f"KVCacheSpec.sink_frames={self.sink_frames!r} must be an integer >= 0")

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.window_frames + self.max_current_frames

    @property
    def bytes_per_frame(self) -> int:
        """Keys plus values of one latent frame over all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.batch * self.tokens_per_frame * self.heads * self.head_dim * elem


class RollingKVCache:
    """Preallocated per-layer keys/values: attention sink + rolling window + current segment.

    Protocol per forward: every layer calls :meth:`attend` with the current
    segment's keys/values and attends to what it returns; after a forward
    whose segment should join the context, the caller calls :meth:`commit`
    once (not per layer).
    """

    def __init__(self, spec: KVCacheSpec, rotate: RotateFn):
        self.spec = spec
        self._rotate = rotate
        shape = (spec.batch, spec.capacity_frames * spec.tokens_per_frame, spec.heads, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)]
        self.sink_filled = 0
        self.window_filled = 0
        self.committed_frames = 0
        self.evicted_frames = 0

    # --- geometry -------------------------------------------------------------
    @property
    def context_frames(self) -> int:
        """Frames the current segment attends to besides itself."""
        return self.sink_filled + self.window_filled

    def current_positions(self, frames: int) -> torch.Tensor:
        """RoPE frame positions of a current segment of ``frames`` latent frames."""
        if frames > self.spec.max_current_frames:
            raise ValueError(
                f"segment of {frames} latent frames exceeds the cache's max_current_frames={self.spec.max_current_frames}"
            )
        return torch.arange(self.context_frames, self.context_frames + frames)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (constant for the cache's lifetime)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def used_bytes(self) -> int:
        """Bytes holding valid context: grows until sink and window are full, then stays flat."""
        return self.context_frames * self.spec.bytes_per_frame

    # --- the two operations ---------------------------------------------------
    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage the current segment's keys/values for ``layer``; return context + current, contiguous.

        ``key``/``value``: (B, tokens, heads, head_dim), keys already roped at
        :meth:`current_positions`.
        """
        tpf = self.spec.tokens_per_frame
        start = self.context_frames * tpf
        end = start + key.shape[1]
        if key.shape[1] % tpf or key.shape[1] // tpf > self.spec.max_current_frames:
            raise ValueError(f"segment of {key.shape[1]} tokens is not a whole number of frames <= max_current_frames")
        k_buf, v_buf = self.keys[layer], self.values[layer]
        k_buf[:, start:end] = key
        v_buf[:, start:end] = value
        return k_buf[:, :end], v_buf[:, :end]

    def commit(self, frames: int) -> None:
        """Make the first ``frames`` frames of the last staged segment part of the context (all layers)."""
        spec = self.spec
        if not 0 < frames <= spec.max_current_frames:
            raise ValueError(f"commit of {frames} frames; allowed 1..{spec.max_current_frames}")
        to_sink = min(frames, spec.sink_frames - self.sink_filled)
        self.sink_filled += to_sink
        to_window = frames - to_sink
        filled = self.window_filled + to_window
        evict = max(0, filled - spec.window_frames)
        if evict:
            tpf = spec.tokens_per_frame
            src = slice((spec.sink_frames + evict) * tpf, (spec.sink_frames + filled) * tpf)
            dst = slice(spec.sink_frames * tpf, (spec.sink_frames + spec.window_frames) * tpf)
            for k_buf, v_buf in zip(self.keys, self.values):
                # Moving the survivors `evict` slots down lowers their position by
                # `evict`: rotate keys to match, so slot index == RoPE position stays true.
                k_buf[:, dst] = self._rotate(k_buf[:, src], evict)
                v_buf[:, dst] = v_buf[:, src].clone()
            filled = spec.window_frames
            self.evicted_frames += evict
        self.window_filled = filled
        self.committed_frames += frames

    def flush(self, keep_frames: int) -> None:
        """Drop the window but its last ``keep_frames`` frames (Infinity-RoPE's KV flush on a prompt change).

        The sink stays; the kept frames move down to sit right after it, their
        keys rotated to their new positions as when the window rolls.
        """
        if not 0 <= keep_frames:
            raise ValueError(f"flush keeps {keep_frames} frames; allowed >= 0")
        keep = min(keep_frames, self.window_filled)
        drop = self.window_filled - keep
        if drop and keep:
            tpf = self.spec.tokens_per_frame
            base = self.spec.sink_frames
            src = slice((base + drop) * tpf, (base + self.window_filled) * tpf)
            dst = slice(base * tpf, (base + keep) * tpf)
            for k_buf, v_buf in zip(self.keys, self.values):
                k_buf[:, dst] = self._rotate(k_buf[:, src], drop)
                v_buf[:, dst] = v_buf[:, src].clone()
        self.evicted_frames += drop
        self.window_filled = keep

    def reset(self) -> None:
        """Forget all context (buffers stay allocated)."""
        self.sink_filled = self.window_filled = self.committed_frames = self.evicted_frames = 0


class CrossAttentionCache:
    """Cross-attention keys/values per layer, computed once per prompt and reused.

    Text keys/values do not depend on the video tokens or the timestep, so
    they are valid for every forward of every block until the prompt changes.
    :meth:`bind` names the prompt (any hashable, compared by value); binding a
    different one drops what was cached.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._key: Hashable | None = None
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.hits = 0
        self.misses = 0

    def bind(self, key: Hashable) -> None:
        if key != self._key:
            self._key = key
            self._kv = [None] * self.num_layers

    def get(self, layer: int, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._kv[layer]
        if cached is None:
            self.misses += 1
            cached = self._kv[layer] = compute()
        else:
            self.hits += 1
        return cached

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self._kv if kv is not None for t in kv)

    def reset(self) -> None:
        self._key = None
        self._kv = [None] * self.num_layers
