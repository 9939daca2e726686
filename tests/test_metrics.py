"""Metrics and the procedural world on constructed inputs (no model)."""

import math

import numpy as np
import pytest

from supergen.metrics import adherence, mean_adherence, object_counts, psnr, seam_score, ssim, temporal_flicker
from supergen.toyworld import COLOURS, ClipParams, all_prompts, parse_prompt, render_batch, render_clip


@pytest.fixture(scope="module")
def clips():
    return render_batch(seed=11, count=24, height=32, width=32, num_frames=9)


def test_prompt_round_trip_and_vocabulary():
    params = ClipParams(shape="triangle", colour="purple", direction="up", background="dark night")
    assert params.prompt == "a purple triangle moving up over a dark night"
    facts = parse_prompt(params.prompt)
    assert (facts.colour, facts.shape, facts.direction, facts.background) == ("purple", "triangle", "up", "dark night")
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 4 * 3 * 4 * 3
    assert "a red circle moving left over a blue sky" in prompts


@pytest.mark.parametrize("text", ["a fox running through snow", "a green circle moving left over a blue sky", ""])
def test_parse_prompt_rejects_other_text(text):
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt(text)


def test_clip_params_validated():
    with pytest.raises(ValueError, match="ClipParams.shape='hexagon'"):
        ClipParams(shape="hexagon", colour="red", direction="left", background="blue sky")
    with pytest.raises(ValueError, match="ClipParams.radius"):
        ClipParams(shape="circle", colour="red", direction="left", background="blue sky", radius=0.0)


def test_render_is_deterministic_and_moves(clips):
    again = render_batch(seed=11, count=24, height=32, width=32, num_frames=9)
    np.testing.assert_array_equal(clips[0], again[0])
    assert clips[1] == again[1]
    assert clips[0].shape == (24, 9, 32, 32, 3) and clips[0].dtype == np.uint8
    assert not np.array_equal(clips[0][:, 0], clips[0][:, -1])


def test_identical_videos_give_infinite_psnr_and_unit_ssim(clips):
    video = clips[0][0]
    assert psnr(video, video.copy()) == math.inf
    assert ssim(video, video.copy()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_ssim_fall_with_noise(clips):
    video = clips[0][0].astype(np.float64)
    rng = np.random.default_rng(0)
    light = np.clip(video + rng.normal(0, 2, video.shape), 0, 255)
    heavy = np.clip(video + rng.normal(0, 20, video.shape), 0, 255)
    # Gaussian noise of std s gives PSNR close to 20 log10(255 / s) (clipping removes a little).
    assert psnr(light, video) == pytest.approx(20 * math.log10(255 / 2), abs=0.3)
    assert psnr(heavy, video) < psnr(light, video) - 15
    assert 1.0 > ssim(light, video) > ssim(heavy, video)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(video, video[:, :16])


def test_artificial_seam_scores_worse(clips):
    video = clips[0][0].astype(np.float64)
    seamed = video.copy()
    # A tile that came out 25 levels brighter than its neighbour: a step at column 16.
    seamed[:, :, 16:] = np.clip(seamed[:, :, 16:] + 25, 0, 255)
    clean_score = seam_score(video, cols=[16])
    seamed_score = seam_score(seamed, cols=[16])
    # The clean procedural frame has no special structure at column 16 (measured ~1).
    assert 0.5 < clean_score < 1.6
    assert seamed_score > 3 * clean_score
    # The same seam measured at a column where there is none does not show up.
    assert seam_score(seamed, cols=[8]) < 1.6
    with pytest.raises(ValueError, match="at least one boundary"):
        seam_score(video, rows=[0, 32], cols=[])


def test_temporal_flicker():
    static = np.full((5, 8, 8, 3), 100, dtype=np.uint8)
    assert temporal_flicker(static) == 0.0
    flicker = static.copy()
    flicker[1::2] += 51
    assert temporal_flicker(flicker) == pytest.approx(51 / 255)


def test_adherence_on_ground_truth(clips):
    videos, prompts = clips
    assert mean_adherence(videos, prompts) == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "score": 1.0}
    # At a larger size (as a tiled run outputs) the detector still reads the truth.
    big, big_prompts = render_batch(seed=5, count=8, height=56, width=56, num_frames=9)
    assert mean_adherence(big, big_prompts)["score"] == 1.0


def _gaussian_blur(videos: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of (N, F, H, W, 3) videos, edges replicated."""
    radius = int(math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = videos.astype(np.float64)
    for axis in (2, 3):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        out = sum(w * np.take(padded, range(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return out


def test_shape_detector_survives_decoder_blur():
    # A small decoder blurs edges by about a pixel; a blurred triangle loses its
    # tips, and a bounding-box fill ratio (the first detector) then called 30% of
    # these clips circles. Template matching must still read them.
    videos, prompts = render_batch(seed=21, count=48, height=32, width=32, num_frames=9)
    for sigma, floor in ((0.8, 0.95), (1.2, 0.9)):
        scores = mean_adherence(_gaussian_blur(videos, sigma), prompts)
        assert scores["shape"] >= floor, (sigma, scores)
        assert scores["colour"] == 1.0 and scores["direction"] == 1.0, (sigma, scores)


def test_adherence_notices_wrong_facts():
    params = ClipParams(shape="circle", colour="red", direction="left", background="blue sky", start_x=0.75)
    video = render_clip(params, 32, 32, 9)
    result = adherence(video, "a yellow square moving right over a blue sky")
    assert (result.colour, result.shape, result.direction) == ("red", "circle", "left")
    assert not (result.colour_ok or result.shape_ok or result.direction_ok) and result.score == 0.0
    noise = np.random.default_rng(0).integers(0, 256, size=(9, 32, 32, 3))
    assert adherence(noise, params.prompt).score == 0.0
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        adherence(video, "a cat")


def test_object_counts_one_per_ground_truth_frame_and_counts_duplicates():
    clips, _ = render_batch(3, 6, 64, 64, 9)
    for clip in clips:
        assert object_counts(clip).tolist() == [1] * 9
    # Two clips side by side: two shapes (of any colours) in every frame.
    left, right = render_batch(4, 2, 64, 64, 9)[0]
    both = np.concatenate([left[:, :, :32], right[:, :, 32:]], axis=2)
    assert object_counts(both).tolist() == [2] * 9
    # A speck below the minimum area is not an object.
    specks = left.copy()
    specks[:, 0:2, 0:2] = COLOURS["yellow"]
    assert object_counts(specks).tolist() == object_counts(left).tolist()


def test_seam_score_docstring_example_runs():
    import doctest

    from supergen import metrics

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(metrics.seam_score, "seam_score", globs={"seam_score": metrics.seam_score}):
        runner.run(test)
    assert runner.tries == 6 and runner.failures == 0
