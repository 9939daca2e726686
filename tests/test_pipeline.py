"""End-to-end behaviour of SuperGenPipeline on the tiny Wan model."""

import copy
import json

import numpy as np
import pytest
import torch

from supergen import SuperGenPipeline, TilingConfig
from supergen.models import write_native_size

PROMPT = "a red circle moving left over a blue sky"


def _plain(pipe, **kw):
    return pipe(
        PROMPT,
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).frames[0]


def _native(sg, **kw):
    return sg(
        PROMPT,
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=4,
        guidance_scale=5.0,
        seed=0,
        tiling=TilingConfig(strength=1.0),
        output_type="float",
        progress=False,
        **kw,
    ).frames


def test_native_size_single_tile_equals_plain_diffusers_pipeline(tiny):
    reference = _plain(tiny.pipe)
    tiny.adapter.batch_cfg = False
    try:
        # Same calls in the same order as WanPipeline: nothing added, bit for bit.
        np.testing.assert_array_equal(_native(tiny), reference)
    finally:
        tiny.adapter.batch_cfg = True
    # Batched CFG changes only the matmul batch: float32 rounding level.
    np.testing.assert_allclose(_native(tiny), reference, rtol=0, atol=1e-5)


def test_wan22_two_experts_switch_like_the_plain_pipeline(tiny):
    from diffusers import WanPipeline

    second = copy.deepcopy(tiny.pipe.transformer)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.1)
    components = dict(tiny.pipe.components, transformer_2=second)
    pipe = WanPipeline(**components, boundary_ratio=0.9)
    sg = SuperGenPipeline.from_pipe(pipe, native_size=(64, 96, 9))
    sg.adapter.batch_cfg = False
    calls = {"t1": 0, "t2": 0}
    hooks = [
        pipe.transformer.register_forward_hook(lambda *a: calls.__setitem__("t1", calls["t1"] + 1)),
        second.register_forward_hook(lambda *a: calls.__setitem__("t2", calls["t2"] + 1)),
    ]
    try:
        ours = _native(sg, guidance_scale_2=3.0)
    finally:
        for h in hooks:
            h.remove()
    assert calls["t1"] > 0 and calls["t2"] > 0
    np.testing.assert_array_equal(ours, _plain(pipe, guidance_scale_2=3.0))


@pytest.mark.parametrize("area", [2, 3])
def test_tiled_end_to_end_shapes_and_metrics(tiny, area):
    out = tiny(PROMPT, height=64 * area, width=96 * area, num_inference_steps=4, progress=False)
    assert out.frames.shape == (9, 64 * area, 96 * area, 3) and out.frames.dtype == np.uint8
    assert out.frames.std() > 0
    m = out.metrics
    for key in ("world_size", "height", "width", "num_frames", "steps", "wall_s", "denoise_s", "decode_s",
                "peak_mem_bytes", "tiles", "comm_bytes"):
        assert key in m, key
    assert m["tiles"]["count"] == area * area
    # strength 0.9 of 4 steps refines 4 (rounded) steps.
    assert m["tiles"]["tile_steps_total"] == area * area * 4
    assert m["tiles"]["tile_steps_computed"] + m["tiles"]["tile_steps_skipped"] == m["tiles"]["tile_steps_total"]


def test_tiled_variants_are_finite_and_differ(tiny):
    base = tiny(PROMPT, height=128, width=192, num_inference_steps=3, progress=False, output_type="latent").frames
    assert torch.isfinite(base).all()
    variants = [
        TilingConfig(overlap=16, blend="cosine", shift="none"),
        TilingConfig(overlap=16, blend="uniform", tile_batch_size=4),
        TilingConfig(rope="absolute"),
        TilingConfig(upscale="latent"),
        TilingConfig(strength=0.5, sketch_steps=2),
    ]
    for tiling in variants:
        lat = tiny(PROMPT, height=128, width=192, num_inference_steps=3, tiling=tiling, progress=False,
                   output_type="latent").frames
        assert lat.shape == base.shape and torch.isfinite(lat).all()
        assert not torch.equal(lat, base), tiling


def test_tile_batching_does_not_change_the_result(tiny):
    kw = dict(height=128, width=192, num_inference_steps=3, progress=False, output_type="latent")
    one = tiny(PROMPT, tiling=TilingConfig(tile_batch_size=1), **kw).frames
    four = tiny(PROMPT, tiling=TilingConfig(tile_batch_size=4), **kw).frames
    torch.testing.assert_close(four, one, rtol=1e-4, atol=1e-5)


def test_absolute_rope_positions_change_only_moved_tiles(tiny):
    from supergen.backbones import TokenPositions

    x = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1, -1)
    rows = torch.arange(4).repeat(2, 1) + torch.tensor([[0], [4]])
    pos = TokenPositions(frames=torch.arange(3).repeat(2, 1), rows=rows, cols=torch.arange(6).repeat(2, 1))
    cond = tiny.adapter.encode_prompt(PROMPT, None, 5.0)
    t = torch.tensor(500.0)
    with torch.no_grad():
        local = tiny.adapter.predict(x, t, cond, 5.0)
        shifted = tiny.adapter.predict(x, t, cond, 5.0, positions=pos)
    # Tile 0 sits at the origin, so its absolute positions are the local ones; tile 1 moved down.
    torch.testing.assert_close(shifted[0], local[0])
    assert not torch.allclose(shifted[1], local[1])
    bad = TokenPositions(frames=pos.frames, rows=rows + 1000, cols=pos.cols)
    with pytest.raises(ValueError, match="outside the model's table"):
        tiny.adapter.predict(x, t, cond, 5.0, positions=bad)


def test_loads_a_saved_pipeline_folder_by_path(tiny, tmp_path):
    folder = tmp_path / "my-wan"
    tiny.pipe.save_pretrained(folder)
    write_native_size(folder, 64, 96, 9)
    loaded = SuperGenPipeline.from_pretrained(str(folder))
    assert (loaded.adapter.native_height, loaded.adapter.native_width) == (64, 96)
    a = _native(loaded)
    b = _native(tiny)
    np.testing.assert_array_equal(a, b)


def test_checkpoint_can_recommend_its_guidance_scale(tiny, tmp_path):
    folder = tmp_path / "my-wan"
    tiny.pipe.save_pretrained(folder)
    write_native_size(folder, 64, 96, 9, guidance_scale=2.5)
    loaded = SuperGenPipeline.from_pretrained(str(folder))
    assert tiny.default_guidance_scale == 5.0 and loaded.default_guidance_scale == 2.5
    assert tiny.default_stream_guidance_scale == 1.0 and loaded.default_stream_guidance_scale == 2.5
    kw = dict(height=64, width=96, num_inference_steps=2, tiling=TilingConfig(strength=1.0), progress=False)
    by_default = loaded(PROMPT, **kw).frames
    np.testing.assert_array_equal(by_default, loaded(PROMPT, guidance_scale=2.5, **kw).frames)
    assert not np.array_equal(by_default, loaded(PROMPT, guidance_scale=5.0, **kw).frames)
    with pytest.raises(ValueError, match="guidance_scale=-1.0 must be a finite number >= 0"):
        loaded(PROMPT, guidance_scale=-1.0, **kw)


BAD_REQUESTS = [
    (dict(height=100), "height 100 is not a multiple of 16"),
    (dict(width=200), "width 200 is not a multiple of 16"),
    (dict(height=48), "smaller than the model's native height"),
    (dict(num_frames=10), "num_frames 10 must be 4k\\+1"),
    (dict(height=64, tiling=TilingConfig(tile_height=80)), "tile_height 80 is larger than the canvas"),
    (dict(tiling=TilingConfig(tile_width=88)), "tile_width 88 is not a multiple of 16"),
    (dict(tiling=TilingConfig(overlap=70)), "overlap 10 latent cells is not smaller than the tile"),
]


@pytest.mark.parametrize("kwargs,match", BAD_REQUESTS)
def test_bad_requests_fail_before_model_work(tiny, kwargs, match):
    calls = []
    handle = tiny.pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            tiny(PROMPT, num_inference_steps=2, progress=False, **kwargs)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("kwargs,match", BAD_REQUESTS)
def test_bad_requests_fail_the_same_from_the_configs_alone(tiny, kwargs, match):
    """check_request_for (config files, no weights) and the loaded check say exactly the same."""
    from supergen.pipeline import check_request_for

    with pytest.raises(ValueError, match=match) as loaded:
        tiny.check_request(**kwargs)
    with pytest.raises(ValueError) as from_configs:
        check_request_for("tiny", **kwargs)
    assert str(from_configs.value) == str(loaded.value)


def test_good_requests_plan_the_same_from_the_configs_alone(tiny):
    from supergen.pipeline import check_request_for

    cases = (dict(), dict(height=128, width=96, num_frames=13), dict(tiling=TilingConfig(overlap=16, shift_stride=8)))
    for kwargs in cases:
        assert check_request_for("tiny", **kwargs) == tiny.check_request(**kwargs)
    # A checkpoint's supergen.json sets the native size here as it does when loading.
    assert check_request_for("tiny").height == 2 * tiny.adapter.native_height
    # A hub id cannot be checked without downloading it: the check after loading does it.
    assert check_request_for("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", height=100) is None


def test_unknown_models_and_folders_are_refused(tmp_path):
    from supergen.models import resolve_model

    with pytest.raises(ValueError, match="unknown model 'tiny-sora'"):
        resolve_model("tiny-sora")
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_model(str(tmp_path))
    assert resolve_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_unsupported_pipeline_lists_supported_ones(tiny):
    from supergen.backbones import adapter_for

    class NotAVideoPipeline:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="supported pipelines: .*WanPipeline"):
        adapter_for(NotAVideoPipeline())


def test_metrics_are_json_serialisable(tiny):
    out = tiny(PROMPT, height=128, width=192, num_inference_steps=2, progress=False)
    json.dumps(out.metrics)


def test_the_check_from_configs_imports_no_model_code():
    """Reading the configs stays cheap: neither Diffusers nor Transformers is imported for it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from supergen.pipeline import check_request_for\n"
        "check_request_for('tiny')\n"
        "try:\n"
        "    check_request_for('tiny', height=100)\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["height 100 is not a multiple of 16 (VAE 8 x patch 2); try 96", "[]"]


def test_generate_takes_a_generation_config(tiny):
    with pytest.raises(TypeError, match="config must be a GenerationConfig, got dict"):
        tiny.generate({"prompt": "a red circle"})
