"""Streaming block diffusion: KV-cache exactness, bounded memory and RoPE, streaming decode, prompt changes."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from supergen import StreamConfig, SuperGenPipeline
from supergen.backbones.base import BackboneAdapter
from supergen.backbones.wan import WanAdapter
from supergen.backbones.wan_stream import _apply_rope
from supergen.cache.kv import KVCacheSpec, RollingKVCache
from supergen.samplers.schedule import fresh_scheduler
from supergen.samplers.stream import block_stream, rolling_stream

PROMPT = "a red circle moving left over a blue sky"
LATENT_HW = (8, 12)  # the tiny model's native 64x96 pixels


def _latents(tiny, *, cached, sink, window, blocks, block_frames=2, steps=2, kv_write="rerun", schedule="block",
             guidance=3.0, seed=0, encoder=None, context_noise=0.0):
    """Clean latents of ``blocks`` blocks from the raw loop (no decode), and the stream model used."""
    adapter = tiny.adapter
    encoder = encoder or adapter
    segment = block_frames * (steps if schedule == "rolling" else 1)
    model = adapter.install_streaming(LATENT_HW, sink, window, segment, guidance, cached=cached)
    try:
        with torch.no_grad():
            model.set_conditioning(encoder.encode_prompt(PROMPT, None, guidance))
            gen = torch.Generator().manual_seed(seed)
            drawn = []

            def noise():
                if len(drawn) == blocks:
                    return None
                drawn.append(adapter.prepare_noise((block_frames, *LATENT_HW), gen))
                return drawn[-1]

            def scheduler():
                s = fresh_scheduler(adapter.scheduler)
                s.set_timesteps(steps)
                return s

            loop = rolling_stream if schedule == "rolling" else block_stream
            kwargs = dict(generator=gen, context_noise=context_noise) if context_noise else {}
            out = torch.cat(list(loop(model, noise, scheduler, kv_write, **kwargs)), dim=2)
    finally:
        model.remove()
    return out, model


# --- the cache on its own ---------------------------------------------------------------------------------


def test_rolling_cache_pins_sink_keeps_last_window_frames_and_stays_flat():
    spec = KVCacheSpec(num_layers=2, batch=1, heads=1, head_dim=2, tokens_per_frame=3, sink_frames=2,
                       window_frames=4, max_current_frames=3)
    shifts = []
    cache = RollingKVCache(spec, rotate=lambda k, e: shifts.append(e) or k.clone())
    used = []
    for block in range(10):
        frames = 3
        ids = torch.arange(block * frames, block * frames + frames, dtype=torch.float32)
        # Value of every token = the global index of its frame, so the buffer content can be read back.
        value = ids.repeat_interleave(spec.tokens_per_frame)[None, :, None, None].expand(1, -1, 1, 2)
        for layer in range(spec.num_layers):
            k, v = cache.attend(layer, value.clone(), value.clone())
            assert k.shape[1] == (cache.context_frames + frames) * spec.tokens_per_frame
        assert cache.current_positions(frames).max() < spec.capacity_frames
        cache.commit(frames)
        used.append(cache.used_bytes)
    total = 10 * 3
    stored = cache.values[0][0, : cache.context_frames * 3 : 3, 0, 0]
    # Sink: the first two frames ever; window: the last four, oldest first.
    assert stored.tolist() == [0, 1, *range(total - 4, total)]
    assert cache.values[1][0, : cache.context_frames * 3 : 3, 0, 0].tolist() == stored.tolist()
    assert cache.context_frames == 6 and cache.evicted_frames == total - 6
    assert used[:2] == [3 * spec.bytes_per_frame, 6 * spec.bytes_per_frame]
    assert len(set(used[1:])) == 1  # flat once sink + window are full
    assert shifts and all(e > 0 for e in shifts)
    cache.reset()
    assert cache.context_frames == 0 and cache.used_bytes == 0


def test_key_rotation_equals_re_roping_and_drift_stays_tiny(tiny):
    model = tiny.adapter.install_streaming(LATENT_HW, sink=1, window=4, max_segment_frames=2)
    try:
        rope = tiny.pipe.transformer.rope
        head_dim = rope.attention_head_dim
        keys = torch.randn(1, 5, 2, head_dim, generator=torch.Generator().manual_seed(0))
        row, col = 3, 4  # a token's spatial position: rotation must leave it alone

        def roped(frame):
            pos = torch.tensor([frame, row, col])
            parts_cos = rope.freqs_cos.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
            parts_sin = rope.freqs_sin.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
            cos = torch.cat([t[p] for t, p in zip(parts_cos, pos)])
            sin = torch.cat([t[p] for t, p in zip(parts_sin, pos)])
            return _apply_rope(keys, cos, sin)

        once = model._rotate_frames(roped(7), 3)
        assert torch.allclose(once, roped(4), atol=1e-6, rtol=0)
        # A key is rotated at most `window` times before eviction; even 100 single-frame
        # rotations stay within float32 rounding of a fresh roping.
        k = roped(120)
        for _ in range(100):
            k = model._rotate_frames(k, 1)
        drift = (k - roped(20)).abs().max().item()
        assert drift < 1e-5
    finally:
        model.remove()


# --- exactness against the uncached full-sequence run -----------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        dict(sink=0, window=4, blocks=6),  # window rolls four times
        dict(sink=0, window=3, blocks=5, kv_write="last_step"),
        dict(sink=2, window=6, blocks=4),  # sink + window never roll: sink positions are absolute
        dict(sink=0, window=4, blocks=5, steps=3, schedule="rolling"),
    ],
)
def test_cached_blocks_equal_uncached_full_sequence_under_block_causal_mask(tiny, case):
    cached, model = _latents(tiny, cached=True, **case)
    reference, _ = _latents(tiny, cached=False, **case)
    # Same arithmetic up to attention over a different key order and one extra
    # RoPE rotation per roll: float32 rounding (measured ~2e-6).
    assert torch.allclose(cached, reference, atol=1e-4, rtol=0), (cached - reference).abs().max()
    assert cached.abs().max() > 1.0  # a real video latent, not zeros
    if case["sink"] == 0:
        assert model.cache.evicted_frames > 0  # the window really rolled


def test_skyreels_v2_streams_with_the_same_processors(tiny):
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel

    p = tiny.pipe
    config = {k: v for k, v in p.transformer.config.items() if not k.startswith("_")}
    transformer = SkyReelsV2Transformer3DModel(**config).eval()
    transformer.load_state_dict(p.transformer.state_dict())  # same architecture, same weights
    sky = SuperGenPipeline.from_pipe(
        SkyReelsV2Pipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, transformer=transformer,
                           scheduler=p.scheduler),
        native_size=(64, 96, 9),
    )
    try:
        # SkyReels' encode_prompt needs ftfy; the text encoder is shared, so encode through the Wan pipeline.
        for case in (dict(sink=0, window=4, blocks=4), dict(sink=0, window=4, blocks=4, steps=3, schedule="rolling")):
            cached, _ = _latents(sky, cached=True, encoder=tiny.adapter, **case)
            reference, _ = _latents(sky, cached=False, encoder=tiny.adapter, **case)
            wan, _ = _latents(tiny, cached=True, **case)
            assert torch.allclose(cached, reference, atol=1e-4, rtol=0)
            # Per-frame timesteps through SkyReels' diffusion-forcing path = Wan's per-token path.
            assert torch.allclose(cached, wan, atol=1e-4, rtol=0)
    finally:
        sky.adapter.remove_hooks()


@pytest.mark.parametrize(
    "case",
    [
        dict(sink=2, window=2, blocks=4),
        dict(sink=1, window=3, blocks=5, kv_write="last_step"),
        dict(sink=1, window=2, blocks=4, steps=3, schedule="rolling"),
    ],
)
def test_cached_blocks_equal_uncached_with_sink_and_rolling_window(tiny, case):
    cached, model = _latents(tiny, cached=True, **case)
    reference, uncached = _latents(tiny, cached=False, **case)
    assert torch.allclose(cached, reference, atol=1e-4, rtol=0), (cached - reference).abs().max()
    # The window rolled away from the sink, so the cache re-indexed the sink next to the
    # window and the reference had to give each segment its own positions.
    assert model.cache.evicted_frames > 0 and uncached.view_forwards > 0


@pytest.mark.parametrize("schedule", ["block", "rolling"])
def test_context_noise_reaches_the_cache_not_the_output_and_cached_equals_uncached(tiny, schedule):
    case = dict(sink=1, window=3, blocks=4, steps=2, schedule=schedule)
    clean, _ = _latents(tiny, cached=True, **case)
    noisy, model = _latents(tiny, cached=True, context_noise=0.2, **case)
    again, _ = _latents(tiny, cached=True, context_noise=0.2, **case)
    reference, _ = _latents(tiny, cached=False, context_noise=0.2, **case)
    b = 2  # _latents' block_frames
    # The first block never sees a context: the yielded sample is the clean one, not the noised write.
    assert torch.equal(noisy[:, :, :b], clean[:, :, :b])
    # What follows attends to a noised context: it moves (the noise drawn also shifts the seed's later noise).
    assert (noisy[:, :, b:] - clean[:, :, b:]).abs().max() > 0.1
    assert torch.equal(noisy, again)  # the stream's generator draws it: a seed reproduces
    # The uncached reference re-runs the same noised history: the KV cache stays exact with it.
    assert torch.allclose(noisy, reference, atol=1e-4, rtol=0), (noisy - reference).abs().max()
    assert model.cache.evicted_frames > 0


def test_context_noise_stream_setting_is_logged_in_metrics_and_zero_is_bit_exact(tiny):
    config = StreamConfig(block_frames=2, window=4, sink=0, steps=2)
    with tiny.stream(PROMPT, num_blocks=3, stream=config, guidance_scale=3.0, seed=0) as stream:
        plain = torch.cat([blk.latents for blk in stream], dim=2)
    zero = dataclasses.replace(config, context_noise=0.0)
    with tiny.stream(PROMPT, num_blocks=3, stream=zero, guidance_scale=3.0, seed=0) as stream:
        assert torch.equal(torch.cat([blk.latents for blk in stream], dim=2), plain)
    noisy = dataclasses.replace(config, context_noise=0.1)
    with tiny.stream(PROMPT, num_blocks=3, stream=noisy, guidance_scale=3.0, seed=0) as stream:
        out = torch.cat([blk.latents for blk in stream], dim=2)
        assert stream.metrics["stream"]["context_noise"] == 0.1
    assert torch.equal(out[:, :, :2], plain[:, :, :2]) and not torch.equal(out, plain)


def test_joint_window_of_one_step_is_the_block_schedule(tiny):
    rolling, _ = _latents(tiny, cached=True, sink=1, window=4, blocks=4, steps=1, schedule="rolling")
    block, _ = _latents(tiny, cached=True, sink=1, window=4, blocks=4, steps=1)
    assert torch.equal(rolling, block)
    joint, _ = _latents(tiny, cached=True, sink=1, window=4, blocks=4, steps=2, schedule="rolling")
    blockwise, _ = _latents(tiny, cached=True, sink=1, window=4, blocks=4, steps=2)
    assert (joint - blockwise).abs().max() > 1e-3  # with 2 steps the joint window really differs


# --- bounded memory and positions ---------------------------------------------------------------------------


def test_memory_and_rope_positions_stay_bounded_beyond_the_rope_table(tiny):
    adapter = tiny.adapter
    table = tiny.pipe.transformer.rope.max_seq_len
    model = adapter.install_streaming(LATENT_HW, sink=1, window=3, max_segment_frames=2)
    hook = adapter.rope_positions(tiny.pipe.transformer)
    seen = []
    handle = tiny.pipe.transformer.rope.register_forward_hook(lambda m, a, o: seen.append(int(hook.positions.frames.max())))
    try:
        with torch.no_grad():
            model.set_conditioning(adapter.encode_prompt(PROMPT, None, 1.0))
            gen = torch.Generator().manual_seed(0)
            allocated = model.cache.nbytes
            used = []
            for _ in range(table // 2 + 8):  # 2-frame blocks: more frames than the RoPE table has positions
                x = torch.randn(1, 16, 2, *LATENT_HW, generator=gen)
                model.predict(x, torch.full((2,), 500.0))
                model.predict(x, torch.zeros(2), write_frames=2)
                used.append(model.cache.used_bytes)
                assert model.cache.nbytes == allocated
        assert model.cache.committed_frames > table
        assert max(seen) == 1 + 3 + 2 - 1  # sink + window + block - 1, however long the stream
        assert used[0] < used[1] and len(set(used[1:])) == 1  # grows to sink + window, then flat
    finally:
        handle.remove()
        model.remove()
    # Without re-indexing the same stream runs out of the table.
    uncached = adapter.install_streaming(LATENT_HW, 0, 3, 2, cached=False)
    try:
        uncached.set_conditioning(adapter.encode_prompt(PROMPT, None, 1.0))
        with pytest.raises(ValueError, match="outside the model's table"), torch.no_grad():
            uncached.predict(torch.zeros(1, 16, table + 1, *LATENT_HW), torch.zeros(table + 1))
    finally:
        uncached.remove()


# --- decode, API, prompt changes -------------------------------------------------------------------------


def test_streaming_decode_equals_whole_latent_decode(tiny):
    latents = torch.randn(1, 16, 7, *LATENT_HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tiny.adapter.decode(latents)
        decoder = tiny.adapter.stream_decoder()
        parts = [decoder.decode(chunk) for chunk in latents.split([3, 2, 1, 1], dim=2)]
    assert [p.shape[2] for p in parts] == [9, 8, 4, 4]  # 1 + 4k video frames for the first latent frame
    # Same convolutions on the same inputs in the same order: bit-identical.
    assert torch.equal(torch.cat(parts, dim=2), whole)


def test_stream_yields_frames_per_block_with_metrics_and_matches_raw_loop(tiny):
    config = StreamConfig(block_frames=2, window=4, sink=0, steps=2)
    with tiny.stream(PROMPT, num_blocks=3, stream=config, guidance_scale=3.0, seed=0) as stream:
        blocks = list(stream)
        metrics = stream.metrics
    assert [b.frames.shape for b in blocks] == [(5, 64, 96, 3), (8, 64, 96, 3), (8, 64, 96, 3)]
    assert all(b.frames.dtype == np.uint8 for b in blocks)
    raw, _ = _latents(tiny, cached=True, sink=0, window=4, blocks=3)
    assert torch.equal(torch.cat([b.latents for b in blocks], dim=2), raw)
    assert metrics["num_frames"] == 21 and len(metrics["blocks"]) == 3
    for key in ("world_size", "height", "width", "steps", "wall_s", "denoise_s", "decode_s", "peak_mem_bytes",
                "tiles", "comm_bytes", "time_to_first_frame_s", "fps"):
        assert key in metrics
    assert all(b["latency_s"] > 0 and b["kv_cache_bytes"] > 0 for b in metrics["blocks"])
    # Closing restores Diffusers' processors and frees the cache.
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tiny.pipe.transformer.blocks)
    assert stream.model.cache.keys == []


def test_endless_stream_stops_when_closed(tiny):
    stream = tiny.stream(PROMPT, stream=StreamConfig(block_frames=1, window=2, sink=0, steps=1))
    with pytest.raises(RuntimeError, match="another stream is already running"):
        tiny.stream(PROMPT)
    for block in stream:
        if block.index == 4:
            break
    stream.close()
    assert len(stream.blocks) == 5
    assert next(stream, None) is None
    assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in tiny.pipe.transformer.blocks)


def test_prompt_change_affects_only_later_blocks_and_cross_attention_is_cached_per_prompt(tiny):
    config = StreamConfig(block_frames=1, window=2, sink=1, steps=2)
    layers = tiny.pipe.transformer.config.num_layers
    with tiny.stream(PROMPT, num_blocks=4, stream=config, seed=0) as same:
        base = [b.latents for b in same]
        assert same.model.cross_cache.misses == layers  # text K/V computed once for four blocks
        assert same.model.cross_cache.hits == layers * (4 * 3 - 1)
    with tiny.stream(PROMPT, num_blocks=4, stream=config, seed=0) as changed:
        out = [next(changed).latents, next(changed).latents]
        changed.set_prompt("a green dog running through snow at night")
        out += [b.latents for b in changed]
        assert changed.model.cross_cache.misses == 2 * layers
        assert [b["prompt"] for b in changed.blocks][1:3] == [PROMPT, "a green dog running through snow at night"]
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    assert (out[2] - base[2]).abs().max() > 1e-3 and (out[3] - base[3]).abs().max() > 1e-3


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=72), "height 72 is not a positive multiple of 16"),
        (dict(num_blocks=0), "num_blocks=0"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(stream="big"), "StreamConfig"),
    ],
)
def test_stream_bad_requests_fail_before_model_work(tiny, kwargs, match):
    # A value of the wrong type is a TypeError (naming the argument), a bad value a ValueError.
    with pytest.raises((ValueError, TypeError), match=match):
        tiny.stream(PROMPT, **kwargs)
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tiny.pipe.transformer.blocks)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=2, block_frames=3), "shorter than one block"),
        (dict(window=6, sink=7), "sink=7"),
        (dict(schedule="diagonal"), "schedule"),
        (dict(kv_write="never"), "kv_write"),
        (dict(steps=0), "steps"),
        (dict(context_noise=-0.1), "context_noise"),
        (dict(context_noise=float("nan")), "context_noise"),
        (dict(context_noise=0.1, kv_write="last_step"), "needs kv_write='rerun'"),
    ],
)
def test_stream_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamConfig(**kwargs)


def test_block_not_a_multiple_of_the_temporal_patch_is_refused(tiny):
    from diffusers import WanTransformer3DModel

    cfg = dict(tiny.pipe.transformer.config)
    cfg["patch_size"] = (2, 2, 2)
    pipe = copy.copy(tiny.pipe)
    pipe.register_modules(transformer=WanTransformer3DModel.from_config(cfg))
    sg = SuperGenPipeline.from_pipe(pipe, native_size=(64, 96, 9))
    with pytest.raises(ValueError, match="block_frames=3 latent frames is not a multiple of the transformer's temporal patch 2"):
        sg.stream(PROMPT, stream=StreamConfig(block_frames=3, window=4, sink=2))


def test_backbones_without_streaming_are_refused(tiny):
    from diffusers import WanPipeline

    p = tiny.pipe
    two_experts = WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                              transformer=p.transformer, transformer_2=copy.deepcopy(p.transformer), boundary_ratio=0.875)
    sg2 = SuperGenPipeline.from_pipe(two_experts, native_size=(64, 96, 9))
    with pytest.raises(ValueError, match="streaming needs a single transformer"):
        sg2.stream(PROMPT, num_blocks=1)
    sg2.adapter.remove_hooks()

    class NoStreamingAdapter(WanAdapter):
        check_streaming = BackboneAdapter.check_streaming
        install_streaming = BackboneAdapter.install_streaming

    sg = SuperGenPipeline.from_pipe(p, native_size=(64, 96, 9))
    sg.adapter.remove_hooks()
    sg.adapter = NoStreamingAdapter(p, native_size=(64, 96, 9))
    with pytest.raises(ValueError, match="has no streaming support"):
        sg.stream(PROMPT, num_blocks=1)
    sg.adapter.remove_hooks()


def test_self_forcing_style_stochastic_sampler_is_reproducible_from_the_seed(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0, stochastic_sampling=True)
    config = StreamConfig(block_frames=1, window=2, sink=1, steps=4)
    runs = []
    for seed in (3, 3, 4):
        with tiny.stream(PROMPT, num_blocks=2, stream=config, scheduler=scheduler, seed=seed) as stream:
            runs.append(torch.cat([b.latents for b in stream], dim=2))
    assert torch.equal(runs[0], runs[1])  # fresh noise inside step() comes from the stream's generator
    assert (runs[0] - runs[2]).abs().max() > 1e-2


# --- what a prompt change does to the cached context ---------------------------------------------------------


def test_kv_flush_keeps_the_sink_and_the_last_window_frames_re_roped():
    spec = KVCacheSpec(num_layers=1, batch=1, heads=1, head_dim=2, tokens_per_frame=1, sink_frames=2,
                       window_frames=4, max_current_frames=1)
    shifts = []
    cache = RollingKVCache(spec, rotate=lambda k, e: shifts.append(e) or k + 100 * e)
    for frame in range(5):
        value = torch.full((1, 1, 1, 2), float(frame))
        cache.attend(0, value, value)
        cache.commit(1)
    assert (cache.sink_filled, cache.window_filled) == (2, 3)
    cache.flush(keep_frames=1)
    assert cache.context_frames == 3 and shifts == [2]  # frame 4 moved from slot 4 to slot 2
    assert cache.values[0][0, :3, 0, 0].tolist() == [0.0, 1.0, 4.0]
    assert cache.keys[0][0, 2, 0, 0].item() == 4.0 + 200
    cache.flush(keep_frames=0)
    assert cache.context_frames == 2  # the sink always stays


def test_kv_recache_under_the_same_prompt_reproduces_the_stream(tiny):
    # Nothing evicted yet: re-running the cached clean frames writes the very keys/values they had.
    base_cfg = StreamConfig(block_frames=1, window=4, sink=1, steps=2)
    with tiny.stream(PROMPT, num_blocks=4, stream=base_cfg, seed=0) as same:
        base = [b.latents for b in same]
    for mode in ("recache", "keep"):
        with tiny.stream(PROMPT, num_blocks=4, stream=dataclasses.replace(base_cfg, on_prompt_change=mode), seed=0) as s:
            out = [next(s).latents, next(s).latents]
            s.set_prompt(PROMPT)
            out += [b.latents for b in s]
            assert s.prompt_changes[0]["mode"] == mode and s.metrics["stream"]["on_prompt_change"] == mode
        for a, b in zip(out, base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prompt_change_modes_differ_and_flush_shrinks_the_context_to_sink_plus_one(tiny):
    other = "a green dog running through snow at night"
    outs, contexts = {}, {}
    for mode in ("keep", "recache", "flush"):
        cfg = StreamConfig(block_frames=1, window=3, sink=1, steps=2, on_prompt_change=mode)
        with tiny.stream(PROMPT, num_blocks=5, stream=cfg, seed=0) as s:
            blocks = [next(s) for _ in range(3)]
            s.set_prompt(other)
            blocks += list(s)
            outs[mode] = torch.cat([b.latents for b in blocks], dim=2)
            contexts[mode] = [b.metrics["context_frames"] for b in blocks]
    assert contexts["keep"] == contexts["recache"] == [1, 2, 3, 4, 4]
    assert contexts["flush"] == [1, 2, 3, 3, 4]  # block 3 sees sink + last frame, then commits itself
    for mode in ("recache", "flush"):
        assert torch.equal(outs[mode][:, :, :3], outs["keep"][:, :, :3])
        assert (outs[mode][:, :, 3:] - outs["keep"][:, :, 3:]).abs().max() > 1e-4


def test_restart_drops_the_whole_context_so_what_follows_forgets_the_old_prompt(tiny):
    # After a restart the next block starts like a stream's first: its context is empty, and the blocks
    # that follow are the same whatever came before the switch (only the noise, drawn in order, is shared).
    other = "a green dog running through snow at night"
    cfg = StreamConfig(block_frames=1, window=3, sink=1, steps=2, on_prompt_change="restart")
    after, contexts = {}, {}
    for before in (PROMPT, "a red circle moving left over a blue sky"):
        with tiny.stream(before, num_blocks=5, stream=cfg, seed=0) as s:
            blocks = [next(s) for _ in range(3)]
            s.set_prompt(other)
            blocks += list(s)
            assert s.prompt_changes[0]["mode"] == "restart"
        # ... and is decoded as one too (a fresh causal VAE state: as many frames as the stream's first block).
        sizes = [len(b.frames) for b in blocks]
        assert sizes[3] == sizes[0] and sizes[4] == sizes[1], sizes
        after[before] = torch.cat([b.latents for b in blocks[3:]], dim=2)
        contexts[before] = [b.metrics["context_frames"] for b in blocks]
    assert contexts[PROMPT] == [1, 2, 3, 1, 2]  # block 3 commits into an empty cache
    assert torch.equal(after[PROMPT], after["a red circle moving left over a blue sky"])
    with tiny.stream(PROMPT, num_blocks=5, stream=dataclasses.replace(cfg, on_prompt_change="keep"), seed=0) as s:
        kept = [next(s) for _ in range(3)]
        s.set_prompt(other)
        kept = torch.cat([b.latents for b in [*kept, *s][3:]], dim=2)
    assert (kept - after[PROMPT]).abs().max() > 1e-4  # keeping the context does change what follows
