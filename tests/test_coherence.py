"""Global coherence of the tiled path: the math, its no-op cases, bad values, and one measured toy-model bound."""

import math

import numpy as np
import pytest
import torch

from supergen import CoherenceConfig, SuperGenPipeline, TilingConfig
from supergen.samplers.coherence import CoherenceGuide
from supergen.samplers.schedule import renoise
from supergen.tiling.coherence import DilatedViews, Lowpass, cosine_decay

PROMPT = "a red circle moving left over a blue sky"


def test_cosine_decay_runs_from_one_to_zero_and_falls_faster_with_the_exponent():
    assert cosine_decay(0.0, 3.0) == 1.0 and cosine_decay(1.0, 3.0) == pytest.approx(0.0, abs=1e-30)
    values = [cosine_decay(p / 10, 1.0) for p in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert cosine_decay(0.5, 1.0) == pytest.approx(0.5)
    assert cosine_decay(0.5, 3.0) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="progress"):
        cosine_decay(1.5, 1.0)


def lowpass(x, size_HW):
    return Lowpass(x.shape[-2:], size_HW)(x)


@pytest.mark.parametrize("canvas, size", [((48, 48), (16, 16)), ((30, 46), (12, 20))])
def test_lowpass_is_torch_area_pooling_then_bilinear_and_assembles_from_parts(canvas, size):
    import torch.nn.functional as F

    x = torch.randn(1, 4, 3, *canvas, generator=torch.Generator().manual_seed(6))
    frames = x.permute(0, 2, 1, 3, 4).reshape(3, 4, *canvas)
    ref = F.interpolate(F.adaptive_avg_pool2d(frames, size), size=canvas, mode="bilinear", align_corners=False)
    ref = ref.reshape(1, 3, 4, *canvas).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(lowpass(x, size), ref, atol=1e-5, rtol=0)
    # Three parts' pooled sums add up to the whole canvas's, and any part expands from them.
    op = Lowpass(canvas, size)
    h, w = canvas[0] // 2, canvas[1] // 3
    parts = [(slice(0, h), slice(0, w)), (slice(0, h), slice(w, None)), (slice(h, None), slice(None))]
    pooled = sum(op.pooled(x[..., r, c], r, c) for r, c in parts)
    torch.testing.assert_close(op.expand(pooled, slice(h, None), slice(None)).float(), ref[..., h:, :], atol=1e-5, rtol=0)


def test_lowpass_keeps_the_sketch_band_and_drops_what_it_cannot_hold():
    x = torch.randn(1, 4, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lowpass(x, (32, 48)), x)  # its own size: identity
    constant = torch.full((1, 2, 2, 16, 16), 0.7)
    torch.testing.assert_close(lowpass(constant, (8, 8)), constant)
    # The finest checkerboard is above what a half-size canvas holds: it averages away.
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1).float().expand(1, 1, 2, 16, 16)
    assert lowpass(checker, (8, 8)).abs().max() < 1e-6
    # Linear, which the guide relies on (it filters the difference once).
    y = torch.randn_like(x)
    torch.testing.assert_close(lowpass(2 * x - y, (16, 24)), 2 * lowpass(x, (16, 24)) - lowpass(y, (16, 24)))


@pytest.mark.parametrize("canvas, views, size", [
    ((5, 32, 32), 4, (16, 16)),   # 2x2 strided views of native size
    ((5, 48, 48), 9, (16, 16)),   # 3x3
    ((5, 24, 24), 4, (12, 12)),   # 1.5x: views below the native size
    ((5, 30, 30), 4, (16, 16)),   # ceil(30 / 2) = 15 rounded up to the patch: two cells shared, wrapped
    ((5, 16, 16), 1, (16, 16)),   # the native canvas is its own single view
])
def test_dilated_views_cover_every_cell_and_scatter_back_exactly(canvas, views, size):
    dv = DilatedViews(canvas, (16, 16), (2, 2))
    assert len(dv) == views and dv.view_size == size
    assert all(n % 2 == 0 for n in dv.view_size)
    x = torch.randn(1, 3, *canvas, generator=torch.Generator().manual_seed(1))
    parts = dv.gather(x)
    assert all(p.shape == (1, 3, canvas[0], *size) for p in parts)
    assert torch.equal(dv.scatter(parts), x)
    # Each view spans the whole canvas: view 0 starts at cell 0 and reaches the far end within one stride.
    rows, cols = dv.views[0]
    assert rows[0] == 0 and rows.max() >= canvas[1] - dv.strides[0]
    if len(dv) == 4 and canvas[1] % 2 == 0 and canvas[1] // 2 == size[0]:
        # An exact partition: the views are disjoint.
        cells = torch.cat([(r[:, None] * canvas[2] + c[None, :]).flatten() for r, c in dv.views])
        assert cells.numel() == canvas[1] * canvas[2] == cells.unique().numel()


def _guide(guide, steps=10, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    noiser = FlowMatchEulerDiscreteScheduler(shift=3.0)
    noiser.set_timesteps(steps)
    gen = torch.Generator().manual_seed(2)
    sketch, noise = torch.randn(1, 4, 3, 16, 16, generator=gen), torch.randn(1, 4, 3, 16, 16, generator=gen)
    return CoherenceGuide(steps, guide=guide, sketch=sketch, noise=noise, noiser=noiser, lowpass_HW=(8, 8), **kw), noiser


def test_skip_guide_at_full_weight_is_the_noised_sketch_and_fades_to_nothing():
    guide, noiser = _guide("skip", guide_exponent=3.0)
    latents = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t0 = noiser.timesteps[0]
    torch.testing.assert_close(guide.guide_latents(0, t0, latents), renoise(noiser, guide.sketch, guide.noise, t0))
    weights = [guide.guide_weight(k) for k in range(10)]
    assert weights[0] == 1.0 and all(a > b for a, b in zip(weights, weights[1:])) and weights[-1] < 0.01


def test_lowpass_guide_pulls_the_low_band_and_leaves_fine_detail():
    guide, noiser = _guide("lowpass", guide_exponent=1.0)
    latents = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = noiser.timesteps[3]
    target = renoise(noiser, guide.sketch, guide.noise, t)
    out = guide.guide_latents(3, t, latents)
    pool = torch.nn.functional.avg_pool3d
    # The sketch's band moves towards the noised sketch...
    before = (pool(latents, (1, 2, 2)) - pool(target, (1, 2, 2))).abs().mean()
    after = (pool(out, (1, 2, 2)) - pool(target, (1, 2, 2))).abs().mean()
    assert after < (1 - 0.5 * guide.guide_weight(3)) * before
    # ...by a smooth field: the change has far less cell-to-cell variation than the full pull would.
    def roughness(x):
        return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()

    full = guide.guide_weight(3) * (target - latents)
    assert roughness(out - latents) < 0.35 * roughness(full)


def test_views_weight_stops_at_view_until():
    views = DilatedViews((3, 32, 32), (16, 16), (2, 2))
    guide = CoherenceGuide(10, views=views, view_exponent=1.0, view_until=0.5)
    assert guide.active and guide.view_weight(0) == 1.0
    assert guide.view_weight(4) > 0 and guide.view_weight(5) == 0.0 and guide.view_weight(9) == 0.0
    assert "4 dilated views of 16x16" in guide.describe()
    assert not CoherenceGuide(10).active


@pytest.mark.parametrize("kwargs, field", [
    (dict(guide="sharp"), "guide"),
    (dict(views="strided"), "views"),
    (dict(guide_exponent=0), "guide_exponent"),
    (dict(guide_exponent=math.nan), "guide_exponent"),
    (dict(view_exponent=-1.0), "view_exponent"),
    (dict(view_until=0.0), "view_until"),
    (dict(view_until=1.5), "view_until"),
    (dict(view_until=True), "view_until"),
])
def test_bad_coherence_values_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CoherenceConfig(**kwargs)


def test_guide_needs_its_inputs():
    with pytest.raises(ValueError, match="sketch"):
        CoherenceGuide(4, guide="skip")
    with pytest.raises(ValueError, match="not one of"):
        CoherenceGuide(4, guide="sharp")


def test_native_size_request_is_one_plain_pass(tiny):
    """At the native size the default request (strength 0.9) runs the plain pipeline's work once."""
    kw = dict(height=64, width=96, num_inference_steps=3, progress=False, output_type="latent", seed=0)
    default = tiny(PROMPT, **kw)
    plain = tiny(PROMPT, tiling=TilingConfig(strength=1.0), coherence=CoherenceConfig(guide="none"), **kw)
    assert torch.equal(default.frames, plain.frames)
    assert default.metrics["tiles"]["tile_steps_total"] == 3 and default.metrics["sketch_s"] == 0.0


def test_coherence_changes_a_tiled_run_and_off_restores_plain_tiling(tiny):
    kw = dict(height=128, width=192, num_inference_steps=3, progress=False, output_type="latent", seed=0)
    off = tiny(PROMPT, coherence=CoherenceConfig(guide="none"), **kw)
    guided = tiny(PROMPT, coherence=CoherenceConfig(guide="lowpass"), **kw)
    viewed = tiny(PROMPT, coherence=CoherenceConfig(guide="none", views="dilated", view_until=1.0), **kw)
    assert not torch.equal(off.frames, guided.frames) and not torch.equal(off.frames, viewed.frames)
    assert off.metrics["tiles"]["view_forwards"] == 0
    # 2x2 views on all 3 refinement steps, one forward each.
    assert viewed.metrics["tiles"]["view_forwards"] == 4 * 3


@pytest.mark.slow
def test_default_tiled_run_on_toy_draws_fewer_objects_than_wave_1_defaults():
    """Measured bound: wave 1's defaults (strength 0.9, no coherence) drew one shape per tile at 64x64."""
    from supergen.metrics import object_counts
    from supergen.toyworld import all_prompts

    toy = SuperGenPipeline.from_pretrained("toy", device="cpu")
    prompts = all_prompts()[::12][:4]
    kw = dict(height=64, width=64, num_inference_steps=12, progress=False)
    old = [object_counts(toy(p, seed=i, tiling=TilingConfig(strength=0.9), coherence=CoherenceConfig(guide="none"),
                             **kw).frames) for i, p in enumerate(prompts)]
    new = [object_counts(toy(p, seed=i, **kw).frames) for i, p in enumerate(prompts)]
    old_one, new_one = np.mean([(c == 1).mean() for c in old]), np.mean([(c == 1).mean() for c in new])
    assert np.mean(np.concatenate(new)) < np.mean(np.concatenate(old)) - 0.3
    assert new_one >= old_one + 0.3 and new_one >= 0.75, (old_one, new_one)


@pytest.mark.parametrize("kind", ["flow", "epsilon", "v_prediction"])
def test_x0_guide_moves_the_implied_clean_canvas_by_the_sketch_low_band(kind):
    """The rewritten prediction implies exactly ``x0 + w * lowpass(sketch - x0)``, with x0 read as the scheduler reads it."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    gen = torch.Generator().manual_seed(5)
    sketch, noise, x_t, pred = (torch.randn(1, 4, 3, 16, 16, generator=gen) for _ in range(4))
    if kind == "flow":
        noiser = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        noiser = DDIMScheduler(prediction_type=kind, clip_sample=False)  # no clamp: compare the raw x0
    noiser.set_timesteps(10)
    guide = CoherenceGuide(10, guide="x0", sketch=sketch, noise=noise, noiser=noiser, lowpass_HW=(8, 8),
                           guide_exponent=1.0)
    step, t = 2, noiser.timesteps[2]

    def clean(prediction):
        if kind == "flow":
            return x_t - noiser.sigmas[step] * prediction
        stepper = DDIMScheduler.from_config(noiser.config)
        stepper.set_timesteps(10)
        return stepper.step(prediction, t, x_t).pred_original_sample

    x0 = clean(pred)
    guided = guide.guide_prediction(step, t, x_t, pred)
    expected = x0 + guide.guide_weight(step) * lowpass(sketch - x0, (8, 8))
    torch.testing.assert_close(clean(guided), expected, atol=1e-4, rtol=1e-4)
    # The latent-space guides leave the prediction alone, and this one leaves the latents alone.
    assert torch.equal(guide.guide_latents(step, t, x_t), x_t)


def test_x0_guide_refuses_an_unknown_parameterisation_up_front():
    from diffusers import DDIMScheduler

    noiser = DDIMScheduler(prediction_type="sample")
    noiser.set_timesteps(4)
    x = torch.zeros(1, 4, 1, 8, 8)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        CoherenceGuide(4, guide="x0", sketch=x, noise=x, noiser=noiser, lowpass_HW=(4, 4))
