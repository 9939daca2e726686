"""Every bad config value gets a ValueError that names it."""

import math

import pytest

from supergen.config import CacheConfig, GenerationConfig, StreamConfig, TilingConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strength=0.0), "strength"),
        (dict(strength=1.5), "strength"),
        (dict(blend="gauss"), "blend"),
        (dict(shift="roll"), "shift"),
        (dict(rope="global"), "rope"),
        (dict(upscale="nearest"), "upscale"),
        (dict(overlap=-1), "overlap"),
        (dict(tile_height=64, overlap=64), "overlap=64 must be smaller than tile_height=64"),
        (dict(tile_frames=9, frame_overlap=9), "frame_overlap"),
        (dict(tile_batch_size=0), "tile_batch_size"),
        (dict(shift_every=0), "shift_every=0 must be an integer >= 1"),
    ],
)
def test_tiling_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TilingConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="lru"), "cache mode"),
        (dict(threshold=-0.1), "threshold"),
        (dict(threshold=math.inf), "threshold"),
        (dict(threshold=math.nan), "threshold"),
        (dict(max_skips=0), "max_skips"),
        (dict(threshold=True), "threshold"),
        (dict(warmup=-1), "warmup"),
        (dict(cooldown=0), "cooldown=0 must be an integer >= 1"),
        (dict(regions_per_tile=0), "regions_per_tile"),
        (dict(reuse="latest"), "cache reuse"),
        (dict(adaptive="yes"), "adaptive"),
        (dict(shift_threshold=-0.5), "shift_threshold=-0.5 must be a finite number >= 0"),
        (dict(shift_threshold=math.nan), "shift_threshold"),
        (dict(shift_threshold=True), "shift_threshold"),
        (dict(grid="moving"), "grid"),
    ],
)
def test_cache_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_cache_schedule_check():
    cache = CacheConfig(mode="region", warmup=5)
    with pytest.raises(ValueError, match="warmup=5 is longer than the schedule \\(4 refinement steps\\)"):
        cache.check_schedule(4)
    cache.check_schedule(5)  # nothing left to skip: a warning, not an error
    CacheConfig(mode="off", warmup=50).check_schedule(4)  # the cache is off: nothing to check


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(window=2, block_frames=3), "shorter than one block"), (dict(window=6, sink=7), "sink=7"),
     (dict(on_prompt_change="forget"), "on_prompt_change")],
)
def test_stream_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamConfig(**kwargs)


def test_generation_config_defaults_nest():
    cfg = GenerationConfig(prompt="a cat")
    assert cfg.tiling.strength == 0.9 and cfg.cache.mode == "off"
    with pytest.raises(ValueError, match="num_inference_steps"):
        GenerationConfig(prompt="a cat", num_inference_steps=0)
    with pytest.raises(TypeError, match=r"tiling must be a TilingConfig or None, got dict; build one with"):
        GenerationConfig(prompt="a cat", tiling={})
    with pytest.raises(TypeError, match="prompt must be a string"):
        GenerationConfig(prompt=None)
