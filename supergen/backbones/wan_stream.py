"""Block-causal streaming on Diffusers' own ``WanTransformer3DModel`` (and SkyReels-V2), without forking it.

:class:`WanStreamModel` swaps the attention processor of every block's
self-attention (``attn1``) for one that attends to [sink | rolling window |
current segment] through a :class:`~supergen.cache.kv.RollingKVCache`, and the
cross-attention (``attn2``) processor for one that computes text keys/values
once per prompt. RoPE frame positions of the current segment come from the
adapter's :class:`~supergen.backbones.hooks.WanRopePositions` hook (attached while the stream lives). ``remove()``
puts the original processors back and detaches it.

:class:`WanUncachedStreamModel` is the same stream without a cache: every
forward re-runs the whole history through Diffusers' stock attention processor
under the equivalent block-causal (window + sink) mask. It is the exactness
reference for the cached model and the benchmark's no-cache baseline.

:class:`WanStreamDecoder` decodes block by block with ``AutoencoderKLWan``'s
causal feature cache carried across blocks.
"""

from __future__ import annotations

import inspect
import logging
from typing import Hashable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from supergen.backbones.base import Conditioning, TokenPositions, cfg_combine
from supergen.cache.kv import CrossAttentionCache, KVCacheSpec, RollingKVCache

logger = logging.getLogger(__name__)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic (and dtype handling) as Diffusers' WanAttnProcessor, so
    # cached keys equal the keys an uncached forward computes.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _StreamSelfAttnProcessor:
    """attn1: queries of the current segment against cached context + the segment itself."""

    def __init__(self, layer: int, cache: RollingKVCache):
        self.layer = layer
        self.cache = cache

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = _apply_rope(query, *rotary_emb)
        key = _apply_rope(key, *rotary_emb)
        key, value = self.cache.attend(self.layer, key, value)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class _CachedCrossAttnProcessor:
    """attn2: text keys/values computed on the first forward after a prompt (change), then reused."""

    def __init__(self, layer: int, cache: CrossAttentionCache):
        self.layer = layer
        self.cache = cache

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        def compute():
            _, key, value = _get_qkv_projections(attn, hidden_states[:, :1], encoder_hidden_states)
            return attn.norm_k(key).unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))

        key, value = self.cache.get(self.layer, compute)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class _ReferenceSelfAttnProcessor(WanAttnProcessor):
    """Self-attention of the uncached reference.

    With :attr:`views` unset it is Diffusers' own processor with a fixed mask.
    With :attr:`views` set, each segment's queries attend to their visible
    keys with that segment's own RoPE positions (a re-indexed sink cannot be
    expressed by one absolute-position sequence); the RoPE tables the model
    passes in are then unused.
    """

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None
        #: [(query token index, key token index, (q_cos, q_sin), (k_cos, k_sin))] per segment
        self.views: list | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.views is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        out = torch.empty_like(query)
        for q_idx, k_idx, q_rope, k_rope in self.views:
            q = _apply_rope(query[:, q_idx], *q_rope)
            k = _apply_rope(key[:, k_idx], *k_rope)
            out[:, q_idx] = dispatch_attention_fn(q, k, value[:, k_idx], attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


_STREAM_PROCESSORS = (_StreamSelfAttnProcessor, _ReferenceSelfAttnProcessor)


def check_streamable(pipeline) -> None:
    """Refuse Wan variants whose streaming would be wrong, before any cache is allocated."""
    transformer = pipeline.transformer
    if getattr(pipeline, "transformer_2", None) is not None:
        raise ValueError(
            "streaming needs a single transformer: Wan2.2's two experts would each need their own clean-context "
            "KV cache, written at a timestep only one of them serves; load a single-expert checkpoint"
        )
    if getattr(pipeline.config, "expand_timesteps", False):
        raise ValueError("streaming is not supported for Wan2.2 TI2V (per-token timesteps of the first frame)")
    if transformer.config.added_kv_proj_dim is not None:
        raise ValueError("streaming supports text-to-video Wan transformers; this one has image conditioning")


class _StreamModelBase:
    """What both stream models share: conditioning, CFG, timesteps, positions."""

    def __init__(self, adapter, latent_hw: tuple[int, int], guidance_scale: float):
        check_streamable(adapter.pipeline)
        self.adapter = adapter
        self.transformer = adapter.pipeline.transformer
        if any(isinstance(b.attn1.processor, _STREAM_PROCESSORS) for b in self.transformer.blocks):
            raise RuntimeError(
                "another stream is already running on this transformer; close() it first (streams share the "
                "model's attention processors)"
            )
        self.latent_hw = latent_hw
        self.guidance_scale = guidance_scale
        self.cond: Conditioning | None = None
        self._cond_version = 0
        _, ph, pw = adapter.geometry.patch
        self.grid_hw = (latent_hw[0] // ph, latent_hw[1] // pw)
        self.tokens_per_frame = self.grid_hw[0] * self.grid_hw[1]
        self._saved_processors: list[tuple[torch.nn.Module, object]] = []
        # The adapter's hooks (RoPE positions) stay attached for the stream's life, not per forward.
        adapter.hooks.attach()
        self._hooks_held = True
        self._per_frame_timesteps = "enable_diffusion_forcing" in inspect.signature(self.transformer.forward).parameters

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1

    def set_conditioning(self, cond: Conditioning) -> None:
        """Use ``cond`` from the next forward on (a prompt change between blocks)."""
        if self.cfg and cond.negative is None:
            raise ValueError("guidance_scale > 1 needs a conditioning with negative embeddings")
        self.cond = cond
        self._cond_version += 1

    @property
    def cond_key(self) -> Hashable:
        return (self._cond_version, self.batch)

    def _set_processor(self, attn: torch.nn.Module, processor) -> None:
        self._saved_processors.append((attn, attn.processor))
        attn.set_processor(processor)

    def remove(self) -> None:
        """Put the transformer's original attention processors back."""
        for attn, processor in reversed(self._saved_processors):
            attn.set_processor(processor)
        self._saved_processors.clear()
        if self._hooks_held:
            self._hooks_held = False
            self.adapter.hooks.detach()

    def _run(self, x: torch.Tensor, timesteps_F: torch.Tensor, frame_positions: torch.Tensor) -> torch.Tensor:
        """One transformer forward of ``x`` (1,C,F,H,W) with per-frame timesteps, CFG combined."""
        if self.cond is None:
            raise RuntimeError("set_conditioning() must be called before the first forward")
        model = self.transformer
        limit = model.rope.max_seq_len
        if int(frame_positions.max()) >= limit:
            raise ValueError(
                f"RoPE frame position {int(frame_positions.max())} is outside the model's table of {limit} positions; "
                "only the KV-cached stream keeps positions bounded"
            )
        n = self.batch
        x = x.to(model.dtype).expand(n, -1, -1, -1, -1)
        text = self.cond.positive if not self.cfg else torch.cat([self.cond.negative, self.cond.positive])
        timesteps_F = timesteps_F.to(x.device)
        kwargs = {}
        if bool((timesteps_F == timesteps_F[0]).all()):
            t = timesteps_F[:1].expand(n)
        elif self._per_frame_timesteps:
            # SkyReels-V2 (diffusion forcing) takes one timestep per latent frame.
            t = timesteps_F[None].expand(n, -1)
            kwargs["enable_diffusion_forcing"] = True
        else:
            # Frames at different noise levels (a joint window, or the reference's
            # clean context): Wan's per-token timestep path.
            t = timesteps_F.repeat_interleave(self.tokens_per_frame)[None].expand(n, -1)
        if getattr(model.config, "inject_sample_info", False):
            kwargs["fps"] = [1] * n  # SkyReels-V2's fps embedding: 0 = 16 fps, 1 = 24 fps (its pipelines' default)
        gh, gw = self.grid_hw
        hook = self.adapter.rope_positions(model)
        hook.positions = TokenPositions(
            frames=frame_positions[None], rows=torch.arange(gh)[None], cols=torch.arange(gw)[None]
        )
        hook.repeat = n
        try:
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False, **kwargs)[0]
        finally:
            hook.positions = None
        if self.cfg:
            uncond, cond = out.float().chunk(2)
            return cfg_combine(uncond, cond, self.guidance_scale)
        return out.float()


class WanStreamModel(_StreamModelBase):
    """Block-causal, KV-cached forwards of a Wan transformer (see the module docstring).

    Args:
        adapter: the :class:`~supergen.backbones.wan.WanAdapter` of the pipeline.
        latent_hw: latent height and width of the stream.
        sink, window: attention-sink and rolling-window length in latent frames.
        max_segment_frames: the longest segment one forward denoises.
        guidance_scale: CFG scale (> 1 runs both branches batched; the cache holds both).
    """

    def __init__(self, adapter, latent_hw, sink: int, window: int, max_segment_frames: int, guidance_scale: float = 1.0):
        super().__init__(adapter, latent_hw, guidance_scale)
        cfg = self.transformer.config
        spec = KVCacheSpec(
            num_layers=cfg.num_layers,
            batch=self.batch,
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            tokens_per_frame=self.tokens_per_frame,
            sink_frames=sink,
            window_frames=window,
            max_current_frames=max_segment_frames,
            dtype=self.transformer.dtype,
            device=self.transformer.device,
        )
        rope = self.transformer.rope
        if spec.capacity_frames > rope.max_seq_len:
            raise ValueError(
                f"sink + window + segment = {spec.capacity_frames} latent frames exceeds the model's RoPE table of "
                f"{rope.max_seq_len} positions; shorten the window"
            )
        self.cache = RollingKVCache(spec, rotate=self._rotate_frames)
        self.cross_cache = CrossAttentionCache(cfg.num_layers)
        for layer, block in enumerate(self.transformer.blocks):
            self._set_processor(block.attn1, _StreamSelfAttnProcessor(layer, self.cache))
            self._set_processor(block.attn2, _CachedCrossAttnProcessor(layer, self.cross_cache))
        logger.info(
            "streaming attention installed on %d layers: sink %d + window %d + segment %d latent frames x %d tokens, "
            "KV cache %.1f MiB preallocated",
            cfg.num_layers,
            sink,
            window,
            max_segment_frames,
            self.tokens_per_frame,
            self.cache.nbytes / 2**20,
        )

    def _rotate_frames(self, keys: torch.Tensor, frames: int) -> torch.Tensor:
        """Keys roped at frame position p -> the same keys roped at p - ``frames`` (exact up to rounding)."""
        rope = self.transformer.rope
        cos = rope.freqs_cos[frames].clone()
        sin = -rope.freqs_sin[frames]
        # Only the temporal channels move; rows and columns keep their angle.
        cos[rope.t_dim :] = 1.0
        sin[rope.t_dim :] = 0.0
        return _apply_rope(keys, cos.to(keys.device), sin.to(keys.device))

    def predict(self, x: torch.Tensor, timesteps_F: torch.Tensor, write_frames: int = 0) -> torch.Tensor:
        """Prediction for a segment ``x`` (1,C,F,H,W) after the cached context.

        ``timesteps_F`` gives each latent frame's timestep. ``write_frames > 0``
        commits the first ``write_frames`` frames' keys/values to the cache after
        this forward (their clean re-run, or the last denoising step).
        """
        self.cross_cache.bind(self.cond_key)
        positions = self.cache.current_positions(x.shape[2])
        out = self._run(x, timesteps_F, positions)
        if write_frames:
            self.cache.commit(write_frames)
        return out

    def reset(self) -> None:
        self.cache.reset()
        self.cross_cache.reset()

    def remove(self) -> None:
        super().remove()
        # Drop the buffers now: a closed stream must not hold the cache.
        self.cache.keys.clear()
        self.cache.values.clear()
        self.cross_cache.reset()


class WanUncachedStreamModel(_StreamModelBase):
    """The same stream with no cache: each forward re-runs the whole history under a block-causal mask.

    A frame written in a segment that started at frame ``s`` sees the sink
    (frames < ``sink``), the ``window`` frames before ``s`` and its own
    segment. While every segment sees a contiguous run of frames (no sink, or
    before the window first rolls) this is one absolute-position sequence
    through Diffusers' own processor under that mask (RoPE depends only on
    position differences). Once a sink is separated from the window, each
    segment attends with the positions the cache gives it (sink, then window,
    packed contiguously, then the segment), computed per segment.
    ``window=None`` keeps the full history (the benchmark's baseline); its cost
    grows with every block.
    """

    def __init__(self, adapter, latent_hw, sink: int = 0, window: int | None = None, guidance_scale: float = 1.0):
        super().__init__(adapter, latent_hw, guidance_scale)
        self.sink = sink
        self.window = window
        self._latents: list[torch.Tensor] = []  # committed frames' inputs, one (1,C,1,H,W) each
        self._timesteps: list[torch.Tensor] = []
        self._segment_start: list[int] = []  # per committed frame: where its segment started/ended
        self._segment_end: list[int] = []
        self._processors = []
        self.view_forwards = 0  # forwards that needed per-segment positions
        for block in self.transformer.blocks:
            proc = _ReferenceSelfAttnProcessor()
            self._processors.append(proc)
            self._set_processor(block.attn1, proc)

    @property
    def context_frames(self) -> int:
        return len(self._latents)

    def _visible(self, segment_start: torch.Tensor, segment_end: torch.Tensor, total: int) -> torch.Tensor:
        """Frame-level mask (queries, keys) for frames with the given segment bounds."""
        keys = torch.arange(total)[None]
        start, end = segment_start[:, None], segment_end[:, None]
        own = (keys >= start) & (keys < end)
        past = keys < start
        if self.window is not None:
            past = past & ((keys < self.sink) | (keys >= start - self.window))
        return own | past

    def predict(self, x: torch.Tensor, timesteps_F: torch.Tensor, write_frames: int = 0) -> torch.Tensor:
        """Same contract as :meth:`WanStreamModel.predict`."""
        frames = x.shape[2]
        if 0 < write_frames < frames:
            raise ValueError(
                "the uncached model cannot replay keys/values written from part of a joint segment; "
                "use write_frames equal to the segment length"
            )
        ctx = self.context_frames
        total = ctx + frames
        seq = torch.cat([*self._latents, x.to(self.transformer.dtype)], dim=2) if ctx else x
        t_all = torch.cat([*self._timesteps, timesteps_F.float().cpu()]) if ctx else timesteps_F.float()
        starts = torch.tensor(self._segment_start + [ctx] * frames)
        ends = torch.tensor(self._segment_end + [total] * frames)
        mask = self._visible(starts, ends, total)
        views = self._views(mask, starts, ends)
        tpf = self.tokens_per_frame
        token_mask = mask.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1).to(seq.device)
        for proc in self._processors:
            proc.mask = token_mask[None, None]
            proc.views = views
        try:
            out = self._run(seq, t_all, torch.arange(total))[:, :, ctx:]
        finally:
            for proc in self._processors:
                proc.mask = proc.views = None
        if write_frames:
            for i in range(frames):
                self._latents.append(x[:, :, i : i + 1].to(self.transformer.dtype))
                self._timesteps.append(timesteps_F[i : i + 1].float().cpu())
                self._segment_start.append(ctx)
                self._segment_end.append(total)
        return out

    def _views(self, mask: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> list | None:
        """Per-segment (queries, keys, RoPE) when some segment's context is not one contiguous run, else None."""
        segments = sorted({(int(s), int(e)) for s, e in zip(starts, ends)})
        visible = {seg: torch.nonzero(mask[seg[0]]).flatten() for seg in segments}
        if all(int(v[-1]) - int(v[0]) + 1 == len(v) for v in visible.values()):
            return None
        self.view_forwards += 1
        tpf = self.tokens_per_frame
        device = self.transformer.device

        def tokens(frames: torch.Tensor) -> torch.Tensor:
            return (frames[:, None] * tpf + torch.arange(tpf)).flatten().to(device)

        views = []
        for (start, end), keys in visible.items():
            # The cache packs visible frames contiguously: key i sits at position i,
            # so the segment's own frames come right after its context.
            queries = torch.arange(start, end)
            q_pos = torch.arange(len(keys) - (end - start), len(keys))
            views.append((tokens(queries), tokens(keys), self._rope_tables(q_pos), self._rope_tables(torch.arange(len(keys)))))
        return views

    def _rope_tables(self, frame_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (1, tokens, 1, head_dim) for whole frames at the given frame positions."""
        rope = self.transformer.rope
        gh, gw = self.grid_hw
        n = len(frame_positions)
        tables = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            t_tab, h_tab, w_tab = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
            f = t_tab[frame_positions.to(table.device)][:, None, None].expand(n, gh, gw, -1)
            h = h_tab[:gh][None, :, None].expand(n, gh, gw, -1)
            w = w_tab[:gw][None, None, :].expand(n, gh, gw, -1)
            tables.append(torch.cat([f, h, w], dim=-1).reshape(1, n * gh * gw, 1, -1))
        return tables[0], tables[1]

    def reset(self) -> None:
        for history in (self._latents, self._timesteps, self._segment_start, self._segment_end):
            history.clear()


class WanStreamDecoder:
    """Decode a latent stream block by block with ``AutoencoderKLWan``'s causal cache carried across blocks.

    The Wan VAE decodes one latent frame at a time, each conv layer keeping the
    last frames it saw in ``feat_cache``; ``AutoencoderKLWan._decode`` does this
    for a whole latent with a fresh cache. Keeping one cache for the whole
    stream makes block-by-block output equal the whole-latent decode (the first
    latent frame gives 1 video frame, every later one ``scale_temporal``).
    """

    def __init__(self, vae, latents_mean: torch.Tensor, latents_std: torch.Tensor):
        self.vae = vae
        self.mean = latents_mean
        self.std = latents_std
        self.reset()

    def reset(self) -> None:
        counts = getattr(self.vae, "_cached_conv_counts", None)
        n = counts["decoder"] if counts else sum(type(m).__name__ == "WanCausalConv3d" for m in self.vae.decoder.modules())
        self._feat_map: list = [None] * n
        self._first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B,C,F,H,W) of the next block -> video in [-1, 1] (B,3,F',H',W')."""
        vae = self.vae
        z = latents.to(vae.device, vae.dtype)
        # Same arithmetic as WanAdapter.decode (and WanPipeline).
        z = z / (1.0 / self.std.to(z)) + self.mean.to(z)
        x = vae.post_quant_conv(z)  # kernel 1: per-frame, so per-block is the same
        outs = []
        for i in range(x.shape[2]):
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self._feat_map, feat_idx=[0], first_chunk=self._first))
            self._first = False
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0)
