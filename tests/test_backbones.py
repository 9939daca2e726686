"""One test matrix over every backbone adapter, on the tiny offline builds of the real Diffusers classes."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from supergen import SuperGenPipeline, TilingConfig
from supergen.backbones import ModelConfigs, adapter_for, spec_from_folder, supported_pipelines
from supergen.models import TINY_NATIVE_SIZES, read_native_size, resolve_model, tiny_model_path

PROMPT = "a red circle moving left over a blue sky"


@dataclass(frozen=True)
class Backbone:
    name: str
    pipeline_class: str
    #: WanPipeline runs the CFG branches one after the other; the others batch them (or have no CFG).
    batch_cfg: bool = True
    image_to_video: bool = False

    def inputs(self) -> dict:
        """Extra call arguments: the first frame for image-to-video pipelines."""
        return {"image": _first_frame()} if self.image_to_video else {}


def _first_frame():
    """A smooth colour ramp, the conditioning image of the image-to-video cases."""
    import PIL.Image

    rows, cols = np.mgrid[0:64, 0:96]
    return PIL.Image.fromarray(np.stack([cols * 2, rows * 3, rows + cols], -1).astype(np.uint8))


BACKBONES = [
    Backbone("tiny-wan", "WanPipeline", batch_cfg=False),
    Backbone("tiny-wan-i2v", "WanImageToVideoPipeline", batch_cfg=False, image_to_video=True),
    Backbone("tiny-cogvideox", "CogVideoXPipeline"),
    Backbone("tiny-cogvideox-i2v", "CogVideoXImageToVideoPipeline", image_to_video=True),
    Backbone("tiny-hunyuanvideo", "HunyuanVideoPipeline"),
    Backbone("tiny-ltx", "LTXPipeline"),
]


@pytest.fixture(scope="module", params=BACKBONES, ids=lambda b: b.name)
def backbone(request):
    case = request.param
    return case, SuperGenPipeline.from_pretrained(case.name)


def _plain(pipe, name, steps=4, **kw):
    height, width, frames = TINY_NATIVE_SIZES[name]
    return pipe(
        prompt=PROMPT,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).frames[0]


def _native(sg, name, steps=4, **kw):
    height, width, frames = TINY_NATIVE_SIZES[name]
    return sg(
        PROMPT,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=5.0,
        seed=0,
        tiling=TilingConfig(strength=1.0),
        output_type="float",
        progress=False,
        **kw,
    ).frames


def test_native_single_tile_equals_the_plain_diffusers_pipeline(backbone):
    case, sg = backbone
    assert type(sg.pipe).__name__ == case.pipeline_class
    assert (sg.adapter.native_height, sg.adapter.native_width, sg.adapter.native_num_frames) == TINY_NATIVE_SIZES[
        case.name
    ]
    reference = _plain(sg.pipe, case.name, **case.inputs())
    sg.adapter.batch_cfg = case.batch_cfg
    try:
        ours = _native(sg, case.name, **case.inputs())
    finally:
        sg.adapter.batch_cfg = True
    # One tile covering the canvas runs the same calls in the same order as the pipeline: bit for bit.
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)
    assert reference.std() > 0


def test_tiled_run_at_twice_the_area(backbone):
    case, sg = backbone
    height, width, frames = TINY_NATIVE_SIZES[case.name]
    # Latent up-scaling keeps the run short; the pixel path (decode, resize, re-encode) is
    # covered on Wan by test_pipeline.py and uses the same adapter decode/encode as below.
    out = sg(PROMPT, height=2 * height, width=2 * width, num_inference_steps=2, progress=False,
             tiling=TilingConfig(upscale="latent"), output_type="float", **case.inputs())
    assert out.frames.shape == (frames, 2 * height, 2 * width, 3)
    assert np.isfinite(out.frames).all() and out.frames.std() > 0
    tiles = out.metrics["tiles"]
    assert tiles["count"] == 4 and tiles["grid"] == [1, 2, 2]
    assert tiles["tile_latent"] == list(sg.adapter.native_latent_shape)
    assert tiles["tile_steps_computed"] == 4 * 2


def test_region_cache_skips_tiles_on_every_backbone(backbone):
    from supergen import CacheConfig

    case, sg = backbone
    height, width, _ = TINY_NATIVE_SIZES[case.name]
    kw = dict(height=2 * height, width=2 * width, num_inference_steps=10, progress=False, output_type="latent",
              tiling=TilingConfig(upscale="latent"), **case.inputs())
    plain = sg(PROMPT, **kw)
    # A loose threshold on the tiny random models: the point here is that the cache plugs into every
    # adapter (block reuse where supported, output reuse elsewhere), not its quality (tests/test_cache.py).
    cached = sg(PROMPT, cache=CacheConfig(mode="region", threshold=1.0, warmup=2, max_skips=2), **kw)
    tiles = cached.metrics["tiles"]
    assert tiles["tile_steps_skipped"] > 0
    assert tiles["tile_steps_computed"] + tiles["tile_steps_skipped"] == tiles["tile_steps_total"]
    assert torch.isfinite(cached.frames).all()
    assert not torch.equal(cached.frames, plain.frames)


def test_two_processes_match_one_on_every_backbone(tmp_path):
    """Tile parallelism is model-agnostic: 2 gloo ranks give one process's latents for each backbone."""
    from test_parallel import _launch

    names = [case.name for case in BACKBONES if case.name != "tiny-wan"]  # Wan: tests/test_parallel.py
    codes, errs, _ = _launch("backbones", 2, tmp_path, timeout=600)
    assert codes == [0, 0], "\n".join(errs)
    for case in BACKBONES:
        if case.name not in names:
            continue
        sg = SuperGenPipeline.from_pretrained(case.name)
        height, width, _ = TINY_NATIVE_SIZES[case.name]
        ref = sg(PROMPT, height=2 * height, width=2 * width, num_inference_steps=2, progress=False,
                 output_type="latent", tiling=TilingConfig(upscale="latent"), **case.inputs()).frames
        # Same tolerance and reason as tests/test_parallel.py: only the float32 summation order of
        # overlapping tile outputs differs between the region scheme and one process.
        np.testing.assert_allclose(np.load(tmp_path / f"{case.name}.npy"), ref.numpy(), rtol=0, atol=1e-5)


def test_absolute_rope_where_supported(backbone):
    case, sg = backbone
    if case.image_to_video and sg.adapter.supports_absolute_rope:
        pytest.skip("same RoPE path as the text-to-video case of this adapter; the image condition is tested below")
    height, width, _ = TINY_NATIVE_SIZES[case.name]
    request = dict(height=2 * height, width=2 * width, num_inference_steps=2, progress=False, output_type="latent")
    if not sg.adapter.supports_absolute_rope:
        with pytest.raises(ValueError, match="rope='absolute' is not available for " + case.pipeline_class):
            sg(PROMPT, tiling=TilingConfig(rope="absolute"), **request, **case.inputs())
        return
    local = sg(PROMPT, tiling=TilingConfig(strength=1.0), **request, **case.inputs()).frames
    absolute = sg(PROMPT, tiling=TilingConfig(strength=1.0, rope="absolute"), **request, **case.inputs()).frames
    f, h, w = sg.adapter.native_latent_shape
    assert absolute.shape == (1, sg.adapter.geometry.channels, f, 2 * h, 2 * w)
    assert torch.isfinite(absolute).all()
    # Tiles away from the origin now see other positions, so the result moves.
    assert not torch.equal(local, absolute)


def test_tile_positions_move_only_tiles_away_from_the_origin(backbone):
    case, sg = backbone
    adapter = sg.adapter
    if not adapter.supports_absolute_rope or case.image_to_video:
        pytest.skip("no RoPE offsets for this adapter" if not adapter.supports_absolute_rope else "same path as T2V")
    from supergen.backbones import TokenPositions

    f, h, w = adapter.native_latent_shape
    nf, nh, nw = adapter.token_grid((f, h, w))
    x = torch.randn(1, adapter.geometry.channels, f, h, w, generator=torch.Generator().manual_seed(0)).expand(
        2, -1, -1, -1, -1
    )
    # Tile 0 at the canvas origin, tile 1 one tile further down.
    rows = torch.arange(nh).repeat(2, 1) + torch.tensor([[0], [nh]])
    positions = TokenPositions(frames=torch.arange(nf).repeat(2, 1), rows=rows, cols=torch.arange(nw).repeat(2, 1))
    cond = adapter.encode_prompt(PROMPT, None, 5.0)
    t = torch.tensor(500.0)
    with torch.no_grad():
        local = adapter.predict(x, t, cond, 5.0)
        moved = adapter.predict(x, t, cond, 5.0, positions=positions)
    # The origin tile's positions are the local ones: equal up to float32 rounding of a
    # different batch size (HunyuanVideo runs tiles with positions one per call). The tiny
    # random models attend almost uniformly, so the moved tile changes little, but by far
    # more than that rounding.
    origin_change = (moved[0] - local[0]).abs().max()
    moved_change = (moved[1] - local[1]).abs().max()
    assert origin_change <= 1e-5
    assert moved_change > 0 and moved_change > 10 * origin_change


def test_checkpoint_missing_a_needed_field_is_named(backbone, tmp_path):
    case, _ = backbone
    folder = tmp_path / case.name
    shutil.copytree(tiny_model_path(case.name), folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    del config["patch_size"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="transformer config has no 'patch_size'"):
        SuperGenPipeline.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="transformer config has no 'patch_size'"):
        spec_from_folder(folder)  # the pre-load check fails the same way


@pytest.mark.parametrize("name", [case.name for case in BACKBONES] + ["toy"])
def test_config_files_give_the_loaded_adapters_geometry_and_native_size(name):
    """The pre-load check sees exactly the model the loaded adapter sees, from the JSON files alone."""
    folder = resolve_model(name)
    from_configs = spec_from_folder(folder, native_size=read_native_size(folder))
    sg = SuperGenPipeline.from_pretrained(name)
    assert from_configs == sg.adapter.spec
    assert from_configs.geometry == sg.adapter.geometry
    assert from_configs.native_size == (sg.adapter.native_height, sg.adapter.native_width, sg.adapter.native_num_frames)
    assert from_configs.supports_absolute_rope == sg.adapter.supports_absolute_rope
    # The same factors the Diffusers pipeline's __init__ computes from the loaded VAE and transformer.
    pipe, geo = sg.pipe, from_configs.geometry
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_spatial_compression_ratio
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or pipe.vae_temporal_compression_ratio
    assert (geo.scale_spatial, geo.scale_temporal) == (spatial, temporal)
    # Without supergen.json the adapter's own default applies, loaded or not.
    assert spec_from_folder(folder).native_size == type(sg.adapter).native_size_from_config(ModelConfigs.of(pipe), geo)


def test_config_fields_left_out_take_the_diffusers_defaults(tmp_path):
    """A config.json without an optional field reads as Diffusers fills it when loading."""
    folder = tmp_path / "ltx"
    shutil.copytree(tiny_model_path("tiny-ltx"), folder)
    config_path = folder / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    for name in ("spatial_compression_ratio", "temporal_compression_ratio", "patch_size_t"):
        config.pop(name, None)
    config_path.write_text(json.dumps(config))
    loaded = SuperGenPipeline.from_pretrained(str(folder)).adapter.spec
    assert spec_from_folder(folder, read_native_size(folder)) == loaded


def test_unsupported_transformer_in_a_folder_is_refused_before_loading(tmp_path):
    folder = tmp_path / "flux"
    shutil.copytree(tiny_model_path("tiny-wan"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        spec_from_folder(folder)
    message = str(err.value)
    assert "no SuperGen adapter for FluxPipeline (transformer FluxTransformer2DModel)" in message
    for case in BACKBONES:
        assert case.pipeline_class in message


def test_unsupported_pipeline_lists_every_supported_class():
    class NotAVideoPipeline:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError) as err:
        adapter_for(NotAVideoPipeline())
    for case in BACKBONES:
        assert case.pipeline_class in str(err.value)
    assert {case.pipeline_class for case in BACKBONES} <= set(supported_pipelines())


def test_cogvideox_dpm_scheduler_matches_the_plain_pipeline():
    """CogVideoX-5B ships a DPM scheduler whose step needs the previous x0 and timestep."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline

    base = SuperGenPipeline.from_pretrained("tiny-cogvideox").pipe
    scheduler = CogVideoXDPMScheduler.from_config(base.scheduler.config)
    pipe = CogVideoXPipeline(**{**base.components, "scheduler": scheduler})
    sg = SuperGenPipeline.from_pipe(pipe, native_size=TINY_NATIVE_SIZES["tiny-cogvideox"])
    np.testing.assert_array_equal(_native(sg, "tiny-cogvideox"), _plain(pipe, "tiny-cogvideox"))


def test_cli_selects_a_built_in_backbone(tmp_path):
    out = tmp_path / "ltx.mp4"
    res = subprocess.run(
        [sys.executable, "-m", "supergen", "generate", "--model", "tiny-ltx", "--prompt", PROMPT, "--steps", "2",
         "--output", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert res.returncode == 0, res.stderr
    assert "LTXAdapter(LTXPipeline" in res.stderr + res.stdout
    height, width, frames = TINY_NATIVE_SIZES["tiny-ltx"]
    assert iio.imread(out).shape == (frames, 2 * height, 2 * width, 3)


def test_image_is_required_exactly_by_image_to_video_pipelines(backbone):
    case, sg = backbone
    calls = []
    handle = sg.pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        if case.image_to_video:
            with pytest.raises(ValueError, match="is image-to-video: pass image="):
                sg(PROMPT, num_inference_steps=2, progress=False)
        else:
            with pytest.raises(ValueError, match="is not an image-to-video pipeline"):
                sg(PROMPT, num_inference_steps=2, progress=False, image=_first_frame())
    finally:
        handle.remove()
    assert not calls


def test_image_condition_is_upscaled_with_the_video_and_cropped_like_each_tile():
    sg = SuperGenPipeline.from_pretrained("tiny-cogvideox-i2v")
    adapter = sg.adapter
    canvases, calls = [], []
    encode_image, predict = adapter.encode_image, adapter.predict

    def recording_encode_image(*args, **kwargs):
        canvases.append(encode_image(*args, **kwargs))
        return canvases[-1]

    def recording_predict(latents, *args, condition=None, **kwargs):
        calls.append((latents, condition))
        return predict(latents, *args, condition=condition, **kwargs)

    adapter.encode_image, adapter.predict = recording_encode_image, recording_predict
    try:
        sg(PROMPT, height=128, width=192, num_inference_steps=2, progress=False, output_type="latent",
           tiling=TilingConfig(upscale="latent"), image=_first_frame())
    finally:
        del adapter.encode_image, adapter.predict
    # One condition per stage, each at its stage's latent size: the sketch, then the 2x canvas.
    sketch, target = canvases
    assert sketch.shape[2:] == adapter.native_latent_shape
    assert target.shape[2:] == (3, 16, 24)
    assert torch.count_nonzero(target[:, :, 0]) > 0 and torch.count_nonzero(target[:, :, 1:]) == 0
    # Refinement (2 steps x 4 tiles, the grid shifted with wrap-around every step): every
    # tile's condition is exactly its own crop of the target canvas.
    planner = sg.plan(height=128, width=192)
    refine = calls[-8:]
    tiles = [tile for step in range(2) for tile in planner.plan(step).tiles]
    assert any(tile.wraps for tile in tiles)
    for (latents, condition), tile in zip(refine, tiles):
        assert condition.shape[2:] == latents.shape[2:]
        torch.testing.assert_close(condition, tile.gather(target), rtol=0, atol=0)


def test_cli_image_flag_is_checked(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "supergen", "generate", "--prompt", PROMPT, "--image", str(tmp_path / "none.png"),
         "--output", str(tmp_path / "a.mp4")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    picture = tmp_path / "first.png"
    _first_frame().save(picture)
    text_only = subprocess.run(
        [sys.executable, "-m", "supergen", "generate", "--model", "tiny", "--prompt", PROMPT, "--image", str(picture),
         "--steps", "2", "--output", str(tmp_path / "b.mp4")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert text_only.returncode == 2 and "is not an image-to-video pipeline" in text_only.stderr
    assert not (tmp_path / "b.mp4").exists()


@pytest.mark.parametrize(
    "name,pipeline_class,latent,tokens,billions",
    [
        ("wan2.1-1.3b", "WanPipeline", (21, 60, 104), 32760, 1.42),
        ("cogvideox-5b", "CogVideoXPipeline", (13, 60, 90), 17550, 5.57),
        ("hunyuanvideo", "HunyuanVideoPipeline", (33, 90, 160), 118800, 12.82),
        ("ltx-video", "LTXPipeline", (21, 16, 22), 7392, 1.92),
    ],
)
def test_real_size_configurations_match_the_released_models(name, pipeline_class, latent, tokens, billions):
    """The benchmark builders (on the meta device: shapes only) have the released sizes the README lists."""
    from supergen.models import REAL_CONFIGS, build_random_pipeline

    pipe = build_random_pipeline(name, device="meta")
    adapter = adapter_for(pipe, native_size=REAL_CONFIGS[name]["native"])
    assert type(pipe).__name__ == pipeline_class
    assert adapter.native_latent_shape == latent
    assert adapter.tokens(latent) == tokens
    assert round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 2) == billions


def test_random_pipeline_overrides_and_released_vae():
    """The GPU check's builds: a smaller transformer through the same path, and Wan2.1's VAE at its real size."""
    from supergen.models import build_random_pipeline

    pipe = build_random_pipeline("wan2.1-1.3b", device="meta", transformer_overrides=dict(num_layers=2),
                                 released_vae=True)
    assert len(pipe.transformer.blocks) == 2 and pipe.transformer.config.num_attention_heads == 12
    # AutoencoderKLWan's defaults are the released Wan2.1 VAE: 127M parameters (the stand-in has well under 1M).
    assert round(sum(p.numel() for p in pipe.vae.parameters()) / 1e6) == 127
    assert sum(p.numel() for p in build_random_pipeline("wan2.1-1.3b", device="meta").vae.parameters()) < 1e6
    with pytest.raises(ValueError, match="released_vae is only available for the Wan configurations"):
        build_random_pipeline("cogvideox-5b", device="meta", released_vae=True)


def _pipeline_state(pipe) -> dict:
    """Every component's modules, their hooks (torch and Diffusers), wrapped forwards and attention processors."""
    from supergen.backbones.hooks import state_of

    return {name: state_of(module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def test_a_pipeline_is_left_as_it_was_after_every_call(backbone):
    from supergen import CacheConfig

    case, sg = backbone
    pipe = sg.pipe
    # Transformers puts its own output-capture hooks on an encoder's layers at its first use, for good.
    with torch.no_grad():
        sg.adapter.encode_prompt(PROMPT, None, 5.0)
        if getattr(pipe, "image_encoder", None) is not None:
            pipe.encode_image(_first_frame())
    before = _pipeline_state(pipe)
    # Wrapped twice: the two adapters' hooks must neither pile up nor outlive a call.
    native = TINY_NATIVE_SIZES[case.name]
    first, second = (SuperGenPipeline.from_pipe(pipe, native_size=native) for _ in range(2))
    assert _pipeline_state(pipe) == before
    height, width, _ = TINY_NATIVE_SIZES[case.name]
    kw = dict(height=height, width=2 * width, num_inference_steps=3, progress=False, output_type="latent",
              tiling=TilingConfig(upscale="latent"), **case.inputs())
    seen = []
    for sg_ in (first, second):
        names = sg_.adapter.hooks.names
        probe = pipe.transformer.register_forward_pre_hook(
            lambda module, args: seen.append(tuple(getattr(module, "_diffusers_hook", None) and
                                                   module._diffusers_hook._hook_order or ())))
        try:
            sg_(PROMPT, cache=CacheConfig(mode="region", threshold=1.0, warmup=1, max_skips=1), **kw)
        finally:
            probe.remove()
        assert _pipeline_state(pipe) == before
        assert all(name.startswith("supergen.") for name in names)
    if case.name == "tiny-wan":
        # Attached during the call (named), gone after; a stream's processors and hooks are put back too.
        assert first.adapter.hooks.names and not first.adapter.hooks.is_attached
        with first.stream(PROMPT, num_blocks=2, height=height, width=width) as stream:
            list(stream)
        assert _pipeline_state(pipe) == before
    assert seen  # the probe ran: the transformer was called with the hooks attached


def test_per_backbone_facts_live_in_one_profile():
    """Native sizes come from the adapters' profiles for the loaded model and the real-size configurations alike."""
    from supergen.backbones import CogVideoXAdapter, HunyuanVideoAdapter, LTXAdapter, WanAdapter
    from supergen.models import REAL_CONFIGS

    owners = {"wan2.1-1.3b": WanAdapter, "cogvideox-5b": CogVideoXAdapter, "hunyuanvideo": HunyuanVideoAdapter,
              "ltx-video": LTXAdapter}
    for name, adapter in owners.items():
        assert REAL_CONFIGS[name]["native"] == adapter.profile.native_sizes[name]
    assert HunyuanVideoAdapter.profile.guidance == "embedded" and WanAdapter.profile.guidance == "cfg"
    assert [a.profile.max_sequence_length for a in (WanAdapter, CogVideoXAdapter, HunyuanVideoAdapter, LTXAdapter)] \
        == [512, 226, 256, 128]  # the Diffusers pipelines' own defaults
