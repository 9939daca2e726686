"""The shipped ``toy-causal`` model: loads by name, streams with its own settings, and keeps its motion across blocks."""

import sys
from pathlib import Path

import numpy as np
import pytest

from supergen import StreamConfig, SuperGenPipeline
from supergen.models import SHIPPED_MODELS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.bench_stream_quality import analyse, stream_blocks  # noqa: E402

PROMPT = "a red circle moving left over a blue sky"


@pytest.fixture(scope="module")
def causal():
    return SuperGenPipeline.from_pretrained("toy-causal", device="cpu")


def test_toy_causal_ships_small_and_loads_with_its_stream_settings(causal):
    folder = SHIPPED_MODELS["toy-causal"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6
    assert list((folder / "transformer").glob("*.safetensors"))
    assert (causal.adapter.native_height, causal.adapter.native_width) == (32, 32)
    # The recommended settings come from its supergen.json, not StreamConfig's generic defaults.
    import json

    hints = json.loads((folder / "supergen.json").read_text())["stream"]
    assert causal.default_stream_config == StreamConfig(**hints)
    with causal.stream(PROMPT, num_blocks=2) as stream:
        blocks = list(stream)
    assert [b.frames.shape for b in blocks] == [(5, 32, 32, 3), (6, 32, 32, 3)]
    assert stream.metrics["stream"]["on_prompt_change"] == hints["on_prompt_change"]


def test_toy_causal_keeps_its_direction_across_block_boundaries_where_toy_does_not(causal):
    # The bound the issue asks for: toy-causal keeps the direction across most block boundaries, toy
    # (trained on 9-frame clips) across almost none. 12 blocks, the same stream settings for both models,
    # each at its own guidance (3 for both). Measured: toy-causal continuity 1.00, direction 1.00, one
    # object 0.83 (a magenta fringe in the first blocks reads as a purple speck in some frames; the same with
    # the decoder tuned on its own streams); toy 0.18 / 0.00
    # (docs/benchmarks.md; over 120 blocks and 4 prompts it is lower).
    config = causal.default_stream_config
    toy = SuperGenPipeline.from_pretrained("toy", device="cpu")
    scores = {}
    for name, pipe in (("toy-causal", causal), ("toy", toy)):
        frames, prompts, _ = stream_blocks(pipe, PROMPT, config, 12, seed=0)
        scores[name] = analyse(frames, prompts, chunk=4)
    assert scores["toy-causal"]["continuity"] >= 0.8, scores["toy-causal"]
    assert scores["toy"]["continuity"] <= 0.3, scores["toy"]
    assert scores["toy-causal"]["direction"] >= 0.8
    assert scores["toy-causal"]["one_object"] >= 0.75
    assert np.isfinite(scores["toy-causal"]["flicker"])


def test_teacher_forced_continuation_is_measured_against_the_world():
    # The continuation benchmark: the world's own clips move 1.4..1.9 px a frame the prompted way
    # (the measurement is sound), and toy-causal's x0 at sigma 1 is closer to the truth with the clip's
    # own context than with another clip's (it reads its context; shipped: 0.37 vs 1.60 on these 6 clips, 0.28 vs 0.84 on 32).
    from scripts.bench_stream_quality import teacher_forced

    r = teacher_forced("toy-causal", clips=6)
    assert 1.4 <= r["truth_px_per_frame"] <= 1.9, r
    assert np.isfinite(r["px_per_frame"]) and 0.0 <= r["moving_share"] <= 1.0
    assert r["x0_mse_own_context"] < 0.9 * r["x0_mse_other_context"], r


def test_teacher_forced_switch_measures_the_new_direction():
    # With a switch the world's clip turns at the sampled block: its truth moves 1.4..1.9 px a frame the new
    # way, and the model's step is measured both ways (the shipped model carries the old direction on:
    # docs/benchmarks.md, "Prompt switches").
    from scripts.bench_stream_quality import teacher_forced

    r = teacher_forced("toy-causal", clips=8, guidance=3.0, switch=True)
    assert r["switch"] and r["guidance"] == 3.0
    assert 1.4 <= r["truth_px_per_frame"] <= 1.9, r
    assert np.isfinite(r["px_per_frame"]) and np.isfinite(r["old_px_per_frame"])
    plain = teacher_forced("toy-causal", clips=8, guidance=3.0)
    assert not plain["switch"] and abs(plain["old_px_per_frame"] - plain["px_per_frame"]) < 1e-9


def test_vocab_scores_each_factor_and_weighs_failing_prompts_up(causal):
    # Two prompts that differ in colour and background, 2 blocks each: per prompt and per factor scores in
    # [0, 1], and a --prompt-weights entry per prompt of floor + (1 - mean(colour, direction, one object)),
    # squared here (--vocab-power 2), never under the floor.
    from scripts.bench_stream_quality import VOCAB_WEIGHT_FLOOR, bench_vocab

    prompts = [PROMPT, "a white circle moving left over a dark night"]
    r = bench_vocab(causal, causal.default_stream_config, 2, prompts=prompts, power=2.0)
    assert list(r["per_prompt"]) == prompts and r["blocks"] == 2
    assert {"colour red", "colour white", "background blue sky", "background dark night", "shape circle",
            "direction left", "all"} == set(r["per_factor"])
    for p, row in r["per_prompt"].items():
        assert all(0.0 <= row[k] <= 1.0 for k in ("colour", "direction", "one_object"))
        want = VOCAB_WEIGHT_FLOOR + 1 - np.mean([row["colour"], row["direction"], row["one_object"]])
        assert r["weights"][p] == pytest.approx(max(want ** 2, VOCAB_WEIGHT_FLOOR))
    # A factor shared by both prompts is their mean.
    assert r["per_factor"]["shape circle"]["colour"] == pytest.approx(
        np.mean([row["colour"] for row in r["per_prompt"].values()]))


def test_vocab_weights_weigh_the_chosen_factors_shortfall():
    # --vocab-factors direction,continuity: a prompt that keeps its colour but loses its direction weighs more
    # than one that loses its colour alone; with the default factors it is the other way round.
    from scripts.bench_stream_quality import VOCAB_WEIGHT_FLOOR, vocab_weights

    rows = {"turns": {"colour": 1.0, "direction": 0.2, "one_object": 1.0, "continuity": 0.4},
            "fades": {"colour": 0.1, "direction": 1.0, "one_object": 0.5, "continuity": 1.0},
            "fine": {"colour": 1.0, "direction": 1.0, "one_object": 1.0, "continuity": 1.0}}
    motion = vocab_weights(rows, 2.0, ("direction", "continuity"))
    assert motion["turns"] == pytest.approx((VOCAB_WEIGHT_FLOOR + 0.7) ** 2)
    assert motion["fades"] == pytest.approx(VOCAB_WEIGHT_FLOOR) == motion["fine"]
    plain = vocab_weights(rows)
    assert plain["fades"] == pytest.approx(VOCAB_WEIGHT_FLOOR + 1 - 1.6 / 3)
    assert plain["fades"] > plain["turns"] > plain["fine"]


@pytest.mark.parametrize("argv,message", [
    (["--vocab", "2", "--vocab-factors", "direction,speed"],
     "--vocab-factors 'direction,speed': give one or more of colour, direction, one_object, continuity, comma-separated"),
    (["--vocab", "2", "--vocab-factors", ","],
     "--vocab-factors ',': give one or more of colour, direction, one_object, continuity, comma-separated"),
    (["--vocab", "1", "--vocab-factors", "continuity"],
     "--vocab-factors continuity needs block boundaries; give --vocab 2 or more"),
    (["--vocab-weights", "w.json"], "--vocab-weights comes from the --vocab scores; give --vocab N (blocks per prompt) too"),
    (["--vocab", "2", "--vocab-power", "0"], "--vocab-power 0.0 must be > 0"),
    (["--switch-trials", "2", "--switch-modes", "restart,rewind"],
     "--switch-modes 'restart,rewind': give one or more of keep, recache, flush, restart"),
    (["--set", "context_noise=-0.1"], "--set: context_noise=-0.1 must be a finite number >= 0 and <= 1"),
    (["--set", "context_noise"], "--set: 'context_noise' is not FIELD=VALUE with FIELD one of block_frames, window, sink, "
     "steps, schedule, kv_write, context_noise, on_prompt_change"),
    (["--set", "steps=six"], "--set: 'steps=six': steps takes an integer"),
])
def test_bench_refuses_vocab_options_in_one_line_before_loading(monkeypatch, capsys, tmp_path, argv, message):
    from scripts import bench_stream_quality

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench_stream_quality.py", *argv])
    with pytest.raises(SystemExit) as err:
        bench_stream_quality.main()
    assert err.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert not (tmp_path / "w.json").exists()
