"""Tile geometry: weights sum to one, every cell covered, point-wise models blend exactly."""

import itertools

import pytest
import torch

from supergen.tiling import TilePlanner, resize_latents, resize_video

PLANS = [
    # canvas, tile, overlap, align, shift
    ((3, 16, 24), (3, 8, 12), (0, 0, 0), (1, 2, 2), "wrap"),
    ((3, 16, 24), (3, 8, 12), (0, 2, 4), (1, 2, 2), "none"),
    ((3, 16, 24), (3, 8, 12), (0, 2, 4), (1, 2, 2), "wrap"),
    ((3, 24, 36), (3, 8, 12), (0, 0, 0), (1, 2, 2), "wrap"),
    ((5, 14, 22), (3, 8, 12), (1, 2, 2), (1, 2, 2), "none"),  # odd sizes, temporal tiling
    ((7, 18, 30), (3, 8, 12), (1, 4, 6), (1, 2, 2), "wrap"),
    ((3, 8, 12), (3, 8, 12), (0, 0, 0), (1, 2, 2), "wrap"),  # one tile is the canvas
    ((2, 11, 13), (2, 5, 7), (0, 3, 1), (1, 1, 1), "wrap"),
]


@pytest.mark.parametrize("canvas,tile,overlap,align,shift", PLANS)
@pytest.mark.parametrize("blend", ["cosine", "uniform"])
def test_weights_sum_to_one_and_cover_every_cell(canvas, tile, overlap, align, shift, blend):
    planner = TilePlanner(canvas, tile, overlap, align, blend=blend, shift=shift)
    for step in range(6):
        plan = planner.plan(step)
        # float64 weights normalised per cell: one up to rounding.
        torch.testing.assert_close(plan.weight_sum(), torch.ones(canvas, dtype=torch.float64), rtol=0, atol=1e-12)
        assert int(plan.coverage().min()) >= 1
        for t in plan.tiles:
            assert t.size == tuple(min(a, b) for a, b in zip(tile, canvas))
            assert all(s % a == 0 for s, a in zip(t.start, align))


@pytest.mark.parametrize("canvas,tile,overlap,align,shift", PLANS)
def test_pointwise_model_blends_to_untiled_prediction(canvas, tile, overlap, align, shift):
    planner = TilePlanner(canvas, tile, overlap, align, blend="cosine", shift=shift)
    x = torch.randn(1, 4, *canvas, generator=torch.Generator().manual_seed(0))

    def model(v):
        return torch.tanh(3 * v) - 0.5 * v

    for step in (0, 1, 5):
        plan = planner.plan(step)
        blended = plan.blend([model(t.gather(x)) for t in plan.tiles])
        torch.testing.assert_close(blended, model(x), rtol=1e-6, atol=1e-6)


def test_wrap_shift_moves_grid_and_wraps_tiles():
    planner = TilePlanner((3, 16, 24), (3, 8, 12), align=(1, 2, 2), shift="wrap", shift_stride=(2, 4))
    assert planner.plan(0).shift == (0, 0)
    assert planner.plan(1).shift == (2, 4)
    assert planner.plan(3).shift == (6, 12)
    assert planner.plan(8).shift == (0, 8)  # 16 rows wrap: 8*2 % 16 = 0
    assert any(t.wraps for t in planner.plan(1).tiles)
    assert not any(t.wraps for t in planner.plan(0).tiles)
    x = torch.arange(16 * 24, dtype=torch.float32).reshape(1, 1, 1, 16, 24).expand(1, 1, 3, 16, 24)
    wrapped = next(t for t in planner.plan(1).tiles if t.wraps)
    crop = wrapped.gather(x)
    rows = (torch.arange(wrapped.start[1], wrapped.start[1] + 8) % 16)
    cols = (torch.arange(wrapped.start[2], wrapped.start[2] + 12) % 24)
    torch.testing.assert_close(crop[0, 0, 0], x[0, 0, 0][rows][:, cols])


def test_no_shift_keeps_grid_and_no_overlap_partitions_canvas():
    planner = TilePlanner((3, 16, 24), (3, 8, 12), align=(1, 2, 2), shift="none")
    assert planner.grid == (1, 2, 2)
    assert planner.plan(0).tiles == planner.plan(7).tiles
    assert int(planner.plan(3).coverage().max()) == 1


def test_overlap_grid_counts():
    # 2x the tile with overlap needs 3 tiles per axis; 3x without overlap needs 3.
    assert TilePlanner((3, 16, 24), (3, 8, 12), (0, 2, 2), (1, 2, 2)).grid == (1, 3, 3)
    assert TilePlanner((3, 24, 36), (3, 8, 12), (0, 0, 0), (1, 2, 2), shift="wrap").grid == (1, 3, 3)
    assert TilePlanner((11, 8, 12), (3, 8, 12), (1, 0, 0), (1, 2, 2)).grid == (5, 1, 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(canvas=(3, 8, 12), tile=(3, 10, 12)), "larger than the canvas"),
        (dict(canvas=(3, 16, 24), tile=(3, 8, 12), overlap=(0, 8, 0)), "overlap H=8"),
        (dict(canvas=(3, 15, 24), tile=(3, 8, 12), align=(1, 2, 2)), "multiples of the patch"),
    ],
)
def test_planner_rejects_bad_geometry(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TilePlanner(**kwargs)


def test_resizers_shapes_and_range():
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    up = resize_video(video, (9, 32, 48))
    assert up.shape == (1, 3, 9, 32, 48) and float(up.abs().max()) <= 1.0
    lat = torch.randn(1, 16, 3, 8, 12)
    up_lat = resize_latents(lat, (3, 24, 36))
    assert up_lat.shape == (1, 16, 3, 24, 36)
    # Resizing to the same size is the identity.
    torch.testing.assert_close(resize_latents(lat, (3, 8, 12)), lat)
    for a, b in itertools.pairwise([up_lat.mean(), lat.mean()]):
        assert abs(float(a - b)) < 0.05


def test_grid_moving_every_k_steps_visits_every_kth_position_of_the_every_step_grid():
    every_step = TilePlanner((1, 16, 24), (1, 8, 8), align=(1, 2, 2), shift="wrap", shift_stride=(2, 2))
    held = TilePlanner((1, 16, 24), (1, 8, 8), align=(1, 2, 2), shift="wrap", shift_stride=(2, 2), shift_every=3)
    assert TilePlanner((1, 16, 24), (1, 8, 8), align=(1, 2, 2), shift="wrap", shift_stride=(2, 2),
                       shift_every=1).shift_at(7) == every_step.shift_at(7)
    for step in range(20):
        assert held.shift_at(step) == every_step.shift_at(step - step % 3)
    # With a phase the grid moves on steps phase, phase + k, ...: the last of 18 steps with phase 17 % 3.
    last = TilePlanner((1, 16, 24), (1, 8, 8), align=(1, 2, 2), shift="wrap", shift_stride=(2, 2), shift_every=3,
                       shift_phase=17 % 3)
    assert [last.shift_at(s) for s in range(18)] == [every_step.shift_at(max(0, s - (s - 2) % 3)) for s in range(18)]
    assert last.shift_at(17) == every_step.shift_at(17) and last.shift_at(1) == (0, 0)
    with pytest.raises(ValueError, match="shift_every=0"):
        TilePlanner((1, 16, 24), (1, 8, 8), shift="wrap", shift_every=0)
